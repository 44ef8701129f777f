"""Aggregation time for 10, 100 and 1,000 updates at the real adapter shapes.

The default base's NanoAdapters: rank 8, image adapter after the connector and text adapter
after the embedder, both at the LLM width 576 (18,432 parameters in 4 tensors). Each update
carries a delta and a Fisher frame in the schemes a task asks for by default (``UpdateCodec()``).
Two timings per strategy: ``merge`` is ``Strategy.aggregate`` on decoded updates (the maths),
``decode+merge`` adds decoding every update's frames first (what the aggregation service does
after reading the blobs). Median of ``--repeats`` runs.

    python benchmarks/aggregation.py [--counts 10 100 1000] [--repeats 5] [--threads 2]
    python benchmarks/aggregation.py --streaming [--counts 100 1000] [--repeats 5] [--threads 2]
    python benchmarks/aggregation.py --parts [--counts 1000] [--repeats 5] [--threads 2]
    python benchmarks/aggregation.py --decode-before REF [--counts 1000] [--repeats 5]
    python benchmarks/aggregation.py --merge-before REF [--counts 1000] [--repeats 5]
    python benchmarks/aggregation.py --service [--counts 100 1000] [--repeats 5] [--threads 2]
    python benchmarks/aggregation.py --processes 1 2 [--counts 100 300 1000] [--repeats 7]
    python benchmarks/aggregation.py --first-rounds [--counts 1000] [--repeats 2]

``--streaming`` times what a memory-flat aggregation does: decode one update's two frames, fold
them into the Fisher accumulator, drop them, for every update; the accumulator of
``shared.merge`` (flat buffers) and the per-key one it replaced (``PerKeyFisherAccumulator``,
kept here as the "before") run interleaved in the same process, and each update's frames
come from a pool of 100 encoded updates so that the frames' own memory does not grow with the
count. Peak RSS growth is read from ``/proc/self/status`` (VmHWM, reset before each run).

``--service`` compares the aggregation service's two ways of merging a round, side by side in one
run: "list" (how ``cloud/aggregation.py`` merged before streaming: decode every update envelope,
as ``load_update`` does, into a list, then ``Strategy.aggregate``) and "streaming" (what it does
now: ``Strategy.stream``, each envelope decoded, folded in and dropped). Each (count, path) runs
in a fresh child process (``--service-run``) so one path's freed memory, kept by the allocator,
cannot hide the other's growth; envelopes come from a pool of 100 as in ``--streaming``. It
reports the median time of ``--repeats`` runs and the peak RSS growth (VmHWM over the RSS before
the run, the largest over the repeats), and checks that both paths give identical states.

``--decode-before REF`` times the same streaming merge (flat accumulator) with the frame decoder
of ``shared/codec.py`` as of git ``REF`` ("before") and as it is now ("after"), interleaved in
one process, and checks that both give identical merged deltas.

``--merge-before REF`` times one process's per-update work of a Fisher merge (both frames
decoded, folded into the accumulator; the options of ``fisher-raw`` and ``fisher-norm``) with
``shared/codec.py`` and ``shared/merge.py`` as of git ``REF`` ("before") and as they are now
("after"), interleaved in one process. "after" decodes as the aggregation service does now,
without the frames' checksums (the service has just checked the blob that holds them against
its SHA-256; that read is the same code before and after, so it is left out of both). It
reports the largest difference between the two merged deltas.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cloud.db.models import Update
from cloud.merge_pool import StoredUpdate
from cloud.strategies import Strategy, make_strategy
from shared import codec, protocol
from shared.adapters import AdapterConfig, AdapterState, NanoAdapters
from shared.merge import FisherAccumulator, _check_states
from shared.messages import UpdateCodec, UpdateMessage, unpack
from shared.update import AdapterUpdate

WIDTH, RANK = 576, 8
DELTA_SCHEME = UpdateCodec().delta  # what a task asks devices for by default
FISHER_SCHEME = UpdateCodec().fisher
POOL = 100  # distinct encoded updates in --streaming


def make_frames(count: int, global_state: dict[str, torch.Tensor],
                seed: int = 0) -> list[tuple[bytes, bytes, int]]:
    """``count`` encoded (delta, fisher, n_samples) updates with random values."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(count):
        delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in global_state.items()}
        fisher = {k: torch.rand(v.shape, generator=gen) ** 4 for k, v in global_state.items()}
        n = int(torch.randint(16, 512, (1,), generator=gen))
        frames.append((codec.encode(delta, DELTA_SCHEME), codec.encode(fisher, FISHER_SCHEME), n))
    return frames


