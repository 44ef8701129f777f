"""The NanoEdge bundle format: file names, the manifest, the version id, hashing and checks.

A bundle is one flat folder (or a tar of it, ``<bundle_version>/<file>``)::

    encoder_connector.cpu.onnx    pixels (B, 3, S, S) -> visual tokens (B, V, d): the graph
                                  fastest on onnxruntime's CPU provider (int8, u8 activations)
    encoder_connector.tensorrt.onnx   the same graph for TensorRT (int8, zero points of 0);
                                  an fp32 export writes one encoder_connector.onnx for both
    embedder.safetensors          "weight" (vocab, d) float16, or "weight_int8" (vocab, d) int8
                                  + "scale" (vocab,) float32 (one scale per row)
    tokenizer.json                a ``tokenizers`` file (no transformers on the device)
    adapter_config.json           the NanoAdapters' ``AdapterConfig``
    prompt_template.json          the ``PromptTemplate`` devices build prompts with
    selftest.png                  a held-out image at model resolution
    selftest_tokens.safetensors   "tokens" (V, d): its fp32 torch tokens
    manifest.json                 ``BundleManifest``: sha256 + size of every other file, ...

The manifest's ``encoders`` maps each execution-provider target ("cpu", "tensorrt") to its
graph file, with that graph's calibration and its own quality gate; a device opens the graph of
the provider it really runs on (``edge.runtime``). Format 1 bundles (one graph for every
device) are refused with a one-line error that says to re-export them.

``bundle_version`` is the first 16 hex of the sha256 of the canonical JSON of the manifest's
identity (format, base version, precision, model, embedder, encoders, files): the same content
gives the same version, and an edit to a file or to those fields no longer matches it. That is
integrity, not authenticity: whoever can rewrite the manifest can rewrite its version too.

The cloud writes bundles (``cloud.bundle``), the device reads them (``edge.runtime``); both take
the format from here, so the two sides cannot drift apart. Only torch, safetensors, pydantic
and the standard library are imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from shared.files import atomic_writer

BUNDLE_FORMAT: Final = 2
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "encoder_connector.onnx"  # fp32: one graph for every target
EMBEDDER_NAME = "embedder.safetensors"
TOKENIZER_NAME = "tokenizer.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
TEMPLATE_NAME = "prompt_template.json"
SELFTEST_IMAGE_NAME = "selftest.png"
SELFTEST_TOKENS_NAME = "selftest_tokens.safetensors"
SELFTEST_TENSOR = "tokens"  # the tensor in SELFTEST_TOKENS_NAME: (V, d) float32
REQUIRED_FILES = (EMBEDDER_NAME, TOKENIZER_NAME, ADAPTER_CONFIG_NAME, TEMPLATE_NAME)
VERSION_PATTERN = r"^[0-9a-f]{16}$"
# A plain file name: no folders, no "." or "..", no hidden files, no spaces.
FILE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
_CHUNK = 1 << 20

Precision = Literal["int8", "fp32"]
EmbedderDtype = Literal["float16", "int8"]
# int8 activations: "s8-symmetric" runs on TensorRT (zero points must be 0) and everywhere;
# "u8" (asymmetric) is what onnxruntime's x86 CPU kernels fuse fully (faster there).
Activations = Literal["s8-symmetric", "u8"]
# Which execution provider an encoder graph is made for: onnxruntime's CPU kernels, or TensorRT
# (Jetson). Every bundle has a graph for each.
EncoderTarget = Literal["cpu", "tensorrt"]
ENCODER_TARGETS: tuple[EncoderTarget, ...] = ("cpu", "tensorrt")


def encoder_file_name(target: EncoderTarget, precision: Precision) -> str:
    """The graph file of ``target``: one per target for int8, one shared file for fp32."""
    return ONNX_NAME if precision == "fp32" else f"encoder_connector.{target}.onnx"

FileName = Annotated[str, Field(pattern=FILE_NAME_PATTERN)]


class BundleError(RuntimeError):
    """A bundle that cannot be made or used."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, extra, or differs from the manifest (tampered or truncated)."""


class EncoderError(BundleError):
    """The encoder graph failed to run (onnxruntime or OpenVINO raised)."""


# ------------------------------------------------------------------------------- manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRecord(_Strict):
    """sha256 and size of one bundle file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelInfo(_Strict):
    """The exported graph: encoder name, input size, visual tokens V x width d, I/O names."""

    encoder: str
    image_size: int = Field(ge=1)
    n_visual: int = Field(ge=1)
    width: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    input: str
    output: str
    opset: int


class EmbedderInfo(_Strict):
    """How ``embedder.safetensors`` stores the token embedder."""

    dtype: EmbedderDtype


class GateInfo(_Strict):
    """The export's quality gate: cosine of the exported graph vs fp32 torch, held-out images."""

    metric: str
    threshold: float
    mean: float
    min: float
    n_images: int = Field(ge=0)
    n_tokens: int = Field(ge=0)
    passed: bool


