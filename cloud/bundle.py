"""Export the NanoEdge bundle: what a device needs of the frozen base, checked and versioned.

``export_bundle(base, out_dir, ...)`` writes ``out_dir/<bundle_version>/``: the files, the
manifest and the version id of ``shared.bundle`` (the format both sides import). It holds one
encoder + connector graph per execution-provider target (``encoder_connector.cpu.onnx``,
``encoder_connector.tensorrt.onnx``; one ``encoder_connector.onnx`` for fp32), each with a
dynamic batch, int8 static QDQ with per-channel weights.

Steps: export encoder + connector with ``torch.onnx.export`` (dynamo), or with the parts' own
``export_graph`` (Hugging Face vision towers through optimum: ``cloud.bundle_hf``) -> per
target, quantize with onnxruntime's ``quantize_static`` by that target's ``QuantRecipe`` on the
calibration images -> that graph's quality gate: cosine of its tokens vs fp32 torch on held-out
images -> the other files -> manifest.
Everything is written in a temp folder inside ``out_dir`` and renamed into place at the end, so
a failed gate (``QualityGateError``) or a crash leaves nothing that looks like a bundle.

Calibration and held-out images must be public and disjoint from every device's data:
``public_images`` takes them from the base's reserved alignment images (easy-VQA) plus
scikit-learn's two sample photos.

The recipes (``RECIPES``): the CPU graph has asymmetric uint8 activations, which onnxruntime's
x86 CPU kernels fuse fully (faster than fp32 there, see docs/bundle.md) but TensorRT refuses;
the TensorRT graph has int8 activations with zero points of 0, the only QDQ form TensorRT (the
Jetson provider) runs, and slower than fp32 on onnxruntime's x86 CPU kernels.

Machine independence: on x86 CPUs without VNNI onnxruntime multiplies uint8 by int8 with
``vpmaddubsw``, whose 16-bit pairwise sums saturate; the CPU graph therefore has 7-bit weights
(``reduce_range``), which cannot saturate and give the same tokens with or without VNNI. The
TensorRT graph is gated by its QDQ arithmetic (``GATE_FUSED``), not by the exporting CPU's
kernels, so its gate does not depend on which machine exports it either.

The device side is ``edge.runtime`` (a round-trip test loads every exported bundle with it).
``export_from_home`` is what ``fednano bundle export`` and ``python -m cloud.bundle`` run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from cloud.base.manifest import atomic_write_text, swap_in_dir, write_json
from shared.adapters import AdapterConfig
from shared.bundle import (
    ADAPTER_CONFIG_NAME,
    EMBEDDER_NAME,
    ENCODER_TARGETS,
    MANIFEST_NAME,
    SELFTEST_IMAGE_NAME,
    SELFTEST_TENSOR,
    SELFTEST_TOKENS_NAME,
    TEMPLATE_NAME,
    TOKENIZER_NAME,
    Activations,
    BundleError,
    BundleIdentity,
    BundleManifest,
    CalibrationInfo,
    EmbedderDtype,
    EmbedderInfo,
    EncoderTarget,
    EncoderVariant,
    GateInfo,
    ModelInfo,
    Precision,
    encoder_file_name,
    file_records,
    save_embedder,
    write_archive,
)
from shared.prompts import PromptTemplate
from shared.vision import IMAGE_SIZE, preprocess

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from cloud.base.build import LoadedBase
    from shared.data.base import VQATask

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAME = "visual_tokens"
OPSET = 18
CPU_PROVIDERS = ["CPUExecutionProvider"]


class QualityGateError(BundleError):
    """An exported encoder graph is too far from fp32 torch; nothing was published."""

    def __init__(self, gate: GateResult, target: str = "") -> None:
        self.gate = gate
        self.target = target
        graph = f" of the {target} graph" if target else ""
        super().__init__(
            f"quality gate{graph} failed: cosine to fp32 on {gate.n_images} held-out images "
            f"mean {gate.mean:.4f}, min {gate.min:.4f} < threshold {gate.threshold:.4f}; "
            "bundle not published"
        )


@dataclass(frozen=True)
class GateResult:
    """Cosine similarity per visual token of the exported encoder vs fp32 torch."""

    threshold: float
    mean: float
    min: float
    n_images: int
    n_tokens: int
    fused: bool = True  # onnxruntime's fused CPU kernels (else the unfused QDQ arithmetic)

    @property
    def passed(self) -> bool:
        return self.min >= self.threshold

    def info(self) -> GateInfo:
        """The manifest's ``quality_gate`` record."""
        how = ("onnxruntime CPU, fused int8 kernels" if self.fused
               else "QDQ arithmetic, onnxruntime unfused")
        return GateInfo(metric=f"cosine per visual token vs fp32 torch ({how})",
                        threshold=self.threshold,
                        mean=round(self.mean, 6), min=round(self.min, 6),
                        n_images=self.n_images, n_tokens=self.n_tokens, passed=self.passed)


