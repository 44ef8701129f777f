"""Split a multimodal LLM into NanoEdge (device) and the frozen LLM (cloud).

The same :class:`~shared.nanoedge.NanoEdge` serves every base model: what changes is where the
encoder, connector, token embeddings, decoder and LM head live inside the model.

- :func:`split_causal_lm`: any Hugging Face ``*ForCausalLM`` plus an encoder and a connector (the
  default FedNano base: EfficientNet-Lite0 + ``PoolingConnector`` + SmolLM2).
- :func:`split_llava`: LLaVA-style models (``vision_tower`` / ``multi_modal_projector`` /
  ``language_model`` / ``lm_head``, e.g. ``LlavaForConditionalGeneration``). The encoder,
  :class:`LlavaVisionEncoder`, selects vision features exactly as ``get_image_features`` does.
- :func:`split_blip2`: BLIP-2-style models (ViT + Q-Former + ``language_projection``), the
  architecture of MiniGPT-4, with :class:`QFormerEncoder` as the encoder.

The device gets a frozen *copy* of the LLM's input embeddings (the cloud keeps its own, tied or
not); every other module is shared with ``model``, not copied, and is frozen in place.
Prompts must hold as many image slots as the encoder yields tokens: see
:func:`visual_token_count` and :func:`image_placeholder_template`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cloud.llm_backend import InProcessLLM
from shared.adapters import AdapterConfig
from shared.nanoedge import NanoEdge
from shared.prompts import PromptTemplate

SELECT_STRATEGIES = ("default", "full")  # LLaVA: "default" drops the CLS token, "full" keeps it
TEXT_TOKEN_BUDGET = 512  # text tokens allowed on top of the image slots (InProcessLLM.max_tokens)


class LlavaVisionEncoder(nn.Module):
    """Vision tower + LLaVA's feature selection: pixels (B, 3, H, W) -> features (B, N, C * k).

    ``feature_layer`` indexes the tower's ``hidden_states`` (index 0 is the embedding output);
    a sequence of k layers concatenates their features on the channel axis. Strategy
    ``"default"`` drops the first (CLS) token of each selected layer, ``"full"`` keeps it.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        feature_layer: int | Sequence[int] = -2,
        select_strategy: str = "default",
    ) -> None:
        super().__init__()
        if select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"select_strategy must be one of {SELECT_STRATEGIES}, got {select_strategy!r}"
            )
        layers = (feature_layer,) if isinstance(feature_layer, int) else tuple(feature_layer)
        if not layers:
            raise ValueError(f"feature_layer must name at least one layer, got {feature_layer!r}")
        self.vision_tower = vision_tower
        self.feature_layers = layers
        self.select_strategy = select_strategy

    @classmethod
    def from_llava(cls, model: nn.Module) -> LlavaVisionEncoder:
        """The encoder of a LLaVA-style model, configured from ``model.config``."""
        config: Any = model.config
        return cls(
            _child(model, "vision_tower"),
            config.vision_feature_layer,
            config.vision_feature_select_strategy,
        )

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image (N): the tower's positions, less CLS under "default"."""
        positions = _num_positions(self.vision_tower)
        return positions - 1 if self.select_strategy == "default" else positions

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, C * k)
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states
        picked = [hidden[layer] for layer in self.feature_layers]  # k x (B, 1 + P, C)
        return select_features(picked, self.select_strategy)


def select_features(picked: Sequence[torch.Tensor], select_strategy: str) -> torch.Tensor:
    """LLaVA's selection on the picked layers: k x (B, 1 + P, C) -> (B, N, C * k).

    ``"default"`` drops the first (CLS) position, ``"full"`` keeps it. Shared by
    :class:`LlavaVisionEncoder` and the bundle export (``cloud.bundle.hf``), which runs it as an
    ONNX graph on the tower's exported hidden states.
    """
    if select_strategy == "default":
        picked = [h[:, 1:] for h in picked]
    return torch.cat(list(picked), dim=-1)


class QFormerEncoder(nn.Module):
    """BLIP-2 / MiniGPT-4 front end: ViT, then learned queries cross-attending in the Q-Former.

    pixels (B, 3, H, W) -> query outputs (B, Q, C_q); the connector (``language_projection``)
    maps them to the LLM width. Mirrors ``Blip2ForConditionalGeneration.get_image_features``.
    """

    def __init__(self, vision_model: nn.Module, qformer: nn.Module, query_tokens: nn.Parameter):
        super().__init__()
        if query_tokens.dim() != 3 or query_tokens.shape[0] != 1:
            raise ValueError(f"query_tokens must be (1, Q, C), got {tuple(query_tokens.shape)}")
        self.vision_model = vision_model
        self.qformer = qformer
        self.query_tokens = query_tokens

    @classmethod
    def from_blip2(cls, model: nn.Module) -> QFormerEncoder:
        queries = _child(model, "query_tokens")
        return cls(_child(model, "vision_model"), _child(model, "qformer"), queries)

    @property
    def num_tokens(self) -> int:
        return int(self.query_tokens.shape[1])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, Q, C_q)
        image = self.vision_model(pixel_values=pixels, return_dict=True)[0]  # (B, P, C_v)
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # (B, Q, C_q)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        return out[0].to(image.dtype)


