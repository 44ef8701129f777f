"""The quality gate: each exported graph's visual tokens against fp32 torch on held-out images.

A graph whose least per-token cosine is below its threshold stops the export
(``QualityGateError``) before anything is published.

How each target's graph is run on the exporting machine (``GATE_FUSED``): the CPU graph as CPU
devices run it, onnxruntime with its fused int8 kernels; the TensorRT graph by the QDQ graph's
own arithmetic (graph optimizations off: DequantizeLinear -> float op -> QuantizeLinear), which
is what TensorRT computes with int32 accumulators. The exporter has no TensorRT, and the CPU's
fused kernels (which saturate without VNNI, ``cloud.bundle.quantize``) are not what TensorRT
runs, so the TensorRT gate does not depend on which machine exports the bundle either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from cloud.bundle.onnx_export import INPUT_NAME, OUTPUT_NAME
from shared.bundle import BundleError, CalibrationInfo, EncoderTarget, GateInfo, Precision
from shared.vision import IMAGE_SIZE, preprocess

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

CPU_PROVIDERS = ["CPUExecutionProvider"]

# Per target: True runs the gate with onnxruntime's fused CPU kernels, False by the unfused QDQ
# arithmetic (module docstring).
GATE_FUSED: dict[EncoderTarget, bool] = {"cpu": True, "tensorrt": False}


def gate_fused(target: EncoderTarget, precision: Precision) -> bool:
    """An fp32 graph has no QDQ arithmetic: one session, the fused one, for every target."""
    return precision == "fp32" or GATE_FUSED[target]


@dataclass(frozen=True)
class GateResult:
    """Cosine similarity per visual token of the exported encoder vs fp32 torch."""

    threshold: float
    mean: float
    min: float
    n_images: int
    n_tokens: int
    fused: bool = True  # onnxruntime's fused CPU kernels (else the unfused QDQ arithmetic)

    @property
    def passed(self) -> bool:
        return self.min >= self.threshold

    def info(self) -> GateInfo:
        """The manifest's ``quality_gate`` record."""
        how = ("onnxruntime CPU, fused int8 kernels" if self.fused
               else "QDQ arithmetic, onnxruntime unfused")
        return GateInfo(metric=f"cosine per visual token vs fp32 torch ({how})",
                        threshold=self.threshold,
                        mean=round(self.mean, 6), min=round(self.min, 6),
                        n_images=self.n_images, n_tokens=self.n_tokens, passed=self.passed)


class QualityGateError(BundleError):
    """An exported encoder graph is too far from fp32 torch; nothing was published."""

    def __init__(self, gate: GateResult, target: str = "") -> None:
        self.gate = gate
        self.target = target
        graph = f" of the {target} graph" if target else ""
        super().__init__(
            f"quality gate{graph} failed: cosine to fp32 on {gate.n_images} held-out images "
            f"mean {gate.mean:.4f}, min {gate.min:.4f} < threshold {gate.threshold:.4f}; "
            "bundle not published"
        )


@dataclass(frozen=True)
class GatedGraph:
    """One target's encoder graph that passed its gate, as the manifest records it."""

    file: str
    gate: GateResult
    calibration: CalibrationInfo


def quality_gate(
    reference: nn.Module, model: Path, images: Sequence[Image.Image], threshold: float,
    image_size: int = IMAGE_SIZE, *, batch_size: int = 8, progress: bool = True,
    label: str = "", fused: bool = True,
) -> GateResult:
    """Per-token cosine of ``model`` (onnxruntime, CPU) vs ``reference`` (fp32 torch).

    ``fused`` False runs the graph with onnxruntime's graph optimizations off: the QDQ
    arithmetic itself, the same on every machine (``GATE_FUSED``).
    """
    session = cpu_session(model, fused=fused)
    cosines = []
    bar = tqdm(total=len(images), desc=f"quality gate {label}".strip(), unit="img",
               disable=not progress)
    with bar, torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = preprocess(images[start:start + batch_size], size=image_size)  # (b,3,S,S)
            expected = reference(pixels)  # (b, V, d)
            got = run_session(session, pixels)  # (b, V, d)
            cosines.append(torch.cosine_similarity(got, expected, dim=-1).flatten())
            bar.update(len(pixels))
    cos = torch.cat(cosines)  # (N * V,)
    return GateResult(threshold=threshold, mean=float(cos.mean()), min=float(cos.min()),
                      n_images=len(images), n_tokens=int(cos.numel()), fused=fused)


def cpu_session(model: Path, *, fused: bool = True) -> InferenceSession:
    """An onnxruntime CPU session; ``fused`` False turns graph optimizations off."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not fused:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(model), options, providers=CPU_PROVIDERS)


def run_session(session: InferenceSession, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) float32 -> (B, V, d) float32 through an onnxruntime session."""
    (tokens,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
    return torch.from_numpy(np.asarray(tokens))
