"""``fednano fleet simulate`` and ``fednano demo``: the real system with a simulated fleet.

Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import signal
import sys
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from cloud.layout import Layout
from fednano import sim_options as opts
from fednano.choices import strategy_help, strategy_parser

if TYPE_CHECKING:
    from fednano.fleet.options import FleetOptions
    from fednano.fleet.report import FleetReport

fleet_app = typer.Typer(help="A simulated device fleet: N fednano-edge processes against a "
                        "private Mosquitto, the cloud and a database, with fault injection.",
                        no_args_is_help=True)
# Piped (CI, a log file): wide enough for the report's tables.
console = Console() if sys.stdout.isatty() else Console(width=140)

Home = Annotated[Path, opts.home_option("Where the frozen base lives (built there if missing; "
                                        "env FEDNANO_HOME).")]


def _stop_on_signals() -> None:
    """SIGINT (also when inherited as ignored, e.g. ``cmd &`` in a script), SIGTERM and SIGHUP
    end the run like Ctrl-C: the runner's ``finally`` stops everything."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run_fleet(options: FleetOptions, *, out: Path, home: Path, bundles: Path | None,
              overwrite: bool, keep_serving: bool = False) -> FleetReport:
    """Run the fleet and print its report; exit 1 when a check failed, 2 when it stopped."""
    from fednano.broker import BrokerUnavailable
    from fednano.fleet.report import print_report
    from fednano.fleet.runner import FleetError, FleetPaths, FleetRunner

    paths = FleetPaths(out=out.resolve(), home=home.expanduser().resolve(),
                       bundles=(bundles or Layout(home).bundles).expanduser().resolve())
    _stop_on_signals()
    runner = FleetRunner(options, paths, console=console, overwrite=overwrite,
                         keep_serving=keep_serving)
    try:
        report = runner.run()
    except (FleetError, BrokerUnavailable) as err:
        console.print(f"fleet run failed: {err}", style="red", markup=False, highlight=False)
        raise typer.Exit(code=2) from err
    except KeyboardInterrupt:
        console.print("interrupted: every process was stopped", style="yellow")
        raise typer.Exit(code=130) from None
    print_report(report, console)
    console.print(f"report: {paths.out / 'report.md'} and report.json; logs: {paths.logs}",
                  highlight=False, markup=False)
    console.print(f"API {report.api_url}/api/v1/docs, dashboard {report.api_url}/dashboard, "
                  f"operator token {runner.token} (also valid for `fednano cloud api` on this "
                  "run's database)", highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(code=1)
    return report


def _default_out(kind: str) -> Path:
    return Path("runs") / kind / datetime.now().strftime("%Y%m%d-%H%M%S")


@fleet_app.command("simulate")
def simulate(
    home: Home,
    devices: opts.Devices = opts.DEVICES,
    alpha: opts.Alpha = opts.ALPHA,
    rounds: opts.Rounds = opts.ROUNDS,
    strategy: Annotated[str, typer.Option(
        parser=strategy_parser(), help=f"Aggregation strategy, {strategy_help()}.")]
    = opts.STRATEGY,
    steps: opts.Steps = opts.STEPS,
    batch_size: opts.BatchSize = opts.BATCH_SIZE,
    lr: opts.Lr = opts.LR,
    fisher_samples: opts.FisherSamples = opts.FISHER_SAMPLES,
    max_samples: opts.MaxSamples = None,
    round_eval_questions: opts.RoundEvalQuestions = opts.ROUND_EVAL_QUESTIONS,
    deadline: Annotated[float, typer.Option(help="A round's deadline in seconds.",
                                            min=1)] = 600.0,
    database: Annotated[str, typer.Option(help="'sqlite' (a file in the run folder) or the URL "
                                          "of an empty database, e.g. postgresql://...")]
    = "sqlite",
    faults: Annotated[str, typer.Option(help="Comma-separated: kill-device, slow-device, "
                                        "corrupt, truncated, oversized, nan, duplicate, "
                                        "stale-base, cloud-restart, broker-restart, broker-kill; "
                                        "or all.")]
    = "",
    network: Annotated[str, typer.Option(
        help="loopback: devices reach the broker on 127.0.0.1 in plaintext; tls: on this "
             "machine's network address over TLS (a private CA signs the broker's "
             "certificate), as a real fleet does.")] = "loopback",
    x509_devices: Annotated[int, typer.Option(
        help="How many devices authenticate with a certificate the CA signs instead of a "
             "password (needs --network tls).", min=0)] = 0,
    seed: opts.Seed = 0,
    llm_timeout: Annotated[float, typer.Option(help="Seconds a device waits for the LLM worker "
                                               "per attempt.", min=1)] = 20.0,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.",
                                           min=1)] = 3600.0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/fleet/<time>).",
                                             show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete what is in --out first.")] = False,
    bundles: Annotated[Path | None, typer.Option(help="Exported bundles (default HOME/bundles; "
                                                 "exported there if missing).",
                                                 show_default=False)] = None,
    eval_questions: Annotated[int | None, typer.Option(hidden=True, min=0)] = None,
) -> None:
    """Provision N devices, start the broker, the cloud and N device processes, run the rounds,
    inject faults, print and save the report (report.md, report.json)."""
    from pydantic import ValidationError

    from fednano.fleet.options import FleetOptions, parse_faults

    round_eval_questions = opts.renamed(
        round_eval_questions, eval_questions, old="--eval-questions",
        new="--round-eval-questions", default=opts.ROUND_EVAL_QUESTIONS)
    try:
        options = FleetOptions(
            devices=devices, alpha=alpha, rounds=rounds, strategy=strategy, steps=steps,
            batch_size=batch_size, lr=lr, fisher_samples=fisher_samples,
            max_samples=opts.whole_shard(max_samples), eval_questions=round_eval_questions,
            deadline_s=deadline,
            database=database, faults=parse_faults(faults), network=network,
            x509_devices=x509_devices, seed=seed, llm_timeout_s=llm_timeout,
            timeout_s=timeout)
    except (ValidationError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    run_fleet(options, out=out or _default_out("fleet"), home=home, bundles=bundles,
              overwrite=overwrite)


DEMO_OPTIONS = {"devices": 3, "alpha": 0.5, "rounds": 3, "steps": 10, "batch_size": 16,
                "fisher_samples": 32, "max_samples": 200, "eval_questions": 200,
                "deadline_s": 600.0}


def demo(
    home: Home,
    out: Annotated[Path, typer.Option(help="Run folder (replaced at every demo).")]
    = Path("runs/demo/fleet"),
    serve: Annotated[bool, typer.Option(help="After the rounds, keep the cloud (API, "
                                        "dashboard) up until Ctrl-C.")] = False,
) -> None:
    """The demo: SQLite, a private Mosquitto, the all-in-one cloud and 3 devices train
    FedNano adapters on easy-VQA for 3 rounds with the real weights; prints the results."""
    from fednano.fleet.options import FleetOptions

    options = FleetOptions.model_validate(DEMO_OPTIONS)
    console.print(f"FedNano demo: {options.devices} devices x {options.rounds} rounds on easy-VQA"
                  f" (SQLite, private Mosquitto, all-in-one cloud); run folder {out}",
                  highlight=False, markup=False)
    run_fleet(options, out=out, home=home, bundles=None, overwrite=True, keep_serving=serve)
    if not serve:
        console.print(f"the cloud is stopped now; to browse the results again: FEDNANO_HOME="
                      f"{home} FEDNANO_DATA_DIR={out.resolve() / 'cloud'} fednano cloud api, "
                      "then http://127.0.0.1:8000/dashboard with the token above (or rerun "
                      "with --serve)", highlight=False, markup=False)
