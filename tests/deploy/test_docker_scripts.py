"""The scripts the images run: the cloud entrypoint (secrets from files), the init service, the
edge-sim slot claim, the health probes and the secret/certificate generator."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.local_data import DataSpec
from tests.deploy.deploy_support import DOCKER_DIR, load_script

ENTRYPOINT = DOCKER_DIR / "cloud-entrypoint.sh"


def run_entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args],
                          env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30, check=False)


def printed_env(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


# ------------------------------------------------------------------------------ entrypoint


def test_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    key, password = tmp_path / "key", tmp_path / "db"
    key.write_text("s3cret key with spaces\n")
    password.write_text("p@ss:w/rd\n\n")
    result = run_entrypoint(["env"], {"FEDNANO_SECRET_KEY_FILE": str(key),
                                      "PGPASSWORD_FILE": str(password)})
    assert result.returncode == 0, result.stderr
    env = printed_env(result)
    assert env["FEDNANO_SECRET_KEY"] == "s3cret key with spaces"
    assert env["PGPASSWORD"] == "p@ss:w/rd"
    assert not {"FEDNANO_SECRET_KEY_FILE", "PGPASSWORD_FILE"} & set(env)


def test_entrypoint_refuses_a_missing_file_or_two_sources(tmp_path: Path) -> None:
    missing = run_entrypoint(["env"], {"FEDNANO_BROKER_PASSWORD_FILE": str(tmp_path / "no")})
    assert missing.returncode == 2 and "FEDNANO_BROKER_PASSWORD_FILE" in missing.stderr
    (tmp_path / "pw").write_text("x")
    both = run_entrypoint(["env"], {"FEDNANO_BROKER_PASSWORD_FILE": str(tmp_path / "pw"),
                                    "FEDNANO_BROKER_PASSWORD": "y"})
    assert both.returncode == 2 and "only one" in both.stderr


@pytest.fixture
def fake_fednano(tmp_path: Path) -> dict[str, str]:
    """A ``fednano`` on PATH that prints its arguments, one per line."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "fednano"
    script.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    script.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_each_llm_worker_replica_gets_its_own_client_id(fake_fednano: dict[str, str]) -> None:
    result = run_entrypoint(["fednano", "cloud", "llm-worker", "--device", "cpu"], fake_fednano)
    args = result.stdout.split()
    assert args[:5] == ["cloud", "llm-worker", "--device", "cpu", "--worker-id"]
    assert args[5] == f"llm-worker-{socket.gethostname()}"
    given = run_entrypoint(["fednano", "cloud", "llm-worker", "--worker-id", "w7"], fake_fednano)
    assert given.stdout.split() == ["cloud", "llm-worker", "--worker-id", "w7"]
    other = run_entrypoint(["fednano", "cloud", "api"], fake_fednano)
    assert other.stdout.split() == ["cloud", "api"]


# ------------------------------------------------------------------------------ edge-sim


def test_replicas_claim_distinct_slots_until_none_is_left(tmp_path: Path) -> None:
    sim = load_script("edge_sim")
    first, fd1 = sim.claim_slot(tmp_path, 2)
    second, fd2 = sim.claim_slot(tmp_path, 2)
    assert {first, second} == {0, 1}
    with pytest.raises(sim.SimError, match="all 2 slots are taken"):
        sim.claim_slot(tmp_path, 2)
    os.close(fd1)  # the container holding slot 0 died
    assert sim.claim_slot(tmp_path, 2)[0] == first
    os.close(fd2)


def test_a_slot_stays_held_by_the_exec_d_agent_until_it_dies(tmp_path: Path) -> None:
    sim = load_script("edge_sim")
    index, fd = sim.claim_slot(tmp_path, 1)
    agent = subprocess.Popen(["sleep", "30"], pass_fds=(fd,))  # inherits the locked fd
    os.close(fd)
    try:
        with pytest.raises(sim.SimError, match="slot 0 is taken"):
            sim.claim_slot(tmp_path, 1, pinned=0)
    finally:
        agent.kill()  # SIGKILL: nothing to clean up, the kernel drops the lock
        agent.wait()
    assert sim.claim_slot(tmp_path, 1, pinned=0)[0] == index


