"""``fednano``: build the frozen base, report footprints, run federated simulations.

Heavy modules are imported inside the commands, so ``fednano --help`` is instant and a device
install never needs the cloud's dependencies to print help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from fednano import sim_options as opts
from fednano.choices import simulation_baselines, strategy_help
from fednano.cloud_cli import cloud_app, devices_app
from fednano.fleet.cli import demo, fleet_app
from shared.version_option import add_version_option

app = typer.Typer(
    help="FedNano: federated tuning of multimodal LLMs. The LLM stays frozen in the cloud; "
    "devices hold NanoEdge (encoder, connector, embedder) and train low-rank NanoAdapters.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
add_version_option(app, "fednano")


base_app = typer.Typer(help="Build and inspect the frozen base MLLM (real pretrained weights).",
                       no_args_is_help=True)
app.add_typer(base_app, name="base")
bundle_app = typer.Typer(help="Export the NanoEdge bundle devices run: int8 encoder + connector "
                         "(ONNX), embedder, tokenizer, configs, checked and versioned.",
                         no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
console = Console()
app.add_typer(cloud_app, name="cloud")
app.add_typer(devices_app, name="devices")
app.add_typer(fleet_app, name="fleet")
app.command("demo")(demo)

Home = Annotated[Path, opts.home_option("Where models, caches and bases live "
                                        "(env FEDNANO_HOME).")]
Threads = Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).", min=0)]


def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _log_cloud_steps() -> None:
    """The cloud's steps at INFO on stderr; the root stays at WARNING: onnxruntime's quantizer
    chats there, and tqdm already shows the long steps."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cloud").setLevel(logging.INFO)


@base_app.command("build")
def base_build(
    home: Home,
    align_steps: Annotated[int, typer.Option(help="Connector-alignment steps (projector only).",
                                             min=1)] = 200,
    grid: Annotated[int, typer.Option(help="Visual tokens = grid x grid.", min=1)] = 2,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    seed: int = 0,
    rank: Annotated[int | None, typer.Option(
        help="NanoAdapter rank every service of this base uses (alpha = 2 x rank), recorded "
             "in its manifest. Default: AdapterConfig's (8).", min=1,
        show_default=False)] = None,
    threads: Threads = 0,
) -> None:
    """Load SmolLM2 + EfficientNet-Lite0, align the connector, save a versioned base."""
    from cloud.base.build import build_base
    from cloud.base.manifest import adapter_for_rank

    _log_cloud_steps()
    _threads(threads)
    folder = build_base(home, grid=grid, align_steps=align_steps, batch_size=batch_size, seed=seed,
                        adapter=None if rank is None else adapter_for_rank(rank))
    console.print(f"[green]base built[/green]: {folder}")


@base_app.command("info")
def base_info(home: Home) -> None:
    """Print the current base's manifest (version, hashes, alignment, adapter config)."""
    from cloud.base.manifest import read_manifest

    console.print_json(read_manifest(home, None).model_dump_json())


