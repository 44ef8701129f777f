"""The LLM worker: the frozen LLM serving devices' split-training requests over MQTT v5.

Workers subscribe ``topics.SHARED_LLM_REQUESTS`` (a shared subscription: the broker hands each
request to one worker, so more workers scale out). A request is an ``LLMRequest`` envelope on
``devices/{id}/llm/requests`` with the v5 ResponseTopic ``devices/{id}/llm/responses`` and
CorrelationData; the answer goes to the device's own response topic with the same
CorrelationData, carrying ``input_grads`` + ``sample_losses`` (op ``step``) or ``logprobs``
(op ``score``) in the request's activation encoding (``shared.activations``). A bad request
gets ``LLMResponse(ok=False, error=...)`` and the worker goes on. Requests and replies travel
at QoS 0 (``topics.LLM_QOS``): the device resends an unanswered request under the same id.

**Dynamic batching.** Requests from different devices are collected for up to ``max_wait_ms``
(from the first one's arrival) or ``max_batch_rows`` rows and run as one forward/backward
(``shared.llm_batching``: right-padded, each request's rows come out as they would alone).

**Budget and fairness.** A request's cost is known from its tensors' shapes before any compute:
more than ``max_request_tokens`` rows x tokens, or a reply that would exceed the message limit,
is refused (``over_budget``). Received requests wait in one queue per device (at most
``max_queued_per_device``; more are refused as ``busy``), and a batch takes at most one request
per device, the devices in turn: a device that floods the worker gets one request per batch,
like every other device, and cannot starve them.

**Isolation.** Every refusal is an ``LLMResponse(ok=False)`` with a code, and counted. Whatever
fails unexpectedly while one request is read or answered becomes an ``internal`` error reply to
that request; the loop serving everyone goes on.

paho's thread only enqueues (``shared.mqtt.Inbox``); parsing, compute and replies run in the
worker's own thread.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cloud import metrics
from cloud.background import BackgroundService
from cloud.llm_backend import InProcessLLM
from shared import activations, topics
from shared.backend import StepResult, check_step_inputs
from shared.llm_batching import pad_batch, split_score, split_step
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ActivationEncoding,
    LLMError,
    LLMRequest,
    LLMResponse,
    MessageError,
    MessageTooLarge,
    pack,
    unpack,
)
from shared.mqtt import ClientOptions, Inbox, MqttClient, MqttError, Received, reply_properties
from shared.prompts import IGNORE_INDEX

log = logging.getLogger(__name__)

UNKNOWN_REQUEST_ID = "unparsed"  # the request_id of a reply to a request that could not be read
_POLL_S = 0.1  # how often an idle worker checks for stop()
_REPLY_OVERHEAD_BYTES = 4096  # envelope prefix, header and safetensors header of a reply


class RequestError(Exception):
    """A request the worker refuses; ``code`` and the message go back in an ``LLMError``."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker serves: which base it is, and how it batches."""

    base_version: str  # requests for another base are refused ("base_mismatch")
    worker_id: str = "llm-worker"
    max_batch_rows: int = 32
    max_wait_ms: float = 5.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    publish_timeout_s: float = 10.0
    max_request_tokens: int = 4096  # rows x tokens of one request (its compute budget)
    max_queued_per_device: int = 4  # requests of one device waiting; more are refused "busy"

    def __post_init__(self) -> None:
        if not self.base_version:
            raise ValueError(f"base_version must not be empty, got {self.base_version!r}")
        if self.max_batch_rows < 1 or self.max_wait_ms < 0:
            raise ValueError(f"need max_batch_rows >= 1 and max_wait_ms >= 0, got "
                             f"{self.max_batch_rows!r} and {self.max_wait_ms!r}")
        if self.max_request_tokens < 1 or self.max_queued_per_device < 1:
            raise ValueError(f"need max_request_tokens >= 1 and max_queued_per_device >= 1, "
                             f"got {self.max_request_tokens!r} and "
                             f"{self.max_queued_per_device!r}")


