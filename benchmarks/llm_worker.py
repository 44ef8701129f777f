"""LLM worker throughput: dynamic batching vs one request at a time, 8 devices, real broker.

    python -m benchmarks.llm_worker                      # small random-init LLM (seconds)
    python -m benchmarks.llm_worker --real --requests 3  # the real SmolLM2 base (if built)

Run from the repository root (``-m`` puts it on ``sys.path`` for ``tests.brokers``). A private
Mosquitto (``tests.brokers.MosquittoBroker``) is started on a free port; ``--devices``
simulated devices (threads, one MQTT client and ``edge.remote_llm.RemoteLLM`` each) send
``--requests`` split-training steps of ``--batch`` rows of up to ``--tokens`` tokens to one
``cloud.llm_worker.LLMWorker``, first with dynamic batching and then with batching off
(``max_batch_rows=1``: one request per LLM call), alternating ``--rounds`` times so both modes
see the same machine noise. Throughput is samples (rows) per second of wall time.

FLOP/s: the useful FLOPs of every request (each counted alone with
``torch.utils.flop_counter``, so padding counts for nothing) over the wall time, and the
LLM step's own FLOP/s in process for a batch of ``--devices`` requests vs one, next to this
machine's measured fp32 matmul peak (the best of a few ``--matmul``-sized square matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from cloud.llm_backend import InProcessLLM
from cloud.llm_worker import Job, LLMWorker, WorkerConfig, run_step, worker_client_options
from edge.remote_llm import RemoteLLM
from shared.mqtt import MqttClient
from tests.brokers import MosquittoBroker
from tests.llm_helpers import step_inputs

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def build_llm(args: argparse.Namespace) -> tuple[InProcessLLM, str, int]:
    """The LLM, its base version and its vocabulary size."""
    if args.real:
        from cloud.base.build import load_base

        base = load_base(args.home)
        return base.backend, base.version, int(base.backend.vocab_size or 0)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    return InProcessLLM.from_causal_lm(LlamaForCausalLM(config).eval()), "bench-random", 4096


def make_inputs(args: argparse.Namespace, llm: InProcessLLM, vocab: int) -> list[list[Inputs]]:
    """Per device, per request: random right-padded inputs (lengths vary by request)."""
    return [[step_inputs(args.batch, args.tokens - (7 * (d + r)) % (args.tokens // 3),
                         width=llm.width, vocab=vocab, seed=1000 * d + r)
             for r in range(args.requests)] for d in range(args.devices)]


def matmul_peak(n: int, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n @ n x n matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_flops(fn: Any) -> int:
    """Matmul FLOPs that ``fn()`` runs (forward and backward).

    ``FlopCounterMode``'s own ``__enter__`` also tracks modules with backward hooks, which
    ``torch.autograd.grad`` (the LLM step) refuses; its inner dispatch mode counts the same
    FLOPs without them (a private class: a benchmark may lean on it, project code may not).
    """
    counter = FlopCounterMode(display=False)
    with _FlopCounterMode(counter):
        fn()
    return int(counter.get_total_flops())


def step_flops(llm: InProcessLLM, inputs: Inputs) -> int:
    return count_flops(lambda: llm.loss_and_input_grads(*inputs))


def in_process(llm: InProcessLLM, requests: list[Inputs], repeats: int = 3) -> dict[str, float]:
    """The LLM step's FLOP/s for these requests batched together vs the first one alone."""
    jobs = [Job(f"bench-{i:04d}", "step", "-", None, *x) for i, x in enumerate(requests)]
    batched_flops = count_flops(lambda: run_step(llm, jobs))
    batched_s = min(_timed(lambda: run_step(llm, jobs)) for _ in range(repeats))
    single_s = min(_timed(lambda: llm.loss_and_input_grads(*requests[0]))
                   for _ in range(repeats))
    return {"batched_step_s": batched_s, "batched_gflops": batched_flops / batched_s / 1e9,
            "single_step_s": single_s,
            "single_gflops": step_flops(llm, requests[0]) / single_s / 1e9}