@dataclass
class BundleParts:
    """What a bundle is made of, however the base was loaded (tests pass tiny models)."""

    encoder: nn.Module  # (B, 3, S, S) -> (B, C, H, W), frozen
    connector: nn.Module  # (B, C, H, W) -> (B, V, d), frozen
    embedder: nn.Embedding  # (vocab, d)
    tokenizer_json: str  # a ``tokenizers.Tokenizer`` serialised with ``to_str()``
    template: PromptTemplate
    adapter_config: AdapterConfig
    base_version: str
    encoder_name: str = "encoder"
    image_size: int = IMAGE_SIZE
    # Writes the fp32 graph pixels -> visual tokens to the given path; None: torch.onnx.export
    # of ``EncoderConnector(encoder, connector)``. Hugging Face towers go through optimum
    # (``cloud.bundle_hf``); ``encoder`` and ``connector`` stay the fp32 reference of the gate.
    export_graph: Callable[[Path], Path] | None = None
    # Op types to quantize (their inputs get QDQ); None: every op onnxruntime's quantizer knows.
    quantize_ops: tuple[str, ...] | None = None


CalibrationMethod = Literal["MinMax", "Percentile", "Entropy"]


@dataclass(frozen=True)
class QuantRecipe:
    """How one target's int8 graph is made (static QDQ, symmetric int8 weights)."""

    activations: Activations
    method: CalibrationMethod = "MinMax"
    per_channel: bool = True  # weight scales per output channel (else one per tensor)
    reduce_range: bool = False  # 7-bit weights: no u8 x s8 saturation on x86 without VNNI


# Measured on the real base (docs/bundle.md, benchmarks/encoder_int8.py): per target, the
# recipe that is fastest on its provider among those that pass the gate.
RECIPES: dict[EncoderTarget, QuantRecipe] = {
    # u8 activations: onnxruntime's x86 kernels fuse the whole graph into QLinearConv; 7-bit
    # weights so that those kernels cannot saturate on CPUs without VNNI (module doc).
    "cpu": QuantRecipe(activations="u8", reduce_range=True),
    # zero points of 0: the only QDQ form TensorRT builds engines from.
    "tensorrt": QuantRecipe(activations="s8-symmetric"),
}

# How each target's gate runs its graph on the exporting machine. The CPU graph as CPU devices
# run it: onnxruntime with its fused int8 kernels. The TensorRT graph by the QDQ graph's own
# arithmetic (graph optimizations off: DequantizeLinear -> float op -> QuantizeLinear), which
# is what TensorRT computes with int32 accumulators; the exporter has no TensorRT, and the
# CPU's fused kernels (which saturate without VNNI) are not what it runs.
GATE_FUSED: dict[EncoderTarget, bool] = {"cpu": True, "tensorrt": False}


def _gate_fused(target: EncoderTarget, precision: Precision) -> bool:
    """An fp32 graph has no QDQ arithmetic: one session, the fused one, for every target."""
    return precision == "fp32" or GATE_FUSED[target]