def worker_client_options(worker_id: str, username: str, password: str) -> ClientOptions:
    """A worker's MQTT options: a clean, non-persistent session.

    A dead worker's persistent session would hold on to its share of the requests until it
    came back; without one, the broker gives them to the live workers of the group.
    """
    return ClientOptions(client_id=worker_id, username=username, password=password,
                         clean_start=True, session_expiry_s=0)


@dataclass
class WorkerStats:
    """Counters of one worker (updated by its thread only)."""

    requests: int = 0  # messages received
    rows: int = 0  # sample rows computed
    batches: int = 0  # LLM calls (one per op per collected batch)
    errors: int = 0  # requests refused or failed (by code in error_codes)
    error_codes: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0  # replies that could not be published (the device will retry)
    max_batch_requests: int = 0  # most requests seen in one LLM call

    def snapshot(self) -> WorkerStats:
        return WorkerStats(self.requests, self.rows, self.batches, self.errors,
                           Counter(self.error_codes), self.unanswered, self.max_batch_requests)


# --- Parsing ------------------------------------------------------------------------------------


@dataclass
class Job:
    """One validated request, ready to batch."""

    request_id: str
    op: str  # "step" | "score"
    reply_to: str
    correlation: bytes | None
    embeds: torch.Tensor  # (B, L, d) in the LLM's dtype
    mask: torch.Tensor  # (B, L) int64, right-padded
    labels: torch.Tensor | None  # (B, L) int64 for "step"
    received_at: float = 0.0
    encoding: ActivationEncoding = "fp32"  # how the request came, and how its reply goes

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


def parse_request(received: Received, llm: InProcessLLM, config: WorkerConfig) -> Job:
    """Validate a received request into a ``Job``; ``RequestError`` says what is wrong."""
    device_id = topics.device_of(received.topic)  # the caller made sure it is a device topic
    reply_to = topics.llm_responses(device_id)
    if received.response_topic not in (None, reply_to):
        raise RequestError("bad_request", f"response topic must be {reply_to!r} (the "
                           f"device's own), got {received.response_topic!r}")
    try:
        request, parts = unpack(received.payload, LLMRequest, max_bytes=config.max_message_bytes)
    except MessageTooLarge as err:
        raise RequestError("too_large", str(err)) from None
    except MessageError as err:
        raise RequestError("bad_request", str(err)) from None
    if request.base_version != config.base_version:
        raise RequestError("base_mismatch", f"this worker serves base {config.base_version!r}, "
                           f"the request is for {request.base_version!r}", request.request_id)
    embeds, mask, labels = _request_tensors(request, parts, llm, config)
    check_budget(request, tuple(embeds.shape), llm, config)
    return Job(request.request_id, request.op, reply_to, received.correlation_data,
               embeds, mask, labels, received.received_at, request.encoding)


def reply_bytes(op: str, rows: int, tokens: int, llm: InProcessLLM,
                encoding: ActivationEncoding = "fp32") -> int:
    """An upper bound of a successful reply's size, known from the request's shape before any
    compute: ``input_grads`` (rows, tokens, width) in ``encoding`` (before zstd, which only
    shrinks it) + ``sample_losses`` for a step, ``logprobs`` (rows, vocab) for a score, plus a
    bounded overhead."""
    itemsize = torch.empty(0, dtype=_llm_dtype(llm)).element_size()
    if op != "step":
        return rows * (llm.vocab_size or llm.width) * itemsize + _REPLY_OVERHEAD_BYTES
    grads = rows * tokens * llm.width
    if encoding == "int8+zstd":
        size = grads + 4 * rows * tokens  # int8 values + a float32 scale per token
    else:
        size = grads * (2 if encoding == "bf16+zstd" else itemsize)
    return size + rows * itemsize + _REPLY_OVERHEAD_BYTES


def check_budget(request: LLMRequest, shape: tuple[int, ...], llm: InProcessLLM,
                 config: WorkerConfig) -> None:
    """``RequestError("over_budget")`` for a request whose compute (rows x tokens) or reply
    would exceed the worker's limits, before it is computed."""
    rows, tokens = shape[0], shape[1]
    if rows * tokens > config.max_request_tokens:
        raise RequestError("over_budget", f"{rows} rows x {tokens} tokens = {rows * tokens} "
                           f"exceeds this worker's budget of {config.max_request_tokens} per "
                           "request: send fewer rows per request", request.request_id)
    size = reply_bytes(request.op, rows, tokens, llm, request.encoding)
    if size > config.max_message_bytes:
        raise RequestError("over_budget", f"the reply would be {size:,} bytes, over the "
                           f"message limit of {config.max_message_bytes:,}: send fewer rows "
                           "per request", request.request_id)