@bundle_app.command("export")
def bundle_export(
    out: Annotated[Path, typer.Option(help="Folder for bundles: writes OUT/<bundle_version>/.",
                                      show_default=False)],
    home: Home,
    precision: Annotated[Literal["int8", "fp32"], typer.Option(
        help="Encoder + connector graph: static QDQ int8 (calibrated) or fp32.")] = "int8",
    embedder_dtype: Annotated[Literal["float16", "int8"], typer.Option(
        help="How the token embedder is stored.")] = "float16",
    min_cosine: Annotated[float, typer.Option(
        help="Quality gate: least per-token cosine to fp32 torch on held-out images, for "
        "every encoder graph.")] = 0.97,
    tensorrt_min_cosine: Annotated[float | None, typer.Option(
        help="The TensorRT graph's own gate (default: --min-cosine).")] = None,
    calibration_images: Annotated[int, typer.Option(min=1)] = 64,
    holdout_images: Annotated[int, typer.Option(min=1)] = 32,
    archive: Annotated[bool, typer.Option(help="Also write OUT/<bundle_version>.tar.")] = False,
    threads: Threads = 0,
) -> None:
    """Export the current base as a device bundle: an int8 encoder graph for onnxruntime's CPU
    provider and one for TensorRT, each with its quality gate (exit 1 if a gate fails)."""
    from cloud.base.manifest import BaseNotBuiltError
    from cloud.bundle import ExportOptions, QualityGateError, export_from_home

    try:
        options = ExportOptions(precision=precision, embedder_dtype=embedder_dtype,
                                min_cosine=min_cosine, tensorrt_min_cosine=tensorrt_min_cosine,
                                archive=archive)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    _threads(threads)
    _log_cloud_steps()
    try:
        folder = export_from_home(home, out, options=options, n_calibration=calibration_images,
                                  n_holdout=holdout_images)
    except (QualityGateError, BaseNotBuiltError) as err:
        console.print(str(err), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from err
    console.print(f"bundle exported: {folder}", markup=False, soft_wrap=True)


@app.command()
def footprint(
    rank: Annotated[int, typer.Option(help="NanoAdapter rank.", min=1)] = 8,
) -> None:
    """Parameters and bytes on the device vs the whole MLLM (default, LLaVA-1.5-7B, MiniGPT-4)."""
    from cloud.footprint import footprint_markdown, reference_footprints
    from shared.adapters import AdapterConfig

    print(footprint_markdown(reference_footprints(AdapterConfig(rank=rank))))


@app.command()
def simulate(
    home: Home,
    strategy: Annotated[list[str] | None, typer.Option(
        help=f"A method: a strategy name, {strategy_help(simulation_baselines())}, "
             "optionally with strategy options as NAME:KEY=VALUE,... (e.g. "
             "'fisher-norm:ffa=true,server_lr=2'). "
             "Repeat it for a paired run: every method on the same data, seed and held-out "
             "questions, one report each under --out/<method>/.")] = None,
    devices: opts.Devices = opts.DEVICES,
    alpha: opts.Alpha = opts.ALPHA,
    task: Annotated[str, typer.Option(
        help="'easyvqa', or 'easyvqa+digits' so devices also differ by task.")] = "easyvqa",
    partition: Annotated[str, typer.Option(
        help="Skew over 'question' (type x answer) or 'image-class' (shape x colour).")]
    = "question",
    rounds: opts.Rounds = opts.ROUNDS,
    steps: opts.Steps = opts.STEPS,
    batch_size: opts.BatchSize = opts.BATCH_SIZE,
    lr: opts.Lr = opts.LR,
    rank: Annotated[int | None, typer.Option(
        help="NanoAdapter rank: the base's (`fednano base build --rank`); given, it must be "
             "the base's (or the rank a missing base is built with).", min=1,
        show_default=False)] = None,
    prox_mu: Annotated[float, typer.Option(help="FedProx proximal weight.")] = 0.01,
    fisher_samples: opts.FisherSamples = opts.FISHER_SAMPLES,
    fisher_normalize: Annotated[str | None, typer.Option(
        help="Fisher strategies (fisher-raw, ...): scale each device's Fisher by its own "
             "'mean', 'max' or 'l2' norm before merging.")] = None,
    eval_questions: Annotated[int, typer.Option(
        help="Held-out test questions the final model is evaluated on.", min=1)] = 1000,
    round_eval_questions: opts.RoundEvalQuestions = opts.ROUND_EVAL_QUESTIONS,
    min_samples: Annotated[int, typer.Option(help="Minimum training samples per device.")] = 32,
    client_holdout: Annotated[int, typer.Option(
        help="Per-device held-out images (questions with --holdout-by question).")] = 100,
    holdout_by: Annotated[str, typer.Option(
        help="Hold out whole 'image's (default) or 'question's of each device's data.")] = "image",
    eval_seed: Annotated[int, typer.Option(
        help="Seed of the shared held-out test sample (same for every run).")] = 0,
    max_samples: opts.MaxSamples = None,
    seed: opts.Seed = 0,
    delta_codec: Annotated[str | None, typer.Option(
        help="Compress uploads like a device, error feedback included: a codec scheme such "
             "as 'int8/b64+zstd' or 'topk/k0.1+zstd'. Default: exact fp32.")] = None,
    fisher_codec: Annotated[str, typer.Option(
        help="Scheme for the Fisher when --delta-codec is set.")] = "bf16+zstd",
    activations: Annotated[str | None, typer.Option(
        help="How the devices' activations go up and gradients come down: 'fp32' (exact), "
             "'bf16+zstd' or 'int8+zstd' (int8 per token). Default: the product's default "
             "(shared/activations.py).")] = None,
    llm_device: Annotated[str, typer.Option(
        help="Where the frozen LLM runs: 'cpu', 'cuda' or 'cuda:N' (devices stay on the CPU).")]
    = "cpu",
    lockstep: Annotated[bool | None, typer.Option(
        help="Batch the devices' LLM calls of a round into one (same result up to rounding). "
             "Default: on with a GPU --llm-device, off on the CPU (slower there, K times the "
             "memory).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.json and report.md.")]
    = None,
    threads: Threads = 0,
    clients: Annotated[int | None, typer.Option(hidden=True, min=1)] = None,
    max_client_samples: Annotated[int | None, typer.Option(hidden=True, min=1)] = None,
) -> None:
    """Federated simulation in one process on the real base and easy-VQA."""
    from pydantic import ValidationError

    from cloud.base.manifest import AdapterMismatchError
    from fednano.simulate import SimConfig, parse_method
    from shared.training import TrainConfig

    devices = opts.renamed(devices, clients, old="--clients", new="--devices",
                           default=opts.DEVICES)
    max_samples = opts.renamed(max_samples, max_client_samples, old="--max-client-samples",
                               new="--max-samples", default=None)
    methods = [parse_method(spec) for spec in (strategy or [opts.STRATEGY])]
    try:
        configs = [SimConfig(
            strategy=name, strategy_options=options, task=task, clients=devices, alpha=alpha,
            partition=partition, rounds=rounds,
            seed=seed, prox_mu=prox_mu, fisher_normalize=fisher_normalize,
            eval_questions=eval_questions, round_eval_questions=round_eval_questions,
            max_client_samples=opts.whole_shard(max_samples),
            min_samples=min_samples, client_holdout=client_holdout, holdout_by=holdout_by,
            eval_seed=eval_seed,
            train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                              fisher_samples=fisher_samples),
            adapter_rank=rank, llm_device=llm_device, delta_codec=delta_codec,
            fisher_codec=fisher_codec, lockstep=lockstep,
            **({"activations": activations} if activations else {}),
        ) for name, options in methods]
    except ValidationError as err:
        raise typer.BadParameter(_first_error(err)) from err
    _threads(threads)
    try:
        if len(configs) == 1:
            run_simulation(configs[0], home, out)
            return
        run_paired(configs, home, out or Path("runs") / _run_name(configs[0]))
    except AdapterMismatchError as err:
        raise typer.BadParameter(str(err), param_hint="--rank") from err


