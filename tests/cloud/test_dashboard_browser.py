"""The operator dashboard in headless Chromium against a real running cloud.

One module-wide setup: a real SQLite database filled by a short run through the real coordinator
(three rounds, two rejected updates, four versions), the API + dashboard served by uvicorn on a
free port, and one Chromium. The tests read what the browser shows (DOM, the charts' data) and
compare it with the database; the actions go through the UI and are checked in the database.
The tests share the browser and run in file order; the last one revokes the token.
"""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select

from cloud import aggregation, registry
from cloud.ask import ModelAnswerer
from cloud.db import crud
from cloud.db.models import DeviceStatus, RoundState, UpdateStatus
from tests.cloud.dashboardkit import (
    FLEET,
    DemoCloud,
    LiveServer,
    chromium,
    demo_cloud,
    require_chromium,
    shape_image,
    tiny_answerer,
    wait_for,
)
from tests.cloud.roundkit import device_update

pytestmark = pytest.mark.browser
POLL_MS = 400


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCloud]:
    require_chromium()  # skip (or fail in CI) before building anything
    instance = demo_cloud(tmp_path_factory.mktemp("cloud"))
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def answerer() -> ModelAnswerer:
    return tiny_answerer()


@pytest.fixture(scope="module")
def server(demo: DemoCloud, answerer: ModelAnswerer) -> Iterator[LiveServer]:
    with LiveServer(demo.settings, answerer=answerer) as live:
        yield live


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    with chromium(downloads) as driver:
        yield driver


# ------------------------------------------------------------------------------ helpers


def _get(server: LiveServer, path: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(server.url + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _show(browser: Any, server: LiveServer, page: str) -> None:
    """Navigate to ``#/page`` and wait until that page has rendered fresh data."""
    browser.execute_script("document.body.dataset.refreshes = '0';"
                           "document.body.dataset.refreshed = '';")
    browser.get(f"{server.url}/dashboard/?poll={POLL_MS}#/{page}")
    name = page.split("/")[0]
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.refreshed === arguments[0] "
        "&& Number(document.body.dataset.refreshes) >= 1", name), what=f"page {page}")


_SNAPSHOT = """
return [...document.querySelectorAll(arguments[0])].map((el) => ({
  data: {...el.dataset},
  text: el.innerText,
  cells: Object.fromEntries([...el.querySelectorAll('td[data-col]')]
    .map((td) => [td.dataset.col, td.innerText.trim()])),
}));
"""


def _rows(browser: Any, css: str) -> list[dict[str, Any]]:
    """What ``css`` matches, read in one script: the page re-renders its tables at every poll,
    so element handles go stale; a snapshot does not. Each row: ``data`` (its ``data-*``),
    ``text``, ``cells`` (``td[data-col]`` texts)."""
    return list(browser.execute_script(_SNAPSHOT, css))


def _click(browser: Any, css: str) -> None:
    """Click what ``css`` matches, finding it again if a poll re-rendered it meanwhile (a click
    on a stale element raises and never lands, so retrying cannot click twice)."""
    def attempt() -> bool:
        browser.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(attempt, what=f"a click on {css}")


def _percent(text: str) -> float:
    """The first "12.3%" in ``text`` as a fraction."""
    found = re.search(r"(\d+(?:\.\d+)?)%", text)
    assert found is not None, text
    return float(found.group(1)) / 100


def _visible(browser: Any, element_id: str) -> bool:
    return bool(browser.find_element(By.ID, element_id).is_displayed())


# ------------------------------------------------------------------------------ auth


