"""The fp32 encoder + connector graph: one module ``pixels -> visual_tokens`` exported to ONNX.

Every graph of a bundle has the same input and output names and opset (the manifest's
``model`` record); a Hugging Face tower goes through optimum instead (``cloud.bundle.hf``) but
ends in the same names. ``finalize_onnx`` makes any written graph loadable by older device
runtimes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.vision import IMAGE_SIZE

INPUT_NAME = "pixels"
OUTPUT_NAME = "visual_tokens"
OPSET = 18


class EncoderConnector(nn.Module):
    """Encoder and connector as one module: the graph exported to ONNX."""

    def __init__(self, encoder: nn.Module, connector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, V, d)
        return self.connector(self.encoder(pixels))


def export_onnx(module: nn.Module, path: Path, image_size: int = IMAGE_SIZE) -> Path:
    """``torch.onnx.export`` (dynamo) of ``module``: pixels -> visual tokens, dynamic batch.

    The example batch is 2: the dynamo exporter failed on batch 1 ("Invalid ranges").
    """
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamo=True, external_data=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
            dynamic_shapes=({0: batch},), verbose=False,
        )
    return path


def finalize_onnx(path: Path) -> None:
    """Drop opset imports no node uses and lower the IR version to the least the opsets need.

    onnxruntime's quantizer declares every domain it knows and writes its own IR version;
    older device runtimes (Jetson wheels lag PyPI) refuse IR versions they do not know.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    used = {node.domain or "" for node in model.graph.node}
    keep = [op for op in model.opset_import if (op.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    model.ir_version = min(model.ir_version, helper.find_min_ir_version_for(keep))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
