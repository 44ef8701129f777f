"""cloud.bundle.hf: LLaVA-style bundles, the vision tower exported by optimum (tiny random towers).

The references are the Hugging Face model itself (``get_image_features``) and its image
processor, not the repo's own split: the graph the device runs must give what LLaVA computes.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from cloud.bundle import ExportOptions, QualityGateError, export_parts
from cloud.bundle.hf import (
    ExportMismatchError,
    LlavaHead,
    OptimumLlavaExport,
    PixelNormalize,
    export_tower,
    llava_parts,
)
from cloud.split import LlavaVisionEncoder
from edge.runtime import load_bundle
from shared.adapters import AdapterConfig
from shared.bundle import MANIFEST_NAME, verify_bundle
from shared.vision import preprocess
from tests.cloud.test_bundle_export import word_tokenizer
from tests.device_probe import load_bundle_on_device

SIZE, PATCH, LAYERS, WIDTH, IMAGE_TOKEN = 32, 8, 3, 32, 63
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)  # CLIPImageProcessor's
# (tower, select strategy, feature layers): CLS dropped / kept, one layer / two concatenated.
VARIANTS = {"clip-default": ("clip", "default", -2), "siglip-full-2layers": ("siglip", "full",
                                                                             [-3, -1])}


def tiny_llava(variant: str) -> LlavaForConditionalGeneration:
    tower, strategy, layer = VARIANTS[variant]
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                  num_attention_heads=2, image_size=SIZE, patch_size=PATCH)
    text = LlamaConfig(vocab_size=64, hidden_size=WIDTH, intermediate_size=48,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision_config = CLIPVisionConfig if tower == "clip" else SiglipVisionConfig
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=vision_config(**vision), text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    return LlavaForConditionalGeneration(config).eval()


def parts_of(model: LlavaForConditionalGeneration):
    return llava_parts(model, word_tokenizer(), image_mean=CLIP_MEAN, image_std=CLIP_STD,
                       adapter_config=AdapterConfig(rank=2, alpha=4), base_version="tinyllava")


def images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            for _ in range(n)]


def hf_tokens(variant: str, imgs: list[Image.Image]) -> torch.Tensor:
    """LLaVA's own visual tokens for ``imgs``, normalised by its (local) image processor.

    From a fresh copy of the model: an export must not be able to change its own reference.
    """
    model = tiny_llava(variant)
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, image_mean=CLIP_MEAN,
                                   image_std=CLIP_STD)
    pixels = processor(images=imgs, return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
    with torch.no_grad():
        features = model.get_image_features(pixels)
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def export(model: LlavaForConditionalGeneration, out: Path, **options) -> Path:
    return export_parts(parts_of(model), out, calibration_images=images(16, 1),
                        holdout_images=images(6, 2), options=ExportOptions(progress=False,
                                                                           **options))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def int8_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = tiny_llava(request.param)
    return request.param, export(model, tmp_path_factory.mktemp("bundles"))


def test_int8_bundle_loads_on_the_edge_and_matches_llava(int8_bundle) -> None:
    variant, folder = int8_bundle
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    tower, strategy, _ = VARIANTS[variant]
    has_cls = tower == "clip"  # SigLIP has no CLS position
    n_visual = (SIZE // PATCH) ** 2 + int(has_cls and strategy == "full")
    assert manifest["model"]["encoder"].endswith("_vision_model (optimum)")
    assert (manifest["model"]["n_visual"], manifest["model"]["width"]) == (n_visual, WIDTH)
    for graph_record in manifest["encoders"].values():
        assert graph_record["quality_gate"]["passed"]
        assert graph_record["quality_gate"]["min"] >= 0.97
        assert graph_record["calibration"]["format"] == "QDQ on Conv, MatMul, Gemm"
        assert graph_record["calibration"]["per_channel"]
    graph = onnx.load(str(folder / manifest["encoders"]["tensorrt"]["file"])).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear"
                   for out in node.output}
    readers = {node.op_type for node in graph.node if node.input and node.input[0] in dequantized}
    # Activations into the patch embedding and every MatMul are quantized (MatMul outputs too,
    # so bias Adds read dequantized values); LayerNorm and GELU inputs stay float.
    assert {"Conv", "MatMul"} <= readers and not readers & {"LayerNormalization", "Erf", "Mul"}
    assert [o.name for o in graph.output] == ["visual_tokens"]  # hidden states merged away

    runtime = load_bundle(folder)  # verifies, self-tests; the tokenizer is the bundle's
    test = images(3, 3)
    got = runtime.visual_tokens(test)  # (3, N, d)
    cos = torch.cosine_similarity(got, hf_tokens(variant, test), dim=-1)
    assert got.shape == (3, n_visual, WIDTH) and float(cos.min()) >= 0.97
    assert runtime.visual_tokens(test[:1]).shape == (1, n_visual, WIDTH)  # dynamic batch
    assert runtime.template.image_placeholder_id == IMAGE_TOKEN


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_graph_is_llava_exactly(variant: str, tmp_path: Path) -> None:
    model = tiny_llava(variant)
    export_graph = parts_of(model).export_graph
    assert isinstance(export_graph, OptimumLlavaExport)
    path = export_graph(tmp_path / "fp32.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx"]  # pieces cleaned up
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test = images(3, 3)
    (got,) = session.run(["visual_tokens"], {"pixels": preprocess(test, size=SIZE).numpy()})
    expected = hf_tokens(variant, test)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-4)
    # optimum's patcher leaves its forward on the model it exports; the export takes it off.
    assert "forward" not in model.vision_tower.__dict__
    pixels = PixelNormalize(CLIP_MEAN, CLIP_STD)(preprocess(test, size=SIZE))
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(list(model.get_image_features(pixels))), expected)
    # Pruned: the layers after the deepest selected hidden state (hidden_states[i] is the
    # output of layers.{i - 1}) and the post-layernorm, which no hidden state includes.
    layers = VARIANTS[variant][2]
    deepest = max(i % (LAYERS + 1) for i in (layers if isinstance(layers, list) else [layers]))
    names = [node.name for node in onnx.load(str(path)).graph.node]
    kept = {i for i in range(LAYERS) if any(f"/layers.{i}/" in name for name in names)}
    assert kept == set(range(deepest)) and not any("post_layernorm" in n for n in names)


# Runs a bundle's graphs on the gate's held-out images and prints each graph's min token cosine
# to the saved fp32 tokens, with the session its gate uses (fused kernels or unfused QDQ).
_GATE_AGAIN = """
import json, sys
import numpy as np, onnxruntime as ort
folder, data = sys.argv[1], np.load(sys.argv[2])
encoders = json.load(open(folder + "/manifest.json"))["encoders"]
for target, record in sorted(encoders.items()):
    options = ort.SessionOptions()
    if "unfused" in record["quality_gate"]["metric"]:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(folder + "/" + record["file"], options,
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixels": data["pixels"]})
    ref = data["ref"]
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    print(target, float(cos.min()))
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("qemu-x86_64"),
                    reason="needs an x86_64 host and qemu-user (apt-get install qemu-user)")
