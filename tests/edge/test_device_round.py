"""edge.device_round: one round without the transport (tiny random-init models)."""

from __future__ import annotations

import time

import pytest
import torch

from edge.device_round import (
    DeviceModel,
    RoundInterrupted,
    TaskRefused,
    check_task,
    execute_task,
)
from edge.profiles import load_profile
from shared import codec
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.messages import TaskHParams, TrainTask, UpdateCodec, UpdateMessage, pack, unpack
from shared.prompts import PromptTemplate

ANSWERS = ["red", "blue", "green"]
FAST = TaskHParams(steps=2, batch_size=4, fisher_samples=4)


@pytest.fixture
def samples() -> list[VQASample]:
    return [VQASample(f"img/{i}", "what colour is the shape?", ANSWERS[i % 3], "color")
            for i in range(12)]


@pytest.fixture
def model(tiny_edge, word_tokenizer) -> DeviceModel:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    table = {f"img/{i}": torch.randn(4, 32, generator=gen) for i in range(12)}
    batcher = VQABatcher(word_tokenizer, PromptTemplate(),
                         lambda keys: torch.stack([table[k] for k in keys]), 4)
    return DeviceModel(tiny_edge, batcher, base_version="tiny", bundle_version="0" * 16)


def _task(model: DeviceModel, **fields: object) -> tuple[TrainTask, dict[str, bytes]]:
    values: dict = {"task_id": "task-0001", "round_id": 1, "global_version": 2,
                    "base_version": "tiny", "strategy": "fednano", "hparams": FAST,
                    "deadline_at": time.time() + 600}
    task = TrainTask(**{**values, **fields})
    frame = codec.encode(model.edge.adapters.adapter_state_dict(), codec.Scheme())
    return task, {"global": unpack(pack(task, {"global": frame}), TrainTask)[1]["global"]}


def _run(task, parts, model, backend, samples, residual=None, stop=lambda: None):  # type: ignore[no-untyped-def]
    return execute_task(task, parts, model, backend, samples, profile=load_profile("sim-cpu"),
                        residual=residual or {}, update_id="u-test-0001", should_stop=stop)


def test_round_produces_a_valid_update(tiny_llm, model, samples) -> None:  # type: ignore[no-untyped-def]
    task, parts = _task(model)
    start = model.edge.adapters.adapter_state_dict()
    encoded = _run(task, parts, model, tiny_llm[1], samples)
    message, got = unpack(encoded.payload, UpdateMessage)
    assert message == encoded.message
    assert (message.update_id, message.task_id, message.round_id) == ("u-test-0001", "task-0001", 1)
    assert message.n_samples == 12 and message.global_version == 2
    assert {"loss_first", "loss_last", "llm_bytes_up", "train_seconds"} <= set(message.metrics)
    shapes = {k: tuple(v.shape) for k, v in start.items()}
    delta = codec.decode(got["delta"], expected=shapes)
    fisher = codec.decode(got["fisher"], expected=shapes)
    end = model.edge.adapters.adapter_state_dict()
    # The default codec (int8 blocks of 64 + zstd, bf16 + zstd Fisher) is lossy: what was sent
    # plus the error-feedback residual kept on the device is the true delta.
    assert codec.frame_info(got["delta"])["label"] == "int8/b64+zstd3"
    assert codec.frame_info(got["fisher"])["label"] == "bf16+zstd3"
    for key in start:
        true = end[key] - start[key]
        assert torch.allclose(delta[key] + encoded.residual[key], true, atol=1e-7)
        assert float(encoded.residual[key].abs().max()) <= float(true.abs().max()) / 254 + 1e-9
    assert any(v.any() for v in encoded.residual.values())
    assert all((f >= 0).all() for f in fisher.values())


def test_fp32_codec_is_exact_and_keeps_no_residual(tiny_llm, model, samples) -> None:  # type: ignore[no-untyped-def]
    task, parts = _task(model, codec=UpdateCodec(delta=codec.Scheme(kind="fp32")))
    start = model.edge.adapters.adapter_state_dict()
    encoded = _run(task, parts, model, tiny_llm[1], samples)
    delta = codec.decode(unpack(encoded.payload, UpdateMessage)[1]["delta"])
    end = model.edge.adapters.adapter_state_dict()
    assert all(torch.allclose(start[k] + delta[k], end[k]) for k in start)
    assert all(not v.any() for v in encoded.residual.values())


