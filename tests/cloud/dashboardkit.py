"""A real cloud for the dashboard's browser tests and screenshots.

- ``run_rounds``: a short run through the real coordinator (``roundkit``: real validation gate,
  Fisher merge, lineage, metrics) on a real database: four devices (one offline), three closed
  rounds, two rejected updates (non-finite, over the norm bound).
- ``tiny_answerer``: the "ask the model" path on a tiny random model whose adapters have the
  run's shapes (width 8, rank 2), so it answers with the run's current global version.
- ``LiveServer``: the API + dashboard served by uvicorn on a free loopback port, in a thread.
- ``chromium``: Debian's headless Chromium through its chromedriver (selenium).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import SecretStr
from torch import nn

from cloud import aggregation, registry
from cloud.aggregation import Evaluation, Evaluator
from cloud.api.main import create_app
from cloud.api.security import create_operator_token
from cloud.ask import ModelAnswerer
from cloud.blobs import BlobStore
from cloud.db import migrate
from cloud.db.session import make_engine, make_session_factory, session_scope, sqlite_url
from cloud.pki import Issuer
from cloud.settings import CloudSettings
from shared.adapters import AdapterConfig, AdapterState
from shared.connector import PoolingConnector
from shared.nanoedge import NanoEdge
from shared.prompts import PromptTemplate
from tests.cloud.roundkit import RANK, WIDTH, Cloud, FakeClock, device_update, make_cloud, presence
from tests.toy_tokenizer import WordTokenizer

# (device id, profile, online at the end of the run)
FLEET = (("orin-nano-01", "jetson-orin-nano-8gb", True),
         ("orin-nx-02", "jetson-orin-nx-16gb", True),
         ("xavier-03", "jetson-xavier-nx", True),
         ("sim-cpu-04", "sim-cpu", False))
CANDIDATES = ("red", "green", "blue", "circle", "square", "triangle", "yes", "no")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


# ------------------------------------------------------------------------------ the run


def toy_evaluator(state: AdapterState) -> Evaluation:
    """A held-out score that moves with the merged adapter (the mean of its B matrices, zero
    at the start): enough for the charts to plot this run's own numbers."""
    b = torch.cat([v.flatten() for k, v in state.items() if "lora_B" in k])
    level = float(b.mean())
    return Evaluation(accuracy=round(min(0.95, 0.3 + 3.0 * level), 4), n=40,
                      loss=round(max(0.05, 1.4 - 4.0 * level), 4))


def submit_update(cloud: Cloud, device_id: str, **kwargs: Any) -> str:
    """The device answers its latest task (``roundkit.device_update`` options); the outcome."""
    task, parts = cloud.publisher.tasks(device_id)[-1]
    return cloud.coordinator.handle_update(
        device_id, device_update(task, parts, device_id, **kwargs)).outcome


def register_fleet(cloud: Cloud) -> None:
    """The four devices, all online (the last goes offline once the rounds are done)."""
    with cloud.session() as session:
        for device_id, profile, _ in FLEET:
            registry.add_device(session, device_id=device_id, profile=profile, iterations=1000,
                                capabilities={"ram_gb": 8})
    for device_id, _, _ in FLEET:
        assert cloud.coordinator.handle_presence(device_id, presence(device_id))


def run_rounds(cloud: Cloud, *, scale: float = 1.0) -> None:
    """Three rounds: all accepted; one update trained on another base; one over the norm
    bound. The devices' deltas are constant tensors (the kit's ``device_update``) times
    ``scale``; the one over the norm bound stays over it."""
    register_fleet(cloud)
    plans: list[dict[str, dict[str, Any]]] = [
        {"orin-nano-01": {"scale": 0.02, "n_samples": 40, "loss": 1.21},
         "orin-nx-02": {"scale": 0.03, "n_samples": 25, "loss": 1.35},
         "xavier-03": {"scale": 0.025, "n_samples": 35, "loss": 1.28},
         "sim-cpu-04": {"scale": 0.02, "n_samples": 20, "loss": 1.40}},
        {"orin-nano-01": {"scale": 0.03, "n_samples": 40, "loss": 0.97},
         "orin-nx-02": {"scale": 0.03, "n_samples": 25, "loss": 1.10,
                        "base_version": "base-old-7"},
         "xavier-03": {"scale": 0.035, "n_samples": 35, "loss": 1.02},
         "sim-cpu-04": {"scale": 0.02, "n_samples": 20, "loss": 1.15}},
        {"orin-nano-01": {"scale": 0.04, "n_samples": 40, "loss": 0.78},
         "orin-nx-02": {"scale": 0.03, "n_samples": 25, "loss": 0.86},
         "xavier-03": {"scale": 50.0, "n_samples": 35, "loss": 0.80, "raw": True},
         "sim-cpu-04": {"scale": 0.025, "n_samples": 20, "loss": 0.91}},
    ]
    for plan in plans:
        cloud.coordinator.open_round()
        cloud.coordinator.tick()
        for device_id, how in plan.items():
            loss = how.pop("loss")
            if not how.pop("raw", False):
                how["scale"] *= scale
            submit_update(cloud, device_id, **how, metrics={"loss_last": loss})
        cloud.coordinator.tick()  # everyone answered: merge, evaluate, close
    for device_id, _, online in FLEET:
        if not online:
            cloud.coordinator.handle_presence(device_id, presence(device_id, state="offline"))


