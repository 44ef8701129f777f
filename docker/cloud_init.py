"""The ``init`` service of docker-compose.yml: prepare everything the other services need.

Runs once before the broker and the cloud services start (they depend on its successful
exit) and again on every ``docker compose up``; each step is skipped when its result exists:

1. migrate the database (``cloud.db.migrate.upgrade``);
2. build the frozen base when there is none (``fednano base build``: minutes on a CPU);
3. export its NanoEdge bundle with an archive when the newest bundle is not of the current
   base (``fednano bundle export --archive``; ``FEDNANO_BUNDLE_MIN_COSINE`` sets its quality
   gate, the command's default otherwise);
4. register the simulated devices ``sim-000`` ... (``fednano devices add --out``: device.yaml
   and password in the fleet volume) up to ``FEDNANO_SIM_DEVICES``. They run inside the compose
   network, so their configs name the broker as the cloud reaches it (``FEDNANO_BROKER_URL``,
   given to the command as ``FEDNANO_DEVICE_BROKER_URL``), not as devices outside do;
5. write ``fleet.json`` (device ids, bundle version, sha256 and URL) for the ``edge-sim``
   containers (docker/edge_sim.py);
6. write the broker's dynamic-security file from the registry
   (``fednano devices broker-files``, group ``FEDNANO_BROKER_FILE_GROUP``).

Settings come from the same ``FEDNANO_*`` variables as the services (``CloudSettings``) plus
the ``ENV_VARS`` below. Exit 0 when all is ready; 1 with the failing step's message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloud.base.manifest import read_current
from cloud.bundle_catalog import BundleEntry, list_bundles
from cloud.db import migrate
from cloud.registry import write_atomic
from cloud.settings import CloudSettings
from shared.bundle import sha256_file

FLEET_DIR_ENV = "FEDNANO_FLEET_DIR"
SIM_DEVICES_ENV = "FEDNANO_SIM_DEVICES"
SIM_PROFILE_ENV = "FEDNANO_SIM_PROFILE"
MIN_COSINE_ENV = "FEDNANO_BUNDLE_MIN_COSINE"  # the bundle's quality gate (fednano bundle export)
DEVICE_BROKER_URL_ENV = "FEDNANO_DEVICE_BROKER_URL"  # CloudSettings.device_broker_url
DEVICE_CA_KEY_ENV = "FEDNANO_DEVICE_CA_KEY_FILE"  # CloudSettings.device_ca_key_file
ENV_VARS = (FLEET_DIR_ENV, SIM_DEVICES_ENV, SIM_PROFILE_ENV,
            MIN_COSINE_ENV)  # besides CloudSettings' fields
FLEET_MANIFEST = "fleet.json"
DEFAULT_PROFILE = "sim-cpu"


class InitError(RuntimeError):
    """A step cannot complete; the message says what to do."""


def sim_device_id(index: int) -> str:
    """The id of simulated device ``index`` (0-based): ``sim-000``, ``sim-001``, ..."""
    return f"sim-{index:03d}"


# ------------------------------------------------------------------------------ commands


def base_build_argv(home: Path) -> list[str]:
    return ["fednano", "base", "build", "--home", str(home)]


def bundle_export_argv(home: Path, out: Path, min_cosine: str | None = None) -> list[str]:
    gate = ["--min-cosine", min_cosine] if min_cosine else []
    return ["fednano", "bundle", "export", "--out", str(out), "--archive", "--home", str(home),
            *gate]


def device_add_argv(device_id: str, profile: str, out: Path) -> list[str]:
    return ["fednano", "devices", "add", device_id, "--profile", profile, "--out", str(out)]


def broker_files_argv() -> list[str]:
    return ["fednano", "devices", "broker-files"]


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Run a command (with ``env`` as its whole environment when given); ``InitError`` when
    it fails."""
    print("init: $", " ".join(argv), flush=True)
    result = subprocess.run(list(argv), check=False, env=None if env is None else dict(env))
    if result.returncode != 0:
        raise InitError(f"{' '.join(argv[:3])} failed with exit code {result.returncode}")


# ------------------------------------------------------------------------------ steps


def ensure_base(home: Path) -> str:
    """The current base version, building one first when there is none."""
    if read_current(home) is None:
        run(base_build_argv(home))
    version = read_current(home)
    if version is None:
        raise InitError(f"no base under {home} after `fednano base build`")
    return version


