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


class _Folder:
    """A folder under the layout's home, by the name it has on disk (``layout.llm`` is
    ``layout.home / "llm"``): the layout reads like the tree it describes."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout: Layout, owner: type[Layout] | None = None) -> Path:
        return layout.home / self.name


@dataclass(frozen=True)
class Layout:
    """The sub-folders of one home; building paths here keeps them the same in every caller."""

    home: Path

    bases = _Folder("base")  # built base versions, one folder each, and the current pointer
    llm = _Folder("llm")  # the LLM caches, one folder per model
    features = _Folder("features")  # feature stores, one per encoder weights and grid
    evals = _Folder("evals")  # cached evaluation results
    bundles = _Folder("bundles")  # exported NanoEdge bundles when no other folder is given

    @classmethod
    def default(cls) -> Layout:
        """``$FEDNANO_HOME`` or ``~/.cache/fednano``, read now (not at import), so a test or a
        child process that sets the variable later still gets its own home."""
        return cls(Path(os.environ.get(HOME_ENV, DEFAULT_HOME)).expanduser())

    def base(self, version: str) -> Path:
        """The folder of one base version."""
        return self.bases / version

    @property
    def data(self) -> Path:
        """The cloud's own data (database, blobs, broker files) when no data folder is set."""
        return self.home
