"""cloud.bundle: export -> quantize -> gate -> manifest, checked by loading with edge.runtime.

Also ``fednano bundle export``, with the export itself replaced (the real one needs a built
base: tests/integration/test_bundle_real.py runs it).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn
from typer.testing import CliRunner

from cloud.bundle import (
    BundleParts,
    EncoderConnector,
    ExportOptions,
    QualityGateError,
    QuantRecipe,
    export_bundle,
    export_from_home,
    export_parts,
    parts_from_base,
    quality_gate,
    tokenizer_json,
)
from edge.runtime import _warn_tensorrt_u8, load_bundle
from shared.adapters import AdapterConfig
from shared.bundle import EMBEDDER_NAME, MANIFEST_NAME, ONNX_NAME, unpack_bundle, verify_bundle
from shared.connector import PoolingConnector
from shared.prompts import PromptTemplate
from shared.vision import preprocess

SIZE = 32  # tiny image size: the export is the same graph at any resolution
C, WIDTH, VOCAB = 8, 16, 20


class TinyEncoder(nn.Module):
    """Conv + ReLU6 down to a 7x7 map, like EfficientNet-Lite0's output (B, C, 7, 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU6(),
                                 nn.AdaptiveAvgPool2d(7), nn.Conv2d(C, C, 1), nn.ReLU6())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C, 7, 7)
        return self.net(pixels)


def word_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["[UNK]", "Image:", "Question:", "Answer:", "red",
                                         "blue", "what", "color?"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def tiny_parts(seed: int = 0) -> BundleParts:
    torch.manual_seed(seed)
    encoder = TinyEncoder().eval()
    connector = PoolingConnector(C, WIDTH, grid=2).eval()
    return BundleParts(
        encoder=encoder, connector=connector, embedder=nn.Embedding(VOCAB, WIDTH),
        tokenizer_json=word_tokenizer().to_str(), template=PromptTemplate(),
        adapter_config=AdapterConfig(rank=2, alpha=4), base_version="tinybase",
        encoder_name="tiny", image_size=SIZE,
    )


def images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            for _ in range(n)]


def export(tmp_path: Path, **options: Any) -> Path:
    return export_parts(tiny_parts(), tmp_path / "bundles", calibration_images=images(16, 1),
                        holdout_images=images(6, 2),
                        options=ExportOptions(progress=False, **options))


def reference_tokens(parts: BundleParts, imgs: list[Image.Image]) -> torch.Tensor:
    with torch.no_grad():
        return parts.connector(parts.encoder(preprocess(imgs, size=SIZE)))  # (B, V, d)


