"""edge.state: durable device state, atomic writes, crash-safe round commit, corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from edge import state as state_mod
from edge.state import (
    DONE_FILE,
    GLOBAL_FILE,
    PENDING_FILE,
    RESIDUAL_FILE,
    STATE_SUBDIR,
    TASK_FILE,
    DeviceState,
    GlobalAdapter,
    StateCorrupt,
    StateError,
    atomic_write,
    update_id_for,
)
from shared import codec
from shared.messages import TrainTask, UpdateMessage, pack


def _adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"image.lora_A.weight": torch.randn(2, 4, generator=gen),
            "image.lora_B.weight": torch.randn(4, 2, generator=gen)}


def _task_payload(task_id: str = "task-0001", round_id: int = 1) -> bytes:
    task = TrainTask(task_id=task_id, round_id=round_id, global_version=3, base_version="b1",
                     strategy="fednano", deadline_at=1e12)
    return pack(task, {"global": codec.encode(_adapter(), codec.Scheme())})


def _update_payload(task_id: str = "task-0001") -> bytes:
    message = UpdateMessage(update_id=update_id_for("dev-1", task_id), task_id=task_id,
                            round_id=1, global_version=3, base_version="b1", n_samples=10)
    return pack(message, {"delta": codec.encode(_adapter(1), codec.Scheme())})


def test_fresh_state_is_empty(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    assert st.directory == tmp_path / STATE_SUBDIR
    assert st.load_global() is None and st.load_task() is None and st.load_pending() is None
    assert st.load_residual() == {}
    assert not st.is_done("task-0001") and not st.is_cancelled(1)


def test_everything_survives_a_new_process(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    st.save_global(GlobalAdapter(3, "b1", _adapter()))
    st.save_task(_task_payload())
    st.save_residual(_adapter(2))
    st.mark_cancelled(7)
    again = DeviceState(tmp_path)  # a reboot: a new object on the same folder
    loaded = again.load_global()
    assert loaded is not None and (loaded.version, loaded.base_version) == (3, "b1")
    assert all(torch.equal(loaded.state[k], v) for k, v in _adapter().items())
    task = again.load_task()
    assert task is not None and task[0].task_id == "task-0001" and "global" in task[1]
    assert all(torch.equal(again.load_residual()[k], v) for k, v in _adapter(2).items())
    assert again.is_cancelled(7)


def test_pending_commit_and_finish(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    st.save_task(_task_payload())
    payload = _update_payload()
    pending = st.save_pending(payload, _adapter(5))
    assert pending.update_id == update_id_for("dev-1", "task-0001")
    reloaded = DeviceState(tmp_path).load_pending()
    assert reloaded is not None and reloaded.payload == payload  # byte for byte
    assert reloaded.update_id == pending.update_id
    assert torch.equal(reloaded.residual["image.lora_A.weight"], _adapter(5)["image.lora_A.weight"])
    assert st.load_residual() == {}  # not promoted before PUBACK
    st.finish_pending(reloaded)
    assert st.load_pending() is None and st.load_task() is None
    assert st.is_done("task-0001")
    key = "image.lora_B.weight"
    assert torch.equal(st.load_residual()[key], _adapter(5)[key])


def test_finish_is_idempotent_after_a_crash_half_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = DeviceState(tmp_path)
    st.save_task(_task_payload())
    pending = st.save_pending(_update_payload(), _adapter(5))

    def crash(task_id: str) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(st, "mark_done", crash)
    with pytest.raises(KeyboardInterrupt):
        st.finish_pending(pending)
    monkeypatch.undo()
    again = DeviceState(tmp_path)
    left = again.load_pending()
    assert left is not None  # still there: the reboot resends it, then finishes
    again.finish_pending(left)
    again.finish_pending(left)
    assert again.load_pending() is None and again.is_done("task-0001")


def test_finish_keeps_a_newer_task(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    pending = st.save_pending(_update_payload("task-0001"), {})
    st.save_task(_task_payload("task-0002", round_id=2))
    st.finish_pending(pending)
    task = st.load_task()
    assert task is not None and task[0].task_id == "task-0002"


def test_update_id_is_stable_and_valid() -> None:
    a = update_id_for("dev-1", "task-0001")
    assert a == update_id_for("dev-1", "task-0001")
    assert a != update_id_for("dev-2", "task-0001") != update_id_for("dev-1", "task-0002")
    UpdateMessage(update_id=a, task_id="task-0001", round_id=1, global_version=1,
                  base_version="b", n_samples=1)  # fits the protocol's MessageId


def test_save_pending_refuses_non_update_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="UpdateMessage"):
        DeviceState(tmp_path).save_pending(_task_payload(), {})


@pytest.mark.parametrize(
    ("name", "content", "load", "hint"),
    [
        (PENDING_FILE, b"garbage", "load_pending", "unsent update"),
        (TASK_FILE, b"FNM1garbage", "load_task", "skip that round"),
        (RESIDUAL_FILE, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad", "load_residual", "from zero"),
        (GLOBAL_FILE, b"", "load_global", "next task"),
        (DONE_FILE, b"[1, 2]", "is_done", "redelivered"),
    ],
)
def test_corrupt_files_name_the_file_and_the_recovery(
    tmp_path: Path, name: str, content: bytes, load: str, hint: str
) -> None:
    st = DeviceState(tmp_path)
    (st.directory / name).write_bytes(content)
    args = ("task-0001",) if load == "is_done" else ()
    with pytest.raises(StateCorrupt) as info:
        getattr(st, load)(*args)
    message = str(info.value)
    assert str(st.directory / name) in message and hint in message
    assert info.value.path == st.directory / name


def test_pending_whose_update_does_not_parse_is_corrupt(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    from safetensors.torch import save

    data = save({"update": torch.frombuffer(bytearray(b"FNM1 not an update"), dtype=torch.uint8)})
    (st.directory / PENDING_FILE).write_bytes(data)
    with pytest.raises(StateCorrupt, match="stored update does not parse"):
        st.load_pending()


def test_non_finite_residual_is_corrupt(tmp_path: Path) -> None:
    st = DeviceState(tmp_path)
    st.save_residual({"x": torch.tensor([1.0, float("nan")])})
    with pytest.raises(StateCorrupt, match="non-finite"):
        st.load_residual()


def test_atomic_write_keeps_the_old_file_on_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(state_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]  # no temp file left behind


def test_acquire_drops_leftover_temp_files(tmp_path: Path) -> None:
    folder = tmp_path / STATE_SUBDIR
    folder.mkdir()
    (folder / ".tmp-abc").write_bytes(b"half")
    st = DeviceState(tmp_path)
    assert (folder / ".tmp-abc").exists()  # merely reading leaves a running agent alone
    st.acquire()
    assert not (folder / ".tmp-abc").exists()
    st.release()


def test_one_agent_per_state_folder(tmp_path: Path) -> None:
    first, second = DeviceState(tmp_path), DeviceState(tmp_path)
    first.acquire()
    with pytest.raises(StateError, match="another agent is using the state folder"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_done_list_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "DONE_KEEP", 3)
    st = DeviceState(tmp_path)
    for i in range(5):
        st.mark_done(f"task-000{i}")
    assert not st.is_done("task-0001") and st.is_done("task-0004")
