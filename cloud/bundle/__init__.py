"""Export the NanoEdge bundle: what a device needs of the frozen base, checked and versioned.

``export_bundle(base, out_dir, ...)`` writes ``out_dir/<bundle_version>/``: the files, the
manifest and the version id of ``shared.bundle`` (the format both sides import). It holds one
encoder + connector graph per execution-provider target (``encoder_connector.cpu.onnx``,
``encoder_connector.tensorrt.onnx``; one ``encoder_connector.onnx`` for fp32), each with a
dynamic batch, int8 static QDQ with per-channel weights.

Steps, a module each: export encoder + connector with ``torch.onnx.export`` (dynamo,
``onnx_export``), or with the parts' own ``export_graph`` (Hugging Face vision towers through
optimum: ``hf``) -> per target, quantize with onnxruntime's ``quantize_static`` by that
target's ``QuantRecipe`` on the calibration images (``quantize``, ``images``) -> that graph's
quality gate: cosine of its tokens vs fp32 torch on held-out images (``gate``) -> the other
files and the manifest (``files``). ``export`` runs them in order and publishes the folder
only when every gate passed; ``parts`` holds what an export takes.

The device side is ``edge.runtime`` (a round-trip test loads every exported bundle with it).
The command line is ``fednano bundle export`` (``export_from_home``). ``hf`` is not imported
here: it needs optimum, which only LLaVA-style bases do.
"""

from cloud.bundle.export import export_bundle, export_from_home, export_parts
from cloud.bundle.gate import (
    CPU_PROVIDERS,
    GATE_FUSED,
    GatedGraph,
    GateResult,
    QualityGateError,
    cpu_session,
    quality_gate,
    run_session,
)
from cloud.bundle.images import base_public_images, check_images, image_digest, public_images
from cloud.bundle.onnx_export import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    EncoderConnector,
    export_onnx,
    finalize_onnx,
)
from cloud.bundle.parts import BundleParts, ExportOptions, parts_from_base, tokenizer_json
from cloud.bundle.quantize import RECIPES, CalibrationMethod, QuantRecipe, quantize_int8

__all__ = [
    "CPU_PROVIDERS",
    "GATE_FUSED",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "RECIPES",
    "BundleParts",
    "CalibrationMethod",
    "EncoderConnector",
    "ExportOptions",
    "GateResult",
    "GatedGraph",
    "QualityGateError",
    "QuantRecipe",
    "base_public_images",
    "check_images",
    "cpu_session",
    "export_bundle",
    "export_from_home",
    "export_onnx",
    "export_parts",
    "finalize_onnx",
    "image_digest",
    "parts_from_base",
    "public_images",
    "quality_gate",
    "quantize_int8",
    "run_session",
    "tokenizer_json",
]
