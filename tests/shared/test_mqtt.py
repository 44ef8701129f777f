"""shared.mqtt: URL parsing and size checks (pure), then the client against a real Mosquitto."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared import topics
from shared.messages import MessageTooLarge
from shared.mqtt import (
    BrokerAddress,
    ClientOptions,
    ConnectError,
    ConnectRefused,
    Inbox,
    MqttClient,
    PublishError,
    Received,
    SubscribeError,
    Will,
    check_packet_size,
    packet_size,
    request_properties,
)

# --- URL parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "host", "port", "tls"), [
    ("mqtt://broker.example.com", "broker.example.com", 1883, False),
    ("mqtts://broker.example.com", "broker.example.com", 8883, True),
    ("mqtt://127.0.0.1:18830", "127.0.0.1", 18830, False),
    ("mqtts://[::1]:8884/", "::1", 8884, True),
])
def test_parse_broker_urls(url: str, host: str, port: int, tls: bool) -> None:
    address = BrokerAddress.parse(url)
    assert (address.host, address.port, address.tls, address.ca_file) == (host, port, tls, None)
    assert BrokerAddress.parse(address.url) == address


def test_ca_file_needs_tls() -> None:
    assert BrokerAddress.parse("mqtts://b", ca_file="/ca.pem").ca_file == Path("/ca.pem")
    with pytest.raises(ValueError, match="ca_file needs TLS"):
        BrokerAddress.parse("mqtt://b", ca_file="/ca.pem")


@pytest.mark.parametrize(("url", "message"), [
    ("http://broker", "scheme must be mqtt:// or mqtts://"),
    ("broker:1883", "scheme"),
    ("mqtt://user:secret@broker", "credentials do not belong"),
    ("mqtt://broker/topic", "no path"),
    ("mqtt://broker?x=1", "no path, query"),
    ("mqtt://:1883", "no host"),
    ("mqtt://broker:99999", "invalid port"),
    ("mqtt://broker:abc", "invalid port"),
    ("mqtt://broker:0", "port 0 is not a broker port"),  # urllib's 0 is not "the default"
    ("mqtt://bad_host!:1883", "invalid host"),
    ("mqtt://under_score", "invalid host"),
])
def test_bad_broker_urls_say_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        BrokerAddress.parse(url)
    assert "secret" not in str(info.value)


def test_client_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="client_id"):
        ClientOptions(client_id="")
    with pytest.raises(ValueError, match="reconnect_min_s"):
        ClientOptions(client_id="x", reconnect_min_s=10, reconnect_max_s=5)
    assert "secret" not in repr(ClientOptions(client_id="x", password="secret"))
    for bad in (0, 65536):
        with pytest.raises(ValueError, match="receive_maximum"):
            ClientOptions(client_id="x", receive_maximum=bad)


# --- Size checks --------------------------------------------------------------------------------


def test_packet_size_counts_topic_properties_and_header() -> None:
    topic = topics.llm_requests("dev-a")
    # fixed header 1 + remaining length 1 (< 128) + topic length 2 + topic + no properties 1
    assert packet_size(topic, b"x" * 50, qos=0) == 1 + 1 + 2 + len(topic) + 1 + 50
    assert packet_size(topic, b"x" * 100, qos=0) == 1 + 2 + 2 + len(topic) + 1 + 100
    props = request_properties(topics.llm_responses("dev-a"), b"req-00000001")
    bigger = packet_size(topic, b"x" * 100, props, qos=1)
    assert bigger == packet_size(topic, b"x" * 100, qos=1) + len(props.pack()) - 1
    assert packet_size(topic, b"x" * 200_000) > 200_000 + len(topic) + 3  # 3-byte length


def test_oversized_publish_is_refused_with_sizes() -> None:
    topic = topics.updates("dev-a")
    check_packet_size(topic, b"x" * 1000, max_bytes=2000)
    with pytest.raises(MessageTooLarge, match=r"3,000 bytes .* exceeds the limit of 2,000"):
        check_packet_size(topic, b"x" * 3000, max_bytes=2000)
    # The payload alone fits; with the topic and header the packet does not.
    exact = max(n for n in range(2000) if packet_size(topic, b"x" * n, qos=1) <= 2000)
    assert exact < 2000 - len(topic)
    check_packet_size(topic, b"x" * exact, max_bytes=2000)
    with pytest.raises(MessageTooLarge):
        check_packet_size(topic, b"x" * (exact + 1), max_bytes=2000)


def test_publish_checked_refuses_before_touching_the_network() -> None:
    # Never connected: a size error must come before any attempt to publish.
    client = MqttClient(BrokerAddress.parse("mqtt://127.0.0.1:9"), ClientOptions(client_id="x"))
    with pytest.raises(MessageTooLarge):
        client.publish(topics.updates("x"), b"x" * 5000, max_bytes=4096)


# --- Against the real broker --------------------------------------------------------------------


def test_round_trip_with_v5_properties(broker) -> None:  # type: ignore[no-untyped-def]
    cloud = broker.connect("cloud")
    inbox = cloud.subscribe(topics.ALL_LLM_REQUESTS)
    device = broker.connect("dev-a")
    props = request_properties(topics.llm_responses("dev-a"), b"corr-1234")
    device.publish(topics.llm_requests("dev-a"), b"hello", max_bytes=2**20, properties=props)
    got = inbox.get(timeout=5)
    assert got is not None
    assert (got.topic, got.payload) == (topics.llm_requests("dev-a"), b"hello")
    assert (got.response_topic, got.correlation_data) == (topics.llm_responses("dev-a"),
                                                          b"corr-1234")


def test_bad_password_names_the_reason(broker) -> None:  # type: ignore[no-untyped-def]
    options = ClientOptions(client_id="dev-a", username="dev-a", password="wrong")
    client = MqttClient(broker.address, options)
    with pytest.raises(ConnectError, match=r"refused client 'dev-a'.*(?i:bad user name|not auth)"):
        client.connect(timeout=5)


def test_bad_password_is_a_permanent_refusal(broker) -> None:  # type: ignore[no-untyped-def]
    client = MqttClient(broker.address, ClientOptions(client_id="dev-a", username="dev-a",
                                                      password="wrong"))
    with pytest.raises(ConnectRefused) as caught:
        client.connect(timeout=5)
    assert caught.value.permanent and caught.value.reason_code in (0x86, 0x87)


def test_no_broker_is_refused_at_once_not_after_the_connack_timeout() -> None:
    from tests.brokers import free_port

    client = MqttClient(BrokerAddress.parse(f"mqtt://127.0.0.1:{free_port()}"),
                        ClientOptions(client_id="x"))
    started = time.monotonic()
    with pytest.raises(ConnectError, match=r"cannot connect to the broker at "
                       r"mqtt://127\.0\.0\.1:\d+: Connection refused$"):
        client.connect(timeout=10)
    assert time.monotonic() - started < 2


def test_a_listener_that_never_answers_is_a_clear_timeout() -> None:
    with socket.socket() as server:  # accepts the TCP connection, never sends a CONNACK
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = MqttClient(BrokerAddress.parse(f"mqtt://127.0.0.1:{server.getsockname()[1]}"),
                            ClientOptions(client_id="x"))
        with pytest.raises(ConnectError, match="no CONNACK"):
            client.connect(timeout=0.5)


def test_acl_refuses_other_devices_topics(broker) -> None:  # type: ignore[no-untyped-def]
    device = broker.connect("dev-a")
    with pytest.raises(PublishError, match=r"(?i)not authorized"):
        device.publish(topics.llm_requests("dev-b"), b"x", max_bytes=2**20, timeout=5)
    device.publish(topics.llm_requests("dev-a"), b"x", max_bytes=2**20, timeout=5)
    # Mosquitto 2.0 grants the subscription but never delivers what the ACL denies.
    try:
        spy = device.subscribe(topics.llm_responses("dev-b"), timeout=5)
    except SubscribeError:
        return  # a broker that refuses at SUBACK (Mosquitto >= 2.1) is as good
    cloud = broker.connect("cloud")
    cloud.publish(topics.llm_responses("dev-b"), b"secret", max_bytes=2**20)
    own = device.subscribe(topics.llm_responses("dev-a"))
    cloud.publish(topics.llm_responses("dev-a"), b"mine", max_bytes=2**20)
    got = own.get(timeout=5)
    assert got is not None and got.payload == b"mine"  # delivered after the denied one
    assert spy.get(timeout=0.2) is None


def test_last_will_on_vanishing_but_not_on_close(broker) -> None:  # type: ignore[no-untyped-def]
    cloud = broker.connect("cloud")
    statuses = cloud.subscribe(topics.ALL_STATUS)
    will = Will(topics.status("dev-a"), b"offline", retain=False)
    device = broker.connect("dev-a", will=will, keepalive_s=1)
    device.close()
    assert statuses.get(timeout=1.5) is None  # clean DISCONNECT: no will
    device = broker.connect("dev-a", will=will, keepalive_s=1)
    device.paho.socket().close()  # vanish: no DISCONNECT
    device.paho.loop_stop()
    got = statuses.get(timeout=5)
    assert got is not None and got.payload == b"offline"


def test_persistent_session_survives_broker_restart(broker) -> None:  # type: ignore[no-untyped-def]
    device = broker.connect("dev-a", reconnect_max_s=1)
    tasks = device.subscribe(topics.tasks("dev-a"))
    device.close()  # offline: the broker keeps its session and queues for it
    cloud = broker.connect("cloud")
    cloud.publish(topics.tasks("dev-a"), b"task-1", max_bytes=2**20)
    cloud.close()
    broker.restart()
    device = MqttClient(broker.address, broker.options("dev-a", reconnect_max_s=1))
    assert device.subscribe(topics.tasks("dev-a"), inbox=tasks) is tasks  # before connecting
    device.connect()
    got = tasks.get(timeout=5)
    assert got is not None and got.payload == b"task-1"
    assert len(device.inbox) == 0
    device.close()


def test_publish_waits_across_a_reconnect(broker) -> None:  # type: ignore[no-untyped-def]
    cloud = broker.connect("cloud")
    device = broker.connect("dev-a", reconnect_min_s=1, reconnect_max_s=1)
    inbox = cloud.subscribe(topics.ALL_UPDATES)
    broker.restart()
    # Published while (or just after) the link is down: PUBACK after paho reconnects.
    device.publish(topics.updates("dev-a"), b"update", max_bytes=2**20, timeout=10)
    assert cloud.wait_connected(10)
    got = inbox.get(timeout=5)
    assert got is not None and got.payload == b"update"


def test_properties_helper_types() -> None:
    props = request_properties("a/b", b"id")
    assert isinstance(props, Properties) and props.packetType == PacketTypes.PUBLISH


def test_each_inbox_on_a_filter_gets_its_copy(broker) -> None:  # type: ignore[no-untyped-def]
    device = broker.connect("dev-a")
    first = device.subscribe(topics.tasks("dev-a"))
    second = device.subscribe(topics.tasks("dev-a"))
    everything = device.subscribe(f"{topics.device_root('dev-a')}/#")
    broker.connect("cloud").publish(topics.tasks("dev-a"), b"t", max_bytes=2**20)
    for inbox in (first, second, everything):
        got = inbox.get(timeout=5)
        assert got is not None and got.payload == b"t"
    assert len(device.inbox) == 0


def test_manual_ack_keeps_a_message_with_the_broker_until_acknowledged(  # type: ignore[no-untyped-def]
        broker) -> None:
    device = broker.connect("dev-a")

    def cloud_session() -> tuple[MqttClient, Inbox]:
        cloud = MqttClient(broker.address, broker.options("cloud", manual_ack=True))
        updates = cloud.subscribe(topics.ALL_UPDATES)  # before connect: the queue lands here
        cloud.connect()
        return cloud, updates

    def receive(updates: Inbox) -> Received:
        got = updates.get(timeout=5)
        assert got is not None and got.payload == b"update"
        return got

    cloud = MqttClient(broker.address, broker.options("cloud", manual_ack=True))
    cloud.connect()
    updates = cloud.subscribe(topics.ALL_UPDATES)  # connected: waits for the SUBACK
    device.publish(topics.updates("dev-a"), b"update", max_bytes=2**20)
    receive(updates)
    cloud.close()  # not acknowledged ...
    cloud, updates = cloud_session()
    got = receive(updates)  # ... so redelivered to the next session
    cloud.close()
    assert cloud.ack(got) is False  # its connection is gone: nothing to acknowledge on
    cloud, updates = cloud_session()
    assert cloud.ack(receive(updates)) is True
    cloud.close()
    cloud, updates = cloud_session()
    assert updates.get(timeout=1.5) is None  # acknowledged: gone
    cloud.close()


@pytest.mark.parametrize(("receive_maximum", "window"), [(None, 20), (50, 50)])
def test_receive_maximum_is_the_brokers_window_of_unacknowledged_messages(  # type: ignore[no-untyped-def]
        broker, receive_maximum: int | None, window: int) -> None:
    """Mosquitto sends a manual-ack client at most its Receive Maximum of unacknowledged
    messages (its own max_inflight_messages, 20, without one): a batch's worth."""
    cloud = MqttClient(broker.address, broker.options(
        "cloud", manual_ack=True, receive_maximum=receive_maximum))
    updates = cloud.subscribe(topics.ALL_UPDATES)
    cloud.connect()
    device = broker.connect("dev-a")
    for i in range(window + 10):
        device.publish(topics.updates("dev-a"), f"u{i}".encode(), max_bytes=2**20)
    deadline = time.monotonic() + 5
    while len(updates) < window and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # more would have come by now
    assert len(updates) == window
    cloud.close()
