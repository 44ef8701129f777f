"""The device's durable local state, so a reboot loses nothing.

One folder, ``<state_dir>/agent/``, one file per fact, each written atomically (temp file in the
same folder, fsync, ``os.replace``, fsync of the folder): a crash leaves the old file or the new
one, never half of either. Tensors are safetensors, messages are the envelopes as they travel
(``shared.messages``); nothing is pickled::

    global.safetensors    the last global adapter seen, metadata: global_version, base_version
    task.msg              the TrainTask being worked on (a reboot mid-round restarts it)
    residual.safetensors  the error-feedback residual (what lossy codecs have not sent yet)
    pending.safetensors   an update not yet acknowledged by the broker: "update" (uint8, the
                          encoded UpdateMessage) + "residual/<key>" (the residual after it),
                          metadata: update_id, task_id, round_id
    done.json             recently finished task ids and cancelled rounds (ignore redeliveries)
    agent.lock            held (flock) by the running agent: one agent per folder

A round commits in one step: ``save_pending`` writes the update *and* the residual it leaves
behind in one file, before the update is published. ``finish_pending`` (after PUBACK) promotes
that residual, records the task as done and removes the task and the pending file, in an order
where a crash between any two steps is repaired by running it again. So after a reboot a
pending update is resent byte for byte (same ``update_id``) and the residual is never applied
twice.

**Corrupt files** raise ``StateCorrupt``, which names the file and how to recover. Recovery is
deleting that one file (the agent never does it for you, because it loses something):

- ``pending.safetensors``: the unsent update is dropped; the round goes on without this device.
- ``task.msg``: the device skips that round.
- ``residual.safetensors``: error feedback restarts from zero (one round's rounding is lost).
- ``global.safetensors``: nothing is lost; the next task brings the global adapter again.
- ``done.json``: a redelivered task could be trained again; its update reuses the same
  ``update_id`` (derived from the task), so the cloud still stores it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.adapters import AdapterState
from shared.files import atomic_write, fsync_dir
from shared.messages import MessageError, TrainTask, UpdateMessage, unpack

STATE_SUBDIR = "agent"
GLOBAL_FILE = "global.safetensors"
TASK_FILE = "task.msg"
RESIDUAL_FILE = "residual.safetensors"
PENDING_FILE = "pending.safetensors"
DONE_FILE = "done.json"
LOCK_FILE = "agent.lock"
DONE_KEEP = 256  # finished task ids remembered (QoS 1 may redeliver a task)
_UPDATE = "update"
_RESIDUAL_PREFIX = "residual/"
_TMP_PREFIX = ".tmp-"
_UNBOUNDED = 2**62  # our own files: the size was checked before they were written
_RECOVERY = {
    PENDING_FILE: "delete it to drop the unsent update (the round goes on without this device)",
    TASK_FILE: "delete it to skip that round",
    RESIDUAL_FILE: "delete it to restart error feedback from zero",
    GLOBAL_FILE: "delete it; the next task brings the global adapter again",
    DONE_FILE: "delete it; a redelivered task may be trained again (same update id)",
}


class StateError(RuntimeError):
    """The device's local state cannot be read or written."""


class StateCorrupt(StateError):
    """A state file exists but does not parse; the message names it and how to recover."""

    def __init__(self, path: Path, reason: str) -> None:
        hint = _RECOVERY.get(path.name, "delete it")
        super().__init__(f"corrupt device state file {path}: {reason}. To recover, {hint} "
                         "(see edge/state.py).")
        self.path = path


@dataclass(frozen=True)
class GlobalAdapter:
    """The last global adapter this device received."""

    version: int
    base_version: str
    state: AdapterState


@dataclass(frozen=True)
class PendingUpdate:
    """An encoded UpdateMessage waiting for its PUBACK, and the residual it leaves behind."""

    payload: bytes
    message: UpdateMessage
    residual: AdapterState

    @property
    def update_id(self) -> str:
        return self.message.update_id


def update_id_for(device_id: str, task_id: str) -> str:
    """The update id of ``device_id``'s answer to ``task_id``: the same on every resend and
    after any reboot, so the cloud stores the update exactly once."""
    digest = hashlib.sha256(f"{device_id}\n{task_id}".encode()).hexdigest()
    return f"u-{digest[:32]}"