def test_without_a_token_nothing_is_readable_and_the_ui_shows_the_login(
        browser: Any, server: LiveServer, demo: DemoCloud) -> None:
    for path in ("/api/v1/devices", "/api/v1/stats/rounds", "/api/v1/models", "/api/v1/me"):
        status, _ = _get(server, path)
        assert status == 401, path
    assert _get(server, "/api/v1/devices", "fnt_" + "x" * 43)[0] == 401
    status, shell = _get(server, "/dashboard/")
    assert status == 200 and b"orin-nano-01" not in shell  # the static shell holds no data

    browser.get(f"{server.url}/dashboard/?poll={POLL_MS}#/fleet")
    wait_for(lambda: _visible(browser, "login"), what="the login form")
    assert not _visible(browser, "app")
    assert browser.find_element(By.ID, "view").get_attribute("childElementCount") == "0"
    assert "orin-nano-01" not in browser.page_source
    seen = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('../api/v1/devices').then((r) => done(r.status));")
    assert seen == 401

    browser.find_element(By.ID, "token-input").send_keys("fnt_not-a-real-token-at-all-0123456789")
    browser.find_element(By.ID, "login-button").click()
    wait_for(lambda: "refused" in browser.find_element(By.ID, "login-error").text,
             what="the refusal message")
    assert _visible(browser, "login") and not _visible(browser, "app")

    browser.find_element(By.ID, "token-input").send_keys(demo.token)
    browser.find_element(By.ID, "login-button").click()
    wait_for(lambda: _visible(browser, "app"), what="the dashboard after signing in")
    assert browser.find_element(By.ID, "operator").text.endswith("alice")
    assert browser.execute_script("return sessionStorage.getItem('fednano.token')") == demo.token


# ------------------------------------------------------------------------------ what it shows


def test_fleet_shows_every_device_with_its_presence_and_contributions(
        browser: Any, server: LiveServer, demo: DemoCloud) -> None:
    _show(browser, server, "fleet")
    with demo.cloud.session() as session:
        devices = {d.id: d for d in crud.list_devices(session)}
        contributions = crud.device_contributions(session)
        shown = {r["data"]["deviceId"]: r for r in _rows(browser, "#devices-table tbody tr")}
        assert set(shown) == set(devices) == {d for d, _, _ in FLEET}
        for device_id, row in shown.items():
            device, done, cells = devices[device_id], contributions[device_id], row["cells"]
            assert row["data"]["online"] == str(device.online).lower()
            assert cells["presence"] == ("online" if device.online else "offline")
            assert cells["profile"] == device.profile
            assert int(cells["accepted"]) == done.updates.get("accepted", 0)
            assert int(cells["rejected"]) == done.updates.get("rejected", 0)
            assert int(cells["samples"]) == done.samples
            assert int(cells["rounds"]) == done.rounds
        assert shown["sim-cpu-04"]["cells"]["presence"] == "offline"
        latest = crud.latest_adapter_version(session)
        assert latest is not None
        version_card = browser.find_element(By.CSS_SELECTOR, "#card-version .card-value")
        assert version_card.text == f"v{latest.id}"
    assert browser.find_element(By.CSS_SELECTOR, "#card-online .card-value").text == "3"


def test_charts_plot_this_runs_metrics(browser: Any, server: LiveServer,
                                       demo: DemoCloud) -> None:
    _show(browser, server, "charts")
    plotted = wait_for(lambda: browser.execute_script(
        "const c = window.fednano.charts; return Object.keys(c).length === 4 && "
        "Object.fromEntries(Object.entries(c).map(([k, u]) => [k, u.data]));"),
        what="four charts")
    with demo.cloud.session() as session:
        rounds = [r for r in reversed(crud.list_rounds(session)) if r.state is RoundState.CLOSED]
        recorded = {r.id: {m.name: m.value for m in crud.list_metrics(session, round_id=r.id)
                           if m.device_id is None} for r in rounds}
    ids = [r.id for r in rounds]
    assert len(ids) == 3
    expected = {"accuracy": ["accuracy"], "loss": ["loss", "eval_loss"],
                "bytes": ["bytes_up", "bytes_down"],
                "participants": ["participants", "updates_rejected"]}
    for chart, names in expected.items():
        x, *series = plotted[chart]
        assert x == ids, chart
        for name, values in zip(names, series, strict=True):
            assert values == pytest.approx([recorded[i][name] for i in ids]), (chart, name)
    assert [recorded[i]["updates_rejected"] for i in ids] == [0, 1, 1]
    # The same numbers in the table, and the canvases were drawn at a real size.
    table = _rows(browser, "#metrics-table tbody tr")
    assert [int(r["data"]["roundId"]) for r in table] == ids
    for row in table:
        assert _percent(row["cells"]["accuracy"]) == pytest.approx(
            recorded[int(row["data"]["roundId"])]["accuracy"], abs=6e-4)
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('.chart canvas')].map((c) => c.width);")
    assert len(sizes) == 4 and min(sizes) > 300


