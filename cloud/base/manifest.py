"""Content hashes, the base manifest and the ``current`` pointer.

A base version lives in ``home/base/<version>/`` (``connector.safetensors`` + ``manifest.json``);
its id is derived from content hashes, so the same inputs give the same id. ``home/base/current``
is a one-line text file naming the version in use, replaced atomically.

``BaseManifest`` is the manifest's schema. Its ``identity()`` (config, file hashes, alignment
settings) is what the version id hashes; the rest (alignment results, timings, where the LLM
came from) is a record. The NanoAdapters' ``AdapterConfig`` is recorded too, so every service
that trains or serves adapters for this base agrees on their rank; it joins the identity only
when it is not the default, so the versions of bases built before it was recorded stay valid
(a manifest without it reads as the default).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from cloud.layout import Layout
from shared.adapters import AdapterConfig
from shared.bundle import bundle_version_id, sha256_file
from shared.files import atomic_write
from shared.prompts import PromptTemplate

MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "current"
# mkstemp/mkdtemp create 0600/0700 entries; published files get ordinary permissions.
FILE_MODE = 0o644
DIR_MODE = 0o755


class BaseNotBuiltError(FileNotFoundError):
    """No base (or not the requested version) under the FedNano home."""


class BaseIntegrityError(RuntimeError):
    """A file of a built base no longer matches the manifest."""


class AdapterMismatchError(ValueError):
    """An adapter rank asked for that the base does not record (its services would disagree)."""


def adapter_for_rank(rank: int) -> AdapterConfig:
    """The NanoAdapters' config of a given rank: alpha = 2 x rank (the scaling stays 2), so
    the default rank 8 gives ``AdapterConfig()``."""
    return AdapterConfig(rank=rank, alpha=2.0 * rank)


def require_rank(adapter: AdapterConfig, rank: int | None, version: str) -> AdapterConfig:
    """``adapter`` (the base's), after refusing an explicit ``rank`` that differs from it."""
    if rank is not None and rank != adapter.rank:
        raise AdapterMismatchError(
            f"base {version} records NanoAdapter rank {adapter.rank}, not {rank}: drop --rank, "
            f"or build a base of rank {rank} with `fednano base build --rank {rank}`")
    return adapter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoredFile(_Strict):
    """A file of the base as ``file_record`` writes it: path, sha256, size, mtime."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    mtime_ns: int | None = None

    def record(self) -> dict[str, Any]:
        """The plain record ``verify_record`` checks."""
        return self.model_dump()


class BaseFiles(_Strict):
    """The connector (relative to its version folder), the encoder weights (absolute: a
    package file) and the LLM cache (relative to home when inside it)."""

    connector: StoredFile
    encoder_weights: StoredFile
    llm: list[StoredFile]

    def hashes(self) -> dict[str, Any]:
        """What the version id takes from the files: their content, not where they are."""
        return {"connector": self.connector.sha256,
                "encoder_weights": self.encoder_weights.sha256,
                "llm": sorted(r.sha256 for r in self.llm)}


class BaseConfig(_Strict):
    """The frozen parts' shapes and names, the devices' prompt and the feature store."""

    encoder: str
    llm: str
    grid: PositiveInt
    n_visual: PositiveInt
    in_channels: PositiveInt
    width: PositiveInt
    hidden: PositiveInt
    vqa_template: PromptTemplate
    features_dir: str


class BaseManifest(_Strict):
    """``manifest.json`` of a base version."""

    format: int
    version: str
    created_at: str
    config: BaseConfig
    files: BaseFiles
    alignment: dict[str, Any]  # "settings" (part of the identity) and the loss record
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    llm_source: dict[str, Any] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)

    def verify(self, home: Path, *, encoder_weights: Path | None = None,
               full: bool = False) -> None:
        """Raise ``BaseIntegrityError`` if a file of the base differs from this manifest.

        Connector and encoder weights are always hashed (``encoder_weights``: the weights file
        in use, default the recorded path, so a reinstalled package elsewhere still verifies);
        the LLM files are hashed only when their size or mtime changed, unless ``full=True``.
        """
        verify_record(self.files.connector.record(), Layout(home).base(self.version))
        verify_record(self.files.encoder_weights.record(), path=encoder_weights)
        for stored in self.files.llm:
            verify_record(stored.record(), home, full=full)

    def content_version(self) -> str:
        """The version id this manifest's content gives (``version`` once written)."""
        return version_id(self.identity())

    def identity(self) -> dict[str, Any]:
        """What defines the base (``version_id`` hashes it): unchanged for a default adapter."""
        identity = {"config": self.config.model_dump(mode="json"),
                    "files": self.files.hashes(),
                    "alignment": self.alignment["settings"]}
        if self.adapter != AdapterConfig():
            identity["adapter"] = self.adapter.model_dump(mode="json")
        return identity


def file_record(path: Path, root: Path | None = None) -> dict[str, Any]:
    """``{path, sha256, size, mtime_ns}``; ``path`` relative to ``root`` when given."""
    stat = path.stat()
    name = path.relative_to(root).as_posix() if root is not None else str(path)
    return {"path": name, "sha256": sha256_file(path), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def directory_records(directory: Path, root: Path) -> list[dict[str, Any]]:
    """A ``file_record`` for every file under ``directory`` (sorted, paths relative to ``root``)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return [file_record(p, root) for p in files]


def verify_record(
    record: dict[str, Any], root: Path | None = None, *, full: bool = True,
    path: Path | None = None,
) -> None:
    """Raise ``BaseIntegrityError`` unless the file still matches ``record``.

    ``full=False`` accepts an unchanged size + mtime without hashing (the fast path for the
    500 MB LLM cache); any other change falls back to comparing the sha256. ``path`` checks
    another file (e.g. the same package file installed elsewhere) against the record.
    """
    if path is None:
        path = Path(record["path"]) if root is None else root / record["path"]
    if not path.is_file():
        raise BaseIntegrityError(f"{path} is missing (recorded in the base manifest)")
    stat = path.stat()
    if stat.st_size != record["size"]:
        raise BaseIntegrityError(f"{path}: size {stat.st_size}, manifest says {record['size']}")
    if not full and stat.st_mtime_ns == record.get("mtime_ns"):
        return
    if sha256_file(path) != record["sha256"]:
        raise BaseIntegrityError(f"{path}: sha256 differs from the base manifest")


def version_id(content: dict[str, Any]) -> str:
    """A short id (16 hex) from the canonical JSON of what defines the base (the rule a
    bundle's version follows too)."""
    return bundle_version_id(content)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"), prefix=f".{path.name}.", suffix=".tmp",
                 mode=FILE_MODE)


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` with renames only.

    An existing ``final`` is renamed aside first and deleted after, so a crash leaves either
    the old or the new folder at ``final`` (or the old one aside), never a half-written one.
    """
    tmp.chmod(DIR_MODE)
    if final.exists():
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        tmp.rename(final)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_current(home: Path, version: str) -> None:
    """Point ``home/base/current`` at ``version`` (atomic replace)."""
    bases = Layout(home).bases
    if not (bases / version / MANIFEST_NAME).is_file():
        raise ValueError(f"no built base version {version!r} under {bases}")
    atomic_write_text(bases / CURRENT_NAME, version + "\n")


def read_current(home: Path) -> str | None:
    """The version ``current`` names, or None when nothing has been built."""
    path = Layout(home).bases / CURRENT_NAME
    if not path.is_file():
        return None
    version = path.read_text(encoding="utf-8").strip()
    return version or None


def read_manifest(home: Path, version: str | None = None) -> BaseManifest:
    """The manifest of ``version`` (default: current); ``BaseNotBuiltError`` if there is none,
    ``BaseIntegrityError`` if it is not a valid manifest."""
    chosen = version or read_current(home)
    if chosen is None:
        raise BaseNotBuiltError(
            f"no FedNano base is built under {home}: run `fednano base build` first"
        )
    path = Layout(home).base(chosen) / MANIFEST_NAME
    if not path.is_file():
        raise BaseNotBuiltError(
            f"base version {chosen!r} not found under {Layout(home).bases}: "
            "run `fednano base build` (or pick a built version)"
        )
    try:
        return BaseManifest.model_validate(read_json(path))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise BaseIntegrityError(f"{path} is not a valid base manifest ({where}: "
                                 f"{first['msg']})") from err
    except ValueError as err:  # not JSON, or not an object
        raise BaseIntegrityError(f"{path} is not a valid base manifest ({err})") from err
