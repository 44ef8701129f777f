"""A deployment's home folder and what lives in it, named once.

Every cloud-side command works under one folder, ``home`` (``$FEDNANO_HOME``, default
``~/.cache/fednano``)::

    base/<version>/     a built base (connector + manifest.json); base/current names the one in use
    llm/<name>/         the LLM's safetensors cache (hashed into the base manifest)
    features/<store>/   pooled encoder features, one store per encoder weights and grid
    evals/              cached evaluations (e.g. a base's zero-shot accuracy)
    bundles/            exported NanoEdge bundles (the fleet's default; the API's is
                        FEDNANO_BUNDLE_DIR)

and, unless ``FEDNANO_DATA_DIR`` moves them, the cloud's own data (database, blobs, broker
files) sits in ``home`` itself. Only the standard library is imported here, so a CLI's
``--help`` can use it without loading the cloud's dependencies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "FEDNANO_HOME"
DEFAULT_HOME = "~/.cache/fednano"


@dataclass(frozen=True)
class Layout:
    """The sub-folders of one home; building paths here keeps them the same in every caller."""

    home: Path

    @classmethod
    def default(cls) -> Layout:
        """``$FEDNANO_HOME`` or ``~/.cache/fednano``, read now (not at import), so a test or a
        child process that sets the variable later still gets its own home."""
        return cls(Path(os.environ.get(HOME_ENV, DEFAULT_HOME)).expanduser())

    @property
    def bases(self) -> Path:
        """The built base versions, one folder each, and the ``current`` pointer."""
        return self.home / "base"

    def base(self, version: str) -> Path:
        """The folder of one base version."""
        return self.bases / version

    @property
    def llm(self) -> Path:
        """The LLM caches (one folder per model)."""
        return self.home / "llm"

    @property
    def features(self) -> Path:
        """The feature stores (one per encoder weights and grid)."""
        return self.home / "features"

    @property
    def evals(self) -> Path:
        """Cached evaluation results."""
        return self.home / "evals"

    @property
    def bundles(self) -> Path:
        """Exported NanoEdge bundles when no other folder is given."""
        return self.home / "bundles"

    @property
    def data(self) -> Path:
        """The cloud's own data (database, blobs, broker files) when no data folder is set."""
        return self.home