def test_rounds_models_and_rejections_match_the_database(browser: Any, server: LiveServer,
                                                         demo: DemoCloud) -> None:
    _show(browser, server, "rounds")
    with demo.cloud.session() as session:
        rounds = crud.list_rounds(session)
        shown = {int(r["data"]["roundId"]): r["data"]["state"]
                 for r in _rows(browser, "#rounds-table tbody tr")}
        assert shown == {r.id: r.state.value for r in rounds}
        rejected = crud.list_updates_by(session, status=UpdateStatus.REJECTED)
        versions = crud.list_adapter_versions(session)
        lineage = {v.id: {u.device_id: w for u, w in crud.version_lineage(session,
                                                                          version_id=v.id)}
                   for v in versions}

    second = next(u for u in rejected if u.round_id == 2)
    _show(browser, server, "rounds/2")
    wait_for(lambda: browser.find_element(By.ID, "round-detail").get_attribute(
        "data-round-id") == "2", what="round 2's detail")
    updates = {r["cells"]["update"]: r["cells"] for r in _rows(browser, "#updates-table tbody tr")}
    assert second.rejection_reason is not None
    expected = f"{second.rejection_code} {second.rejection_reason}"
    assert updates[second.update_id]["reason"] == expected
    assert second.rejection_code == "base_mismatch"

    _show(browser, server, "rejections")
    rows = {r["data"]["updateId"]: r for r in _rows(browser, "#rejections-table tbody tr")}
    assert set(rows) == {u.update_id for u in rejected} and len(rows) == 2
    for update in rejected:
        row = rows[update.update_id]
        assert row["data"]["code"] == update.rejection_code
        assert row["cells"]["reason"] == update.rejection_reason
        assert row["cells"]["device"] == update.device_id

    _show(browser, server, "models")
    cards = [int(a["data"]["versionId"]) for a in _rows(browser, "article.version")]
    assert cards == [v.id for v in versions] == [4, 3, 2, 1]  # newest first
    for version_id, weights in lineage.items():
        items = _rows(browser, f'article[data-version-id="{version_id}"] ul.lineage li')
        assert {li["data"]["deviceId"] for li in items} == set(weights)
        for li in items:
            assert _percent(li["text"]) == pytest.approx(weights[li["data"]["deviceId"]],
                                                         abs=6e-4)


# ------------------------------------------------------------------------------ actions


