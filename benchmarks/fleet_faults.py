"""The fault matrix: the same fleet run without faults and with each fault, side by side.

    python benchmarks/fleet_faults.py --out benchmarks/results/fleet-faults

Runs ``fednano fleet simulate`` once per scenario (same devices, data, rounds, local steps and
seed; only ``--faults`` differs) and writes ``summary.md`` / ``summary.json``: for each
scenario the final and per-round held-out accuracy, rounds closed, the evidence counted from
the cloud's database (rejected updates by code, refusals that could not be an updates row,
redeliveries stored once, participations dropped, device restarts) and whether the run's
checks passed (no acknowledged update lost, accepted updates merged, verdicts as built).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

SCENARIOS = {
    "none": "",
    "bad payloads": "corrupt,truncated,oversized,nan,stale-base",
    "duplicate": "duplicate",
    "kill-device": "kill-device",
    "slow-device": "slow-device",
    "cloud-restart": "cloud-restart",
    "broker-restart": "broker-restart",
    "broker-kill": "broker-kill",
    "all": "all",
}


def command(args: argparse.Namespace, faults: str, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "fednano.cli", "fleet", "simulate", "--overwrite",
            "--devices", str(args.devices), "--rounds", str(args.rounds),
            "--steps", str(args.steps), "--max-samples", str(args.max_samples),
            "--round-eval-questions", str(args.eval_questions), "--deadline", str(args.deadline),
            "--alpha", str(args.alpha), "--seed", str(args.seed), "--out", str(out)]
    return [*argv, "--faults", faults] if faults else argv


def run(args: argparse.Namespace, name: str, faults: str) -> dict[str, Any]:
    out = args.out / name.replace(" ", "-")
    argv = command(args, faults, out)
    print(f"{name}: {shlex.join(argv)}", flush=True)
    log = args.out / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as handle:
        code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if not (out / "report.json").exists():
        raise SystemExit(f"{name}: no report (exit {code.returncode}); see {log}")
    report = json.loads((out / "report.json").read_text())
    return summarize(name, faults, report, time.perf_counter() - started, shlex.join(argv))


def summarize(name: str, faults: str, report: dict[str, Any], wall: float,
              argv: str) -> dict[str, Any]:
    rounds = report["rounds"]
    return {
        "scenario": name, "faults": faults, "command": argv, "wall_s": round(wall),
        "final_accuracy": report["final_accuracy"],
        "accuracy": [r["accuracy"] for r in rounds],
        "closed": sum(r["state"] == "closed" for r in rounds), "rounds": len(rounds),
        "participants": [f"{r['participants']}/{r['selected']}" for r in rounds],
        "dropped": sum(r["dropped"] for r in rounds),
        "rejected": dict(Counter(x["code"] for x in report["rejected"])),
        "refused": dict(Counter(x["code"] for x in report["refused"])),
        "redelivered": sum(report["redelivered"].values()),
        "restarts": sum(d["starts"] - 1 for d in report["devices"]),
        "acknowledged": sum(len(v) for v in report["acknowledged"].values()),
        "checks": {k: v["ok"] for k, v in report["checks"].items()},
        "ok": report["ok"],
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | final accuracy | accuracy per round | participants per round | "
             "rejected (code count) | refused | redelivered | dropped | device restarts | "
             "checks | run (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = " / ".join("-" if a is None else f"{a:.3f}" for a in r["accuracy"])
        final = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.3f}"
        lines.append(
            f"| {r['scenario']} | {final} | {acc} | {' '.join(r['participants'])} | "
            f"{_counts(r['rejected'])} | {_counts(r['refused'])} | {r['redelivered']} | "
            f"{r['dropped']} | {r['restarts']} | {'ok' if r['ok'] else 'FAILED'} | "
            f"{r['wall_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--eval-questions", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=180.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet-faults"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.scenarios.split(","):
        rows.append(run(args, name, SCENARIOS[name]))
        (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
        (args.out / "summary.md").write_text(markdown(rows))
        print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