def run_mode(broker: MosquittoBroker, llm: InProcessLLM, base_version: str,
             inputs: list[list[Inputs]], *, batching: bool,
             args: argparse.Namespace) -> dict[str, float]:
    """All devices send all their requests at once; returns throughput and latency."""
    config = WorkerConfig(base_version=base_version, worker_id="bench",
                          max_batch_rows=args.max_batch_rows if batching else 1,
                          max_wait_ms=args.max_wait_ms if batching else 0.0)
    creds = broker.credentials("cloud")
    client = MqttClient(broker.address,
                        worker_client_options("bench", creds.username, creds.password))
    client.connect()
    worker = LLMWorker(llm, client, config).start()
    remotes = [RemoteLLM(_device_client(broker, f"dev-{d}"), device_id=f"dev-{d}",
                         base_version=base_version, timeout_s=600)
               for d in range(args.devices)]
    latencies: list[float] = []
    wall = _drive(remotes, inputs, latencies)
    stats = worker.stats
    worker.stop()
    for c in [client, *(r.client for r in remotes)]:
        c.close()
    rows = sum(x[0].shape[0] for per_device in inputs for x in per_device)
    assert stats.rows == rows and stats.errors == 0, stats
    return {"wall_s": wall, "samples_per_s": rows / wall, "requests": stats.requests,
            "llm_calls": stats.batches, "rows_per_call": stats.rows / stats.batches,
            "latency_median_s": statistics.median(latencies)}


def _device_client(broker: MosquittoBroker, device: str) -> MqttClient:
    client = MqttClient(broker.address, broker.options(device, clean_start=True,
                                                       session_expiry_s=0))
    client.connect()
    return client


def _drive(remotes: list[RemoteLLM], inputs: list[list[Inputs]],
           latencies: list[float]) -> float:
    barrier = threading.Barrier(len(remotes) + 1)

    def device(remote: RemoteLLM, requests: list[Inputs]) -> None:
        barrier.wait()
        for x in requests:
            latencies.append(_timed(lambda x=x: remote.loss_and_input_grads(*x)))

    threads = [threading.Thread(target=device, args=(r, x))
               for r, x in zip(remotes, inputs, strict=True)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm, base_version, vocab = build_llm(args)
    inputs = make_inputs(args, llm, vocab)
    useful = sum(step_flops(llm, x) for per_device in inputs for x in per_device)
    peak = matmul_peak(args.matmul)
    runs: dict[str, list[dict[str, float]]] = {"batching": [], "one_at_a_time": []}
    devices = tuple(f"dev-{d}" for d in range(args.devices))
    with MosquittoBroker(devices=devices, services=("cloud",)) as broker:
        for _ in range(args.rounds):
            for mode in runs:
                runs[mode].append(run_mode(broker, llm, base_version, inputs,
                                           batching=mode == "batching", args=args))
                print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
    report = summarize(args, runs, useful, peak)
    report["in_process"] = in_process(llm, [per_device[0] for per_device in inputs])
    report["in_process"]["batched_share_of_peak"] = (
        report["in_process"]["batched_gflops"] * 1e9 / peak)
    print(json.dumps(report, indent=2))


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]],
              useful_flops: int, peak: float) -> dict[str, Any]:
    """Median over rounds per mode, achieved FLOP/s and the ratios side by side."""
    report: dict[str, Any] = {
        "llm": "SmolLM2 base" if args.real else "random Llama 6x256",
        "devices": args.devices, "requests_per_device": args.requests,
        "rows_per_request": args.batch, "longest_request_tokens": args.tokens,
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "matmul_peak_gflops": peak / 1e9,
    }
    for mode, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        median["achieved_gflops"] = useful_flops / median["wall_s"] / 1e9
        median["share_of_peak"] = median["achieved_gflops"] * 1e9 / peak
        report[mode] = median
    report["speedup_samples_per_s"] = (report["batching"]["samples_per_s"]
                                       / report["one_at_a_time"]["samples_per_s"])
    return report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the built SmolLM2 base")
    parser.add_argument("--home", type=Path, default=Path(
        os.environ.get("FEDNANO_HOME", "~/.cache/fednano")).expanduser())
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="steps per device per mode")
    parser.add_argument("--batch", type=int, default=4, help="rows per request")
    parser.add_argument("--tokens", type=int, default=48, help="longest request, tokens")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two modes")
    parser.add_argument("--matmul", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