def test_add_a_device_download_its_config_and_revoke_it(browser: Any, server: LiveServer,
                                                        demo: DemoCloud,
                                                        downloads: Path) -> None:
    _show(browser, server, "fleet")
    browser.find_element(By.ID, "new-device-id").send_keys("orin-new-05")
    profile = browser.find_element(By.ID, "new-device-profile")
    profile.clear()
    profile.send_keys("jetson-orin-nano-8gb")
    browser.find_element(By.ID, "add-device").click()
    wait_for(lambda: _rows(browser, 'tr[data-device-id="orin-new-05"]'), what="the new row")
    secret = browser.find_element(By.ID, "new-device-secret").text
    with demo.cloud.session() as session:
        device = crud.require_device(session, device_id="orin-new-05")
        assert device.profile == "jetson-orin-nano-8gb"
        assert registry.authenticate_device(session, device_id="orin-new-05", secret=secret)
        (event,) = crud.list_audit_events(session, subject="device:orin-new-05")
        assert (event.action, event.actor) == ("device.add", "operator:alice")

    browser.find_element(By.ID, "download-config").click()
    config_file = downloads / "orin-new-05.yaml"
    wait_for(config_file.exists, what="the downloaded device.yaml")
    served = _get(server, "/api/v1/devices/orin-new-05/config", demo.token)[1].decode()
    assert config_file.read_text() == served and secret not in served
    assert yaml.safe_load(served)["device_id"] == "orin-new-05"

    _click(browser, 'button[data-revoke="orin-new-05"]')
    wait_for(lambda: _visible(browser, "revoke-panel"), what="the revoke confirmation")
    browser.find_element(By.ID, "revoke-reason").send_keys("lost in transit")
    browser.find_element(By.ID, "confirm-revoke").click()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-device-id="orin-new-05"]')
             .get_attribute("data-status") == "revoked", what="the revoked row")
    with demo.cloud.session() as session:
        assert crud.require_device(session, device_id="orin-new-05").status is (
            DeviceStatus.REVOKED)
        revoke = crud.list_audit_events(session, subject="device:orin-new-05",
                                        action="device.revoke")
        assert revoke[0].details.get("reason") == "lost in transit"