def decode_all(frames: list[tuple[bytes, bytes, int]],
               expected: dict[str, tuple[int, ...]]) -> list[AdapterUpdate]:
    return [AdapterUpdate(f"dev-{i}", codec.decode(d, expected=expected), n,
                          codec.decode(f, expected=expected))
            for i, (d, f, n) in enumerate(frames)]


def decode_and_merge(strategy: Strategy, global_state: dict[str, torch.Tensor],
                     frames: list[tuple[bytes, bytes, int]],
                     expected: dict[str, tuple[int, ...]]) -> object:
    return strategy.aggregate(global_state, decode_all(frames, expected))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PerKeyFisherAccumulator:
    """``shared.merge.FisherAccumulator`` as it was before the flat buffers (commit 74ac6a0,
    ``normalize=None``, ``floor=0``): one float64 tensor per key and sum, every check per key."""

    def __init__(self, reference: AdapterState) -> None:
        self.reference = reference
        self.num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        self.mass = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        self.plain = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()}
        self.count = 0

    def add(self, delta: AdapterState, fisher: AdapterState, weight: float) -> None:
        _check_states([delta], self.reference, "delta")
        _check_states([fisher], self.reference, "fisher", nonnegative=True)
        scaled = {k: v.double() for k, v in fisher.items()}
        for key in self.reference:
            d = delta[key].double()
            self.num[key].addcmul_(scaled[key], d, value=weight)
            self.mass[key].add_(scaled[key], alpha=weight)
            self.plain[key].add_(d, alpha=weight)
        self.count += 1

    def merged_delta(self, eps: float = 1e-8) -> AdapterState:
        numel = sum(t.numel() for t in self.mass.values())
        eps_abs = eps * sum(float(t.sum()) for t in self.mass.values()) / numel
        return {k: (self.num[k] / (self.mass[k] + eps_abs)).to(ref.dtype)
                for k, ref in self.reference.items()}


def stream_merge(make: Callable[[AdapterState], object], global_state: AdapterState,
                 frames: list[tuple[bytes, bytes, int]], count: int,
                 expected: dict[str, tuple[int, ...]],
                 decode: Callable[..., AdapterState] = codec.decode) -> AdapterState:
    """Decode and fold ``count`` updates one at a time (frames reused from the pool)."""
    merger: object = make(global_state)
    weights = [frames[i % len(frames)][2] for i in range(count)]
    total = sum(weights)
    for i in range(count):
        delta_frame, fisher_frame, _ = frames[i % len(frames)]
        delta = decode(delta_frame, expected=expected)
        fisher = decode(fisher_frame, expected=expected)
        merger.add(delta, fisher, weights[i] / total)  # type: ignore[attr-defined]
    return merger.merged_delta()  # type: ignore[attr-defined]


def _reset_peak_rss() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kib("VmHWM")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def streaming(args: argparse.Namespace, global_state: AdapterState,
              expected: dict[str, tuple[int, ...]]) -> None:
    """Before/after of the streaming decode + Fisher merge, interleaved, with peak RSS."""
    frames = make_frames(POOL, global_state)
    decode_only = {"before (per-key accumulator)": PerKeyFisherAccumulator,
                   "after (flat accumulator)": FisherAccumulator}
    print(f"delta {DELTA_SCHEME.label()}, Fisher {FISHER_SCHEME.label()}; frames "
          f"{statistics.mean(len(d) + len(f) for d, f, _ in frames):,.0f} B per update\n")
    print("| updates | accumulator | decode + merge (ms) | per update (ms) "
          "| peak RSS growth (MiB) |")
    print("|---|---|---|---|---|")
    for count in args.counts:
        times: dict[str, list[float]] = {name: [] for name in decode_only}
        growth: dict[str, int] = {}
        results = {}
        for _ in range(args.repeats):
            for name, make in decode_only.items():
                before = _reset_peak_rss()
                started = time.perf_counter()
                results[name] = stream_merge(make, global_state, frames, count, expected)
                times[name].append(time.perf_counter() - started)
                growth[name] = max(growth.get(name, 0), _rss_kib("VmHWM") - before)
        first, second = results.values()
        assert all(torch.equal(first[k], second[k]) for k in first), "results differ"
        for name, t in times.items():
            ms = statistics.median(t) * 1e3
            print(f"| {count:,} | {name} | {ms:.1f} | {ms / count:.3f} | "
                  f"{growth[name] / 1024:.1f} |")
    print("\nidentical merged deltas (torch.equal) for every count")


