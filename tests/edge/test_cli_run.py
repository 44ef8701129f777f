"""``fednano-edge fetch-bundle`` and ``fednano-edge run`` as a device runs them: a subprocess
with a real bundle (tiny random encoder exported to int8 ONNX), easy-VQA data, the real broker
and an LLM worker (tiny random Llama) in the test process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn
from typer.testing import CliRunner

from cloud.bundle import BundleParts, ExportOptions, export_parts
from cloud.llm_backend import InProcessLLM
from cloud.llm_worker import LLMWorker, WorkerConfig
from edge.cli import app
from edge.state import TASK_FILE, update_id_for
from shared import codec
from shared.adapters import AdapterConfig, NanoAdapters
from shared.bundle import write_archive
from shared.connector import PoolingConnector
from shared.data.easyvqa import ANSWERS
from shared.messages import TaskHParams, TrainTask, pack
from shared.prompts import PromptTemplate
from tests.edge.agent_support import connect_cloud, retained_presence, wait_until

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
WIDTH, C, SIZE = 16, 8, 32
ADAPTERS = AdapterConfig(rank=2, alpha=4)
WORDS = ["[UNK]", "Image:", "Question:", "Answer:", "what", "is", "the", "shape?", "color",
         "of", *ANSWERS]
DATA = "easyvqa:index=0,of=100,max_samples=24"


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            for _ in range(n)]


def _tiny_llm() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=WIDTH, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llm() -> nn.Module:
    return _tiny_llm()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, llm: nn.Module) -> Path:
    """A bundle archive for the tiny LLM's width and vocabulary (base "tinybase")."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    encoder = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(7))
    embedder = nn.Embedding.from_pretrained(llm.get_input_embeddings().weight.detach().clone())
    parts = BundleParts(encoder=encoder.eval(), connector=PoolingConnector(C, WIDTH).eval(),
                        embedder=embedder, tokenizer_json=tokenizer.to_str(),
                        template=PromptTemplate(), adapter_config=ADAPTERS,
                        base_version="tinybase", encoder_name="tiny", image_size=SIZE)
    out = tmp_path_factory.mktemp("bundles")
    folder = export_parts(parts, out, calibration_images=_images(12, 1),
                          holdout_images=_images(4, 2), options=ExportOptions(progress=False))
    return write_archive(folder, out / "bundle.tar")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ fetch-bundle


def test_fetch_bundle_verifies_the_checksum(archive: Path, tmp_path: Path) -> None:
    runner, dest = CliRunner(), tmp_path / "state" / "bundle"
    bad = runner.invoke(app, ["fetch-bundle", archive.as_uri(), "--sha256", "0" * 64,
                              "--dest", str(dest)])
    assert bad.exit_code == 1 and "sha256 mismatch" in bad.output, bad.output
    assert not dest.exists() and os.listdir(dest.parent) == []  # nothing left behind
    good = runner.invoke(app, ["fetch-bundle", archive.as_uri(), "--sha256", _sha256(archive),
                               "--dest", str(dest)])
    assert good.exit_code == 0, good.output
    assert "installed" in good.output and (dest / "manifest.json").is_file()


@pytest.mark.parametrize(("args", "code", "text"), [
    (["--sha256", "abc"], 2, "64 hex digits"),
    (["--sha256", "0" * 64, "--url-instead"], 2, "No such option"),
])
def test_fetch_bundle_usage_errors(tmp_path: Path, args: list[str], code: int, text: str) -> None:
    result = CliRunner().invoke(app, ["fetch-bundle", "file:///nowhere.tar", *args,
                                      "--dest", str(tmp_path / "b")])
    assert result.exit_code == code and text in result.output, result.output


def test_fetch_bundle_reports_an_unreachable_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["fetch-bundle", (tmp_path / "missing.tar").as_uri(),
                                      "--sha256", "0" * 64, "--dest", str(tmp_path / "b")])
    assert result.exit_code == 1 and "cannot download" in result.output, result.output


# ------------------------------------------------------------------------------------- run