def test_gates_hold_on_an_x86_cpu_without_vnni(int8_bundle, tmp_path: Path) -> None:
    """The exporting machine must not decide the gate: on an AVX2 CPU without VNNI (emulated:
    qemu's Haswell model) every graph gives the tokens its gate measured. Without 7-bit weights
    the CPU graph's u8 x s8 products saturate there (siglip: min 0.88 vs 0.997 with VNNI)."""
    variant, folder = int8_bundle
    holdout = images(6, 2)  # the gate's held-out images (export())
    pixels = preprocess(holdout, size=SIZE)
    reference = parts_of(tiny_llava(variant))
    with torch.no_grad():
        ref = reference.connector(reference.encoder(pixels))
    np.savez(tmp_path / "data.npz", pixels=pixels.numpy(), ref=ref.numpy())
    done = subprocess.run(
        ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", _GATE_AGAIN, str(folder),
         str(tmp_path / "data.npz")], capture_output=True, text=True, timeout=600, check=True)
    measured = dict(line.split() for line in done.stdout.splitlines())
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert sorted(measured) == sorted(manifest["encoders"])
    for target, record in manifest["encoders"].items():
        gate = record["quality_gate"]
        assert float(measured[target]) == pytest.approx(gate["min"], abs=2e-3), target
        assert float(measured[target]) >= gate["threshold"]


