"""Load a bundle the way a device does: a fresh interpreter with only the repository on its
path, then check that none of the cloud-side modules came along with it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bundle_on_device(folder: Path, forbidden: Sequence[str], *, report: str,
                          self_test: bool = False, timeout: float = 120) -> str:
    """``edge.runtime.load_bundle(folder)`` (and its self-test if asked) in a subprocess;
    asserts that it exited 0 with none of ``forbidden`` imported, and returns what it
    printed: ``report``, a Python expression over ``rt`` (the runtime) and ``st`` (the
    self-test report, None without one)."""
    code = (
        "import sys; from pathlib import Path; import edge.runtime as r\n"
        f"rt = r.load_bundle(Path({str(folder)!r}))\n"
        f"st = rt.self_test() if {self_test!r} else None\n"
        f"bad = [m for m in {tuple(forbidden)!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        f"print({report})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()
