"""NanoEdge bundles of LLaVA-style bases: the Hugging Face vision tower through optimum.

``llava_parts(model, tokenizer, ...)`` gives the ``BundleParts`` of a
``LlavaForConditionalGeneration``-style model (``cloud.split.split_llava``'s device side);
``cloud.bundle.export_parts`` then quantizes, gates and writes it like any other bundle. Only
the fp32 graph is made differently (``OptimumLlavaExport``), from three pieces merged into the
one graph ``pixels -> visual_tokens`` the bundle format and ``edge.runtime`` already know:

1. ``front``: two ONNX nodes (Mul, Add per channel) that turn the bundle's pixels
   (``shared.vision.preprocess``: ``(x*255 - 127) / 128``) into the tower's processor
   normalisation ``(x - mean) / std``. The device keeps one preprocessing for every base.
2. ``tower``: the vision tower exported by optimum's ONNX exporter (its per-architecture
   ``OnnxConfig`` and model patcher), with every hidden state as an output
   (``hidden_states.0`` is the embeddings, ``hidden_states.L`` the last layer).
3. ``head``: LLaVA's feature selection (``cloud.split.select_features``: picked layers, CLS
   dropped or kept, concatenated) + the ``multi_modal_projector``, by ``torch.onnx.export``.

The three are joined with ``onnx.compose`` and the nodes no output needs (layers after the
deepest selected one, the tower's post-layernorm and pooler) are pruned. Merging rather than
chaining two sessions on the device keeps the bundle format, the device loader and the self-test
unchanged, and gives TensorRT one graph to build one engine from.

Two checks: the fp32 graph must match ``PixelNormalize`` -> ``LlavaVisionEncoder`` -> projector
(the modules the cloud trains with) to ``FP32_RTOL`` on random pixels (``ExportMismatchError``),
then ``export_parts`` runs the quality gate on the quantized graph against the same modules.
Two optimum 2.1 quirks are worked around (``_with_model_forward``, ``export_tower``).
Weights never leave the process (no hub access); the tower must fit in one ONNX file (< 2 GB).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cloud.bundle.gate import cpu_session, run_session
from cloud.bundle.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME
from cloud.bundle.parts import BundleParts, tokenizer_json
from cloud.split import LlavaVisionEncoder, image_placeholder_template, select_features, split_llava
from shared.adapters import AdapterConfig
from shared.bundle import BundleError
from shared.prompts import PromptTemplate

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto

log = logging.getLogger(__name__)

PIXEL_VALUES = "pixel_values"  # the tower's input, as optimum names it
HIDDEN = "hidden_states.{}"  # the tower's outputs, one per hidden state
FP32_RTOL = 1e-3  # fp32 graph vs torch: max |error| / max |token|
# Transformer towers: QDQ on the inputs (and outputs) of these ops only, LayerNorm and GELU stay
# float. With every op onnxruntime knows quantized (the EfficientNet default), random-init
# ViT-B/16-sized towers fell to a token cosine min of 0.95 (CLIP) / 0.88 (SigLIP), below the
# gate; with these three, 0.998 / 0.997, same size (docs/bundle.md).
TRANSFORMER_QUANT_OPS = ("Conv", "MatMul", "Gemm")


class PixelNormalize(nn.Module):
    """Bundle pixels ``(x*255 - 127) / 128`` -> a processor's ``(x - mean) / std``, x in [0, 1].

    With ``p`` the bundle's value, ``x = (128 p + 127) / 255``, so the map is per channel
    ``p * scale + bias`` with ``scale = 128 / (255 std)`` and ``bias = (127/255 - mean) / std``.
    """

    scale: torch.Tensor  # (1, 3, 1, 1)
    bias: torch.Tensor  # (1, 3, 1, 1)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={mean!r}, std={std!r}")
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 128.0 / (255.0 * std_t))
        self.register_buffer("bias", (127.0 / 255.0 - mean_t) / std_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 3, S, S)
        return pixels * self.scale + self.bias


class LlavaHead(nn.Module):
    """Feature selection + projector on the tower's hidden states: the graph's last piece.

    ``forward`` takes the distinct hidden states the encoder selects (in ``inputs`` order) and
    returns visual tokens (B, N, d), as ``projector(LlavaVisionEncoder(...))`` would.
    """

    def __init__(self, encoder: LlavaVisionEncoder, projector: nn.Module, n_hidden: int) -> None:
        super().__init__()
        bad = [layer for layer in encoder.feature_layers if not -n_hidden <= layer < n_hidden]
        if bad:
            raise ValueError(f"feature layers {bad} are outside the tower's {n_hidden} hidden "
                             f"states")
        self.layers = [layer % n_hidden for layer in encoder.feature_layers]
        self.inputs = sorted(set(self.layers))  # hidden-state indices the graph needs
        self.select_strategy = encoder.select_strategy
        self.projector = projector

    @property
    def input_names(self) -> list[str]:
        return [HIDDEN.format(i) for i in self.inputs]

    def forward(self, *hidden: torch.Tensor) -> torch.Tensor:  # k' x (B, 1+P, C) -> (B, N, d)
        picked = [hidden[self.inputs.index(layer)] for layer in self.layers]
        return self.projector(select_features(picked, self.select_strategy))


@dataclasses.dataclass(frozen=True)
class OptimumLlavaExport:
    """``BundleParts.export_graph`` of a LLaVA-style base: front + optimum tower + head, merged.

    Called with a path, writes the fp32 graph ``pixels`` (B, 3, S, S) -> ``visual_tokens``
    (B, N, d), batch dynamic, opset ``OPSET``, one file; returns the path.
    """

    normalize: PixelNormalize
    encoder: LlavaVisionEncoder
    projector: nn.Module
    image_size: int

    def __call__(self, path: Path) -> Path:
        import onnx

        tower = self.encoder.vision_tower
        n_hidden = _num_hidden_states(tower)
        head = LlavaHead(self.encoder, self.projector, n_hidden).eval()
        pixels, expected = self._reference()  # before optimum has touched the tower
        with tempfile.TemporaryDirectory(prefix="fednano-optimum-") as tmp:
            tower_path = export_tower(tower, Path(tmp) / "tower.onnx", self.image_size, n_hidden)
            head_path = export_head(head, Path(tmp) / "head.onnx", self._hidden_example(head))
            model = compose(front_graph(self.normalize, self.image_size),
                            onnx.load(str(tower_path)), onnx.load(str(head_path)),
                            head.input_names)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        check_fp32_graph(Path(path), pixels, expected)
        log.info("optimum export of %s: %d nodes after pruning", type(tower).__name__,
                 len(model.graph.node))
        return Path(path)

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded random pixels (2, 3, S, S) and their fp32 torch tokens (2, N, d)."""
        size = self.image_size
        pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            return pixels, self.projector(self.encoder(self.normalize(pixels)))

    def _hidden_example(self, head: LlavaHead) -> list[torch.Tensor]:
        """The tower's hidden states the head reads, for a batch of 2 zero images."""
        pixels = self.normalize(torch.zeros(2, 3, self.image_size, self.image_size))
        with torch.no_grad():
            hidden = self.encoder.vision_tower(pixels, output_hidden_states=True).hidden_states
        return [hidden[i] for i in head.inputs]  # k' x (2, 1+P, C)


