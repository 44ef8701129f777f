"""Entry point of a simulated device container (docker-compose service ``edge-sim``).

Every replica of ``edge-sim`` runs the same image with the same environment, so each one has to
find out which device it is. It **claims a slot**: an exclusive ``flock`` on
``<fleet>/slots/<index>.lock`` in the shared fleet volume, trying 0, 1, ... in turn; the first
free one is this container's index, and the lock stays held by the device agent (the locked
file descriptor is inherited through ``exec``) until the process dies — even by SIGKILL, when
the kernel releases it. So no two containers ever run the same device (the broker would
otherwise disconnect one for the other's client id), a restarted or recreated container takes
a free slot again, and nothing depends on container names or hostnames. A device's whole
durable state lives in the fleet volume beside its identity (``<fleet>/sim-NNN/state``), so
whichever container claims a slot continues that device where it stopped.

``FEDNANO_SIM_INDEX`` pins a container to one slot instead (fails if another holds it).

Then: device slot ``i`` -> ``fleet.json``'s ``devices[i]`` (written by docker/cloud_init.py), its
``device.yaml`` and password, the NanoEdge bundle (``fednano-edge fetch-bundle`` from the API
with the sha256 from ``fleet.json``, skipped when that version is already installed), and the
data shard ``easyvqa:index=i,of=N,<FEDNANO_SIM_DATA_OPTIONS>`` with N the number of devices.
Finally ``exec fednano-edge run`` with this script's arguments appended (e.g. ``--log-level``).

Needs a local volume (flock is not reliable on network file systems).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FLEET_DIR_ENV = "FEDNANO_FLEET_DIR"
INDEX_ENV = "FEDNANO_SIM_INDEX"
DATA_OPTIONS_ENV = "FEDNANO_SIM_DATA_OPTIONS"
ENV_VARS = (FLEET_DIR_ENV, INDEX_ENV, DATA_OPTIONS_ENV)  # besides the edge CLI's own
FLEET_MANIFEST = "fleet.json"  # as in docker/cloud_init.py
SLOTS_DIR = "slots"
DEFAULT_DATA_OPTIONS = "alpha=0.5,by=question"


class SimError(RuntimeError):
    """This container cannot start a device; the message says why."""


@dataclass(frozen=True)
class Fleet:
    """``fleet.json``: the simulated device ids and the bundle they run."""

    devices: list[str]
    bundle_version: str
    bundle_sha256: str
    bundle_url: str

    @classmethod
    def load(cls, path: Path) -> Fleet:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            bundle = data["bundle"]
            return cls(list(data["devices"]), str(bundle["version"]), str(bundle["sha256"]),
                       str(bundle["url"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SimError(f"cannot read {path} (written by the init service): {err}") from err


# ------------------------------------------------------------------------------ slots


def claim_slot(slots_dir: Path, count: int, pinned: int | None = None) -> tuple[int, int]:
    """Lock a free slot below ``count`` (or exactly ``pinned``); returns (index, locked fd).

    The lock lasts as long as the file descriptor is open in any process.
    """
    if count < 1:
        raise SimError("the fleet has no devices: set FEDNANO_SIM_DEVICES on the init service")
    if pinned is not None and not 0 <= pinned < count:
        raise SimError(f"{INDEX_ENV} must be below the fleet's {count} devices, got {pinned}")
    slots_dir.mkdir(parents=True, exist_ok=True)
    for index in [pinned] if pinned is not None else range(count):
        fd = os.open(slots_dir / f"{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return index, fd
    taken = f"slot {pinned} is" if pinned is not None else f"all {count} slots are"
    raise SimError(f"{taken} taken by running devices: run at most as many edge-sim replicas "
                   "as FEDNANO_SIM_DEVICES (and rerun init after raising it)")


# ------------------------------------------------------------------------------ commands


def data_spec(index: int, count: int, options: str) -> str:
    """The ``--data`` spec of slot ``index``: its easy-VQA shard out of ``count``."""
    extra = options.strip().strip(",")
    return f"easyvqa:index={index},of={count}" + (f",{extra}" if extra else "")


def fetch_argv(fleet: Fleet, dest: Path) -> list[str]:
    return ["fednano-edge", "fetch-bundle", fleet.bundle_url, "--sha256", fleet.bundle_sha256,
            "--dest", str(dest)]


def run_argv(config: Path, spec: str, extra: Sequence[str]) -> list[str]:
    return ["fednano-edge", "run", "--config", str(config), "--data", spec, *extra]


def installed_bundle_version(folder: Path) -> str | None:
    """``bundle_version`` of the bundle unpacked in ``folder``, or None."""
    try:
        return str(json.loads((folder / "manifest.json").read_text())["bundle_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_bundle(fleet: Fleet, dest: Path) -> None:
    """Fetch the fleet's bundle into ``dest`` unless that version is already there."""
    if installed_bundle_version(dest) == fleet.bundle_version:
        return
    if subprocess.run(fetch_argv(fleet, dest), check=False).returncode != 0:
        raise SimError(f"could not fetch bundle {fleet.bundle_version} from {fleet.bundle_url}")


def pinned_index(environ: Mapping[str, str]) -> int | None:
    text = environ.get(INDEX_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise SimError(f"{INDEX_ENV} must be a whole number, got {text!r}")
    return int(text)


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    fleet_dir = Path(environ.get(FLEET_DIR_ENV, "/var/lib/fednano-fleet"))
    try:
        fleet = Fleet.load(fleet_dir / FLEET_MANIFEST)
        index, fd = claim_slot(fleet_dir / SLOTS_DIR, len(fleet.devices), pinned_index(environ))
        device_dir = fleet_dir / fleet.devices[index]
        print(f"edge-sim: slot {index} -> device {fleet.devices[index]}", flush=True)
        ensure_bundle(fleet, device_dir / "state" / "bundle")  # the agent's default location
    except SimError as err:
        print(f"edge-sim: {err}", file=sys.stderr)
        return 1
    spec = data_spec(index, len(fleet.devices),
                     environ.get(DATA_OPTIONS_ENV, DEFAULT_DATA_OPTIONS))
    os.set_inheritable(fd, True)  # the agent keeps the slot locked for its lifetime
    command = run_argv(device_dir / "device.yaml", spec, argv)
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
