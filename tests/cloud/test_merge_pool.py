"""Sharded aggregation: a round's updates folded by worker processes (real spawned processes,
a real blob store) give the one-process merge, deterministically, and a worker's refusal, a bad
blob or a dead worker is handled as in one process."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloud.aggregation import AggregationError, Aggregator
from cloud.blobs import BlobIntegrityError, BlobStore
from cloud.merge_pool import MergePool, StoredUpdate, split
from cloud.strategies import make_strategy
from shared import protocol
from shared.adapters import AdapterState
from shared.messages import UpdateCodec, UpdateMessage
from shared.update import AdapterUpdate

GLOBAL: AdapterState = {"a": torch.zeros(4, 24), "b": torch.zeros(24, 4)}
ROUND = types.SimpleNamespace(id=7)
COUNT = 60


def _envelope(index: int, with_fisher: bool = True) -> bytes:
    gen = torch.Generator().manual_seed(index)
    delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}
    fisher = {k: torch.rand(v.shape, generator=gen) ** 4 for k, v in GLOBAL.items()}
    message = UpdateMessage(update_id=f"update-{index:06d}", task_id=f"task-{index:08d}",
                            round_id=1, global_version=1, base_version="test",
                            n_samples=16 + index)
    return protocol.encode_update(message, delta, fisher if with_fisher else None,
                                  UpdateCodec())


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    return BlobStore(tmp_path_factory.mktemp("blobs"))


def _rows(blobs: BlobStore, count: int = COUNT,
          replace: dict[int, bytes] | None = None) -> list[tuple[StoredUpdate, int]]:
    rows = []
    for i in range(count):
        data = (replace or {}).get(i) or _envelope(i)
        blob = blobs.put(data)
        rows.append((StoredUpdate(f"u{i}", f"dev-{i:02d}", blob.sha256, 16 + i), 16 + i))
    return rows


@pytest.fixture(scope="module")
def sharded(blobs: BlobStore) -> Iterator[Aggregator]:
    """Three processes (two spawned workers), sharding from 10 updates a process."""
    aggregator = Aggregator(blobs, merge_processes=3)
    aggregator.pool = MergePool(3, min_per_process=10)
    assert aggregator.pool.start(wait=True)
    yield aggregator
    aggregator.close()


def _started_pool(processes: int = 2) -> MergePool:
    pool = MergePool(processes, min_per_process=10)
    assert pool.start(wait=True)
    return pool


def test_the_first_large_round_is_folded_alone_while_the_workers_start(
        blobs: BlobStore) -> None:
    aggregator = Aggregator(blobs, merge_processes=2)
    aggregator.pool = MergePool(2, min_per_process=10)
    try:
        assert aggregator.pool.split(5) == [range(0, 5)]  # too small: nothing starts
        assert aggregator.pool._executor is None
        assert aggregator.pool.split(COUNT) == [range(0, COUNT)]  # starts them, folds alone
        assert aggregator.pool._executor is not None
        assert aggregator.pool.start(wait=True)
        assert aggregator.pool.split(COUNT) == [range(0, 30), range(30, 60)]
    finally:
        aggregator.close()
    assert not MergePool(1).start(wait=True)  # one process: no workers, ever


def test_split_gives_contiguous_even_runs_with_a_minimum_each() -> None:
    assert split(1000, 2) == [range(0, 500), range(500, 1000)]
    assert split(1000, 3) == [range(0, 333), range(333, 667), range(667, 1000)]
    assert split(255, 2) == [range(0, 255)]  # each would get < 128
    assert split(256, 4) == [range(0, 128), range(128, 256)]
    assert split(5, 1) == [range(0, 5)]
    assert split(0, 4) == [range(0, 0)]


@pytest.mark.parametrize("name", ["fednano", "fisher-norm", "fisher-raw"])
def test_sharded_merge_is_the_one_process_merge_and_deterministic(
        name: str, blobs: BlobStore, sharded: Aggregator) -> None:
    rows = _rows(blobs)
    strategy = make_strategy(name)
    alone = Aggregator(blobs)._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
    first = sharded._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
    second = sharded._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
    assert sharded.pool.split(len(rows)) == [range(0, 20), range(20, 40), range(40, 60)]
    for key in GLOBAL:
        assert torch.equal(first[key], second[key]), "the same shards give the same bits"
        torch.testing.assert_close(first[key], alone[key], rtol=1e-6, atol=1e-9)
        assert not torch.equal(first[key], GLOBAL[key])


def test_workers_merge_with_the_rounds_options_and_carried_over_counts(
        blobs: BlobStore, sharded: Aggregator) -> None:
    rows = [(row, n if i % 7 else max(1, n // 3)) for i, (row, n) in enumerate(_rows(blobs))]
    strategy = make_strategy("fisher-norm", floor=0.3, normalize="mean", fallback=0.05)
    previous = {k: 0.01 * torch.ones(v.shape) for k, v in GLOBAL.items()}
    momentum = make_strategy("fedavg", server_momentum=0.5, server_lr=1.5)
    for chosen, prev in ((strategy, None), (momentum, previous)):
        alone = Aggregator(blobs)._merge(ROUND, chosen, GLOBAL, rows,  # type: ignore[arg-type]
                                         prev)
        split_ = sharded._merge(ROUND, chosen, GLOBAL, rows, prev)  # type: ignore[arg-type]
        for key in GLOBAL:
            torch.testing.assert_close(split_[key], alone[key], rtol=1e-6, atol=1e-9)
    default = sharded._merge(ROUND, make_strategy("fisher-norm"), GLOBAL,  # type: ignore[arg-type]
                             rows)
    assert any(not torch.allclose(default[k], split_[k]) for k in GLOBAL), "options ignored"


def test_a_refusal_in_the_first_run_wins_and_stops_the_workers_runs(
        blobs: BlobStore, sharded: Aggregator) -> None:
    envelope = bytearray(_envelope(998))
    envelope[-3] ^= 0xFF
    rows = _rows(blobs, replace={3: _envelope(3, with_fisher=False)})
    rows[50] = (StoredUpdate("u50", "dev-50", blobs.put(bytes(envelope)).sha256, 66), 66)
    with pytest.raises(AggregationError, match=r"dev-03"):  # update 3 before update 50
        sharded._merge(ROUND, make_strategy("fisher-norm"), GLOBAL, rows)  # type: ignore[arg-type]
    merged = sharded._merge(ROUND, make_strategy("fedavg"), GLOBAL,  # type: ignore[arg-type]
                            _rows(blobs))
    assert set(merged) == set(GLOBAL)  # the next round is merged, by new workers if need be
    assert sharded.pool.start(wait=True)  # up again for the tests after this one


def test_the_default_process_count_follows_the_cpu_quota(tmp_path: Path) -> None:
    from cloud.settings import usable_cpus

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == usable_cpus(tmp_path / "absent") >= 1


def test_clipped_round_is_sharded_with_each_shards_norms(blobs: BlobStore,
                                                         sharded: Aggregator) -> None:
    rows = _rows(blobs)
    strategy = make_strategy("fedavg")
    alone = Aggregator(blobs)._merge(ROUND, strategy, GLOBAL, rows,  # type: ignore[arg-type]
                                     clip=0.5)
    split_ = sharded._merge(ROUND, strategy, GLOBAL, rows, clip=0.5)  # type: ignore[arg-type]
    unclipped = Aggregator(blobs)._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
    for key in GLOBAL:
        torch.testing.assert_close(split_[key], alone[key], rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(alone[k], unclipped[k]) for k in GLOBAL), "clip had no effect"


def test_a_median_is_not_sharded(blobs: BlobStore, tmp_path: Path) -> None:
    aggregator = Aggregator(blobs, merge_processes=2)
    aggregator.pool = MergePool(2, min_per_process=10)  # not started: a median never starts it
    merged = aggregator._merge(ROUND, make_strategy("fedmedian"), GLOBAL,  # type: ignore[arg-type]
                               _rows(blobs))
    assert aggregator.pool._executor is None  # no worker was started
    assert set(merged) == set(GLOBAL)


def test_an_update_a_worker_refuses_fails_the_round_naming_it(blobs: BlobStore,
                                                              sharded: Aggregator) -> None:
    rows = _rows(blobs, replace={45: _envelope(45, with_fisher=False)})
    with pytest.raises(AggregationError, match=r"fisher-norm.*dev-45"):
        sharded._merge(ROUND, make_strategy("fisher-norm"), GLOBAL, rows)  # type: ignore[arg-type]


def test_a_corrupt_blob_in_a_workers_shard_propagates_as_in_one_process(
        blobs: BlobStore, sharded: Aggregator) -> None:
    rows = _rows(blobs)
    bad = blobs.put(_envelope(999))
    stored = bytearray(bad.path.read_bytes())
    stored[-3] ^= 0xFF  # rotted on disk, inside the last frame's payload
    bad.path.write_bytes(bytes(stored))
    rows[30] = (StoredUpdate("u30", "dev-30", bad.sha256, 46), 46)
    strategy = make_strategy("fisher-norm")  # decodes both frames
    with pytest.raises(BlobIntegrityError, match="does not match its sha256"):
        Aggregator(blobs)._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
    with pytest.raises(BlobIntegrityError, match="does not match its sha256"):
        sharded._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
    assert sharded.pool.start(wait=True)  # up again for the tests after this one


def _kill_workers(aggregator: Aggregator) -> None:
    executor = aggregator.pool._executor
    assert executor is not None
    for process in list(executor._processes.values()):
        process.kill()
        process.join()


def test_a_worker_dead_between_rounds_is_replaced(blobs: BlobStore) -> None:
    aggregator = Aggregator(blobs, merge_processes=2)
    aggregator.pool = _started_pool()
    rows, strategy = _rows(blobs), make_strategy("fisher-norm")
    try:
        before = aggregator._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
        broken = aggregator.pool._executor
        _kill_workers(aggregator)
        # replaced at once if the death was seen before the jobs went out, else the dead
        # worker's run is folded here: the same bits either way
        after = aggregator._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
        assert all(torch.equal(after[k], before[k]) for k in GLOBAL)
        assert aggregator.pool.start(wait=True)
        assert aggregator.pool._executor not in (None, broken)  # new workers
        again = aggregator._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
        assert all(torch.equal(again[k], before[k]) for k in GLOBAL)
    finally:
        aggregator.close()


def test_a_worker_dying_mid_round_costs_its_shard_a_fold_here_not_the_round(
        blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    aggregator = Aggregator(blobs, merge_processes=2)
    aggregator.pool = _started_pool()
    rows, strategy = _rows(blobs), make_strategy("fisher-norm")
    fold = aggregator._fold

    def kill_then_fold(*args: object) -> None:  # the workers die while shard 0 is folded
        if aggregator.pool._executor is not None:
            _kill_workers(aggregator)
        fold(*args)  # type: ignore[arg-type]

    try:
        before = aggregator._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
        monkeypatch.setattr(aggregator, "_fold", kill_then_fold)
        after = aggregator._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
        assert all(torch.equal(after[k], before[k]) for k in GLOBAL), "folded as a run: same bits"
        assert aggregator.pool._executor is None  # the broken pool was dropped
        monkeypatch.setattr(aggregator, "_fold", fold)
        assert aggregator.pool.start(wait=True)  # new workers
        again = aggregator._merge(ROUND, strategy, GLOBAL, rows)  # type: ignore[arg-type]
        assert all(torch.equal(again[k], before[k]) for k in GLOBAL), "a new pool shards again"
    finally:
        aggregator.close()


def test_merge_processes_is_checked() -> None:
    with pytest.raises(ValueError, match="processes"):
        MergePool(0)


def _updates(count: int) -> list[AdapterUpdate]:
    updates = []
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        updates.append(AdapterUpdate(
            f"dev-{i}", {k: torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()},
            8 + i, {k: torch.rand(v.shape, generator=gen) for k, v in GLOBAL.items()}))
    return updates


@pytest.mark.parametrize("name", ["fedavg", "fednano", "fedprox", "fisher-norm", "fisher-raw"])
def test_shards_joined_in_order_give_the_list_merge(name: str) -> None:
    strategy, updates = make_strategy(name), _updates(9)
    merge = strategy.stream(GLOBAL, [u.n_samples for u in updates])
    assert merge is not None and merge.shardable
    for start, stop in ((0, 4), (4, 7), (7, 9)):
        shard = merge.shard(start)
        for update in updates[start:stop]:
            shard.add(update)
        merge.join(shard.sums())
    expected = strategy.aggregate(GLOBAL, updates)
    assert expected is not None
    result = merge.result()
    for key in GLOBAL:
        torch.testing.assert_close(result[key], expected[key], rtol=1e-6, atol=1e-9)


def test_a_shard_must_join_where_the_merge_stands() -> None:
    strategy, updates = make_strategy("fisher-norm"), _updates(4)
    merge = strategy.stream(GLOBAL, [u.n_samples for u in updates])
    assert merge is not None
    late = merge.shard(2)
    late.add(updates[2])
    with pytest.raises(ValueError, match="starting at update 2 cannot follow 0"):
        merge.join(late.sums())
    with pytest.raises(ValueError, match="got 1 updates, announced 4"):
        late.result()  # a shard is not a round
    merge.add(updates[0])
    merge.add(updates[1])
    merge.join(late.sums())
    with pytest.raises(ValueError, match="got 3 updates, announced 4"):
        merge.result()
    bad = merge.shard(3).sums()
    bad["sums"] = {**bad["sums"], "num": torch.zeros(3).numpy()}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="'num' must be a float64 array"):
        merge.join(bad)


def test_a_median_cannot_be_sharded() -> None:
    merge = make_strategy("fedmedian").stream(GLOBAL, [1, 2])
    assert merge is not None and not merge.shardable
    with pytest.raises(ValueError, match="cannot be sharded"):
        merge.shard(1)


def test_workers_that_cannot_start_leave_the_merge_to_this_process(
        blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud.merge_pool as merge_pool

    monkeypatch.setattr(merge_pool, "_ready", _no_start)  # a worker that fails at once
    aggregator = Aggregator(blobs, merge_processes=2)
    aggregator.pool = MergePool(2, min_per_process=10)
    rows = _rows(blobs)
    try:
        assert not aggregator.pool.start(wait=True)
        assert aggregator.pool.disabled and aggregator.pool._executor is None
        assert aggregator.pool.split(COUNT) == [range(0, COUNT)]
        merged = aggregator._merge(ROUND, make_strategy("fedavg"), GLOBAL,  # type: ignore[arg-type]
                                   rows)
        assert aggregator.pool._executor is None  # not tried again
        alone = Aggregator(blobs)._merge(ROUND, make_strategy("fedavg"),  # type: ignore[arg-type]
                                         GLOBAL, rows)
        assert all(torch.equal(merged[k], alone[k]) for k in GLOBAL)
    finally:
        aggregator.close()


def _no_start() -> None:
    raise RuntimeError("cannot start")
