#!/usr/bin/env python
"""Screenshots of the operator dashboard (docs/dashboard/*.png) from a real running cloud.

    python scripts/screenshots.py               # tiny random model: seconds, no weights needed
    python scripts/screenshots.py --real-base   # the built base under $FEDNANO_HOME: real
                                                # held-out accuracy and real answers
    python scripts/screenshots.py --url http://127.0.0.1:8000 --token fnt_...
                                                # any running cloud, e.g. `fednano demo`'s

A fresh SQLite cloud is filled by the dashboard test kit's run (``tests/cloud/dashboardkit.py``:
the real coordinator, validation gate, Fisher merge, lineage and metrics; the devices' updates
are the kit's synthetic constant deltas), then a fourth round is left collecting so the rounds
page shows a live round. The API and the dashboard are served by uvicorn on a free port, and
Debian's headless Chromium signs in with an operator token and captures every page.
With ``--url`` it captures a cloud that is already running and adds nothing to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selenium.webdriver.common.by import By  # noqa: E402

from tests.cloud.dashboardkit import (  # noqa: E402
    DemoCloud,
    LiveServer,
    chromium,
    demo_cloud,
    shape_image,
    submit_update,
    tiny_answerer,
    wait_for,
)

WIDTH = 1440
MIN_HEIGHT = 900
REAL_SCALE = 0.002  # the kit's deltas are constants: small enough to keep the base's answers


def _real_base(home: Path) -> tuple[dict[str, Any], Any, Path, str]:
    """demo_cloud options, the answerer, a held-out easy-VQA picture and its question."""
    import torch

    from cloud.ask import answerer_for_base
    from cloud.base.build import default_home, load_base
    from cloud.evaluator import base_evaluator
    from shared.adapters import AdapterConfig, NanoAdapters

    config = AdapterConfig(rank=8, alpha=16.0)
    base = load_base(default_home(), adapter_config=config)
    torch.manual_seed(0)
    initial = NanoAdapters(base.edge.width, config).adapter_state_dict()
    picture, question = _easy_vqa_question(home)
    options = {"initial": initial, "evaluator": base_evaluator(base, 60), "scale": REAL_SCALE}
    return options, answerer_for_base(base, config), picture, question


def _leave_a_round_collecting(demo: DemoCloud, scale: float) -> None:
    demo.cloud.coordinator.open_round()
    demo.cloud.coordinator.tick()
    submit_update(demo.cloud, "orin-nano-01", scale=0.02 * scale, n_samples=40,
                  metrics={"loss_last": 0.7})


def _show(driver: Any, url: str, page: str) -> None:
    driver.execute_script("document.body.dataset.refreshed = '';")
    driver.get(f"{url}/dashboard/?poll=5000#/{page}")
    name = page.split("/")[0]
    wait_for(lambda: driver.execute_script(
        "return document.body.dataset.refreshed === arguments[0]", name), what=page)


def _viewport(driver: Any, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})


def _capture(driver: Any, path: Path) -> None:
    """The whole page: the viewport grows to the document's height first."""
    driver.execute_script("document.getElementById('toasts')?.replaceChildren();")
    time.sleep(0.3)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    _viewport(driver, max(MIN_HEIGHT, height))
    time.sleep(0.5)  # charts resize on the window's resize event
    path.write_bytes(driver.get_screenshot_as_png())
    _viewport(driver, MIN_HEIGHT)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def _sign_in(driver: Any, url: str, token: str, out: Path) -> None:
    _viewport(driver, MIN_HEIGHT)
    driver.get(f"{url}/dashboard/")
    wait_for(lambda: driver.find_element(By.ID, "login").is_displayed(), what="login")
    _capture(driver, out / "login.png")
    driver.find_element(By.ID, "token-input").send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    wait_for(lambda: driver.find_element(By.ID, "app").is_displayed(), what="the dashboard")


def _pages(driver: Any, url: str, out: Path, picture: Path, question: str, *,
           add_device: bool) -> None:
    _show(driver, url, "fleet")
    if add_device:  # the provisioning panel (secret shown once, config downloads)
        driver.find_element(By.ID, "new-device-id").send_keys("orin-nano-05")
        driver.find_element(By.ID, "add-device").click()
        wait_for(lambda: driver.find_element(By.ID, "new-device-secret").text, what="secret")
        _show(driver, url, "fleet")
    _capture(driver, out / "fleet.png")
    for page, name in (("rounds", "rounds"), ("rounds/2", "round-detail"),
                       ("charts", "charts"), ("models", "models"),
                       ("rejections", "rejections")):
        _show(driver, url, page)
        _capture(driver, out / f"{name}.png")
    _show(driver, url, "ask")
    driver.find_element(By.ID, "ask-image").send_keys(str(picture))
    driver.find_element(By.ID, "ask-question").send_keys(question)
    driver.find_element(By.ID, "ask-button").click()
    wait_for(lambda: driver.find_element(By.ID, "ask-answer").text, timeout=120,
             what="the model's answer")
    _capture(driver, out / "ask.png")


def _easy_vqa_question(home: Path) -> tuple[Path, str]:
    """A held-out easy-VQA picture (saved as a PNG) and its question."""
    from shared.data.easyvqa import load_easy_vqa

    task = load_easy_vqa()
    sample = next(s for s in task.test if s.question_type == "color")
    picture = home / "question.png"
    task.load_image(sample.image_key).save(picture)
    return picture, sample.question


def _existing_cloud(args: argparse.Namespace, home: Path) -> None:
    """Capture a cloud that is already running (e.g. ``fednano demo``'s): no data is added."""
    picture, question = _easy_vqa_question(home)
    with chromium(home / "downloads", width=WIDTH, height=MIN_HEIGHT) as driver:
        _sign_in(driver, args.url.rstrip("/"), args.token, args.out)
        _pages(driver, args.url.rstrip("/"), args.out, picture, question, add_device=False)


def _kit_cloud(args: argparse.Namespace, home: Path) -> None:
    """Build the kit's cloud (tiny model, or the real base), serve it and capture it."""
    if args.real_base:
        options, answerer, picture, question = _real_base(home)
    else:
        options, answerer = {}, tiny_answerer()
        picture, question = home / "question.png", "what color is the shape?"
        picture.write_bytes(shape_image("red"))
    demo = demo_cloud(home / "cloud", **options)
    _leave_a_round_collecting(demo, options.get("scale", 1.0))
    try:
        with LiveServer(demo.settings, answerer=answerer) as server, \
                chromium(home / "downloads", width=WIDTH, height=MIN_HEIGHT) as driver:
            _sign_in(driver, server.url, demo.token, args.out)
            _pages(driver, server.url, args.out, picture, question, add_device=True)
    finally:
        demo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard")
    parser.add_argument("--real-base", action="store_true",
                        help="use the built base under $FEDNANO_HOME (real evaluation, answers)")
    parser.add_argument("--url", help="capture this running cloud instead (no data is added)")
    parser.add_argument("--token", help="an operator token for --url")
    args = parser.parse_args()
    if bool(args.url) != bool(args.token):
        parser.error("--url and --token go together")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fednano-shots-") as tmp:
        if args.url:
            _existing_cloud(args, Path(tmp))
        else:
            _kit_cloud(args, Path(tmp))


if __name__ == "__main__":
    main()
