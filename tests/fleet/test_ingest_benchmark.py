"""benchmarks/ingest.py at a small size: 260 devices in two swarm processes burst their
updates through the private Mosquitto into the real coordinator process; every update the
broker acknowledged is stored and accepted, none lost, and the round aggregates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ingest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_burst_of_260_devices_is_stored_without_loss(built_home: Path,
                                                       tmp_path: Path) -> None:
    devices = ingest.DEVICES_PER_PROCESS + 10  # two swarm processes
    code = ingest.main(["--devices", str(devices), "--home", str(built_home),
                        "--timeout", "300", "--out", str(tmp_path)])

    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert code == 0
    assert run["devices"] == run["published"] == run["acked"] == devices
    assert run["stored"] == run["accepted"] == devices
    assert run["rejected"] == 0 and run["lost"] == 0
    assert run["round_state"] == "closed" and run["merge_s"] is not None
    assert 0 < run["latency_p50_ms"] <= run["latency_p99_ms"] <= run["latency_max_ms"]
    assert run["updates_per_s"] > 0
    assert "benchmarks/ingest.py --devices" in (tmp_path / "summary.md").read_text()


def test_bad_arguments_are_refused_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--devices", "ten"], ["--devices", "0"], ["--rate", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            ingest.main(argv)
        assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
