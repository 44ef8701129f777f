"""Every file of a bundle besides its encoder graphs, and the manifest that lists them all.

The embedder, tokenizer, adapter config and prompt template the device needs; a self-test pair
(an image at model resolution and its fp32 torch tokens) the device checks its runtime with
before training; and the manifest, written last, whose content hash is the bundle version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from cloud.base.manifest import atomic_write_text, write_json
from cloud.bundle.gate import GatedGraph, cpu_session, gate_fused, run_session
from cloud.bundle.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, EncoderConnector
from cloud.bundle.parts import BundleParts, ExportOptions
from shared.bundle import (
    ADAPTER_CONFIG_NAME,
    EMBEDDER_NAME,
    MANIFEST_NAME,
    SELFTEST_IMAGE_NAME,
    SELFTEST_TENSOR,
    SELFTEST_TOKENS_NAME,
    TEMPLATE_NAME,
    TOKENIZER_NAME,
    BundleIdentity,
    BundleManifest,
    EmbedderInfo,
    EncoderTarget,
    EncoderVariant,
    ModelInfo,
    Precision,
    file_records,
    save_embedder,
)
from shared.vision import preprocess


def write_files(
    parts: BundleParts, staging: Path, selftest_image: Image.Image,
    graphs: Mapping[EncoderTarget, GatedGraph], options: ExportOptions,
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
        pixels = preprocess([stored], size=size)  # the exact bytes the device will read
    with torch.no_grad():
        expected = EncoderConnector(parts.encoder, parts.connector).eval()(pixels)  # (1, V, d)
    save_file({SELFTEST_TENSOR: expected[0].contiguous()}, str(staging / SELFTEST_TOKENS_NAME))
    cosines = {}
    for target, name in files.items():
        session = cpu_session(staging / name, fused=gate_fused(target, precision))
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