def frozen_embedding_copy(embedding: nn.Module) -> nn.Embedding:
    """A frozen copy of a plain ``nn.Embedding`` (same device and dtype; works on ``meta``).

    Embeddings whose ``forward`` does more than a lookup (e.g. Gemma's scaled embeddings) are
    refused: copying only the table would silently change the model.
    """
    if not isinstance(embedding, nn.Embedding) or _overrides_lookup(embedding):
        raise ValueError(f"expected a plain nn.Embedding for the token embedder, got {embedding!r}")
    copy = nn.Embedding.from_pretrained(
        embedding.weight.detach().clone(), freeze=True, padding_idx=embedding.padding_idx
    )
    return copy.eval()


def split_causal_lm(
    llm: nn.Module,
    connector: nn.Module,
    encoder: nn.Module | None,
    adapter_config: AdapterConfig,
    max_tokens: int = TEXT_TOKEN_BUDGET,
) -> tuple[NanoEdge, InProcessLLM]:
    """Split ``encoder -> connector`` + a ``*ForCausalLM`` into (NanoEdge, InProcessLLM).

    ``connector`` must output the LLM's width; the adapters are fresh (identity at start).
    """
    cloud = InProcessLLM.from_causal_lm(llm, max_tokens=max_tokens)
    embedder = frozen_embedding_copy(llm.get_input_embeddings())  # type: ignore[operator]
    if embedder.embedding_dim != cloud.width:
        raise ValueError(
            f"input embeddings are {embedder.embedding_dim} wide, the LLM is {cloud.width} wide"
        )
    return NanoEdge(connector, embedder, adapter_config, encoder=encoder), cloud


def split_llava(
    model: nn.Module, adapter_config: AdapterConfig, max_tokens: int | None = None
) -> tuple[NanoEdge, InProcessLLM]:
    """Split a LLaVA-style model: tower (+ feature selection) and projector go to the device.

    ``max_tokens`` defaults to the image's tokens plus ``TEXT_TOKEN_BUDGET``.
    """
    encoder = LlavaVisionEncoder.from_llava(model)
    config: Any = model.config
    width = int(config.get_text_config().hidden_size)
    limit = max_tokens if max_tokens is not None else encoder.num_tokens + TEXT_TOKEN_BUDGET
    cloud = InProcessLLM(
        decoder=model.get_decoder(),  # type: ignore[operator]
        lm_head=model.get_output_embeddings(),  # type: ignore[operator]
        width=width,
        max_tokens=limit,
    )
    embedder = frozen_embedding_copy(model.get_input_embeddings())  # type: ignore[operator]
    connector = _child(model, "multi_modal_projector")
    return NanoEdge(connector, embedder, adapter_config, encoder=encoder), cloud


def split_blip2(
    model: nn.Module, adapter_config: AdapterConfig, max_tokens: int | None = None
) -> tuple[NanoEdge, InProcessLLM]:
    """Split a BLIP-2-style model with a decoder-only LLM (MiniGPT-4's architecture)."""
    if not getattr(model.config, "use_decoder_only_language_model", False):
        raise ValueError(f"only decoder-only language models split, got {type(model).__name__}")
    encoder = QFormerEncoder.from_blip2(model)
    limit = max_tokens if max_tokens is not None else encoder.num_tokens + TEXT_TOKEN_BUDGET
    connector = _child(model, "language_projection")
    llm = _child(model, "language_model")
    return split_causal_lm(llm, connector, encoder, adapter_config, limit)


def visual_token_count(edge: NanoEdge) -> int:
    """Image slots a prompt needs for ``edge``: the encoder's or the connector's ``num_tokens``."""
    for module in (edge.encoder, edge.connector):
        count = getattr(module, "num_tokens", None)
        if isinstance(count, int):
            return count
    raise ValueError(f"neither {type(edge.encoder).__name__} nor "
                     f"{type(edge.connector).__name__} says how many visual tokens it yields")


def image_placeholder_template(config: Any, base: PromptTemplate | None = None) -> PromptTemplate:
    """``base`` with the model's image token as placeholder, so batches also feed the HF model.

    The placeholder's embedding is overwritten by the visual tokens, so any id in the vocabulary
    works; using the model's own ``image_token_id`` keeps batches identical to the processor's.
    """
    token = getattr(config, "image_token_id", None)
    vocab = int(config.get_text_config().vocab_size)
    if not isinstance(token, int) or not 0 <= token < vocab:
        raise ValueError(f"image_token_id must be in the {vocab}-token vocabulary, got {token!r}")
    return dataclasses.replace(base or PromptTemplate(), image_placeholder_id=token)


def _child(model: nn.Module, name: str) -> Any:
    module = getattr(model, name, None)
    if module is None:
        raise ValueError(f"{type(model).__name__} has no {name!r}: not a supported model layout")
    return module


def _overrides_lookup(embedding: nn.Embedding) -> bool:
    return type(embedding).forward is not nn.Embedding.forward


def _num_positions(tower: nn.Module) -> int:
    # CLIP/SigLIP-style towers: vision_model.embeddings.num_positions = patches (+ 1 for CLS).
    inner = getattr(tower, "vision_model", tower)
    positions = getattr(getattr(inner, "embeddings", None), "num_positions", None)
    if not isinstance(positions, int):
        raise ValueError(f"cannot tell the token count of {type(tower).__name__}: no num_positions")
    return positions