def _request_tensors(request: LLMRequest, parts: dict[str, bytes], llm: InProcessLLM,
                     config: WorkerConfig,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # A compressed request's embeddings decode to at most what the budget lets it compute.
    max_decoded = config.max_request_tokens * llm.width * 8
    try:
        embeds, mask, labels = activations.read_request(
            parts, request.op, request.encoding, kind=request.kind,
            max_bytes=config.max_message_bytes, max_decoded_bytes=max_decoded)
        check_step_inputs(embeds, mask, labels, llm.width, llm.max_tokens, llm.vocab_size)
        if labels is not None:
            _check_answer_tokens(labels)
    except (MessageError, ValueError) as err:
        raise RequestError("bad_request", str(err), request.request_id) from None
    dtype = _llm_dtype(llm)
    return (embeds.to(dtype), mask.to(torch.int64),
            None if labels is None else labels.to(torch.int64))


def _check_answer_tokens(labels: torch.Tensor) -> None:
    # Checked per request so that one bad request cannot fail the others in its batch.
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # position t predicts token t+1
    if not bool((counts > 0).all()):
        raise ValueError("every row needs at least one answer token in labels "
                         "(after the first position)")


def _llm_dtype(llm: InProcessLLM) -> torch.dtype:
    param = next(iter(llm.decoder.parameters()), None)
    return torch.float32 if param is None else param.dtype


def run_step(llm: InProcessLLM, jobs: list[Job]) -> list[StepResult]:
    embeds, mask, labels = pad_batch(jobs)
    assert labels is not None, "step jobs carry labels"
    return split_step(llm.loss_and_input_grads(embeds, mask, labels), jobs)


def run_score(llm: InProcessLLM, jobs: list[Job]) -> list[torch.Tensor]:
    embeds, mask, _ = pad_batch(jobs)
    return split_score(llm.score(embeds, mask), jobs)


# --- Fair queueing ------------------------------------------------------------------------------


class FairQueue:
    """Received requests in one FIFO per device, taken round-robin across devices.

    ``put`` refuses (returns False) a device's request beyond ``per_device`` waiting ones;
    ``take(exclude)`` gives the oldest request of the next device in turn that is not in
    ``exclude`` (the devices already in the batch being built).
    """

    def __init__(self, per_device: int) -> None:
        self.per_device = per_device
        self._queues: OrderedDict[str, deque[Received]] = OrderedDict()  # in serving order

    def put(self, device_id: str, received: Received) -> bool:
        queue = self._queues.setdefault(device_id, deque())
        if len(queue) >= self.per_device:
            return False
        queue.append(received)
        return True

    def take(self, exclude: set[str]) -> tuple[str, Received] | None:
        for device_id in self._queues:
            if device_id not in exclude:
                queue = self._queues.pop(device_id)  # and back at the end of the turn
                received = queue.popleft()
                if queue:
                    self._queues[device_id] = queue
                return device_id, received
        return None

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())


# --- The worker ---------------------------------------------------------------------------------