def test_pinned_index_is_checked(tmp_path: Path) -> None:
    sim = load_script("edge_sim")
    with pytest.raises(sim.SimError, match="below the fleet's 3 devices"):
        sim.claim_slot(tmp_path, 3, pinned=3)
    with pytest.raises(sim.SimError, match="whole number"):
        sim.pinned_index({sim.INDEX_ENV: "two"})
    assert sim.pinned_index({}) is None and sim.pinned_index({sim.INDEX_ENV: "2"}) == 2
    with pytest.raises(sim.SimError, match="no devices"):
        sim.claim_slot(tmp_path, 0)


def test_every_slot_gets_its_own_valid_data_shard() -> None:
    sim = load_script("edge_sim")
    specs = [DataSpec.parse(sim.data_spec(i, 5, "alpha=0.1,by=question,")) for i in range(5)]
    assert [(s.index, s.of, s.alpha) for s in specs] == [(i, 5, 0.1) for i in range(5)]
    assert DataSpec.parse(sim.data_spec(0, 1, "")).of == 1
    assert DataSpec.parse(sim.data_spec(0, 1, sim.DEFAULT_DATA_OPTIONS)).alpha == 0.5


def test_edge_sim_reads_the_fleet_manifest_init_writes(tmp_path: Path) -> None:
    init, sim = load_script("cloud_init"), load_script("edge_sim")
    archive = tmp_path / "b1.tar"
    archive.write_bytes(b"bundle")
    entry = SimpleNamespace(manifest=SimpleNamespace(bundle_version="b1"), archive=archive)
    manifest = init.fleet_manifest(["sim-000", "sim-001"], entry, "http://api:8000")
    (tmp_path / sim.FLEET_MANIFEST).write_text(json.dumps(manifest))
    fleet = sim.Fleet.load(tmp_path / init.FLEET_MANIFEST)
    assert fleet.devices == ["sim-000", "sim-001"]
    assert fleet.bundle_url == "http://api:8000/api/v1/bundles/b1"
    assert fleet.bundle_sha256 == hashlib.sha256(b"bundle").hexdigest()
    with pytest.raises(sim.SimError, match="written by the init service"):
        sim.Fleet.load(tmp_path / "missing.json")


def test_edge_sim_skips_the_download_when_the_bundle_is_installed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = load_script("edge_sim")
    fleet = sim.Fleet(["sim-000"], "b1", "0" * 64, "http://api:8000/api/v1/bundles/b1")
    calls: list[list[str]] = []

    def fake_run(argv: list[str], check: bool) -> SimpleNamespace:
        calls.append(argv)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(sim.subprocess, "run", fake_run)
    sim.ensure_bundle(fleet, tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"bundle_version": "b1"}))
    sim.ensure_bundle(fleet, tmp_path)
    assert calls == [sim.fetch_argv(fleet, tmp_path)]


# ------------------------------------------------------------------------------ init


def test_init_registers_missing_devices_only(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    init = load_script("cloud_init")
    calls: list[list[str]] = []

    def fake_run(argv: list[str], env: dict[str, str] | None = None) -> None:
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "device.yaml").write_text("device_id: x\n")

    monkeypatch.setattr(init, "run", fake_run)
    assert init.ensure_devices(tmp_path, 2, "sim-cpu") == ["sim-000", "sim-001"]
    assert init.ensure_devices(tmp_path, 3, "sim-cpu") == ["sim-000", "sim-001", "sim-002"]
    assert [argv[3] for argv in calls] == ["sim-000", "sim-001", "sim-002"]


def test_init_settings_are_checked(tmp_path: Path) -> None:
    init = load_script("cloud_init")
    assert init.sim_settings({init.FLEET_DIR_ENV: str(tmp_path), init.SIM_DEVICES_ENV: "4"}) \
        == (tmp_path, 4, init.DEFAULT_PROFILE)
    with pytest.raises(init.InitError, match="whole number"):
        init.sim_settings({init.FLEET_DIR_ENV: str(tmp_path), init.SIM_DEVICES_ENV: "-1"})
    with pytest.raises(init.InitError, match=init.FLEET_DIR_ENV):
        init.sim_settings({})