class DeviceState:
    """Read and write the files of ``<state_dir>/agent/``.

    The agent ``acquire``s the folder (an exclusive ``flock`` on ``agent.lock``) so two agents
    can never share it; reading without acquiring is for inspection and tests.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / STATE_SUBDIR
        self._lock_fd: int | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(f"cannot create the state folder {self.directory}: {err}") from err

    def acquire(self) -> None:
        """Take the folder for this agent (``StateError`` if another one holds it), then drop
        the temp files of writes a crash interrupted."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path(LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            raise StateError(f"another agent is using the state folder {self.directory} "
                             f"({err.strerror}); run one agent per device") from err
        self._lock_fd = fd
        for leftover in self.directory.glob(f"{_TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    def release(self) -> None:
        """Let another agent take the folder (closing the lock file releases the flock)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def path(self, name: str) -> Path:
        """The path of state file ``name`` (e.g. ``PENDING_FILE``)."""
        return self.directory / name

    # ------------------------------------------------------------------------ global adapter

    def save_global(self, adapter: GlobalAdapter) -> None:
        """Keep the global adapter a task brought (and its version)."""
        metadata = {"global_version": str(adapter.version), "base_version": adapter.base_version}
        self._write(GLOBAL_FILE, _tensors_bytes(adapter.state, metadata))

    def load_global(self) -> GlobalAdapter | None:
        """The last global adapter received, or None before the first task."""
        loaded = self._read_tensors(GLOBAL_FILE)
        if loaded is None:
            return None
        tensors, metadata = loaded
        version = _metadata_int(metadata, "global_version", self.path(GLOBAL_FILE))
        return GlobalAdapter(version, metadata.get("base_version", ""), tensors)

    # ------------------------------------------------------------------------------- task

    def save_task(self, payload: bytes) -> None:
        """Keep the TrainTask envelope as received (it carries the global adapter)."""
        self._write(TASK_FILE, payload)

    def load_task(self) -> tuple[TrainTask, dict[str, bytes]] | None:
        """The saved TrainTask and its parts, or None when no round is in progress."""
        data = self._read(TASK_FILE)
        if data is None:
            return None
        try:
            return unpack(data, TrainTask, max_bytes=_UNBOUNDED)
        except MessageError as err:
            raise StateCorrupt(self.path(TASK_FILE), str(err)) from err

    def clear_task(self) -> None:
        """Forget the saved task (finished, refused or cancelled)."""
        self._remove(TASK_FILE)

    # --------------------------------------------------------------------------- residual

    def load_residual(self) -> AdapterState:
        """The error-feedback residual (empty before the first lossy round)."""
        loaded = self._read_tensors(RESIDUAL_FILE)
        return {} if loaded is None else loaded[0]

    def save_residual(self, residual: AdapterState) -> None:
        """Replace the error-feedback residual."""
        self._write(RESIDUAL_FILE, _tensors_bytes(residual, {}))

    # ---------------------------------------------------------------------------- pending

    def save_pending(self, payload: bytes, residual: AdapterState) -> PendingUpdate:
        """Commit a round: the encoded update and the residual after it, in one atomic write."""
        message, _ = _parse_update(payload, self.path(PENDING_FILE), corrupt=False)
        tensors = {_UPDATE: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
        tensors |= {_RESIDUAL_PREFIX + k: v for k, v in residual.items()}
        metadata = {"update_id": message.update_id, "task_id": message.task_id,
                    "round_id": str(message.round_id)}
        self._write(PENDING_FILE, _tensors_bytes(tensors, metadata))
        return PendingUpdate(payload, message, dict(residual))

    def load_pending(self) -> PendingUpdate | None:
        """The committed update still waiting for its PUBACK, or None."""
        loaded = self._read_tensors(PENDING_FILE)
        if loaded is None:
            return None
        tensors, _ = loaded
        path = self.path(PENDING_FILE)
        if _UPDATE not in tensors or tensors[_UPDATE].dtype != torch.uint8:
            raise StateCorrupt(path, f"no uint8 {_UPDATE!r} tensor")
        payload = tensors[_UPDATE].numpy().tobytes()
        message, _ = _parse_update(payload, path, corrupt=True)
        residual = {k.removeprefix(_RESIDUAL_PREFIX): v for k, v in tensors.items()
                    if k.startswith(_RESIDUAL_PREFIX)}
        return PendingUpdate(payload, message, residual)

    def finish_pending(self, pending: PendingUpdate) -> None:
        """After PUBACK: promote the residual, mark the task done, drop task and pending.

        Every step is idempotent, so a crash half-way is finished by calling this again.
        """
        self.save_residual(pending.residual)
        self.mark_done(pending.message.task_id)
        task = self.load_task()
        if task is not None and task[0].task_id == pending.message.task_id:
            self.clear_task()
        self._remove(PENDING_FILE)

    def drop_pending(self) -> None:
        """Forget a pending update that can never be delivered (its residual goes with it)."""
        self._remove(PENDING_FILE)

    # ------------------------------------------------------------------------------- done

    def is_done(self, task_id: str) -> bool:
        """Whether ``task_id`` was finished (sent, refused or dropped) recently."""
        return task_id in self._load_done()["tasks"]

    def is_cancelled(self, round_id: int) -> bool:
        """Whether the cloud cancelled round ``round_id`` recently."""
        return round_id in self._load_done()["cancelled_rounds"]

    def mark_done(self, task_id: str) -> None:
        """Remember ``task_id`` as finished (sent, refused or dropped): redeliveries are ignored."""
        done = self._load_done()
        if task_id not in done["tasks"]:
            done["tasks"] = [*done["tasks"], task_id][-DONE_KEEP:]
            self._write(DONE_FILE, json.dumps(done).encode())

    def mark_cancelled(self, round_id: int) -> None:
        """Remember a cancelled round: a later copy of its task is ignored."""
        done = self._load_done()
        if round_id not in done["cancelled_rounds"]:
            done["cancelled_rounds"] = [*done["cancelled_rounds"], round_id][-DONE_KEEP:]
            self._write(DONE_FILE, json.dumps(done).encode())

    def _load_done(self) -> dict[str, list]:
        data = self._read(DONE_FILE)
        if data is None:
            return {"tasks": [], "cancelled_rounds": []}
        path = self.path(DONE_FILE)
        try:
            done = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StateCorrupt(path, f"not JSON ({err})") from err
        if not (isinstance(done, dict) and isinstance(done.get("tasks"), list)
                and isinstance(done.get("cancelled_rounds"), list)):
            raise StateCorrupt(path, "expected {'tasks': [...], 'cancelled_rounds': [...]}")
        return done

    # ---------------------------------------------------------------------------- file I/O

    def _read(self, name: str) -> bytes | None:
        path = self.path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StateError(f"cannot read device state file {path}: {err}") from err

    def _read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        data = self._read(name)
        if data is None:
            return None
        return _parse_tensors(data, self.path(name))

    def _write(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.path(name), data, prefix=_TMP_PREFIX, sync_dir=True)
        except OSError as err:
            raise StateError(f"cannot write device state file {self.path(name)}: {err}") from err

    def _remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
        fsync_dir(self.directory)


def _tensors_bytes(tensors: AdapterState, metadata: dict[str, str]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata=metadata or None)


def _parse_tensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = st_load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise StateCorrupt(path, f"not a safetensors file ({err})") from err
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise StateCorrupt(path, f"non-finite values in {bad}")
    return tensors, metadata


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (``safetensors.torch.load`` drops it)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not an object")
    return metadata


def _metadata_int(metadata: dict[str, str], key: str, path: Path) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError) as err:
        raise StateCorrupt(path, f"metadata {key!r} missing or not an integer") from err


def _parse_update(payload: bytes, path: Path, *, corrupt: bool) -> tuple[UpdateMessage, dict]:
    try:
        return unpack(payload, UpdateMessage, max_bytes=_UNBOUNDED)
    except MessageError as err:
        if corrupt:
            raise StateCorrupt(path, f"the stored update does not parse ({err})") from err
        raise ValueError(f"not an UpdateMessage envelope: {err}") from err