class CalibrationInfo(_Strict):
    """How the int8 graph was calibrated (``n_images=0`` and nothing else for fp32)."""

    n_images: int = Field(ge=0)
    source: str | None = None
    method: str | None = None
    format: str | None = None
    per_channel: bool | None = None
    activations: Activations | None = None
    weights: str | None = None


class SelfTestInfo(_Strict):
    """The start-up check: an image and its fp32 tokens (each encoder has its own threshold)."""

    image: FileName = SELFTEST_IMAGE_NAME
    reference: FileName = SELFTEST_TOKENS_NAME


class EncoderVariant(_Strict):
    """One encoder graph file, how it was quantized, and its own quality gate.

    ``self_test_cosine`` is the min token cosine the CPU gave on the self-test image at export;
    the device's self-test must reach ``quality_gate.threshold``.
    """

    file: FileName
    precision: Precision
    calibration: CalibrationInfo
    quality_gate: GateInfo
    self_test_cosine: float


class BundleIdentity(_Strict):
    """What defines a bundle and its version: the format, the base, the graphs and every file."""

    format: Literal[2] = BUNDLE_FORMAT
    base_version: str
    precision: Precision
    model: ModelInfo
    embedder: EmbedderInfo
    encoders: dict[EncoderTarget, EncoderVariant]
    files: dict[FileName, FileRecord]

    @model_validator(mode="after")
    def _every_target(self) -> BundleIdentity:
        missing = [t for t in ENCODER_TARGETS if t not in self.encoders]
        if missing:
            raise ValueError(f"encoders must have a graph for every target, missing {missing}")
        return self

    def version_id(self) -> str:
        """``bundle_version_id`` of these fields."""
        return bundle_version_id(self.model_dump(mode="json"))


class BundleManifest(BundleIdentity):
    """``manifest.json`` of a bundle, validated (unknown fields are errors)."""

    bundle_version: str = Field(pattern=VERSION_PATTERN)
    created_at: str
    self_test: SelfTestInfo = SelfTestInfo()

    @classmethod
    def create(
        cls, identity: BundleIdentity, *, created_at: str,
        self_test: SelfTestInfo = SelfTestInfo(),
    ) -> BundleManifest:
        """The manifest of ``identity``, its ``bundle_version`` derived from it."""
        return cls(**dict(identity), bundle_version=identity.version_id(), created_at=created_at,
                   self_test=self_test)

    def identity(self) -> BundleIdentity:
        """The fields ``bundle_version`` is derived from."""
        return BundleIdentity(**{name: getattr(self, name)
                                 for name in BundleIdentity.model_fields})

    def to_json(self) -> str:
        """Indented JSON with sorted keys, as written to ``manifest.json``."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def bundle_version_id(identity: Mapping[str, Any]) -> str:
    """16 hex of the sha256 of the canonical JSON (sorted keys, no spaces) of ``identity``."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_manifest(folder: Path) -> BundleManifest:
    """Parse and validate ``folder/manifest.json``; ``BundleError`` when absent or invalid.

    A manifest of another bundle format is refused with one line that says what to do.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{folder} is not a NanoEdge bundle: no {MANIFEST_NAME}")
    raw = path.read_bytes()
    _check_format(path, raw)
    try:
        return BundleManifest.model_validate_json(raw)
    except ValidationError as err:
        raise BundleError(f"{path}: invalid bundle manifest: {err}") from err


def _check_format(path: Path, raw: bytes) -> None:
    try:
        found = json.loads(raw).get("format")
    except (ValueError, AttributeError):
        return  # not a JSON object: validation says so
    if isinstance(found, int) and found != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: bundle format {found} is not supported (this version reads format "
            f"{BUNDLE_FORMAT}: one encoder graph per execution provider); re-export the bundle "
            "with `fednano bundle export`")


# -------------------------------------------------------------------------- files + checks


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    """sha256 and size of ``path``."""
    return FileRecord(sha256=sha256_file(path), size=Path(path).stat().st_size)


def file_records(folder: Path) -> dict[str, FileRecord]:
    """A ``FileRecord`` per file of a bundle folder (sorted by name, the manifest excluded)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.name != MANIFEST_NAME)
    folders = [p.name for p in paths if not p.is_file()]
    if folders:
        raise BundleError(f"a bundle is one flat folder of files, got folders {folders}")
    return {p.name: file_record(p) for p in paths}


