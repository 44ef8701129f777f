"""Run the docker-compose stack for real, check it, tear it down (``scripts/stack-run.sh``).

Steps, each timed:

1. build every image (``scripts/build-images.sh``, ``--offline``: no registry, no index);
2. secrets and certificates (``docker/gen-secrets.sh``), a clean project (``down -v``);
3. ``up -d``: PostgreSQL, the one-shot init (migrations, base build -- minutes -- or a seeded
   base, bundle export, device registration, broker files), Mosquitto (TLS listener, one
   password per device), the API, the coordinator, LLM worker replicas, Prometheus and the
   simulated devices;
4. an operator token, then rounds through the REST API (``POST /api/v1/rounds``) until
   each closes;
5. a round during which one LLM worker and then the coordinator are ``docker kill``-ed (the
   coordinator while the devices' updates are arriving, so the broker holds them); the
   coordinator is started again and the round must close with every update;
6. nothing acknowledged lost: every task a device recorded as done (its durable state in the
   fleet volume, written only after the broker's PUBACK) has its update row in PostgreSQL,
   counted with SQL, and the rounds' accepted updates equal their participants;
7. Prometheus: every target up (API, coordinator, each LLM worker) and the update, round,
   aggregation and LLM batch metrics non-zero, through its HTTP API;
8. the broker's TLS listener with a device's own credentials (accepted) and a wrong password
   (refused), from inside the network;
9. an X.509 device through the API (``POST /api/v1/devices``, ``"credential": "x509"``), then
   from the host on the published certificate listener (8884) with the key and certificate of
   the answer: its status topic published (QoS 1, accepted), a connection without a
   certificate refused; the device revoked through the API, then the same publish refused
   ("not authorized", reason code 135);
10. ``down -v`` (unless ``--keep``).

Exit 0 when every check passed. Python standard library only; talks to Docker through the
``docker`` and compose command lines. The API and Prometheus are reached on the host's loopback
through their published ports. The X.509 probe is the one part that runs the project's own MQTT
client (``shared.mqtt``, paho): in a child process of ``--probe-python`` (default: the
repository's ``.venv``, else this interpreter) with the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLEET_MOUNT = "/var/lib/fednano-fleet"


class CheckFailed(RuntimeError):
    """A check of the run failed; the message says which and what was seen."""


@dataclass
class Run:
    """The run's options, compose command line and what it measured."""

    args: argparse.Namespace
    compose_cmd: list[str]
    started: float = field(default_factory=time.monotonic)
    timings: list[tuple[str, float]] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    token: str = ""
    last_progress: tuple[int, str, int] | None = None
    last_progress_at: float = 0.0

    @property
    def project(self) -> str:
        return str(self.args.project)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.args.api_port}"

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.args.prometheus_port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "FEDNANO_SIM_DEVICES": str(self.args.devices),
                "FEDNANO_LLM_WORKERS": str(self.args.workers),
                "FEDNANO_API_PORT": str(self.args.api_port),
                "FEDNANO_PROMETHEUS_PORT": str(self.args.prometheus_port),
                "FEDNANO_MQTTS_PORT": str(self.args.mqtts_port),
                "FEDNANO_MQTTS_X509_PORT": str(self.args.mqtts_x509_port),
                # The broker's name in the kits the API makes (FEDNANO_DEVICE_*BROKER_URL): the
                # host's loopback, where the ports above are published and which the broker's
                # certificate names (gen-secrets.sh), so the X.509 probe uses the kit as it is.
                "FEDNANO_BROKER_PUBLIC_HOST": self.args.broker_public_host,
                "FEDNANO_LOG_FORMAT": "json", "FEDNANO_TAG": self.args.tag,
                "FEDNANO_BUNDLE_MIN_COSINE": self.args.bundle_min_cosine or "",
                "FEDNANO_EVAL_QUESTIONS": str(self.args.eval_questions),
                "FEDNANO_SIM_LLM_TIMEOUT": str(self.args.llm_timeout)}

    def compose(self, *argv: str, check: bool = True, capture: bool = False,
                timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        files = ["-f", "docker-compose.yml"]
        if self.args.offline:
            files += ["-f", "docker-compose.offline.yml"]
        return sh([*self.compose_cmd, "-p", self.project, *files, *argv], env=self.env(),
                  check=check, capture=capture, timeout=timeout)

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[stack-run {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}",
              flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.timings.append((name, took))
        self.say(f"{name}: done in {took:.0f} s")


# ------------------------------------------------------------------------------ helpers


def sh(argv: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True,
       capture: bool = False, timeout: float | None = None,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` from the repository root; output to ours unless ``capture``."""
    done = subprocess.run(list(argv), cwd=ROOT, env=env, text=True, timeout=timeout,
                          capture_output=capture, input=stdin, check=False)
    if check and done.returncode != 0:
        detail = f":\n{(done.stderr or '')[-3000:]}" if capture else ""
        raise CheckFailed(f"`{shlex.join(argv)}` exited {done.returncode}{detail}")
    return done


def compose_command() -> list[str]:
    """``docker compose`` (v2) when it is there, else Debian's ``docker-compose`` (1.29)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True,
                      check=False).returncode == 0:
        return ["docker", "compose"]
    if subprocess.run(["docker-compose", "version"], capture_output=True,
                      check=False).returncode == 0:
        return ["docker-compose"]
    raise CheckFailed("neither `docker compose` nor `docker-compose` runs: install one "
                      "(Debian: apt-get install docker-compose)")


def wait_for(what: str, predicate: Callable[[], Any], timeout: float,
             every: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def http_json(url: str, *, token: str = "", method: str = "GET",
              body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except (urllib.error.URLError, OSError):
        return False


# ------------------------------------------------------------------------------ steps


def build(run: Run) -> None:
    if run.args.no_build:
        run.say("--no-build: using the images there are")
        return
    sh(["bash", "scripts/build-images.sh", "--tag", run.args.tag,
        *(["--offline"] if run.args.offline else [])])


def fresh_project(run: Run) -> None:
    sh(["bash", "docker/gen-secrets.sh"])
    run.compose("down", "-v", "--remove-orphans", check=False, capture=True)
    check_ports_free(run)


def check_ports_free(run: Run) -> None:
    """The host ports the stack publishes, free before ``up -d`` (which otherwise fails late,
    after init, with "address already in use"); the option that moves each one."""
    import socket

    taken = []
    for option, port in (("--api-port", run.args.api_port),
                         ("--prometheus-port", run.args.prometheus_port),
                         ("--mqtts-port", run.args.mqtts_port),
                         ("--mqtts-x509-port", run.args.mqtts_x509_port)):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as err:
                taken.append(f"{port} ({option}: {err.strerror})")
    if taken:
        raise CheckFailed("host ports taken, choose others: " + ", ".join(taken))


def seed_base(run: Run) -> None:
    """Copy an already built base into the cloud-home volume, so init skips the build."""
    source = Path(run.args.seed_base).expanduser().resolve()
    if not (source / "base" / "current").is_file():
        raise CheckFailed(f"--seed-base {source}: no base/current (a FEDNANO_HOME with a base)")
    folders = " ".join(f"/seed/{name}" for name in ("base", "llm", "features")
                       if (source / name).is_dir())
    run.compose("create", "init", capture=True)  # creates the volumes with the image's owners
    volume = f"{run.project}_cloud-home"
    # As root: a base build writes some files 0600; they are handed to the image's user.
    sh(["docker", "run", "--rm", "--network", "none", "--user", "0:0",
        "-v", f"{volume}:/var/lib/fednano", "-v", f"{source}:/seed:ro",
        "--entrypoint", "/bin/sh", f"fednano-cloud:{run.args.tag}", "-c",
        f"cp -r {folders} /var/lib/fednano/ && chown -R fednano:fednano /var/lib/fednano "
        "&& cat /var/lib/fednano/base/current"], env=run.env())
    run.facts.append(f"base seeded from {source} (init skipped the base build)")


def start(run: Run) -> None:
    run.compose("up", "-d")
    wait_for("the API", lambda: reachable(f"{run.api}/api/v1/ready"), 300)
    # Through the entrypoint: `exec` does not run it, and it loads the secrets (_FILE).
    token = run.compose("exec", "-T", "api", "/bin/sh", "/opt/fednano/docker/cloud-entrypoint.sh",
                        "fednano", "cloud", "token", "create", "stack-run",
                        capture=True).stdout.strip().splitlines()
    run.token = token[-1].strip()


def devices_online(run: Run) -> int:
    page = http_json(f"{run.api}/api/v1/devices?limit=100", token=run.token)
    return sum(1 for d in page["items"] if d["online"])


def start_round(run: Run, steps: int | None = None) -> int:
    overrides = {"min_participants": run.args.devices, "quorum_fraction": 1.0,
                 "deadline_s": run.args.round_timeout,
                 "hparams": {"steps": run.args.steps if steps is None else steps,
                             "batch_size": run.args.batch_size,
                             "fisher_samples": run.args.fisher_samples}}
    created = http_json(f"{run.api}/api/v1/rounds", token=run.token, method="POST",
                        body={"overrides": overrides})
    return int(created["id"])


def round_detail(run: Run, round_id: int) -> dict[str, Any]:
    detail: dict[str, Any] = http_json(f"{run.api}/api/v1/rounds/{round_id}", token=run.token)
    return detail


def finished(run: Run, round_id: int) -> dict[str, Any] | None:
    try:
        detail = round_detail(run, round_id)
    except (urllib.error.URLError, OSError):
        return None  # the API may restart with its dependencies
    progress(run, detail)
    return detail if detail["state"] in ("closed", "failed") else None


def progress(run: Run, detail: dict[str, Any]) -> None:
    """A line when a round changes state or receives an update, and once a minute anyway."""
    seen = (detail["id"], detail["state"], len(detail["updates"]))
    now = time.monotonic()
    if seen == run.last_progress and now - run.last_progress_at < 60:
        return
    run.last_progress, run.last_progress_at = seen, now
    statuses = ", ".join(sorted(f"{p['device_id']} {p['status']}"
                                for p in detail["participations"]))
    run.say(f"  round {detail['id']}: {detail['state']}, {len(detail['updates'])} updates "
            f"({statuses})")


def check_closed(run: Run, detail: dict[str, Any]) -> None:
    accepted = [u for u in detail["updates"] if u["status"] == "accepted"]
    participants = len(detail["participations"])
    if detail["state"] != "closed" or len(accepted) != participants:
        raise CheckFailed(f"round {detail['id']}: {detail['state']} "
                          f"({detail.get('failure_reason')}), {len(accepted)} accepted updates "
                          f"of {participants} participants")


def one_round(run: Run, number: int) -> None:
    round_id = start_round(run)
    detail = wait_for(f"round {round_id} to finish", lambda: finished(run, round_id),
                      run.args.round_timeout)
    check_closed(run, detail)
    run.facts.append(f"round {round_id}: closed, {len(detail['updates'])} updates accepted "
                     f"from {len(detail['participations'])} devices")


def container_ids(run: Run, service: str) -> list[str]:
    return run.compose("ps", "-q", service, capture=True).stdout.split()


def running(container: str) -> bool:
    done = sh(["docker", "inspect", "-f", "{{.State.Running}}", container], capture=True,
              check=False)
    return done.stdout.strip() == "true"


def device_done_tasks(run: Run) -> dict[str, list[str]]:
    """Each simulated device's finished task ids from its durable state (fleet volume)."""
    script = ("import json,pathlib,sys; f=pathlib.Path(sys.argv[1]); out={}\n"
              "for d in sorted(f.glob('sim-*')):\n"
              "    p=d/'state'/'agent'/'done.json'\n"
              "    out[d.name]=json.loads(p.read_text())['tasks'] if p.exists() else []\n"
              "print(json.dumps(out))")
    done = sh(["docker", "run", "--rm", "--network", "none", "-v",
               f"{run.project}_fleet:{FLEET_MOUNT}:ro", "--entrypoint", "python",
               f"fednano-edge:{run.args.tag}", "-c", script, FLEET_MOUNT], capture=True,
              env=run.env())
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


def round_with_kills(run: Run) -> int:
    """Kill an LLM worker, then the coordinator while updates arrive; restart it; wait.

    The round trains ``--kill-round-steps`` local steps, so that the devices are still
    training when the coordinator goes down; a round whose every update was in before the kill
    tested no outage, and fails the run rather than pass it."""
    round_id = start_round(run, run.args.kill_round_steps)
    wait_for(f"round {round_id} collecting",
             lambda: round_detail(run, round_id)["state"] == "collecting", 120, every=1)
    workers = container_ids(run, "llm-worker")
    coordinator = container_ids(run, "coordinator")[0]  # looked up first: compose is slow
    sh(["docker", "kill", workers[0]], capture=True)
    run.facts.append(f"round {round_id}: docker kill llm-worker {workers[0][:12]} "
                     f"({len(workers) - 1} left) while the devices train")
    time.sleep(run.args.kill_gap)
    sh(["docker", "kill", coordinator], capture=True)
    killed_at = time.monotonic()
    task = f"task-{round_id}-"

    def sent(done: dict[str, list[str]]) -> int:
        return sum(any(t.startswith(task) for t in tasks) for tasks in done.values())

    count = f"SELECT count(*) FROM updates WHERE round_id = {round_id}"
    rows_before = sql(run, count)  # first: the dead coordinator stores no more, devices send
    sent_before = sent(device_done_tasks(run))
    if int(rows_before or 0) >= run.args.devices:
        raise CheckFailed(f"round {round_id}: all {rows_before} updates were stored before the "
                          "coordinator was killed, so none met the outage; raise "
                          "--kill-round-steps (or lower --kill-gap)")
    wait_for("every device to send its update of the round (coordinator down)",
             lambda: sent(device_done_tasks(run)) == run.args.devices,
             run.args.round_timeout, every=2)
    rows = sql(run, count)
    run.facts.append(f"round {round_id}: docker kill coordinator; at that moment "
                     f"{sent_before} of {run.args.devices} devices had sent their update and "
                     f"{rows_before} update rows were in the database; the other "
                     f"{run.args.devices - sent_before} sent theirs (PUBACK from the broker) "
                     f"while it was down; update rows just before it came back: {rows}")
    restarted_by_policy = wait_or_false(lambda: running(coordinator), 10)
    if not restarted_by_policy:
        run.compose("start", "coordinator", capture=True)
    run.facts.append(f"coordinator back after {time.monotonic() - killed_at:.0f} s "
                     f"({'restart policy' if restarted_by_policy else 'compose start'})")
    detail = wait_for(f"round {round_id} to finish", lambda: finished(run, round_id),
                      run.args.round_timeout)
    check_closed(run, detail)
    run.facts.append(f"round {round_id}: closed with all {len(detail['updates'])} updates")
    return round_id


def wait_or_false(predicate: Callable[[], bool], timeout: float) -> bool:
    try:
        wait_for("", predicate, timeout, every=1)
    except CheckFailed:
        return False
    return True


def sql(run: Run, query: str) -> str:
    done = run.compose("exec", "-T", "postgres", "psql", "-U", "fednano", "-d", "fednano",
                       "-AtF", "|", "-c", query, capture=True)
    return done.stdout.strip()


def update_id_for(device_id: str, task_id: str) -> str:
    """As ``edge.state.update_id_for`` (this script imports nothing of the project)."""
    import hashlib

    digest = hashlib.sha256(f"{device_id}\n{task_id}".encode()).hexdigest()
    return f"u-{digest[:32]}"


def check_nothing_lost(run: Run) -> None:
    done = device_done_tasks(run)
    stored = dict(line.split("|") for line in sql(
        run, "SELECT update_id, status FROM updates").splitlines() if line)
    missing = [(device, task) for device, tasks in done.items() for task in tasks
               if update_id_for(device, task) not in stored]
    acked = sum(len(tasks) for tasks in done.values())
    if missing:
        raise CheckFailed(f"{len(missing)} of {acked} acknowledged updates have no row in the "
                          f"database: {missing[:5]}")
    per_round = sql(run, "SELECT r.id, r.state, count(DISTINCT p.device_id), "
                         "count(DISTINCT u.update_id) FILTER (WHERE u.status = 'accepted') "
                         "FROM rounds r JOIN participations p ON p.round_id = r.id "
                         "LEFT JOIN updates u ON u.round_id = r.id GROUP BY r.id, r.state "
                         "ORDER BY r.id")
    for line in per_round.splitlines():
        round_id, state, participants, accepted = line.split("|")
        if state != "closed" or participants != accepted:
            raise CheckFailed(f"round {round_id}: {state}, {accepted} accepted of "
                              f"{participants} participants")
    run.facts.append(f"nothing lost: {acked} updates acknowledged to the devices (their "
                     f"done.json), {acked} rows in PostgreSQL; per round (id|state|participants"
                     f"|accepted): {', '.join(per_round.splitlines())}")


def check_prometheus(run: Run) -> None:
    time.sleep(12)  # one more scrape after the last round
    targets = http_json(f"{run.prometheus}/api/v1/targets")["data"]["activeTargets"]
    up = [(t["labels"]["job"], t["labels"]["instance"], t["health"]) for t in targets]
    jobs = {job for job, _, health in up if health == "up"}
    workers = sum(1 for job, _, health in up if job == "llm-worker" and health == "up")
    if not {"api", "coordinator", "llm-worker"} <= jobs or workers < run.args.workers - 1:
        raise CheckFailed(f"Prometheus targets: {up}")
    values = {}
    for name, query in (("updates accepted", 'sum(fednano_updates_total{outcome="accepted"})'),
                        ("rounds closed", 'sum(fednano_round_transitions_total{state="closed"})'),
                        ("aggregations", "sum(fednano_aggregation_seconds_count)"),
                        ("LLM batches", "sum(fednano_llm_batch_seconds_count)"),
                        ("devices online", "sum(fednano_devices_online)")):
        result = http_json(f"{run.prometheus}/api/v1/query?"
                           f"{urllib.parse.urlencode({'query': query})}")["data"]["result"]
        values[name] = float(result[0]["value"][1]) if result else 0.0
    if min(values.values()) <= 0:
        raise CheckFailed(f"Prometheus has zero for some metrics: {values}")
    names = ", ".join(sorted(f"{job} {instance}" for job, instance, _ in up))
    run.facts.append(f"Prometheus: {len(up)} targets up ({names}); "
                     + ", ".join(f"{k} {v:g}" for k, v in values.items()))
    run.facts.append(f"mean LLM batch time per worker: {llm_batch_seconds(run)}")


TLS_PROBE = """
import pathlib, sys, time
import paho.mqtt.client as mqtt
user, secret, want, ca = sys.argv[1:5]
password = pathlib.Path(secret).read_text().strip() if secret.startswith("/") else secret
result = {}
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=ca)
c.username_pw_set(user, password)
c.on_connect = lambda cl, ud, fl, rc, pr: result.setdefault("rc", rc)
c.connect("mosquitto", 8883)
c.loop_start()
for _ in range(100):
    if "rc" in result:
        break
    time.sleep(0.1)
c.loop_stop()
rc = result.get("rc")
print(f"{user} over TLS: {rc} ({getattr(rc, 'value', None)})")
sys.exit(0 if rc is not None and ((rc.value == 0) == (want == "accept")) else 1)
"""


def check_tls(run: Run) -> None:
    """A device's own credentials over TLS on 8883 (accepted), a wrong password (refused).

    The broker binds a device's account to its client id, so the probe connects as the device
    itself (a wrong password is then refused for the password, not the id); the simulated
    devices are stopped first, as two clients with one id would disconnect each other."""
    run.compose("stop", "edge-sim", capture=True)
    outputs = []
    for secret, want in ((f"{FLEET_MOUNT}/sim-000/password", "accept"),
                         ("wrong-password", "refuse")):
        done = sh(["docker", "run", "--rm", "--network", f"{run.project}_default",
                   "-v", f"{run.project}_fleet:{FLEET_MOUNT}:ro",
                   "-v", f"{ROOT / 'docker' / 'certs' / 'ca.crt'}:/tmp/ca.crt:ro",
                   "--entrypoint", "python", f"fednano-edge:{run.args.tag}", "-c", TLS_PROBE,
                   "sim-000", secret, want, "/tmp/ca.crt"], capture=True, check=False,
                  env=run.env())
        outputs.append(done.stdout.strip())
        if done.returncode != 0:
            raise CheckFailed(f"TLS probe ({want}) failed: {done.stdout} {done.stderr[-1500:]}")
    run.facts.append("broker TLS listener 8883, the stack's CA: " + "; ".join(outputs))


X509_PROBE = """
import sys
from pathlib import Path
from shared import topics
from shared.messages import Presence, to_json
from shared.mqtt import (BrokerAddress, ClientOptions, ConnectError, ConnectRefused,
                         MqttClient, PublishError)
mode, url, device, kit = sys.argv[1:5]
kit = Path(kit)
parsed = BrokerAddress.parse(url, ca_file=kit / "ca.crt")
with_cert = mode != "nocert"
address = BrokerAddress(parsed.host, parsed.port, parsed.tls, parsed.ca_file,
                        kit / "device.crt" if with_cert else None,
                        kit / "device.key" if with_cert else None)
client = MqttClient(address, ClientOptions(client_id=device, clean_start=True,
                                           session_expiry_s=0, reconnect_max_s=1))
topic = topics.status(device)
what = f"{device} on {address.url} " + ("with its certificate" if with_cert
                                         else "without a certificate")
try:
    try:
        client.connect(10.0)
    except ConnectRefused as err:  # without a certificate: the broker's TLS alert, at once
        print(f"{what}: CONNECT refused, reason code {err.reason_code}: {err}")
        sys.exit(0 if mode == "nocert" and "TLS handshake" in str(err) else 1)
    except ConnectError as err:
        print(f"{what}: connection refused: {err}")
        sys.exit(0 if mode == "nocert" else 1)
    if mode == "nocert":
        print(f"{what}: CONNACK success, but the listener must require a certificate")
        sys.exit(1)
    payload = to_json(Presence(device_id=device, state="offline", profile="sim-cpu"))
    try:
        client.publish(topic, payload, max_bytes=8 * 2**20, qos=1, timeout=15.0)
    except PublishError as err:
        print(f"{what}: CONNACK success; publish {topic} QoS 1: refused, reason code "
              f"{err.reason_code} ({err})")
        sys.exit(0 if mode == "revoked" and err.reason_code == 135 else 1)
    print(f"{what}: CONNACK success; publish {topic} QoS 1: PUBACK success (0)")
    sys.exit(0 if mode == "accept" else 1)
finally:
    client.close()
"""


def probe_python(run: Run) -> str:
    if run.args.probe_python:
        return str(run.args.probe_python)
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def x509_probe(run: Run, mode: str, url: str, device: str, kit: Path) -> tuple[bool, str]:
    """One connection from the host as the X.509 device (``X509_PROBE``): whether it went as
    ``mode`` expects (accept, revoked, nocert), and the line it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    done = sh([probe_python(run), "-c", X509_PROBE, mode, url, device, str(kit)], env=env,
              capture=True, check=False, timeout=120)
    line = (done.stdout.strip().splitlines() or [done.stderr.strip()[-1500:]])[-1]
    return done.returncode == 0, line


def check_x509(run: Run) -> None:
    """An X.509 device added through the API, its kit used from the host on the published
    certificate listener: publish accepted; no certificate refused; revoked through the API,
    then the same publish refused "not authorized" (135)."""
    import tempfile

    device = f"x509-stackrun-{int(time.time())}"
    created = http_json(f"{run.api}/api/v1/devices", token=run.token, method="POST",
                        body={"id": device, "profile": "sim-cpu", "credential": "x509"})
    missing = [k for k in ("certificate_pem", "private_key_pem", "ca_certificate_pem", "config")
               if not created.get(k)]
    if created.get("credential") != "x509" or missing:
        raise CheckFailed(f"POST /api/v1/devices (x509): credential "
                          f"{created.get('credential')!r}, missing {missing}")
    url = created["config"]["broker"]["url"]
    expected = f"mqtts://{run.args.broker_public_host}:{run.args.mqtts_x509_port}"
    if url != expected:
        raise CheckFailed(f"the X.509 kit names the broker {url!r}, not the published "
                          f"certificate listener {expected!r}")
    run.facts.append(f"X.509 device {device} added through the API (201): certificate, key, "
                     f"CA and config (broker {url})")
    outputs = []
    with tempfile.TemporaryDirectory(prefix="stack-run-x509-") as folder:
        kit = Path(folder)
        for name, key in (("device.crt", "certificate_pem"), ("device.key", "private_key_pem"),
                          ("ca.crt", "ca_certificate_pem")):
            (kit / name).write_text(created[key])
            (kit / name).chmod(0o600)
        for mode in ("accept", "nocert"):
            ok, line = x509_probe(run, mode, url, device, kit)
            run.say(f"  x509 {mode}: {line}")
            outputs.append(line)
            if not ok:
                raise CheckFailed(f"X.509 probe ({mode}): {line}")
            if mode == "nocert":  # the broker's log says why, whatever the client saw
                said = broker_log_line(run, "certificate")
                run.say(f"  broker: {said}")
                outputs.append(f"broker: {said}")
        http_json(f"{run.api}/api/v1/devices/{device}/revoke", token=run.token, method="POST",
                  body={"reason": "stack-run"})
        revoked_at = time.monotonic()
        # The API deletes the device's client at the running broker (dynamic security);
        # a few tries in case that lands a moment after the API's answer.
        for attempt in range(1, 6):
            ok, line = x509_probe(run, "revoked", url, device, kit)
            run.say(f"  x509 revoked (try {attempt}): {line}")
            if ok:
                break
            time.sleep(3)
        outputs.append(line)
        if not ok:
            raise CheckFailed(f"X.509 probe after revocation: {line}")
    run.facts.append(f"broker certificate listener 8884 (host port {run.args.mqtts_x509_port}"
                     f"): " + "; ".join(outputs) + f"; after the revocation through the API: "
                     f"refused at try {attempt}, {time.monotonic() - revoked_at:.0f} s after "
                     "the API's answer")


def broker_log_line(run: Run, word: str) -> str:
    """The broker's latest log line with ``word`` in it (best effort, for the summary)."""
    done = run.compose("logs", "--no-color", "--tail", "40", "mosquitto", capture=True,
                       check=False)
    lines = [line.split("|", 1)[-1].strip() for line in done.stdout.splitlines()
             if word.lower() in line.lower()]
    return lines[-1] if lines else f"(no line with {word!r} in its last 40 log lines)"


def llm_batch_seconds(run: Run) -> str:
    """Mean seconds of a batched LLM call per worker, from Prometheus (sum / count)."""
    query = ("sum by (instance) (fednano_llm_batch_seconds_sum) / "
             "sum by (instance) (fednano_llm_batch_seconds_count)")
    try:
        result = http_json(f"{run.prometheus}/api/v1/query?"
                           f"{urllib.parse.urlencode({'query': query})}")["data"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
        return f"(Prometheus: {err})"
    return ", ".join(f"{r['metric'].get('instance')} {float(r['value'][1]):.1f} s"
                     for r in result) or "no LLM batch yet"


def diagnose(run: Run) -> None:
    run.compose("ps", check=False)
    run.compose("logs", "--tail", "40", check=False)
    run.say(f"mean LLM batch time per worker: {llm_batch_seconds(run)}")
    sh(["docker", "stats", "--no-stream"], check=False)


def summary(run: Run) -> None:
    print("\n## stack-run summary", flush=True)
    for name, took in run.timings:
        print(f"- {name}: {took:.0f} s")
    print(f"- total: {time.monotonic() - run.started:.0f} s")
    for fact in run.facts:
        print(f"- {fact}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/stack-run.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offline", action="store_true",
                        help="images from Debian packages and a wheelhouse (no registry)")
    parser.add_argument("--no-build", action="store_true", help="use the images there are")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--seed-base", metavar="HOME",
                        help="copy the base built under HOME (base/, llm/, features/) into the "
                             "stack, so init skips the base build")
    parser.add_argument("--bundle-min-cosine", metavar="X",
                        help="the bundle export's quality gate in init (default: the export's)")
    parser.add_argument("--devices", type=int, default=3, help="simulated devices (3)")
    parser.add_argument("--workers", type=int, default=2, help="LLM worker replicas (2)")
    parser.add_argument("--rounds", type=int, default=2, help="plain rounds first (2)")
    parser.add_argument("--steps", type=int, default=2, help="local steps per round (2)")
    parser.add_argument("--batch-size", type=int, default=4, help="local batch size (4)")
    parser.add_argument("--fisher-samples", type=int, default=4)
    parser.add_argument("--eval-questions", type=int, default=50,
                        help="questions each new version is evaluated on (50)")
    parser.add_argument("--llm-timeout", type=float, default=120.0,
                        help="seconds a simulated device waits for the LLM per attempt (120)")
    parser.add_argument("--round-timeout", type=float, default=1200.0)
    parser.add_argument("--kill-round-steps", type=int, default=20,
                        help="local steps of the round with the kills (20): long enough that "
                             "the devices still train when the coordinator goes down")
    parser.add_argument("--kill-gap", type=float, default=5.0,
                        help="seconds between killing the worker and the coordinator")
    parser.add_argument("--docker-cpu-shares", type=int, default=0, metavar="N",
                        help="set the CPU weight of Docker's parent cgroup to N during the run "
                             "(cgroup v1, root; 1024 = one host process, the default for all "
                             "containers together): on a host shared with busy processes, "
                             "1024 x the busy containers (devices + LLM workers)")
    parser.add_argument("--project", default="fednano-stackrun")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--api-port", type=int, default=18000)
    parser.add_argument("--prometheus-port", type=int, default=19090)
    parser.add_argument("--mqtts-port", type=int, default=18883)
    parser.add_argument("--mqtts-x509-port", type=int, default=18884,
                        help="host port of the broker's certificate listener 8884 (18884)")
    parser.add_argument("--broker-public-host", default="127.0.0.1",
                        help="the broker's name in the kits the API makes; the X.509 probe "
                             "connects to it from this host (127.0.0.1: in the broker's "
                             "certificate)")
    parser.add_argument("--probe-python", metavar="PYTHON",
                        help="the interpreter of the X.509 probe: it imports the project's "
                             "shared.mqtt (paho) (default: .venv/bin/python, else this one)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.workers < 2 or args.rounds < 0:
        parser.error("need --devices >= 1 and --workers >= 2 (one is killed)")
    if args.steps < 1 or args.kill_round_steps < 1:
        parser.error("need --steps >= 1 and --kill-round-steps >= 1")
    return args


DOCKER_CPU_SHARES = Path("/sys/fs/cgroup/cpu/docker/cpu.shares")


@contextmanager
def docker_cpu_shares(run: Run) -> Iterator[None]:
    """Give Docker's parent cgroup (cgroup v1) the CPU weight ``--docker-cpu-shares``, then
    restore it. By default all containers together weigh as much as one host process
    (cpu.shares 1024), so on a host busy with other processes the stack gets a sliver."""
    shares = run.args.docker_cpu_shares
    if not shares:
        yield
        return
    try:
        before = DOCKER_CPU_SHARES.read_text().strip()
        DOCKER_CPU_SHARES.write_text(f"{shares}\n")
    except OSError as err:
        raise CheckFailed(f"--docker-cpu-shares: cannot set {DOCKER_CPU_SHARES} ({err}); it "
                          "needs root, cgroup v1 and dockerd's cgroupfs driver") from err
    run.say(f"{DOCKER_CPU_SHARES}: {before} -> {shares} for the run")
    try:
        yield
    finally:
        DOCKER_CPU_SHARES.write_text(f"{before}\n")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    run = Run(args, compose_command())
    run.say(f"compose: {' '.join(run.compose_cmd)}; project {run.project}; "
            f"{'offline' if args.offline else 'default'} images")
    ok = False
    try:
        with docker_cpu_shares(run):
            ok = checks(run)
    except CheckFailed as err:  # only --docker-cpu-shares raises here
        run.say(f"FAILED: {err}")
    run.say("all checks passed" if ok else "the run failed")
    return 0 if ok else 1


def checks(run: Run) -> bool:
    """Every step, then ``down -v`` (unless ``--keep``) and the summary; True if all passed."""
    args = run.args
    ok = False
    try:
        with run.step("build images"):
            build(run)
        with run.step("clean project, secrets"):
            fresh_project(run)
        if args.seed_base:
            with run.step("seed the base"):
                seed_base(run)
        with run.step("up -d (init, broker, API, services)"):
            start(run)
        with run.step(f"{args.devices} devices online"):
            wait_for("the devices online", lambda: devices_online(run) >= args.devices, 900)
        for number in range(1, args.rounds + 1):
            with run.step(f"round {number} via the REST API"):
                one_round(run, number)
        with run.step("round with an LLM worker and the coordinator killed"):
            round_with_kills(run)
        with run.step("nothing acknowledged lost (SQL)"):
            check_nothing_lost(run)
        with run.step("Prometheus scraped every service"):
            check_prometheus(run)
        with run.step("broker TLS and per-device credentials"):
            check_tls(run)
        with run.step("X.509 device: certificate listener, revocation"):
            check_x509(run)
        ok = True
    except (CheckFailed, subprocess.TimeoutExpired, urllib.error.URLError, KeyError) as err:
        run.say(f"FAILED: {err}")
        diagnose(run)
    finally:
        if not args.keep:
            with run.step("down -v"):
                run.compose("down", "-v", "--remove-orphans", check=False)
        summary(run)
    return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