def llava_parts(
    model: nn.Module,
    tokenizer: object,
    *,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    adapter_config: AdapterConfig,
    base_version: str,
    template: PromptTemplate | None = None,
) -> BundleParts:
    """The bundle parts of a LLaVA-style model, its tower exported through optimum.

    ``image_mean`` / ``image_std`` are the tower's processor normalisation (a
    ``CLIPImageProcessor``'s ``image_mean`` / ``image_std``); ``tokenizer`` is a fast tokenizer.
    The prompt template gets the model's image token as placeholder.
    """
    edge, _ = split_llava(model, adapter_config)
    encoder = edge.encoder
    if not isinstance(encoder, LlavaVisionEncoder):
        raise ValueError(f"expected a LlavaVisionEncoder, got {type(encoder).__name__}")
    config: Any = model.config
    image_size = int(config.vision_config.image_size)
    normalize = PixelNormalize(image_mean, image_std)
    tower = encoder.vision_tower
    name = getattr(getattr(tower, "config", None), "model_type", None) or type(tower).__name__
    return BundleParts(
        encoder=nn.Sequential(normalize, encoder).eval(), connector=edge.connector,
        embedder=edge.embedder, tokenizer_json=tokenizer_json(tokenizer),
        template=image_placeholder_template(config, template), adapter_config=adapter_config,
        base_version=base_version, encoder_name=f"{name} (optimum)", image_size=image_size,
        export_graph=OptimumLlavaExport(normalize, encoder, edge.connector, image_size),
        quantize_ops=TRANSFORMER_QUANT_OPS,
    )