class LLMWorker(BackgroundService):
    """Serves ``topics.SHARED_LLM_REQUESTS`` with ``llm`` through ``client``.

    ``client`` may be connected already or not (``start`` registers the subscription, which
    then happens at connect). ``start()`` runs ``serve_forever`` in a thread; ``stop()`` ends it.
    """

    def __init__(self, llm: InProcessLLM, client: MqttClient, config: WorkerConfig) -> None:
        super().__init__(f"llm-worker-{config.worker_id}")
        self.llm = llm
        self.client = client
        self.config = config
        self.inbox = Inbox()
        self._stats = WorkerStats()
        self._queue = FairQueue(config.max_queued_per_device)
        self._pending: deque[tuple[str, Job]] = deque()  # parsed, first in the next batch
        metrics.watch_queue(lambda: len(self.inbox) + len(self._queue) + len(self._pending))

    @property
    def stats(self) -> WorkerStats:
        """A copy of the counters."""
        return self._stats.snapshot()

    def subscribe(self) -> None:
        """Join the workers' shared subscription."""
        self.client.subscribe(topics.SHARED_LLM_REQUESTS, inbox=self.inbox, qos=topics.LLM_QOS)

    def start(self) -> LLMWorker:
        """Subscribe (idempotent: the same inbox on the same filter) and serve in a thread."""
        self.subscribe()
        return super().start()

    def run(self) -> None:
        self.serve_forever()

    def serve_forever(self) -> None:
        """Collect, compute, answer; until ``stop()``. (Subscribe first, or use ``start``.)"""
        while not self.stopping:
            jobs = self._collect()
            if jobs:
                self._process(jobs)

    # --- collecting -----------------------------------------------------------------------------

    def _collect(self) -> list[Job]:
        """A batch: the first job, then one job per other device (in turn) until max rows,
        waiting for more up to max_wait_ms after the first one's arrival."""
        first = self._pending.popleft() if self._pending else self._next_job(set(), _POLL_S)
        if first is None:
            return []
        devices, jobs, rows = {first[0]}, [first[1]], first[1].rows
        deadline = first[1].received_at + self.config.max_wait_ms / 1000
        while rows < self.config.max_batch_rows:
            taken = self._next_job(devices, max(0.0, deadline - time.monotonic()))
            if taken is None:
                break
            if rows + taken[1].rows > self.config.max_batch_rows:
                self._pending.append(taken)  # first in the next batch
                break
            devices.add(taken[0])
            jobs.append(taken[1])
            rows += taken[1].rows
        return jobs

    def _next_job(self, exclude: set[str], timeout: float) -> tuple[str, Job] | None:
        """The next valid request of a device not in ``exclude`` within ``timeout`` s, with
        its device; invalid ones are answered on the way."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain(0.0)
            taken = self._queue.take(exclude)
            if taken is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._drain(remaining)
                continue
            job = self._parse(taken[1])
            if job is not None:
                return taken[0], job

    def _drain(self, timeout: float) -> None:
        """Move what arrived into the per-device queues, waiting up to ``timeout`` s for the
        first message. A device over its queue bound is answered ``busy``."""
        received = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        while received is not None:
            self._stats.requests += 1
            self._enqueue(received)
            received = self.inbox.get_nowait()

    def _enqueue(self, received: Received) -> None:
        try:
            device_id = topics.device_of(received.topic)
        except ValueError:
            self._count_error("unanswerable")
            log.warning("ignoring a request on %r: not a device topic", received.topic)
            return
        if not self._queue.put(device_id, received):
            self._reply_error(received, RequestError(
                "busy", f"{self.config.max_queued_per_device} requests of this device are "
                "already waiting: wait for their answers before sending more"),
                _request_id_of(received))

    def _parse(self, received: Received) -> Job | None:
        try:
            return parse_request(received, self.llm, self.config)
        except RequestError as err:
            self._reply_error(received, err, err.request_id or _request_id_of(received))
        except Exception as err:  # answered as "internal" and counted: one
            # request that breaks the parser must not end the worker serving every device
            log.exception("reading a request on %s failed", received.topic)
            self._reply_error(received, RequestError("internal", f"{type(err).__name__}: "
                              f"{err}"), _request_id_of(received))
        return None

    # --- computing and answering ----------------------------------------------------------------

    def _process(self, jobs: list[Job]) -> None:
        for op in ("step", "score"):
            batch = [job for job in jobs if job.op == op]
            if batch:
                self._run_batch(op, batch)

    def _run_batch(self, op: str, jobs: list[Job]) -> None:
        results, error = self._guarded_compute(op, jobs)
        if results is not None:
            for job, result in zip(jobs, results, strict=True):
                self._answer(job, result)
        elif len(jobs) > 1:  # isolate the culprit: the others still get their answers
            log.warning("batched %s of %d requests failed; retrying one by one", op, len(jobs))
            for job in jobs:
                self._run_batch(op, [job])
        else:
            self._send_error(jobs[0].reply_to, jobs[0].correlation, jobs[0].request_id,
                             "internal", error)

    def _guarded_compute(self, op: str, jobs: list[Job],
                         ) -> tuple[Sequence[StepResult | torch.Tensor] | None, str]:
        # The worker's one catch-all: requests were validated before batching, so whatever
        # still fails here is unexpected; it becomes an "internal" error reply to the request
        # that caused it (counted in the stats) instead of killing the loop serving everyone.
        try:
            return self._compute(op, jobs), ""
        except Exception as err:
            log.exception("%s of %d request(s) failed", op, len(jobs))
            return None, f"{type(err).__name__}: {err}"

    def _compute(self, op: str, jobs: list[Job]) -> Sequence[StepResult | torch.Tensor]:
        started = time.monotonic()
        results = run_step(self.llm, jobs) if op == "step" else run_score(self.llm, jobs)
        metrics.llm_batch(op, len(jobs), sum(j.rows for j in jobs), time.monotonic() - started)
        self._stats.batches += 1
        self._stats.rows += sum(job.rows for job in jobs)
        self._stats.max_batch_requests = max(self._stats.max_batch_requests, len(jobs))
        return results

    def _answer(self, job: Job, result: StepResult | torch.Tensor) -> None:
        try:
            self._reply_ok(job, result)
        except Exception as err:  # answered as "internal": e.g. a non-finite
            # loss the response model refuses; the other requests of the batch still get theirs
            log.exception("answering request %s failed", job.request_id)
            self._send_error(job.reply_to, job.correlation, job.request_id, "internal",
                             f"{type(err).__name__}: {err}")

    def _reply_ok(self, job: Job, result: StepResult | torch.Tensor) -> None:
        if isinstance(result, StepResult):
            response = self._response(job.request_id, loss=result.loss, encoding=job.encoding)
            parts = activations.step_reply_parts(result, job.encoding)
        else:
            response = self._response(job.request_id)
            parts = activations.score_reply_parts(result)
        try:
            self._publish(job.reply_to, job.correlation, pack(response, parts))
        except MessageTooLarge as err:
            self._send_error(job.reply_to, job.correlation, job.request_id, "too_large",
                             f"the response is too large: {err}")

    def _response(self, request_id: str, *, loss: float | None = None,
                  encoding: ActivationEncoding = "fp32") -> LLMResponse:
        return LLMResponse(request_id=request_id, ok=True, loss=loss, encoding=encoding,
                           worker=self.config.worker_id)

    def _reply_error(self, received: Received, err: RequestError, request_id: str) -> None:
        reply_to = topics.llm_responses(topics.device_of(received.topic))
        log.info("refusing request %s on %s: %s: %s", request_id, received.topic, err.code, err)
        self._send_error(reply_to, received.correlation_data, request_id, err.code, str(err))

    def _send_error(self, reply_to: str, correlation: bytes | None, request_id: str,
                    code: str, message: str) -> None:
        self._count_error(code)
        response = LLMResponse(request_id=request_id, ok=False, worker=self.config.worker_id,
                               error=LLMError(code=code, message=message[:2000]))
        self._publish(reply_to, correlation, pack(response))

    def _publish(self, topic: str, correlation: bytes | None, payload: bytes) -> None:
        try:
            self.client.publish(topic, payload, max_bytes=self.config.max_message_bytes,
                                qos=topics.LLM_QOS, properties=reply_properties(correlation),
                                timeout=self.config.publish_timeout_s)
        except MqttError as err:  # the device retries with the same request id
            self._stats.unanswered += 1
            log.warning("could not answer on %s: %s", topic, err)

    def _count_error(self, code: str) -> None:
        self._stats.errors += 1
        self._stats.error_codes[code] += 1
        metrics.llm_refused(code)


def _request_id_of(received: Received) -> str:
    """The request id to answer with when the envelope itself could not be read."""
    if received.correlation_data is not None:
        try:
            candidate = received.correlation_data.decode("ascii")
        except UnicodeDecodeError:
            return UNKNOWN_REQUEST_ID
        if 8 <= len(candidate) <= 64 and all(c.isalnum() or c in "_.:-" for c in candidate):
            return candidate
    return UNKNOWN_REQUEST_ID
