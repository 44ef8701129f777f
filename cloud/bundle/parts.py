"""What an export takes: the frozen device-side parts of a base and the options.

``BundleParts`` is the same however the base was loaded (tests pass tiny models, LLaVA-style
bases come from ``cloud.bundle.hf``); ``ExportOptions`` refuses nonsense when built, so a CLI
can report a bad option before loading anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from cloud.bundle.quantize import RECIPES, QuantRecipe
from shared.adapters import AdapterConfig
from shared.bundle import ENCODER_TARGETS, EmbedderDtype, EncoderTarget, Precision
from shared.prompts import PromptTemplate
from shared.vision import IMAGE_SIZE

if TYPE_CHECKING:
    from cloud.base.build import LoadedBase


@dataclass
class BundleParts:
    """What a bundle is made of, however the base was loaded (tests pass tiny models)."""

    encoder: nn.Module  # (B, 3, S, S) -> (B, C, H, W), frozen
    connector: nn.Module  # (B, C, H, W) -> (B, V, d), frozen
    embedder: nn.Embedding  # (vocab, d)
    tokenizer_json: str  # a ``tokenizers.Tokenizer`` serialised with ``to_str()``
    template: PromptTemplate
    adapter_config: AdapterConfig
    base_version: str
    encoder_name: str = "encoder"
    image_size: int = IMAGE_SIZE
    # Writes the fp32 graph pixels -> visual tokens to the given path; None: torch.onnx.export
    # of ``EncoderConnector(encoder, connector)``. Hugging Face towers go through optimum
    # (``cloud.bundle.hf``); ``encoder`` and ``connector`` stay the fp32 reference of the gate.
    export_graph: Callable[[Path], Path] | None = None
    # Op types to quantize (their inputs get QDQ); None: every op onnxruntime's quantizer knows.
    quantize_ops: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ExportOptions:
    """How to export: precision, gates, embedder storage, calibration and output details.

    ``min_cosine`` is every graph's gate unless ``tensorrt_min_cosine`` sets the TensorRT
    graph's own.
    """

    precision: Precision = "int8"
    min_cosine: float = 0.97
    tensorrt_min_cosine: float | None = None
    embedder_dtype: EmbedderDtype = "float16"
    recipes: Mapping[EncoderTarget, QuantRecipe] = dataclasses.field(
        default_factory=lambda: dict(RECIPES))
    batch_size: int = 8  # calibration and gate batches
    archive: bool = False  # also write out_dir/<version>.tar
    progress: bool = True
    calibration_source: str = "caller-provided public images"

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp32"):
            raise ValueError(f"precision must be 'int8' or 'fp32', got {self.precision!r}")
        if self.embedder_dtype not in ("float16", "int8"):
            raise ValueError(
                f"embedder_dtype must be 'float16' or 'int8', got {self.embedder_dtype!r}")
        if set(self.recipes) != set(ENCODER_TARGETS):
            raise ValueError(f"recipes must cover {list(ENCODER_TARGETS)}, got "
                             f"{sorted(self.recipes)}")
        for name in ("min_cosine", "tensorrt_min_cosine"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")

    def threshold(self, target: EncoderTarget) -> float:
        """The quality gate of ``target``'s graph."""
        if target == "tensorrt" and self.tensorrt_min_cosine is not None:
            return self.tensorrt_min_cosine
        return self.min_cosine


def parts_from_base(base: LoadedBase) -> BundleParts:
    """The frozen device-side parts of a loaded base (encoder, connector, embedder, ...)."""
    encoder = base.edge.encoder
    if encoder is None:
        raise ValueError("the base's NanoEdge has no encoder attached; load it with its encoder")
    return BundleParts(
        encoder=encoder, connector=base.connector, embedder=base.edge.embedder,
        tokenizer_json=tokenizer_json(base.pretrained.tokenizer), template=base.template,
        adapter_config=base.edge.adapters.config, base_version=base.version,
        encoder_name=base.pretrained.encoder_name,
    )


def tokenizer_json(tokenizer: object) -> str:
    """A ``tokenizers`` JSON string from a ``tokenizers.Tokenizer`` or a fast HF tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.to_str()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend.to_str()
    raise ValueError(
        "the bundle needs a fast tokenizer (tokenizers.Tokenizer or a transformers "
        f"PreTrainedTokenizerFast), got {type(tokenizer).__name__}"
    )
