"""Command-line choices taken from the project's registries without importing them.

``--strategy`` accepts every strategy registered in ``cloud.strategies.STRATEGIES``. Importing
that registry loads torch (seconds), and the option's help text is built when the CLI is, so
the help lists the names read from the strategy modules' sources (each class declares
``name: ClassVar[str] = "..."``; a test checks the list equals the registry), and a value is
checked against the registry itself only when a command parses it. The simulation's baselines
are read from ``fednano/simulate.py`` the same way.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

_NAME = re.compile(r'^\s+name:\s*ClassVar\[str\]\s*=\s*"([A-Za-z0-9_.-]+)"', re.MULTILINE)


def strategy_names() -> list[str]:
    """The strategies' names as their modules declare them (no import of the modules)."""
    spec = importlib.util.find_spec("cloud.strategies")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations)))
    return [name for path in sorted(folder.glob("*.py"))
            for name in _NAME.findall(path.read_text(encoding="utf-8"))]


def simulation_baselines() -> list[str]:
    """``fednano.simulate.BASELINES`` (local, centralized, ...), read from its source."""
    spec = importlib.util.find_spec("fednano.simulate")
    if spec is None or spec.origin is None:
        return []
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "BASELINES"
                for target in node.targets):
            return [str(name) for name in ast.literal_eval(node.value)]
    return []


def strategy_help(extra: Sequence[str] = ()) -> str:
    return "one of " + ", ".join([*strategy_names(), *extra])


def strategy_parser(extra: Sequence[str] = ()) -> Callable[[str], str]:
    """A ``parser=`` for typer: the name if registered (or in ``extra``), else a clear error."""

    def parse(value: str) -> str:
        from cloud.strategies import STRATEGIES

        known = [*STRATEGIES, *extra]
        if value not in known:
            raise ValueError(f"unknown strategy {value!r}; choose one of {', '.join(known)}")
        return value

    return parse