def parts(args: argparse.Namespace, global_state: AdapterState,
          expected: dict[str, tuple[int, ...]]) -> None:
    """Decoding alone, and folding already-decoded updates before/after, interleaved."""
    frames = make_frames(POOL, global_state)
    decoded = [(codec.decode(d, expected=expected), codec.decode(f, expected=expected))
               for d, f, _ in frames]

    def fold(make: Callable[[AdapterState], object], count: int) -> None:
        merger: Any = make(global_state)
        for i in range(count):
            merger.add(*decoded[i % POOL], 1.0 / count)
        merger.merged_delta()

    def decode_only(count: int) -> None:
        for i in range(count):
            delta_frame, fisher_frame, _ = frames[i % POOL]
            codec.decode(delta_frame, expected=expected)
            codec.decode(fisher_frame, expected=expected)

    print("| updates | part | median (ms) | min (ms) |\n|---|---|---|---|")
    for count in args.counts:
        jobs = {"decode only": partial(decode_only, count),
                "fold, before (per-key accumulator)": partial(fold, PerKeyFisherAccumulator,
                                                              count),
                "fold, after (flat accumulator)": partial(fold, FisherAccumulator, count)}
        times: dict[str, list[float]] = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                started = time.perf_counter()
                job()
                times[name].append(time.perf_counter() - started)
        for name, t in times.items():
            print(f"| {count:,} | {name} | {statistics.median(t) * 1e3:.1f} | "
                  f"{min(t) * 1e3:.1f} |")


SERVICE_STRATEGIES = ("fednano", "fisher-raw", "fisher-norm")
SERVICE_PATHS = ("list", "streaming")


def make_envelopes(count: int, global_state: AdapterState) -> list[tuple[bytes, int]]:
    """``count`` update envelopes (delta and Fisher in the default schemes) as devices send
    them and the blob store keeps them, with their sample counts."""
    envelopes = []
    expected = {k: tuple(v.shape) for k, v in global_state.items()}
    for index, (delta_frame, fisher_frame, n) in enumerate(make_frames(count, global_state)):
        delta = codec.decode(delta_frame, expected=expected)
        fisher = codec.decode(fisher_frame, expected=expected)
        message = UpdateMessage(update_id=f"update-{index:06d}", task_id=f"task-{index:08d}",
                                round_id=1, global_version=1, base_version="bench", n_samples=n)
        envelopes.append((protocol.encode_update(message, delta, fisher, UpdateCodec()), n))
    return envelopes


def load_envelope(envelope: bytes, n_samples: int, index: int,
                  expected: dict[str, tuple[int, ...]], fisher: bool = True) -> AdapterUpdate:
    """``cloud.aggregation.load_update`` without the blob store: unpack, decode both parts
    (the delta alone without ``fisher``, as the service does for a strategy that reads none)."""
    message, parts = unpack(envelope, UpdateMessage)
    if not fisher:
        parts.pop(protocol.FISHER_PART, None)
    delta, fisher = protocol.decode_update(parts, expected=expected)
    return AdapterUpdate(f"dev-{index}", delta, n_samples, fisher,
                         metrics=dict(message.metrics))


def merge_round(path: str, strategy: Strategy, global_state: AdapterState,
                envelopes: list[tuple[bytes, int]], count: int,
                expected: dict[str, tuple[int, ...]]) -> AdapterState:
    """One round of ``count`` updates (envelopes reused from the pool) merged by ``path``."""
    picked = [envelopes[i % len(envelopes)] for i in range(count)]
    if path == "list":
        updates = [load_envelope(e, n, i, expected) for i, (e, n) in enumerate(picked)]
        merged = strategy.aggregate(global_state, updates)
    else:
        merge = strategy.stream(global_state, [n for _, n in picked])
        assert merge is not None
        for i, (envelope, n) in enumerate(picked):
            merge.add(load_envelope(envelope, n, i, expected, strategy.requires_fisher))
        merged = merge.result()
    assert merged is not None
    return merged


