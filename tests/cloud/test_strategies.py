"""Strategies: registry, hooks, and hand-computed aggregates on 2 clients × 3 elements."""

from __future__ import annotations

import pytest
import torch

from cloud.strategies import (
    STRATEGIES,
    FedAvg,
    FedMedian,
    FedProx,
    FisherGlobal,
    FisherNorm,
    FisherRaw,
    make_strategy,
)
from cloud.strategies.base import KeptUpdates, Strategy
from shared.update import AdapterUpdate


def vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


GLOBAL = vec(1.0, 2.0, 3.0)


def updates(with_fisher: bool = True) -> list[AdapterUpdate]:
    fishers = [vec(1.0, 0.0, 1.0), vec(1.0, 0.0, 3.0)] if with_fisher else [None, None]
    return [
        AdapterUpdate("a", vec(1.0, 0.0, -2.0), n_samples=1, fisher=fishers[0]),
        AdapterUpdate("b", vec(3.0, 4.0, 2.0), n_samples=3, fisher=fishers[1]),
    ]


def close(state: dict[str, torch.Tensor] | None, *expected: float) -> None:
    assert state is not None
    torch.testing.assert_close(state["w"], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_registry_names_match_classes() -> None:
    assert set(STRATEGIES) == {"fednano", "fedavg", "fedprox", "fedmedian", "fisher-raw",
                               "fisher-norm", "fisher-global"}
    for name, cls in STRATEGIES.items():
        assert cls.name == name
        assert isinstance(make_strategy(name), cls)


def test_unknown_strategy_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsgd'.*fedavg.*fednano"):
        make_strategy("fedsgd")


def test_bad_keyword_is_a_value_error_naming_the_arguments() -> None:
    with pytest.raises(ValueError, match=r"bad arguments \['mu'\].*'fedavg'.*min_updates"):
        make_strategy("fedavg", mu=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("fisher-raw", {"eps": 1e-4, "normalize": "max", "min_updates": 2}),
        ("fisher-norm", {"floor": 0.3, "fallback": 0.0, "ffa": True, "server_lr": 1.5}),
        ("fednano", {"server_momentum": 0.5}),
        ("fedprox", {"mu": 0.1}),
        ("fedavg", {}),
        ("fedmedian", {"min_updates": 3}),
    ],
)
def test_config_rebuilds_the_strategy(name: str, kwargs: dict) -> None:
    strategy = make_strategy(name, **kwargs)
    again = make_strategy(strategy.name, **strategy.config())
    assert again.config() == strategy.config()
    assert repr(strategy).startswith(f"{type(strategy).__name__}(min_updates=")


def test_fisher_raw_merges_by_the_raw_fisher() -> None:
    strategy = FisherRaw()
    assert strategy.requires_fisher
    close(strategy.aggregate(GLOBAL, updates()), 3.5, 2.0, 4.6)  # see test_merge.py


def test_fisher_norm_normalises_floors_and_falls_back() -> None:
    # F1/√2, F2/√10 floored at 0.1 x their means: element 2 (no Fisher anywhere) is
    # weighted by the floors alone, λ_k x 0.1 x mean_k: 0.25 x (2/3)/√2 vs 0.75 x (4/3)/√10.
    merged = FisherNorm().aggregate(GLOBAL, updates())
    assert merged is not None
    low1, low2 = 0.25 * (2 / 3) / 2**0.5, 0.75 * (4 / 3) / 10**0.5
    assert float(merged["w"][1]) == pytest.approx(2 + 4 * low2 / (low1 + low2), rel=1e-5)
    # Without a floor that element falls back to FedAvg's 0.75 x 4.
    no_floor = FisherNorm(floor=0.0).aggregate(GLOBAL, updates())
    assert no_floor is not None and float(no_floor["w"][1]) == pytest.approx(5.0)
    close(FisherNorm(floor=0.0, fallback=0.0, normalize=None).aggregate(GLOBAL, updates()),
          3.5, 2.0, 4.6)


@pytest.mark.parametrize("cls", [FisherRaw, FisherNorm, FisherGlobal])
def test_fisher_strategies_need_a_fisher_from_everyone(cls: type) -> None:
    batch = updates()
    batch[1].fisher = None
    with pytest.raises(ValueError, match=r"needs a Fisher.*\['b'\]"):
        cls().aggregate(GLOBAL, batch)