def test_init_stops_at_a_failing_command() -> None:
    init = load_script("cloud_init")
    with pytest.raises(init.InitError, match="exit code 3"):
        init.run([sys.executable, "-c", "raise SystemExit(3)"])


def test_simulated_devices_get_the_cloud_broker_and_no_ca_key() -> None:
    init = load_script("cloud_init")
    environ = {"PATH": os.environ["PATH"], "FEDNANO_DEVICE_BROKER_URL": "mqtts://h:8883",
               "FEDNANO_DEVICE_CA_FILE": "/run/secrets/broker_ca_cert",
               "FEDNANO_DEVICE_CA_KEY_FILE": "/run/secrets/broker_ca_key"}
    env = init.sim_device_env("mqtt://mosquitto:1883", environ)
    assert env == {"PATH": os.environ["PATH"], "FEDNANO_DEVICE_BROKER_URL": "mqtt://mosquitto:1883",
                   "FEDNANO_DEVICE_CA_FILE": "/run/secrets/broker_ca_cert"}
    check = "import os, sys; sys.exit(0 if os.environ['FEDNANO_DEVICE_BROKER_URL'] == " \
            "'mqtt://mosquitto:1883' and 'FEDNANO_DEVICE_CA_KEY_FILE' not in os.environ else 5)"
    init.run([sys.executable, "-c", check], env)  # the command gets exactly that environment


# ------------------------------------------------------------------------------ health probes


TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0B00007F:A1B2 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1
   1: 0200A8C0:C350 0300A8C0:075B 01 00000000:00000000 00:00000000 00000000 10001        0 2
   2: 0200A8C0:C351 0300A8C0:1F40 06 00000000:00000000 00:00000000 00000000 10001        0 3
"""


def test_probe_finds_established_connections_only() -> None:
    health = load_script("healthcheck")
    assert health.established_remote_ports(TCP_TABLE.splitlines()) == {1883}


def test_mqtt_probe_sees_a_real_connection() -> None:
    health = load_script("healthcheck")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not health.mqtt_healthy({port})
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = server.accept()
            with conn:
                assert health.mqtt_healthy({port})


def test_http_probe(tmp_path: Path) -> None:
    health = load_script("healthcheck")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert health.main(["http", f"{base}/ok"]) == 0
        assert health.main(["http", f"{base}/ready"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert health.main(["http", base + "/ok"]) == 1  # nobody listens any more
    assert health.main(["mqtt", "x"]) == 2 and health.main([]) == 2


# ------------------------------------------------------------------------------ gen-secrets.sh


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_gen_secrets_creates_everything_once(tmp_path: Path) -> None:
    script = DOCKER_DIR / "gen-secrets.sh"
    env = {**os.environ, "FEDNANO_BROKER_HOSTNAMES": "broker.example.com 203.0.113.7"}
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, capture_output=True,
                   env=env, timeout=60)
    files = {p.relative_to(tmp_path).as_posix(): p for p in tmp_path.rglob("*") if p.is_file()}
    assert {"secrets/db_password", "secrets/secret_key", "secrets/broker_password",
            "certs/ca.crt", "certs/ca.key", "certs/server.crt", "certs/server.key"} <= set(files)
    assert len(files["secrets/db_password"].read_text().strip()) == 64
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE(files["certs/server.key"].stat().st_mode) == 0o600
    # The api and init containers (uid 10001, not the host's owner) read the CA key: 0644, in
    # a folder only the owner enters.
    assert stat.S_IMODE(files["certs/ca.key"].stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700
    from cloud.pki import Issuer

    Issuer.load(files["certs/ca.crt"], files["certs/ca.key"])  # a CA the cloud signs with
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(files["certs/ca.crt"]),
                             str(files["certs/server.crt"])], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                           str(files["certs/server.crt"])], capture_output=True, text=True,
                          check=True).stdout
    for name in ("DNS:mosquitto", "DNS:localhost", "IP Address:127.0.0.1",
                 "DNS:broker.example.com", "IP Address:203.0.113.7"):
        assert name in text
    before = {name: path.read_bytes() for name, path in files.items()}
    subprocess.run(["bash", str(script), str(tmp_path)], check=True, capture_output=True,
                   timeout=60)
    assert {name: path.read_bytes() for name, path in files.items()} == before
