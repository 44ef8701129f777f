"""The export itself: fp32 graph -> per target, quantize and gate -> the other files -> publish.

Everything is written in a temp folder inside ``out_dir`` and renamed into place at the end, so
a failed gate (``QualityGateError``) or a crash leaves nothing that looks like a bundle.
``export_from_home`` is what ``fednano bundle export`` runs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from cloud.base.manifest import swap_in_dir
from cloud.bundle.files import write_files
from cloud.bundle.gate import GatedGraph, QualityGateError, gate_fused, quality_gate
from cloud.bundle.images import base_public_images, check_images
from cloud.bundle.onnx_export import EncoderConnector, export_onnx, finalize_onnx
from cloud.bundle.parts import BundleParts, ExportOptions, parts_from_base
from cloud.bundle.quantize import calibration_record, quantize_int8
from shared.bundle import (
    ENCODER_TARGETS,
    CalibrationInfo,
    EmbedderDtype,
    EncoderTarget,
    Precision,
    encoder_file_name,
    write_archive,
)
from shared.vision import preprocess

if TYPE_CHECKING:
    from cloud.base.build import LoadedBase

log = logging.getLogger(__name__)


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


def export_parts(
    parts: BundleParts,
    out_dir: Path,
    *,
    calibration_images: Sequence[Image.Image],
    holdout_images: Sequence[Image.Image],
    options: ExportOptions = ExportOptions(),
) -> Path:
    """``export_bundle`` on explicit parts; see ``cloud.bundle`` for the layout."""
    check_images(calibration_images, holdout_images, options.precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".build-"))
    try:
        with tempfile.TemporaryDirectory(prefix="fednano-onnx-") as work:
            graphs = _write_encoders(parts, Path(work), staging, calibration_images,
                                     holdout_images, options)
        manifest = write_files(parts, staging, holdout_images[0], graphs, options)
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


def _write_encoders(
    parts: BundleParts, work: Path, staging: Path, calibration: Sequence[Image.Image],
    holdout: Sequence[Image.Image], options: ExportOptions,
) -> dict[EncoderTarget, GatedGraph]:
    """Export once, then quantize and gate a graph per target; all land in ``staging`` only
    if every gate passes (``QualityGateError`` names the first graph that fails)."""
    graph = EncoderConnector(parts.encoder, parts.connector).eval()
    if parts.export_graph is None:
        fp32 = export_onnx(graph, work / "fp32.onnx", parts.image_size)
    else:
        fp32 = parts.export_graph(work / "fp32.onnx")
    pixels = (preprocess(calibration, size=parts.image_size) if options.precision == "int8"
              else None)  # (N, 3, S, S)
    made: dict[EncoderTarget, tuple[Path, GatedGraph]] = {}
    for target in ENCODER_TARGETS:
        name = encoder_file_name(target, options.precision)
        model, record = work / name, CalibrationInfo(n_images=0)
        if pixels is None:
            shutil.copyfile(fp32, model)
        else:
            recipe = options.recipes[target]
            quantize_int8(fp32, model, pixels, options, op_types=parts.quantize_ops,
                          recipe=recipe)
            record = calibration_record(len(calibration), recipe, parts.quantize_ops,
                                        options.calibration_source)
        finalize_onnx(model)
        gate = quality_gate(graph, model, holdout, options.threshold(target), parts.image_size,
                            batch_size=options.batch_size, progress=options.progress,
                            label=target, fused=gate_fused(target, options.precision))
        if not gate.passed:
            raise QualityGateError(gate, target)
        made[target] = (model, GatedGraph(name, gate, record))
    for model, graph_record in made.values():
        shutil.copyfile(model, staging / graph_record.file)
    return {target: graph_record for target, (_, graph_record) in made.items()}
