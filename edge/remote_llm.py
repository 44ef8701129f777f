"""The frozen LLM in the cloud, reached over MQTT v5: ``shared.backend.LLMBackend`` for a device.

Each call publishes an ``LLMRequest`` envelope on ``devices/{id}/llm/requests`` with the v5
ResponseTopic ``devices/{id}/llm/responses`` and CorrelationData = the request id, then waits
for the ``LLMResponse`` with that id. On a timeout it publishes the very same request again
(same request id, so a late answer to an earlier attempt is just as good); responses to other
ids (stale attempts of earlier calls) are dropped. A worker's error reply raises
``RemoteLLMError`` with the worker's code and message.

The constructor takes the device's connected (or about to connect) ``shared.mqtt.MqttClient``
and subscribes the device's response topic on it, into its own inbox: the agent keeps one
broker connection for tasks, updates, presence and the LLM. Calls are serialised (one request
in flight per ``RemoteLLM``), which is what a training loop does anyway.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from shared import activations, topics
from shared.activations import DEFAULT_ENCODING, ActivationEncoding
from shared.backend import StepResult
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    LLMRequest,
    LLMResponse,
    MessageError,
    pack,
    unpack,
)
from shared.mqtt import AckTimeout, Inbox, MqttClient, NotConnectedError, request_properties

log = logging.getLogger(__name__)
_Answer = TypeVar("_Answer")  # what a reply reader returns


class RemoteLLMError(RuntimeError):
    """The LLM worker refused or failed a request (``code`` as the worker sent it)."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"LLM worker error {code!r}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class RemoteLLMTimeout(RemoteLLMError, TimeoutError):
    """No answer after every attempt."""


class RemoteLLMStopped(RuntimeError):
    """The device is shutting down: the call was abandoned while it waited for an answer."""


STOP_POLL_S = 0.25  # how often a wait for an answer looks at the stop flag


@dataclass
class RemoteStats:
    """What this device exchanged with the LLM workers (bytes as published / received)."""

    requests: int = 0
    attempts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    ignored: int = 0  # responses for other request ids, or unreadable
    last: tuple[int, int] = (0, 0)  # (up, down) bytes of the last call's answered attempt


