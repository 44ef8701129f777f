"""Fuzzing what a device (or an API client) can send, against the real handlers.

    python benchmarks/fuzz_parsing.py --examples 10000 --out benchmarks/results/fuzz_parsing

Four targets, each fed ``--examples`` hypothesis-generated inputs (fixed seed: reproducible):

- ``update``: ``Coordinator.handle_update`` on a real SQLite database with a collecting round
  (what ``CoordinatorService.dispatch`` calls for every message on ``devices/+/updates``):
  valid update envelopes with mutated header fields, random JSON headers, flipped or cut bytes.
- ``llm_request``: the LLM worker's ``parse_request`` (size, depth, types, dtypes, budget) on a
  tiny random LLM, then the batched compute for what it accepts (``run_step``/``run_score``).
- ``presence``: ``Coordinator.handle_presence`` (strict JSON, bounded capabilities).
- ``api``: every route of the OpenAPI document through FastAPI's TestClient with an operator
  token, random path parameters, queries and JSON bodies.

An outcome is *accepted*, *refused* (with its code), a *crash* (an exception the handler let
escape: in the services it would have become an ``internal`` refusal at best) or a *hang*
(an input that took over ``--hang-s``). For the API, a crash is a 5xx or a status the OpenAPI
document does not list for that operation. After the update target, an honest device's update
is sent, the deadline passes, and the round must close with a new merged version.

The short deterministic sample of the same targets runs in CI (``tests/security/
test_fuzz_parsing.py``).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.coordinator import open_round
from cloud.db import crud
from cloud.db.models import RoundState
from cloud.db.session import sqlite_url
from cloud.llm_worker import RequestError, WorkerConfig, parse_request, run_score, run_step
from cloud.rounds import RoundConfig
from shared import topics
from shared.messages import ENVELOPE_MAGIC, LLMRequest, TrainTask, pack, pack_tensors
from shared.mqtt import Received
from shared.protocol import ATTENTION_MASK, INPUTS_EMBEDS, LABELS, TENSORS_PART

TARGETS = ("update", "llm_request", "presence", "api")
PROGRESS_EVERY = 500  # inputs between progress files (``--out``), so a cut run still reports


@dataclass
class Tally:
    """Outcomes of one target."""

    inputs: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    slowest_s: float = 0.0

    progress: Path | None = None  # where to write the summary every PROGRESS_EVERY inputs

    def record(self, outcome: str | None, took: float, hang_s: float, sample: object) -> None:
        """``outcome``: None for accepted, a refusal code, or ``"crash:..."``."""
        self.inputs += 1
        self.slowest_s = max(self.slowest_s, took)
        if took > hang_s:
            self.hangs.append(f"{took:.2f}s {sample!r:.200}")
        if outcome is None:
            self.accepted += 1
        elif outcome.startswith("crash:"):
            self.crashes.append(f"{outcome} {sample!r:.300}")
        else:
            self.refused[outcome] += 1
        if self.progress is not None and self.inputs % PROGRESS_EVERY == 0:
            self.progress.write_text(json.dumps(self.summary(), indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "accepted": self.accepted,
                "refused": dict(self.refused.most_common()), "crashes": len(self.crashes),
                "hangs": len(self.hangs), "slowest_s": round(self.slowest_s, 3),
                "crash_samples": self.crashes[:5], "hang_samples": self.hangs[:5]}


# --- input strategies -----------------------------------------------------------------------

_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_EXTREMES = st.sampled_from([True, "100", 1.5, -1, 0, 2**63, 2**63 - 1, 2**64, 10**30, "",
                             None, [], {}, "NaN", "\u0000", "[" * 50])


def _envelope(header: bytes, parts: dict[str, bytes]) -> bytes:
    return b"".join([struct.pack("<4sI", ENVELOPE_MAGIC, len(header)), header, *parts.values()])


def _header_bytes(header: dict[str, Any], parts: dict[str, bytes]) -> bytes:
    header = {**header, "parts": [[n, len(d)] for n, d in parts.items()]}
    return json.dumps(header, separators=(",", ":")).encode()


_LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"true", b'"1"', b"[[[[[[]]]]]]",
             b"99999999999999999999999", b'"\\ud800"', b'"\\u0000"']


@st.composite
def mutated_envelopes(draw: st.DrawFn, header: dict[str, Any], parts: dict[str, bytes]) -> bytes:
    """A valid envelope changed in one of several ways a hostile device would try."""
    how = draw(st.sampled_from(["field", "extra", "drop", "literal", "bytes", "cut", "deep",
                                "random", "parts"]))
    keys = sorted(header)
    if how == "field":
        header = {**header, draw(st.sampled_from(keys)): draw(_EXTREMES | JSON)}
    elif how == "extra":
        header = {**header, draw(st.text(min_size=1, max_size=8)): draw(JSON)}
    elif how == "drop":
        header = {k: v for k, v in header.items() if k != draw(st.sampled_from(keys))}
    elif how == "parts":
        name = draw(st.sampled_from([*sorted(parts), "other"]))
        parts = {**parts, name: draw(st.binary(max_size=256))}
    raw = _header_bytes(header, parts)
    if how == "literal":  # a value JSON does not allow, or nesting, at a field's place
        key = draw(st.sampled_from(keys)).encode()
        start = raw.find(b'"' + key + b'":') + len(key) + 3
        end = start + len(json.dumps(header[key.decode()], separators=(",", ":")).encode())
        raw = raw[:start] + draw(st.sampled_from(_LITERALS)) + raw[end:]
    elif how == "deep":
        depth = draw(st.integers(17, 100_000))
        raw = raw[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"
    elif how == "random":
        raw = json.dumps(draw(JSON)).encode()
    payload = _envelope(raw, parts)
    if how == "bytes":
        data = bytearray(payload)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        payload = bytes(data)
    elif how == "cut":
        payload = payload[:draw(st.integers(0, len(payload)))]
    return payload


# --- targets -----------------------------------------------------------------------------------


def _run(name: str, tally: Tally, examples: int, seed: int, hang_s: float,
         strategy: st.SearchStrategy, call: Callable[[Any], str | None]) -> None:
    @settings(max_examples=examples, derandomize=seed == 0, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(sample: Any) -> None:
        started = time.monotonic()
        try:
            outcome = call(sample)
        except Exception as err:  # noqa: BLE001  (the point: count what escapes)
            outcome = f"crash:{type(err).__name__}: {str(err)[:200]}"
        tally.record(outcome, time.monotonic() - started, hang_s, sample)

    (hypothesis_seed(seed)(fuzz) if seed else fuzz)()


@contextmanager
def update_cloud(root: Path) -> Iterator[tuple[Any, dict[str, tuple[TrainTask, dict]]]]:
    """A coordinator on a migrated SQLite database with a collecting round of dev-a, dev-b."""
    from cloud.db.migrate import upgrade
    from tests.cloud.roundkit import FakeClock, add_devices, make_cloud

    url = sqlite_url(root / "fuzz.db")
    upgrade(url)
    cloud = make_cloud(url, root, FakeClock())
    add_devices(cloud, "dev-a", "dev-b")
    with cloud.session() as session:
        open_round(session, config=RoundConfig(deadline_s=60, min_participants=2,
                                               quorum_fraction=1.0), actor="fuzz")
    cloud.coordinator.tick()
    tasks = {d: cloud.publisher.tasks(d)[-1] for d in ("dev-a", "dev-b")}
    try:
        yield cloud, tasks
    finally:
        cloud.engine.dispose()


def fuzz_updates(tally: Tally, examples: int, seed: int, hang_s: float, root: Path) -> bool:
    """Returns whether the honest update afterwards was accepted and merged."""
    from tests.cloud.roundkit import device_update

    with update_cloud(root) as (cloud, tasks):
        good = device_update(*tasks["dev-a"], "dev-a")
        size = struct.unpack_from("<I", good, 4)[0]
        header = json.loads(good[8:8 + size])
        layout = header.pop("parts")
        offset, parts = 8 + size, {}
        for name, length in layout:
            parts[name] = good[offset:offset + length]
            offset += length

        def call(payload: bytes) -> str | None:
            result = cloud.coordinator.handle_update("dev-a", payload)
            return result.code if result.outcome == "rejected" else None

        _run("update", tally, examples, seed, hang_s, mutated_envelopes(header, parts), call)
        honest = cloud.coordinator.handle_update("dev-b", device_update(*tasks["dev-b"], "dev-b"))
        cloud.coordinator.clock.advance(120)  # type: ignore[attr-defined]
        cloud.coordinator.tick()
        with cloud.session() as session:
            round_ = crud.list_rounds(session, limit=1)[0]
            merged = (round_.state is RoundState.CLOSED
                      and crud.latest_adapter_version(session).round_id == round_.id)
        return honest.outcome == "accepted" and merged


def fuzz_presence(tally: Tally, examples: int, seed: int, hang_s: float, root: Path) -> None:
    from tests.cloud.roundkit import presence

    with update_cloud(root) as (cloud, _):
        valid = json.loads(presence("dev-a", samples=10, codecs=["fp32"]))

        def call(payload: bytes) -> str | None:
            before = _audits(cloud, "presence.refused")
            ok = cloud.coordinator.handle_presence("dev-a", payload)
            return None if ok else ("refused" if _audits(cloud, "presence.refused") > before
                                    else "ignored")

        strategy = mutated_envelopes(valid, {}).map(lambda env: env[8:]) | st.builds(
            lambda caps: json.dumps({**valid, "capabilities": caps}).encode(),
            st.dictionaries(st.text(max_size=8), JSON, max_size=6))
        _run("presence", tally, examples, seed, hang_s, strategy, call)


def _audits(cloud: Any, action: str) -> int:
    from sqlalchemy import func, select

    from cloud.db.models import AuditEvent
    with cloud.session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)
                                  .where(AuditEvent.action == action)) or 0)


def fuzz_llm_requests(tally: Tally, examples: int, seed: int, hang_s: float) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloud.llm_backend import InProcessLLM
    from tests.llm_helpers import BASE_VERSION, step_inputs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    llm = InProcessLLM.from_causal_lm(model, max_tokens=128)
    config = WorkerConfig(base_version=BASE_VERSION, max_request_tokens=512)
    embeds, mask, labels = step_inputs(2, 6)
    valid_tensors = {INPUTS_EMBEDS: embeds, ATTENTION_MASK: mask, LABELS: labels}
    header = json.loads(pack(LLMRequest(request_id="req-000001", op="step",
                                        base_version=BASE_VERSION))[8:])
    header.pop("parts")

    tensors = st.builds(
        lambda b, n, dt, keep: pack_tensors({k: (v.to(dt) if v.is_floating_point() else v)
                                             for k, v in zip(valid_tensors, step_inputs(
                                                 b, n), strict=True) if k in keep}),
        st.integers(1, 16), st.integers(2, 40),
        st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
        st.sets(st.sampled_from(sorted(valid_tensors)), min_size=1))
    strategy = st.one_of(
        mutated_envelopes(header, {TENSORS_PART: pack_tensors(valid_tensors)}),
        st.builds(lambda part: _envelope(_header_bytes(header, {TENSORS_PART: part}),
                                         {TENSORS_PART: part}), tensors))

    def call(payload: bytes) -> str | None:
        received = Received(topics.llm_requests("dev-a"), payload, 1, False,
                            response_topic=topics.llm_responses("dev-a"))
        try:
            job = parse_request(received, llm, config)
        except RequestError as err:
            return err.code
        (run_step if job.op == "step" else run_score)(llm, [job])
        return None

    _run("llm_request", tally, examples, seed, hang_s, strategy, call)


def fuzz_api(tally: Tally, examples: int, seed: int, hang_s: float, root: Path) -> None:
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from cloud.api.main import create_app
    from cloud.api.security import create_operator_token
    from cloud.db.migrate import upgrade
    from cloud.db.session import make_engine, make_session_factory, session_scope
    from cloud.settings import CloudSettings

    url = sqlite_url(root / "api.db")
    upgrade(url)
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        _, token = create_operator_token(session, name="fuzz")
    engine.dispose()
    app = create_app(CloudSettings(home=root, database_url=url, environment="test",
                                   secret_key=SecretStr("k" * 40),
                                   broker_password=SecretStr("p" * 40),
                                   mqtt_hash_iterations=1000))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        spec = client.get("/api/v1/openapi.json").json()
        operations = [(path, method, op) for path, ops in spec["paths"].items()
                      for method, op in ops.items() if not path.endswith("/ask")]
        segment = st.one_of(st.integers(-(2**70), 2**70).map(str), st.text(
            st.characters(codec="utf-8", exclude_characters="/?#%",
                          exclude_categories=("Cc", "Cs")), min_size=1, max_size=12),
            st.sampled_from(["latest", "0", "-1", "²", "1e3", "NaN"]))
        strategy = st.tuples(st.sampled_from(operations), st.lists(segment, min_size=3,
                             max_size=3), st.dictionaries(st.sampled_from(
                                 ["offset", "limit", "status", "state", "device_id",
                                  "round_id"]), segment, max_size=3), JSON)

        def call(sample: Any) -> str | None:
            (path, method, op), values, query, body = sample
            for i, name in enumerate(p["name"] for p in op.get("parameters", [])
                                     if p["in"] == "path"):
                path = path.replace("{" + name + "}", values[i % 3])
            response = client.request(method.upper(), path, params=query,
                                      json=body if method in ("post", "put") else None)
            status = str(response.status_code)
            if response.status_code >= 500 or (status not in op["responses"]
                                                and response.status_code != 405):
                return f"crash:HTTP {status} undocumented or server error on {method} {path}"
            return None if response.status_code < 400 else status

        _run("api", tally, examples, seed, hang_s, strategy, call)
    app.state.fednano.engine.dispose()


def run_all(examples: int, seed: int = 0, hang_s: float = 30.0,
            targets: tuple[str, ...] = TARGETS, out: Path | None = None) -> dict[str, Any]:
    """Fuzz each of ``targets`` with ``examples`` inputs; the report as a dict."""
    report: dict[str, Any] = {"examples_per_target": examples, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="fednano-fuzz-") as tmp:
        for name in targets:
            tally, started = Tally(), time.monotonic()
            tally.progress = None if out is None else out / f"progress-{name}.json"
            root = Path(tmp) / name
            root.mkdir()
            if name == "update":
                report["honest_update_merged_after"] = fuzz_updates(tally, examples, seed,
                                                                    hang_s, root)
            elif name == "presence":
                fuzz_presence(tally, examples, seed, hang_s, root)
            elif name == "llm_request":
                fuzz_llm_requests(tally, examples, seed, hang_s)
            else:
                fuzz_api(tally, examples, seed, hang_s, root)
            report[name] = {**tally.summary(), "wall_s": round(time.monotonic() - started, 1)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0, help="0: hypothesis's derandomized run")
    parser.add_argument("--hang-s", type=float, default=30.0)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--out", type=Path, default=None, help="folder for report.json")
    args = parser.parse_args()
    targets = tuple(args.targets.split(","))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    report = run_all(args.examples, args.seed, args.hang_s, targets, args.out)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        (args.out / f"report-{'-'.join(targets)}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
