"""The one paho-mqtt transport module, used by the edge agent and the cloud services alike.

paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``, MQTT v5, QoS 1, persistent sessions
(``clean_start=False`` + a session-expiry interval), last will, reconnect with backoff.

paho's callbacks run on its network thread: here they only decode and enqueue (``Inbox``) or
record acknowledgements; all work happens in the caller's threads. Typical use::

    client = MqttClient(BrokerAddress.parse("mqtts://broker:8883", ca_file=ca),
                        ClientOptions(client_id="dev-a", username="dev-a", password=secret,
                                      will=Will(topics.status("dev-a"), offline_payload)))
    client.connect(timeout=10)                           # waits for CONNACK, raises ConnectError
    tasks = client.subscribe(topics.tasks("dev-a"))      # an Inbox of Received messages
    client.publish(topics.updates("dev-a"), payload, max_bytes=limit)  # size check + PUBACK
    message = tasks.get(timeout=5.0)                     # Received | None
    client.close()

Sizes are checked before publishing (paho does not check; a broker disconnects a client whose
packet exceeds its ``max_packet_size`` and paho then resends it forever).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.hosts import check_host
from shared.messages import MessageTooLarge

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_SESSION_EXPIRY_S = 24 * 3600
DEFAULT_TIMEOUT_S = 10.0
_ACK_MEMORY = 4096  # acknowledged mids remembered; far below paho's 65535 mid wrap-around


class MqttError(Exception):
    """Base of the transport's errors."""


class ConnectError(MqttError, ConnectionError):
    """The broker refused the connection (reason code in the message) or never answered."""


class ConnectRefused(ConnectError):
    """The broker answered the CONNECT with a failure reason code (``reason_code``)."""

    # Refusals that the same credentials and client id will get again: retrying is pointless.
    PERMANENT_CODES = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})  # protocol, client id,
    # bad user name or password, not authorized, banned, bad authentication method

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code

    @property
    def permanent(self) -> bool:
        return self.reason_code in self.PERMANENT_CODES


NOT_AUTHORIZED = 0x87  # MQTT v5 reason code "Not authorized"
# TLS alerts by which a broker refuses the client's certificate: a retry presents the same one.
CERTIFICATE_ALERTS = ("unknown ca", "bad certificate", "certificate required",
                      "certificate expired", "certificate revoked", "unsupported certificate",
                      "certificate unknown", "access denied")


class NotConnectedError(MqttError, ConnectionError):
    """An operation that needs a live connection was attempted without one."""


class PublishError(MqttError):
    """The broker refused a publish (e.g. "Not authorized" from its ACL: ``reason_code`` 135)
    or paho failed it (``reason_code`` None)."""

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class SubscribeError(MqttError):
    """The broker refused a subscription (e.g. "Not authorized" from its ACL)."""


class AckTimeout(MqttError, TimeoutError):
    """No CONNACK / PUBACK / SUBACK arrived within the timeout."""


def _reason(err: BaseException) -> str:
    """``Connection refused`` rather than ``[Errno 111] Connection refused``."""
    return getattr(err, "strerror", None) or getattr(err, "reason", None) or str(err)


