"""docker/mosquitto/mosquitto.conf: the limits and listeners the product needs, paths that line up
with the compose mounts, and — on a real Mosquitto here — that the file runs as written: TLS with
the certificates of docker/gen-secrets.sh, the registry's dynamic-security file (put in place
by start.sh), and the compose healthcheck command."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.registry import DYNSEC_FILE, dynsec_document, hash_secret
from fednano.broker import dynsec_plugin
from shared.mqtt import BrokerAddress, ClientOptions, ConnectError, MqttClient
from tests.deploy.deploy_support import DOCKER_DIR, MOSQUITTO_CONF, mount_source, services

START_SCRIPT = DOCKER_DIR / "mosquitto" / "start.sh"
PORTS = (1883, 8883, 1880)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def directives(text: str | None = None) -> list[tuple[str, str]]:
    lines = (text or MOSQUITTO_CONF.read_text()).splitlines()
    return [(k, v.strip()) for k, _, v in (line.strip().partition(" ") for line in lines
                                           if line.strip() and not line.startswith("#"))]


def listeners() -> dict[int, dict[str, str]]:
    """Per-listener settings (everything after a ``listener`` line, until the next one)."""
    result: dict[int, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for key, value in directives():
        if key == "listener":
            port, *bind = value.split()
            current = result[int(port)] = {"bind": bind[0] if bind else ""}
        elif current is not None:
            current[key] = value
    return result


def global_settings() -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in directives():
        if key == "listener":
            break
        found[key] = value
    return found


# ------------------------------------------------------------------------------ static


def test_limits_from_facts() -> None:
    settings = global_settings()
    assert settings["max_packet_size"] == str(8 * 2**20)
    assert settings["max_queued_messages"] == "10000"
    assert settings["max_queued_bytes"] == "1073741824"
    assert "message_size_limit" not in MOSQUITTO_CONF.read_text()  # deprecated
    assert settings["persistence"] == "true"
    assert (settings["autosave_on_changes"], settings["autosave_interval"]) == ("true", "1")
    assert settings["per_listener_settings"] == "false"  # one plugin instance owns the file
    assert settings["allow_anonymous"] == "false"
    assert settings["plugin"].endswith("/mosquitto_dynamic_security.so")
    assert settings["plugin_opt_config_file"] == f"/mosquitto/data/{DYNSEC_FILE}"


def test_listeners_authenticate_and_tls_is_on_8883() -> None:
    found = listeners()
    assert set(found) == set(PORTS)
    for port in PORTS:  # authentication is global: no listener may loosen it
        assert not {"allow_anonymous", "password_file", "acl_file"} & set(found[port]), port
    assert {"certfile", "keyfile"} <= set(found[8883]) and "certfile" not in found[1883]
    assert found[1880]["bind"] == "127.0.0.1"


def test_paths_line_up_with_the_compose_mounts() -> None:
    broker = services()["mosquitto"]
    found = listeners()
    assert mount_source(broker, "/fednano/broker") == "broker-files"
    assert mount_source(broker, global_settings()["persistence_location"]) == "mosquitto-data"
    assert mount_source(broker, global_settings()["plugin_opt_config_file"]) == "mosquitto-data"
    assert mount_source(broker, "/mosquitto/config/mosquitto.conf") == \
        "./docker/mosquitto/mosquitto.conf"
    start = START_SCRIPT.read_text()
    for key in ("certfile", "keyfile", "cafile"):
        name = Path(found[8883][key]).name
        assert re.search(rf'"\$certs/{re.escape(name)}"', start), f"start.sh does not write {name}"
    for secret in broker["secrets"]:
        assert f"/run/secrets/{secret}" in start
    assert broker["entrypoint"][-1] == "/fednano/start.sh"
    assert mount_source(broker, "/fednano/start.sh") == "./docker/mosquitto/start.sh"


def test_the_registry_writes_the_files_where_the_broker_reads_them() -> None:
    s = services()
    broker_dir = s["init"]["environment"]["FEDNANO_BROKER_DIR"]
    assert mount_source(s["init"], broker_dir) == mount_source(s["mosquitto"], "/fednano/broker")
    assert s["init"]["environment"]["FEDNANO_BROKER_FILE_GROUP"] == "mosquitto"


# ------------------------------------------------------------------------------ real broker


def conf_for_test(ports: dict[int, int], paths: dict[str, Path]) -> str:
    """The compose config with this machine's ports (loopback) and folders substituted."""
    text = MOSQUITTO_CONF.read_text()
    for container, port in ports.items():
        text = re.sub(rf"^listener {container}( 127\.0\.0\.1)?$", f"listener {port} 127.0.0.1",
                      text, flags=re.MULTILINE)
    for inside, local in paths.items():
        text = text.replace(inside, str(local) + ("/" if inside.endswith("/") else ""))
    return text