# ---------------------------------------------------------------------------------- pieces


class ExportMismatchError(BundleError):
    """The exported fp32 graph does not compute what the torch modules compute."""


def check_fp32_graph(
    path: Path, pixels: torch.Tensor, expected: torch.Tensor, rtol: float = FP32_RTOL,
) -> None:
    """``ExportMismatchError`` unless the graph's tokens for ``pixels`` match ``expected``.

    Tighter than the quality gate (a cosine, loose enough for int8): an fp32 graph that
    drifts from torch is an export bug, whatever its cosine.
    """
    got = run_session(cpu_session(path), pixels)  # (B, N, d)
    if got.shape != expected.shape:
        raise ExportMismatchError(f"exported graph gives {tuple(got.shape)}, torch gives "
                                  f"{tuple(expected.shape)}")
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not error <= rtol:
        raise ExportMismatchError(f"exported fp32 graph differs from torch: max error "
                                  f"{error:.2e} of the largest token value (allowed {rtol:.0e})")


def export_tower(tower: nn.Module, path: Path, image_size: int, n_hidden: int) -> Path:
    """optimum's ONNX export of a vision tower: ``pixel_values`` -> every hidden state.

    The tower's own ``OnnxConfig`` (model patcher, dummy inputs) with its outputs replaced by
    ``hidden_states.0 .. hidden_states.{n_hidden - 1}`` and only the batch left dynamic.
    """
    try:
        from optimum.exporters.onnx import export
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"exporting a Hugging Face vision tower needs optimum ({err.name} is missing): "
            'pip install "optimum==2.1.0" "optimum-onnx==0.1.0"') from err
    config = _hidden_states_config(tower, n_hidden)
    shapes = {"batch_size": 2, "num_channels": 3, "height": image_size, "width": image_size}
    own_forward = tower.__dict__.get("forward")  # normally None: the class's forward
    try:
        export(tower, config, Path(path), opset=OPSET, input_shapes=shapes,
               model_kwargs={"output_hidden_states": True})
    finally:  # optimum's patcher leaves its own forward on the model it exported
        if own_forward is None:
            tower.__dict__.pop("forward", None)
        else:
            tower.forward = own_forward
    return Path(path)


def _hidden_states_config(tower: nn.Module, n_hidden: int) -> Any:
    """The optimum ``OnnxConfig`` of ``tower`` (feature extraction), exporting hidden states."""
    from optimum.exporters.tasks import TasksManager

    if not isinstance(getattr(getattr(tower, "config", None), "model_type", None), str):
        raise ValueError(f"optimum cannot export {type(tower).__name__}: not a Hugging Face "
                         "model (no config.model_type)")
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            "onnx", model=tower, task="feature-extraction", library_name="transformers")
    except (KeyError, ValueError) as err:
        raise ValueError(f"optimum cannot export {type(tower).__name__}: {err}") from err
    base = type(constructor(tower.config))
    outputs = {HIDDEN.format(i): {0: "batch_size"} for i in range(n_hidden)}
    overrides = {"inputs": property(lambda self: {PIXEL_VALUES: {0: "batch_size"}}),
                 "outputs": property(lambda self: dict(outputs)),
                 "_MODEL_PATCHER": _with_model_forward(base._MODEL_PATCHER)}
    return type(f"HiddenStates{base.__name__}", (base,), overrides)(
        tower.config, task="feature-extraction")


