"""edge.local_data: a simulated device's deterministic shard."""

from __future__ import annotations

import math

import pytest

from edge.local_data import DataSpec, shard
from shared.data.base import VQASample, VQATask


def _task(n: int = 400) -> VQATask:
    answers = ["red", "blue", "green", "yes", "no"]
    train = [VQASample(f"img/{i // 2}", f"q{i % 7}?", answers[i % 5], f"t{i % 3}")
             for i in range(n)]
    return VQATask("toy", answers, train, [], lambda key: None)  # type: ignore[arg-type,return-value]


def test_parse_compact_spec() -> None:
    spec = DataSpec.parse("easyvqa:index=3,of=10,alpha=0.1,seed=2,by=image-class,max_samples=64")
    assert spec == DataSpec(dataset="easyvqa", index=3, of=10, alpha=0.1, seed=2,
                            by="image-class", max_samples=64)
    assert DataSpec.parse("easyvqa:index=0,of=2,alpha=inf").alpha == math.inf


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("easyvqa:index=3", "of"),
        ("easyvqa:index=3,of=3", "index must be below"),
        ("mnist:index=0,of=2", "dataset"),
        ("easyvqa:index=0,of=2,alpah=1", "alpah"),
        ("easyvqa:index=0,of=2,alpha", "key=value"),
    ],
)
def test_bad_specs_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataSpec.parse(text)


def test_shards_are_deterministic_and_disjoint() -> None:
    task = _task()
    specs = [DataSpec(index=i, of=4, alpha=0.5, min_samples=10) for i in range(4)]
    shards = [shard(task, s) for s in specs]
    assert shards == [shard(_task(), s) for s in specs]  # every process computes the same
    keys = [(s.image_key, s.question, s.answer) for part in shards for s in part]
    assert len(keys) == len(set(keys)) == 400


def test_max_samples_subsamples_the_shard() -> None:
    task = _task()
    full = shard(task, DataSpec(index=1, of=2, min_samples=10))
    small = shard(task, DataSpec(index=1, of=2, min_samples=10, max_samples=20))
    assert len(small) == 20 and all(s in full for s in small)
    assert small == shard(task, DataSpec(index=1, of=2, min_samples=10, max_samples=20))