def run_simulation(config: object, home: Path, out: Path | None) -> None:
    from fednano.simulate import load_and_run, save_report

    report = load_and_run(config, home)  # type: ignore[arg-type]
    folder = out or Path("runs") / _run_name(config)
    json_path, md_path = save_report(report, folder)
    console.print(md_path.read_text())
    console.print(f"saved {json_path} and {md_path}")


def run_paired(configs: list[Any], home: Path, out: Path) -> None:
    from fednano.simulate import method_spec, run_methods

    for report in run_methods(configs, home, out):
        console.print(f"{method_spec(report.config):<40} accuracy {report.final['accuracy']:.3f} "
                      f"({report.seconds:.0f} s)")
    console.print(f"saved under {out}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (searched for report.json).")],
    reference: Annotated[str, typer.Option(
        help="The method every other one is paired against, per cell and seed.")] = "fedavg",
    margin: Annotated[float, typer.Option(
        help="Non-inferiority margin, in accuracy (0.01 = one point); rows that differ only in "
             "their activation encoding are judged at half a point (or this, if tighter).",
        min=0)] = 0.01,
    update: Annotated[Path | None, typer.Option(
        help="Refresh the '<!-- generated: NAME -->' blocks of this markdown file (accuracy, "
             "verdicts, bytes, per-type, centralized) instead of printing.")] = None,
) -> None:
    """Accuracy per method and setting, and each method's paired verdict against a reference.

    Runs with the same seed in the same setting are paired; per setting the mean difference,
    its 95 % CI, a one-sided paired t-test and a Wilcoxon signed-rank test, Holm-corrected
    across settings, give superior / non-inferior / inconclusive / worse. The bounds (local,
    centralized) are left out of that table; where centralized ran, FedAvg is judged against it
    at a 2-point margin ("within 2 points of centralized").
    """
    from fednano.compare import (
        centralized_markdown,
        load_reports,
        pivot_markdown,
        update_document,
        verdict_markdown,
    )

    try:
        reports = load_reports(runs)
        if update is not None:
            update.write_text(update_document(update.read_text(), reports, reference, margin))
            console.print(f"updated {update}")
            return
        print(pivot_markdown(reports), "", sep="\n")
        for table in (lambda: verdict_markdown(reports, reference, margin),
                      lambda: centralized_markdown(reports)):
            try:
                print(table(), "", sep="\n")
            except ValueError as err:  # nothing paired with the reference: the pivot alone
                print(f"({err})", "", sep="\n")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def _run_name(config: object) -> str:
    c = config.model_dump()  # type: ignore[attr-defined]
    return (
        f"{c['strategy']}-{c['task']}-{c['partition']}-k{c['clients']}-a{c['alpha']}"
        f"-r{c['rounds']}x{c['train']['steps']}-s{c['seed']}"
    )


def _first_error(err: Exception) -> str:
    errors: list[dict[str, Any]] = getattr(err, "errors", lambda: [])()
    if not errors:
        return str(err)
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def main() -> None:
    """The ``fednano`` command: a missing database, broker or base is one line, not a
    traceback (``fednano.errors``)."""
    from fednano import errors

    errors.run(app)


if __name__ == "__main__":
    main()
