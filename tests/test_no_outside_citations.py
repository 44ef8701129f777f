"""The repo stands alone: no file cites a design, facts or style document kept outside it.

A sentence like "see DESIGN.md" or "(STYLE 13)" means nothing to a reader of this repo, and it
goes stale silently when the outside document changes; say the reason in place instead.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "DESIGN.md", "STYLE 13", "the DESIGN says": capitals name the outside document.
CITATION = re.compile(r"\b(?:DESIGN|FACTS|STYLE)\.md\b|\bSTYLE \d|\bthe (?:DESIGN|FACTS|STYLE)\b")


def tracked_text_files() -> list[Path]:
    """Every file git tracks, except this test (which spells the patterns) and binaries."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    paths = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    return [path for path in paths if path.is_file() and path != Path(__file__).resolve()]


def test_no_file_cites_an_outside_document() -> None:
    hits = []
    for path in tracked_text_files():
        data = path.read_bytes()
        if b"\0" in data:  # a binary (image, archive): no prose in it
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if CITATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "citations of documents outside the repo:\n" + "\n".join(hits)
