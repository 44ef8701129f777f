"""Devices provisioned for a real network: the cloud's registry writes their kits with the
broker's TLS address on this machine's network interface (not the loopback), one with a
password and one with an X.509 certificate the cloud's CA signed; each boots from its kit
(``load_device_config``), connects to a real Mosquitto over TLS, trains a round's task and
uploads its update. Revoking the X.509 device at the running broker stops it for good.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from sqlalchemy.orm import Session

from cloud import broker_admin, registry
from cloud.broker_admin import BrokerAdmin
from cloud.db.models import CredentialKind
from cloud.pki import Issuer
from cloud.provisioning import DeviceKit, DeviceNetwork, provision
from edge.agent import EdgeAgent
from edge.config import load_device_config
from edge.device_round import DeviceModel
from fednano.broker import BrokerTls, BrokerUnavailable, Mosquitto, public_address
from shared import topics
from shared.adapters import AdapterConfig
from shared.connector import PoolingConnector
from shared.mqtt import BrokerAddress, ClientOptions, ConnectRefused, MqttClient
from shared.nanoedge import NanoEdge
from tests.edge.agent_support import FAST, make_model, make_samples, make_task, wait_until

pytestmark = pytest.mark.timeout(120)

SERVICE = registry.ServiceAccount("fednano-cloud", "service-secret-for-tests")


@pytest.fixture(scope="module")
def host() -> str:
    try:
        return public_address()
    except BrokerUnavailable as err:
        pytest.skip(f"{err}: nothing but the loopback to provision for")


@pytest.fixture
def session(registry_session: Session) -> Session:
    return registry_session


@pytest.fixture
def network_and_broker(host: str) -> Iterator[tuple[DeviceNetwork, Mosquitto]]:
    """A CA, a broker with TLS listeners on ``host`` whose certificate the CA signed, and what
    devices are told about them."""
    ca = Issuer.create("test device CA")
    server = ca.server_certificate([host])
    broker = Mosquitto(tls=BrokerTls(host, ca.certificate_pem, server.certificate_pem,
                                     server.key_pem))
    network = DeviceNetwork(broker_url=broker.tls_url, x509_broker_url=broker.x509_url,
                            bundle_url="https://cloud.example/api/v1/bundles/latest",
                            ca_pem=ca.certificate_pem, issuer=ca)
    yield network, broker
    broker.close()


def _kits(session: Session, network: DeviceNetwork, tmp_path: Path) -> dict[str, Path]:
    kits: dict[str, DeviceKit] = {
        "dev-pw": provision(session, network, device_id="dev-pw", profile="sim-cpu",
                            iterations=1000),
        "dev-x": provision(session, network, device_id="dev-x", profile="sim-cpu", x509=True)}
    session.commit()
    for device_id, kit in kits.items():
        kit.write(tmp_path / device_id)
    return {device_id: tmp_path / device_id / "device.yaml" for device_id in kits}


def _model(tiny_llm, word_tokenizer) -> DeviceModel:  # type: ignore[no-untyped-def]
    """A tiny device model of its own (two agents must not train the same adapters)."""
    embedder = torch.nn.Embedding.from_pretrained(
        tiny_llm[0].get_input_embeddings().weight.clone())
    edge = NanoEdge(PoolingConnector(12, 32, grid=2), embedder, AdapterConfig(rank=4, alpha=8))
    return make_model(edge, word_tokenizer)


def _start(agent: EdgeAgent, ended: dict[str, BaseException | None]) -> threading.Thread:
    """``agent.run()`` in a thread; what ended it (None: a clean stop) goes in ``ended``."""

    def run() -> None:
        try:
            agent.run()
            ended[agent.device_id] = None
        except BaseException as err:  # noqa: BLE001 - the test looks at it
            ended[agent.device_id] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _agent(config_path: Path, model, backend) -> EdgeAgent:  # type: ignore[no-untyped-def]
    config = load_device_config(config_path)  # what the device does at boot
    return EdgeAgent(config, model, make_samples(), lambda client, stop: backend,
                     settings=FAST)


def test_kits_name_the_network_address_and_hold_only_their_own_secret(
        session: Session, network_and_broker: tuple[DeviceNetwork, Mosquitto],
        tmp_path: Path) -> None:
    network, _ = network_and_broker
    paths = _kits(session, network, tmp_path)
    assert sorted(p.name for p in paths["dev-pw"].parent.iterdir()) == [
        "ca.crt", "device.yaml", "password"]
    assert sorted(p.name for p in paths["dev-x"].parent.iterdir()) == [
        "ca.crt", "device.crt", "device.key", "device.yaml"]
    assert stat.S_IMODE((paths["dev-x"].parent / "device.key").stat().st_mode) == 0o600
    for path in paths.values():
        config = load_device_config(path)
        assert not ipaddress.ip_address(config.broker.host).is_loopback
        assert config.broker.tls and config.broker.ca_file == path.parent / "ca.crt"
    x509 = load_device_config(paths["dev-x"])
    assert x509.username is None and x509.broker_address.cert_file == paths["dev-x"].parent / (
        "device.crt")
    assert urlsplit(x509.broker.url).port != urlsplit(
        load_device_config(paths["dev-pw"]).broker.url).port  # the certificate listener
    device = registry.get_device(session, device_id="dev-x")
    assert [c.kind for c in device.credentials] == [CredentialKind.X509]
    assert device.credentials[0].secret_hash is None
    client = registry.dynsec_config(session, services=[SERVICE], iterations=1000)["clients"]
    entry = next(c for c in client if c["username"] == "dev-x")
    assert "password" not in entry and entry["clientid"] == "dev-x"


def test_both_devices_join_a_round_over_tls_and_a_revoked_certificate_is_refused(
        session: Session, network_and_broker: tuple[DeviceNetwork, Mosquitto], tmp_path: Path,
        word_tokenizer, tiny_llm) -> None:  # type: ignore[no-untyped-def]
    network, broker = network_and_broker
    paths = _kits(session, network, tmp_path)
    registry.write_broker_files(session, directory=broker.folder, services=[SERVICE],
                                iterations=1000)
    broker.start()
    cloud = MqttClient(BrokerAddress.parse(broker.url), ClientOptions(
        client_id="cloud", username=SERVICE.username, password=SERVICE.password))
    cloud.connect(10)
    updates = cloud.subscribe(topics.ALL_UPDATES)
    agents: dict[str, tuple[EdgeAgent, threading.Thread]] = {}
    ended: dict[str, BaseException | None] = {}
    try:
        for device_id, path in paths.items():
            model = _model(tiny_llm, word_tokenizer)
            agent = _agent(path, model, tiny_llm[1])
            agents[device_id] = (agent, _start(agent, ended))
            wait_until(lambda a=agent: a.client.connected)  # type: ignore[misc]
            _, payload = make_task(model, task_id=f"task-{device_id}")
            cloud.publish(topics.tasks(device_id), payload, max_bytes=8 * 2**20)
        senders = set()
        for _ in paths:
            received = updates.get(timeout=60)
            assert received is not None, f"updates from {senders} only"
            senders.add(topics.device_of(received.topic))
        assert senders == {"dev-pw", "dev-x"}

        with BrokerAdmin.connect(url=broker.url, username=SERVICE.username,
                                 password=SERVICE.password) as admin:
            # added while the broker could not be told: no password to lose, so recreated
            provision(session, network, device_id="dev-y", profile="sim-cpu", x509=True)
            registry.revoke_device(session, device_id="dev-x", reason="stolen")
            session.commit()
            admin.remove_device("dev-x")
            report = broker_admin.sync_registry(admin, session,
                                                service_usernames=[SERVICE.username])
            assert "dev-y" in admin.client_names() and "dev-x" not in admin.client_names()
        assert (report.removed, report.missing, report.restored) == ((), (), ("dev-y",))
        # Revoked while running: the broker closes its link; the agent reconnects (the
        # certificate is still valid), its presence is refused "not authorized", and it stops.
        _, thread = agents.pop("dev-x")
        thread.join(30)
        assert not thread.is_alive(), "the revoked device kept running"
        assert isinstance(ended["dev-x"], ConnectRefused) and ended["dev-x"].permanent
        assert agents["dev-pw"][1].is_alive()
        # And at its next start it is refused at once.
        again = _agent(paths["dev-x"], _model(tiny_llm, word_tokenizer), tiny_llm[1])
        with pytest.raises(ConnectRefused, match=r"not .*authorized") as refused:
            again.run()  # its certificate still verifies; it names no device any more
        assert refused.value.permanent and "accepted the connection" in str(refused.value)
    finally:
        for agent, thread in agents.values():
            agent.stop()
            thread.join(30)
        cloud.close()


def test_a_certificate_the_broker_does_not_trust_is_refused_at_once_and_for_good(
        session: Session, network_and_broker: tuple[DeviceNetwork, Mosquitto],
        tmp_path: Path) -> None:
    """TLS 1.3 lets the client finish its handshake before the broker judges its certificate:
    the broker's alert, not a silent "no CONNACK", is what the device reports."""
    network, broker = network_and_broker
    _kits(session, network, tmp_path)
    registry.write_broker_files(session, directory=broker.folder, services=[SERVICE],
                                iterations=1000)
    broker.start()
    stranger = Issuer.create("another CA").device_certificate("dev-x")
    (tmp_path / "stranger.crt").write_bytes(stranger.certificate_pem)
    (tmp_path / "stranger.key").write_bytes(stranger.key_pem)
    x509 = BrokerAddress.parse(broker.x509_url, ca_file=tmp_path / "dev-x" / "ca.crt")
    for cert, key, alert in ((tmp_path / "stranger.crt", tmp_path / "stranger.key", "unknown ca"),
                             (None, None, "certificate required")):
        client = MqttClient(dataclasses.replace(x509, cert_file=cert, key_file=key),
                            ClientOptions(client_id="dev-x", reconnect_min_s=1,
                                          reconnect_max_s=1))
        try:
            with pytest.raises(ConnectRefused, match=f"in the TLS handshake: .*{alert}") as err:
                client.connect(10)
            assert err.value.permanent
        finally:
            client.close()
