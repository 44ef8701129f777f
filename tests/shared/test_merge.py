"""Hand-computed checks of the merge maths (2 clients, 3 elements) and their properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.adapters import ADAPTER_KEYS
from shared.merge import (
    DeltaAccumulator,
    FisherAccumulator,
    apply_delta,
    clip_delta,
    clip_to_median_norm,
    coordinate_median,
    fisher_weighted_merge,
    l2_norm,
    median_norm_bound,
    normalized_weights,
    sample_weights,
    server_step,
    weighted_average,
)


def vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


GLOBAL = vec(1.0, 2.0, 3.0)
DELTAS = [vec(1.0, 0.0, -2.0), vec(3.0, 4.0, 2.0)]
FISHERS = [vec(1.0, 0.0, 1.0), vec(1.0, 0.0, 3.0)]
LAMBDA = [0.25, 0.75]  # n = (1, 3)


def close(state: dict[str, torch.Tensor], *expected: float) -> None:
    torch.testing.assert_close(state["w"], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_sample_weights_are_count_fractions() -> None:
    assert sample_weights([1, 3]) == [0.25, 0.75]
    assert sample_weights([7]) == [1.0]


@pytest.mark.parametrize("bad", [[], [0, 1], [-1, 2], [1.5, 2], [True, 2]])
def test_sample_weights_reject_bad_counts(bad: list) -> None:
    with pytest.raises(ValueError, match=r"n_samples|positive integers"):
        sample_weights(bad)


def test_weighted_average_by_hand() -> None:
    # 0.25 * (1, 0, -2) + 0.75 * (3, 4, 2)
    close(weighted_average(DELTAS, LAMBDA), 2.5, 3.0, 1.0)
    close(weighted_average(DELTAS, [1.0, 3.0]), 2.5, 3.0, 1.0)  # weights are normalised


def test_fisher_merge_by_hand() -> None:
    # Σ λF = (1, 0, 2.5); Σ λFΔ = (2.5, 0, 4.0); step = (2.5, 0 [no Fisher: keep global], 1.6)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=0.0)
    close(merged, 3.5, 2.0, 4.6)
    close(fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA), 3.5, 2.0, 4.6)  # default eps


def test_fisher_merge_eps_is_relative_to_the_mean_fisher() -> None:
    # eps=1: eps_abs = mean(1, 0, 2.5) = 7/6 -> steps 2.5/(13/6), 0, 4/(22/6)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=1.0)
    close(merged, 1 + 15 / 13, 2.0, 3 + 12 / 11)


def test_fisher_merge_mean_normalisation_by_hand() -> None:
    # F1 / (2/3) = (1.5, 0, 1.5); F2 / (4/3) = (0.75, 0, 2.25)
    # Σ λF = (0.9375, 0, 2.0625); Σ λFΔ = (2.0625, 0, 2.625)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=0.0, normalize="mean")
    close(merged, 1 + 2.2, 2.0, 3 + 14 / 11)


def test_fisher_merge_max_normalisation_by_hand() -> None:
    # F1 / 1 = (1, 0, 1); F2 / 3 = (1/3, 0, 1): Σ λF = (0.5, 0, 1); Σ λFΔ = (1, 0, 1)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=0.0, normalize="max")
    close(merged, 3.0, 2.0, 4.0)


def test_zero_fisher_keeps_the_global_value() -> None:
    zero = [vec(0.0, 0.0, 0.0), vec(0.0, 0.0, 0.0)]
    big = [vec(50.0, -80.0, 9.0), vec(-70.0, 60.0, 4.0)]
    close(fisher_weighted_merge(GLOBAL, big, zero, LAMBDA), 1.0, 2.0, 3.0)
    # where the parameter-space formula Σ λFθ / (Σ λF + ε) would have returned ~0 for all three


def test_equal_fishers_reduce_to_weighted_average() -> None:
    fisher = vec(0.3, 2e-9, 7.0)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, [fisher, fisher], LAMBDA, eps=0.0)
    expected = apply_delta(GLOBAL, weighted_average(DELTAS, LAMBDA))
    torch.testing.assert_close(merged["w"], expected["w"])


def test_client_with_all_the_fisher_mass_dominates() -> None:
    fishers = [vec(1e6, 1e6, 1e6), vec(1e-6, 1e-6, 1e-6)]
    close(fisher_weighted_merge(GLOBAL, DELTAS, fishers, LAMBDA), 2.0, 2.0, 1.0)  # θ_g + Δ_1


@pytest.mark.parametrize("scale", [1e-10, 1e-4, 1e3])
def test_merge_is_invariant_to_the_fisher_scale(scale: float) -> None:
    scaled = [{"w": f["w"] * scale} for f in FISHERS]
    close(fisher_weighted_merge(GLOBAL, DELTAS, scaled, LAMBDA), 3.5, 2.0, 4.6)


def test_merge_keeps_dtype_and_does_not_mutate_inputs() -> None:
    before = [d["w"].clone() for d in DELTAS]
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA)
    assert merged["w"].dtype == torch.float32
    assert merged["w"] is not GLOBAL["w"]
    assert all(torch.equal(b, d["w"]) for b, d in zip(before, DELTAS, strict=True))
    close(GLOBAL, 1.0, 2.0, 3.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("laid_out", [True, False])
def test_scaling_a_fisher_in_place_leaves_the_callers_fisher_alone(dtype: torch.dtype,
                                                                   laid_out: bool) -> None:
    # the accumulator normalises and floors its own copy in place: a float64 Fisher (whose
    # .double() is itself) and the decoder's flat vector (whose views the caller holds) too
    flat = torch.tensor([4.0, 0.0, 1.0, 2.0, 0.5, 3.0], dtype=dtype)
    fisher = ({"a": flat[:2].view(1, 2), "b": flat[2:].view(2, 2)} if laid_out
              else {"a": flat[:2].view(1, 2).clone(), "b": flat[2:].view(2, 2).clone()})
    reference = {"a": torch.zeros(1, 2), "b": torch.zeros(2, 2)}
    delta = {"a": torch.ones(1, 2), "b": torch.ones(2, 2)}
    kept = {k: v.clone() for k, v in fisher.items()}
    for normalize in (None, "mean", "l2", "max"):
        merger = FisherAccumulator(reference, normalize=normalize, floor=0.5)
        merger.add(delta, fisher, 1.0)
        assert all(torch.equal(fisher[k], kept[k]) for k in kept), normalize
    assert merger.mass["a"][0, 1] > 0  # the floor lifted the zero, in the accumulator only


@pytest.mark.parametrize("normalize", ["mean", "l2", "max"])
def test_an_update_folds_to_the_same_bits_at_any_thread_count(normalize: str) -> None:
    # a merge worker folds with one thread and the coordinator with several: an update must
    # add the same float64 values in both (BLAS's dot product, for one, would not: its last
    # bits change with the number of threads past torch's 32K-element grain)
    gen = torch.Generator().manual_seed(4)
    shapes = {"a": (8, 576), "b": (300, 200)}  # 64,608 values
    ref = {k: torch.zeros(s) for k, s in shapes.items()}
    updates = [({k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()},
                {k: torch.rand(s, generator=gen) ** 4 for k, s in shapes.items()})
               for _ in range(5)]
    sums = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            merger = FisherAccumulator(ref, normalize=normalize, floor=0.1)
            for delta, fisher in updates:
                merger.add(delta, fisher, 0.2)
            sums.append(merger.sums())
    finally:
        torch.set_num_threads(threads)
    for key in ("num", "mass", "plain"):
        assert sums[0][key].tobytes() == sums[1][key].tobytes(), key


def test_merge_over_the_protocol_keys() -> None:
    gen = torch.Generator().manual_seed(0)
    glob = {k: torch.randn(2, 3, generator=gen) for k in ADAPTER_KEYS}
    deltas = [{k: torch.randn(2, 3, generator=gen) for k in ADAPTER_KEYS} for _ in range(3)]
    ones = [{k: torch.ones(2, 3) for k in ADAPTER_KEYS}] * 3
    merged = fisher_weighted_merge(glob, deltas, ones, sample_weights([1, 2, 3]))
    expected = apply_delta(glob, weighted_average(deltas, [1, 2, 3]))
    for key in ADAPTER_KEYS:
        torch.testing.assert_close(merged[key], expected[key])


def test_coordinate_median() -> None:
    deltas = [vec(1.0, 5.0, -1.0), vec(5.0, 100.0, -3.0), vec(3.0, 4.0, 1e9)]
    close(coordinate_median(deltas), 3.0, 5.0, -1.0)
    close(coordinate_median(deltas[:2]), 3.0, 52.5, -2.0)  # even count: mean of the middle two


def test_clip_to_median_norm() -> None:
    # norms 5, 10, 1000: the median is 10, so with factor 2 the bound is 20
    deltas = [vec(3.0, 4.0), vec(6.0, 8.0), vec(600.0, 800.0)]
    clipped = clip_to_median_norm(deltas, 2.0)
    assert clipped[0] is deltas[0] and clipped[1] is deltas[1]  # within the bound: untouched
    close(clipped[2], 12.0, 16.0)  # scaled to norm 20, same direction
    close(deltas[2], 600.0, 800.0)  # inputs are never modified
    with pytest.raises(ValueError, match="factor must be positive, got 0"):
        clip_to_median_norm(deltas, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"deltas": []}, r"got 0 deltas|empty"),
        ({"weights": [1.0]}, "2 updates but 1 weights"),
        ({"weights": [1.0, -1.0]}, "weights must be finite"),
        ({"weights": [0.0, 0.0]}, "weights must be finite"),
        ({"weights": [float("nan"), 1.0]}, "weights must be finite"),
        ({"fishers": [FISHERS[0]]}, "2 deltas but 1 fishers"),
        ({"fishers": [vec(1.0, -1.0, 1.0), FISHERS[1]]}, "must be >= 0"),
        ({"fishers": [vec(1.0, float("inf"), 1.0), FISHERS[1]]}, "NaN or Inf"),
        ({"deltas": [vec(1.0, float("nan"), 1.0), DELTAS[1]]}, "NaN or Inf"),
        ({"deltas": [vec(1.0, 2.0), DELTAS[1]]}, "expected shape"),
        ({"deltas": [{"v": torch.zeros(3)}, DELTAS[1]]}, "keys mismatch"),
        ({"deltas": [{"w": torch.zeros(3, dtype=torch.int64)}, DELTAS[1]]}, "floating-point"),
        ({"eps": -1.0}, "eps must be"),
        ({"normalize": "sum"}, "normalize must be"),
    ],
)
def test_fisher_merge_rejects_bad_inputs(kwargs: dict, message: str) -> None:
    args = {"global_state": GLOBAL, "deltas": DELTAS, "fishers": FISHERS, "weights": LAMBDA}
    with pytest.raises(ValueError, match=message):
        fisher_weighted_merge(**{**args, **kwargs})


def test_weighted_average_rejects_empty_and_mismatched() -> None:
    with pytest.raises(ValueError, match="empty"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="keys mismatch"):
        weighted_average([vec(1.0), {"x": torch.zeros(1)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        coordinate_median([])


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
fisher_value = st.floats(0.0, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    deltas=st.lists(st.lists(finite, min_size=4, max_size=4), min_size=1, max_size=5),
    data=st.data(),
)
def test_merged_step_is_a_shrunk_convex_combination(deltas: list, data: st.DataObject) -> None:
    count = len(deltas)
    fishers = data.draw(
        st.lists(st.lists(fisher_value, min_size=4, max_size=4), min_size=count, max_size=count)
    )
    counts = data.draw(st.lists(st.integers(1, 100), min_size=count, max_size=count))
    zero = {"w": torch.zeros(4)}
    merged = fisher_weighted_merge(
        zero,
        [{"w": torch.tensor(d)} for d in deltas],
        [{"w": torch.tensor(f)} for f in fishers],
        sample_weights(counts),
        normalize=data.draw(st.sampled_from([None, "mean", "max"])),
    )["w"]
    stacked = torch.tensor(deltas)  # (K, 4)
    low = torch.minimum(stacked.min(dim=0).values, torch.zeros(4))
    high = torch.maximum(stacked.max(dim=0).values, torch.zeros(4))
    assert bool(torch.isfinite(merged).all())
    assert bool((merged >= low - 1e-3).all()) and bool((merged <= high + 1e-3).all())


def test_fisher_merge_l2_normalisation_by_hand() -> None:
    # |F1| = sqrt(2), |F2| = sqrt(10): F1' = (1, 0, 1)/sqrt2, F2' = (1, 0, 3)/sqrt10
    a, b = 0.25 / 2**0.5, 0.75 / 10**0.5
    first = (a * 1 + b * 3) / (a + b)  # Δ_1 = 1, Δ_2 = 3
    third = (a * -2 + b * 3 * 2) / (a + b * 3)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=0.0, normalize="l2")
    close(merged, 1 + first, 2.0, 3 + third)


def test_floor_lifts_each_clients_fisher_to_a_share_of_its_mean() -> None:
    # floor 0.5: F1 mean 2/3 -> min 1/3: (1, 1/3, 1); F2 mean 4/3 -> min 2/3: (1, 2/3, 3)
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=0.0, floor=0.5)
    second = (0.75 * (2 / 3) * 4) / (0.25 / 3 + 0.75 * 2 / 3)
    close(merged, 3.5, 2 + second, 4.6)


def test_fallback_merges_by_fedavg_where_no_client_has_fisher() -> None:
    # Element 2 has Σ λF = 0 < fallback * mean: FedAvg's 0.25*0 + 0.75*4 = 3 instead of 0.
    merged = fisher_weighted_merge(GLOBAL, DELTAS, FISHERS, LAMBDA, eps=0.0, fallback=1e-3)
    close(merged, 3.5, 5.0, 4.6)


def test_streaming_accumulator_equals_the_batch_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 3), "b": (3, 4)}
    ref = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    deltas = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(7)]
    fishers = [{k: torch.rand(s, generator=gen) ** 3 for k, s in shapes.items()}
               for _ in range(7)]
    weights = [float(w) for w in torch.rand(7, generator=gen) + 0.1]
    merger = FisherAccumulator(ref, normalize="l2", floor=0.2)
    for d, f, w in zip(deltas, fishers, weights, strict=True):
        merger.add(d, f, w * 10)  # unnormalised weights: only ratios matter
    streamed = apply_delta(ref, merger.merged_delta(eps=1e-6, fallback=1e-3))
    batch = fisher_weighted_merge(ref, deltas, fishers, weights, eps=1e-6, normalize="l2",
                                  floor=0.2, fallback=1e-3)
    for key in ref:
        torch.testing.assert_close(streamed[key], batch[key])


def _per_key_merge(ref: dict, deltas: list, fishers: list, weights: list, normalize: str | None,
                   floor: float, eps: float) -> dict:
    """The accumulator's maths written out key by key (how it was computed before the flat
    buffers): the flat version must give exactly these bits."""
    def mean(state: dict) -> float:
        return sum(float(t.sum()) for t in state.values()) / sum(t.numel() for t in state.values())

    num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in ref.items()}
    mass = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in ref.items()}
    for delta, fisher, weight in zip(deltas, fishers, weights, strict=True):
        f = {k: v.double() for k, v in fisher.items()}
        scale = {None: 0.0, "mean": mean(f),
                 "l2": sum(float(v.square().sum()) for v in f.values()) ** 0.5,
                 "max": max(float(v.max()) for v in f.values())}[normalize]
        f = f if scale == 0.0 else {k: v / scale for k, v in f.items()}
        if floor:
            low = floor * mean(f)
            f = {k: v.clamp(min=low) for k, v in f.items()}
        for key in ref:
            num[key].addcmul_(f[key], delta[key].double(), value=weight)
            mass[key].add_(f[key], alpha=weight)
    eps_abs = eps * mean(mass)
    return {k: (num[k] / (mass[k] + eps_abs)).to(ref[k].dtype) for k in ref}


@pytest.mark.parametrize("normalize", [None, "mean", "l2", "max"])
@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_flat_accumulator_gives_the_per_key_float32_results(normalize: str | None,
                                                            floor: float) -> None:
    # float32 outputs (the service's) match the per-key maths bit for bit; the float64 sums
    # may differ in their last bits (one flat sum per update instead of per-key sums)
    gen = torch.Generator().manual_seed(1)
    shapes = {"a": (8, 5), "b": (5, 8), "c": (3,)}
    ref = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    deltas = [{k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
              for _ in range(9)]
    fishers = [{k: (torch.rand(s, generator=gen) ** 4).to(torch.bfloat16)  # as decoded
                for k, s in shapes.items()} for _ in range(9)]
    weights = [float(w) for w in torch.rand(9, generator=gen)]
    merger = FisherAccumulator(ref, normalize=normalize, floor=floor)
    for d, f, w in zip(deltas, fishers, weights, strict=True):
        merger.add(d, f, w)
    got = merger.merged_delta(eps=1e-6)
    expected = _per_key_merge(ref, deltas, fishers, weights, normalize, floor, eps=1e-6)
    assert all(torch.equal(got[k], expected[k]) for k in ref)


def test_accumulator_checks_each_update_as_the_per_key_checks_did() -> None:
    merger = FisherAccumulator({"a": torch.zeros(2), "b": torch.zeros(3)})
    good = {"a": torch.ones(2), "b": torch.ones(3)}
    cases = [({"a": torch.ones(2)}, "keys mismatch"),
             ({**good, "b": torch.ones(4)}, "expected shape"),
             ({**good, "b": torch.tensor([1.0, float("inf"), -float("inf")])}, "NaN or Inf"),
             ({**good, "a": torch.tensor([float("nan"), 1.0])}, "NaN or Inf"),
             ({**good, "a": torch.ones(2, dtype=torch.int64)}, "floating-point")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            merger.add(bad, good, 1.0)
        with pytest.raises(ValueError, match=message):
            merger.add(good, bad, 1.0)
    with pytest.raises(ValueError, match=r"'b'.*>= 0"):
        merger.add(good, {**good, "b": torch.tensor([0.0, -0.5, 1.0])}, 1.0)
    huge = {"a": torch.full((2,), 1e308, dtype=torch.float64), "b": torch.ones(3)}
    merger.add(huge, good, 1e-300)  # a sum that overflows is still finite input
    assert merger.count == 1 and merger.plain["a"].shape == (2,)


def test_accumulator_refuses_bad_input_naming_the_client() -> None:
    merger = FisherAccumulator(GLOBAL)
    with pytest.raises(ValueError, match=r"dev-7 fisher.*>= 0"):
        merger.add(DELTAS[0], vec(1.0, -1.0, 0.0), 1.0, name="dev-7")
    with pytest.raises(ValueError, match="weight"):
        merger.add(DELTAS[0], FISHERS[0], float("nan"))
    with pytest.raises(ValueError, match="at least one"):
        merger.merged_delta()


def test_server_step_is_heavy_ball_momentum_in_steps() -> None:
    step = vec(1.0, -2.0, 0.5)
    previous = vec(2.0, 2.0, -4.0)
    close(server_step(step, None, lr=1.0, momentum=0.9), 1.0, -2.0, 0.5)  # first round
    close(server_step(step, previous, lr=2.0, momentum=0.5), 3.0, -3.0, -1.0)
    assert server_step(step, previous) is step  # lr 1, no momentum: nothing to do
    with pytest.raises(ValueError, match="momentum"):
        server_step(step, previous, momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        server_step(step, previous, lr=0.0)


def test_delta_accumulator_gives_the_bits_of_weighted_average() -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = {"a": (8, 5), "b": (5, 8), "c": (3,)}
    ref = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    deltas = [{k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
              for _ in range(11)]
    weights = sample_weights([int(n) for n in torch.randint(1, 500, (11,), generator=gen)])
    total = DeltaAccumulator(ref)
    for delta, weight in zip(deltas, normalized_weights(weights, 11).tolist(), strict=True):
        total.add(delta, weight)
    expected = weighted_average(deltas, weights)
    got = total.merged_delta()
    assert all(torch.equal(got[k], expected[k]) for k in ref)
    with pytest.raises(ValueError, match="NaN or Inf"):
        total.add({**deltas[0], "c": torch.tensor([0.0, float("nan"), 0.0])}, 0.5)
    with pytest.raises(ValueError, match="weight must be finite"):
        total.add(deltas[0], -1.0)
    with pytest.raises(ValueError, match="at least one"):
        DeltaAccumulator(ref).merged_delta()


def test_clipping_one_delta_at_a_time_is_clip_to_median_norm() -> None:
    deltas = [vec(3.0, 4.0), vec(6.0, 8.0), vec(600.0, 800.0)]
    norms = [l2_norm(d) for d in deltas]
    assert norms == [5.0, 10.0, 1000.0]
    bound = median_norm_bound(norms, 2.0)
    assert bound == 20.0
    for one, listed, norm in zip(deltas, clip_to_median_norm(deltas, 2.0), norms, strict=True):
        assert torch.equal(clip_delta(one, norm, bound)["w"], listed["w"])
    with pytest.raises(ValueError, match="factor must be positive"):
        median_norm_bound(norms, 0.0)


def test_a_decoded_state_is_folded_from_its_own_flat_vector_with_the_same_bits() -> None:
    from shared import codec
    from shared.merge import FisherAccumulator, _FlatLayout

    reference = {"a": torch.zeros(8, 24), "b": torch.zeros(24, 8), "c": torch.zeros(5)}
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    gen = torch.Generator().manual_seed(3)
    states = []
    for _ in range(4):
        delta = {k: torch.randn(v.shape, generator=gen) for k, v in reference.items()}
        fisher = {k: torch.rand(v.shape, generator=gen) ** 3 for k, v in reference.items()}
        states.append((codec.decode(codec.encode(delta, codec.Scheme(kind="int8", zstd=True)),
                                     expected=shapes),
                       codec.decode(codec.encode(fisher, codec.Scheme(kind="bf16")),
                                    expected=shapes)))
    layout = _FlatLayout(reference)
    assert layout._laid_out(states[0][0]) is not None  # the decoder's views of one vector
    copied = {k: v.clone() for k, v in states[0][0].items()}
    assert layout._laid_out(copied) is None  # separate tensors: concatenated instead
    reordered = dict(reversed(list(states[0][0].items())))
    assert _FlatLayout(reordered)._laid_out(reordered) is None  # another key order
    fast, slow = (FisherAccumulator(reference, normalize="l2", floor=0.1) for _ in range(2))
    for index, (delta, fisher) in enumerate(states):
        fast.add(delta, fisher, 0.1 + index)
        slow.add({k: v.clone() for k, v in delta.items()},
                 {k: v.clone() for k, v in fisher.items()}, 0.1 + index)
    for key in reference:
        assert torch.equal(fast.merged_delta()[key], slow.merged_delta()[key])
    bad = dict(states[0][0])
    bad["a"] = bad["a"].clone()
    bad["a"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fast.add(bad, states[0][1], 1.0)