def hand_over(folder: Path) -> None:
    """A root-started Mosquitto drops to its user, which must read the files."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in (folder, *folder.rglob("*")):
        os.chown(path, user.pw_uid, user.pw_gid)
        if path.is_dir():
            path.chmod(0o755)


def wait_listening(process: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + 10
    pending = set(ports)
    while pending and time.monotonic() < deadline and process.poll() is None:
        for port in list(pending):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    pending.discard(port)
        time.sleep(0.05)
    if pending:
        raise AssertionError(f"mosquitto did not listen on {pending}:\n{log.read_text()}")


def connect(url: str, user: str, password: str, ca: Path | None = None,
            timeout: float = 5.0) -> MqttClient:
    client = MqttClient(BrokerAddress.parse(url, ca_file=ca),
                        ClientOptions(client_id=user, username=user, password=password,
                                      clean_start=True, session_expiry_s=0, reconnect_max_s=1))
    client.connect(timeout)
    return client


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A folder the broker's own user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="fednano-compose-broker-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_config_runs_on_a_real_broker_with_tls(tmp_path: Path, broker_dir: Path) -> None:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("the mosquitto binary is missing (apt-get install -y mosquitto)")
    subprocess.run(["bash", str(DOCKER_DIR / "gen-secrets.sh"), str(tmp_path / "gen")],
                   check=True, capture_output=True, timeout=60)
    service_password = (tmp_path / "gen" / "secrets" / "broker_password").read_text().strip()
    broker = broker_dir
    (broker / "files").mkdir(parents=True)
    (broker / "data").mkdir()
    (broker / "data" / DYNSEC_FILE).write_text(json.dumps(dynsec_document(  # as start.sh puts it
        services=[("fednano-cloud", hash_secret(service_password, iterations=1000))],
        devices=[("sim-000", hash_secret("device-secret", iterations=1000))])))
    shutil.copytree(tmp_path / "gen" / "certs", broker / "certs")
    ports = {port: free_port() for port in PORTS}
    (broker / "mosquitto.conf").write_text(conf_for_test(ports, {
        "/mosquitto/certs/": broker / "certs", "/mosquitto/data/": broker / "data",
        "/usr/lib/mosquitto_dynamic_security.so": Path(dynsec_plugin())}))
    hand_over(broker)
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "-c", str(broker / "mosquitto.conf")], stdout=out,
                                   stderr=subprocess.STDOUT)
    clients: list[MqttClient] = []
    try:
        wait_listening(process, list(ports.values()), log)
        ca = broker / "certs" / "ca.crt"
        clients.append(connect(f"mqtts://127.0.0.1:{ports[8883]}", "fednano-cloud",
                               service_password, ca))
        clients.append(connect(f"mqtt://127.0.0.1:{ports[1883]}", "sim-000", "device-secret"))
        with pytest.raises(ConnectError):
            clients.append(connect(f"mqtts://127.0.0.1:{ports[8883]}", "sim-000", "wrong", ca))
        with pytest.raises(ConnectError):  # a self-signed CA is not in the system store
            clients.append(connect(f"mqtts://127.0.0.1:{ports[8883]}", "sim-000",
                                   "device-secret", timeout=1.0))
        probe = [arg if arg != "1880" else str(ports[1880])
                 for arg in services()["mosquitto"]["healthcheck"]["test"][1:]]
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0 and result.stdout.strip().endswith("seconds"), result.stderr
        assert process.poll() is None, log.read_text()
        assert "running" in log.read_text(), "the log must reach `docker logs` while it runs"
    finally:
        for client in clients:
            client.close()
        process.terminate()
        process.wait(10)
    text = log.read_text()
    assert "Error:" not in text and "Warning: Unable" not in text, text