def _with_model_forward(patcher: Any) -> type:
    """optimum's ``patcher``, tracing the model's own ``forward`` instead of optimum's copy.

    With transformers >= 4.54, optimum 2.1 replaces a forward wrapped in transformers'
    ``check_model_inputs`` with its traceable copy of that wrapper, which always ties the last
    hidden state to ``last_hidden_state``. SigLIP's wrapper does not
    (``tie_last_hidden_states=False``: its last hidden state is before the post-layernorm), so
    the copy exports ``hidden_states.L`` after the post-layernorm: a SigLIP LLaVA's layer -1
    would be wrong. (Its ``__exit__`` also leaves the copy on the model: ``export_tower``.)
    """
    def __init__(self: Any, config: Any, model: nn.Module, model_kwargs: Any = None) -> None:
        patcher.__init__(self, config, model, model_kwargs)
        self.orig_forward = getattr(model, self.orig_forward_name)

    return type(f"ModelForward{patcher.__name__}", (patcher,), {"__init__": __init__})


def export_head(head: LlavaHead, path: Path, example: Sequence[torch.Tensor]) -> Path:
    """``torch.onnx.export`` (dynamo) of the head: ``hidden_states.i`` -> ``visual_tokens``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            head, tuple(example), str(path), dynamo=True, external_data=False,
            input_names=head.input_names, output_names=[OUTPUT_NAME], opset_version=OPSET,
            dynamic_shapes=(tuple({0: batch} for _ in example),),  # one spec for *hidden
            verbose=False,
        )
    return Path(path)


def front_graph(normalize: PixelNormalize, image_size: int) -> ModelProto:
    """``pixels`` -> ``pixel_values``: the per-channel affine map of ``normalize`` in ONNX."""
    from onnx import TensorProto, helper, numpy_helper

    scale, bias = (buffer.detach().float().numpy() for buffer in (normalize.scale,
                                                                    normalize.bias))
    shape: list[str | int] = ["batch", 3, image_size, image_size]
    graph = helper.make_graph(
        [helper.make_node("Mul", [INPUT_NAME, "front/scale"], ["front/scaled"]),
         helper.make_node("Add", ["front/scaled", "front/bias"], [PIXEL_VALUES])],
        "pixel_normalize",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(PIXEL_VALUES, TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(scale, "front/scale"),
                     numpy_helper.from_array(bias, "front/bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def compose(
    front: ModelProto, tower: ModelProto, head: ModelProto, hidden_names: Sequence[str],
) -> ModelProto:
    """front -> tower -> head as one graph ``pixels -> visual_tokens``, dead nodes pruned."""
    from onnx import compose as onnx_compose
    from onnx import helper

    tower = onnx_compose.add_prefix(tower, "tower/", rename_inputs=False, rename_outputs=False)
    head = onnx_compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    ir_version = max(model.ir_version for model in (front, tower, head))
    for model in (front, tower, head):
        model.ir_version = ir_version
    merged = onnx_compose.merge_models(front, tower, io_map=[(PIXEL_VALUES, PIXEL_VALUES)])
    merged = onnx_compose.merge_models(merged, head, io_map=[(n, n) for n in hidden_names],
                                       outputs=[OUTPUT_NAME])
    prune(merged.graph)
    # merge_models lists the default domain once per input model ("" set and unset), which
    # onnxruntime's quantizer refuses; it has already checked that the versions agree.
    opsets = {op.domain or "": op.version for op in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(domain, version)
                               for domain, version in opsets.items())
    return merged


def prune(graph: GraphProto) -> None:
    """Drop the nodes, initializers and value infos no graph output depends on (in place)."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):  # nodes are topologically sorted
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(_node_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [info for info in graph.value_info if info.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _node_inputs(node: Any) -> Iterator[str]:
    """A node's inputs, including the outer names its subgraphs (If, Loop) read."""
    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
            for inner in graph.node:
                yield from _node_inputs(inner)


def _num_hidden_states(tower: nn.Module) -> int:
    """Hidden states a tower returns: its layers + the embedding output."""
    layers = getattr(getattr(tower, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise ValueError(f"cannot tell the layer count of {type(tower).__name__}: no "
                         "config.num_hidden_layers")
    return layers + 1