def test_add_an_x509_device_and_download_its_key_and_certificate(
        browser: Any, server: LiveServer, demo: DemoCloud, downloads: Path) -> None:
    from cryptography import x509

    from cloud.pki import Issuer

    _show(browser, server, "fleet")
    browser.find_element(By.ID, "new-device-id").send_keys("orin-x509-06")
    Select(browser.find_element(By.ID, "new-device-credential")).select_by_value("x509")
    browser.find_element(By.ID, "add-device").click()
    wait_for(lambda: _rows(browser, 'tr[data-device-id="orin-x509-06"]'), what="the new row")
    fingerprint = browser.find_element(By.ID, "new-device-certificate").text
    for button, name in (("download-key", "orin-x509-06.key"),
                         ("download-certificate", "orin-x509-06.crt"),
                         ("download-ca", "orin-x509-06-ca.crt")):
        browser.find_element(By.ID, button).click()
        wait_for((downloads / name).exists, what=name)
    certificate = x509.load_pem_x509_certificate((downloads / "orin-x509-06.crt").read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=orin-x509-06"
    ca = Issuer.load(demo.settings.device_ca_file, demo.settings.device_ca_key_file)  # type: ignore[arg-type]
    certificate.verify_directly_issued_by(ca.certificate)
    assert (downloads / "orin-x509-06-ca.crt").read_bytes() == ca.certificate_pem
    assert b"PRIVATE KEY" in (downloads / "orin-x509-06.key").read_bytes()
    with demo.cloud.session() as session:
        (credential,) = crud.require_device(session, device_id="orin-x509-06").credentials
        assert credential.certificate_sha256 == fingerprint and credential.secret_hash is None
    served = yaml.safe_load(_get(server, "/api/v1/devices/orin-x509-06/config", demo.token)[1])
    assert served["credentials"] == {"certificate_file": "device.crt", "key_file": "device.key"}


def test_start_a_round_watch_it_live_and_stop_it(browser: Any, server: LiveServer,
                                                 demo: DemoCloud) -> None:
    _show(browser, server, "rounds")
    browser.execute_script("window.__sameDocument = true;")
    browser.find_element(By.ID, "start-round").click()
    opened = wait_for(lambda: re.fullmatch(r"#/rounds/(\d+)",
                                           browser.execute_script("return location.hash")),
                      what="the new round's page")
    round_id = int(opened.group(1))
    with demo.cloud.session() as session:
        assert crud.require_round(session, round_id=round_id).state is RoundState.OPEN
    row = f'#rounds-table tr[data-round-id="{round_id}"]'

    def state_shown() -> str:
        return str(browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state"))

    wait_for(lambda: state_shown() == "open", what="the open round")

    demo.cloud.coordinator.tick()  # the coordinator sends the tasks: collecting
    wait_for(lambda: state_shown() == "collecting", what="collecting, without a reload")
    task, parts = demo.cloud.publisher.tasks("orin-nano-01")[-1]
    assert task.round_id == round_id
    outcome = demo.cloud.coordinator.handle_update(
        "orin-nano-01", device_update(task, parts, "orin-nano-01", scale=0.01, n_samples=40))
    assert outcome.outcome == "accepted"
    wait_for(lambda: _rows(browser, '#participants-table tr[data-device-id="orin-nano-01"]')[0]
             ["cells"]["status"] == "submitted", what="the submission, live")
    wait_for(lambda: "1 submitted" in browser.find_element(By.ID, "active-round").text,
             what="the active round's progress")
    assert browser.execute_script("return window.__sameDocument") is True  # polled, not reloaded

    _click(browser, f'button[data-stop="{round_id}"]')
    wait_for(lambda: state_shown() == "closed", what="the stopped round")
    with demo.cloud.session() as session:
        stopped = crud.require_round(session, round_id=round_id)
        assert stopped.state is RoundState.CLOSED
        events = crud.list_audit_events(session, subject=f"round:{round_id}")
        assert any(e.actor == "operator:alice" for e in events)


def test_ask_the_current_global_model(browser: Any, server: LiveServer, demo: DemoCloud,
                                      answerer: ModelAnswerer, tmp_path: Path) -> None:
    picture = tmp_path / "red-square.png"
    picture.write_bytes(shape_image("red"))
    _show(browser, server, "ask")
    browser.find_element(By.ID, "ask-image").send_keys(str(picture))
    browser.find_element(By.ID, "ask-question").send_keys("what color is the shape?")
    browser.find_element(By.ID, "ask-button").click()
    shown = wait_for(lambda: browser.find_element(By.ID, "ask-answer").text,
                     what="the model's answer")
    with demo.cloud.session() as session:
        latest = crud.latest_adapter_version(session)
        assert latest is not None
        state = aggregation.load_state(demo.cloud.blobs, latest)
    image = Image.open(io.BytesIO(picture.read_bytes())).convert("RGB")
    expected = answerer.answer(image, "what color is the shape?", version=f"check-{latest.id}",
                               load_state=lambda: state)
    assert shown == expected.best
    result = browser.find_element(By.ID, "ask-result")
    assert result.get_attribute("data-version-id") == str(latest.id)
    ranked = [li.get_attribute("data-answer")
              for li in result.find_elements(By.CSS_SELECTOR, "#ask-candidates li")]
    assert ranked == [c.answer for c in expected.candidates[:5]]
    assert browser.find_element(By.ID, "ask-free-text").text == (expected.text or "(nothing)")


def test_a_revoked_token_signs_the_dashboard_out(browser: Any, server: LiveServer,
                                                 demo: DemoCloud) -> None:
    _show(browser, server, "fleet")
    with demo.cloud.session() as session:
        (token,) = [t for t in crud.list_tokens(session) if t.revoked_at is None]
        crud.revoke_token(session, token_id=token.id)
    wait_for(lambda: _visible(browser, "login"), what="the login form after revocation")
    assert "Signed out" in browser.find_element(By.ID, "login-error").text
    assert not _visible(browser, "app")
    assert browser.execute_script("return sessionStorage.getItem('fednano.token')") is None
    assert "orin-nano-01" not in browser.find_element(By.ID, "view").text
    assert _get(server, "/api/v1/devices", demo.token)[0] == 401
    console = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
               and "401" not in e["message"]]
    assert not console, json.dumps(console, indent=1)
