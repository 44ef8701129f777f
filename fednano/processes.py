"""Child processes of the fleet and the demo: each in its own process group, always stopped.

A ``ManagedProcess`` runs one command in a new session (so it is its own process group and a
signal reaches everything it started), with its output in a log file. ``stop`` sends SIGTERM
to the group, waits, then SIGKILL; ``kill`` is a crash (SIGKILL at once); ``pause`` and
``resume`` are SIGSTOP / SIGCONT (a device that stalls). A ``ProcessSet`` stops all of its
processes, newest first, and is what the fleet's ``finally`` and signal handlers call.

Safety net: when ``setpriv`` (util-linux) is there, children are started with
``--pdeathsig SIGTERM``, so even a SIGKILLed parent leaves nothing running. The signal fires
when the *thread* that started the child ends, so start children from the main thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def launcher() -> list[str]:
    """The argv prefix that makes a child die with this process (empty without setpriv).

    A child that changes its user (a root-started Mosquitto drops to ``mosquitto``) loses the
    death signal: the kernel clears it on a credential change.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGTERM", "--"] if setpriv else []


class Child:
    """A handle on at most one child process at a time (``_process``, None before the first
    start): what it can tell without touching the process."""

    _process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


class ManagedProcess(Child):
    """One command in its own process group, logging to ``log_path`` (appended)."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        if not argv:
            raise ValueError(f"{name}: empty command")
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.starts = 0

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def start(self) -> ManagedProcess:
        """Start the command (``RuntimeError`` if it is already running)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [*launcher(), *self.argv], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, start_new_session=True)
        self.starts += 1
        return self

    def signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the process group; False if it is not running."""
        if self._process is None or self._process.poll() is not None:
            return False
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the group, wait up to ``timeout`` s, then SIGKILL; the exit code."""
        if self._process is None:
            return None
        self.signal_group(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        if self.signal_group(signal.SIGTERM):
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL to the group at once: a crash."""
        if self._process is None:
            return None
        self.signal_group(signal.SIGKILL)
        return self._reap()

    def _reap(self) -> int | None:
        assert self._process is not None
        code = self._process.wait()
        # Whatever the leader left in its group (it was SIGKILLed, or exited first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        return code

    def pause(self) -> None:
        """SIGSTOP the group: the process stalls (its connections time out)."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the group."""
        self.signal_group(signal.SIGCONT)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit; None if still running after ``timeout`` s."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


class ProcessSet:
    """Processes to stop together, newest first (devices before the cloud before the broker)."""

    def __init__(self) -> None:
        self._items: list[ManagedProcess] = []

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self._items.append(process)
        return process

    def __iter__(self) -> Iterator[ManagedProcess]:
        return iter(list(self._items))

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every running process at once, wait, SIGKILL what is left, reap all."""
        running = [p for p in reversed(self._items) if p.running]
        for process in running:
            process.resume()
            process.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            process.wait(max(0.1, deadline - time.monotonic()))
        for process in running:
            process.kill()
