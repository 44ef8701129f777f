"""Paired statistics by hand: differences, intervals, tests, Holm and verdicts."""

from __future__ import annotations

import math
import random

import pytest

from fednano.stats import describe, holm, judge, paired_test


def test_paired_test_by_hand() -> None:
    ref = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.80}
    method = {0: 0.52, 1: 0.61, 2: 0.73, 3: 0.80, 9: 0.99}  # seed 9 has no pair: ignored
    t = paired_test(method, ref)
    diffs = [0.02, 0.01, 0.03, 0.0]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert (t.n, t.wins, t.ties, t.losses) == (4, 3, 1, 0)
    assert t.mean_diff == pytest.approx(mean) and t.sd_diff == pytest.approx(sd)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) * sd / sqrt(4)
    assert (t.ci_low, t.ci_high) == pytest.approx((mean - half, mean + half))
    # t = 0.015 / (sd/2) = 2.324 with 3 df: one-sided p = 0.0513
    assert t.p_superior == pytest.approx(0.0513, abs=2e-4)
    assert t.p_inferior == pytest.approx(1 - t.p_superior)
    assert t.p_noninferior < t.p_superior  # the margin only helps


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, 2*0.02, max(0.04, 1*0.04): monotone
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_verdicts() -> None:
    seeds = range(12)
    ref = {s: 0.6 + 0.01 * (s % 5) for s in seeds}
    better = {s: ref[s] + 0.03 + 0.002 * (s % 3) for s in seeds}
    level = {s: ref[s] + 0.001 * (1 if s % 2 else -1) for s in seeds}
    worse = {s: ref[s] - 0.05 - 0.003 * (s % 4) for s in seeds}
    noisy = {s: ref[s] + (0.1 if s % 2 else -0.1) for s in seeds}
    tests = [paired_test(m, ref) for m in (better, level, worse, noisy)]
    judge(tests)
    assert [t.verdict for t in tests] == ["superior", "non-inferior", "worse", "inconclusive"]
    assert describe(tests[0]).startswith("+3.2 pt [")


def test_a_single_pair_is_inconclusive() -> None:
    t = paired_test({0: 0.9}, {0: 0.5})
    judge([t])
    assert t.verdict == "inconclusive" and math.isinf(t.ci_low)


def test_no_shared_seed_is_an_error() -> None:
    with pytest.raises(ValueError, match="share no seed"):
        paired_test({0: 0.5}, {1: 0.5})


def test_a_verdict_agrees_with_the_interval_it_is_printed_beside() -> None:
    # One cell (Holm changes nothing): non-inferior exactly when the 95 % interval's lower bound
    # clears -margin, superior only when it clears 0, worse only when the upper bound is below 0.
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(3, 12)
        shift = rng.uniform(-0.03, 0.03)
        diffs = {s: shift + rng.gauss(0, 0.01) for s in range(n)}
        t = paired_test(diffs, dict.fromkeys(range(n), 0.0), margin=0.01)
        judge([t])
        if t.verdict == "superior":
            assert t.ci_low > 0
        elif t.ci_low > -0.01:
            assert t.verdict == "non-inferior"
        else:
            assert t.verdict in ("worse", "inconclusive")
            assert (t.verdict == "worse") == (t.ci_high < 0)
