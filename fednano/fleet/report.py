"""The fleet run's report, read from the cloud's database, with the checks a run must pass.

Per round: state, participants (accepted updates) of those selected, rejected updates,
held-out accuracy and training loss, bytes up (updates received) and down (tasks sent), the
split-training activation bytes the accepted updates report, and the round's wall time
(collecting -> closed). Then every rejected update with its code and reason, the refusals that
could not be an ``updates`` row (audited), the redeliveries the cloud ignored, and what each
fault did.

Checks (``FleetReport.checks``):
- ``rounds_closed``: the scheduled rounds closed with a new version;
- ``acknowledged_stored``: every update a device saw acknowledged by the broker (its log says
  "delivered") and every acknowledged fault payload is in the database (no acknowledged
  update lost);
- ``accepted_merged``: every accepted update of a closed round is in its version's lineage;
- ``verdicts``: every fault payload got the verdict it was built for.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from cloud.db import crud
from cloud.db.models import (
    ParticipationStatus,
    Round,
    RoundState,
    UpdateStatus,
)
from cloud.db.session import session_scope
from fednano.fleet.faults import Note, Sent

ROUND_METRICS = ("selected", "participants", "updates_rejected", "accuracy", "loss",
                 "bytes_up", "bytes_down")


@dataclass
class RoundRow:
    round_id: int
    state: str
    selected: int
    participants: int
    dropped: int  # selected, but nothing accepted by the deadline (or the round stopped)
    rejected: int
    accuracy: float | None
    loss: float | None
    bytes_up: int
    bytes_down: int
    activation_bytes: int  # split-training traffic of the accepted updates, both directions
    seconds: float | None
    failure_reason: str | None = None


@dataclass
class Rejected:
    round_id: int | None
    device_id: str
    update_id: str | None
    code: str
    reason: str


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class FleetReport:
    options: dict[str, Any]
    base_version: str
    bundle_version: str
    database: str
    api_url: str
    rounds: list[RoundRow] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    refused: list[Rejected] = field(default_factory=list)  # not an updates row (audited)
    redelivered: dict[str, int] = field(default_factory=dict)  # device -> ignored copies
    faults: list[Note] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    # update ids each device saw acknowledged by the broker (its log says "delivered")
    acknowledged: dict[str, list[str]] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    seconds: float = 0.0
    ready_seconds: float = 0.0  # start -> every device online

    @property
    def final_accuracy(self) -> float | None:
        closed = [r.accuracy for r in self.rounds if r.state == "closed"]
        return closed[-1] if closed else None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def round_seconds(self) -> float | None:
        """Median wall time of a closed round."""
        times = [r.seconds for r in self.rounds if r.state == "closed" and r.seconds]
        return statistics.median(times) if times else None

    def to_json(self) -> str:
        data = asdict(self)
        data["final_accuracy"] = self.final_accuracy
        data["ok"] = self.ok
        return json.dumps(data, indent=2, default=str)


# ------------------------------------------------------------------------------ from the database


def read_rounds(sessions: sessionmaker[Session]) -> list[RoundRow]:
    """One row per round, oldest first."""
    with session_scope(sessions) as session:
        return [_round_row(session, r) for r in crud.all_rounds(session)]


def _round_row(session: Session, round_: Round) -> RoundRow:
    summary = round_summary(session, round_.id)
    updates = crud.list_updates(session, round_id=round_.id)
    accepted = [u for u in updates if u.status is UpdateStatus.ACCEPTED]
    seconds = None
    if round_.started_at is not None and round_.closed_at is not None:
        seconds = (round_.closed_at - round_.started_at).total_seconds()
    return RoundRow(
        round_id=round_.id, state=round_.state.value, selected=len(round_.participations),
        participants=len(accepted),
        dropped=sum(p.status is ParticipationStatus.DROPPED for p in round_.participations),
        rejected=sum(u.status is UpdateStatus.REJECTED for u in updates),
        accuracy=summary.get("accuracy"), loss=summary.get("loss"),
        bytes_up=int(summary.get("bytes_up", sum(u.blob_size or 0 for u in updates))),
        bytes_down=int(summary.get("bytes_down", 0)),
        activation_bytes=int(sum(float(u.metrics.get("llm_bytes_up", 0))
                                 + float(u.metrics.get("llm_bytes_down", 0)) for u in accepted)),
        seconds=seconds, failure_reason=round_.failure_reason)


def round_summary(session: Session, round_id: int) -> dict[str, float]:
    """The round's metrics without a device (what ``GET /rounds/{id}/metrics`` summarises)."""
    return {m.name: m.value for m in crud.list_metrics(session, round_id=round_id)
            if m.device_id is None}


