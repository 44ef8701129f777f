"""The CPU graph with and without its depthwise convolutions quantized, on the real base.

Quantizes the encoder + connector graph twice with the CPU recipe (u8 activations, 7-bit
per-channel weights, MinMax, the bundle's 64 calibration images), once leaving every Conv with
``group > 1`` in float, then prints each graph's cosine to fp32 torch on the held-out images
and the median latency of 40 interleaved runs (1 thread) at batch 1 and 8.

    python benchmarks/encoder_depthwise.py [--home DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from cloud.base.build import load_base
from cloud.bundle import (
    RECIPES,
    EncoderConnector,
    ExportOptions,
    base_public_images,
    export_onnx,
    finalize_onnx,
    parts_from_base,
)
from cloud.bundle.quantize import _CalibrationReader
from cloud.layout import Layout
from shared.vision import preprocess

RECIPE = RECIPES["cpu"]  # u8 activations, 7-bit per-channel weights, MinMax


def quantize(prepared: Path, out: Path, pixels: torch.Tensor, exclude: list[str]) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = _CalibrationReader(pixels, ExportOptions().batch_size, False)
    quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
                    per_channel=RECIPE.per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=RECIPE.reduce_range,
                    nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finalize_onnx(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="FEDNANO_HOME (default: env)")
    parser.add_argument("--work", type=Path, default=None, help="keep the graphs here")
    args = parser.parse_args(argv)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = args.work or Path(tempfile.mkdtemp(prefix="encoder-depthwise-"))
    work.mkdir(parents=True, exist_ok=True)
    base = load_base(args.home or Layout.default().home, None)
    calibration, holdout = base_public_images(base, n_calibration=64, n_holdout=32)
    parts = parts_from_base(base)
    graph = EncoderConnector(parts.encoder, parts.connector).eval()
    fp32 = export_onnx(graph, work / "fp32.onnx", parts.image_size)
    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))
    nodes = onnx.load(str(prepared)).graph.node
    depthwise = [n.name for n in nodes if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    print(f"{sum(n.op_type == 'Conv' for n in nodes)} convolutions, {len(depthwise)} depthwise")
    pixels = preprocess(calibration, size=parts.image_size)
    models = {"fp32": fp32,
              "int8 (bundle CPU recipe)": quantize(prepared, work / "int8.onnx", pixels, []),
              "int8, depthwise in float": quantize(prepared, work / "int8-dw-float.onnx",
                                                   pixels, depthwise)}
    held = preprocess(holdout, size=parts.image_size)
    with torch.no_grad():
        reference = graph(held).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
                for name, path in models.items()}
    for name, session in sessions.items():
        got = session.run(None, {"pixels": held.numpy()})[0]
        cos = (got * reference).sum(-1) / (np.linalg.norm(got, axis=-1)
                                           * np.linalg.norm(reference, axis=-1))
        print(f"{name}: cosine to fp32 torch mean {cos.mean():.4f} min {cos.min():.4f}")
    for batch in (1, 8):
        x = held[:batch].numpy()
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(40):
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(None, {"pixels": x})
                times[name].append(time.perf_counter() - started)
        medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
        print(f"batch {batch}: " + ", ".join(
            f"{name} {ms:.2f} ms ({medians['fp32'] / ms:.2f}x)" for name, ms in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