def test_server_momentum_adds_the_previous_step() -> None:
    # FedAvg's Δ = (2.5, 3, 1); step = 2 Δ + 0.5 (1, -1, 0)
    strategy = FedAvg(server_lr=2.0, server_momentum=0.5)
    assert strategy.uses_previous_step
    close(strategy.aggregate(GLOBAL, updates(), vec(1.0, -1.0, 0.0)), 6.5, 7.5, 5.0)
    close(strategy.aggregate(GLOBAL, updates()), 6.0, 8.0, 5.0)  # round 1: no previous step


def test_fedavg_and_fedprox_average_deltas() -> None:
    # θ_g + 0.25 (1, 0, -2) + 0.75 (3, 4, 2)
    close(FedAvg().aggregate(GLOBAL, updates(with_fisher=False)), 3.5, 5.0, 4.0)
    close(FedProx(mu=0.5).aggregate(GLOBAL, updates()), 3.5, 5.0, 4.0)


def test_fedmedian_ignores_an_outlier() -> None:
    batch = [*updates(), AdapterUpdate("evil", vec(1e6, -1e6, 1e6), n_samples=10_000)]
    close(FedMedian().aggregate(GLOBAL, batch), 4.0, 2.0, 5.0)


def test_client_hparams() -> None:
    assert FedProx(mu=0.25).client_hparams() == {"prox_mu": 0.25, "train_a": True}
    assert FedAvg().client_hparams() == {"prox_mu": 0.0, "train_a": True}
    assert FisherNorm(ffa=True).client_hparams() == {"prox_mu": 0.0, "train_a": False}
    assert FisherGlobal().client_hparams() == {"prox_mu": 0.0, "train_a": True,
                                               "fisher_point": "global",
                                               "fisher_labels": "sampled"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_returns_none_below_min_updates(name: str) -> None:
    assert make_strategy(name).aggregate(GLOBAL, []) is None
    assert make_strategy(name, min_updates=3).aggregate(GLOBAL, updates()) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_rejects_mismatched_updates(name: str) -> None:
    bad = AdapterUpdate("c", {"w": torch.zeros(4)}, n_samples=1, fisher={"w": torch.ones(4)})
    with pytest.raises(ValueError, match="shape"):
        make_strategy(name).aggregate(GLOBAL, [*updates(), bad])


def test_strategies_hold_no_state_between_rounds() -> None:
    strategy = FisherNorm()
    first = strategy.aggregate(GLOBAL, updates())
    second = strategy.aggregate(GLOBAL, updates())
    assert first is not None and second is not None
    torch.testing.assert_close(first["w"], second["w"])
    close(GLOBAL, 1.0, 2.0, 3.0)  # the global state was not modified in place


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fedprox", {"mu": -0.1}, "mu must be"),
        ("fedprox", {"mu": float("nan")}, "mu must be"),
        ("fisher-raw", {"eps": -1.0}, "eps must be"),
        ("fisher-norm", {"normalize": "l1"}, "normalize must be"),
        ("fisher-norm", {"floor": -0.5}, "floor must be"),
        ("fedavg", {"server_momentum": 1.0}, "server_momentum must be"),
        ("fedavg", {"server_lr": 0.0}, "server_lr must be"),
        ("fedavg", {"ffa": "yes"}, "ffa must be"),
        ("fedavg", {"min_updates": 0}, "min_updates must be"),
    ],
)
def test_constructor_validation(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_strategy(name, **kwargs)


def test_strategy_is_abstract() -> None:
    with pytest.raises(TypeError):
        Strategy()  # type: ignore[abstract]


def test_fednano_is_fedavg_unless_told_to_fisher_merge_long_rounds() -> None:
    plain = make_strategy("fednano")
    assert plain.for_round(10_000) is plain and not plain.requires_fisher
    updates = [AdapterUpdate("a", {"w": torch.ones(2)}, 1, None),
               AdapterUpdate("b", {"w": torch.zeros(2)}, 3, None)]
    merged = plain.aggregate({"w": torch.zeros(2)}, updates)
    assert merged is not None and torch.allclose(merged["w"], torch.full((2,), 0.25))
    strategy = make_strategy("fednano", fisher_from_steps=50, server_momentum=0.5, min_updates=2)
    long, short = strategy.for_round(50), strategy.for_round(49)
    assert short is strategy and not short.requires_fisher
    assert isinstance(long, FisherNorm) and long.requires_fisher
    assert long.config() == {**FisherNorm(min_updates=2, server_momentum=0.5).config()}
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="fisher_from_steps must be an integer >= 1"):
            make_strategy("fednano", fisher_from_steps=bad)


