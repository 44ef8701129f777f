"""The offline image path and the Prometheus service, checked without a Docker engine: the
images ``scripts/build-images.sh --offline`` builds are the ones ``docker-compose.offline.yml``
names, the offline Dockerfiles keep the interface of the official images the stack relies on,
Prometheus scrapes the services on the ports they serve, and the scripts parse.
(``scripts/stack-run.sh`` runs all of it for real where a Docker engine is; docs/deploy.md.)"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.deploy_support import (
    COMPOSE_FILE,
    DOCKER_DIR,
    ROOT,
    environment,
    services,
    stack_run_module,
)

OFFLINE = DOCKER_DIR / "offline"
OVERRIDE = ROOT / "docker-compose.offline.yml"
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
PROMETHEUS = DOCKER_DIR / "prometheus" / "prometheus.yml"


def offline_images_built() -> dict[str, str]:
    """image tag -> Dockerfile, from the build script's offline_base lines."""
    text = BUILD_SCRIPT.read_text()
    variables = dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.MULTILINE))
    found = re.findall(r"offline_base\s+(\S+)\s+(\S+\.Dockerfile)", text)
    return {variables.get(name.strip('"$'), name): dockerfile for name, dockerfile in found}


def test_the_override_names_the_images_the_offline_build_makes() -> None:
    built = offline_images_built()
    override = yaml.safe_load(OVERRIDE.read_text())["services"]
    named = {s["image"] for s in override.values() if "image" in s}
    assert named and named <= set(built)
    assert {"postgres", "mosquitto", "prometheus"} <= set(override)
    for name in ("init", "api", "coordinator", "llm-worker", "edge-sim"):
        args = override[name]["build"]["args"]
        assert args["WHEELHOUSE"] == "/wheelhouse"
        assert args["PYTHON_IMAGE"] in built, name
    assert set(override) <= set(services()), "the override names a service the stack lacks"


def test_every_offline_dockerfile_exists_and_starts_from_the_debian_base() -> None:
    for dockerfile in offline_images_built().values():
        text = (OFFLINE / dockerfile).read_text()
        assert "FROM ${DEBIAN_IMAGE}" in text, dockerfile
        assert "ARG DEBIAN_IMAGE=fednano-debian:bookworm" in text, dockerfile
        for copied in re.findall(r"^COPY\s+(\S+)\s", text, re.MULTILINE):
            assert (OFFLINE / copied).is_file(), f"{dockerfile}: COPY {copied}"


def test_the_offline_mosquitto_keeps_the_official_images_interface() -> None:
    """uid/gid 1883 (the cloud image's group for the broker files), /docker-entrypoint.sh
    (docker/mosquitto/start.sh hands over to it), the paths the compose file mounts."""
    text = (OFFLINE / "mosquitto.Dockerfile").read_text()
    assert "--gid 1883 mosquitto" in text and "--uid 1883" in text
    assert "/docker-entrypoint.sh" in text and "mosquitto-clients" in text
    start = (DOCKER_DIR / "mosquitto" / "start.sh").read_text()
    assert "/docker-entrypoint.sh" in start
    for target in ("/mosquitto/config", "/mosquitto/data"):
        assert target in text


def test_the_offline_postgres_honours_the_variables_the_stack_sets() -> None:
    entrypoint = (OFFLINE / "postgres-entrypoint.sh").read_text()
    postgres = services()["postgres"]
    for name in environment(postgres):
        assert name in entrypoint, name
    assert "scram-sha-256" in entrypoint and "listen_addresses = '*'" in entrypoint
    subprocess.run(["sh", "-n", str(OFFLINE / "postgres-entrypoint.sh")], check=True)
    subprocess.run(["sh", "-n", str(OFFLINE / "mosquitto-entrypoint.sh")], check=True)


def test_prometheus_scrapes_every_service_on_the_port_it_serves() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"api", "coordinator", "llm-worker"}
    stack = services()
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:8000"]
    for name in ("coordinator", "llm-worker"):
        port = int(environment(stack[name])["FEDNANO_METRICS_PORT"])
        job = jobs[name]
        if name == "coordinator":
            assert job["static_configs"][0]["targets"] == [f"coordinator:{port}"]
        else:  # every replica, found through Docker's DNS
            sd = job["dns_sd_configs"][0]
            assert (sd["names"], sd["type"], sd["port"]) == (["llm-worker"], "A", port)
    mounted = stack["prometheus"]["volumes"][0].split(":")
    assert (ROOT / mounted[0]).resolve() == PROMETHEUS.resolve()
    assert mounted[1] == "/etc/prometheus/prometheus.yml"


