"""The fuzz harness's short deterministic sample (``benchmarks/fuzz_parsing.py`` is the long
mode): update frames, LLM requests, presence and the REST API through the real handlers; no
crash, no hang, and an honest update is still accepted and merged afterwards."""

from __future__ import annotations

import pytest

from benchmarks.fuzz_parsing import TARGETS, run_all


@pytest.mark.timeout(600)
def test_a_short_deterministic_fuzz_sample_finds_no_crash_or_hang() -> None:
    report = run_all(examples=12, seed=0, hang_s=30.0)
    for name in TARGETS:
        assert report[name]["inputs"] == 12, name
        assert report[name]["crashes"] == 0, report[name]["crash_samples"]
        assert report[name]["hangs"] == 0, report[name]["hang_samples"]
    assert report["update"]["refused"], "the sample must exercise refusals"
    assert report["honest_update_merged_after"]
