"""A private Mosquitto for tests: ``fednano.broker.Mosquitto`` with accounts made up here.

``MosquittoBroker`` is the product's private broker (``fednano/broker.py``: free loopback
port, accounts and rights in the dynamic-security plugin -- each device bound to its client
id and confined to its own topics --, the packet and queue limits, persistence in its folder,
handed to the ``mosquitto`` user when run as root) with random passwords for a few device and
service accounts, and ``connect`` for clients that ``close`` closes. ``stop`` sends SIGTERM,
which makes Mosquitto save its database, so ``restart`` keeps persistent sessions and queued
QoS 1 messages; ``kill_and_start`` is a crash.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from cloud.registry import dynsec_document, hash_secret
from fednano.broker import MAX_PACKET_SIZE, BrokerUnavailable, Mosquitto, free_port
from shared.mqtt import BrokerAddress, ClientOptions, MqttClient

__all__ = ["MAX_PACKET_SIZE", "BrokerUnavailable", "Credentials", "MosquittoBroker", "free_port"]

HASH_ITERATIONS = 1_000  # the broker pays this per CONNECT; tests need no stretching


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


class MosquittoBroker:
    """A private broker with accounts for ``devices`` and ``services`` (random passwords)."""

    def __init__(self, *, devices: tuple[str, ...] = ("dev-a", "dev-b"),
                 services: tuple[str, ...] = ("cloud",),
                 max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self._broker = Mosquitto(max_packet_size=max_packet_size)
        self.devices = devices
        self.services = services
        self.max_packet_size = max_packet_size
        self._accounts = {name: Credentials(name, uuid.uuid4().hex)
                          for name in (*services, *devices)}
        self._clients: list[MqttClient] = []
        hashed = {name: hash_secret(c.password, iterations=HASH_ITERATIONS)
                  for name, c in self._accounts.items()}
        self._broker.dynsec_file.write_text(json.dumps(dynsec_document(
            services=[(name, hashed[name]) for name in services],
            devices=[(name, hashed[name]) for name in devices])))

    @property
    def dir(self) -> Path:
        return self._broker.folder

    @property
    def port(self) -> int:
        return self._broker.port

    @property
    def running(self) -> bool:
        return self._broker.running

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start the broker and wait until its port accepts connections."""
        self._broker.start(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence database) and wait; SIGKILL if it hangs."""
        self._broker.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        self._broker.kill()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (saving sessions and queued messages) and start again on the same port."""
        self._broker.restart(timeout)

    def close(self) -> None:
        """Close the clients made by ``connect``, stop the broker and delete its folder."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self._broker.close()

    def log(self) -> str:
        return self._broker.log()

    def kill_and_start(self, timeout: float = 10.0) -> None:
        """SIGKILL (a crash: nothing saved at shutdown) and start again on the same port."""
        self._broker.kill()
        self._broker.start(timeout)

    # --- clients ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._broker.url

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress.parse(self.url)

    def credentials(self, name: str) -> Credentials:
        """The username and password of a device or service account of this broker."""
        if name not in self._accounts:
            raise KeyError(f"no account {name!r}; have {sorted(self._accounts)}")
        return self._accounts[name]

    def options(self, name: str, *, client_id: str | None = None,
                **kwargs: object) -> ClientOptions:
        """ClientOptions for account ``name`` (client id: the name, or ``client_id``)."""
        creds = self.credentials(name)
        return ClientOptions(client_id=client_id or name, username=creds.username,
                             password=creds.password, **kwargs)  # type: ignore[arg-type]

    def connect(self, name: str, *, client_id: str | None = None, timeout: float = 10.0,
                **kwargs: object) -> MqttClient:
        """A connected client for account ``name``, closed by ``close``."""
        client = MqttClient(self.address, self.options(name, client_id=client_id, **kwargs))
        client.connect(timeout)
        self._clients.append(client)
        return client

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