class RemoteLLM:
    """``LLMBackend`` over MQTT for device ``device_id`` (see the module docstring)."""

    def __init__(self, client: MqttClient, *, device_id: str, base_version: str,
                 timeout_s: float = 60.0, retries: int = 2,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 publish_timeout_s: float = 10.0, stop: threading.Event | None = None,
                 encoding: ActivationEncoding = DEFAULT_ENCODING) -> None:
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"need timeout_s > 0 and retries >= 0, got {timeout_s!r}, "
                             f"{retries!r}")
        self.client = client
        self.device_id = device_id
        self.base_version = base_version
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_message_bytes = max_message_bytes
        self.publish_timeout_s = publish_timeout_s
        self.stop = stop  # set: the waits and retries end with RemoteLLMStopped
        activations.scheme_for(encoding, 1)  # ValueError for an unknown encoding
        self.encoding = encoding  # how activations go up and gradients come down
        self.stats = RemoteStats()
        self._lock = threading.Lock()
        self._answer_bytes = 0
        self._requests_topic = topics.llm_requests(device_id)
        self._responses_topic = topics.llm_responses(device_id)
        self._inbox: Inbox = client.subscribe(self._responses_topic, qos=topics.LLM_QOS)

    # --- LLMBackend ---------------------------------------------------------------------------

    def last_exchange(self) -> tuple[int, int]:
        """Bytes published and received for the last answered call (``ReportsWireBytes``)."""
        return self.stats.last

    def loss_and_input_grads(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor) -> StepResult:
        """Remote frozen forward + backward; shapes (B, L, d), (B, L), (B, L)."""
        parts = activations.request_parts(inputs_embeds, attention_mask, labels, self.encoding)
        response, (grads, losses) = self._call("step", parts, functools.partial(
            activations.read_step_reply, shape=tuple(inputs_embeds.shape)))
        batch = inputs_embeds.shape[0]
        if tuple(grads.shape) != tuple(inputs_embeds.shape) or tuple(losses.shape) != (batch,):
            raise RemoteLLMError("bad_response", f"expected input_grads "
                                 f"{tuple(inputs_embeds.shape)} and sample_losses ({batch},), "
                                 f"got {tuple(grads.shape)} and {tuple(losses.shape)}")
        if response.loss is None:
            raise RemoteLLMError("bad_response", "a step response without a loss")
        grads = grads.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return StepResult(response.loss, losses, grads)

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Remote next-token log-probabilities (B, vocab) after each row's last real token."""
        parts = activations.request_parts(inputs_embeds, attention_mask, None, self.encoding)
        _, logprobs = self._call("score", parts, activations.read_score_reply)
        if logprobs.dim() != 2 or logprobs.shape[0] != inputs_embeds.shape[0]:
            raise RemoteLLMError("bad_response", f"expected logprobs ({inputs_embeds.shape[0]}, "
                                 f"vocab), got {tuple(logprobs.shape)}")
        return logprobs

    # --- request / response -------------------------------------------------------------------

    def _call(self, op: Literal["step", "score"], parts: dict[str, bytes],
              read: Callable[..., _Answer]) -> tuple[LLMResponse, _Answer]:
        """One request; ``read`` (an ``activations.read_*_reply``) decodes the answer's parts in
        the encoding the answer declares."""
        request_id = uuid.uuid4().hex
        request = LLMRequest(request_id=request_id, op=op, base_version=self.base_version,
                             encoding=self.encoding)
        payload = pack(request, parts)
        with self._lock:
            self.stats.requests += 1
            response, answer = self._exchange(request_id, payload)
        if not response.ok:
            assert response.error is not None  # LLMResponse guarantees it
            raise RemoteLLMError(response.error.code, response.error.message, request_id)
        try:
            return response, read(answer, response.encoding, kind=response.kind,
                                  max_bytes=self.max_message_bytes)
        except MessageError as err:
            raise RemoteLLMError("bad_response", str(err), request_id) from None

    def _exchange(self, request_id: str, payload: bytes,
                  ) -> tuple[LLMResponse, dict[str, bytes]]:
        """Publish (size-checked) and wait; again with the same id after each timeout."""
        properties = request_properties(self._responses_topic, request_id.encode())
        for attempt in range(1 + self.retries):
            self._check_stop(request_id)
            self.stats.attempts += 1
            try:
                self.client.publish(self._requests_topic, payload,
                                    max_bytes=self.max_message_bytes, qos=topics.LLM_QOS,
                                    properties=properties, timeout=self.publish_timeout_s)
                self.stats.bytes_up += len(payload)
            except (AckTimeout, NotConnectedError) as err:  # the link is down: wait, then retry
                log.warning("request %s attempt %d not acknowledged: %s", request_id,
                            attempt + 1, err)
            answer = self._await(request_id, time.monotonic() + self.timeout_s)
            if answer is not None:
                self.stats.last = (len(payload), self._answer_bytes)
                return answer
            log.warning("no answer to LLM request %s (attempt %d of %d)", request_id,
                        attempt + 1, 1 + self.retries)
        raise RemoteLLMTimeout("timeout", f"no answer after {1 + self.retries} attempt(s) of "
                               f"{self.timeout_s:g} s", request_id)

    def _await(self, request_id: str, deadline: float,
               ) -> tuple[LLMResponse, dict[str, bytes]] | None:
        while (left := deadline - time.monotonic()) > 0:
            self._check_stop(request_id)
            received = self._inbox.get(timeout=min(left, STOP_POLL_S))
            if received is None:
                continue
            try:
                response, parts = unpack(received.payload, LLMResponse,
                                         max_bytes=self.max_message_bytes)
            except MessageError as err:
                self.stats.ignored += 1
                log.warning("ignoring an unreadable LLM response: %s", err)
                continue
            if response.request_id == request_id:
                self.stats.bytes_down += len(received.payload)
                self._answer_bytes = len(received.payload)
                return response, parts
            self.stats.ignored += 1  # a late answer to an earlier call
        return None

    def _check_stop(self, request_id: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RemoteLLMStopped(f"LLM request {request_id} abandoned: the device is stopping")
