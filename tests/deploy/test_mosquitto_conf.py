"""docker/mosquitto/mosquitto.conf: the limits and listeners the product needs, paths that line up
with the compose mounts, and — on a real Mosquitto here — that the file runs as written: TLS with
the certificates of docker/gen-secrets.sh, the registry's dynamic-security file (put in place
by start.sh), the compose healthcheck command, and the certificate listener (8884) that takes an
X.509 device's identity from a certificate the cloud signs with the stack's CA."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud.pki import Issuer
from cloud.registry import DYNSEC_FILE, dynsec_document, hash_secret
from fednano.broker import dynsec_plugin
from shared import topics
from shared.mqtt import (
    BrokerAddress,
    ClientOptions,
    ConnectError,
    MqttClient,
    PublishError,
    SubscribeError,
)
from tests.deploy.deploy_support import (
    DOCKER_DIR,
    MOSQUITTO_CONF,
    mount_source,
    services,
    stack_run_module,
)

START_SCRIPT = DOCKER_DIR / "mosquitto" / "start.sh"
PORTS = (1883, 8883, 8884, 1880)
TLS_PORTS = (8883, 8884)
X509_PORT = 8884
MAX_BYTES = 8 * 2**20


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


def test_listeners_authenticate_and_tls_is_on_8883_and_8884() -> None:
    found = listeners()
    assert set(found) == set(PORTS)
    for port in PORTS:  # authentication is global: no listener may loosen it
        assert not {"allow_anonymous", "password_file", "acl_file"} & set(found[port]), port
    for port in TLS_PORTS:
        assert {"certfile", "keyfile", "cafile"} <= set(found[port]), port
    assert "certfile" not in found[1883]
    assert found[1880]["bind"] == "127.0.0.1"


def test_8884_takes_the_identity_from_a_certificate_of_the_device_ca() -> None:
    found = listeners()
    x509, passwords = found[X509_PORT], found[8883]
    assert x509["require_certificate"] == "true"
    assert x509["use_identity_as_username"] == "true"
    assert x509["use_username_as_clientid"] == "true"  # the device id is its client id too
    assert passwords["require_certificate"] == "false"
    assert not {"use_identity_as_username", "use_subject_as_username",
                "use_username_as_clientid"} & set(passwords)
    # The same server certificate; the CA that signed it is the one devices' certificates need.
    assert {k: x509[k] for k in ("certfile", "keyfile", "cafile")} == \
        {k: passwords[k] for k in ("certfile", "keyfile", "cafile")}


def test_paths_line_up_with_the_compose_mounts() -> None:
    broker = services()["mosquitto"]
    found = listeners()
    assert mount_source(broker, "/fednano/broker") == "broker-files"
    assert mount_source(broker, global_settings()["persistence_location"]) == "mosquitto-data"
    assert mount_source(broker, global_settings()["plugin_opt_config_file"]) == "mosquitto-data"
    assert mount_source(broker, "/mosquitto/config/mosquitto.conf") == \
        "./docker/mosquitto/mosquitto.conf"
    start = START_SCRIPT.read_text()
    for port in TLS_PORTS:
        for key in ("certfile", "keyfile", "cafile"):
            name = Path(found[port][key]).name
            assert re.search(rf'"\$certs/{re.escape(name)}"', start), \
                f"start.sh does not write {name} (listener {port})"
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


def connect_x509(url: str, client_id: str, ca: Path, cert: Path | None = None,
                 key: Path | None = None, timeout: float = 5.0) -> MqttClient:
    """As a device with a certificate: no username or password (the broker takes both the
    username and the client id from the certificate's common name)."""
    address = BrokerAddress(**{**vars(BrokerAddress.parse(url, ca_file=ca)),
                               "cert_file": cert, "key_file": key})
    client = MqttClient(address, ClientOptions(client_id=client_id, clean_start=True,
                                               session_expiry_s=0, reconnect_max_s=1))
    try:
        client.connect(timeout)
    except BaseException:
        client.close()
        raise
    return client


def write_certificate(issuer: Issuer, device_id: str, folder: Path) -> tuple[Path, Path]:
    """A device certificate of ``issuer`` for ``device_id``: (certificate, key) files."""
    issued = issuer.device_certificate(device_id)
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{device_id}.crt", folder / f"{device_id}.key"
    cert.write_bytes(issued.certificate_pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A folder the broker's own user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="fednano-compose-broker-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class RunningBroker:
    """The compose config running here: its ports by container port, the CA file devices
    verify it with, the folder gen-secrets.sh wrote, the cloud's service password."""

    process: subprocess.Popen[bytes]
    log: Path
    ports: dict[int, int]
    ca: Path
    generated: Path
    service_password: str

    def url(self, port: int) -> str:
        scheme = "mqtts" if port in TLS_PORTS else "mqtt"
        return f"{scheme}://127.0.0.1:{self.ports[port]}"


@contextmanager
def running_broker(tmp_path: Path, broker_dir: Path,
                   devices: Sequence[tuple[str, str | None]]) -> Iterator[RunningBroker]:
    """docker/mosquitto/mosquitto.conf on a real Mosquitto, with the certificates of
    docker/gen-secrets.sh and the dynamic-security file of ``devices`` (id, password or None
    for a certificate) and the cloud's service account, as start.sh puts them in place."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("the mosquitto binary is missing (apt-get install -y mosquitto)")
    generated = tmp_path / "gen"
    subprocess.run(["bash", str(DOCKER_DIR / "gen-secrets.sh"), str(generated)],
                   check=True, capture_output=True, timeout=60)
    service_password = (generated / "secrets" / "broker_password").read_text().strip()
    broker = broker_dir
    (broker / "files").mkdir(parents=True)
    (broker / "data").mkdir()
    (broker / "data" / DYNSEC_FILE).write_text(json.dumps(dynsec_document(  # as start.sh puts it
        services=[("fednano-cloud", hash_secret(service_password, iterations=1000))],
        devices=[(device_id, None if password is None else
                  hash_secret(password, iterations=1000)) for device_id, password in devices])))
    certs = broker / "certs"  # start.sh copies only the broker's files, never ca.key
    certs.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(generated / "certs" / name, certs / name)
    ports = {port: free_port() for port in PORTS}
    (broker / "mosquitto.conf").write_text(conf_for_test(ports, {
        "/mosquitto/certs/": certs, "/mosquitto/data/": broker / "data",
        "/usr/lib/mosquitto_dynamic_security.so": Path(dynsec_plugin())}))
    hand_over(broker)
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "-c", str(broker / "mosquitto.conf")], stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_listening(process, list(ports.values()), log)
        yield RunningBroker(process, log, ports, certs / "ca.crt", generated, service_password)
        assert process.poll() is None, log.read_text()
    finally:
        process.terminate()
        process.wait(10)
    text = log.read_text()
    assert "Error:" not in text and "Warning: Unable" not in text, text


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_config_runs_on_a_real_broker_with_tls(tmp_path: Path, broker_dir: Path) -> None:
    clients: list[MqttClient] = []
    with running_broker(tmp_path, broker_dir, [("sim-000", "device-secret")]) as broker:
        try:
            ca, ports = broker.ca, broker.ports
            clients.append(connect(broker.url(8883), "fednano-cloud", broker.service_password,
                                   ca))
            clients.append(connect(broker.url(1883), "sim-000", "device-secret"))
            with pytest.raises(ConnectError):
                clients.append(connect(broker.url(8883), "sim-000", "wrong", ca))
            with pytest.raises(ConnectError):  # a self-signed CA is not in the system store
                clients.append(connect(broker.url(8883), "sim-000", "device-secret",
                                       timeout=1.0))
            probe = [arg if arg != "1880" else str(ports[1880])
                     for arg in services()["mosquitto"]["healthcheck"]["test"][1:]]
            result = subprocess.run(probe, capture_output=True, text=True, timeout=30,
                                    check=False)
            assert result.returncode == 0 and result.stdout.strip().endswith("seconds"), \
                result.stderr
            assert broker.process.poll() is None, broker.log.read_text()
            assert "running" in broker.log.read_text(), \
                "the log must reach `docker logs` while it runs"
        finally:
            for client in clients:
                client.close()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_certificate_listener_admits_devices_of_the_stack_ca_only(
        tmp_path: Path, broker_dir: Path) -> None:
    """8884: a certificate the cloud signs (``cloud.pki.Issuer`` on the CA and key that
    gen-secrets.sh makes, as the api service loads them) connects, and the dynamic-security
    client of its common name gives its rights; no certificate, or one of another CA, is
    refused; a password device gets nothing there."""
    clients: list[MqttClient] = []
    devices = [("orin-x", None), ("sim-000", "device-secret")]
    with running_broker(tmp_path, broker_dir, devices) as broker:
        try:
            ca, x509_url = broker.ca, broker.url(X509_PORT)
            issuer = Issuer.load(broker.generated / "certs" / "ca.crt",
                                 broker.generated / "certs" / "ca.key")
            cert, key = write_certificate(issuer, "orin-x", tmp_path / "kit")
            cloud = connect(broker.url(1883), "fednano-cloud", broker.service_password)
            clients.append(cloud)
            updates = cloud.subscribe(topics.ALL_UPDATES)

            device = connect_x509(x509_url, "orin-x", ca, cert, key)
            clients.append(device)
            tasks = device.subscribe(topics.tasks("orin-x"))  # its own topics: allowed
            device.publish(topics.updates("orin-x"), b"update", max_bytes=MAX_BYTES)
            received = updates.get(timeout=10)
            assert received is not None and received.topic == topics.updates("orin-x")
            cloud.publish(topics.tasks("orin-x"), b"task", max_bytes=MAX_BYTES)
            task = tasks.get(timeout=10)
            assert task is not None and task.payload == b"task"
            with pytest.raises(PublishError):  # another device's topics: its role has none
                device.publish(topics.updates("sim-000"), b"forged", max_bytes=MAX_BYTES)
            with pytest.raises(SubscribeError):
                device.subscribe(topics.tasks("sim-000"))

            with pytest.raises(ConnectError):  # no certificate
                clients.append(connect_x509(x509_url, "orin-x", ca, timeout=2.0))
            with pytest.raises(ConnectError):  # a password is no way in on this listener
                clients.append(connect(x509_url, "sim-000", "device-secret", ca, timeout=2.0))
            stranger = Issuer.create("another CA")
            foreign, foreign_key = write_certificate(stranger, "orin-x", tmp_path / "foreign")
            with pytest.raises(ConnectError):  # same common name, another CA
                clients.append(connect_x509(x509_url, "orin-x", ca, foreign, foreign_key,
                                            timeout=2.0))
            assert device.connected, broker.log.read_text()  # none of them took its place

            # A device the broker has no client for (revoked: the cloud deleted its client)
            # still completes the handshake with its certificate but may do nothing.
            gone_cert, gone_key = write_certificate(issuer, "orin-gone", tmp_path / "gone")
            gone = connect_x509(x509_url, "orin-gone", ca, gone_cert, gone_key)
            clients.append(gone)
            with pytest.raises(PublishError, match="authorized"):
                gone.publish(topics.updates("orin-gone"), b"update", max_bytes=MAX_BYTES)
            with pytest.raises(SubscribeError):
                gone.subscribe(topics.tasks("orin-gone"))

            # The client id is the certificate's common name, whatever the client sends: a
            # device cannot take over another device's session by naming its client id.
            sim = connect(broker.url(1883), "sim-000", "device-secret")
            clients.append(sim)
            device.close()
            renamed = connect_x509(x509_url, "sim-000", ca, cert, key)
            clients.append(renamed)
            renamed.publish(topics.status("orin-x"), b"online", max_bytes=MAX_BYTES)
            time.sleep(0.5)
            log = broker.log.read_text()
            assert "Client sim-000 already connected" not in log, log
            assert re.search(r"New client connected from \S+ as orin-x .*u'orin-x'", log), log
        finally:
            for client in clients:
                client.close()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_stack_runs_x509_probe_on_a_real_broker(tmp_path: Path, broker_dir: Path) -> None:
    """scripts/stack_run.py's X.509 probe, as the stack run uses it from the host, on this
    config: a device's certificate publishes its status (accepted), no certificate is refused,
    and a device the broker has no client for (revoked) is refused "not authorized" (135); a
    probe that sees the opposite of what it expects fails."""
    stack_run = stack_run_module()
    run = stack_run.Run(stack_run.parse_args(["--probe-python", sys.executable]),
                        ["docker-compose"])
    with running_broker(tmp_path, broker_dir, [("orin-x", None)]) as broker:
        issuer = Issuer.load(broker.generated / "certs" / "ca.crt",
                             broker.generated / "certs" / "ca.key")
        url = broker.url(X509_PORT)
        for device in ("orin-x", "orin-gone"):
            cert, key = write_certificate(issuer, device, tmp_path / device)
            cert.rename(tmp_path / device / "device.crt")
            key.rename(tmp_path / device / "device.key")
            shutil.copy(broker.ca, tmp_path / device / "ca.crt")
        ok, line = stack_run.x509_probe(run, "accept", url, "orin-x", tmp_path / "orin-x")
        assert ok and "PUBACK success" in line, line
        ok, line = stack_run.x509_probe(run, "nocert", url, "orin-x", tmp_path / "orin-x")
        assert ok and "in the TLS handshake: tlsv13 alert certificate required" in line, line
        ok, line = stack_run.x509_probe(run, "revoked", url, "orin-gone",
                                        tmp_path / "orin-gone")
        assert ok and "reason code 135" in line, line
        ok, line = stack_run.x509_probe(run, "revoked", url, "orin-x", tmp_path / "orin-x")
        assert not ok and "PUBACK success" in line, line
        ok, line = stack_run.x509_probe(run, "accept", url, "orin-gone", tmp_path / "orin-gone")
        assert not ok and "reason code 135" in line, line