# --- Addresses and options ----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is: ``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` (TLS)."""

    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None  # CA bundle for TLS; None: the system's CAs
    # The client's own certificate and key (PEM) for a broker that takes the identity from it.
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError(f"broker host must not be empty, got {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port must be in 1..65535, got {self.port!r}")
        if self.ca_file is not None and not self.tls:
            raise ValueError(f"ca_file needs TLS (an mqtts:// URL), got {self.url!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if self.cert_file is not None and not self.tls:
            raise ValueError(f"a client certificate needs TLS (an mqtts:// URL), got "
                             f"{self.url!r}")

    @classmethod
    def parse(cls, url: str, *, ca_file: str | Path | None = None) -> BrokerAddress:
        """Parse ``mqtt://host[:port]`` / ``mqtts://host[:port]``; ``ValueError`` says why not.

        The one broker-URL check: the device config and the cloud settings validate with it, so
        a URL they accept is one the client connects to.
        """
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"broker URL scheme must be mqtt:// or mqtts://, got {url!r}")
        if parts.username is not None or parts.password is not None:  # never echo the password
            raise ValueError("credentials do not belong in the URL (URLs get logged): pass them "
                             "separately (client options, a device config's credentials "
                             f"section), got user info for host {parts.hostname!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"no path, query or fragment in a broker URL, got {url!r}")
        host = check_host(parts.hostname, url)
        try:
            port = parts.port
        except ValueError as err:  # urllib: out of range / not a number
            raise ValueError(f"invalid port in broker URL {url!r}: {err}") from None
        if port == 0:  # urllib reads ":0" as 0, which would otherwise mean "the default"
            raise ValueError(f"port 0 is not a broker port, got {url!r}")
        return cls(host, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts",
                   None if ca_file is None else Path(ca_file))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker when the client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ClientOptions:
    """Identity and session behaviour of one client."""

    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    will: Will | None = None
    clean_start: bool = False  # False: resume the broker-side session (subscriptions, queue)
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S  # how long the broker keeps the session
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    # True: a QoS 1 message is acknowledged only when the application calls ``ack`` (after it
    # has stored it); until then the broker keeps it and redelivers it after a reconnect.
    manual_ack: bool = False
    # How many unacknowledged QoS 1 messages the broker may send at once (MQTT v5 Receive
    # Maximum, 1-65535); None: the broker's own limit (Mosquitto's max_inflight_messages, 20).
    receive_maximum: int | None = None

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError(f"client_id must not be empty, got {self.client_id!r}")
        if self.session_expiry_s < 0 or self.keepalive_s < 1:
            raise ValueError(f"session_expiry_s >= 0 and keepalive_s >= 1, got "
                             f"{self.session_expiry_s!r} and {self.keepalive_s!r}")
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1-65535 (or None), got "
                             f"{self.receive_maximum!r}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(f"need 0 < reconnect_min_s <= reconnect_max_s, got "
                             f"{self.reconnect_min_s!r}, {self.reconnect_max_s!r}")


def make_paho_client(address: BrokerAddress, options: ClientOptions) -> mqtt.Client:
    """A configured, unconnected paho client: v5, credentials, will, TLS and backoff."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=options.client_id,
                         protocol=mqtt.MQTTv5, manual_ack=options.manual_ack)
    if options.username is not None:
        client.username_pw_set(options.username, options.password)
    if options.will is not None:
        will = options.will
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    if address.tls:
        client.tls_set(ca_certs=None if address.ca_file is None else str(address.ca_file),
                       certfile=None if address.cert_file is None else str(address.cert_file),
                       keyfile=None if address.key_file is None else str(address.key_file))
    client.reconnect_delay_set(options.reconnect_min_s, options.reconnect_max_s)
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Properties:
    """CONNECT properties: the session-expiry interval of a persistent session, and how many
    unacknowledged QoS 1 messages the client takes at once (None: the broker's default)."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def request_properties(response_topic: str, correlation_data: bytes) -> Properties:
    """PUBLISH properties of a v5 request: where to answer, and what to echo back."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation_data
    return props


def reply_properties(correlation_data: bytes | None) -> Properties | None:
    """PUBLISH properties of a v5 response: the request's correlation data echoed back."""
    if correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation_data
    return props


# --- Received messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A message as it came off the wire (decoded from paho's message on its thread)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    received_at: float = field(default_factory=time.monotonic)
    mid: int = 0  # the packet id, for ``MqttClient.ack``
    connection: int = 0  # which connection of the client it came on (a packet id's scope)

    @classmethod
    def from_paho(cls, message: mqtt.MQTTMessage, connection: int = 0) -> Received:
        props = message.properties
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        return cls(message.topic, bytes(message.payload), message.qos, bool(message.retain),
                   response, None if correlation is None else bytes(correlation),
                   mid=message.mid, connection=connection)


class Inbox:
    """A thread-safe FIFO of ``Received`` messages: paho's thread puts, workers get."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Received] = queue.Queue()

    def put(self, message: Received) -> None:
        self._queue.put(message)

    def get(self, timeout: float | None = None) -> Received | None:
        """The next message, waiting up to ``timeout`` seconds (None: forever); None if none."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_nowait(self) -> Received | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def __len__(self) -> int:
        return self._queue.qsize()


# --- The client ---------------------------------------------------------------------------------


def _filter_topic(topic_filter: str) -> str:
    """The topic part of a filter (``$share/group/a/+`` matches topics like ``a/+``)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(f"shared subscription must be $share/<group>/<filter>, "
                             f"got {topic_filter!r}")
        return parts[2]
    return topic_filter


@dataclass
class _Route:
    match: str  # the filter without its $share/<group>/ prefix
    qos: int
    inboxes: list[Inbox] = field(default_factory=list)


class _Acks:
    """Acknowledgements by mid, recorded on paho's thread and awaited by publishers."""

    def __init__(self) -> None:
        self._done: OrderedDict[int, ReasonCode | list[ReasonCode]] = OrderedDict()
        self._cond = threading.Condition()

    def record(self, mid: int, reason: ReasonCode | list[ReasonCode]) -> None:
        with self._cond:
            self._done[mid] = reason
            while len(self._done) > _ACK_MEMORY:
                self._done.popitem(last=False)
            self._cond.notify_all()

    def wait(self, mid: int, timeout: float) -> ReasonCode | list[ReasonCode] | None:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._done, timeout):
                return None
            return self._done.pop(mid)