@pytest.fixture
def device_dir(broker, archive: Path, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A provisioned device: config + password file, and the bundle fetched into its state."""
    password = tmp_path / "password"
    password.write_text(broker.credentials("dev-a").password + "\n")
    password.chmod(0o600)
    (tmp_path / "device.yaml").write_text(
        "device_id: dev-a\nprofile: sim-cpu\n"
        f"broker:\n  url: {broker.url}\n"
        "credentials:\n  password_file: password\n"
        f"bundle_url: {archive.as_uri()}\nstate_dir: state\n")
    result = CliRunner().invoke(app, ["fetch-bundle", archive.as_uri(), "--sha256",
                                      _sha256(archive), "--dest", str(tmp_path / "state/bundle")])
    assert result.exit_code == 0, result.output
    return tmp_path


@pytest.fixture
def worker(broker, llm: nn.Module) -> Iterator[LLMWorker]:  # type: ignore[no-untyped-def]
    client = broker.connect("cloud", client_id="llm-worker-test", clean_start=True,
                            session_expiry_s=0)
    serving = LLMWorker(InProcessLLM.from_causal_lm(llm), client,
                        WorkerConfig(base_version="tinybase")).start()
    yield serving
    serving.stop()


def _start(device_dir: Path, n: int) -> subprocess.Popen[bytes]:
    log = (device_dir / f"agent-{n}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(device_dir / "device.yaml"),
         "--data", DATA, "--llm-timeout", "5"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _log(device_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:]
                     for p in sorted(device_dir.glob("agent-*.log")))


def _task(task_id: str, round_id: int, steps: int) -> bytes:
    task = TrainTask(task_id=task_id, round_id=round_id, global_version=round_id,
                     base_version="tinybase", strategy="fednano", deadline_at=time.time() + 600,
                     hparams=TaskHParams(steps=steps, batch_size=4, fisher_samples=4))
    torch.manual_seed(round_id)
    state = NanoAdapters(WIDTH, ADAPTERS).adapter_state_dict()
    return pack(task, {"global": codec.encode(state, codec.Scheme())})


def _wait_exit(process: subprocess.Popen[bytes], device_dir: Path, timeout: float = 30) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the agent did not exit:\n{_log(device_dir)}") from None


def test_run_trains_survives_sigterm_mid_round_and_resumes(  # type: ignore[no-untyped-def]
        broker, device_dir, worker):
    cloud = connect_cloud(broker)
    process = _start(device_dir, 1)
    try:
        online = cloud.presence(lambda p: p.state == "online", timeout=120)
        assert online.capabilities["samples"] == 24 and online.capabilities["base_version"] == (
            "tinybase")
        cloud.send("dev-a", _task("task-0001", 1, steps=2))
        message, parts = cloud.next_update(timeout=60)
        assert message.update_id == update_id_for("dev-a", "task-0001")
        assert message.n_samples == 24 and set(parts) == {"delta", "fisher"}
        assert set(codec.decode(parts["delta"])) == set(NanoAdapters(WIDTH, ADAPTERS)
                                                        .adapter_state_dict())

        before = worker.stats.requests
        cloud.send("dev-a", _task("task-0002", 2, steps=40))
        wait_until(lambda: worker.stats.requests > before + 2, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert _wait_exit(process, device_dir) == 0, _log(device_dir)
    finally:
        process.kill()
    assert "shutting down (signal SIGTERM)" in _log(device_dir)
    assert retained_presence(broker, "dev-a").state == "offline"
    assert (device_dir / "state" / "agent" / TASK_FILE).is_file()  # the round waits on disk
    assert cloud.updates.get(timeout=0.5) is None

    process = _start(device_dir, 2)  # the reboot picks the saved task up again ...
    try:
        message, _ = cloud.next_update(timeout=120)
        assert message.update_id == update_id_for("dev-a", "task-0002")
        assert message.metrics["steps"] == 40.0
        assert "resuming task task-0002" in _log(device_dir)
        process.send_signal(signal.SIGKILL)  # ... and a crash leaves the last will behind
        process.wait(30)
    finally:
        process.kill()
    assert retained_presence(broker, "dev-a").state == "offline"


def _offline_device(tmp_path: Path) -> Path:
    """A device config whose broker is never reached (the command fails before connecting)."""
    password = tmp_path / "password"
    password.write_text("secret\n")
    password.chmod(0o600)
    config = tmp_path / "device.yaml"
    config.write_text("device_id: dev-a\nprofile: sim-cpu\nbroker:\n  url: mqtt://127.0.0.1:9\n"
                      "credentials:\n  password_file: password\n"
                      "bundle_url: file:///b.tar\nstate_dir: state\n")
    return config


def test_run_exit_codes_before_connecting(archive: Path, tmp_path: Path) -> None:
    runner, config = CliRunner(), _offline_device(tmp_path)
    result = runner.invoke(app, ["run", "--config", str(config), "--data", "easyvqa:of=2"])
    assert result.exit_code == 2 and "index" in result.output, result.output
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 1 and "fetch-bundle" in result.output, result.output  # no bundle

    bundle = tmp_path / "state" / "bundle"
    assert runner.invoke(app, ["fetch-bundle", archive.as_uri(), "--sha256", _sha256(archive),
                               "--dest", str(bundle)]).exit_code == 0
    (tmp_path / "state" / "agent").mkdir()
    (tmp_path / "state" / "agent" / "global.safetensors").write_bytes(b"garbage")
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 3, result.output
    assert "global.safetensors" in result.output and "To recover" in result.output
