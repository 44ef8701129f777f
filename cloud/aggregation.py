"""The aggregation service: a round's accepted updates -> the next global adapter version.

Loads the round's accepted updates from their blobs, runs the round's strategy (``fednano``,
FedAvg unless told otherwise), stores the merged adapter as a new version (a ``shared.codec`` fp32
frame, content-addressed by SHA-256) with its lineage (each update's weight ``λ_k = n_k / N``),
evaluates it on a held-out set through a pluggable ``Evaluator`` and records the round's metrics.
Functions take the caller's session and flush; the caller commits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from cloud import metrics
from cloud.blobs import Blob, BlobStore
from cloud.db import crud
from cloud.db.models import AdapterVersion, Round, Update, UpdateStatus
from cloud.rounds import RoundConfig
from cloud.strategies import Strategy
from shared import codec, protocol
from shared.adapters import AdapterState
from shared.merge import clip_to_median_norm, sample_weights
from shared.messages import UpdateMessage, unpack
from shared.update import AdapterUpdate

VERSION_SCHEME = codec.Scheme(kind="fp32")
MAX_BLOB_BYTES = 64 * 2**20


class AggregationError(RuntimeError):
    """A round's updates could not be merged (the round fails with this reason)."""


@dataclass(frozen=True)
class Evaluation:
    """How a global adapter did on the held-out set."""

    accuracy: float
    n: int
    loss: float | None = None
    per_type: dict[str, float] = field(default_factory=dict)


Evaluator = Callable[[AdapterState], Evaluation]


# ------------------------------------------------------------------------------ adapter versions


def store_state(blobs: BlobStore, state: AdapterState) -> Blob:
    """Write an adapter state as an fp32 codec frame blob."""
    return blobs.put(codec.encode(state, VERSION_SCHEME))


def load_state(blobs: BlobStore, version: AdapterVersion) -> AdapterState:
    """The adapter state of a stored version (checksums checked)."""
    return codec.decode(blobs.get(version.blob_sha256), max_bytes=MAX_BLOB_BYTES)


def ensure_initial_version(session: Session, blobs: BlobStore,
                           state: AdapterState) -> AdapterVersion:
    """The newest version, or ``state`` stored as the first one if there is none yet."""
    latest = crud.latest_adapter_version(session)
    if latest is not None:
        return latest
    blob = store_state(blobs, state)
    version = crud.create_adapter_version(session, blob_sha256=blob.sha256, blob_size=blob.size,
                                          blob_path=str(blob.path))
    crud.record_audit(session, actor="system", action="version.initial",
                      subject=f"version:{version.id}", details={"sha256": blob.sha256})
    return version


def load_update(blobs: BlobStore, row: Update, global_state: AdapterState) -> AdapterUpdate:
    """Decode a stored (already validated) update envelope into an ``AdapterUpdate``, with
    the decoder the validation gate used on it (``shared.protocol.decode_update``)."""
    if row.blob_sha256 is None:
        raise AggregationError(f"update {row.update_id!r} has no stored blob")
    message, parts = unpack(blobs.get(row.blob_sha256), UpdateMessage, max_bytes=MAX_BLOB_BYTES)
    expected = {key: tuple(value.shape) for key, value in global_state.items()}
    delta, fisher = protocol.decode_update(parts, expected=expected, max_bytes=MAX_BLOB_BYTES)
    return AdapterUpdate(client_id=row.device_id, delta=delta, n_samples=row.n_samples,
                         fisher=fisher, base_version=message.global_version,
                         metrics=dict(message.metrics))


# ------------------------------------------------------------------------------ the service