def service_run(args: argparse.Namespace, global_state: AdapterState,
                expected: dict[str, tuple[int, ...]]) -> None:
    """Child of ``--service``: one strategy, path and count; prints one JSON line."""
    name, path, count = args.service_run
    strategy = make_strategy(name)
    envelopes = make_envelopes(POOL, global_state)
    merge_round(path, strategy, global_state, envelopes, 2, expected)  # warm caches up
    times, growth, merged = [], 0, {}
    for _ in range(args.repeats):
        before = _reset_peak_rss()
        started = time.perf_counter()
        merged = merge_round(path, strategy, global_state, envelopes, int(count), expected)
        times.append(time.perf_counter() - started)
        growth = max(growth, _rss_kib("VmHWM") - before)
    digest = hashlib.sha256(b"".join(merged[k].numpy().tobytes() for k in sorted(merged)))
    print(json.dumps({"seconds": statistics.median(times), "min": min(times),
                      "growth_kib": growth, "sha256": digest.hexdigest()}))


def service(args: argparse.Namespace, global_state: AdapterState) -> None:
    """The list and the streaming aggregation of each count, each in a child process."""
    envelope, _ = make_envelopes(1, global_state)[0]
    update_kib = sum(v.numel() * 4 * 2 for v in global_state.values()) / 1024
    print(f"envelope {len(envelope):,} B per update; decoded Δθ + Fisher {update_kib:.0f} KiB "
          f"(float32); load average {os.getloadavg()[0]:.1f}\n")
    print("| updates | strategy | path | decode + merge, median (ms) | min (ms) "
          "| peak RSS growth (MiB) |")
    print("|---|---|---|---|---|---|")
    for count in args.counts:
        for name in SERVICE_STRATEGIES:
            digests = set()
            for path in SERVICE_PATHS:
                command = [sys.executable, __file__, "--service-run", name, path, str(count),
                           "--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(command, check=True, text=True, capture_output=True,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__)
                                                                          .resolve().parents[1])})
                result = json.loads(out.stdout.strip().splitlines()[-1])
                digests.add(result["sha256"])
                print(f"| {count:,} | {name} | {path} | {result['seconds'] * 1e3:.1f} | "
                      f"{result['min'] * 1e3:.1f} | {result['growth_kib'] / 1024:.1f} |",
                      flush=True)
            assert len(digests) == 1, f"{name}, {count} updates: the paths' states differ"
    print(f"\nidentical merged states (SHA-256 of the tensors) for every count; load average "
          f"{os.getloadavg()[0]:.1f}")


def stored_rows(stored: list[tuple[str, int]],
                count: int) -> list[tuple[Update | StoredUpdate, int]]:
    """``count`` update rows (with the sample count each merges with) over the pool of stored
    envelopes ``stored`` (blob digest, sample count), as ``Aggregator._merge`` takes them."""
    return [(StoredUpdate(f"u{i}", f"dev-{i}", *stored[i % POOL]), stored[i % POOL][1])
            for i in range(count)]


def processes(args: argparse.Namespace, global_state: AdapterState) -> None:
    """The aggregation service's merge (``Aggregator._merge``: blobs read from a real blob
    store, decoded, folded) by one process and by ``--processes`` processes (the service and its
    merge workers), alternated in this process with the workers kept warm between runs."""
    from cloud.aggregation import Aggregator
    from cloud.blobs import BlobStore

    counts = sorted(set(args.processes))
    with tempfile.TemporaryDirectory() as root:
        blobs = BlobStore(Path(root))
        stored = [(blobs.put(envelope).sha256, n)
                  for envelope, n in make_envelopes(POOL, global_state)]
        aggregators = {p: Aggregator(blobs, merge_processes=p) for p in counts}
        for aggregator in aggregators.values():
            aggregator.pool.start(wait=True)  # workers up before the first timed round
        round_: Any = types.SimpleNamespace(id=1)  # _merge reads its id alone
        print(f"load average {os.getloadavg()[0]:.1f}\n")
        print("| updates | strategy | processes | shards | merge, median (ms) | min (ms) "
              "| max abs diff vs 1 process |")
        print("|---|---|---|---|---|---|---|")
        try:
            for count in args.counts:
                rows = stored_rows(stored, count)
                for name in SERVICE_STRATEGIES:
                    strategy = make_strategy(name)
                    times: dict[int, list[float]] = {p: [] for p in counts}
                    results: dict[int, AdapterState] = {}
                    for p in counts:  # warm-up: starts the workers
                        results[p] = aggregators[p]._merge(round_, strategy, global_state, rows)
                    for _ in range(args.repeats):
                        for p in counts:
                            started = time.perf_counter()
                            aggregators[p]._merge(round_, strategy, global_state, rows)
                            times[p].append(time.perf_counter() - started)
                    for p in counts:
                        diff = max(float((results[p][k] - results[counts[0]][k]).abs().max())
                                   for k in global_state)
                        shards = len(aggregators[p].pool.split(count))
                        print(f"| {count:,} | {name} | {p} | {shards} | "
                              f"{statistics.median(times[p]) * 1e3:.1f} | "
                              f"{min(times[p]) * 1e3:.1f} | {diff:.1e} |", flush=True)
        finally:
            for aggregator in aggregators.values():
                aggregator.close()
    print(f"\nload average {os.getloadavg()[0]:.1f}")


