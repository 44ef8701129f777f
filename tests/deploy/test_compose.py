"""docker-compose.yml, validated offline: the compose-spec schema, then cross-references between
services, volumes, secrets, ports, config files, the images' commands and the settings.

No Docker engine (and no compose plugin) runs here, so nothing is built or started: these
tests check what can be checked from the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from edge.local_data import DataSpec
from tests.deploy.deploy_support import (
    CLOUD_SERVICES,
    COMPOSE_FILE,
    DOCKER_DIR,
    MOSQUITTO_CONF,
    ROOT,
    SECRETS_MOUNT,
    cli_apps,
    cli_envvars,
    environment,
    load_compose,
    load_script,
    mount_source,
    mounts,
    parse_command_line,
    resolve_command,
    services,
)

LONG_RUNNING = ("postgres", "mosquitto", "api", "coordinator", "llm-worker", "edge-sim")
ENTRYPOINT = DOCKER_DIR / "cloud-entrypoint.sh"


def check_jsonschema() -> str:
    found = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or \
        shutil.which("check-jsonschema")
    if found is None:
        pytest.fail("check-jsonschema is missing: pip install -e '.[dev]'")
    return found


def run_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    # vendor.compose-spec ships inside check-jsonschema: no network is needed.
    return subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------------------ schema


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = run_schema_check(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n",
                                                       "    healthchek:\n", 1))
    result = run_schema_check(broken)
    assert result.returncode != 0 and "healthchek" in result.stdout + result.stderr


def test_no_version_key() -> None:
    assert "version" not in load_compose()


def test_the_stack_has_the_services_of_the_design() -> None:
    assert set(services()) == {"postgres", "init", "mosquitto", *CLOUD_SERVICES[1:], "edge-sim",
                               "prometheus"}


# ------------------------------------------------------------------------------ images, builds


def test_every_service_has_a_pinned_image() -> None:
    for name, service in services().items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: image {image!r} is not pinned"


def test_build_contexts_and_dockerfiles_exist() -> None:
    built = {name: s["build"] for name, s in services().items() if "build" in s}
    assert set(built) == {*CLOUD_SERVICES, "edge-sim"}
    for name, build in built.items():
        context = ROOT / build["context"]
        assert context.resolve() == ROOT, f"{name}: context {build['context']!r}"
        assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        assert (context / ".dockerignore").is_file()


def test_cloud_services_share_one_image() -> None:
    cloud = {services()[name]["image"] for name in CLOUD_SERVICES}
    dockerfiles = {services()[name]["build"]["dockerfile"] for name in CLOUD_SERVICES}
    assert len(cloud) == 1 and dockerfiles == {"docker/cloud.Dockerfile"}
    assert services()["edge-sim"]["build"]["dockerfile"] == "docker/edge.Dockerfile"


# ------------------------------------------------------------------------------ volumes, files


def test_bind_mounted_files_exist_in_the_repository() -> None:
    binds = [(name, source) for name, s in services().items()
             for source, _, _ in mounts(s) if source.startswith((".", "/"))]
    assert binds, "the broker's config is bind-mounted"
    for name, source in binds:
        assert (ROOT / source).exists(), f"{name}: {source} is not in the repository"


def test_named_volumes_are_declared_and_used() -> None:
    compose = load_compose()
    declared = set(compose["volumes"])
    used = {source for s in compose["services"].values() for source, _, _ in mounts(s)
            if not source.startswith((".", "/"))}
    assert used == declared


def test_secrets_are_declared_and_generated(tmp_path: Path) -> None:
    compose = load_compose()
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        for secret in service.get("secrets", []):
            assert secret in declared, f"{name}: undeclared secret {secret!r}"
    subprocess.run(["bash", str(DOCKER_DIR / "gen-secrets.sh"), str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for name, secret in declared.items():
        relative = Path(secret["file"]).relative_to("docker")  # gen-secrets.sh writes docker/
        assert (tmp_path / relative).is_file(), f"gen-secrets.sh does not create {name}"
    ignored = (DOCKER_DIR / ".gitignore").read_text().split()
    assert all(Path(s["file"]).parts[1] + "/" in ignored for s in declared.values())


def test_secret_file_variables_name_mounted_secrets() -> None:
    for name, service in services().items():
        for key, value in environment(service).items():
            if key.endswith("_FILE") and value.startswith(SECRETS_MOUNT):
                secret = value.removeprefix(SECRETS_MOUNT)
                assert secret in service.get("secrets", []), f"{name}: {key} -> {secret}"


def test_shared_folders_line_up() -> None:
    """Settings name the folders where the volumes are mounted, in every service using them."""
    s = services()
    for name in CLOUD_SERVICES:
        env = environment(s[name])
        assert mount_source(s[name], env["FEDNANO_HOME"]) == "cloud-home", name
        assert env["FEDNANO_BUNDLE_DIR"].startswith(env["FEDNANO_HOME"] + "/"), name
    init = environment(s["init"])
    assert mount_source(s["init"], init["FEDNANO_BROKER_DIR"]) == "broker-files"
    assert mount_source(s["init"], init["FEDNANO_FLEET_DIR"]) == "fleet"
    sim = environment(s["edge-sim"])
    assert mount_source(s["edge-sim"], sim["FEDNANO_FLEET_DIR"]) == "fleet"


# ------------------------------------------------------------------------------ ports, replicas


def published_host_ports(service: dict[str, Any]) -> list[int]:
    ports = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) >= 2, f"publish a fixed host port explicitly, got {entry!r}"
        ports.append(int(parts[-2]))
    return ports


@pytest.mark.parametrize("env", [{}, {"FEDNANO_API_PORT": "8080", "FEDNANO_MQTTS_PORT": "18883",
                                      "FEDNANO_MQTTS_X509_PORT": "18884"}])
def test_published_ports_do_not_collide(env: dict[str, str]) -> None:
    ports = [p for s in services(env).values() for p in published_host_ports(s)]
    assert len(ports) == len(set(ports)) and ports


def test_replicated_services_publish_no_fixed_port() -> None:
    for name, service in services().items():
        if int(service.get("deploy", {}).get("replicas", 1)) > 1:
            assert not service.get("ports"), f"{name}: replicas would fight over a host port"


def test_only_tls_the_api_and_prometheus_on_loopback_are_published() -> None:
    published = {name: published_host_ports(s) for name, s in services().items()
                 if s.get("ports")}
    assert published == {"mosquitto": [8883, 8884], "api": [8000], "prometheus": [9090]}
    assert all(str(p).startswith("127.0.0.1:") for p in services()["prometheus"]["ports"])


@pytest.mark.parametrize("devices", [None, "9"])
def test_edge_sim_replicas_follow_the_registered_device_count(devices: str | None) -> None:
    env = {} if devices is None else {"FEDNANO_SIM_DEVICES": devices}
    s = services(env)
    count = int(s["edge-sim"]["deploy"]["replicas"])
    assert count == int(environment(s["init"])["FEDNANO_SIM_DEVICES"])
    assert count == (4 if devices is None else 9)
    assert int(s["llm-worker"]["deploy"]["replicas"]) == 2


# ------------------------------------------------------------------------------ order, health


def test_depends_on_names_real_services_with_fitting_conditions() -> None:
    s = services()
    for name, service in s.items():
        for target, spec in service.get("depends_on", {}).items():
            assert target in s, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in s[target], f"{name}: {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert s[target].get("restart") == "no", f"{name}: {target} is not one-shot"
            else:
                assert condition == "service_started", f"{name}: {condition}"


def test_start_order_has_no_cycle_and_init_comes_first() -> None:
    s = services()
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"dependency cycle {' -> '.join((*trail, name))}"
        for target in s[name].get("depends_on", {}):
            visit(target, (*trail, name))
        if name not in order:
            order.append(name)

    for name in s:
        visit(name, ())
    assert order.index("postgres") < order.index("init") < order.index("mosquitto")
    for name in ("mosquitto", "api", "coordinator", "llm-worker", "edge-sim"):
        condition = s[name]["depends_on"]["init"]["condition"]
        assert condition == "service_completed_successfully", name


def test_long_running_services_restart_and_have_healthchecks() -> None:
    s = services()
    for name in LONG_RUNNING:
        assert s[name].get("restart") in ("unless-stopped", "always"), name
        test = s[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert s["init"]["restart"] == "no" and "healthcheck" not in s["init"]


def test_healthcheck_scripts_exist_and_probe_the_broker_port() -> None:
    s = services()
    broker_port = urlsplit(environment(s["api"])["FEDNANO_BROKER_URL"]).port
    for name, service in s.items():
        test = service.get("healthcheck", {}).get("test", [])
        scripts = [arg for arg in test if arg.startswith("/opt/fednano/docker/")]
        for script in scripts:
            assert (DOCKER_DIR / Path(script).name).is_file(), f"{name}: {script}"
        if "mqtt" in test:
            assert test[test.index("mqtt") + 1:] == [str(broker_port)], name
    assert s["api"]["healthcheck"]["test"][-1].endswith("/api/v1/ready")


# ------------------------------------------------------------------------------ commands


def service_argv(name: str) -> list[str]:
    service = services()[name]
    return list(service.get("entrypoint") or []) + list(service.get("command") or [])


@pytest.mark.parametrize("name", ["api", "coordinator", "llm-worker"])
def test_cloud_commands_are_real_cli_commands(name: str) -> None:
    argv = service_argv(name)
    parse_command_line(argv)  # unknown commands/options or bad values raise
    _, path, _ = resolve_command(argv)
    result = CliRunner().invoke(cli_apps()[argv[0]], [*path, "--help"])
    assert result.exit_code == 0, result.output


def test_init_runs_real_cli_commands(tmp_path: Path) -> None:
    init = load_script("cloud_init")
    assert service_argv("init") == ["python", "/opt/fednano/docker/cloud_init.py"]
    for argv in (init.base_build_argv(tmp_path), init.bundle_export_argv(tmp_path, tmp_path),
                 init.device_add_argv(init.sim_device_id(0), "sim-cpu", tmp_path / "d"),
                 init.broker_files_argv()):
        parse_command_line(argv)


def test_the_simulated_devices_profile_ships() -> None:
    from edge.profiles import list_profiles

    profile = environment(services()["init"])["FEDNANO_SIM_PROFILE"]
    assert profile in list_profiles()


def test_edge_sim_runs_real_cli_commands(tmp_path: Path) -> None:
    sim = load_script("edge_sim")
    service = services()["edge-sim"]
    assert service["entrypoint"] == ["python", "/opt/fednano/docker/edge_sim.py"]
    fleet = sim.Fleet(["sim-000"], "v1", "0" * 64, "http://api:8000/api/v1/bundles/v1")
    parse_command_line(sim.fetch_argv(fleet, tmp_path / "bundle"))
    spec = sim.data_spec(0, 4, environment(service)["FEDNANO_SIM_DATA_OPTIONS"])
    context = parse_command_line(sim.run_argv(tmp_path / "device.yaml", spec,
                                              service["command"]))
    assert context.params["data"] == spec
    assert DataSpec.parse(spec).of == 4


@pytest.mark.parametrize("argv", [["fednano", "cloud", "apii"],
                                  ["fednano", "cloud", "api", "--hots", "0.0.0.0"],
                                  ["fednano", "cloud", "api", "--port", "http"],
                                  ["fednano-edge", "run", "--data", "x"],
                                  ["fednano-cloud", "api"]])
def test_the_command_check_rejects_bad_command_lines(argv: list[str]) -> None:
    with pytest.raises(Exception) as caught:
        parse_command_line(argv)
    assert type(caught.value).__name__ in ("AssertionError", "NoSuchOption", "BadParameter",
                                           "MissingParameter")


# ------------------------------------------------------------------------------ settings


def test_cloud_environment_names_real_settings() -> None:
    from cloud.settings import CloudSettings

    entrypoint = ENTRYPOINT.read_text()
    known = {f"FEDNANO_{field.upper()}" for field in CloudSettings.model_fields}
    known |= cli_envvars() | set(load_script("cloud_init").ENV_VARS)
    for name in CLOUD_SERVICES:
        for key in environment(services()[name]):
            if key in known:  # a setting that is itself a path (FEDNANO_DEVICE_CA_FILE)
                continue
            base = key.removesuffix("_FILE")
            if key.endswith("_FILE"):
                assert base in entrypoint, f"{name}: the entrypoint does not read {key}"
            assert base in known or base == "PGPASSWORD", f"{name}: unknown variable {key}"


def test_edge_environment_names_real_settings() -> None:
    known = cli_envvars() | set(load_script("edge_sim").ENV_VARS)
    for key in environment(services()["edge-sim"]):
        assert key in known, f"edge-sim: unknown variable {key}"


def test_urls_point_at_the_services() -> None:
    s = services()
    env = environment(s["api"])
    broker, database = urlsplit(env["FEDNANO_BROKER_URL"]), urlsplit(env["FEDNANO_DATABASE_URL"])
    public = urlsplit(env["FEDNANO_PUBLIC_URL"])
    assert broker.hostname == "mosquitto" and f"listener {broker.port}\n" in \
        MOSQUITTO_CONF.read_text()
    assert database.hostname == "postgres" and database.password is None
    assert database.username == environment(s["postgres"])["POSTGRES_USER"]
    assert database.path == "/" + environment(s["postgres"])["POSTGRES_DB"]
    assert public.hostname == "api"
    assert public.port == parse_command_line(service_argv("api")).params["port"]


def published_port(container_port: int, env: dict[str, str] | None = None) -> int:
    """The host port the broker's ``container_port`` is published on."""
    for entry in services(env)["mosquitto"]["ports"]:
        *_, host, container = str(entry).split(":")
        if int(container) == container_port:
            return int(host)
    raise AssertionError(f"the broker's port {container_port} is not published")


