"""fednano compare: paired verdicts per cell and the generated blocks of a markdown page."""

from __future__ import annotations

from typing import Any

import pytest

from fednano.compare import paired_tests, update_document, verdict_markdown


def report(strategy: str, seed: int, accuracy: float, alpha: float = 0.1) -> dict[str, Any]:
    return {
        "config": {"strategy": strategy, "strategy_options": {}, "task": "easyvqa", "clients": 5,
                   "alpha": alpha, "partition": "question", "rounds": 3, "seed": seed,
                   "train": {"steps": 8, "batch_size": 16, "lr": 2e-3},
                   "eval_questions": 1000, "eval_seed": 0},
        "final": {"accuracy": accuracy, "per_type": {"color": accuracy}},
        "rounds": [],
    }


def runs(gains: list[float], alpha: float = 0.1) -> list[dict[str, Any]]:
    base = [0.60, 0.52, 0.71, 0.66, 0.58, 0.63, 0.55, 0.69]
    return ([report("fedavg", s, a, alpha) for s, a in enumerate(base)]
            + [report("fisher-norm", s, a + g, alpha)
               for s, (a, g) in enumerate(zip(base, gains, strict=False))])


def test_a_consistent_gain_is_superior_and_a_loss_is_worse() -> None:
    up = paired_tests(runs([0.03, 0.04, 0.02, 0.05, 0.03, 0.04, 0.03, 0.02]))
    down = paired_tests(runs([-0.03, -0.04, -0.02, -0.05, -0.03, -0.04, -0.03, -0.02]))
    assert [t.verdict for t in up["fisher-norm"].values()] == ["superior"]
    assert [t.verdict for t in down["fisher-norm"].values()] == ["worse"]


def test_noise_around_zero_is_not_a_win() -> None:
    tests = paired_tests(runs([0.05, -0.06, 0.04, -0.05, 0.06, -0.04, 0.05, -0.05]))
    assert [t.verdict for t in tests["fisher-norm"].values()] == ["inconclusive"]


def test_the_margin_decides_non_inferiority() -> None:
    # Always within half a point below the reference: non-inferior at a 1-point margin only.
    reports = runs([-0.004, -0.003, -0.005, -0.004, -0.002, -0.004, -0.003, -0.005])
    loose = paired_tests(reports, margin=0.01)["fisher-norm"]
    tight = paired_tests(reports, margin=0.001)["fisher-norm"]
    assert [t.verdict for t in loose.values()] == ["non-inferior"]
    assert [t.verdict for t in tight.values()] != ["non-inferior"]


def test_update_fills_only_the_generated_blocks() -> None:
    reports = runs([0.03, 0.04, 0.02, 0.05, 0.03, 0.04, 0.03, 0.02])
    page = ("# Results\nhand-written\n<!-- generated: verdicts -->\nold\n<!-- end generated -->\n"
            "between\n<!-- generated: accuracy -->\n<!-- end generated -->\ntail\n")
    new = update_document(page, reports)
    assert "old" not in new and "hand-written" in new and "between" in new and "tail" in new
    assert verdict_markdown(reports) in new and "**superior**" in new
    assert "0.617 ± 0.067 (n=8)" in new  # fedavg's mean accuracy in the pivot
    with pytest.raises(ValueError, match="unknown generated section 'plots'"):
        update_document("<!-- generated: plots -->\n<!-- end generated -->", reports)
