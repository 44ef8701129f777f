"""edge.runtime and ``fednano-edge self-check``: bundles exported from tiny random models."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn
from typer.testing import CliRunner, Result

from cloud.bundle import BundleParts, ExportOptions, export_parts
from edge.cli import app
from edge.profiles import RuntimeSettings
from edge.runtime import (
    CPU_PROVIDER,
    OPENVINO_CPU,
    OnnxEncoder,
    SelfTestError,
    choose_providers,
    encoder_target,
    load_bundle,
    load_bundle_for_profile,
    open_session,
)
from shared.adapters import AdapterConfig
from shared.bundle import (
    EMBEDDER_NAME,
    MANIFEST_NAME,
    BundleError,
    BundleIntegrityError,
    EncoderError,
    unpack_bundle,
    verify_bundle,
    write_archive,
)
from shared.connector import PoolingConnector
from shared.prompts import PromptTemplate, collate
from tests.device_probe import load_bundle_on_device

SIZE, C, WIDTH = 32, 8, 16
WORDS = ["[UNK]", "Image:", "Question:", "Answer:", "what", "color?", "red", "blue"]


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            for _ in range(n)]


def _parts() -> BundleParts:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(7))
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return BundleParts(
        encoder=encoder.eval(), connector=PoolingConnector(C, WIDTH, grid=2).eval(),
        embedder=nn.Embedding(len(WORDS), WIDTH), tokenizer_json=tokenizer.to_str(),
        template=PromptTemplate(), adapter_config=AdapterConfig(rank=2, alpha=4),
        base_version="tinybase", encoder_name="tiny", image_size=SIZE,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    return export_parts(_parts(), out, calibration_images=_images(12, 1),
                        holdout_images=_images(4, 2), options=ExportOptions(progress=False))


@pytest.fixture
def bundle(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the exported bundle, free to tamper with."""
    return Path(shutil.copytree(exported, tmp_path / exported.name))


def test_load_runs_self_test_and_builds_a_nanoedge(bundle: Path) -> None:
    runtime = load_bundle(bundle, [("CPUExecutionProvider", {})])
    assert runtime.bundle_version == bundle.name and runtime.providers == [CPU_PROVIDER]
    report = runtime.self_test()
    assert report.shape == (1, 4, WIDTH) and report.min_cosine >= report.threshold
    visual = runtime.visual_tokens(_images(2, 5))  # (2, V, d)
    batch = collate(runtime.tokenizer, runtime.template, ["what color?"] * 2, ["red", "blue"],
                    runtime.n_visual)
    embeds = runtime.edge(visual, batch)
    assert embeds.shape == (2, batch.input_ids.shape[1], WIDTH)
    assert runtime.edge.adapters.num_parameters() == 4 * 2 * WIDTH  # two rank-2 adapters
    assert runtime.tokenizer.encode_plain("what color?") == [4, 5]


def test_encoder_batches_and_checks_shapes(bundle: Path) -> None:
    runtime = load_bundle(bundle, batch_size=2, self_test=False)
    pixels = runtime.pixels(_images(5, 6))  # (5, 3, S, S)
    assert runtime.encoder(pixels).shape == (5, 4, WIDTH)  # 3 session runs of <= 2
    with pytest.raises(ValueError, match="pixels"):
        runtime.encoder(pixels[0])
    with pytest.raises(ValueError, match="batch_size"):
        OnnxEncoder(runtime.encoder.session, "pixels", "visual_tokens", batch_size=0)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "extra_file"])
def test_tampered_file_is_refused(bundle: Path, damage: str) -> None:
    target = bundle / EMBEDDER_NAME
    data = bytearray(target.read_bytes())
    if damage == "flip_byte":
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-10]))
    elif damage == "delete":
        target.unlink()
    else:
        (bundle / "payload.sh").write_text("echo hi\n")
    with pytest.raises(BundleIntegrityError):
        load_bundle(bundle)


def test_edited_manifest_is_refused(bundle: Path) -> None:
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"][EMBEDDER_NAME]["size"] += 1  # e.g. to match a swapped file
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="does not match bundle version"):
        verify_bundle(bundle)
    manifest["surprise"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="invalid bundle manifest"):
        verify_bundle(bundle)
    path.unlink()
    with pytest.raises(BundleError, match="not a NanoEdge bundle"):
        load_bundle(bundle)