@pytest.mark.parametrize("env", [{}, {"FEDNANO_BROKER_PUBLIC_HOST": "broker.example.com",
                                      "FEDNANO_MQTTS_PORT": "18883",
                                      "FEDNANO_MQTTS_X509_PORT": "18884"}])
def test_device_urls_name_the_published_tls_listeners(env: dict[str, str]) -> None:
    """Kits name the broker as devices outside reach it: the host's published ports of the
    password listener (8883) and the certificate listener (8884), never the internal 1883."""
    conf = MOSQUITTO_CONF.read_text()
    for name in CLOUD_SERVICES:
        cloud = environment(services(env)[name])
        for key, container_port in (("FEDNANO_DEVICE_BROKER_URL", 8883),
                                    ("FEDNANO_DEVICE_X509_BROKER_URL", 8884)):
            url = urlsplit(cloud[key])
            assert url.scheme == "mqtts", f"{name}: {key}"
            assert url.hostname == env.get("FEDNANO_BROKER_PUBLIC_HOST", "localhost")
            assert url.port == published_port(container_port, env), f"{name}: {key}"
            assert f"listener {container_port}\n" in conf


def test_only_the_api_holds_the_ca_key() -> None:
    """The API signs X.509 devices' certificates; init adds password devices only."""
    s = services()
    holders = {name for name, service in s.items() if "broker_ca_key" in
               service.get("secrets", [])}
    assert holders == {"api"}
    for name in holders:
        assert environment(s[name])["FEDNANO_DEVICE_CA_KEY_FILE"] == \
            SECRETS_MOUNT + "broker_ca_key"
    for name, service in s.items():
        if name not in holders:
            assert "FEDNANO_DEVICE_CA_KEY_FILE" not in environment(service), name
    key, cert = (Path(load_compose()["secrets"][n]["file"])
                 for n in ("broker_ca_key", "broker_ca_cert"))
    assert (key.parent, key.name, cert.name) == (cert.parent, "ca.key", "ca.crt")