def read_rejections(sessions: sessionmaker[Session]) -> tuple[list[Rejected], list[Rejected],
                                                                 dict[str, int]]:
    """Rejected updates (rows), refusals (audited, no row) and ignored redeliveries."""
    with session_scope(sessions) as session:
        rows = crud.all_updates(session, status=UpdateStatus.REJECTED)
        rejected = [Rejected(u.round_id, u.device_id, u.update_id, u.rejection_code or "",
                             u.rejection_reason or "") for u in rows]
        refused = [Rejected(None, e.subject.removeprefix("device:"), e.details.get("update_id"),
                            str(e.details.get("code")), str(e.details.get("reason")))
                   for e in crud.all_audit_events(session, action="update.refused")]
        again = Counter(e.subject.removeprefix("device:")
                        for e in crud.all_audit_events(session, action="update.redelivered"))
    return rejected, refused, dict(again)


# ------------------------------------------------------------------------------ checks


def check_rounds(rows: list[RoundRow], expected: int) -> Check:
    closed = [r.round_id for r in rows if r.state == "closed"]
    failed = [f"{r.round_id} ({r.failure_reason})" for r in rows if r.state == "failed"]
    detail = f"{len(closed)} of {expected} rounds closed"
    if failed:
        detail += f"; failed: {', '.join(failed)}"
    return Check(len(closed) >= expected, detail)


def check_acknowledged(sessions: sessionmaker[Session], delivered: Mapping[str, Iterable[str]],
                       sent: list[Sent]) -> Check:
    """Every acknowledged update id is a row (malformed payloads have none: see verdicts)."""
    acked = {uid for ids in delivered.values() for uid in ids}
    acked |= {s.bad.update_id for s in sent if s.acked and s.bad.update_id
              and s.bad.expected != "malformed"}
    with session_scope(sessions) as session:
        stored = {u.update_id for u in crud.all_updates(session)}
    missing = sorted(acked - stored)
    return Check(not missing, f"{len(acked) - len(missing)} of {len(acked)} acknowledged "
                 f"updates stored" + (f"; missing {missing}" if missing else ""))


def check_merged(sessions: sessionmaker[Session]) -> Check:
    """Accepted updates of closed rounds vs. the lineage of the round's version."""
    problems, total = [], 0
    with session_scope(sessions) as session:
        for round_ in crud.all_rounds(session, state=RoundState.CLOSED):
            accepted = {u.id for u in crud.list_updates(session, round_id=round_.id,
                                                        status=UpdateStatus.ACCEPTED)}
            version = crud.round_version(session, round_id=round_.id)
            merged = set() if version is None else {
                u.id for u, _ in crud.version_lineage(session, version_id=version.id)}
            total += len(accepted)
            if accepted != merged:
                problems.append(f"round {round_.id}: accepted {sorted(accepted)}, merged "
                                f"{sorted(merged)}")
    return Check(not problems, f"{total} accepted updates, all in their round's version"
                 if not problems else "; ".join(problems))


def check_verdicts(sessions: sessionmaker[Session], sent: list[Sent]) -> Check:
    """Each fault payload's verdict: a rejection code, an audited refusal, or ignored."""
    wrong = []
    with session_scope(sessions) as session:
        refusals = Counter((e.subject.removeprefix("device:"), e.details.get("code"))
                           for e in crud.all_audit_events(session, action="update.refused"))
        for item in sent:
            if not item.acked:
                wrong.append(f"{item.bad.label}: not acknowledged by the broker")
                continue
            expected = item.bad.expected
            if expected == "malformed":
                ok = refusals[(item.device_id, "malformed")] > 0
            elif expected == "ignored":
                stored_once = crud.get_update(session, device_id=item.device_id,
                                              update_id=item.bad.update_id or "")
                ok = stored_once is not None and stored_once.status is UpdateStatus.ACCEPTED
            else:
                row = crud.get_update(session, device_id=item.device_id,
                                      update_id=item.bad.update_id or "")
                ok = row is not None and row.rejection_code == expected
            if not ok:
                wrong.append(f"{item.bad.label} (expected {expected})")
    return Check(not wrong, f"{len(sent)} fault payloads, each with its expected verdict"
                 if not wrong else "; ".join(wrong))