def test_int8_export_loads_and_matches_torch(tmp_path: Path) -> None:
    folder = export(tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert folder.name == manifest["bundle_version"] and manifest["base_version"] == "tinybase"
    for variant in manifest["encoders"].values():
        assert variant["quality_gate"]["passed"] and variant["quality_gate"]["min"] >= 0.97
        assert variant["calibration"]["n_images"] == 16
    assert manifest["model"]["n_visual"] == 4 and manifest["model"]["width"] == WIDTH
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], MANIFEST_NAME])
    trt_graph = folder / manifest["encoders"]["tensorrt"]["file"]
    model = onnx.load(str(trt_graph))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ
    zero_points = [init for init in model.graph.initializer if init.name.endswith("zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)

    runtime = load_bundle(folder, target="tensorrt")  # verifies hashes and runs the self-test
    test = images(3, 3)
    got = runtime.visual_tokens(test)
    assert got.shape == (3, 4, WIDTH)
    cos = torch.cosine_similarity(got, reference_tokens(tiny_parts(), test), dim=-1)
    assert float(cos.min()) > 0.95
    assert runtime.visual_tokens(test[:1]).shape == (1, 4, WIDTH)  # dynamic batch
    other = tiny_parts(seed=1)  # the gate tells a wrong model apart
    gate = quality_gate(EncoderConnector(other.encoder, other.connector), trt_graph,
                        test, 0.97, SIZE, progress=False)
    assert not gate.passed and gate.n_tokens == 12


def test_u8_activations_for_cpu_devices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = export(tmp_path)
    manifest = verify_bundle(folder)
    cpu = manifest.encoders["cpu"]
    model = onnx.load(str(folder / cpu.file))
    zero_points = [onnx.numpy_helper.to_array(init) for init in model.graph.initializer
                   if init.name.endswith("zero_point")]
    assert any(z.dtype == np.uint8 for z in zero_points)  # activations: uint8, asymmetric
    assert cpu.calibration.activations == "u8" and cpu.quality_gate.passed
    runtime = load_bundle(folder, self_test=False)
    assert runtime.target == "cpu"
    runtime.encoder.session.get_providers = lambda: [  # type: ignore[method-assign]
        "TensorrtExecutionProvider", "CPUExecutionProvider"]
    _warn_tensorrt_u8(runtime)
    assert "TensorRT does not run" in caplog.text


def test_each_graph_has_its_own_recipe_and_gate(tmp_path: Path) -> None:
    recipes = {"cpu": QuantRecipe(activations="u8", method="Percentile"),
               "tensorrt": QuantRecipe(activations="s8-symmetric")}
    folder = export(tmp_path, recipes=recipes, tensorrt_min_cosine=0.9)
    encoders = verify_bundle(folder).encoders
    assert encoders["cpu"].calibration.method == "Percentile"
    assert encoders["cpu"].quality_gate.threshold == 0.97
    assert encoders["tensorrt"].quality_gate.threshold == 0.9
    with pytest.raises(QualityGateError, match="quality gate of the tensorrt graph failed"):
        export(tmp_path, tensorrt_min_cosine=1.01)
    with pytest.raises(ValueError, match="recipes must cover"):
        ExportOptions(recipes={"cpu": recipes["cpu"]})


def test_gate_refuses_and_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(QualityGateError, match="quality gate of the cpu graph failed") as info:
        export(tmp_path, precision="fp32", min_cosine=1.01)
    assert info.value.gate.min < 1.01 and not info.value.gate.passed
    assert list((tmp_path / "bundles").iterdir()) == []


def test_fp32_bundle_with_int8_embedder(tmp_path: Path) -> None:
    folder = export(tmp_path, precision="fp32", embedder_dtype="int8", archive=True)
    manifest = verify_bundle(folder)
    assert manifest.precision == "fp32"
    assert manifest.encoders["cpu"] == manifest.encoders["tensorrt"]  # one graph for both
    assert manifest.encoders["cpu"].file == ONNX_NAME
    assert manifest.encoders["cpu"].quality_gate.min > 0.9999
    stored = load_file(str(folder / EMBEDDER_NAME))
    assert stored["weight_int8"].dtype == torch.int8 and stored["scale"].shape == (VOCAB,)
    runtime = load_bundle(folder)
    weight = tiny_parts().embedder.weight
    error = (runtime.edge.embedder.weight - weight).abs().amax(dim=1)
    assert bool((error <= stored["scale"] / 2 + 1e-6).all())
    unpacked = unpack_bundle(folder.parent / f"{folder.name}.tar", tmp_path / "device" / "b")
    assert verify_bundle(unpacked).bundle_version == folder.name
    assert load_bundle(unpacked).bundle_version == folder.name


def test_calibration_and_holdout_must_be_disjoint(tmp_path: Path) -> None:
    shared = images(4, 7)
    with pytest.raises(ValueError, match="disjoint"):
        export_parts(tiny_parts(), tmp_path, calibration_images=shared,
                     holdout_images=shared[:1], options=ExportOptions(progress=False))
    with pytest.raises(ValueError, match="held-out"):
        export_parts(tiny_parts(), tmp_path, calibration_images=shared, holdout_images=[])


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="precision"):
        ExportOptions(precision="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_cosine"):
        ExportOptions(min_cosine=float("nan"))


def test_tokenizer_json_needs_a_fast_tokenizer() -> None:
    tok = word_tokenizer()
    assert json.loads(tokenizer_json(tok))["model"]["type"] == "WordLevel"

    class Fast:
        backend_tokenizer = tok

    assert tokenizer_json(Fast()) == tok.to_str()
    with pytest.raises(ValueError, match="fast tokenizer"):
        tokenizer_json(object())


def _tiny_base(tmp_path: Path) -> Any:
    from cloud.base.build import LoadedBase, Pretrained
    from shared.nanoedge import NanoEdge

    parts = tiny_parts()
    edge = NanoEdge(parts.connector, parts.embedder, parts.adapter_config, encoder=parts.encoder)
    pretrained = Pretrained(model=None, tokenizer=word_tokenizer(), llm_dir=tmp_path,
                            encoder=parts.encoder, encoder_weights=tmp_path / "w",
                            encoder_name="tiny")
    assert isinstance(parts.connector, PoolingConnector)
    fakes: Any = {"backend": None, "tokenizer": None, "features": None}  # unused by export
    return LoadedBase(version="tinybase", home=tmp_path, manifest={}, connector=parts.connector,
                      edge=edge, template=parts.template, pretrained=pretrained, **fakes)


def test_export_bundle_from_a_loaded_base(tmp_path: Path) -> None:
    base = _tiny_base(tmp_path)
    parts = parts_from_base(base)
    assert (parts.encoder_name, parts.base_version, parts.image_size) == ("tiny", "tinybase", 224)
    folder = export_bundle(base, tmp_path / "out", calibration_images=images(8, 1),
                           holdout_images=images(2, 2), precision="fp32", progress=False,
                           archive=True)
    manifest = verify_bundle(folder)
    assert manifest.base_version == "tinybase" and manifest.model.image_size == 224
    with tarfile.open(folder.parent / f"{folder.name}.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"{folder.name}/{n}" for n in
                                                [*manifest.files, MANIFEST_NAME])


def test_export_from_home_uses_the_bases_public_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cloud.base.build
    import cloud.bundle.export

    loaded: list[Path] = []

    def load_base(home: Path, version: str | None = None) -> Any:
        loaded.append(home)
        return _tiny_base(tmp_path)

    monkeypatch.setattr(cloud.base.build, "load_base", load_base)
    monkeypatch.setattr(cloud.bundle.export, "base_public_images",
                        lambda base, n_calibration, n_holdout: (images(n_calibration, 1),
                                                                images(n_holdout, 2)))
    folder = export_from_home(tmp_path / "home", tmp_path / "out", n_calibration=5,
                              n_holdout=2, options=ExportOptions(precision="fp32",
                                                                 progress=False))
    manifest = verify_bundle(folder)
    assert loaded == [tmp_path / "home"] and manifest.precision == "fp32"
    assert manifest.encoders["cpu"].quality_gate.n_images == 2
    assert manifest.model.image_size == 224


def test_fednano_bundle_export_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud.bundle
    from fednano.cli import app

    calls: list[dict[str, Any]] = []

    def fake_export(home: Path, out: Path, **kwargs: Any) -> Path:
        calls.append({"home": home, "out": out, **kwargs})
        return out / "0123456789abcdef"

    monkeypatch.setattr(cloud.bundle, "export_from_home", fake_export)
    args = ["bundle", "export", "--out", str(tmp_path / "out"), "--home", str(tmp_path),
            "--precision", "int8", "--tensorrt-min-cosine", "0.95", "--embedder-dtype", "int8",
            "--min-cosine", "0.9", "--archive", "--calibration-images", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bundle exported: " in result.output and "0123456789abcdef" in result.output
    (call,) = calls
    assert (call["home"], call["out"], call["n_calibration"], call["n_holdout"]) == (
        tmp_path, tmp_path / "out", 8, 32)
    assert call["options"] == ExportOptions(precision="int8", tensorrt_min_cosine=0.95,
                                            embedder_dtype="int8", min_cosine=0.9, archive=True)
    bad = CliRunner().invoke(app, ["bundle", "export", "--out", "x", "--precision", "int4"])
    assert bad.exit_code == 2 and not calls[1:]
    nan = CliRunner().invoke(app, ["bundle", "export", "--out", "x", "--min-cosine", "nan"])
    assert nan.exit_code == 2 and "min_cosine" in nan.output


def test_fednano_bundle_export_reports_a_failed_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cloud.bundle
    from cloud.bundle import GateResult
    from fednano.cli import app

    def failing(home: Path, out: Path, **kwargs: Any) -> Path:
        raise QualityGateError(GateResult(threshold=0.97, mean=0.9, min=0.8, n_images=3,
                                          n_tokens=12))

    monkeypatch.setattr(cloud.bundle, "export_from_home", failing)
    result = CliRunner().invoke(app, ["bundle", "export", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "quality gate failed" in result.output and "bundle not published" in result.output