def verify_file(path: Path, record: FileRecord) -> None:
    """``BundleIntegrityError`` unless ``path`` has the size and sha256 of ``record``."""
    if not path.is_file():
        raise BundleIntegrityError(f"{path} is missing (listed in the bundle manifest)")
    size = path.stat().st_size
    if size != record.size:
        raise BundleIntegrityError(f"{path}: size {size}, manifest says {record.size}")
    if sha256_file(path) != record.sha256:
        raise BundleIntegrityError(f"{path}: sha256 differs from the bundle manifest")


def verify_bundle(folder: Path) -> BundleManifest:
    """Check the manifest against its version id and every file against the manifest.

    Refuses a manifest that does not list the required files, a listed file that is missing
    or differs, and any file in the folder that the manifest does not list.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.identity().version_id() != manifest.bundle_version:
        raise BundleIntegrityError(
            f"{folder}: manifest content does not match bundle version {manifest.bundle_version}")
    needed = {*REQUIRED_FILES, manifest.self_test.image, manifest.self_test.reference,
              *(variant.file for variant in manifest.encoders.values())}
    missing = sorted(needed - set(manifest.files))
    if missing:
        raise BundleIntegrityError(f"{folder}: manifest lists no {missing}")
    present = {p.name for p in folder.iterdir()} - {MANIFEST_NAME}
    extra = sorted(present - set(manifest.files))
    if extra:
        raise BundleIntegrityError(f"{folder}: files not in the manifest: {extra}")
    for name, record in manifest.files.items():
        verify_file(folder / name, record)
    return manifest


# ------------------------------------------------------------------------------- embedder


def save_embedder(embedder: nn.Embedding, path: Path, dtype: EmbedderDtype) -> None:
    """float16 ``weight``, or int8 ``weight_int8`` with one float32 ``scale`` per row."""
    weight = embedder.weight.detach().float()  # (vocab, d)
    if dtype == "float16":
        save_file({"weight": weight.half().contiguous()}, str(path))
        return
    if dtype != "int8":
        raise ValueError(f"embedder dtype must be 'float16' or 'int8', got {dtype!r}")
    scale = weight.abs().amax(dim=1) / 127.0  # (vocab,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (vocab, d)
    save_file({"weight_int8": q.contiguous(), "scale": scale.contiguous()}, str(path))


def load_embedder(path: Path, dtype: str) -> nn.Embedding:
    """The frozen token embedder as float32 (int8 rows are dequantized with their scales)."""
    if dtype not in ("float16", "int8"):
        raise ValueError(f"embedder dtype must be 'float16' or 'int8', got {dtype!r}")
    tensors = load_file(str(path))
    expected = {"weight"} if dtype == "float16" else {"weight_int8", "scale"}
    if set(tensors) != expected:
        raise BundleError(f"{path}: a {dtype} embedder holds {sorted(expected)}, "
                          f"got {sorted(tensors)}")
    if dtype == "float16":
        weight = tensors["weight"].float()  # (vocab, d)
    else:
        weight = tensors["weight_int8"].float() * tensors["scale"].float()[:, None]
    return nn.Embedding.from_pretrained(weight, freeze=True)


# -------------------------------------------------------------------------------- archive


def write_archive(folder: Path, path: Path) -> Path:
    """A flat, uncompressed tar ``<folder name>/<file>`` of a bundle, written atomically."""
    with atomic_writer(path, prefix=f".{path.name}.", suffix=".tmp", mode=0o644) as handle, \
            tarfile.open(fileobj=handle, mode="w") as tar:
        for file in sorted(Path(folder).iterdir()):
            tar.addfile(_tar_info(file), io.BytesIO(file.read_bytes()))
    return path


def _tar_info(file: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"{file.parent.name}/{file.name}")
    info.size = file.stat().st_size
    info.mode = 0o644
    info.mtime = int(file.stat().st_mtime)
    return info


def unpack_bundle(archive: Path, dest: Path) -> Path:
    """Extract a bundle tar (one flat folder of regular files) into ``dest``; returns it.

    Refuses links, nested paths and anything but regular files, and verifies the result;
    extraction goes through a temp folder, so a bad archive leaves nothing behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
    try:
        _extract_all(Path(archive), tmp)
        verify_bundle(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract_all(archive: Path, folder: Path) -> None:
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar.getmembers():
                _extract_member(tar, member, folder)
    except tarfile.TarError as err:
        raise BundleError(f"{archive}: not a bundle archive (plain tar): {err}") from err


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, folder: Path) -> None:
    parts = Path(member.name).parts
    if not member.isfile() or len(parts) != 2 or parts[1] in ("", ".", ".."):
        raise BundleError(f"unexpected entry in bundle archive, got {member.name!r}")
    source = tar.extractfile(member)
    if source is None:
        raise BundleError(f"cannot read {member.name!r} from the bundle archive")
    with source, open(folder / parts[1], "wb") as target:
        shutil.copyfileobj(source, target)
