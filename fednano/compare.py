"""Tables from simulation reports: accuracy per method and the paired verdict against a reference.

``fednano compare RUN_DIR...`` reads every ``report.json`` below the folders. A *cell* is one
setting (task, devices, α, partition, rounds × local steps, ...); a *method* is a strategy with
its options (``fednano.simulate.method_spec``), plus the upload codec when one was used. Runs of
two methods with the same seed in the same cell are paired (same partition, initialisation,
batches and held-out questions), and ``fednano.stats`` turns the pairs into a verdict per cell.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fednano.stats import DEFAULT_MARGIN, PairedTest, describe, gap_verdict, judge, paired_test

CELL = ("task", "clients", "alpha", "partition", "rounds")
TRAIN = ("steps", "batch_size", "lr")
Report = dict[str, Any]
Cell = tuple[Any, ...]


def load_reports(paths: Sequence[Path]) -> list[Report]:
    """Every ``report.json`` in the given folders (searched recursively) or files."""
    reports = []
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("report.json"))
        if not files:
            raise ValueError(f"no report.json under {path}")
        reports += [json.loads(f.read_text()) for f in files]
    return reports


def cell_of(report: Report) -> Cell:
    """The setting a run belongs to: everything but the method and the seed."""
    config = report["config"]
    train = config.get("train", {})
    # Runs on different bases are never paired: a base build is not bit-reproducible.
    return (*(config.get(k) for k in CELL), *(train.get(k) for k in TRAIN),
            config.get("eval_questions"), config.get("eval_seed", 0), report.get("base_version"))


def cell_label(cell: Cell) -> str:
    task, clients, alpha, _partition, rounds, steps = cell[:6]
    return f"{task} K={clients} α={alpha} {rounds}×{steps}"


def method_label(config: dict[str, Any]) -> str:
    """The method: strategy and options, the upload codec when one was used, and the
    activation encoding when it was not fp32."""
    from fednano.simulate import method_spec

    options = dict(config.get("strategy_options") or {})
    if config["strategy"] == "fedprox":
        options.setdefault("mu", config.get("prox_mu", 0.01))
    label = method_spec({**config, "strategy_options": options})
    codec = config.get("delta_codec")
    label = f"{label} [{codec}]" if codec else label
    activations = config.get("activations", "fp32")
    return label if activations == "fp32" else f"{label} [activations {activations}]"


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def by_cell_method(reports: list[Report]) -> dict[Cell, dict[str, dict[int, Report]]]:
    """``{cell: {method: {seed: report}}}``; a repeated (cell, method, seed) is an error."""
    table: dict[Cell, dict[str, dict[int, Report]]] = defaultdict(lambda: defaultdict(dict))
    for report in reports:
        cell, method = cell_of(report), method_label(report["config"])
        seed = int(report["config"]["seed"])
        if seed in table[cell][method]:
            raise ValueError(f"two reports for {method} seed {seed} in {cell_label(cell)}")
        table[cell][method][seed] = report
    return table


def _accuracy(runs: dict[int, Report]) -> dict[int, float]:
    return {seed: float(r["final"]["accuracy"]) for seed, r in runs.items()}


def pivot_markdown(reports: list[Report]) -> str:
    """Accuracy as mean ± spread (seeds): one row per cell, one column per method."""
    if not reports:
        raise ValueError("no reports to compare")
    table = by_cell_method(reports)
    methods = sorted({m for row in table.values() for m in row}, key=_method_order)
    lines = ["| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for cell, row in sorted(table.items(), key=lambda kv: tuple(map(str, kv[0]))):
        values = [f"{_mean_spread(list(_accuracy(row[m]).values()))} (n={len(row[m])})"
                  if m in row else "—" for m in methods]
        lines.append(f"| {cell_label(cell)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# Compressed split-training traffic (``[activations ...]`` rows) changes nothing but the bytes on
# the wire, so it must cost less than half a point to count as non-inferior.
TRANSPORT_MARGIN = 0.005


def margin_for(method: str, margin: float = DEFAULT_MARGIN) -> float:
    """The non-inferiority margin ``method`` is judged at: ``margin``, or the tighter
    ``TRANSPORT_MARGIN`` for a method that differs only in how its activations travel."""
    return min(margin, TRANSPORT_MARGIN) if "[activations " in method else margin


# Not merges but the bounds a merge sits between: each device alone, and one learner on the
# pooled data (strategies, whatever their options or encodings). They are not judged against
# FedAvg; the default is judged against centralized.
BOUNDS = ("local", "centralized")
# "Within 2 points of centralized": the default's gap to the pooled-data learner is judged as a
# non-inferiority test against it at this margin.
CENTRALIZED_MARGIN = 0.02


def paired_tests(reports: list[Report], reference: str = "fedavg",
                 margin: float = DEFAULT_MARGIN,
                 methods: Sequence[str] | None = None) -> dict[str, dict[Cell, PairedTest]]:
    """``{method: {cell: test}}`` against ``reference``, Holm-corrected per method over cells,
    each method at its own ``margin_for``; only ``methods`` when given."""
    table = by_cell_method(reports)
    tests: dict[str, dict[Cell, PairedTest]] = defaultdict(dict)
    for cell, row in table.items():
        if reference not in row:
            continue
        for method, runs in row.items():
            if method == reference or not set(runs) & set(row[reference]):
                continue
            if methods is not None and method not in methods:
                continue
            tests[method][cell] = paired_test(_accuracy(runs), _accuracy(row[reference]),
                                              margin_for(method, margin))
    for per_cell in tests.values():
        judge(list(per_cell.values()))
    return dict(tests)


def _strategy_of(label: str) -> str:
    """The strategy name a method label starts with (before its options and encodings)."""
    return re.split(r"[ :\[]", label)[0]


def is_bound(method: str) -> bool:
    """Whether ``method`` (a label, options and encodings included) is one of the ``BOUNDS``."""
    return _strategy_of(method) in BOUNDS


def verdict_markdown(reports: list[Report], reference: str = "fedavg",
                     margin: float = DEFAULT_MARGIN, methods: Sequence[str] | None = None) -> str:
    """One row per (method, cell): accuracies, paired difference with CI, tests, verdict.

    ``methods``: only those; by default every method but the ``BOUNDS``."""
    if methods is None:
        methods = sorted(m for m in {method_label(r["config"]) for r in reports}
                         if not is_bound(m))
    tests = paired_tests(reports, reference, margin, methods)
    if not tests:
        raise ValueError(f"no method shares a seed with the reference {reference!r}")
    return _test_table(reports, tests, reference, lambda test: f"**{test.verdict}**")


def centralized_markdown(reports: list[Report], default: str = "fedavg") -> str:
    """The ``default`` merge against one learner on the pooled data, per cell where both ran on
    shared seeds: within ``CENTRALIZED_MARGIN`` of it, beyond it, or inconclusive (Holm-corrected
    over the cells; ``fednano.stats.gap_verdict``)."""
    tests = paired_tests(reports, "centralized", CENTRALIZED_MARGIN, [default])
    if not tests:
        raise ValueError(f"no {default!r} run shares a seed with a 'centralized' run")
    words = {"within": f"**within {100 * CENTRALIZED_MARGIN:g} pt**",
             "beyond": f"**more than {100 * CENTRALIZED_MARGIN:g} pt behind**",
             "inconclusive": "**inconclusive**"}
    return _test_table(reports, tests, "centralized", lambda test: words[gap_verdict(test)])


def _test_table(reports: list[Report], tests: dict[str, dict[Cell, PairedTest]], reference: str,
                verdict: Callable[[PairedTest], str]) -> str:
    table = by_cell_method(reports)
    lines = [f"| method | setting | n | accuracy | {reference} | difference [95 % CI], wins/losses,"
             " Holm p (t / Wilcoxon) | margin | verdict |", "|---|---|---|---|---|---|---|---|"]
    for method in sorted(tests, key=_method_order):
        for cell, test in sorted(tests[method].items(), key=lambda kv: tuple(map(str, kv[0]))):
            seeds = set(table[cell][method]) & set(table[cell][reference])
            mine = [_accuracy(table[cell][method])[s] for s in seeds]
            ref = [_accuracy(table[cell][reference])[s] for s in seeds]
            lines.append(f"| {method} | {cell_label(cell)} | {test.n} | "
                         f"{statistics.fmean(mine):.3f} | {statistics.fmean(ref):.3f} | "
                         f"{describe(test)} | {100 * test.margin:g} pt | {verdict(test)} |")
    return "\n".join(lines)


def bytes_markdown(reports: list[Report]) -> str:
    """Bytes per device per round (last round, mean over runs) per setting and method."""
    sums: dict[tuple[str, str], list[tuple[int, int, int, int]]] = defaultdict(list)
    for report in reports:
        if report["rounds"]:
            last = report["rounds"][-1]
            key = (cell_label(cell_of(report)), method_label(report["config"]))
            sums[key].append((last["param_bytes_up"], last["param_bytes_down"],
                              last["activation_bytes_up"], last["activation_bytes_down"]))
    lines = ["| setting | method | parameters up | parameters down | activations up | "
             "activations down |", "|---|---|---|---|---|---|"]
    for setting, method in sorted(sums, key=lambda k: (k[0], _method_order(k[1]))):
        rows = sums[(setting, method)]
        cols = [statistics.fmean(v[i] for v in rows) for i in range(4)]
        lines.append(f"| {setting} | {method} | " + " | ".join(_kib(int(c)) for c in cols) + " |")
    return "\n".join(lines)


def per_type_markdown(reports: list[Report], alpha: float | None = 0.1) -> str:
    """Accuracy per question type (mean over seeds) per method, in cells with ``alpha``."""
    table = by_cell_method(reports)
    lines = []
    for cell, row in sorted(table.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if alpha is not None and not math.isclose(float(cell[2]), alpha):
            continue
        types = sorted({t for runs in row.values() for r in runs.values()
                        for t in r["final"].get("per_type", {})})
        if not types:
            continue
        lines += [f"**{cell_label(cell)}**", "", "| method | " + " | ".join(types) + " |",
                  "|---|" + "---|" * len(types)]
        for method in sorted(row, key=_method_order):
            cols = [statistics.fmean(r["final"]["per_type"].get(t, math.nan)
                                     for r in row[method].values()) for t in types]
            lines.append(f"| {method} | " + " | ".join(f"{c:.3f}" for c in cols) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


SECTIONS = {"accuracy": pivot_markdown, "verdicts": verdict_markdown, "bytes": bytes_markdown,
            "per-type": per_type_markdown, "centralized": centralized_markdown}
_MARKER = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n).*?(<!-- end generated -->)",
                     re.DOTALL)


def update_document(text: str, reports: list[Report], reference: str = "fedavg",
                    margin: float = DEFAULT_MARGIN) -> str:
    """Refresh every ``<!-- generated: NAME -->`` ... ``<!-- end generated -->`` block.

    NAME is one of ``SECTIONS``; the hand-written text around the blocks stays as it is.
    """
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in SECTIONS:
            raise ValueError(f"unknown generated section {name!r}; known: {sorted(SECTIONS)}")
        body = verdict_markdown(reports, reference, margin) if name == "verdicts" else \
            SECTIONS[name](reports)
        return f"{match[1]}{body}\n{match[3]}"

    return _MARKER.sub(fill, text)


def _method_order(label: str) -> tuple[int, str]:
    order = ["fednano", "fedavg", "fedprox", "fisher-raw", "fisher-norm", "fisher-global",
             "fedmedian", "local", "centralized"]
    head = _strategy_of(label)
    return (order.index(head) if head in order else len(order), label)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"