@dataclass(frozen=True)
class ExportOptions:
    """How to export: precision, gates, embedder storage, calibration and output details.

    ``min_cosine`` is every graph's gate unless ``tensorrt_min_cosine`` sets the TensorRT
    graph's own.
    """

    precision: Precision = "int8"
    min_cosine: float = 0.97
    tensorrt_min_cosine: float | None = None
    embedder_dtype: EmbedderDtype = "float16"
    recipes: Mapping[EncoderTarget, QuantRecipe] = dataclasses.field(
        default_factory=lambda: dict(RECIPES))
    batch_size: int = 8  # calibration and gate batches
    archive: bool = False  # also write out_dir/<version>.tar
    progress: bool = True
    calibration_source: str = "caller-provided public images"

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp32"):
            raise ValueError(f"precision must be 'int8' or 'fp32', got {self.precision!r}")
        if self.embedder_dtype not in ("float16", "int8"):
            raise ValueError(
                f"embedder_dtype must be 'float16' or 'int8', got {self.embedder_dtype!r}")
        if set(self.recipes) != set(ENCODER_TARGETS):
            raise ValueError(f"recipes must cover {list(ENCODER_TARGETS)}, got "
                             f"{sorted(self.recipes)}")
        for name in ("min_cosine", "tensorrt_min_cosine"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")

    def threshold(self, target: EncoderTarget) -> float:
        """The quality gate of ``target``'s graph."""
        if target == "tensorrt" and self.tensorrt_min_cosine is not None:
            return self.tensorrt_min_cosine
        return self.min_cosine


# ------------------------------------------------------------------------------ entry points


def export_bundle(
    base: LoadedBase,
    out_dir: Path,
    *,
    calibration_images: Sequence[Image.Image],
    holdout_images: Sequence[Image.Image],
    precision: Precision = "int8",
    min_cosine: float = 0.97,
    tensorrt_min_cosine: float | None = None,
    embedder_dtype: EmbedderDtype = "float16",
    archive: bool = False,
    progress: bool = True,
    calibration_source: str = "caller-provided public images",
) -> Path:
    """Export ``base`` as a device bundle under ``out_dir``; returns ``out_dir/<version>``.

    Raises ``QualityGateError`` (and writes nothing final) when an exported encoder graph's
    minimum per-token cosine to fp32 torch on ``holdout_images`` is below its gate.
    """
    options = ExportOptions(precision=precision, min_cosine=min_cosine,
                            tensorrt_min_cosine=tensorrt_min_cosine,
                            embedder_dtype=embedder_dtype, archive=archive, progress=progress,
                            calibration_source=calibration_source)
    return export_parts(parts_from_base(base), out_dir, calibration_images=calibration_images,
                        holdout_images=holdout_images, options=options)


def parts_from_base(base: LoadedBase) -> BundleParts:
    """The frozen device-side parts of a loaded base (encoder, connector, embedder, ...)."""
    encoder = base.edge.encoder
    if encoder is None:
        raise ValueError("the base's NanoEdge has no encoder attached; load it with its encoder")
    return BundleParts(
        encoder=encoder, connector=base.connector, embedder=base.edge.embedder,
        tokenizer_json=tokenizer_json(base.pretrained.tokenizer), template=base.template,
        adapter_config=base.edge.adapters.config, base_version=base.version,
        encoder_name=base.pretrained.encoder_name,
    )


def export_parts(
    parts: BundleParts,
    out_dir: Path,
    *,
    calibration_images: Sequence[Image.Image],
    holdout_images: Sequence[Image.Image],
    options: ExportOptions = ExportOptions(),
) -> Path:
    """``export_bundle`` on explicit parts; see the module docstring for the layout."""
    _check_images(calibration_images, holdout_images, options.precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".build-"))
    try:
        with tempfile.TemporaryDirectory(prefix="fednano-onnx-") as work:
            graphs = _write_encoders(parts, Path(work), staging, calibration_images,
                                     holdout_images, options)
        manifest = _write_rest(parts, staging, holdout_images[0], graphs, options)
        final = out_dir / manifest.bundle_version
        swap_in_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if options.archive:
        write_archive(final, out_dir / f"{final.name}.tar")
    log.info("bundle %s written to %s (%s)", final.name, final, "; ".join(
        f"{target} gate mean {g.gate.mean:.4f}, min {g.gate.min:.4f}"
        for target, g in graphs.items()))
    return final


