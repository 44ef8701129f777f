"""Aggregation time for 10, 100 and 1,000 updates at the real adapter shapes.

The default base's NanoAdapters: rank 8, image adapter after the connector and text adapter
after the embedder, both at the LLM width 576 (18,432 parameters in 4 tensors). Each update
carries a delta (fp32 codec frame, as the task asks by default) and a Fisher (bf16 frame).
Two timings per strategy: ``merge`` is ``Strategy.aggregate`` on decoded updates (the maths),
``decode+merge`` adds decoding every update's frames first (what the aggregation service does
after reading the blobs). Median of ``--repeats`` runs.

    python benchmarks/aggregation.py [--counts 10 100 1000] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from cloud.strategies import Strategy, make_strategy
from shared import codec
from shared.adapters import AdapterConfig, NanoAdapters
from shared.update import AdapterUpdate

WIDTH, RANK = 576, 8
DELTA_SCHEME = codec.Scheme(kind="fp32")
FISHER_SCHEME = codec.Scheme(kind="bf16")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global_state = NanoAdapters(WIDTH, AdapterConfig(rank=RANK, alpha=16)).adapter_state_dict()
    expected = {k: tuple(v.shape) for k, v in global_state.items()}
    params = sum(v.numel() for v in global_state.values())
    print(f"adapter: rank {RANK}, width {WIDTH}, {params:,} parameters; torch threads "
          f"{torch.get_num_threads()}; median of {args.repeats}\n")
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
