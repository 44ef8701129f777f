"""Sharded aggregation: a large round's updates folded by several processes at once.

Decoding dominates a merge (reading each envelope, checking its checksum, decompressing and
dequantizing its frames), and it is the same work for every update, so it splits cleanly: the
round's updates are cut into contiguous runs ("shards"), the aggregation service folds the first
itself while worker processes fold the others (each reads its updates from the blob store,
decodes and folds them one at a time into running sums, memory flat), and the service joins the
workers' sums in shard order (``RoundMerge.join``). A worker gets the global adapter, the
round's sample counts and its run's blob digests, not the updates, and sends back only running
sums (three float64 vectors of the adapter's size at most).

The result is deterministic for a given number of shards; it can differ from a one-process fold
in the last bits of its float64 sums (the additions are grouped per shard), which the float32
state rounds away almost everywhere. A strategy that keeps its updates (``fedmedian``) and a
round under ``min_per_process`` updates a process are folded by the service alone: below that,
splitting costs more than it saves (``benchmarks/aggregation.py --processes``).

Workers are started once, in the background, when the first round large enough to use them
comes (each imports torch, a few seconds: that round is folded by the service alone), and stay
until ``close``.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.adapters import AdapterState

log = logging.getLogger(__name__)

MIN_PER_PROCESS = 128  # updates a process folds at least before a round is sharded


@dataclass(frozen=True)
class StoredUpdate:
    """What decoding a stored update needs from its row, as plain values a worker can get."""

    update_id: str
    device_id: str
    blob_sha256: str | None
    n_samples: int  # as recorded; the merge may count it with fewer (a stale buffered update)


@dataclass(frozen=True)
class ShardJob:
    """One worker's part of a round: fold ``rows`` (updates ``start``, ``start + 1``, ...)."""

    blob_root: str
    strategy: str
    config: dict[str, object]
    global_state: dict[str, np.ndarray]
    n_samples: list[int]  # every update's count in the merge, the whole round
    start: int
    rows: list[StoredUpdate]
    with_fisher: bool
    norms: list[float] | None  # each row's delta norm, when the round clips
    bound: float | None


def split(count: int, processes: int, min_per_process: int = MIN_PER_PROCESS) -> list[range]:
    """Contiguous runs of ``range(count)``, as even as they can be: one per process, but no
    more runs than leave each at least ``min_per_process`` updates (one run below that)."""
    shards = max(1, min(processes, count // max(1, min_per_process)))
    bounds = [round(i * count / shards) for i in range(shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(shards)]


class MergePool:
    """``processes − 1`` worker processes that fold shards of a round; ``processes`` = 1 never
    starts one.

    Workers start in the background when the first round large enough to use them comes
    (``split`` starts them): starting one takes seconds (it imports torch), longer than folding
    a thousand updates, so that round is folded by the service alone, and the rounds after it
    are split once the workers are up. ``start(wait=True)`` starts them at once.
    """

    def __init__(self, processes: int, *, min_per_process: int = MIN_PER_PROCESS) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
        self.processes = processes
        self.min_per_process = min_per_process
        self._executor: ProcessPoolExecutor | None = None
        self._started: list[Future[None]] = []
        self.disabled = False  # workers failed to start once: not tried again

    def split(self, count: int) -> list[range]:
        """The runs a round of ``count`` updates is folded in: one while the workers are not up
        yet (and their start is set off if the round could use them)."""
        shards = split(count, self.processes, self.min_per_process)
        if len(shards) > 1 and not self.start():
            return [range(count)]
        return shards

    def start(self, wait: bool = False) -> bool:
        """Start the workers if they are not (in the background unless ``wait``); True once
        every worker is up."""
        if self.processes == 1 or self.disabled:
            return False
        if not self._started:
            log.info("starting %d merge workers", self.processes - 1)
            executor = self._workers()
            self._started = [executor.submit(_ready) for _ in range(self.processes - 1)]
        if wait:
            for future in self._started:
                future.exception()  # waits
        if not all(future.done() for future in self._started):
            return False
        failed = next((f.exception() for f in self._started if f.exception() is not None), None)
        if failed is not None:  # e.g. a main module that starts the service when imported
            log.warning("merge workers could not start (%s: %s); this process merges alone",
                        type(failed).__name__, failed)
            self.kill()
            self.disabled = True
            return False
        return True

    def submit(self, jobs: Sequence[ShardJob]) -> list[Future[dict[str, object]]]:
        """Start folding ``jobs`` in the workers; their results come in ``fold_shard``'s form.
        A pool whose worker died since its last round is replaced first."""
        if not jobs:
            return []
        try:
            return [self._workers().submit(fold_shard, job) for job in jobs]
        except BrokenProcessPool:
            self.close(wait=False)
            return [self._workers().submit(fold_shard, job) for job in jobs]

    def _workers(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes - 1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker)
        return self._executor

    def kill(self) -> None:
        """Stop the workers now, whatever they are doing (a run nobody will join, a hung one);
        a later ``submit`` starts new ones."""
        if self._executor is None:
            return
        for process in list(getattr(self._executor, "_processes", {}).values()):
            process.kill()
        self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        """Stop the workers (if any were started); a later round starts new ones."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None
        self._started = []


def _ready() -> None:
    """A worker's first job: be up, with what ``fold_shard`` imports imported."""
    import cloud.aggregation
    import cloud.strategies  # noqa: F401


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which stops these
    torch.set_num_threads(1)  # one core per process: the processes are the parallelism


def fold_shard(job: ShardJob) -> dict[str, object]:
    """A worker's fold of one shard: ``{"shard": RoundMerge.sums()}``, or ``{"refused":
    message}`` when the strategy refuses an update (what the service reports as the strategy
    refusing the round). Errors decoding a blob propagate as they are."""
    from cloud.aggregation import merged_update
    from cloud.blobs import BlobStore
    from cloud.strategies import make_strategy
    from cloud.strategies.base import RoundMerge

    blobs = BlobStore(Path(job.blob_root))
    strategy = make_strategy(job.strategy, **job.config)
    global_state: AdapterState = {k: torch.from_numpy(v) for k, v in job.global_state.items()}
    merge = RoundMerge(strategy, global_state, job.n_samples, None, start=job.start)
    for offset, row in enumerate(job.rows):
        update = merged_update(blobs, row, job.n_samples[job.start + offset], global_state,
                               with_fisher=job.with_fisher,
                               norm=job.norms[offset] if job.norms is not None else None,
                               bound=job.bound)
        try:
            merge.add(update)
        except ValueError as err:
            return {"refused": str(err)}
        del update
    return {"shard": merge.sums()}


def state_arrays(state: AdapterState) -> dict[str, np.ndarray]:
    """A state as numpy arrays (copies), to send to a worker."""
    return {key: value.detach().cpu().numpy().copy() for key, value in state.items()}
