"""What the fleet runner watches while it drives: the database and the devices' logs.

``read_snapshot`` is one short read of the cloud's database (rounds, participations, updates,
who is online, the schedule): the live progress and the fault triggers work from it.
``DeviceLogs`` follows each device's log file: when a round's training started on a device
(a fault trigger) and which updates the device saw acknowledged by the broker ("delivered":
the set that must all be in the database at the end).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from cloud.db import crud
from cloud.db.models import RoundState
from cloud.db.session import session_scope
from cloud.rounds import Schedule, load_schedule


@dataclass(frozen=True)
class RoundView:
    id: int
    state: RoundState
    started_at: datetime | None
    deadline_at: datetime | None
    closed_at: datetime | None
    participants: dict[str, str]  # device id -> participation status
    accuracy: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in (RoundState.CLOSED, RoundState.FAILED)


@dataclass(frozen=True)
class UpdateView:
    update_id: str
    round_id: int
    device_id: str
    status: str
    code: str | None


@dataclass(frozen=True)
class Snapshot:
    rounds: dict[int, RoundView] = field(default_factory=dict)
    online: frozenset[str] = frozenset()
    updates: dict[str, UpdateView] = field(default_factory=dict)
    schedule: Schedule = field(default_factory=Schedule)

    def round(self, round_id: int) -> RoundView | None:
        return self.rounds.get(round_id)

    @property
    def closed(self) -> int:
        return sum(r.state is RoundState.CLOSED for r in self.rounds.values())

    @property
    def finished(self) -> int:
        return sum(r.finished for r in self.rounds.values())

    def collecting(self) -> RoundView | None:
        """The round collecting updates now, if any."""
        return next((r for r in self.rounds.values() if r.state is RoundState.COLLECTING), None)


def read_snapshot(sessions: sessionmaker[Session]) -> Snapshot:
    """The database as the runner needs it, in one transaction."""
    with session_scope(sessions) as session:
        rounds = {r.id: r for r in crud.all_rounds(session)}
        people: dict[int, dict[str, str]] = {r: {} for r in rounds}
        for p in crud.all_participations(session):
            people.setdefault(p.round_id, {})[p.device_id] = p.status.value
        views = {r.id: RoundView(r.id, r.state, r.started_at, r.deadline_at, r.closed_at,
                                 people[r.id], _accuracy(session, r.id))
                 for r in rounds.values()}
        online = frozenset(d.id for d in crud.online_devices(session))
        updates = {u.update_id: UpdateView(u.update_id, u.round_id, u.device_id,
                                           u.status.value, u.rejection_code)
                   for u in crud.all_updates(session)}
        return Snapshot(views, online, updates, load_schedule(session))


def _accuracy(session: Session, round_id: int) -> float | None:
    rows = crud.list_metrics(session, round_id=round_id, name="accuracy")
    return rows[-1].value if rows else None


# ------------------------------------------------------------------------------ device logs

_TRAINING = re.compile(r": round (\d+): training")
_DELIVERED = re.compile(r": round (\d+): update (\S+) delivered")


class DeviceLogs:
    """Follows the devices' log files incrementally (see the module docstring)."""

    def __init__(self) -> None:
        self._paths: dict[str, Path] = {}
        self._offsets: dict[str, int] = {}
        self._training: dict[tuple[str, int], float] = {}  # (device, round) -> first seen
        self.delivered: dict[str, set[str]] = {}  # device -> acknowledged update ids

    def follow(self, device_id: str, path: Path) -> None:
        self._paths[device_id] = path
        self._offsets.setdefault(device_id, 0)
        self.delivered.setdefault(device_id, set())

    def poll(self) -> None:
        """Read what the logs gained since the last call."""
        now = time.monotonic()
        for device_id, path in self._paths.items():
            try:
                with path.open("rb") as handle:
                    handle.seek(self._offsets[device_id])
                    chunk = handle.read()
            except FileNotFoundError:
                continue
            complete = chunk.rfind(b"\n") + 1  # keep a half-written line for next time
            self._offsets[device_id] += complete
            self._scan(device_id, chunk[:complete].decode(errors="replace"), now)

    def _scan(self, device_id: str, text: str, now: float) -> None:
        for match in _TRAINING.finditer(text):
            self._training.setdefault((device_id, int(match.group(1))), now)
        for match in _DELIVERED.finditer(text):
            self.delivered[device_id].add(match.group(2))

    def training_since(self, device_id: str, round_id: int) -> float | None:
        """When (monotonic) the device was first seen training ``round_id``; None if not yet."""
        return self._training.get((device_id, round_id))
