"""The repo stands alone: no file cites a design, facts or style document kept outside it.

A sentence that sends the reader to such a document (by its file name, a numbered rule of it,
or "the <document> says") means nothing to a reader of this repo, and it goes stale silently
when the outside document changes; say the reason in place instead.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The outside documents' names, in capitals as they are cited; built here so that this file
# does not cite them itself.
_NAMES = "|".join(word.upper() for word in ("design", "facts", "style"))
CITATION = re.compile(rf"\b(?:{_NAMES})\.md\b|\b{'style'.upper()} \d|\bthe (?:{_NAMES})\b")


def tracked_text_files() -> list[Path]:
    """Every file git tracks."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    paths = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    return [path for path in paths if path.is_file()]


def test_the_pattern_finds_each_form_of_citation() -> None:
    for name in ("design", "facts", "style"):
        assert CITATION.search(f"see {name.upper()}.md for why")
        assert CITATION.search(f"as the {name.upper()} says")
    assert CITATION.search(f"reads top to bottom ({'style'.upper()} 13)")
    assert not CITATION.search("the design of the round; style and facts")


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
