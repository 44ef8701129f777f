"""Round wall time of the real system (fleet) vs the same work in the in-process simulation.

    python benchmarks/fleet_overhead.py --devices 2,4 --out benchmarks/results/fleet-overhead

For each device count N it runs, one after the other:

- ``fednano simulate``: N clients trained in one process through the in-process LLM
  (``fednano/simulate.py``); a round's time is ``RoundRecord.seconds`` (local training and
  Fisher of every client, then the merge; per-round evaluation off);
- ``fednano fleet simulate``: the private Mosquitto, the all-in-one cloud (API + coordinator +
  LLM worker, evaluation off) and N ``fednano-edge run`` processes; a round's time is the
  database's ``started_at`` (collecting) -> ``closed_at`` (merged and stored).

Same work in both: N devices x ``--steps`` local steps of ``--batch-size`` questions, a
Fisher over ``--fisher-samples``, ``--max-samples`` samples per device, the FedNano merge.
What differs is the system: processes, MQTT, serialisation, the database, the LLM worker's
dynamic batching across devices (the fleet's LLM calls can batch several devices' steps; the
simulation runs them one by one). Writes ``summary.json`` and ``summary.md`` (+ each run's
own report) into ``--out`` and prints the table with the commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _run(argv: list[str], log: Path) -> float:
    """Run a command to completion, output into ``log``; its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as handle:
        done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{shlex.join(argv)} failed ({done.returncode}):\n{tail}")
    return time.perf_counter() - started


def work_options(args: argparse.Namespace) -> dict[str, str]:
    return {"--rounds": str(args.rounds), "--steps": str(args.steps),
            "--batch-size": str(args.batch_size), "--fisher-samples": str(args.fisher_samples),
            "--alpha": str(args.alpha), "--seed": str(args.seed)}


def sim_command(args: argparse.Namespace, n: int, out: Path) -> list[str]:
    flags = work_options(args) | {"--devices": str(n), "--strategy": "fednano",
                                  "--max-samples": str(args.max_samples),
                                  "--round-eval-questions": "0", "--eval-questions": "50",
                                  "--client-holdout": "0", "--out": str(out)}
    return [sys.executable, "-m", "fednano.cli", "simulate",
            *[x for pair in flags.items() for x in pair]]


def fleet_command(args: argparse.Namespace, n: int, out: Path) -> list[str]:
    flags = work_options(args) | {"--devices": str(n), "--max-samples": str(args.max_samples),
                                  "--round-eval-questions": "0", "--out": str(out)}
    return [sys.executable, "-m", "fednano.cli", "fleet", "simulate", "--overwrite",
            *[x for pair in flags.items() for x in pair]]


def measure(args: argparse.Namespace, n: int) -> dict[str, Any]:
    sim_out, fleet_out = args.out / f"sim-k{n}", args.out / f"fleet-k{n}"
    sim_cmd, fleet_cmd = sim_command(args, n, sim_out), fleet_command(args, n, fleet_out)
    print(f"N={n}: {shlex.join(sim_cmd)}", flush=True)
    _run(sim_cmd, args.out / "logs" / f"sim-k{n}.log")
    print(f"N={n}: {shlex.join(fleet_cmd)}", flush=True)
    fleet_wall = _run(fleet_cmd, args.out / "logs" / f"fleet-k{n}.log")
    sim = json.loads((sim_out / "report.json").read_text())
    fleet = json.loads((fleet_out / "report.json").read_text())
    sim_rounds = [r["seconds"] for r in sim["rounds"]]
    fleet_rounds = [r["seconds"] for r in fleet["rounds"] if r["state"] == "closed"]
    return {"devices": n, "sim_round_s": sim_rounds, "fleet_round_s": fleet_rounds,
            "ratio": statistics.fmean(fleet_rounds) / statistics.fmean(sim_rounds),
            "fleet_ready_s": fleet["ready_seconds"], "fleet_wall_s": fleet_wall,
            "sim_command": shlex.join(sim_cmd), "fleet_command": shlex.join(fleet_cmd)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| devices | in-process round (s) | fleet round (s) | overhead ratio | fleet ready "
             "(s) | fleet run (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        sim = " / ".join(f"{s:.1f}" for s in r["sim_round_s"])
        fleet = " / ".join(f"{s:.1f}" for s in r["fleet_round_s"])
        lines.append(f"| {r['devices']} | {sim} | {fleet} | {r['ratio']:.2f} | "
                     f"{r['fleet_ready_s']:.0f} | {r['fleet_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="2,4,8,16", help="comma-separated device counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fisher-samples", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet-overhead"))
    args = parser.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        rows.append(measure(args, n))
        (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
        (args.out / "summary.md").write_text(markdown(rows))
        print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
