from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cloud.base.manifest import (
    BaseIntegrityError,
    BaseManifest,
    BaseNotBuiltError,
    adapter_for_rank,
    file_record,
    read_current,
    read_manifest,
    sha256_file,
    swap_in_dir,
    verify_record,
    version_id,
    write_current,
    write_json,
)
from tests.recorded_base import RECORDED, RECORDED_VERSION


def test_sha256_and_file_record(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "w.bin"
    path.parent.mkdir()
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    record = file_record(path, tmp_path)
    assert record["path"] == "sub/w.bin" and record["size"] == 3_000_000
    assert file_record(path)["path"] == str(path)


def test_verify_record_fast_path_and_tampering(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abcd")
    record = file_record(path, tmp_path)
    verify_record(record, tmp_path)
    path.write_bytes(b"abce")  # same size, new content
    os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"]))
    verify_record(record, tmp_path, full=False)  # size + mtime shortcut accepts it, by design
    with pytest.raises(BaseIntegrityError, match="sha256"):
        verify_record(record, tmp_path)
    os.utime(path)  # a changed mtime makes even the fast path hash the file
    with pytest.raises(BaseIntegrityError, match="sha256"):
        verify_record(record, tmp_path, full=False)
    path.write_bytes(b"abcdef")
    with pytest.raises(BaseIntegrityError, match="size"):
        verify_record(record, tmp_path, full=False)
    path.unlink()
    with pytest.raises(BaseIntegrityError, match="missing"):
        verify_record(record, tmp_path)


def test_version_id_is_canonical() -> None:
    a = version_id({"x": 1, "y": [1, 2]})
    assert a == version_id({"y": [1, 2], "x": 1})
    assert a != version_id({"x": 2, "y": [1, 2]})
    assert len(a) == 16


def test_a_manifest_without_an_adapter_record_keeps_its_version() -> None:
    manifest = BaseManifest.model_validate(RECORDED)
    assert manifest.adapter == adapter_for_rank(8) == manifest.adapter.__class__()
    assert version_id(manifest.identity()) == RECORDED_VERSION == manifest.version
    assert manifest.model_dump(mode="json") == {**RECORDED, "adapter": {
        "rank": 8, "alpha": 16.0, "dropout": 0.0}}  # nothing else added or lost


def test_another_adapter_gives_another_version() -> None:
    manifest = BaseManifest.model_validate({**RECORDED, "adapter": {"rank": 4, "alpha": 8.0}})
    assert version_id(manifest.identity()) != RECORDED_VERSION
    assert manifest.identity()["adapter"]["rank"] == 4


def test_an_invalid_manifest_is_an_integrity_error(tmp_path: Path) -> None:
    write_json(tmp_path / "base" / "v1" / "manifest.json", {"version": "v1"})
    write_current(tmp_path, "v1")
    with pytest.raises(BaseIntegrityError, match=r"not a valid base manifest \(format: Field"):
        read_manifest(tmp_path)
    (tmp_path / "base" / "v1" / "manifest.json").write_text("[]")
    with pytest.raises(BaseIntegrityError, match="must hold a JSON object"):
        read_manifest(tmp_path)


def test_current_pointer(tmp_path: Path) -> None:
    assert read_current(tmp_path) is None
    with pytest.raises(BaseNotBuiltError, match="fednano base build"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="no built base version"):
        write_current(tmp_path, "v1")
    for version in ("v1", "v2"):
        write_json(tmp_path / "base" / version / "manifest.json", {**RECORDED, "version": version})
    write_current(tmp_path, "v1")
    write_current(tmp_path, "v2")
    assert read_current(tmp_path) == "v2"
    assert read_manifest(tmp_path).version == "v2"
    assert read_manifest(tmp_path, "v1").version == "v1"
    with pytest.raises(BaseNotBuiltError, match="'v3' not found"):
        read_manifest(tmp_path, "v3")
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["current", "v1", "v2"]


def test_swap_in_dir_replaces_a_folder(tmp_path: Path) -> None:
    old, new = tmp_path / "final", tmp_path / ".tmp"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    swap_in_dir(new, old)
    assert (old / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_published_files_are_world_readable(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    tmp = tmp_path / ".tmp"
    tmp.mkdir(mode=0o700)
    swap_in_dir(tmp, tmp_path / "final")
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755
