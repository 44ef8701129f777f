"""Side-by-side tables from simulation reports: mean and spread over seeds per setting.

``python -m fednano.compare RUN_DIR...`` (or ``fednano compare``) reads each ``report.json`` and
prints one markdown row per (strategy, clients, alpha, partition), seeds pooled.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SETTING = ("strategy", "fisher_normalize", "clients", "alpha", "partition", "rounds")


def load_reports(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every ``report.json`` in the given folders (searched recursively) or files."""
    reports = []
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("report.json"))
        if not files:
            raise ValueError(f"no report.json under {path}")
        reports += [json.loads(f.read_text()) for f in files]
    return reports


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def comparison_rows(reports: list[dict[str, Any]]) -> list[dict[str, str]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in reports:
        key = (*(r["config"].get(k) for k in SETTING), _steps(r["config"]))
        groups[key].append(r)
    rows = []
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        last = [r["rounds"][-1] for r in runs if r["rounds"]]
        rows.append({
            **{k: str(v) for k, v in zip((*SETTING, "steps"), key, strict=True)
               if k not in ("strategy", "fisher_normalize")},
            "seeds": ",".join(str(r["config"]["seed"]) for r in runs),
            "method": method_label(runs[0]["config"]),
            "accuracy": _mean_spread([r["final"]["accuracy"] for r in runs]),
            "zero-shot": _mean_spread([r["zero_shot"]["accuracy"] for r in runs]),
            "n eval": str(runs[0]["final"]["n"]),
            "params up/dev/round": _kib(last[0]["param_bytes_up"]) if last else "0 (local)",
            "activations up/dev/round": _kib(last[0]["activation_bytes_up"]) if last else "",
        })
    return rows


def comparison_markdown(reports: list[dict[str, Any]]) -> str:
    rows = comparison_rows(reports)
    if not rows:
        raise ValueError("no reports to compare")
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def method_label(config: dict[str, Any]) -> str:
    """The strategy, with the FedNano Fisher normalisation and the upload codec when used."""
    norm, codec = config.get("fisher_normalize"), config.get("delta_codec")
    label = f"{config['strategy']} (Fisher/{norm})" if norm else str(config["strategy"])
    return f"{label} [{codec}]" if codec else label


def pivot_markdown(reports: list[dict[str, Any]]) -> str:
    """Accuracy as mean ± spread (seeds): one row per (clients, alpha), one column per method."""
    if not reports:
        raise ValueError("no reports to compare")
    cells: dict[tuple[Any, ...], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in reports:
        c = r["config"]
        key = (c["clients"], c["alpha"], c["rounds"], _steps(c))
        cells[key][method_label(c)].append(r["final"]["accuracy"])
    methods = sorted({m for row in cells.values() for m in row}, key=_method_order)
    lines = ["| devices | alpha | rounds × local steps | " + " | ".join(methods) + " |"]
    lines.append("|---|---|---|" + "---|" * len(methods))
    for (clients, alpha, rounds, steps), row in sorted(cells.items()):
        values = [f"{_mean_spread(row[m])} (n={len(row[m])})" if m in row else "—" for m in methods]
        lines.append(f"| {clients} | {alpha} | {rounds} × {steps} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _steps(config: dict[str, Any]) -> Any:
    return config.get("train", {}).get("steps")


def _method_order(label: str) -> tuple[int, str]:
    order = ["fednano", "fedavg", "fedprox", "local", "centralized"]
    head = label.split(" ")[0]
    return (order.index(head) if head in order else len(order), label)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: python -m fednano.compare RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    reports = load_reports([Path(a) for a in argv])
    print(pivot_markdown(reports), "", comparison_markdown(reports), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
