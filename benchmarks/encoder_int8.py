"""int8 vs fp32 encoder + connector on the real base: latency, size, cosine; bundle vs full MLLM.

    python benchmarks/encoder_int8.py [--bundle DIR] [--repeats 50] [--threads 1]
                                      [--candidates] [--openvino] [--out F]

Models, all pixels (1, 3, 224, 224) -> visual tokens (1, 4, 576): fp32 torch (eager), fp32
onnxruntime and the bundle's two int8 static-QDQ graphs (exported here with 64 calibration
images unless ``--bundle`` names one): the CPU graph (what onnxruntime's CPU provider runs) and
the TensorRT graph (zero points of 0), both run here on onnxruntime's CPU provider. With
``--candidates`` also the other recipes tried for the CPU graph (``CANDIDATES``). Latency is
timed at batch 1, interleaved in one loop so a noisy shared machine hits every model alike;
one thread by default (two threads on two busy cores stall in spin-waits). Cosine is per
visual token vs fp32 torch on the held-out alignment images + sklearn photos and on easy-VQA
test images (device-style data). With ``--openvino`` (``pip install openvino``) the fp32 graph
and the bundle's CPU graph also run on OpenVINO's CPU runtime, which reads the same QDQ ONNX
files; the ratios stay against fp32 onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cloud.base.build import LoadedBase, default_home, load_base
from cloud.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    RECIPES,
    EncoderConnector,
    ExportOptions,
    QuantRecipe,
    base_public_images,
    export_bundle,
    export_onnx,
    finalize_onnx,
    parts_from_base,
    quantize_int8,
    run_session,
)
from edge.runtime import load_embedder
from shared.bundle import EMBEDDER_NAME, read_manifest, save_embedder
from shared.data.easyvqa import load_easy_vqa
from shared.vision import preprocess

Runner = Callable[[torch.Tensor], torch.Tensor]  # pixels (B, 3, S, S) -> tokens (B, V, d)
# Other recipes for the CPU graph, measured next to the bundle's with --candidates.
CANDIDATES = {
    "int8 u8, MinMax, per-tensor weights": QuantRecipe(activations="u8", per_channel=False),
    "int8 u8, Percentile": QuantRecipe(activations="u8", method="Percentile"),
    "int8 s8-symmetric, Percentile": QuantRecipe(activations="s8-symmetric", method="Percentile"),
}


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    base = load_base(args.home)
    calibration, holdout = base_public_images(base, n_calibration=64, n_holdout=32)
    work = Path(tempfile.mkdtemp(prefix="fednano-bench-"))
    bundle = args.bundle or export_bundle(base, work / "bundles", calibration_images=calibration,
                                          holdout_images=holdout, progress=False)
    parts = parts_from_base(base)
    graph = EncoderConnector(parts.encoder, parts.connector).eval()
    encoders = read_manifest(bundle).encoders
    files = {"fp32 onnx": _fp32_onnx(graph, work), **{
        f"bundle {target} graph ({_describe(v.calibration.activations, v.calibration.method)})":
        bundle / v.file for target, v in encoders.items()}}
    if args.candidates:
        for name, recipe in CANDIDATES.items():
            files[name] = _quantize(files["fp32 onnx"], work, calibration, recipe)
    runners = {"fp32 torch": _torch_runner(graph), **{
        name: _ort_runner(path, args.threads) for name, path in files.items()}}
    if args.openvino:
        cpu_graph = next(name for name in files if name.startswith("bundle cpu graph"))
        for name in ("fp32 onnx", cpu_graph):
            runners[f"{name} on OpenVINO"] = _openvino_runner(files[name], args.threads)
    report = {
        "threads": args.threads, "repeats": args.repeats, "bundle": str(bundle),
        "recipes": {target: str(recipe) for target, recipe in RECIPES.items()},
        "batch": args.batch, "latency_ms": _latency(runners, args.repeats, args.batch),
        "cosine": _cosines(runners, holdout, _device_images(32)),
        "size_mb": {name: _mb(path.stat().st_size) for name, path in files.items()},
        "footprint": _footprint(base, bundle, work),
    }
    _print(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="an exported int8 bundle")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="images per timed inference")
    parser.add_argument("--candidates", action="store_true",
                        help="also quantize and time the other recipes in CANDIDATES")
    parser.add_argument("--openvino", action="store_true",
                        help="also run the fp32 and the bundle's CPU graph on OpenVINO's CPU "
                             "runtime (pip install openvino)")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()
    args.home = args.home or default_home()
    return args


def _fp32_onnx(graph: nn.Module, work: Path) -> Path:
    path = export_onnx(graph, work / "fp32.onnx")
    finalize_onnx(path)
    return path


def _describe(activations: str | None, method: str | None) -> str:
    return f"int8 {activations}, {method}" if activations else "fp32"


def _quantize(fp32: Path, work: Path, calibration: list[Image.Image],
              recipe: QuantRecipe) -> Path:
    name = f"int8-{recipe.activations}-{recipe.method}-pc{int(recipe.per_channel)}.onnx"
    out = quantize_int8(fp32, work / name, preprocess(calibration),
                        ExportOptions(progress=False), recipe=recipe)
    finalize_onnx(out)
    return out


def _torch_runner(graph: nn.Module) -> Runner:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return graph(pixels)

    return run


def _ort_runner(path: Path, threads: int) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    return lambda pixels: run_session(session, pixels)


def _openvino_runner(path: Path, threads: int) -> Runner:
    """The graph on OpenVINO as a device runs it (``edge.runtime.open_openvino_session``)."""
    from edge.runtime import open_openvino_session

    session = open_openvino_session(path, threads=threads)
    if session is None:
        raise SystemExit("--openvino needs the openvino package: pip install openvino")
    return lambda pixels: torch.from_numpy(
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0])


def _latency(runners: dict[str, Runner], repeats: int,
             batch: int = 1) -> dict[str, dict[str, float]]:
    """Median, p90 and min ms per model, interleaved; ratios = fp32 onnx / model.

    On a shared machine the min is the run least disturbed by other jobs."""
    pixels = torch.randn(batch, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats + 3):
        for name, run in runners.items():
            started = time.perf_counter()
            run(pixels)
            if i >= 3:  # warm-up
                times[name].append((time.perf_counter() - started) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    mins = {name: min(t) for name, t in times.items()}
    return {name: {"median": round(medians[name], 2),
                   "p90": round(statistics.quantiles(t, n=10)[-1], 2),
                   "min": round(mins[name], 2),
                   "speedup_vs_fp32_onnx": round(medians["fp32 onnx"] / medians[name], 2),
                   "speedup_min_vs_fp32_onnx": round(mins["fp32 onnx"] / mins[name], 2)}
            for name, t in times.items()}


def _device_images(n: int) -> list[Image.Image]:
    task = load_easy_vqa()
    keys = list(dict.fromkeys(s.image_key for s in task.test))[:n]
    return [task.load_image(key) for key in keys]


def _cosines(runners: dict[str, Runner], holdout: list[Image.Image],
             device: list[Image.Image]) -> dict[str, dict[str, float]]:
    out = {}
    for label, images in (("held-out", holdout), ("easy-VQA test", device)):
        pixels = preprocess(images)  # (N, 3, 224, 224)
        reference = runners["fp32 torch"](pixels)
        for name, run in runners.items():
            if name != "fp32 torch":
                cos = torch.cosine_similarity(run(pixels), reference, dim=-1)  # (N, V)
                out[f"{name} / {label} ({len(images)})"] = {
                    "mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4)}
    return out


def _footprint(base: LoadedBase, bundle: Path, work: Path) -> dict[str, Any]:
    """On-disk bytes: the bundle (and with an int8 embedder) vs the whole MLLM."""
    save_embedder(base.edge.embedder, work / "embedder-int8.safetensors", "int8")
    int8_rows = load_embedder(work / "embedder-int8.safetensors", "int8").weight  # (vocab, d)
    row_cos = torch.cosine_similarity(int8_rows, base.edge.embedder.weight, dim=-1)  # (vocab,)
    files = {p.name: p.stat().st_size for p in bundle.iterdir()}
    int8_embedder_total = (sum(files.values()) - files[EMBEDDER_NAME]
                           + (work / "embedder-int8.safetensors").stat().st_size)
    records = base.manifest["files"]
    full = (sum(r["size"] for r in records["llm"]) + records["encoder_weights"]["size"]
            + records["connector"]["size"])
    bundle_total = sum(files.values())
    return {
        "bundle_files_mb": {name: _mb(size) for name, size in sorted(files.items())},
        "bundle_mb": _mb(bundle_total),
        "bundle_int8_embedder_mb": _mb(int8_embedder_total),
        "full_mllm_mb": _mb(full),
        "bundle_vs_full": round(bundle_total / full, 4),
        "bundle_int8_embedder_vs_full": round(int8_embedder_total / full, 4),
        "int8_embedder_row_cosine": {"mean": round(float(row_cos.mean()), 5),
                                     "min": round(float(row_cos.min()), 5)},
    }


def _mb(size: int) -> float:
    return round(size / 1e6, 2)


def _print(report: dict[str, Any]) -> None:
    print(f"\nlatency, batch {report['batch']}, {report['threads']} threads, "
          f"{report['repeats']} interleaved runs")
    print("| model | median ms | p90 ms | speed-up vs fp32 onnx | min ms | speed-up (min) |")
    print("|---|---|---|---|---|---|")
    for name, row in report["latency_ms"].items():
        print(f"| {name} | {row['median']} | {row['p90']} | {row['speedup_vs_fp32_onnx']}x "
              f"| {row['min']} | {row['speedup_min_vs_fp32_onnx']}x |")
    print("\n| cosine per visual token vs fp32 torch | mean | min |\n|---|---|---|")
    for name, row in report["cosine"].items():
        print(f"| {name} | {row['mean']} | {row['min']} |")
    print("\n| file | MB |\n|---|---|")
    for name, size in report["size_mb"].items():
        print(f"| {name} | {size} |")
    print(json.dumps(report["footprint"], indent=2))


if __name__ == "__main__":
    main()