# ------------------------------------------------------------------------------ rendering


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def rounds_table(report: FleetReport) -> Table:
    table = Table("round", "state", "participants", "dropped", "rejected", "accuracy", "loss",
                  "KiB up", "KiB down", "activations MiB", "s", box=box.SIMPLE_HEAD,
                  title="rounds (from the cloud's database)", title_justify="left")
    for r in report.rounds:
        table.add_row(str(r.round_id), r.state, f"{r.participants}/{r.selected}",
                      str(r.dropped), str(r.rejected), _acc(r.accuracy),
                      "-" if r.loss is None else f"{r.loss:.3f}", _kib(r.bytes_up),
                      _kib(r.bytes_down), f"{r.activation_bytes / 2**20:,.1f}",
                      "-" if r.seconds is None else f"{r.seconds:.0f}")
    return table


def print_report(report: FleetReport, console: Console) -> None:
    console.print(rounds_table(report))
    if report.rejected or report.refused:
        table = Table("round", "device", "code", "reason", box=box.SIMPLE_HEAD,
                      title="rejected updates", title_justify="left")
        for item in report.rejected + report.refused:
            table.add_row("-" if item.round_id is None else str(item.round_id),
                          item.device_id, item.code, item.reason[:90])
        console.print(table)
    if report.faults:
        table = Table("s", "round", "event", "what happened", box=box.SIMPLE_HEAD,
                      title="events (schedule, faults)", title_justify="left")
        for note in report.faults:
            table.add_row(f"{note.at_s:.0f}", "-" if note.round_id is None else str(note.round_id),
                          note.fault, note.message)
        console.print(table)
    for name, check in report.checks.items():
        mark = "[green]ok[/green]" if check.ok else "[red]FAILED[/red]"
        console.print(f"{mark} {name}: {check.detail}", highlight=False)
    console.print(f"final accuracy {_acc(report.final_accuracy)}; wall time "
                  f"{report.seconds:.0f} s (fleet ready after {report.ready_seconds:.0f} s)",
                  highlight=False)


def report_markdown(report: FleetReport) -> str:
    o = report.options
    lines = [
        f"# fleet: {o['devices']} devices, alpha={o['alpha']}, {o['rounds']} rounds, "
        f"{o['strategy']}, faults: {', '.join(o['faults']) or 'none'}",
        "",
        f"- base {report.base_version}, bundle {report.bundle_version}, database "
        f"{report.database}; {o['steps']} local steps x batch {o['batch_size']}, "
        f"{o['max_samples'] or 'all'} samples per device, {o['eval_questions']} held-out "
        "questions per version",
        f"- final accuracy {_acc(report.final_accuracy)}; wall time {report.seconds:.0f} s "
        f"(fleet ready after {report.ready_seconds:.0f} s)",
        "",
        "| round | state | participants | dropped | rejected | accuracy | loss | KiB up "
        "| KiB down | activations MiB | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rounds:
        lines.append(f"| {r.round_id} | {r.state} | {r.participants}/{r.selected} | "
                     f"{r.dropped} | {r.rejected} | {_acc(r.accuracy)} | "
                     f"{'-' if r.loss is None else f'{r.loss:.3f}'} | {_kib(r.bytes_up)} | "
                     f"{_kib(r.bytes_down)} | {r.activation_bytes / 2**20:,.1f} | "
                     f"{'-' if r.seconds is None else f'{r.seconds:.0f}'} |")
    if report.rejected or report.refused:
        lines += ["", "| round | device | code | reason |", "|---|---|---|---|"]
        lines += [f"| {'-' if x.round_id is None else x.round_id} | {x.device_id} | {x.code} | "
                  f"{x.reason[:120]} |" for x in report.rejected + report.refused]
    if report.redelivered:
        lines += ["", "Redeliveries stored once and ignored: " + ", ".join(
            f"{d} x{n}" for d, n in sorted(report.redelivered.items()))]
    if report.faults:
        lines += ["", "| s | round | event | what happened |", "|---|---|---|---|"]
        lines += [f"| {n.at_s:.0f} | {'-' if n.round_id is None else n.round_id} | {n.fault} | "
                  f"{n.message} |" for n in report.faults]
    lines += [""] + [f"- {'ok' if c.ok else 'FAILED'} {name}: {c.detail}"
                     for name, c in report.checks.items()]
    return "\n".join(lines) + "\n"
