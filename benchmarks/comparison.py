"""The paper-style comparison grid as paired runs, resumable, on a CPU or a GPU machine.

    python benchmarks/comparison.py --grid main --seeds 0-11 --out runs/grid
    python benchmarks/comparison.py --grid main --seeds 0-11 --list      # what is still to run
    fednano compare runs/grid/main                                       # tables and verdicts

One job = one cell (task, devices K, α, rounds × local steps) and one seed: a single
``fednano simulate`` process runs every method of the grid on it (a paired run: same partition,
adapter initialisation, batches and held-out questions; device rounds that start from the same
global state are trained once), writing ``OUT/GRID/<task>/k<K>/a<α>/r<R>x<S>/s<seed>/<method>/
report.json``. Finished methods are skipped, so the grid resumes where it stopped.

Grids (``--grid``): ``main`` = 3 rounds × 8 steps, K ∈ {5, 10}, α ∈ {0.1, 0.5, 1.0};
``long`` = 10 × 20 at K = 5; ``starved`` = communication-starved, 1 round × 100 and
2 rounds × 100 at K = 5; ``digits`` = the main regime on easy-VQA + digits; ``cpu`` = the subset a
2-core CPU machine finishes in a working day (main regime, K = 5, α ∈ {0.1, 0.5, 1.0}).
``--methods`` replaces the grid's method list (``fednano simulate --strategy`` specs).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# The default strategy, the reference, the paper-faithful Fisher merge and its normalised fix,
# and the pooled-data learner the default must come within 2 points of (docs/results.md); the
# other baselines the paper compares against on request.
MAIN_METHODS = ("fednano", "fedavg", "fisher-raw", "fisher-norm", "centralized")
ALL_METHODS = (*MAIN_METHODS, "fedprox", "local")


@dataclass(frozen=True)
class Cell:
    task: str
    clients: int
    alpha: float
    rounds: int
    steps: int

    def folder(self) -> Path:
        return Path(self.task, f"k{self.clients}", f"a{self.alpha}",
                    f"r{self.rounds}x{self.steps}")


def _cells(tasks: tuple[str, ...], clients: tuple[int, ...], alphas: tuple[float, ...],
           regimes: tuple[tuple[int, int], ...]) -> list[Cell]:
    return [Cell(t, k, a, r, s) for t, k, a, (r, s)
            in itertools.product(tasks, clients, alphas, regimes)]


ALPHAS = (0.1, 0.5, 1.0)
GRIDS: dict[str, list[Cell]] = {
    "main": _cells(("easyvqa",), (5, 10), ALPHAS, ((3, 8),)),
    "long": _cells(("easyvqa",), (5,), ALPHAS, ((10, 20),)),
    "starved": _cells(("easyvqa",), (5,), ALPHAS, ((1, 100), (2, 100))),
    "digits": _cells(("easyvqa+digits",), (5,), ALPHAS, ((3, 8),)),
    "cpu": _cells(("easyvqa",), (5,), ALPHAS, ((3, 8),)),
}
# Settings every run shares (the methods' own options travel in their specs).
COMMON = ("--batch-size 16 --lr 2e-3 --fisher-samples 32 --partition question "
          "--holdout-by question --round-eval-questions 300")


def seeds_of(text: str) -> list[int]:
    """``"0-11"`` or ``"0,2,5"`` (or a mix) -> the seeds."""
    seeds: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def method_folder(spec: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fednano.simulate import SimConfig, method_folder, parse_method

    name, options = parse_method(spec)
    return method_folder(SimConfig(strategy=name, strategy_options=options))


def command(cell: Cell, seed: int, methods: list[str], args: argparse.Namespace) -> list[str]:
    out = args.out / args.grid / cell.folder() / f"s{seed}"
    cmd = ["fednano", "simulate", "--task", cell.task, "--devices", str(cell.clients),
           "--alpha", str(cell.alpha), "--rounds", str(cell.rounds), "--steps", str(cell.steps),
           "--seed", str(seed), "--eval-questions", str(args.eval_questions),
           "--threads", str(args.threads), "--llm-device", args.llm_device,
           *shlex.split(COMMON)]
    # One method writes its report straight into --out; several write --out/<method>/.
    cmd += ["--out", str(out / method_folder(methods[0]) if len(methods) == 1 else out)]
    for spec in methods:
        cmd += ["--strategy", spec]
    return cmd


def pending(cell: Cell, seed: int, methods: list[str], args: argparse.Namespace) -> list[str]:
    out = args.out / args.grid / cell.folder() / f"s{seed}"
    return [m for m in methods if not (out / method_folder(m) / "report.json").exists()]


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="main")
    parser.add_argument("--seeds", default="0-11", help="e.g. 0-11 or 0,1,2")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"method specs (default: {' '.join(MAIN_METHODS)})")
    parser.add_argument("--out", type=Path, default=Path("runs/grid"))
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--llm-device", default="cpu")
    parser.add_argument("--eval-questions", type=int, default=2000)
    parser.add_argument("--list", action="store_true", help="print the commands still to run")
    args = parser.parse_args(argv)
    methods = args.methods or list(MAIN_METHODS)
    jobs = []
    for seed, cell in itertools.product(seeds_of(args.seeds), GRIDS[args.grid]):
        todo = pending(cell, seed, methods, args)
        if todo:
            jobs.append((cell, seed, command(cell, seed, todo, args)))
    if args.list:
        for _, _, cmd in jobs:
            print(shlex.join(cmd))
        return 0
    print(f"{len(jobs)} runs to do ({args.jobs} side by side)", flush=True)
    failed = 0

    def one(job: tuple[Cell, int, list[str]]) -> None:
        nonlocal failed
        cell, seed, cmd = job
        log = args.out / args.grid / cell.folder() / f"s{seed}" / "run.log"
        code, seconds = run(cmd, log)
        failed += code != 0
        print(f"{'ok' if code == 0 else 'FAILED'} {cell.folder()} s{seed} in {seconds:.0f} s"
              + ("" if code == 0 else f" (see {log})"), flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
