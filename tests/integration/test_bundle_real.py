"""The NanoEdge bundle of the real base: int8 EfficientNet-Lite0 + connector, on the device side."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edge.cli import app as edge_app
from edge.feature_cache import FeatureCache
from edge.runtime import load_bundle
from edge.trainer import TrainConfig, run_round
from fednano.cli import app as fednano_app
from shared.batches import VQABatcher
from shared.data.easyvqa import load_easy_vqa
from shared.prompts import collate
from tests.device_probe import load_bundle_on_device

pytestmark = pytest.mark.integration
MIN_COSINE = 0.97


@pytest.fixture(scope="module")
def bundle(real_base, fednano_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fednano bundle export`` of the current base (64 calibration, 32 + 2 held-out images)."""
    out = tmp_path_factory.mktemp("bundles")
    result = CliRunner().invoke(fednano_app, [
        "bundle", "export", "--out", str(out), "--home", str(fednano_home),
        "--min-cosine", str(MIN_COSINE), "--archive"])
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert f"bundle exported: {folder}" in result.output
    return folder


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_int8_bundle_passes_gate_and_self_test(bundle: Path, target: str) -> None:
    runtime = load_bundle(bundle, target=target)  # type: ignore[arg-type]  # hashes + self-test
    variant = runtime.variant
    gate = variant.quality_gate
    assert gate.passed and gate.min >= gate.threshold and gate.n_images == 34  # 32 + 2 photos
    assert variant.calibration.n_images == 64
    assert runtime.self_test().min_cosine >= gate.threshold
    assert (bundle / variant.file).stat().st_size < 6 * 2**20  # int8: ~4.9 MB


def test_cpu_devices_get_the_cpu_graph_at_the_full_gate(bundle: Path) -> None:
    runtime = load_bundle(bundle, self_test=False)  # onnxruntime's CPU provider here
    assert runtime.target == "cpu" and runtime.variant.calibration.activations == "u8"
    assert runtime.variant.quality_gate.threshold == MIN_COSINE


def test_device_matches_the_cloud_base(real_base, bundle: Path) -> None:
    runtime = load_bundle(bundle, self_test=False)
    task = load_easy_vqa(n_align_images=400)
    samples = task.test[:4]  # device-style data, never seen in calibration
    images = [task.load_image(s.image_key) for s in samples]
    device = runtime.visual_tokens(images)  # (4, V, d) int8 onnxruntime
    cloud = real_base.edge.visual_tokens(runtime.pixels(images))  # (4, V, d) fp32 torch
    assert float(torch.cosine_similarity(device, cloud, dim=-1).min()) >= MIN_COSINE
    questions = [s.question for s in samples]
    for text in ["Image:", *(f" Question: {q} Answer:" for q in questions), " teal", " yes"]:
        assert runtime.tokenizer.encode_plain(text) == real_base.tokenizer.encode_plain(text)
    assert torch.allclose(runtime.edge.embedder.weight, real_base.edge.embedder.weight,
                          rtol=1e-3, atol=1e-4)  # float16 storage
    batch = collate(runtime.tokenizer, runtime.template, questions,
                    [s.answer for s in samples], runtime.n_visual)
    embeds = runtime.edge(device, batch)  # (4, L, d) inputs_embeds for the cloud LLM
    reference = real_base.edge(cloud, batch)
    assert embeds.shape == reference.shape
    assert float(torch.cosine_similarity(embeds, reference, dim=-1).min()) >= MIN_COSINE


def test_device_round_from_cached_onnx_tokens(real_base, bundle: Path,
                                               tmp_path: Path) -> None:
    """Device path end to end: ORT tokens -> feature cache -> adapters -> the cloud LLM."""
    runtime = load_bundle(bundle, self_test=False)
    cache = FeatureCache(tmp_path / "features", runtime.bundle_version)
    task = load_easy_vqa(n_align_images=400)
    samples = task.train[:8]
    calls: list[int] = []

    def encode(images):
        calls.append(len(images))
        return runtime.visual_tokens(images)

    batcher = VQABatcher(runtime.tokenizer, runtime.template,
                         cache.visual_lookup(task.load_image, encode), runtime.n_visual)
    result = run_round(runtime.edge, real_base.backend, batcher, samples,
                       runtime.edge.adapters.adapter_state_dict(),
                       TrainConfig(steps=2, batch_size=4, fisher_samples=4, fisher_batch_size=4),
                       client_id="device-0", seed=0)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.update.fisher is not None
    n_images = len({s.image_key for s in samples})
    assert sum(calls) == n_images and len(cache) == n_images  # each image encoded once


def test_self_check_command_on_the_archive(bundle: Path) -> None:
    archive = bundle.parent / f"{bundle.name}.tar"
    result = CliRunner().invoke(edge_app, ["self-check", str(archive), "--profile", "sim-cpu"])
    assert result.exit_code == 0, result.output
    assert f"bundle {bundle.name}: self-test passed" in result.output


def test_bundle_loads_without_transformers(bundle: Path) -> None:
    printed = load_bundle_on_device(bundle, ("transformers", "cloud", "onnxscript"),
                                    report="st.min_cosine", self_test=True, timeout=300)
    assert float(printed) >= MIN_COSINE