def test_device_loads_it_without_transformers(int8_bundle) -> None:
    _, folder = int8_bundle
    printed = load_bundle_on_device(
        folder, ("transformers", "optimum", "cloud", "torch.onnx", "onnxscript"),
        report="rt.bundle_version")
    assert printed == folder.name


def _normalisation_left_out(export: OptimumLlavaExport) -> OptimumLlavaExport:
    identity = PixelNormalize((127 / 255,) * 3, (128 / 255,) * 3)  # bundle pixels unchanged
    return dataclasses.replace(export, normalize=identity)


def _off_by_one_layer(export: OptimumLlavaExport) -> OptimumLlavaExport:
    encoder = export.encoder
    wrong = LlavaVisionEncoder(encoder.vision_tower, -1, encoder.select_strategy)  # not -2
    return dataclasses.replace(export, encoder=wrong)


@pytest.mark.parametrize("break_it", [_normalisation_left_out, _off_by_one_layer])
def test_gate_refuses_a_broken_export(break_it, tmp_path: Path) -> None:
    parts = parts_of(tiny_llava("clip-default"))
    assert isinstance(parts.export_graph, OptimumLlavaExport)
    parts = dataclasses.replace(parts, export_graph=break_it(parts.export_graph))
    with pytest.raises(QualityGateError, match="bundle not published") as info:
        export_parts(parts, tmp_path / "out", calibration_images=images(16, 1),
                     holdout_images=images(6, 2),
                     options=ExportOptions(progress=False, precision="fp32"))
    assert info.value.gate.min < 0.97
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_a_tower_optimum_gets_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # optimum 2.1's own patcher exports SigLIP's last hidden state after the post-layernorm;
    # the tokens' cosine stays high, so the fp32 check, not the gate, is what catches it.
    import cloud.bundle.hf

    monkeypatch.setattr(cloud.bundle.hf, "_with_model_forward", lambda patcher: patcher)
    export_graph = parts_of(tiny_llava("siglip-full-2layers")).export_graph
    assert isinstance(export_graph, OptimumLlavaExport)
    with pytest.raises(ExportMismatchError, match="differs from torch"):
        export_graph(tmp_path / "fp32.onnx")


def test_fp32_bundle_verifies(tmp_path: Path) -> None:
    folder = export(tiny_llava("clip-default"), tmp_path, precision="fp32")
    manifest = verify_bundle(folder)
    assert manifest.precision == "fp32" and manifest.encoders["cpu"].quality_gate.min > 0.9999
    assert load_bundle(folder).self_test().min_cosine > 0.9999


def test_pixel_normalize_is_the_processors() -> None:
    test = images(2, 4)
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, image_mean=CLIP_MEAN,
                                   image_std=CLIP_STD)
    expected = processor(images=test, return_tensors="pt")["pixel_values"]
    got = PixelNormalize(CLIP_MEAN, CLIP_STD)(preprocess(test, size=SIZE))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive stds"):
        PixelNormalize((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))
    encoder = LlavaVisionEncoder(torch.nn.Identity(), [-2, 7], "default")
    with pytest.raises(ValueError, match=r"feature layers \[7\]"):
        LlavaHead(encoder, torch.nn.Identity(), n_hidden=LAYERS + 1)
    with pytest.raises(ValueError, match="optimum cannot export Conv2d"):
        export_tower(torch.nn.Conv2d(3, 4, 1), tmp_path / "t.onnx", SIZE, n_hidden=1)
