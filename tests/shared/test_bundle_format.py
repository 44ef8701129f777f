"""shared.bundle: the manifest schema, the version id, file checks, embedder and tar layout.

No ONNX here: a bundle folder of placeholder bytes is enough to exercise the format; the
export -> load round trip on real graphs is tests/cloud/test_bundle_export.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from shared.bundle import (
    EMBEDDER_NAME,
    MANIFEST_NAME,
    REQUIRED_FILES,
    SELFTEST_IMAGE_NAME,
    SELFTEST_TOKENS_NAME,
    BundleError,
    BundleIdentity,
    BundleIntegrityError,
    BundleManifest,
    CalibrationInfo,
    EmbedderInfo,
    EncoderVariant,
    GateInfo,
    ModelInfo,
    bundle_version_id,
    encoder_file_name,
    file_record,
    file_records,
    load_embedder,
    save_embedder,
    unpack_bundle,
    verify_bundle,
    write_archive,
)

MODEL = ModelInfo(encoder="tiny", image_size=32, n_visual=4, width=16, vocab_size=8,
                  input="pixels", output="visual_tokens", opset=18)
CPU_GRAPH = encoder_file_name("cpu", "int8")
TRT_GRAPH = encoder_file_name("tensorrt", "int8")


def _variant(file: str, activations: Any) -> EncoderVariant:
    return EncoderVariant(
        file=file, precision="int8",
        calibration=CalibrationInfo(n_images=8, source="test", activations=activations),
        quality_gate=GateInfo(metric="cosine", threshold=0.97, mean=0.99, min=0.98, n_images=2,
                              n_tokens=8, passed=True),
        self_test_cosine=0.99)


ENCODERS = {"cpu": _variant(CPU_GRAPH, "u8"), "tensorrt": _variant(TRT_GRAPH, "s8-symmetric")}


def _write_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*REQUIRED_FILES, CPU_GRAPH, TRT_GRAPH, SELFTEST_IMAGE_NAME,
                 SELFTEST_TOKENS_NAME):
        (folder / name).write_bytes(f"placeholder {name}".encode())


def _manifest(folder: Path, **identity: Any) -> BundleManifest:
    fields: dict[str, Any] = {"base_version": "tinybase", "precision": "int8", "model": MODEL,
                              "embedder": EmbedderInfo(dtype="float16"), "encoders": ENCODERS,
                              "files": file_records(folder), **identity}
    return BundleManifest.create(BundleIdentity(**fields),
                                 created_at="2026-01-01T00:00:00+00:00")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "b"
    _write_files(folder)
    (folder / MANIFEST_NAME).write_text(_manifest(folder).to_json())
    return folder


def test_manifest_round_trips_and_verifies(bundle: Path) -> None:
    manifest = verify_bundle(bundle)
    assert manifest == BundleManifest.model_validate_json(manifest.to_json())
    assert manifest.bundle_version == manifest.identity().version_id()
    assert set(manifest.files) == {*REQUIRED_FILES, CPU_GRAPH, TRT_GRAPH, SELFTEST_IMAGE_NAME,
                                   SELFTEST_TOKENS_NAME}
    assert manifest.files[CPU_GRAPH] == file_record(bundle / CPU_GRAPH)
    assert manifest.encoders["cpu"].file == CPU_GRAPH
    assert manifest.encoders["tensorrt"].calibration.activations == "s8-symmetric"


def test_version_id_is_canonical_and_pinned() -> None:
    assert bundle_version_id({"b": 1, "a": [1, 2]}) == bundle_version_id({"a": [1, 2], "b": 1})
    # Pinned: devices verify bundles exported by older clouds, so the hashing must not drift.
    identity = BundleIdentity(base_version="tinybase", precision="int8", model=MODEL,
                              embedder=EmbedderInfo(dtype="float16"), encoders=ENCODERS,
                              files={CPU_GRAPH: {"sha256": "0" * 64, "size": 3}})
    assert identity.model_dump(mode="json") == {
        "format": 2, "base_version": "tinybase", "precision": "int8",
        "model": MODEL.model_dump(), "embedder": {"dtype": "float16"},
        "encoders": {t: v.model_dump(mode="json") for t, v in ENCODERS.items()},
        "files": {CPU_GRAPH: {"sha256": "0" * 64, "size": 3}},
    }
    assert identity.version_id() == "d9609972ec7e218d"


def test_version_follows_content(bundle: Path) -> None:
    first = _manifest(bundle)
    assert _manifest(bundle).bundle_version == first.bundle_version  # same content, same id
    assert _manifest(bundle, precision="fp32").bundle_version != first.bundle_version
    (bundle / CPU_GRAPH).write_bytes(b"another graph")
    assert _manifest(bundle).bundle_version != first.bundle_version


@pytest.mark.parametrize("edit", ["unknown_field", "nested_unknown", "bad_file_name",
                                  "bad_version", "bad_precision"])
def test_manifest_schema_is_strict(bundle: Path, edit: str) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    if edit == "unknown_field":
        data["surprise"] = 1
    elif edit == "nested_unknown":
        data["model"]["layers"] = 3
    elif edit == "bad_file_name":
        data["files"]["../escape"] = data["files"][CPU_GRAPH]
    elif edit == "bad_version":
        data["bundle_version"] = "NOT-HEX"
    else:
        data["precision"] = "int4"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="invalid bundle manifest"):
        verify_bundle(bundle)


def test_every_target_needs_a_graph(bundle: Path) -> None:
    with pytest.raises(ValueError, match=r"missing \['tensorrt'\]"):
        _manifest(bundle, encoders={"cpu": ENCODERS["cpu"]})
    with pytest.raises(ValueError, match="encoders"):
        _manifest(bundle, encoders={**ENCODERS, "gpu": ENCODERS["cpu"]})


def test_other_formats_are_refused_in_one_line(bundle: Path) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key in ("encoders",):
        data.pop(key)
    data.update(format=1, quality_gate={}, calibration={})  # a format 1 manifest's shape
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    message = str(err.value)
    assert "bundle format 1 is not supported" in message and "fednano bundle export" in message
    assert "\n" not in message


def test_integrity_failures(bundle: Path) -> None:
    (bundle / EMBEDDER_NAME).write_bytes(b"swapped")
    with pytest.raises(BundleIntegrityError, match="size"):
        verify_bundle(bundle)
    (bundle / EMBEDDER_NAME).write_bytes(b"placeholder embedder.safetensorX")  # same size
    with pytest.raises(BundleIntegrityError, match="sha256"):
        verify_bundle(bundle)


def test_listing_must_be_exact(bundle: Path) -> None:
    (bundle / "extra").mkdir()
    with pytest.raises(BundleIntegrityError, match="not in the manifest"):
        verify_bundle(bundle)
    (bundle / "extra").rmdir()
    (bundle / TRT_GRAPH).unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        verify_bundle(bundle)
    unlisted = _manifest(bundle)  # a manifest written without the TensorRT graph
    (bundle / MANIFEST_NAME).write_text(unlisted.to_json())
    with pytest.raises(BundleIntegrityError, match="lists no"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="not a NanoEdge bundle"):
        verify_bundle(bundle.parent / "nothing")


def test_file_records_refuse_folders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(BundleError, match="flat folder"):
        file_records(tmp_path)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_embedder_round_trip(tmp_path: Path, dtype: str) -> None:
    torch.manual_seed(0)
    embedder = nn.Embedding(10, 6)
    with torch.no_grad():
        embedder.weight[3] = 0  # an all-zero row keeps a usable scale
    save_embedder(embedder, tmp_path / "e.safetensors", dtype)  # type: ignore[arg-type]
    loaded = load_embedder(tmp_path / "e.safetensors", dtype)
    error = (loaded.weight - embedder.weight).abs().amax(dim=1)  # (vocab,)
    bound = embedder.weight.abs().amax(dim=1) / (127 * 2) if dtype == "int8" else 1e-3
    assert bool((error <= bound + 1e-6).all()) and not loaded.weight.requires_grad
    assert bool((loaded.weight[3] == 0).all())


def test_embedder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 'bf16'"):
        save_embedder(nn.Embedding(2, 2), tmp_path / "e", "bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'bf16'"):
        load_embedder(tmp_path / "e", "bf16")
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "e"))
    with pytest.raises(BundleError, match="int8 embedder holds"):
        load_embedder(tmp_path / "e", "int8")


def test_archive_round_trip(bundle: Path, tmp_path: Path) -> None:
    archive = write_archive(bundle, tmp_path / "b.tar")
    with tarfile.open(archive) as tar:
        assert all(name.startswith("b/") for name in tar.getnames())
    dest = unpack_bundle(archive, tmp_path / "device" / "bundle")
    assert verify_bundle(dest) == verify_bundle(bundle)
    again = unpack_bundle(archive, dest)  # replacing an existing copy
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in bundle.iterdir())


def test_unpack_refuses_links_and_non_archives(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("b/manifest.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleError, match="unexpected entry"):
        unpack_bundle(archive, tmp_path / "dest")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(BundleError, match="not a bundle archive"):
        unpack_bundle(tmp_path / "junk.tar", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
