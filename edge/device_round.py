"""One round on the device, without the transport: TrainTask in, encoded UpdateMessage out.

``execute_task`` reads top to bottom, one step per call: check the task -> load the global
adapter -> local steps, Δθ and Fisher (``edge.trainer.run_round``) -> encode with the task's
codec (error feedback for lossy schemes) -> check the size. The agent commits the result to its
state and publishes it; everything here is a pure function of its inputs, so it is tested
without a broker.

A task the device cannot or must not do raises ``TaskRefused`` with a code for the cloud
(``rejected``, ``base_mismatch``, ``expired``, ``too_large``); a round stopped from outside
(cancel, shutdown, deadline) raises ``RoundInterrupted`` from inside the LLM calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError

from edge.profiles import DeviceProfile
from edge.trainer import run_round
from shared import codec, protocol
from shared.adapters import AdapterState
from shared.backend import CountingBackend, LLMBackend, StepResult
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.messages import MessageError, TrainTask, UpdateMessage, check_size
from shared.nanoedge import NanoEdge
from shared.training import TrainConfig, resolve_training
from shared.update import AdapterUpdate


class TaskRefused(Exception):
    """The device will not (or cannot) deliver an update for this task; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RoundInterrupted(Exception):
    """Training stopped from outside: ``reason`` is "cancelled", "shutdown" or "expired"."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"round interrupted: {reason}")
        self.reason = reason


@dataclass
class DeviceModel:
    """What a device trains with: its NanoEdge and a batcher over its local visual tokens."""

    edge: NanoEdge
    batcher: VQABatcher
    base_version: str  # the frozen base the bundle was exported from (tasks must match it)
    bundle_version: str
    providers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EncodedUpdate:
    """An UpdateMessage ready to commit and publish, and the residual it leaves behind."""

    payload: bytes
    message: UpdateMessage
    residual: AdapterState


StopCheck = Callable[[], "str | None"]  # a reason to stop ("cancelled", ...) or None


def execute_task(
    task: TrainTask, parts: Mapping[str, bytes], model: DeviceModel, backend: LLMBackend,
    samples: Sequence[VQASample], *, profile: DeviceProfile, residual: AdapterState,
    update_id: str, should_stop: StopCheck,
) -> EncodedUpdate:
    """Train one round for ``task`` and return its encoded update (see the module docstring)."""
    config = check_task(task, model, profile, n_samples=len(samples))
    global_state = load_global(task, parts, model.edge)
    counting = CountingBackend(backend)  # innermost: it reads the remote's wire bytes
    started = time.monotonic()
    try:
        result = run_round(model.edge, GuardedBackend(counting, should_stop), model.batcher,
                           samples, global_state, config, client_id=update_id, seed=task.seed,
                           base_version=task.global_version)
    except FloatingPointError as err:  # the LLM sent NaN/Inf gradients: this round is lost
        raise TaskRefused("failed", f"task {task.task_id}: {err}") from err
    metrics = {**result.update.metrics, "train_seconds": time.monotonic() - started,
               "llm_bytes_up": float(counting.training.up),
               "llm_bytes_down": float(counting.training.down)}
    encoded = encode_update(task, result.update, metrics, residual, update_id)
    check_update_size(encoded.payload, task, profile)
    return encoded


# ------------------------------------------------------------------------------- checks


def check_task(
    task: TrainTask, model: DeviceModel, profile: DeviceProfile, *, n_samples: int,
    now: float | None = None,
) -> TrainConfig:
    """The local TrainConfig for ``task``, or ``TaskRefused`` saying why the device won't."""
    if task.base_version != model.base_version:
        raise TaskRefused("base_mismatch", f"task {task.task_id} is for base "
                          f"{task.base_version!r}, this device's bundle is for "
                          f"{model.base_version!r}")
    remaining = task.deadline_at - (time.time() if now is None else now)
    if remaining <= 0:
        raise TaskRefused("expired", f"task {task.task_id}: deadline passed {-remaining:.0f} s "
                          "ago")
    if n_samples < 1:
        raise TaskRefused("rejected", "this device has no local samples to train on")
    try:
        return resolve_training(profile.training, task.hparams)
    except ValidationError as err:
        raise TaskRefused("rejected", f"task {task.task_id}: hyper-parameters do not fit "
                          f"this device: {err.errors()[0]['msg']}") from err


def load_global(task: TrainTask, parts: Mapping[str, bytes], edge: NanoEdge) -> AdapterState:
    """Decode the task's global adapter, checked against this device's adapter shapes."""
    expected = {k: tuple(v.shape) for k, v in edge.adapters.adapter_state_dict().items()}
    try:
        state = protocol.decode_global(parts, expected=expected)
    except (MessageError, codec.CodecError) as err:
        raise TaskRefused("rejected", f"task {task.task_id}: bad global adapter: {err}") from err
    return {k: v.float() for k, v in state.items()}


def check_update_size(payload: bytes, task: TrainTask, profile: DeviceProfile) -> None:
    """Refuse an update over min(task limit, profile limit) before it reaches the broker."""
    limit = min(task.max_update_bytes, profile.max_update_bytes)
    try:
        check_size(payload, limit, what="update")
    except MessageError as err:
        raise TaskRefused("too_large", f"{err} (task allows {task.max_update_bytes:,}, profile "
                          f"{profile.name} allows {profile.max_update_bytes:,}); choose a "
                          f"smaller codec, e.g. int8 or topk (this round: delta "
                          f"{task.codec.delta.label()}, fisher {task.codec.fisher.label()})"
                          ) from err


# ------------------------------------------------------------------------------- encode


def encode_update(
    task: TrainTask, update: AdapterUpdate, metrics: Mapping[str, float],
    residual: AdapterState, update_id: str,
) -> EncodedUpdate:
    """The UpdateMessage envelope: Δθ through error feedback, then the task's codecs."""
    sent, residual = protocol.error_feedback(update.delta, task.codec.delta, residual)
    message = UpdateMessage(
        update_id=update_id, task_id=task.task_id, round_id=task.round_id,
        global_version=task.global_version, base_version=task.base_version,
        n_samples=update.n_samples, metrics=dict(metrics),
    )
    payload = protocol.encode_update(message, sent, update.fisher, task.codec)
    return EncodedUpdate(payload, message, residual)


# ------------------------------------------------------------------------ interruption


class GuardedBackend:
    """An ``LLMBackend`` that asks ``should_stop`` before every LLM call (one per step)."""

    def __init__(self, inner: LLMBackend, should_stop: StopCheck) -> None:
        self.inner = inner
        self.should_stop = should_stop

    def _check(self) -> None:
        reason = self.should_stop()
        if reason is not None:
            raise RoundInterrupted(reason)

    def loss_and_input_grads(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> StepResult:
        self._check()
        return self.inner.loss_and_input_grads(inputs_embeds, attention_mask, labels)

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check()
        return self.inner.score(inputs_embeds, attention_mask)
