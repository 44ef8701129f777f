"""A private Mosquitto on a free loopback port, configured the way production is.

Used by the simulated fleet and the demo (and, through ``tests/brokers.py``, by the tests):
``mosquitto -c conf`` in its own folder, its accounts and rights in the dynamic-security plugin
(the registry's file, ``cloud.registry.write_broker_files``; changed live over the plugin's
control topic, ``cloud.broker_admin``), the packet and queue limits (defaults lose acknowledged
QoS 1 messages under bursts) and persistence in its folder, saved after every change
(``Persistence``: acknowledged QoS 1 messages survive a kill -9, see docs/security.md).
``stop`` sends SIGTERM, which saves too, so ``restart`` keeps persistent sessions and queued
QoS 1 messages.

The folder is a fresh temporary one: as root, Mosquitto runs as the ``mosquitto`` user
(started as that user by ``setpriv``, so it dies with its parent, see ``_argv``), which must be
able to reach its files (a folder under ``/root`` would not do); the folder and its files are
handed to that user at every start.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fednano.processes import Child, launcher
from shared.files import atomic_write

MAX_PACKET_SIZE = 8 * 2**20  # 8 MiB, as in scripts/services.sh and DEFAULT_MAX_MESSAGE_BYTES
MAX_QUEUED_MESSAGES = 10_000
MAX_QUEUED_BYTES = 2**30
BROKER_USER = "mosquitto"
DYNSEC_FILE = "dynamic-security.json"  # the name cloud.registry.write_broker_files uses
CA_CERT_FILE = "ca.crt"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
# Where Debian/Ubuntu (multiarch) and the eclipse-mosquitto image put the plugin.
_PLUGIN_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so",
                 "/usr/lib/mosquitto_dynamic_security.so",
                 "/usr/local/lib/mosquitto_dynamic_security.so")


class BrokerUnavailable(RuntimeError):
    """No mosquitto binary, or it did not start (the message says which and shows its log)."""


def mosquitto_binary() -> str | None:
    """The mosquitto executable, or None."""
    return shutil.which("mosquitto") or next((p for p in _SEARCH if os.path.exists(p)), None)


def ensure_mosquitto(*, install: bool = True) -> str:
    """The mosquitto executable; installed with apt-get when missing, ``install`` is set and we
    are root; otherwise ``BrokerUnavailable`` saying how to install it."""
    found = mosquitto_binary()
    if found is not None:
        return found
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq",
                                                      "mosquitto"]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BrokerUnavailable(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
        found = mosquitto_binary()
        if found is not None:
            return found
    raise BrokerUnavailable(
        "the mosquitto binary is missing: install it (Debian/Ubuntu: sudo apt-get install -y "
        "mosquitto; run as root, the fleet and the demo install it themselves)")


def dynsec_plugin() -> str:
    """The dynamic-security plugin's path; ``BrokerUnavailable`` if it is not installed."""
    for pattern in _PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise BrokerUnavailable("mosquitto's dynamic-security plugin is missing "
                            "(mosquitto_dynamic_security.so; Debian's mosquitto package ships it)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (the loopback interface by default) right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def public_address() -> str:
    """This machine's IPv4 address on its default route (what other machines reach it by);
    ``BrokerUnavailable`` when it has none but the loopback. No packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # a documentation address: only routes are looked up
            address = str(sock.getsockname()[0])
        except OSError:
            address = socket.gethostbyname(socket.gethostname())
    if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0":
        raise BrokerUnavailable("this machine has no network address besides the loopback")
    return address


@dataclass(frozen=True)
class Persistence:
    """Mosquitto's persistence settings (``autosave_*``, see docs/security.md for the
    measurement behind the default). ``on_changes``: save after every ``interval`` changes
    (messages queued, subscriptions, retained messages), else every ``interval`` seconds."""

    enabled: bool = True
    on_changes: bool = True
    interval: int = 1

    def lines(self, folder: Path) -> list[str]:
        return [f"persistence {'true' if self.enabled else 'false'}",
                f"persistence_location {folder / 'data'}/",
                f"autosave_on_changes {'true' if self.on_changes else 'false'}",
                f"autosave_interval {self.interval}"]


ACKED_MEANS_KEPT = Persistence()


@dataclass(frozen=True)
class BrokerTls:
    """Two TLS listeners on ``host`` (an address of this machine that devices reach): one for
    passwords (``port``), one that requires a client certificate signed by ``ca_pem`` and takes
    the device's identity from its common name (``x509_port``). PEM contents; free ports when
    not given."""

    host: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    port: int = 0
    x509_port: int = 0

    def lines(self, folder: Path, port: int, x509_port: int) -> list[str]:
        files = [f"certfile {folder / SERVER_CERT_FILE}", f"keyfile {folder / SERVER_KEY_FILE}",
                 f"cafile {folder / CA_CERT_FILE}"]
        return [f"listener {port} {self.host}", *files,
                f"listener {x509_port} {self.host}", *files, "require_certificate true",
                "use_identity_as_username true", "use_username_as_clientid true"]


def mosquitto_config(*, port: int, folder: Path, max_packet_size: int = MAX_PACKET_SIZE,
                     persistence: Persistence = ACKED_MEANS_KEPT,
                     tls: BrokerTls | None = None) -> str:
    """The broker's configuration: a loopback listener (and ``tls``'s listeners), accounts and
    rights in the dynamic-security plugin, the limits."""
    return "\n".join([
        "allow_anonymous false",
        f"plugin {dynsec_plugin()}",
        f"plugin_opt_config_file {folder / DYNSEC_FILE}",
        *persistence.lines(folder),
        f"max_packet_size {max_packet_size}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        "log_dest stderr",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"listener {port} 127.0.0.1",
        *(tls.lines(folder, tls.port, tls.x509_port) if tls is not None else []),
        "",
    ])


class Mosquitto(Child):
    """A private broker; write its dynamic-security file into ``folder`` before ``start``.

    ``folder`` is a new temporary folder unless given; ``close`` deletes the folder it made.
    """

    def __init__(self, *, port: int | None = None, folder: Path | None = None,
                 max_packet_size: int = MAX_PACKET_SIZE, install: bool = False,
                 persistence: Persistence = ACKED_MEANS_KEPT,
                 tls: BrokerTls | None = None) -> None:
        self.binary = ensure_mosquitto(install=install)
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="fednano-mosquitto-")) if folder is None \
            else folder
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.max_packet_size = max_packet_size
        self.tls = tls
        if tls is not None:
            self.tls = dataclasses.replace(tls, port=tls.port or free_port(tls.host),
                                           x509_port=tls.x509_port or free_port(tls.host))
            for name, content, mode in ((CA_CERT_FILE, tls.ca_pem, 0o644),
                                        (SERVER_CERT_FILE, tls.cert_pem, 0o644),
                                        (SERVER_KEY_FILE, tls.key_pem, 0o600)):
                atomic_write(self.folder / name, content, prefix=f".{name}.", mode=mode)
        (self.folder / "mosquitto.conf").write_text(mosquitto_config(
            port=self.port, folder=self.folder, max_packet_size=max_packet_size,
            persistence=persistence, tls=self.tls))

    @property
    def dynsec_file(self) -> Path:
        return self.folder / DYNSEC_FILE

    @property
    def url(self) -> str:
        """The plaintext loopback listener (the cloud's services on this machine)."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """The TLS listener devices reach with a password (``tls`` needed)."""
        return self._tls_url(self._require_tls().port)

    @property
    def x509_url(self) -> str:
        """The TLS listener devices reach with a certificate (``tls`` needed)."""
        return self._tls_url(self._require_tls().x509_port)

    def _require_tls(self) -> BrokerTls:
        if self.tls is None:
            raise RuntimeError("this broker has no TLS listeners (Mosquitto(tls=...))")
        return self.tls

    def _tls_url(self, port: int) -> str:
        host = self._require_tls().host
        return f"mqtts://{f'[{host}]' if ':' in host else host}:{port}"

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            raise RuntimeError(f"broker already running on port {self.port}")
        if not self.dynsec_file.is_file():
            raise BrokerUnavailable(f"no {DYNSEC_FILE} in {self.folder}: write the broker's "
                                    "accounts first (cloud.registry.write_broker_files)")
        self._hand_over()
        with (self.folder / "mosquitto.log").open("ab") as log:
            self._process = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self._wait_listening(timeout)
        return self

    def _argv(self) -> list[str]:
        """The command line. As root, Mosquitto is started as its own user by ``setpriv``
        (which sets the death signal after switching): Mosquitto then never changes user
        itself, a change that would clear the death signal, so even a SIGKILLed parent leaves
        no broker behind. Otherwise ``launcher()`` in front of it, as for every child."""
        command = [self.binary, "-c", str(self.folder / "mosquitto.conf")]
        setpriv, user = shutil.which("setpriv"), _broker_user()
        if os.geteuid() == 0 and setpriv and user is not None:
            return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--clear-groups", "--pdeathsig", "SIGTERM", "--", *command]
        return [*launcher(), *command]

    def _hand_over(self) -> None:
        """As root, Mosquitto runs as its own user: let it read the files and write its data
        (the plugin rewrites its file in this folder after every change)."""
        os.chmod(self.folder, 0o755)
        user = _broker_user()
        if os.geteuid() != 0 or user is None:
            return  # not root, or no such user: mosquitto stays who we are
        for path in (self.folder, *self.folder.iterdir(), *(self.folder / "data").iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(self.dynsec_file, 0o600)  # the server key is 0600 already

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
        self.stop()
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

    def restart(self, timeout: float = 10.0, *, down_s: float = 0.0) -> None:
        """Stop (saving sessions and queued messages), stay down ``down_s``, start again on the
        same port."""
        self.stop()
        time.sleep(down_s)
        self.start(timeout)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (accounts change live, see cloud.broker_admin)."""
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("the broker is not running")
        self._hand_over()
        self._process.send_signal(signal.SIGHUP)

    def close(self) -> None:
        """Stop the broker and delete its folder if this object made it."""
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log(self, tail: int = 4000) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _broker_user() -> pwd.struct_passwd | None:
    """The ``mosquitto`` account, if this machine has one."""
    try:
        return pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
