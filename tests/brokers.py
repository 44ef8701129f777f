"""A private Mosquitto for tests: the real broker, configured the way production is.

``MosquittoBroker`` starts ``mosquitto -c conf`` on a free loopback port in its own folder,
with a password file (the registry's ``$7$`` hashes) and the registry's ACL (each device
confined to ``fednano/v1/devices/<id>/#``; service users get the whole tree), the packet and
queue limits of FACTS.md, and persistence in its folder: ``stop`` sends SIGTERM, which makes
Mosquitto save its database, so ``restart`` keeps persistent sessions and queued QoS 1 messages.

When the tests run as root, Mosquitto drops to the ``mosquitto`` user: the folder and files are
handed to that user so it can read its configuration and write its database.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cloud.registry import acl_file_text, hash_secret
from shared.mqtt import BrokerAddress, ClientOptions, MqttClient

MAX_PACKET_SIZE = 8 * 2**20  # 8 MiB, as in scripts/services.sh and DEFAULT_MAX_MESSAGE_BYTES
HASH_ITERATIONS = 1_000  # the broker pays this per CONNECT; tests need no stretching
BROKER_USER = "mosquitto"


class BrokerUnavailable(RuntimeError):
    """No mosquitto binary, or it did not start (the message says which and shows its log)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def mosquitto_binary() -> str:
    """The mosquitto executable; ``BrokerUnavailable`` saying how to install it otherwise."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None)
    if found is None:
        raise BrokerUnavailable("the mosquitto binary is missing: install it "
                                "(Debian/Ubuntu: apt-get install -y mosquitto; "
                                "scripts/services.sh does it when run as root)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MosquittoBroker:
    """A private broker with accounts for ``devices`` and ``services`` (random passwords)."""

    def __init__(self, *, devices: tuple[str, ...] = ("dev-a", "dev-b"),
                 services: tuple[str, ...] = ("cloud",),
                 max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self.binary = mosquitto_binary()
        self.devices = devices
        self.services = services
        self.max_packet_size = max_packet_size
        self.dir = Path(tempfile.mkdtemp(prefix="fednano-mosquitto-"))
        self.port = free_port()
        self._accounts = {name: Credentials(name, uuid.uuid4().hex)
                          for name in (*services, *devices)}
        self._process: subprocess.Popen[bytes] | None = None
        self._clients: list[MqttClient] = []
        self._write_files()

    # --- files --------------------------------------------------------------------------------

    def _write_files(self) -> None:
        (self.dir / "data").mkdir()
        passwd = "".join(f"{c.username}:{hash_secret(c.password, iterations=HASH_ITERATIONS)}\n"
                         for c in self._accounts.values())
        (self.dir / "passwd").write_text(passwd)
        (self.dir / "acl").write_text(acl_file_text(service_usernames=list(self.services)))
        (self.dir / "mosquitto.conf").write_text(self._config())
        self._hand_over()

    def _config(self) -> str:
        return "\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {self.dir / 'passwd'}",
            f"acl_file {self.dir / 'acl'}",
            "persistence true",
            f"persistence_location {self.dir / 'data'}/",
            f"max_packet_size {self.max_packet_size}",
            "max_queued_messages 10000",
            "max_queued_bytes 1073741824",
            "log_dest stderr",
            "",
        ])

    def _hand_over(self) -> None:
        """As root, Mosquitto runs as its own user: let it read the files and write its data."""
        os.chmod(self.dir, 0o755)
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam(BROKER_USER)
        except KeyError:
            return  # no such user: mosquitto stays root
        for path in (self.dir, *self.dir.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        for name in ("passwd", "acl"):
            os.chmod(self.dir / name, 0o600)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            raise RuntimeError(f"broker already running on port {self.port}")
        log = (self.dir / "mosquitto.log").open("ab")
        self._process = subprocess.Popen([self.binary, "-c", str(self.dir / "mosquitto.conf")],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)  # dies with our group
        log.close()
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                break
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()  # the folder (and its log) stays for close() to remove
        raise BrokerUnavailable(f"mosquitto did not start on port {self.port}:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence database) and wait; SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (saving sessions and queued messages) and start again on the same port."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Close the clients made by ``connect``, stop the broker and delete its folder."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # --- clients ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

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