class Aggregator:
    """Merges a round's accepted updates, stores the version, evaluates it, records metrics."""

    def __init__(self, blobs: BlobStore, *, evaluator: Evaluator | None = None) -> None:
        self.blobs = blobs
        self.evaluator = evaluator

    @metrics.AGGREGATION_SECONDS.time()
    def aggregate(self, session: Session, round_: Round) -> AdapterVersion:
        """Merge ``round_``'s accepted updates, and buffered ones carried over from earlier
        rounds (``_carried_over``), into a new version with lineage (λ_k = n_k/N).

        ``AggregationError`` if there is no base version, no accepted update, or the strategy
        refuses them.
        """
        started = time.perf_counter()
        if round_.base_version is None:
            raise AggregationError(f"round {round_.id} has no base version to merge into")
        rows = crud.list_updates(session, round_id=round_.id, status=UpdateStatus.ACCEPTED)
        global_state = load_state(self.blobs, round_.base_version)
        config = RoundConfig.of(round_)
        strategy = config.make_strategy()
        updates = [load_update(self.blobs, r, global_state) for r in rows]
        carried = self._carried_over(session, round_, config, strategy, global_state)
        rows += [row for row, _ in carried]
        updates += [update for _, update in carried]
        if config.clip_to_median_norm is not None:
            clipped = clip_to_median_norm([u.delta for u in updates], config.clip_to_median_norm)
            updates = [dataclasses.replace(u, delta=d) for u, d in zip(updates, clipped,
                                                                        strict=True)]
        previous = self._previous_step(session, round_, global_state, strategy)
        merged = self._merge(round_, strategy, global_state, updates, previous)
        blob = store_state(self.blobs, merged)
        weights = sample_weights([u.n_samples for u in updates])
        version = crud.create_adapter_version(
            session, blob_sha256=blob.sha256, blob_size=blob.size, blob_path=str(blob.path),
            parent_id=round_.base_version_id, round_id=round_.id, strategy=round_.strategy,
            lineage={r.id: w for r, w in zip(rows, weights, strict=True)})
        crud.record_metric(session, name="updates_carried_over", round_id=round_.id,
                           version_id=version.id, value=len(carried))
        crud.record_metric(session, name="aggregation_seconds", round_id=round_.id,
                           version_id=version.id, value=time.perf_counter() - started)
        return version

    def _carried_over(self, session: Session, round_: Round, config: RoundConfig,
                      strategy: Strategy, global_state: AdapterState,
                      ) -> list[tuple[Update, AdapterUpdate]]:
        """Buffered updates (late, valid, not merged yet) at most ``max_staleness`` versions
        older than this round's base, each counted as n·stale_weight^s samples, s = how many
        versions it is behind. Without a Fisher they sit out a strategy that needs one."""
        base_id = round_.base_version_id
        assert base_id is not None
        carried = []
        for row in crud.unmerged_buffered_updates(
                session, min_base_version=base_id - config.max_staleness):
            update = load_update(self.blobs, row, global_state)
            if strategy.requires_fisher and update.fisher is None:
                continue
            staleness = max(0, base_id - row.base_version)
            n_samples = max(1, round(row.n_samples * config.stale_weight ** staleness))
            carried.append((row, dataclasses.replace(update, n_samples=n_samples)))
        return carried

    def _previous_step(self, session: Session, round_: Round, global_state: AdapterState,
                       strategy: Strategy) -> AdapterState | None:
        """θ_base − θ_parent: the step that produced this round's base version, which is the
        whole state of the server momentum (None for the first version or without momentum)."""
        base = round_.base_version
        if not strategy.uses_previous_step or base is None or base.parent_id is None:
            return None
        parent = crud.get_adapter_version(session, version_id=base.parent_id)
        if parent is None:
            return None
        before = load_state(self.blobs, parent)
        return {key: global_state[key] - before[key] for key in global_state}

    def _merge(self, round_: Round, strategy: Strategy, global_state: AdapterState,
               updates: Sequence[AdapterUpdate],
               previous: AdapterState | None = None) -> AdapterState:
        if not updates:
            raise AggregationError(f"round {round_.id} has no accepted updates")
        try:
            merged = strategy.aggregate(global_state, updates, previous)
        except ValueError as err:
            raise AggregationError(f"strategy {strategy.name} refused the updates: {err}") from err
        if merged is None:
            raise AggregationError(f"strategy {strategy.name} needs at least "
                                   f"{strategy.min_updates} updates, got {len(updates)}")
        return merged

    def evaluate(self, version: AdapterVersion) -> Evaluation | None:
        """The held-out evaluation of a stored version (None without an evaluator)."""
        if self.evaluator is None:
            return None
        return self.evaluator(load_state(self.blobs, version))


def record_round_metrics(session: Session, round_: Round, version: AdapterVersion | None,
                         evaluation: Evaluation | None) -> None:
    """Per-round metrics: accuracy and eval loss, training loss, participants, rejected and
    buffered updates, bytes up (updates received) and down (tasks sent)."""
    updates = crud.list_updates(session, round_id=round_.id)
    accepted = [u for u in updates if u.status is UpdateStatus.ACCEPTED]
    values: dict[str, float | None] = {
        "participants": len(accepted),
        "selected": len(round_.participations),
        "updates_rejected": sum(u.status is UpdateStatus.REJECTED for u in updates),
        "updates_buffered": sum(u.status is UpdateStatus.BUFFERED for u in updates),
        "bytes_up": sum(u.blob_size or 0 for u in updates),
        "bytes_down": sum(m.value for m in crud.list_metrics(session, round_id=round_.id,
                                                             name="task_bytes")),
        "loss": _training_loss(accepted),
    }
    if evaluation is not None:
        values |= {"accuracy": evaluation.accuracy, "eval_loss": evaluation.loss,
                   "eval_samples": evaluation.n}
    version_id = None if version is None else version.id
    for name, value in values.items():
        if value is not None and math.isfinite(value):  # JSON (the API) has no NaN/Infinity
            crud.record_metric(session, name=name, value=value, round_id=round_.id,
                               version_id=version_id)


def _training_loss(accepted: Sequence[Update]) -> float | None:
    """The n-weighted mean of the devices' last local loss (``loss_last``, else ``loss``)."""
    pairs: list[tuple[int, float]] = []
    for update in accepted:
        value = update.metrics.get("loss_last", update.metrics.get("loss"))
        if isinstance(value, (int, float)):
            pairs.append((update.n_samples, float(value)))
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None