def public_images(
    task: VQATask, *, n_calibration: int = 64, n_holdout: int = 32, photos: bool = True,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """Calibration and held-out images, disjoint, from the task's reserved alignment images.

    The alignment images are public and kept out of every device's data. ``photos`` adds
    scikit-learn's two sample photos (natural images) to the held-out set when installed.
    """
    keys = [key for key, _ in task.align]
    if n_calibration < 1 or n_holdout < 1 or n_calibration + n_holdout > len(keys):
        raise ValueError(f"need 1..{len(keys)} alignment images in all, got "
                         f"n_calibration={n_calibration!r}, n_holdout={n_holdout!r}")
    load = task.load_image
    calibration = [load(key) for key in keys[:n_calibration]]
    holdout = [load(key) for key in keys[n_calibration:n_calibration + n_holdout]]
    return calibration, holdout + (_sample_photos() if photos else [])


def base_public_images(
    base: LoadedBase, *, n_calibration: int = 64, n_holdout: int = 32, photos: bool = True,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """``public_images`` from the images ``base`` reserved for its alignment (easy-VQA)."""
    settings = base.manifest.get("alignment", {}).get("settings", {})
    if settings.get("task") != "easyvqa":
        raise ValueError(f"only easy-VQA-aligned bases are supported here, got task "
                         f"{settings.get('task')!r}; pass calibration images yourself")
    from shared.data.easyvqa import load_easy_vqa

    task = load_easy_vqa(n_align_images=int(settings["n_pairs"]), seed=int(settings["seed"]))
    return public_images(task, n_calibration=n_calibration, n_holdout=n_holdout, photos=photos)


def _sample_photos() -> list[Image.Image]:
    try:
        from sklearn.datasets import load_sample_images
    except ModuleNotFoundError:
        log.info("scikit-learn is not installed: held-out set without sample photos")
        return []
    return [Image.fromarray(array) for array in load_sample_images().images]


def tokenizer_json(tokenizer: object) -> str:
    """A ``tokenizers`` JSON string from a ``tokenizers.Tokenizer`` or a fast HF tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.to_str()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend.to_str()
    raise ValueError(
        "the bundle needs a fast tokenizer (tokenizers.Tokenizer or a transformers "
        f"PreTrainedTokenizerFast), got {type(tokenizer).__name__}"
    )


def _check_images(
    calibration: Sequence[Image.Image], holdout: Sequence[Image.Image], precision: str,
) -> None:
    if not holdout:
        raise ValueError("the quality gate needs held-out images, got none")
    if precision == "int8" and not calibration:
        raise ValueError("int8 quantization needs calibration images, got none")
    shared = {image_digest(i) for i in calibration} & {image_digest(i) for i in holdout}
    if shared:
        raise ValueError(f"calibration and held-out images must be disjoint, got "
                         f"{len(shared)} image(s) in both")


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------- encoder + connector


class EncoderConnector(nn.Module):
    """Encoder and connector as one module: the graph exported to ONNX."""

    def __init__(self, encoder: nn.Module, connector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, V, d)
        return self.connector(self.encoder(pixels))


@dataclass(frozen=True)
class _Graph:
    """One target's encoder graph, gated, in the staging folder."""

    file: str
    gate: GateResult
    calibration: CalibrationInfo


def _write_encoders(
    parts: BundleParts, work: Path, staging: Path, calibration: Sequence[Image.Image],
    holdout: Sequence[Image.Image], options: ExportOptions,
) -> dict[EncoderTarget, _Graph]:
    """Export once, then quantize and gate a graph per target; all land in ``staging`` only
    if every gate passes (``QualityGateError`` names the first graph that fails)."""
    graph = EncoderConnector(parts.encoder, parts.connector).eval()
    if parts.export_graph is None:
        fp32 = export_onnx(graph, work / "fp32.onnx", parts.image_size)
    else:
        fp32 = parts.export_graph(work / "fp32.onnx")
    pixels = _pixels(calibration, parts.image_size) if options.precision == "int8" else None
    made: dict[EncoderTarget, tuple[Path, _Graph]] = {}
    for target in ENCODER_TARGETS:
        name = encoder_file_name(target, options.precision)
        model, record = work / name, CalibrationInfo(n_images=0)
        if pixels is None:
            shutil.copyfile(fp32, model)
        else:
            recipe = options.recipes[target]
            quantize_int8(fp32, model, pixels, options, op_types=parts.quantize_ops,
                          recipe=recipe)
            record = _calibration_record(len(calibration), recipe, parts.quantize_ops, options)
        finalize_onnx(model)
        gate = quality_gate(graph, model, holdout, options.threshold(target), parts.image_size,
                            batch_size=options.batch_size, progress=options.progress,
                            label=target, fused=_gate_fused(target, options.precision))
        if not gate.passed:
            raise QualityGateError(gate, target)
        made[target] = (model, _Graph(name, gate, record))
    for model, graph_record in made.values():
        shutil.copyfile(model, staging / graph_record.file)
    return {target: graph_record for target, (_, graph_record) in made.items()}


def _calibration_record(
    n_images: int, recipe: QuantRecipe, ops: Sequence[str] | None, options: ExportOptions,
) -> CalibrationInfo:
    return CalibrationInfo(
        n_images=n_images, source=options.calibration_source, method=recipe.method,
        format=f"QDQ on {', '.join(ops)}" if ops else "QDQ", per_channel=recipe.per_channel,
        activations=recipe.activations,
        weights=("s7 (reduce_range)" if recipe.reduce_range else "s8") + "-symmetric per "
        + ("channel" if recipe.per_channel else "tensor"))


def export_onnx(module: nn.Module, path: Path, image_size: int = IMAGE_SIZE) -> Path:
    """``torch.onnx.export`` (dynamo) of ``module``: pixels -> visual tokens, dynamic batch.

    The example batch is 2: the dynamo exporter failed on batch 1 ("Invalid ranges").
    """
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamo=True, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
            dynamic_shapes=({0: batch},), verbose=False,
        )
    return path


def quantize_int8(
    fp32: Path, out: Path, pixels: torch.Tensor, options: ExportOptions,
    op_types: Sequence[str] | None = None, *, recipe: QuantRecipe = RECIPES["tensorrt"],
) -> Path:
    """Static QDQ int8, per-channel weights, calibrated on ``pixels`` (N, 3, S, S) by ``recipe``.

    ``op_types`` limits quantization to those ops (default: all that onnxruntime knows).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(f"{out.stem}.prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    reader = _CalibrationReader(pixels, options.batch_size, options.progress)
    symmetric = recipe.activations == "s8-symmetric"
    quantize_static(
        str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
        per_channel=recipe.per_channel,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types) if op_types else None,
        reduce_range=recipe.reduce_range,
        calibrate_method=CalibrationMethod[recipe.method],
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    reader.close()
    prepared.unlink()
    return out


class _CalibrationReader:
    """onnxruntime ``CalibrationDataReader``: ``get_next`` feeds batches, then None."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, progress: bool) -> None:
        self._batches = iter(pixels.split(batch_size))
        self._bar = tqdm(total=len(pixels), desc="int8 calibration", unit="img",
                         disable=not progress)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._bar.update(len(batch))
        return {INPUT_NAME: batch.numpy()}

    def close(self) -> None:
        self._bar.close()


def finalize_onnx(path: Path) -> None:
    """Drop opset imports no node uses and lower the IR version to the least the opsets need.

    onnxruntime's quantizer declares every domain it knows and writes its own IR version;
    older device runtimes (Jetson wheels lag PyPI) refuse IR versions they do not know.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    used = {node.domain or "" for node in model.graph.node}
    keep = [op for op in model.opset_import if (op.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    model.ir_version = min(model.ir_version, helper.find_min_ir_version_for(keep))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def quality_gate(
    reference: nn.Module, model: Path, images: Sequence[Image.Image], threshold: float,
    image_size: int = IMAGE_SIZE, *, batch_size: int = 8, progress: bool = True,
    label: str = "", fused: bool = True,
) -> GateResult:
    """Per-token cosine of ``model`` (onnxruntime, CPU) vs ``reference`` (fp32 torch).

    ``fused`` False runs the graph with onnxruntime's graph optimizations off: the QDQ
    arithmetic itself, the same on every machine (``GATE_FUSED``).
    """
    session = cpu_session(model, fused=fused)
    cosines = []
    bar = tqdm(total=len(images), desc=f"quality gate {label}".strip(), unit="img",
               disable=not progress)
    with bar, torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = _pixels(images[start:start + batch_size], image_size)  # (b, 3, S, S)
            expected = reference(pixels)  # (b, V, d)
            got = run_session(session, pixels)  # (b, V, d)
            cosines.append(torch.cosine_similarity(got, expected, dim=-1).flatten())
            bar.update(len(pixels))
    cos = torch.cat(cosines)  # (N * V,)
    return GateResult(threshold=threshold, mean=float(cos.mean()), min=float(cos.min()),
                      n_images=len(images), n_tokens=int(cos.numel()), fused=fused)


def cpu_session(model: Path, *, fused: bool = True) -> InferenceSession:
    """An onnxruntime CPU session; ``fused`` False turns graph optimizations off."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not fused:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(model), options, providers=CPU_PROVIDERS)


def run_session(session: InferenceSession, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) float32 -> (B, V, d) float32 through an onnxruntime session."""
    (tokens,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
    return torch.from_numpy(np.asarray(tokens))


def _pixels(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    return preprocess(images, size=image_size)  # (N, 3, S, S)


# ------------------------------------------------------------------------------ other files


def _write_rest(
    parts: BundleParts, staging: Path, selftest_image: Image.Image,
    graphs: Mapping[EncoderTarget, _Graph], options: ExportOptions,
) -> BundleManifest:
    """Embedder, tokenizer, configs, self-test pair and the manifest; returns the manifest."""
    save_embedder(parts.embedder, staging / EMBEDDER_NAME, options.embedder_dtype)
    (staging / TOKENIZER_NAME).write_text(parts.tokenizer_json, encoding="utf-8")
    (staging / ADAPTER_CONFIG_NAME).write_text(parts.adapter_config.model_dump_json(indent=2),
                                               encoding="utf-8")
    write_json(staging / TEMPLATE_NAME, dataclasses.asdict(parts.template))
    selftest_cos = _write_selftest(parts, staging, selftest_image,
                                   {target: g.file for target, g in graphs.items()},
                                   options.precision)
    encoders = {target: EncoderVariant(
        file=g.file, precision=options.precision, calibration=g.calibration,
        quality_gate=g.gate.info(), self_test_cosine=round(selftest_cos[target], 6))
        for target, g in graphs.items()}
    manifest = _manifest(parts, staging, encoders, options)
    atomic_write_text(staging / MANIFEST_NAME, manifest.to_json())
    for path in (staging, *staging.iterdir()):  # temp files are 0600; bundles are served
        path.chmod(0o755 if path.is_dir() else 0o644)
    return manifest


def _write_selftest(
    parts: BundleParts, staging: Path, image: Image.Image, files: Mapping[EncoderTarget, str],
    precision: Precision,
) -> dict[EncoderTarget, float]:
    """Save the self-test image at model resolution and its fp32 torch tokens; returns the
    min token cosine each target's graph gives on it (onnxruntime CPU, as its gate runs it)."""
    size = parts.image_size
    image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(
        staging / SELFTEST_IMAGE_NAME, format="PNG")
    with Image.open(staging / SELFTEST_IMAGE_NAME) as stored:
        pixels = _pixels([stored], size)  # the exact bytes the device will read
    with torch.no_grad():
        expected = EncoderConnector(parts.encoder, parts.connector).eval()(pixels)  # (1, V, d)
    save_file({SELFTEST_TENSOR: expected[0].contiguous()}, str(staging / SELFTEST_TOKENS_NAME))
    cosines = {}
    for target, name in files.items():
        session = cpu_session(staging / name, fused=_gate_fused(target, precision))
        got = run_session(session, pixels)  # (1, V, d)
        cosines[target] = float(torch.cosine_similarity(got, expected, dim=-1).min())
    return cosines


def _manifest(
    parts: BundleParts, staging: Path, encoders: Mapping[EncoderTarget, EncoderVariant],
    options: ExportOptions,
) -> BundleManifest:
    identity = BundleIdentity(
        base_version=parts.base_version, precision=options.precision,
        model=_model_record(parts), embedder=EmbedderInfo(dtype=options.embedder_dtype),
        encoders=dict(encoders), files=file_records(staging),
    )
    return BundleManifest.create(
        identity, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _model_record(parts: BundleParts) -> ModelInfo:
    size = parts.image_size
    with torch.no_grad():
        tokens = parts.connector(parts.encoder(torch.zeros(1, 3, size, size)))  # (1, V, d)
    return ModelInfo(
        encoder=parts.encoder_name, image_size=parts.image_size,
        n_visual=int(tokens.shape[1]), width=int(tokens.shape[2]),
        vocab_size=int(parts.embedder.num_embeddings), input=INPUT_NAME,
        output=OUTPUT_NAME, opset=OPSET,
    )


# ------------------------------------------------------------------------------------- CLI


def export_from_home(
    home: Path,
    out_dir: Path,
    *,
    options: ExportOptions = ExportOptions(),
    n_calibration: int = 64,
    n_holdout: int = 32,
    base_version: str | None = None,
) -> Path:
    """Load the base under ``home`` (default: its current version) and export its bundle.

    Calibration and held-out images are the base's reserved alignment images
    (``base_public_images``); returns ``out_dir/<bundle_version>``.
    """
    from cloud.base.build import load_base

    base = load_base(Path(home), base_version)
    calibration, holdout = base_public_images(base, n_calibration=n_calibration,
                                              n_holdout=n_holdout)
    source = f"{len(calibration)} reserved easy-VQA alignment images"
    return export_parts(parts_from_base(base), out_dir, calibration_images=calibration,
                        holdout_images=holdout,
                        options=dataclasses.replace(options, calibration_source=source))


def log_progress() -> None:
    """Log this package at INFO to stderr; not the root: onnxruntime's quantizer chats there."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("cloud", __name__):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cloud.bundle --out DIR``: export the current base as a device bundle."""
    import argparse

    from cloud.base.build import default_home

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for bundles")
    parser.add_argument("--home", type=Path, default=None, help="FEDNANO_HOME (default: env)")
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    parser.add_argument("--embedder-dtype", choices=["float16", "int8"], default="float16")
    parser.add_argument("--min-cosine", type=float, default=0.97)
    parser.add_argument("--tensorrt-min-cosine", type=float, default=None)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--holdout-images", type=int, default=32)
    parser.add_argument("--archive", action="store_true", help="also write <version>.tar")
    args = parser.parse_args(argv)
    log_progress()
    options = ExportOptions(precision=args.precision, min_cosine=args.min_cosine,
                            tensorrt_min_cosine=args.tensorrt_min_cosine,
                            embedder_dtype=args.embedder_dtype, archive=args.archive)
    folder = export_from_home(args.home or default_home(), args.out, options=options,
                              n_calibration=args.calibration_images,
                              n_holdout=args.holdout_images)
    print(folder)


if __name__ == "__main__":
    main()