def test_topk_keeps_an_error_feedback_residual(tiny_llm, model, samples) -> None:  # type: ignore[no-untyped-def]
    scheme = codec.Scheme(kind="topk", k_fraction=0.1, zstd=True)
    task, parts = _task(model, codec=UpdateCodec(delta=scheme),
                        hparams=FAST.model_copy(update={"fisher_samples": 0}))
    start = model.edge.adapters.adapter_state_dict()
    encoded = _run(task, parts, model, tiny_llm[1], samples)
    _, got = unpack(encoded.payload, UpdateMessage)
    assert "fisher" not in got
    sent = codec.decode(got["delta"])
    end = model.edge.adapters.adapter_state_dict()
    for key in start:  # what was sent + what is kept = the true delta
        assert torch.allclose(sent[key] + encoded.residual[key], end[key] - start[key], atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"base_version": "other"}, "base_mismatch"),
        ({"deadline_at": 1.0}, "expired"),
        ({"hparams": TaskHParams(lr=1.0, batch_size=4, steps=1)}, None),  # valid: accepted
    ],
)
def test_check_task(model, fields, code) -> None:  # type: ignore[no-untyped-def]
    task, _ = _task(model, **fields)
    if code is None:
        assert check_task(task, model, load_profile("sim-cpu"), n_samples=3).lr == 1.0
        return
    with pytest.raises(TaskRefused) as info:
        check_task(task, model, load_profile("sim-cpu"), n_samples=3)
    assert info.value.code == code


def test_a_round_that_sets_no_batch_trains_with_the_profiles(model) -> None:  # type: ignore[no-untyped-def]
    # jetson-orin-nano-8gb's profile says batch 8 (its memory budget). A round whose operator
    # left the batch alone must not impose one: the device trains batches of 8 in one pass,
    # the cloud's task having travelled the wire as it does in production.
    from cloud.rounds import RoundConfig

    sent, _ = _task(model, hparams=RoundConfig().task_hparams())
    task, _ = unpack(pack(sent), TrainTask)
    config = check_task(task, model, load_profile("jetson-orin-nano-8gb"), n_samples=3)
    assert (config.batch_size, config.micro_batch_size) == (8, None)
    # The operator's batch still wins; the profile's 8 then caps each pass.
    sent, _ = _task(model, hparams=RoundConfig(hparams=TaskHParams(batch_size=16)).task_hparams())
    config = check_task(unpack(pack(sent), TrainTask)[0], model,
                        load_profile("jetson-orin-nano-8gb"), n_samples=3)
    assert (config.batch_size, config.micro_batch_size) == (16, 8)


def test_bad_global_adapter_is_refused(tiny_llm, model, samples) -> None:  # type: ignore[no-untyped-def]
    task, _ = _task(model)
    wrong = codec.encode({"image.lora_A.weight": torch.zeros(1, 1)}, codec.Scheme())
    with pytest.raises(TaskRefused, match="bad global adapter") as info:
        _run(task, {"global": wrong}, model, tiny_llm[1], samples)
    assert info.value.code == "rejected"
    with pytest.raises(TaskRefused, match="lacks its 'global' part"):
        _run(task, {}, model, tiny_llm[1], samples)


def test_oversized_update_is_refused_with_a_clear_error(tiny_llm, model, samples) -> None:  # type: ignore[no-untyped-def]
    task, parts = _task(model, max_update_bytes=1024)
    with pytest.raises(TaskRefused) as info:
        _run(task, parts, model, tiny_llm[1], samples)
    assert info.value.code == "too_large"
    assert "exceeds the limit of 1,024 bytes" in info.value.message
    assert "topk" in info.value.message


def test_should_stop_interrupts_between_steps(tiny_llm, model, samples) -> None:  # type: ignore[no-untyped-def]
    task, parts = _task(model)
    calls = []

    def stop() -> str | None:
        calls.append(1)
        return "cancelled" if len(calls) > 1 else None

    with pytest.raises(RoundInterrupted) as info:
        _run(task, parts, model, tiny_llm[1], samples, stop=stop)
    assert info.value.reason == "cancelled" and len(calls) == 2