def test_the_cloud_signs_with_the_ca_the_certificate_listener_trusts() -> None:
    """The api's FEDNANO_DEVICE_CA_FILE is the secret the broker's start.sh copies to the file
    its listeners name as cafile."""
    s = services()
    start = (DOCKER_DIR / "mosquitto" / "start.sh").read_text()
    cafile = next(line.split()[1] for line in MOSQUITTO_CONF.read_text().splitlines()
                  if line.startswith("cafile "))
    copied = next(line.split()[1] for line in start.splitlines()
                  if line.startswith("cp ") and line.endswith(f'"$certs/{Path(cafile).name}"'))
    assert copied.startswith(SECRETS_MOUNT) and copied.removeprefix(SECRETS_MOUNT) in \
        s["mosquitto"]["secrets"]
    for name in ("api", "init"):
        assert environment(s[name])["FEDNANO_DEVICE_CA_FILE"] == copied, name


def test_the_simulated_devices_keep_the_internal_broker(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """init registers the simulated devices with the cloud's own broker URL (the compose
    network's plaintext listener), not the public one of the other kits, and without the CA
    key: their configs name an address the edge-sim containers reach."""
    init = load_script("cloud_init")
    env = environment(services()["init"])
    calls: list[dict[str, str] | None] = []

    def fake_run(argv: list[str], env: dict[str, str] | None = None) -> None:
        calls.append(env)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "device.yaml").write_text("device_id: x\n")

    monkeypatch.setattr(init, "run", fake_run)
    init.ensure_devices(tmp_path, 1, "sim-cpu", init.sim_device_env(env["FEDNANO_BROKER_URL"],
                                                                    env))
    given = calls[0]
    assert given is not None and given["FEDNANO_DEVICE_BROKER_URL"] == "mqtt://mosquitto:1883"
    assert "FEDNANO_DEVICE_CA_KEY_FILE" not in given
    assert given["FEDNANO_DEVICE_CA_FILE"] == env["FEDNANO_DEVICE_CA_FILE"]


