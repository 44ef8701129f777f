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


def test_bytes_are_per_setting_and_method() -> None:
    from fednano.compare import bytes_markdown

    reports = runs([0.0] * 8) + runs([0.0] * 8, alpha=0.5)
    for r in reports:
        up = 2 if r["config"]["strategy"] == "fisher-norm" else 1
        r["rounds"] = [{"param_bytes_up": up * 1024, "param_bytes_down": 1024,
                        "activation_bytes_up": 10 * 1024 * r["config"]["alpha"] * 10,
                        "activation_bytes_down": 0}]
    table = bytes_markdown(reports)
    assert ("| easyvqa K=5 α=0.5 3×8 | fisher-norm | 2.0 KiB | 1.0 KiB | 50.0 KiB | 0.0 KiB |"
            in table)
    assert "| easyvqa K=5 α=0.1 3×8 | fedavg | 1.0 KiB | 1.0 KiB | 10.0 KiB | 0.0 KiB |" in table


def test_compressed_activations_are_judged_at_the_tighter_transport_margin() -> None:
    # 0.7 points below FedAvg every time: non-inferior at 1 point as a merge, not as a transport.
    base = [0.60, 0.52, 0.71, 0.66, 0.58, 0.63, 0.55, 0.69]
    reports = [report("fedavg", s, a) for s, a in enumerate(base)]
    for strategy, activations in (("fisher-norm", "fp32"), ("fedavg", "int8+zstd")):
        for s, a in enumerate(base):
            r = report(strategy, s, a - 0.007 + 0.001 * (s % 2))
            r["config"]["activations"] = activations
            reports.append(r)
    tests = paired_tests(reports)
    assert [t.verdict for t in tests["fisher-norm"].values()] == ["non-inferior"]
    assert [t.verdict for t in tests["fedavg [activations int8+zstd]"].values()] == ["worse"]
    table = verdict_markdown(reports)
    assert "| 0.5 pt | **worse** |" in table and "| 1 pt | **non-inferior** |" in table


def test_the_default_is_judged_against_centralized_at_two_points() -> None:
    from fednano.compare import centralized_markdown

    base = [0.60, 0.52, 0.71, 0.66, 0.58, 0.63, 0.55, 0.69]
    fedavg = [report("fedavg", s, a) for s, a in enumerate(base)]

    def centralized(gaps: list[float]) -> list[dict[str, Any]]:
        pairs = enumerate(zip(base, gaps, strict=True))
        return [report("centralized", s, a + g) for s, (a, g) in pairs]

    near = centralized([0.012 + 0.002 * (s % 2) for s in range(8)])
    far = centralized([0.035 + 0.004 * (s % 2) for s in range(8)])
    noisy = centralized([0.013 + (0.03 if s % 2 else -0.03) for s in range(8)])  # 1.3 pt, sd 3
    assert "| fedavg | easyvqa K=5 α=0.1 3×8 | 8 |" in centralized_markdown(fedavg + near)
    assert "| 2 pt | **within 2 pt** |" in centralized_markdown(fedavg + near)
    assert "| 2 pt | **more than 2 pt behind** |" in centralized_markdown(fedavg + far)
    # 1.3 points behind on average, too noisy to say on which side of 2 points.
    assert "| 2 pt | **inconclusive** |" in centralized_markdown(fedavg + noisy)
    # A bound is not a merge, whatever its options: no row in the table against FedAvg.
    local = [report("local", s, a - 0.1) for s, a in enumerate(base)]
    for r in local:
        r["config"]["activations"] = "bf16+zstd"
    rows = verdict_markdown(fedavg + near + local + runs([0.01] * 8)[8:]).split("\n")[2:]
    assert rows and all(row.startswith("| fisher-norm |") for row in rows)
