"""The simulation's lockstep batching against the sequential device loop, side by side.

    python benchmarks/lockstep.py --clients 5 --steps 4 --repeats 3 \
        --out benchmarks/results/lockstep
    python benchmarks/lockstep.py --llm-device cuda ...        # on a GPU machine

Loads the real base, partitions easy-VQA over ``--clients`` devices (α = 0.1, by question) and
times one federated round of every device from the same global state (``--steps`` local steps
of batch 16 and a 32-sample Fisher each), alternating the two paths ``--repeats`` times in one
process so that both see the same machine load. Reports the median seconds of each path, their
ratio, the LLM calls made and the largest difference between the two paths' deltas (the paths
must agree up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from edge.trainer import RoundResult, run_round
from fednano.lockstep import DeviceRound, run_rounds_lockstep
from fednano.simulate import SimConfig, Simulation, load_base_and_task
from shared.backend import CountingBackend
from shared.training import TrainConfig


def rounds_of(sim: Simulation, config: TrainConfig) -> list[DeviceRound]:
    state = sim.fresh_state()

    def device(k: int) -> DeviceRound:
        client = sim.clients[k]
        return lambda edge, llm: run_round(edge, llm, sim.batcher, client.train, state, config,
                                           client_id=client.client_id, seed=100 + k)

    return [device(k) for k in range(len(sim.clients))]


def sequential(sim: Simulation, config: TrainConfig) -> tuple[list[RoundResult], int]:
    counter = CountingBackend(sim.backend.inner)
    results = [fn(sim.base.edge, counter) for fn in rounds_of(sim, config)]
    return results, counter.training.steps + counter.scoring.steps


def lockstep(sim: Simulation, config: TrainConfig) -> tuple[list[RoundResult], int]:
    results, stats = run_rounds_lockstep(sim.base.edge, sim.backend.inner,
                                         rounds_of(sim, config))
    return results, stats.batches


def max_difference(a: list[RoundResult], b: list[RoundResult]) -> float:
    return max(float((x.update.delta[k] - y.update.delta[k]).abs().max())
               for x, y in zip(a, b, strict=True) for k in x.update.delta)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--llm-device", default="cpu")
    parser.add_argument("--home", type=Path, default=Path.home() / ".cache" / "fednano")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sim_config = SimConfig(clients=args.clients, alpha=0.1, eval_questions=1,
                           round_eval_questions=0, llm_device=args.llm_device)
    base, task = load_base_and_task(sim_config, args.home)
    sim = Simulation(base, task, sim_config)
    train = TrainConfig(steps=args.steps, batch_size=16, fisher_samples=32)
    times: dict[str, list[float]] = {"sequential": [], "lockstep": []}
    calls: dict[str, int] = {}
    outputs: dict[str, list[RoundResult]] = {}
    for _ in range(args.repeats):
        for name, path in (("sequential", sequential), ("lockstep", lockstep)):
            started = time.perf_counter()
            outputs[name], calls[name] = path(sim, train)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "clients": args.clients, "steps": args.steps, "repeats": args.repeats,
        "llm_device": args.llm_device, "threads": torch.get_num_threads(),
        "seconds": times, "median_seconds": medians,
        "speedup": medians["sequential"] / medians["lockstep"], "llm_calls": calls,
        "max_delta_difference": max_difference(outputs["sequential"], outputs["lockstep"]),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"{args.llm_device.replace(':', '')}-k{args.clients}.json"
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