def ensure_bundle(home: Path, bundle_dir: Path, base_version: str,
                  min_cosine: str | None = None) -> BundleEntry:
    """The newest bundle with an archive, exporting one when none is of ``base_version``
    (``min_cosine``: the export's quality gate, the command's default when None)."""
    def current() -> BundleEntry | None:
        return next((e for e in list_bundles(bundle_dir)
                     if e.manifest.base_version == base_version and e.archive is not None), None)

    entry = current()
    if entry is None:
        run(bundle_export_argv(home, bundle_dir, min_cosine))
        entry = current()
    if entry is None:
        raise InitError(f"no bundle with an archive for base {base_version} in {bundle_dir}")
    return entry


def sim_device_env(broker_url: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of ``fednano devices add`` for a simulated device: its config names
    ``broker_url`` (the broker as the cloud reaches it inside the compose network) instead of
    ``FEDNANO_DEVICE_BROKER_URL``, the address devices outside use; and no CA key (a password
    device needs none)."""
    env = {k: v for k, v in environ.items() if k != DEVICE_CA_KEY_ENV}
    return {**env, DEVICE_BROKER_URL_ENV: broker_url}


def ensure_devices(fleet_dir: Path, count: int, profile: str,
                   env: Mapping[str, str] | None = None) -> list[str]:
    """Register ``count`` simulated devices whose files are not in ``fleet_dir`` yet (``env``:
    the commands' environment, ``sim_device_env``)."""
    ids = [sim_device_id(i) for i in range(count)]
    for device_id in ids:
        folder = fleet_dir / device_id
        if (folder / "device.yaml").is_file():
            continue
        try:
            run(device_add_argv(device_id, profile, folder), env)
        except InitError as err:
            raise InitError(f"{err}: if the database already has {device_id} but the fleet "
                            "volume lost its files, reset both (docker compose down -v)") from err
    return ids


def fleet_manifest(ids: Sequence[str], bundle: BundleEntry, public_url: str) -> dict[str, object]:
    """What every edge-sim container reads: the device ids and the bundle to fetch."""
    version = bundle.manifest.bundle_version
    if bundle.archive is None:
        raise InitError(f"bundle {version} has no archive: export it with --archive")
    return {"devices": list(ids),
            "bundle": {"version": version, "sha256": sha256_file(bundle.archive),
                       "url": f"{public_url}/api/v1/bundles/{version}"}}


def sim_settings(environ: dict[str, str]) -> tuple[Path, int, str]:
    """The fleet folder, device count and profile from ``ENV_VARS``; ``InitError`` if bad."""
    fleet = environ.get(FLEET_DIR_ENV)
    count = environ.get(SIM_DEVICES_ENV, "0")
    if not fleet:
        raise InitError(f"set {FLEET_DIR_ENV} to the fleet volume's mount point")
    if not count.isdigit():
        raise InitError(f"{SIM_DEVICES_ENV} must be a whole number, got {count!r}")
    return Path(fleet), int(count), environ.get(SIM_PROFILE_ENV) or DEFAULT_PROFILE


def main() -> int:
    try:
        settings = CloudSettings()
        fleet_dir, count, profile = sim_settings(dict(os.environ))
        if settings.bundle_dir is None:
            raise InitError("set FEDNANO_BUNDLE_DIR: devices download their bundle from there")
        migrate.upgrade(settings.resolved_database_url)
        base_version = ensure_base(settings.home)
        bundle = ensure_bundle(settings.home, settings.bundle_dir, base_version,
                               os.environ.get(MIN_COSINE_ENV) or None)
        ids = ensure_devices(fleet_dir, count, profile,
                             sim_device_env(settings.broker_url, os.environ))
        manifest = fleet_manifest(ids, bundle, settings.public_url)
        write_atomic(fleet_dir / FLEET_MANIFEST, json.dumps(manifest, indent=2) + "\n",
                     mode=0o644)
        run(broker_files_argv())
    except (InitError, ValueError) as err:
        print(f"init: {err}", file=sys.stderr)
        return 1
    print(f"init: ready (base {base_version}, bundle {bundle.manifest.bundle_version}, "
          f"{len(ids)} simulated devices)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
