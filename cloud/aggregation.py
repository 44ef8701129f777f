"""The aggregation service: a round's accepted updates -> the next global adapter version.

Streams the round's accepted updates from their blobs through the round's strategy
(``fednano``, FedAvg unless told otherwise): each is read, decoded, folded into the strategy's
running sums and dropped, so memory is flat in the number of updates; a large round is split
across processes (``cloud.merge_pool``), whose running sums are joined. Stores the merged adapter
as a new version (a ``shared.codec`` fp32 frame, content-addressed by SHA-256) with its lineage
(each update's weight ``λ_k = n_k / N``), evaluates it on a held-out set through a pluggable
``Evaluator`` and records the round's metrics. Functions take the caller's session and flush;
the caller commits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from cloud import metrics
from cloud.blobs import Blob, BlobStore
from cloud.db import crud
from cloud.db.models import AdapterVersion, Round, Update, UpdateStatus
from cloud.merge_pool import MergePool, ShardJob, StoredUpdate, state_arrays
from cloud.rounds import RoundConfig
from cloud.strategies import Strategy
from cloud.strategies.base import RoundMerge
from shared import codec, protocol
from shared.adapters import AdapterState
from shared.merge import clip_delta, l2_norm, median_norm_bound, sample_weights
from shared.messages import UpdateMessage, unpack
from shared.update import AdapterUpdate

log = logging.getLogger(__name__)

VERSION_SCHEME = codec.Scheme(kind="fp32")
WORKER_GRACE_S = 60.0  # least time a merge worker gets after the coordinator's own run
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


def load_update(blobs: BlobStore, row: Update | StoredUpdate, global_state: AdapterState, *,
                with_fisher: bool = True) -> AdapterUpdate:
    """Decode a stored (already validated) update envelope into an ``AdapterUpdate``, with
    the decoder the validation gate used on it (``_decode_stored``). With ``with_fisher``
    False its Fisher frame is left undecoded (``fisher`` None): a strategy that does not read
    it does not pay for it (half the decoding of an update that carries one)."""
    message, delta, fisher = _decode_stored(blobs, row, global_state, with_fisher=with_fisher)
    return AdapterUpdate(client_id=row.device_id, delta=delta, n_samples=row.n_samples,
                         fisher=fisher, base_version=message.global_version,
                         metrics=dict(message.metrics))


def merged_update(blobs: BlobStore, row: Update | StoredUpdate, n_samples: int,
                  global_state: AdapterState, *, with_fisher: bool, norm: float | None = None,
                  bound: float | None = None) -> AdapterUpdate:
    """A stored update as a round's merge takes it (in the service and in a merge worker):
    decoded, counted with the merge's ``n_samples`` (fewer for a stale buffered update), its
    delta clipped to ``bound`` given its ``norm`` when the round clips."""
    update = dataclasses.replace(load_update(blobs, row, global_state, with_fisher=with_fisher),
                                 n_samples=n_samples)
    if bound is not None and norm is not None:
        update.delta = clip_delta(update.delta, norm, bound)
    return update


def load_delta(blobs: BlobStore, row: Update | StoredUpdate,
               global_state: AdapterState) -> AdapterState:
    """Only the Δθ of a stored update, decoded as ``load_update`` decodes it; its Fisher frame
    is not decoded (a pass that only needs each delta's norm reads this)."""
    return _decode_stored(blobs, row, global_state, with_fisher=False)[1]


def _decode_stored(blobs: BlobStore, row: Update | StoredUpdate, global_state: AdapterState, *,
                   with_fisher: bool) -> tuple[UpdateMessage, AdapterState, AdapterState | None]:
    """A stored update's message, Δθ and Fisher (None without ``with_fisher`` or when it has
    none), decoded with ``shared.protocol.decode_update``. The frames' own checksums are not
    checked again: ``BlobStore.get`` has just checked the whole envelope against the SHA-256
    it is stored under, the digest taken when the gate accepted it; every other check of the
    decoder still runs."""
    message, parts = _unpack_update(blobs, row)
    if not with_fisher:
        parts.pop(protocol.FISHER_PART, None)
    delta, fisher = protocol.decode_update(parts, expected=_shapes(global_state),
                                           max_bytes=MAX_BLOB_BYTES, verify=False)
    return message, delta, fisher


def has_fisher(blobs: BlobStore, row: Update) -> bool:
    """Whether a stored update carries a Fisher, from its envelope alone (nothing decoded)."""
    _, parts = _unpack_update(blobs, row)
    return protocol.FISHER_PART in parts


def _unpack_update(blobs: BlobStore,
                   row: Update | StoredUpdate) -> tuple[UpdateMessage, dict[str, bytes]]:
    if row.blob_sha256 is None:
        raise AggregationError(f"update {row.update_id!r} has no stored blob")
    return unpack(blobs.get(row.blob_sha256), UpdateMessage, max_bytes=MAX_BLOB_BYTES)


def _shapes(state: AdapterState) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


# ------------------------------------------------------------------------------ the service


class Aggregator:
    """Merges a round's accepted updates, stores the version, evaluates it, records metrics."""

    def __init__(self, blobs: BlobStore, *, evaluator: Evaluator | None = None,
                 merge_processes: int = 1) -> None:
        self.blobs = blobs
        self.evaluator = evaluator
        self.pool = MergePool(merge_processes)

    def close(self) -> None:
        """Stop the merge workers, if any were started."""
        self.pool.close()

    @metrics.AGGREGATION_SECONDS.time()
    def aggregate(self, session: Session, round_: Round) -> AdapterVersion:
        """Merge ``round_``'s accepted updates, and buffered ones carried over from earlier
        rounds (``_carried_over``), into a new version with lineage (λ_k = n_k/N).

        The updates are streamed (``_merge``): which ones enter and with how many samples is
        settled from their rows first, so every λ is known before the first delta is decoded.
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
        carried = self._carried_over(session, round_, config, strategy)
        merged_rows = [(row, row.n_samples) for row in rows] + carried
        previous = self._previous_step(session, round_, global_state, strategy)
        merged = self._merge(round_, strategy, global_state, merged_rows, previous,
                             clip=config.clip_to_median_norm)
        blob = store_state(self.blobs, merged)
        weights = sample_weights([n for _, n in merged_rows])
        version = crud.create_adapter_version(
            session, blob_sha256=blob.sha256, blob_size=blob.size, blob_path=str(blob.path),
            parent_id=round_.base_version_id, round_id=round_.id, strategy=round_.strategy,
            lineage={r.id: w for (r, _), w in zip(merged_rows, weights, strict=True)})
        crud.record_metric(session, name="updates_carried_over", round_id=round_.id,
                           version_id=version.id, value=len(carried))
        crud.record_metric(session, name="aggregation_seconds", round_id=round_.id,
                           version_id=version.id, value=time.perf_counter() - started)
        return version

    def _carried_over(self, session: Session, round_: Round, config: RoundConfig,
                      strategy: Strategy) -> list[tuple[Update, int]]:
        """Buffered updates (late, valid, not merged yet) at most ``max_staleness`` versions
        older than this round's base, each with the n·stale_weight^s samples it counts as, s =
        how many versions it is behind. Without a Fisher they sit out a strategy that needs
        one (read from the envelope: nothing is decoded here)."""
        base_id = round_.base_version_id
        assert base_id is not None
        carried = []
        for row in crud.unmerged_buffered_updates(
                session, min_base_version=base_id - config.max_staleness):
            if strategy.requires_fisher and not has_fisher(self.blobs, row):
                continue
            staleness = max(0, base_id - row.base_version)
            carried.append((row, max(1, round(row.n_samples * config.stale_weight ** staleness))))
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
               rows: Sequence[tuple[Update | StoredUpdate, int]],
               previous: AdapterState | None = None,
               clip: float | None = None) -> AdapterState:
        """Stream ``rows`` (each with the sample count it counts as) through the strategy: read,
        decode, fold in, drop, one update at a time (``Strategy.stream``).

        With ``clip`` (``clip_to_median_norm``) the bound needs every delta's norm before the
        first is folded in, so a first pass decodes each delta (not its Fisher) for its norm
        alone and the second clips each delta as it folds it in: two decodes of each delta,
        memory still flat. Errors decoding a blob propagate as they are; what the strategy
        refuses is an ``AggregationError``.
        """
        if not rows:
            raise AggregationError(f"round {round_.id} has no accepted updates")
        norms: list[float] = []
        bound = None
        if clip is not None:
            norms = [l2_norm(load_delta(self.blobs, row, global_state)) for row, _ in rows]
            bound = median_norm_bound(norms, clip)
        try:
            merge = strategy.stream(global_state, [n for _, n in rows], previous)
        except ValueError as err:
            raise _refused(strategy, err) from err
        if merge is None:
            raise AggregationError(f"strategy {strategy.name} needs at least "
                                   f"{strategy.min_updates} updates, got {len(rows)}")
        shards = self.pool.split(len(rows)) if merge.shardable else [range(len(rows))]
        if len(shards) > 1:
            log.info("round %s: merging %d updates in %d runs, %d in merge workers",
                     round_.id, len(rows), len(shards), len(shards) - 1)
        sent_state = state_arrays(global_state) if len(shards) > 1 else {}
        futures = self.pool.submit([
            ShardJob(blob_root=str(self.blobs.root), strategy=strategy.name,
                     config=strategy.config(), global_state=sent_state,
                     n_samples=merge.n_samples, start=shard.start,
                     rows=[_stored(rows[i][0]) for i in shard],
                     with_fisher=strategy.requires_fisher,
                     norms=[norms[i] for i in shard] if bound is not None else None,
                     bound=bound)
            for shard in shards[1:]])
        try:
            started = time.monotonic()
            self._fold(merge, strategy, global_state, rows, shards[0], norms, bound)
            # a worker's run is as long as this one: one far slower is hung (a stuck read)
            deadline = time.monotonic() + max(WORKER_GRACE_S, 4 * (time.monotonic() - started))
            for shard, future in zip(shards[1:], futures, strict=True):  # in shard order
                try:
                    result = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except (BrokenProcessPool, CancelledError, FutureTimeout) as err:  # no sums
                    log.warning("a merge worker %s; folding updates %d-%d here",
                                "is hung" if isinstance(err, FutureTimeout) else "died",
                                shard.start, shard.stop - 1)
                    self.pool.kill()  # the next large round starts new workers
                    result = {"shard": self._fold_run(merge, strategy, global_state, rows,
                                                      shard, norms, bound)}
                if "refused" in result:
                    raise _refused(strategy, ValueError(str(result["refused"])))
                merge.join(result["shard"])  # type: ignore[arg-type]
        finally:
            if any(not future.done() for future in futures):
                self.pool.kill()  # a run nobody will join must not delay the next round
        try:
            return merge.result()
        except ValueError as err:
            raise _refused(strategy, err) from err

    def _fold_run(self, merge: RoundMerge, strategy: Strategy, global_state: AdapterState,
                  rows: Sequence[tuple[Update | StoredUpdate, int]], shard: range,
                  norms: Sequence[float], bound: float | None) -> dict[str, object]:
        """A worker's run folded here instead, into sums of its own (as the worker would have:
        the same bits)."""
        run = merge.shard(shard.start)
        self._fold(run, strategy, global_state, rows, shard, norms, bound)
        return run.sums()

    def _fold(self, merge: RoundMerge, strategy: Strategy, global_state: AdapterState,
              rows: Sequence[tuple[Update | StoredUpdate, int]], shard: range,
              norms: Sequence[float], bound: float | None) -> None:
        """Fold the updates of ``shard`` in this process, one at a time."""
        for index in shard:
            row, n_samples = rows[index]
            update = merged_update(self.blobs, row, n_samples, global_state,
                                   with_fisher=strategy.requires_fisher,
                                   norm=norms[index] if bound is not None else None, bound=bound)
            try:
                merge.add(update)
            except ValueError as err:
                raise _refused(strategy, err) from err
            del update  # dropped before the next one is decoded

    def evaluate(self, version: AdapterVersion) -> Evaluation | None:
        """The held-out evaluation of a stored version (None without an evaluator)."""
        if self.evaluator is None:
            return None
        return self.evaluator(load_state(self.blobs, version))


def _stored(row: Update | StoredUpdate) -> StoredUpdate:
    if isinstance(row, StoredUpdate):
        return row
    return StoredUpdate(update_id=row.update_id, device_id=row.device_id,
                        blob_sha256=row.blob_sha256, n_samples=row.n_samples)


def _refused(strategy: Strategy, err: ValueError) -> AggregationError:
    return AggregationError(f"strategy {strategy.name} refused the updates: {err}")


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