def test_the_scripts_parse_and_explain_themselves() -> None:
    for script in ("build-images.sh", "stack-run.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
    helped = subprocess.run(["bash", str(BUILD_SCRIPT), "--help"], capture_output=True,
                            text=True, check=False)
    assert helped.returncode == 0 and "--offline" in helped.stdout
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "stack_run.py"), "--help"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "--seed-base" in run.stdout
    assert COMPOSE_FILE.name in (ROOT / "scripts" / "stack_run.py").read_text()


def test_the_wheelhouse_folder_is_kept_but_its_wheels_are_not() -> None:
    assert (DOCKER_DIR / "wheelhouse" / "README.md").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/wheelhouse/x.whl"],
                             cwd=ROOT, check=False)
    kept = subprocess.run(["git", "check-ignore", "-q", "docker/wheelhouse/README.md"],
                          cwd=ROOT, check=False)
    assert ignored.returncode == 0 and kept.returncode == 1
    assert Path(ROOT / ".dockerignore").read_text().count("docker/wheelhouse") == 0


def test_stack_run_gives_docker_cpu_weight_for_the_run_and_restores_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack_run = stack_run_module()
    shares = tmp_path / "cpu.shares"
    shares.write_text("1024\n")
    monkeypatch.setattr(stack_run, "DOCKER_CPU_SHARES", shares)
    run = stack_run.Run(stack_run.parse_args(["--docker-cpu-shares", "5120"]), ["docker-compose"])
    with pytest.raises(KeyboardInterrupt), stack_run.docker_cpu_shares(run):
        assert shares.read_text() == "5120\n"
        raise KeyboardInterrupt  # Ctrl-C mid-run still restores the weight
    assert shares.read_text() == "1024\n"
    monkeypatch.setattr(stack_run, "DOCKER_CPU_SHARES", tmp_path / "absent" / "cpu.shares")
    with pytest.raises(stack_run.CheckFailed, match="cgroup v1"), stack_run.docker_cpu_shares(run):
        pass


def test_stack_run_publishes_both_tls_listeners_and_kits_name_them() -> None:
    """The run remaps 8883 and 8884 to host ports of its own, and the kits the API makes
    name the broker where the host reaches it (the X.509 probe connects with the kit's URL)."""
    stack_run = stack_run_module()
    run = stack_run.Run(stack_run.parse_args(["--mqtts-x509-port", "28884"]), ["docker-compose"])
    env = run.env()
    assert env["FEDNANO_MQTTS_PORT"] == "18883" and env["FEDNANO_MQTTS_X509_PORT"] == "28884"
    stack = services(env)
    assert {"18883:8883", "28884:8884"} <= set(stack["mosquitto"]["ports"])
    for name in ("api", "init"):
        cloud = environment(stack[name])
        assert cloud["FEDNANO_DEVICE_X509_BROKER_URL"] == "mqtts://127.0.0.1:28884"
        assert cloud["FEDNANO_DEVICE_BROKER_URL"] == "mqtts://127.0.0.1:18883"


def test_stack_run_refuses_taken_host_ports_before_starting() -> None:
    stack_run = stack_run_module()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = stack_run.Run(stack_run.parse_args(["--mqtts-x509-port", str(port)]),
                            ["docker-compose"])
        with pytest.raises(stack_run.CheckFailed, match=f"{port} \\(--mqtts-x509-port"):
            stack_run.check_ports_free(run)


def test_stack_run_kill_round_trains_long_enough_to_meet_the_outage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a round whose devices finish before the coordinator dies tests no outage: the kill
    # round asks for --kill-round-steps local steps, and 0 is refused rather than read as 2
    stack_run = stack_run_module()
    asked: list[dict] = []
    monkeypatch.setattr(stack_run, "http_json",
                        lambda url, token="", method="GET", body=None: (asked.append(body),
                                                                          {"id": 7})[1])
    run = stack_run.Run(stack_run.parse_args(["--kill-round-steps", "30"]), ["docker-compose"])
    run.token = "t"
    assert stack_run.start_round(run) == 7
    assert stack_run.start_round(run, run.args.kill_round_steps) == 7
    assert [b["overrides"]["hparams"]["steps"] for b in asked] == [2, 30]
    assert stack_run.parse_args([]).kill_round_steps == 20
    with pytest.raises(SystemExit):
        stack_run.parse_args(["--kill-round-steps", "0"])