def first_rounds(args: argparse.Namespace, global_state: AdapterState) -> None:
    """A fresh service's first rounds of ``--counts`` updates (``fednano``) with 1 and with 2
    processes: its first large round (folded alone while the workers start in the
    background), the round right after, and a round once the workers are up."""
    from cloud.aggregation import Aggregator
    from cloud.blobs import BlobStore

    with tempfile.TemporaryDirectory() as root:
        blobs = BlobStore(Path(root))
        stored = [(blobs.put(envelope).sha256, n)
                  for envelope, n in make_envelopes(POOL, global_state)]
        round_: Any = types.SimpleNamespace(id=1)
        strategy = make_strategy("fednano")
        print("| updates | processes | first round (s) | next round (s) | workers up (s) |")
        print("|---|---|---|---|---|")
        for count in args.counts:
            rows = stored_rows(stored, count)
            for _ in range(args.repeats):
                for processes in (1, 2):
                    aggregator = Aggregator(blobs, merge_processes=processes)
                    times = []
                    for wait in (False, False, True):
                        if wait:
                            aggregator.pool.start(wait=True)
                        started = time.perf_counter()
                        aggregator._merge(round_, strategy, global_state, rows)
                        times.append(time.perf_counter() - started)
                    aggregator.close()
                    print(f"| {count:,} | {processes} | " + " | ".join(f"{t:.2f}" for t in times)
                          + " |", flush=True)


def codec_at(ref: str) -> types.ModuleType:
    """``shared/codec.py`` as of git ``ref``, imported as module ``codec_at_ref``."""
    return module_at(ref, "shared/codec.py", "codec_at_ref")


def module_at(ref: str, path: str, name: str) -> types.ModuleType:
    """The module at ``path`` as of git ``ref``, imported as module ``name``."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], check=True, text=True,
                            capture_output=True, cwd=Path(__file__).resolve().parents[1]).stdout
    module = types.ModuleType(name)
    sys.modules[module.__name__] = module  # pydantic resolves the models' annotations there
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


def alternated(jobs: dict[str, Callable[[], AdapterState]], repeats: int,
               ) -> tuple[dict[str, list[float]], dict[str, AdapterState]]:
    """Each job's times over ``repeats`` runs and its last result, the jobs run in turn and
    their order reversed every other repeat (a noisy machine hits each alike)."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    results: dict[str, AdapterState] = {}
    for repeat in range(repeats):
        for name in (list(jobs) if repeat % 2 == 0 else list(reversed(jobs))):
            started = time.perf_counter()
            results[name] = jobs[name]()
            times[name].append(time.perf_counter() - started)
    return times, results


def merges(args: argparse.Namespace, global_state: AdapterState,
           expected: dict[str, tuple[int, ...]]) -> None:
    """The per-update decode + Fisher fold with the codec and merge of ``--merge-before`` and
    today's, interleaved."""
    frames = make_frames(POOL, global_state)
    old_codec = codec_at(args.merge_before)
    old_merge = module_at(args.merge_before, "shared/merge.py", "merge_at_ref")
    paths = {f"before ({args.merge_before})": (old_merge.FisherAccumulator, old_codec.decode),
             "after (working tree)": (FisherAccumulator, partial(codec.decode, verify=False))}
    options = {"fisher-raw": {}, "fisher-norm": {"normalize": "l2", "floor": 0.1}}
    print(f"delta {DELTA_SCHEME.label()}, Fisher {FISHER_SCHEME.label()}; frames "
          f"{statistics.mean(len(d) + len(f) for d, f, _ in frames):,.0f} B per update\n")
    print("| updates | options of | code | decode + fold, median (ms) | min (ms) "
          "| per update (µs) |")
    print("|---|---|---|---|---|---|")
    for count in args.counts:
        for label, kwargs in options.items():
            times, results = alternated(
                {name: partial(stream_merge, partial(accumulator, **kwargs), global_state,
                               frames, count, expected, decode)
                 for name, (accumulator, decode) in paths.items()}, args.repeats)
            first, second = results.values()
            diff = max(float((first[k] - second[k]).abs().max()) for k in first)
            for name, t in times.items():
                ms = statistics.median(t) * 1e3
                print(f"| {count:,} | {label} | {name} | {ms:.1f} | {min(t) * 1e3:.1f} | "
                      f"{ms / count * 1e3:.0f} |", flush=True)
            print(f"| {count:,} | {label} | max abs difference of the merged deltas | "
                  f"{diff:.1e} | | |")
    print(f"\nload average {os.getloadavg()[0]:.1f}")