class WallClock(FakeClock):
    """The real time (what the UI shows stays consistent with the rows' own timestamps)."""

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc)


@dataclass
class DemoCloud:
    """A populated cloud: its coordinator (to drive more rounds), settings and a token."""

    cloud: Cloud
    clock: FakeClock
    settings: CloudSettings
    token: str

    def close(self) -> None:
        self.cloud.engine.dispose()


def demo_cloud(home: Path, *, initial: AdapterState | None = None,
               evaluator: Evaluator = toy_evaluator, scale: float = 1.0) -> DemoCloud:
    """A fresh SQLite cloud under ``home`` with the run done and an operator token.

    ``initial`` is the first global adapter (default: the kit's width-8, rank-2 one); the
    screenshot script passes the real base's, with its real evaluator.
    """
    home.mkdir(parents=True, exist_ok=True)
    url = sqlite_url(home / "cloud.db")
    migrate.upgrade(url)
    Issuer.create("demo device CA").write(home / "device-ca.crt", home / "device-ca.key")
    settings = CloudSettings(home=home, database_url=url, environment="test",
                             secret_key=SecretStr("k" * 40), broker_password=SecretStr("p" * 40),
                             mqtt_hash_iterations=1000, broker_live_admin=False,
                             device_broker_url="mqtts://mqtt.example:8883",
                             device_x509_broker_url="mqtts://mqtt.example:8884",
                             device_ca_file=home / "device-ca.crt",
                             device_ca_key_file=home / "device-ca.key")
    if initial is not None:  # stored first, so make_cloud keeps it as version 1
        engine = make_engine(url)
        with session_scope(make_session_factory(engine)) as session:
            aggregation.ensure_initial_version(session, BlobStore(home / "blobs"), initial)
        engine.dispose()
    clock = WallClock()
    cloud = make_cloud(url, home, clock, evaluator=evaluator)
    run_rounds(cloud, scale=scale)
    with cloud.session() as session:
        _, token = create_operator_token(session, name="alice")
    return DemoCloud(cloud, clock, settings, token)


# ------------------------------------------------------------------------------ ask the model


def tiny_answerer(image_size: int = 32, rank: int = RANK) -> ModelAnswerer:
    """A random 1-layer Llama (width 8) + conv encoder + connector + NanoAdapters (rank 2,
    the run's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloud.llm_backend import InProcessLLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=WIDTH, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         initializer_range=0.5)
    model = LlamaForCausalLM(config).eval()
    encoder = nn.Sequential(nn.Conv2d(3, 12, kernel_size=8, stride=8))  # (B, 3, 32, 32) -> 4x4
    embedder = nn.Embedding.from_pretrained(model.get_input_embeddings().weight.clone())
    edge = NanoEdge(PoolingConnector(12, WIDTH, grid=2), embedder,
                    AdapterConfig(rank=rank, alpha=4), encoder=encoder)
    tokenizer = WordTokenizer(64)
    return ModelAnswerer(edge, InProcessLLM.from_causal_lm(model), tokenizer, PromptTemplate(),
                         decode=tokenizer.decode, stop_ids={1}, candidates=CANDIDATES,
                         image_size=image_size)


def shape_image(color: str = "red", size: int = 64) -> bytes:
    """A PNG of a coloured square on white (what easy-VQA pictures look like)."""
    image = Image.new("RGB", (size, size), "white")
    image.paste(Image.new("RGB", (size // 2, size // 2), color), (size // 4, size // 4))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------ the server


class LiveServer:
    """``create_app(settings)`` served by uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, settings: CloudSettings, **app_options: Any) -> None:
        import uvicorn

        self.app = create_app(settings, **app_options)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.fednano.engine.dispose()


# ------------------------------------------------------------------------------ the browser


def find_chromium() -> tuple[str, str] | None:
    """``(browser, chromedriver)`` paths, or None when either is missing."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def require_chromium() -> tuple[str, str]:
    """Chromium's paths; a skip (a failure in CI, which must have them) when they are absent."""
    found = find_chromium()
    if found is None:
        reason = ("Chromium and its driver are not installed (Debian: apt-get install -y "
                  "chromium chromium-driver; scripts/setup.sh installs them as root)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@contextmanager
def chromium(download_dir: Path, *, width: int = 1440, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium (Debian's, through its own chromedriver) downloading into
    ``download_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-extensions", "--no-first-run", "--disable-background-networking",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(download_dir)})
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy (exceptions count as not yet)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (WebDriverException, LookupError, ValueError, TypeError, AttributeError) as err:
            last = err  # the page has not got there yet
        else:
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last!r}" if last else ""))