def test_a_round_asks_devices_for_a_fisher_only_when_its_merge_uses_one() -> None:
    from cloud.rounds import RoundConfig
    from shared.messages import TaskHParams

    options = {"fisher_from_steps": 100}
    short = RoundConfig(strategy="fednano", strategy_options=options,
                        hparams=TaskHParams(steps=8, fisher_samples=32))
    long = RoundConfig(strategy="fednano", strategy_options=options,
                       hparams=TaskHParams(steps=100, fisher_samples=32))
    assert short.task_hparams().fisher_samples == 0 and short.make_strategy().name == "fednano"
    assert long.task_hparams().fisher_samples == 32 and long.make_strategy().name == "fisher-norm"
    assert RoundConfig().task_hparams().fisher_samples == 0  # the default asks for no Fisher


def _random_round(count: int, seed: int = 0) -> tuple[dict[str, torch.Tensor],
                                                      list[AdapterUpdate],
                                                      dict[str, torch.Tensor]]:
    """A global state of several keys, ``count`` updates with Fishers as decoded (float32 of
    bf16 values) and random sample counts, and a previous step."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (8, 5), "b": (5, 8), "c": (3,)}
    glob = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    batch = [AdapterUpdate(f"dev-{i}", {k: 0.01 * torch.randn(s, generator=gen)
                                        for k, s in shapes.items()},
                           n_samples=int(torch.randint(1, 500, (1,), generator=gen)),
                           fisher={k: (torch.rand(s, generator=gen) ** 4).bfloat16().float()
                                   for k, s in shapes.items()})
             for i in range(count)]
    previous = {k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    return glob, batch, previous


STREAMED = [
    ("fednano", {}), ("fednano", {"fisher_from_steps": 1}), ("fedavg", {}),
    ("fedprox", {"mu": 0.1}), ("fedmedian", {}), ("fisher-raw", {}),
    ("fisher-raw", {"normalize": "max", "eps": 1e-4}), ("fisher-norm", {}),
    ("fisher-norm", {"normalize": "mean", "floor": 0.3, "fallback": 0.1}), ("fisher-global", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), STREAMED)
@pytest.mark.parametrize("server", [{}, {"server_lr": 1.5, "server_momentum": 0.5}])
@pytest.mark.parametrize("count", [1, 2, 17])
def test_streaming_gives_the_bits_of_the_list_merge(name: str, kwargs: dict, server: dict,
                                                    count: int) -> None:
    strategy = make_strategy(name, **kwargs, **server).for_round(1)
    glob, batch, previous = _random_round(count, seed=count)
    step = previous if server else None
    expected = strategy.aggregate(glob, batch, step)
    merge = strategy.stream(glob, [u.n_samples for u in batch], step)
    assert expected is not None and merge is not None
    for update in batch:
        merge.add(update)
    got = merge.result()
    assert all(torch.equal(got[key], expected[key]) for key in glob)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_but_the_median_streams_in_flat_memory(name: str) -> None:
    strategy = make_strategy(name)
    assert strategy.memory_flat is (name != "fedmedian")
    kept = isinstance(strategy.delta_merge(GLOBAL, [1, 3]), KeptUpdates)
    assert kept is not strategy.memory_flat
    assert make_strategy(name).stream(GLOBAL, []) is None
    assert make_strategy(name, min_updates=3).stream(GLOBAL, [1, 3]) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_streaming_refuses_what_the_list_merge_refuses_and_what_was_not_announced(
        name: str) -> None:
    def streamed(*batch: AdapterUpdate, announced: list[int] | None = None) -> None:
        merge = make_strategy(name).stream(GLOBAL, announced or [u.n_samples for u in batch])
        assert merge is not None
        for update in batch:
            merge.add(update)
        merge.result()

    good = updates()
    bad = AdapterUpdate("c", {"w": torch.zeros(4)}, n_samples=1, fisher={"w": torch.ones(4)})
    with pytest.raises(ValueError, match="shape"):
        streamed(*good, bad)
    with pytest.raises(ValueError, match=r"'b' has 3 samples, announced 2"):
        streamed(*good, announced=[1, 2])
    with pytest.raises(ValueError, match=r"'b' is one more than the 1 announced"):
        streamed(*good, announced=[1])
    with pytest.raises(ValueError, match="got 2 updates, announced 3"):
        streamed(*good, announced=[1, 3, 5])


@pytest.mark.parametrize("cls", [FisherRaw, FisherNorm, FisherGlobal])
def test_a_streamed_fisher_merge_needs_a_fisher_from_everyone(cls: type) -> None:
    batch = updates()
    batch[1].fisher = None
    merge = cls().stream(GLOBAL, [1, 3])
    merge.add(batch[0])
    with pytest.raises(ValueError, match=r"needs a Fisher.*\['b'\]"):
        merge.add(batch[1])