def test_the_api_provisions_x509_devices_with_the_generated_ca(tmp_path: Path) -> None:
    """The api's environment with the files gen-secrets.sh makes behind its secrets: X.509
    provisioning is on and signs certificates the stack's CA verifies."""
    from cloud.provisioning import DeviceNetwork
    from cloud.settings import CloudSettings

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    subprocess.run(["bash", str(DOCKER_DIR / "gen-secrets.sh"), str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    declared = load_compose()["secrets"]
    env = environment(services()["api"])
    for key, value in list(env.items()):
        if value.startswith(SECRETS_MOUNT):
            env[key] = str(tmp_path / Path(declared[value.removeprefix(SECRETS_MOUNT)]["file"])
                           .relative_to("docker"))
    secrets = {k.removesuffix("_FILE"): Path(env.pop(k)).read_text().strip()
               for k in ("FEDNANO_SECRET_KEY_FILE", "FEDNANO_BROKER_PASSWORD_FILE")}
    settings = CloudSettings.model_validate(
        {k.removeprefix("FEDNANO_").lower(): v for k, v in {**env, **secrets}.items()
         if k.startswith("FEDNANO_")})
    network = DeviceNetwork.from_settings(settings)
    assert network.ca_pem == (tmp_path / "certs" / "ca.crt").read_bytes()
    issued = network.require_x509()[0].device_certificate("orin-7")
    (tmp_path / "orin-7.crt").write_bytes(issued.certificate_pem)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "certs" / "ca.crt"),
                             str(tmp_path / "orin-7.crt")], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def secret_files(tmp_path: Path) -> dict[str, str]:
    """The cloud environment with its /run/secrets/ paths pointing at generated files."""
    env = environment(services()["api"])
    for key, value in list(env.items()):
        if value.startswith(SECRETS_MOUNT):
            path = tmp_path / value.removeprefix(SECRETS_MOUNT)
            path.write_text(f"{path.name}-{'x' * 40}\n")
            env[key] = str(path)
    return env


def settings_in_container(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Load CloudSettings through the image's entrypoint, in ``env`` only (as in a container)."""
    code = ("from cloud.settings import CloudSettings; s = CloudSettings(); "
            "print(s.environment, s.secret_key.get_secret_value(), "
            "s.broker_password.get_secret_value())")
    clean = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["sh", str(ENTRYPOINT), sys.executable, "-c", code], env=clean,
                          capture_output=True, text=True, timeout=60, check=False)


def test_production_settings_load_from_the_compose_environment(tmp_path: Path) -> None:
    result = settings_in_container(secret_files(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["production", f"secret_key-{'x' * 40}",
                                     f"broker_password-{'x' * 40}"]


def test_production_refuses_a_missing_secret(tmp_path: Path) -> None:
    env = secret_files(tmp_path)
    del env["FEDNANO_SECRET_KEY_FILE"]
    result = settings_in_container(env)
    assert result.returncode != 0 and "secret_key" in result.stderr
