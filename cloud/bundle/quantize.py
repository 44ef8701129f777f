"""Static int8 QDQ per execution-provider target: the recipes and onnxruntime's quantizer.

The recipes (``RECIPES``): the CPU graph has asymmetric uint8 activations, which onnxruntime's
x86 CPU kernels fuse fully (faster than fp32 there, see docs/bundle.md) but TensorRT refuses;
the TensorRT graph has int8 activations with zero points of 0, the only QDQ form TensorRT (the
Jetson provider) runs, and slower than fp32 on onnxruntime's x86 CPU kernels.

Machine independence: on x86 CPUs without VNNI onnxruntime multiplies uint8 by int8 with
``vpmaddubsw``, whose 16-bit pairwise sums saturate; the CPU graph therefore has 7-bit weights
(``reduce_range``), which cannot saturate and give the same tokens with or without VNNI (the
TensorRT graph's side of this is its gate's: ``cloud.bundle.gate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from tqdm import tqdm

from cloud.bundle.onnx_export import INPUT_NAME
from shared.bundle import Activations, CalibrationInfo, EncoderTarget

if TYPE_CHECKING:
    from cloud.bundle.parts import ExportOptions

CalibrationMethod = Literal["MinMax", "Percentile", "Entropy"]


@dataclass(frozen=True)
class QuantRecipe:
    """How one target's int8 graph is made (static QDQ, symmetric int8 weights)."""

    activations: Activations
    method: CalibrationMethod = "MinMax"
    per_channel: bool = True  # weight scales per output channel (else one per tensor)
    reduce_range: bool = False  # 7-bit weights: no u8 x s8 saturation on x86 without VNNI


# Measured on the real base (docs/bundle.md, benchmarks/encoder_int8.py): per target, the
# recipe that is fastest on its provider among those that pass the gate.
RECIPES: dict[EncoderTarget, QuantRecipe] = {
    # u8 activations: onnxruntime's x86 kernels fuse the whole graph into QLinearConv; 7-bit
    # weights so that those kernels cannot saturate on CPUs without VNNI (module doc).
    "cpu": QuantRecipe(activations="u8", reduce_range=True),
    # zero points of 0: the only QDQ form TensorRT builds engines from.
    "tensorrt": QuantRecipe(activations="s8-symmetric"),
}


def quantize_int8(
    fp32: Path, out: Path, pixels: torch.Tensor, options: ExportOptions,
    op_types: Sequence[str] | None = None, *, recipe: QuantRecipe = RECIPES["tensorrt"],
) -> Path:
    """Static QDQ int8, per-channel weights, calibrated on ``pixels`` (N, 3, S, S) by ``recipe``.

    ``op_types`` limits quantization to those ops (default: all that onnxruntime knows).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(f"{out.stem}.prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    reader = _CalibrationReader(pixels, options.batch_size, options.progress)
    symmetric = recipe.activations == "s8-symmetric"
    quantize_static(
        str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
        per_channel=recipe.per_channel,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types) if op_types else None,
        reduce_range=recipe.reduce_range,
        calibrate_method=CalibrationMethod[recipe.method],
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    reader.close()
    prepared.unlink()
    return out


def calibration_record(
    n_images: int, recipe: QuantRecipe, ops: Sequence[str] | None, source: str,
) -> CalibrationInfo:
    """The manifest's ``calibration`` record of a graph quantized by ``recipe``."""
    return CalibrationInfo(
        n_images=n_images, source=source, method=recipe.method,
        format=f"QDQ on {', '.join(ops)}" if ops else "QDQ", per_channel=recipe.per_channel,
        activations=recipe.activations,
        weights=("s7 (reduce_range)" if recipe.reduce_range else "s8") + "-symmetric per "
        + ("channel" if recipe.per_channel else "tensor"))


class _CalibrationReader:
    """onnxruntime ``CalibrationDataReader``: ``get_next`` feeds batches, then None."""

    def __init__(self, pixels: torch.Tensor, batch_size: int, progress: bool) -> None:
        self._batches = iter(pixels.split(batch_size))
        self._bar = tqdm(total=len(pixels), desc="int8 calibration", unit="img",
                         disable=not progress)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self._bar.update(len(batch))
        return {INPUT_NAME: batch.numpy()}

    def close(self) -> None:
        self._bar.close()
