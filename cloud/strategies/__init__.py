"""Aggregation strategies, one class per module, looked up by name through ``STRATEGIES``."""

from __future__ import annotations

import inspect

from cloud.strategies.base import Strategy
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fedmedian import FedMedian
from cloud.strategies.fednano import FedNano
from cloud.strategies.fedprox import FedProx
from cloud.strategies.fisher import FisherMerge
from cloud.strategies.fisher_global import FisherGlobal
from cloud.strategies.fisher_norm import FisherNorm
from cloud.strategies.fisher_raw import FisherRaw

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedNano, FedAvg, FedProx, FedMedian, FisherRaw, FisherNorm, FisherGlobal)
}
DEFAULT_STRATEGY = FedNano.name


def strategy_arguments(cls: type[Strategy]) -> list[str]:
    """The keyword arguments ``cls`` accepts, its own and every base class's."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        for param in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in names:
                names.append(param.name)
    return names


def make_strategy(name: str, **kwargs: object) -> Strategy:
    """Build the strategy registered as ``name`` with its keyword arguments.

    ``ValueError`` lists the known names for an unknown one, and the accepted arguments for a
    wrong keyword.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    accepted = strategy_arguments(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"bad arguments {unknown} for strategy {name!r}; it accepts {accepted}")
    return cls(**kwargs)  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "FedAvg",
    "FedMedian",
    "FedNano",
    "FedProx",
    "FisherGlobal",
    "FisherMerge",
    "FisherNorm",
    "FisherRaw",
    "Strategy",
    "make_strategy",
    "strategy_arguments",
]
