"""Child processes in their own groups: stopped with everything they started, crashes, stalls."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fednano.processes import ManagedProcess, ProcessSet

# A leader that starts a grandchild and records its pid, then waits.
FAMILY = ("import subprocess, sys, time; "
          "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
          "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(300)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not alive
        return stat.read().split()[2] != "Z"


def _family(tmp_path: Path, name: str = "family") -> tuple[ManagedProcess, Path]:
    pid_file = tmp_path / f"{name}.pid"
    process = ManagedProcess(name, [sys.executable, "-c", FAMILY, str(pid_file)],
                             log_path=tmp_path / f"{name}.log")
    return process, pid_file


def _wait_file(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return int(path.read_text())


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stop_and_kill_take_the_whole_group(tmp_path: Path, how: str) -> None:
    process, pid_file = _family(tmp_path)
    process.start()
    try:
        grandchild = _wait_file(pid_file)
        assert os.getpgid(process.pid or 0) != os.getpgid(0)  # its own group
        code = process.stop(timeout=5) if how == "stop" else process.kill()
        assert code == (-signal.SIGTERM if how == "stop" else -signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(grandchild)
        assert not process.running
    finally:
        process.kill()


def test_restart_appends_to_the_log_and_counts_starts(tmp_path: Path) -> None:
    process = ManagedProcess("echo", [sys.executable, "-c", "print('hello')"],
                             log_path=tmp_path / "echo.log")
    for _ in range(2):
        process.start()
        assert process.wait(20) == 0
    assert process.starts == 2
    assert process.log_tail().count("\nhello\n") == 2
    with pytest.raises(ValueError, match="empty command"):
        ManagedProcess("none", [], log_path=tmp_path / "x.log")


def test_a_paused_process_stalls_and_still_stops(tmp_path: Path) -> None:
    ticker = ("import time, sys\n"
              "while True:\n    print(time.time(), flush=True); time.sleep(0.05)")
    process = ManagedProcess("ticker", [sys.executable, "-c", ticker],
                             log_path=tmp_path / "ticker.log").start()
    try:
        time.sleep(1.0)
        process.pause()
        time.sleep(0.3)  # let a line in flight land
        frozen = process.log_tail(10**6)
        time.sleep(0.5)
        assert process.log_tail(10**6) == frozen
        process.resume()
        time.sleep(0.5)
        assert process.log_tail(10**6) != frozen
        process.pause()
        assert process.stop(timeout=5) == -signal.SIGTERM  # SIGCONT comes first
    finally:
        process.kill()


def test_a_set_stops_everything_it_holds(tmp_path: Path) -> None:
    processes = ProcessSet()
    families = [_family(tmp_path, f"f{i}") for i in range(3)]
    for process, _ in families:
        processes.add(process).start()
    grandchildren = [_wait_file(pid_file) for _, pid_file in families]
    processes.stop_all(timeout=5)
    assert not any(p.running for p in processes)
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in grandchildren) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in grandchildren)