def test_self_test_catches_drifted_and_non_finite_tokens(bundle: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = load_bundle(bundle)
    reference = bundle / runtime.manifest.self_test.reference
    save_file({"tokens": torch.randn(4, WIDTH)}, str(reference))  # as if the provider drifted
    with pytest.raises(SelfTestError, match="cosine"):
        runtime.self_test()
    monkeypatch.setattr(OnnxEncoder, "_run", lambda self, px: torch.full((len(px), 4, WIDTH),
                                                                          float("nan")))
    with pytest.raises(SelfTestError, match="NaN"):
        runtime.self_test()
    monkeypatch.setattr(OnnxEncoder, "_run", lambda self, px: torch.zeros(len(px), 3, WIDTH))
    with pytest.raises(SelfTestError, match="shape"):
        runtime.self_test()


def test_provider_fallback(caplog: pytest.LogCaptureFixture) -> None:
    requested = [("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
                 ("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    with caplog.at_level(logging.INFO, logger="edge.runtime"):
        chosen = choose_providers(requested, available=["CPUExecutionProvider"])
    assert chosen == [("CPUExecutionProvider", {})]
    assert "lacks ['TensorrtExecutionProvider', 'CUDAExecutionProvider']" in caplog.text
    on_jetson = choose_providers(requested, available=["TensorrtExecutionProvider",
                                                       "CUDAExecutionProvider", CPU_PROVIDER])
    assert on_jetson == requested
    assert choose_providers(["CUDAExecutionProvider"], available=[CPU_PROVIDER]) == [
        (CPU_PROVIDER, {})]


def test_load_with_profile_settings(bundle: Path, tmp_path: Path) -> None:
    settings = RuntimeSettings(providers=("CPUExecutionProvider",), precision="int8",
                               batch_size=3, intra_op_threads=1)
    runtime = load_bundle_for_profile(bundle, settings, tmp_path / "state")
    assert runtime.encoder.batch_size == 3 and runtime.providers == [CPU_PROVIDER]
    assert runtime.target == "cpu"  # auto on a CPU-only onnxruntime
    forced = RuntimeSettings(providers=("CPUExecutionProvider",), encoder="tensorrt")
    runtime = load_bundle_for_profile(bundle, forced, tmp_path / "state")
    assert runtime.target == "tensorrt" and runtime.self_test().min_cosine >= 0.97


def test_openvino_runs_the_cpu_graph_like_onnxruntime(bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    settings = RuntimeSettings(providers=(CPU_PROVIDER,), engine="openvino", batch_size=2,
                               intra_op_threads=1)
    runtime = load_bundle_for_profile(bundle, settings, tmp_path / "state")  # self-tested
    assert runtime.providers == [OPENVINO_CPU] and runtime.target == "cpu"
    onnx_runtime = load_bundle(bundle, self_test=False)
    pixels = runtime.pixels(_images(5, 7))  # (5, 3, S, S): runs of 2, 2 and 1
    tokens = runtime.encoder(pixels)  # (5, V, d)
    assert tokens.shape == (5, 4, WIDTH)
    cosine = torch.cosine_similarity(tokens, onnx_runtime.encoder(pixels), dim=-1)
    assert float(cosine.min()) > 0.99
    session, feed = runtime.encoder.session, {"pixels": pixels[:2].numpy()}
    (held,) = session.run(["visual_tokens"], feed)
    first = held.copy()
    session.run(["visual_tokens"], {"pixels": pixels[2:4].numpy()})
    assert np.array_equal(held, first)  # the next run did not write into returned tokens


def test_engine_failures_are_one_line_encoder_errors(
        bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    runtime = load_bundle(bundle, self_test=False)
    with pytest.raises(EncoderError, match="onnxruntime inference failed"):
        runtime.encoder(torch.zeros(1, 3, SIZE + 1, SIZE))  # the graph takes S x S only
    openvino = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    ov_runtime = load_bundle(bundle, engine="openvino", self_test=False)
    with pytest.raises(EncoderError, match=r"^OpenVINO inference failed: [^\n]+$"):
        ov_runtime.encoder(torch.zeros(1, 3, SIZE, SIZE + 2))

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exception from src/core.cpp:84:\nunsupported opset")

    monkeypatch.setattr(openvino.Core, "compile_model", refuse)
    with caplog.at_level(logging.WARNING, logger="edge.runtime"):
        fallback = load_bundle(bundle, engine="openvino")
    assert fallback.providers == [CPU_PROVIDER]
    assert "OpenVINO cannot open encoder_connector.cpu.onnx: unsupported opset" in caplog.text


def test_openvino_falls_back_to_onnxruntime_when_missing(
        bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with caplog.at_level(logging.WARNING, logger="edge.runtime"):
        runtime = load_bundle(bundle, engine="openvino")
    assert runtime.providers == [CPU_PROVIDER]
    assert "openvino package is not installed" in caplog.text
    with pytest.raises(BundleError, match="OpenVINO runs the cpu graph"):
        load_bundle(bundle, engine="openvino", target="tensorrt")
    with pytest.raises(ValueError, match="engine openvino"):
        RuntimeSettings(providers=("CUDAExecutionProvider", CPU_PROVIDER), engine="openvino")


def _zero_points(model: Path) -> list[np.ndarray]:
    graph = onnx.load(str(model)).graph
    names = {node.input[2] for node in graph.node
             if node.op_type == "QuantizeLinear" and len(node.input) > 2}
    return [numpy_helper.to_array(t) for t in graph.initializer if t.name in names]


def test_each_provider_gets_its_own_graph(bundle: Path) -> None:
    """The CPU graph has u8 activations (fused by onnxruntime's x86 kernels), the TensorRT
    graph zero points of 0 (all TensorRT builds); each is a separate, gated file."""
    manifest = verify_bundle(bundle)
    cpu, trt = manifest.encoders["cpu"], manifest.encoders["tensorrt"]
    assert cpu.file != trt.file and {cpu.file, trt.file} <= set(manifest.files)
    assert (cpu.calibration.activations, trt.calibration.activations) == ("u8", "s8-symmetric")
    assert all(z.dtype == np.uint8 for z in _zero_points(bundle / cpu.file))
    trt_zero = _zero_points(bundle / trt.file)
    assert trt_zero and all(z.dtype == np.int8 and not z.any() for z in trt_zero)
    assert cpu.quality_gate.passed and trt.quality_gate.passed
    runtime = load_bundle(bundle, self_test=False)
    assert runtime.target == "cpu" and runtime.variant == cpu
    assert load_bundle(bundle, target="tensorrt").variant == trt  # self-test with its gate


def test_the_first_available_provider_picks_the_graph() -> None:
    assert encoder_target(["TensorrtExecutionProvider", "CUDAExecutionProvider",
                           CPU_PROVIDER]) == "tensorrt"
    assert encoder_target(["CUDAExecutionProvider", CPU_PROVIDER]) == "cpu"
    assert encoder_target([CPU_PROVIDER]) == "cpu"


def test_format_1_bundle_is_refused_in_one_line(bundle: Path) -> None:
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"bundle format 1 is not supported.*re-export") as err:
        load_bundle(bundle)
    assert "\n" not in str(err.value)


def test_unpack_refuses_paths_outside_the_bundle(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("bundle/../../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(BundleError, match="unexpected entry"):
        unpack_bundle(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_device_import_needs_no_transformers(bundle: Path) -> None:
    printed = load_bundle_on_device(
        bundle, ("transformers", "cloud", "torch.onnx", "onnxscript"), report="rt.bundle_version")
    assert printed == bundle.name


def test_session_errors_become_bundle_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match=r"cannot open broken\.onnx"):
        open_session(tmp_path / "broken.onnx", [CPU_PROVIDER])


# ----------------------------------------------------------------- fednano-edge self-check


def _self_check(*args: str) -> Result:
    return CliRunner().invoke(app, ["self-check", *args])


def test_self_check_prints_what_ran(bundle: Path, tmp_path: Path) -> None:
    result = _self_check(str(bundle), "--warmup", "0")
    assert result.exit_code == 0, result.output
    for text in (f"bundle {bundle.name}: self-test passed", "CPUExecutionProvider",
                 "cosine to fp32", "threshold 0.9700", "latency", "1 x 4 x 16"):
        assert text in result.output
    archive = write_archive(bundle, tmp_path / "bundle.tar")
    result = _self_check(str(archive), "--profile", "sim-cpu", "--state-dir",
                         str(tmp_path / "state"))
    assert result.exit_code == 0, result.output
    assert f"bundle {bundle.name}: self-test passed" in result.output


def test_self_check_fails_clearly(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _self_check(str(bundle), "--profile", "no-such-profile")
    assert result.exit_code == 1 and "no such profile" in result.output
    (bundle / "payload.sh").write_text("echo hi\n")
    result = _self_check(str(bundle))
    assert result.exit_code == 1
    assert "self-check failed" in result.output and "payload.sh" in result.output
    (bundle / "payload.sh").unlink()
    monkeypatch.setattr(OnnxEncoder, "_run", lambda self, px: torch.full((len(px), 4, WIDTH),
                                                                          float("nan")))
    result = _self_check(str(bundle))
    assert result.exit_code == 1 and "NaN" in result.output
