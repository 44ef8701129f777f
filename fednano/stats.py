"""Paired statistics for method comparisons: is method M better than reference R in a cell?

Runs of two methods with the same seed in the same setting share their data partition, adapter
initialisation and batches, so their accuracies are *paired*: the per-seed difference
``d_s = acc_M(s) - acc_R(s)`` removes most of the seed-to-seed spread (which is large under
heavy skew). Per cell this module computes, over the shared seeds:

- the mean difference and its two-sided 95 % confidence interval (Student t),
- a one-sided paired t-test for superiority (H1: mean d > 0) and for non-inferiority with a
  margin m (H1: mean d > -m), and one for inferiority (H1: mean d < 0),
- a one-sided Wilcoxon signed-rank test for superiority (no normality assumption),

then Holm-corrects each family of p-values across the cells of a table and gives a verdict:
``superior`` (t-test and Wilcoxon both significant after Holm), ``non-inferior`` (the lower
confidence bound clears -m after Holm), ``worse`` (significantly below the reference after
Holm, by more than the margin or with no non-inferiority shown), else ``inconclusive``.

Each one-sided test is run at ``ALPHA / 2`` (2.5 %), the usual convention for non-inferiority
trials: a verdict then agrees with the two-sided 95 % interval printed beside it (before Holm, a
method is non-inferior exactly when that interval's lower bound clears -m, superior when it
clears 0, worse when its upper bound is below 0). A one-sided test at 5 % would call a method
non-inferior while the printed interval still reaches past -m.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scipy import stats as _scipy

ALPHA = 0.05  # two-sided; every one-sided test below is run at ALPHA / 2
ONE_SIDED = ALPHA / 2
DEFAULT_MARGIN = 0.01  # one accuracy point
VERDICTS = ("superior", "non-inferior", "inconclusive", "worse")


@dataclass
class PairedTest:
    """One method against the reference in one cell, over the seeds both have."""

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float  # two-sided 95 % bounds of the mean difference
    ci_high: float
    wins: int
    ties: int
    losses: int
    p_superior: float  # one-sided paired t-test, H1: mean d > 0
    p_noninferior: float  # one-sided paired t-test, H1: mean d > -margin
    p_inferior: float  # one-sided paired t-test, H1: mean d < 0
    p_beyond_margin: float  # one-sided paired t-test, H1: mean d < -margin
    p_wilcoxon: float  # one-sided Wilcoxon signed-rank, H1: d tends to be > 0
    margin: float
    adjusted: dict[str, float] = field(default_factory=dict)  # Holm-adjusted p-values
    verdict: str = "inconclusive"


def paired_test(
    method: Mapping[int, float], reference: Mapping[int, float], margin: float = DEFAULT_MARGIN
) -> PairedTest:
    """Compare two methods on the seeds they share (``{seed: accuracy}`` each)."""
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    seeds = sorted(set(method) & set(reference))
    diffs = [method[s] - reference[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        raise ValueError("the two methods share no seed: nothing to pair")
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else math.nan
    low, high = _confidence_interval(mean, sd, n)
    return PairedTest(
        n=n, mean_diff=mean, sd_diff=sd, ci_low=low, ci_high=high,
        wins=sum(d > 0 for d in diffs), ties=sum(d == 0 for d in diffs),
        losses=sum(d < 0 for d in diffs),
        p_superior=_t_p_greater(mean, sd, n, 0.0),
        p_noninferior=_t_p_greater(mean, sd, n, -margin),
        p_inferior=_t_p_greater(-mean, sd, n, 0.0),
        p_beyond_margin=_t_p_greater(-mean, sd, n, margin),
        p_wilcoxon=_wilcoxon_p_greater(diffs), margin=margin,
    )


def _confidence_interval(mean: float, sd: float, n: int) -> tuple[float, float]:
    if n < 2 or math.isnan(sd):
        return -math.inf, math.inf
    half = float(_scipy.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def _t_p_greater(mean: float, sd: float, n: int, null: float) -> float:
    """One-sided p-value of H1: true mean > ``null`` for a sample mean/sd of n paired diffs."""
    if n < 2:
        return 1.0
    if sd == 0.0:  # every difference equal: certain if it clears the null, hopeless otherwise
        return 0.0 if mean > null else 1.0
    t = (mean - null) / (sd / math.sqrt(n))
    return float(_scipy.t.sf(t, n - 1))


def _wilcoxon_p_greater(diffs: Sequence[float]) -> float:
    nonzero = [d for d in diffs if d != 0]
    if len(nonzero) < 2:
        return 1.0
    return float(_scipy.wilcoxon(nonzero, alternative="greater").pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given), monotone and capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def judge(tests: Sequence[PairedTest]) -> None:
    """Holm-correct each family of p-values across ``tests`` (one per cell) and set verdicts."""
    families = ("p_superior", "p_noninferior", "p_inferior", "p_beyond_margin", "p_wilcoxon")
    for name in families:
        for test, p in zip(tests, holm([getattr(t, name) for t in tests]), strict=True):
            test.adjusted[name] = p
    for test in tests:
        test.verdict = _verdict(test)


def _verdict(test: PairedTest) -> str:
    adj = test.adjusted
    if adj["p_superior"] < ONE_SIDED and adj["p_wilcoxon"] < ONE_SIDED:
        return "superior"
    if adj["p_noninferior"] < ONE_SIDED:
        return "non-inferior"
    if adj["p_inferior"] < ONE_SIDED:
        return "worse"
    return "inconclusive"


def gap_verdict(test: PairedTest) -> str:
    """Whether a method is within ``margin`` of a reference it is not expected to beat (an
    upper bound such as a centralized learner), after Holm: ``within`` when the lower bound
    clears -margin, ``beyond`` when the upper bound is below -margin, ``inconclusive`` else."""
    if test.adjusted["p_noninferior"] < ONE_SIDED:
        return "within"
    if test.adjusted["p_beyond_margin"] < ONE_SIDED:
        return "beyond"
    return "inconclusive"


def describe(test: PairedTest) -> str:
    """``+1.2 pt [−0.3, +2.7], 9/3 wins, p=0.012 (t) / 0.021 (W)``-style summary."""
    low = "−∞" if math.isinf(test.ci_low) else f"{100 * test.ci_low:+.1f}"
    high = "+∞" if math.isinf(test.ci_high) else f"{100 * test.ci_high:+.1f}"
    adj = test.adjusted or {"p_superior": test.p_superior, "p_wilcoxon": test.p_wilcoxon}
    return (
        f"{100 * test.mean_diff:+.1f} pt [{low}, {high}], {test.wins}/{test.losses} wins, "
        f"p={adj['p_superior']:.3f} (t) / {adj['p_wilcoxon']:.3f} (W)"
    )