def decoders(args: argparse.Namespace, global_state: AdapterState,
             expected: dict[str, tuple[int, ...]]) -> None:
    """The streaming merge with the decoder of ``--decode-before`` and today's, interleaved."""
    frames = make_frames(POOL, global_state)
    decode = {f"before ({args.decode_before})": codec_at(args.decode_before).decode,
              "after (working tree)": codec.decode}
    print(f"delta {DELTA_SCHEME.label()}, Fisher {FISHER_SCHEME.label()}; frames "
          f"{statistics.mean(len(d) + len(f) for d, f, _ in frames):,.0f} B per update\n")
    print("| updates | decoder | decode + merge, median (ms) | min (ms) | per update (ms) |")
    print("|---|---|---|---|---|")
    for count in args.counts:
        times, results = alternated(
            {name: partial(stream_merge, FisherAccumulator, global_state, frames, count,
                           expected, decoder) for name, decoder in decode.items()}, args.repeats)
        first, second = results.values()
        assert all(torch.equal(first[k], second[k]) for k in first), "results differ"
        for name, t in times.items():
            ms = statistics.median(t) * 1e3
            print(f"| {count:,} | {name} | {ms:.1f} | {min(t) * 1e3:.1f} | {ms / count:.3f} |")
    print("\nidentical merged deltas (torch.equal) for every count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--streaming", action="store_true",
                        help="before/after of the streaming decode + Fisher merge")
    parser.add_argument("--parts", action="store_true",
                        help="decode alone and the fold alone (before/after), interleaved")
    parser.add_argument("--decode-before", metavar="REF",
                        help="streaming merge with shared/codec.py of git REF vs today's")
    parser.add_argument("--merge-before", metavar="REF",
                        help="decode + Fisher fold with shared/codec.py and shared/merge.py "
                             "of git REF vs today's")
    parser.add_argument("--service", action="store_true",
                        help="the service's list and streaming aggregation, time and memory")
    parser.add_argument("--processes", type=int, nargs="+", metavar="N",
                        help="the service's merge by 1 and N processes, alternated")
    parser.add_argument("--first-rounds", action="store_true",
                        help="a fresh service's first rounds with 1 and 2 processes")
    parser.add_argument("--service-run", nargs=3, metavar=("STRATEGY", "PATH", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global_state = NanoAdapters(WIDTH, AdapterConfig(rank=RANK, alpha=16)).adapter_state_dict()
    expected = {k: tuple(v.shape) for k, v in global_state.items()}
    params = sum(v.numel() for v in global_state.values())
    if args.service_run:
        service_run(args, global_state, expected)
        return
    print(f"adapter: rank {RANK}, width {WIDTH}, {params:,} parameters; torch threads "
          f"{torch.get_num_threads()}; median of {args.repeats}\n")
    if args.service:
        service(args, global_state)
        return
    if args.processes:
        processes(args, global_state)
        return
    if args.first_rounds:
        first_rounds(args, global_state)
        return
    if args.decode_before:
        decoders(args, global_state, expected)
        return
    if args.merge_before:
        merges(args, global_state, expected)
        return
    if args.streaming or args.parts:
        (streaming if args.streaming else parts)(args, global_state, expected)
        return
    print("| updates | strategy | merge (ms) | decode+merge (ms) | per update (ms) |")
    print("|---|---|---|---|---|")
    for count in args.counts:
        frames = make_frames(count, global_state)
        updates = decode_all(frames, expected)
        for name in ("fednano", "fedavg"):
            strategy = make_strategy(name)
            merge = median_seconds(partial(strategy.aggregate, global_state, updates),
                                   args.repeats)
            full = median_seconds(partial(decode_and_merge, strategy, global_state, frames,
                                          expected), args.repeats)
            print(f"| {count:,} | {name} | {merge * 1e3:.1f} | {full * 1e3:.1f} | "
                  f"{full * 1e3 / count:.3f} |")


if __name__ == "__main__":
    main()