class MqttClient:
    """One broker connection: paho in a background thread, inboxes for what arrives.

    Reconnects by itself with exponential backoff (``ClientOptions.reconnect_*``). With
    ``clean_start=False`` the broker keeps subscriptions and queued QoS 1 messages while the
    client is away; every (re)connect renews the subscriptions, in case the session is gone.
    """

    def __init__(self, address: BrokerAddress, options: ClientOptions) -> None:
        self.address = address
        self.options = options
        self.inbox = Inbox()  # messages that match no subscription's own inbox
        self._paho = make_paho_client(address, options)
        self._routes: dict[str, _Route] = {}  # by subscription filter
        self._lock = threading.Lock()
        self._acks = _Acks()
        self._connack = threading.Event()
        self._connected = threading.Event()
        self._refusal: ReasonCode | None = None
        self._tls_alert: str | None = None  # the last TLS alert paho's thread met
        self._connecting = False  # a connect() call is waiting for the CONNACK
        self._connection = 0  # counts successful connects: Received.connection
        self._install_callbacks()

    @property
    def paho(self) -> mqtt.Client:
        """The underlying paho client (for what this wrapper does not cover)."""
        return self._paho

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _install_callbacks(self) -> None:
        c = self._paho
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe

    # paho's network thread: record, enqueue, nothing else ---------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, props: Properties | None) -> None:
        if reason.is_failure:
            self._refusal = reason
            # A connect() waiting for this CONNACK raises with the reason; a reconnect of
            # paho's thread has nobody else to tell.
            log.log(logging.DEBUG if self._connecting else logging.WARNING,
                    "broker %s refused %s: %s", self.address.url, self.options.client_id,
                    reason)
        else:
            self._refusal = None
            self._connection += 1
            self._connected.set()
            self._resubscribe(client)  # harmless when the session kept them; needed when not
        self._connack.set()

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        # With TLS 1.3 the broker judges the client's certificate after the handshake looks
        # done to the client: its refusal arrives as an alert on the first read, which paho's
        # thread only logs. Keep it, so connect() can say why no CONNACK came.
        if level == mqtt.MQTT_LOG_ERR and "alert" in text:
            self._tls_alert = text

    def _resubscribe(self, client: mqtt.Client) -> None:
        with self._lock:
            filters = [(f, route.qos) for f, route in self._routes.items()]
        for topic_filter, qos in filters:
            client.subscribe(topic_filter, qos=qos)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, props: Properties | None) -> None:
        self._connected.clear()
        if reason.value != 0:
            # After a refused CONNACK the refusal is the news (connect() raises with it); the
            # broker closing that connection is not worth a second line.
            level = logging.DEBUG if self._refusal is not None else logging.INFO
            log.log(level, "%s disconnected from %s: %s", self.options.client_id,
                    self.address.url, reason)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        received = Received.from_paho(message, self._connection)
        for inbox in self._inboxes_for(received.topic):
            inbox.put(received)

    def _inboxes_for(self, topic: str) -> list[Inbox]:
        """Every inbox subscribed to a filter matching ``topic``; else the default inbox."""
        with self._lock:
            routes = list(self._routes.values())
        inboxes = [inbox for route in routes if mqtt.topic_matches_sub(route.match, topic)
                   for inbox in route.inboxes]
        return list({id(i): i for i in inboxes}.values()) or [self.inbox]

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode,
                    props: Properties | None) -> None:
        self._acks.record(mid, reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[ReasonCode], props: Properties | None) -> None:
        if any(r.is_failure for r in reasons):
            log.warning("%s: broker refused a subscription: %s", self.options.client_id,
                        [str(r) for r in reasons])
        self._acks.record(-mid, reasons)  # negative: SUBACK mids live beside PUBACK mids

    # the caller's threads ---------------------------------------------------------------------

    def connect(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Connect and wait for the CONNACK; ``ConnectError`` names the broker's reason code."""
        self._connack.clear()
        self._connecting = True
        try:
            self._connect(timeout)
        finally:
            self._connecting = False

    def _connect(self, timeout: float) -> None:
        opts = self.options
        try:  # the TCP (and TLS) connection now, so a refusal is reported at once
            self._paho.connect(self.address.host, self.address.port, opts.keepalive_s,
                               clean_start=opts.clean_start,
                               properties=connect_properties(opts.session_expiry_s,
                                                             opts.receive_maximum))
        except (OSError, ValueError) as err:  # refused, unreachable, no such host, TLS
            raise ConnectError(f"cannot connect to the broker at {self.address.url}: "
                               f"{_reason(err)}") from err
        self._tls_alert = None
        # paho formats a line for every packet while a log callback is set: only during connect
        self._paho.on_log = self._on_log
        self._paho.loop_start()
        answered = self._connack.wait(timeout)
        self._paho.on_log = None
        if not answered:
            self._stop_loop()
            alert = self._tls_alert
            if alert is not None and any(word in alert for word in CERTIFICATE_ALERTS):
                raise ConnectRefused(
                    f"broker {self.address.url} refused client {opts.client_id!r} in the TLS "
                    f"handshake: {alert.split('] ')[-1].split(' (_ssl')[0]} (check the "
                    "certificate and key the client presents, and the CA that signed them)",
                    NOT_AUTHORIZED)
            raise ConnectError(f"no CONNACK from {self.address.url} within {timeout:g} s "
                               f"(client {opts.client_id!r}): is the broker running?"
                               + (f" (last TLS error: {alert})" if alert else ""))
        if self._refusal is not None:
            reason, self._refusal = self._refusal, None
            self._stop_loop()
            raise ConnectRefused(f"broker {self.address.url} refused client "
                                 f"{opts.client_id!r} (user {opts.username!r}): {reason} "
                                 f"(reason code {reason.value})", reason.value)

    def wait_connected(self, timeout: float) -> bool:
        """Whether the client is (or becomes, within ``timeout`` s) connected."""
        return self._connected.wait(timeout)

    def subscribe(self, topic_filter: str, *, qos: int = 1, inbox: Inbox | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S) -> Inbox:
        """Subscribe; messages matching the filter go to the returned inbox (new unless given).

        Several inboxes may subscribe the same or overlapping filters: each gets its own copy.

        Connected: waits for the SUBACK, ``SubscribeError`` if the broker refuses (ACL).
        Not yet connected: registers the filter, which every (re)connect subscribes. Do that
        before ``connect`` for a persistent session, so messages the broker queued while the
        client was away, delivered right after the CONNACK, reach this inbox.
        """
        inbox = Inbox() if inbox is None else inbox
        with self._lock:
            route = self._routes.setdefault(topic_filter, _Route(_filter_topic(topic_filter), qos))
            route.qos = max(route.qos, qos)
            if all(i is not inbox for i in route.inboxes):
                route.inboxes.append(inbox)
        if not self.connected:
            return inbox
        rc, mid = self._paho.subscribe(topic_filter, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return inbox  # the link just dropped: the reconnect subscribes it
        reasons = self._acks.wait(-mid, timeout)
        if reasons is None:
            raise AckTimeout(f"no SUBACK for {topic_filter!r} within {timeout:g} s")
        refused = [r for r in _as_list(reasons) if r.is_failure]
        if refused:
            with self._lock:
                route.inboxes.remove(inbox)
                if not route.inboxes:
                    self._routes.pop(topic_filter, None)
            raise SubscribeError(f"broker refused subscription to {topic_filter!r}: {refused[0]}")
        return inbox

    def publish(self, topic: str, payload: bytes, *, max_bytes: int, qos: int = 1,
                retain: bool = False, properties: Properties | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """``publish_checked`` on this client."""
        publish_checked(self, topic, payload, max_bytes=max_bytes, qos=qos, retain=retain,
                        properties=properties, timeout=timeout)

    def publish_nowait(self, topic: str, payload: bytes, *, max_bytes: int, qos: int = 1,
                       retain: bool = False, properties: Properties | None = None) -> int:
        """Check the size and hand the message to paho without waiting; its message id.

        For QoS >= 1 wait with ``wait_ack(mid, ...)``: paho keeps the message queued across
        reconnects and resends it, so wait again rather than publish again (each publish
        would queue another copy). Published while disconnected, it goes out after the
        reconnect. ``MessageTooLarge`` / ``PublishError`` as ``publish_checked``.
        """
        check_packet_size(topic, payload, max_bytes=max_bytes, properties=properties, qos=qos)
        info = self._paho.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnectedError(f"QoS 0 publish to {topic!r} dropped: not connected")
        return int(info.mid)

    def ack(self, received: Received) -> bool:
        """Acknowledge a message of a ``manual_ack`` client once it is safely handled.

        Acknowledge in the order messages arrived (MQTT asks for PUBACKs in order), once
        each: with manual acks one consumer owns each message. A no-op (True) for QoS 0 or
        without manual acks. False (nothing sent) when the connection it came on is gone:
        the broker resends every unacknowledged message on the resumed session (DUP), and
        that copy is the one acknowledged -- so handling must be idempotent. Skipping the
        stale one keeps PUBACKs in the order of the new connection's deliveries.
        """
        if not self.options.manual_ack or received.qos == 0:
            return True
        if received.connection != self._connection or not self.connected:
            return False
        return self._paho.ack(received.mid, received.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def wait_ack(self, mid: int, timeout: float) -> ReasonCode | None:
        """The PUBACK reason code of message ``mid``, or None if none came within ``timeout``."""
        reasons = self._acks.wait(mid, timeout)
        return None if reasons is None else _as_list(reasons)[0]

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (the broker does not publish the last will); stop the thread."""
        if self._connected.is_set() and (
                self._paho.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS):
            deadline = time.monotonic() + timeout
            while self._connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)  # on_disconnect clears it once DISCONNECT has gone out
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._paho.disconnect()
        self._paho.loop_stop()
        self._connected.clear()

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_list(reasons: ReasonCode | list[ReasonCode]) -> list[ReasonCode]:
    return reasons if isinstance(reasons, list) else [reasons]


# --- Publishing ---------------------------------------------------------------------------------


def packet_size(topic: str, payload: bytes, properties: Properties | None = None,
                qos: int = 1) -> int:
    """Bytes of the PUBLISH packet carrying ``payload`` (what a broker's max_packet_size caps)."""
    props = len(properties.pack()) if properties is not None else 1  # pack() includes its length
    variable = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + props
    remaining = variable + len(payload)
    return 1 + _varint_len(remaining) + remaining


def _varint_len(value: int) -> int:
    size = 1
    while value >= 128:
        value //= 128
        size += 1
    return size


def check_packet_size(topic: str, payload: bytes, *, max_bytes: int,
                      properties: Properties | None = None, qos: int = 1) -> None:
    """Refuse (``MessageTooLarge``) a publish whose packet would exceed ``max_bytes``."""
    size = packet_size(topic, payload, properties, qos)
    if size > max_bytes:
        raise MessageTooLarge(f"message for {topic!r} of {len(payload):,} bytes "
                              f"({size:,} bytes as an MQTT packet) exceeds the limit of "
                              f"{max_bytes:,} bytes: not published")


def publish_checked(client: MqttClient, topic: str, payload: bytes, *, max_bytes: int,
                    qos: int = 1, retain: bool = False, properties: Properties | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Publish after checking the size, then wait for the broker's PUBACK (QoS 1/2).

    ``max_bytes`` is the whole packet's limit (the broker's ``max_packet_size``): an oversized
    message raises ``MessageTooLarge`` and is never handed to paho. ``AckTimeout`` if no PUBACK
    arrives within ``timeout`` s (paho keeps a QoS >= 1 message queued and resends it after a
    reconnect, so a retry may deliver it twice: make messages idempotent). ``PublishError`` if
    the broker answers with a failure reason code (e.g. "Not authorized" from its ACL).
    """
    mid = client.publish_nowait(topic, payload, max_bytes=max_bytes, qos=qos, retain=retain,
                                properties=properties)
    if qos == 0:
        return
    # A QoS >= 1 message published while disconnected stays queued in paho (rc NO_CONN) and
    # goes out after the reconnect: its PUBACK still arrives through on_publish.
    reason = client.wait_ack(mid, timeout)
    if reason is None:
        raise AckTimeout(f"no PUBACK for {topic!r} (mid {mid}) within {timeout:g} s")
    if reason.is_failure:
        raise PublishError(f"broker refused publish to {topic!r}: {reason} "
                           f"(reason code {reason.value})", reason.value)
