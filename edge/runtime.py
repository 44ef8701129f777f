"""The device side of the NanoEdge bundle: verify it, open it (onnxruntime or OpenVINO), test it.

``load_bundle(path, providers)`` checks every file against ``manifest.json`` (size + sha256, and
the bundle version against the manifest's content), picks the encoder graph made for the
provider that will really run it (the TensorRT graph when TensorRT is the first available
provider, the CPU graph otherwise, or the profile's ``runtime.encoder``), opens it with the
first available providers of the device profile (TensorRT -> CUDA -> CPU, logging what was
chosen), loads the tokenizer with ``tokenizers`` and the token embedder with safetensors, and
assembles a ``NanoEdge`` whose "encoder" is that session (its connector is the identity: the
graph already includes it). ``NanoEdgeRuntime.self_test()`` runs a real
inference on the bundle's self-test image and compares it with the fp32 tokens shipped next to
it: run it at start-up, before joining a round.

The format itself (file names, manifest, version id, hashes, the tar layout) is
``shared.bundle``, which ``cloud.bundle`` writes with. No transformers, no torch.onnx and nothing
from ``cloud`` here: a device installs torch, onnxruntime, tokenizers and safetensors only.
``verify_bundle``, ``unpack_bundle`` and the bundle errors come from ``shared.bundle`` and are
importable from here, so device code finds the whole bundle API in one module.

A profile may name OpenVINO as its engine (``runtime.engine: openvino``): OpenVINO's CPU runtime
then reads the same CPU graph (QDQ ONNX) instead of onnxruntime, faster on the x86 CPU it was
measured on at the batches a ``sim-cpu`` device encodes (docs/bundle.md). Without the
``openvino`` package, or when OpenVINO cannot compile the graph, the device logs it and runs
onnxruntime, as it skips a provider its onnxruntime lacks. Either engine's failures while
running surface as ``EncoderError`` (one line, not a traceback).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from shared.adapters import AdapterConfig
from shared.bundle import (
    ADAPTER_CONFIG_NAME,
    EMBEDDER_NAME,
    SELFTEST_TENSOR,
    TEMPLATE_NAME,
    TOKENIZER_NAME,
    BundleError,
    BundleManifest,
    EncoderError,
    EncoderTarget,
    EncoderVariant,
    load_embedder,
    verify_bundle,
)
from shared.bundle import BundleIntegrityError as BundleIntegrityError
from shared.bundle import unpack_bundle as unpack_bundle
from shared.nanoedge import NanoEdge
from shared.prompts import HFTokenizer, PromptTemplate
from shared.vision import preprocess

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from edge.profiles import RuntimeSettings

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
OPENVINO_CPU = "OpenVINO:CPU"  # what an encoder run by OpenVINO reports as its provider
Engine = Literal["onnxruntime", "openvino"]

ProviderSpec = str | tuple[str, dict[str, Any]]  # a name or (name, options)


class SelfTestError(BundleError):
    """The start-up inference gave wrong shapes, non-finite values or drifted tokens."""


# ------------------------------------------------------------------------------ providers


def choose_providers(
    requested: Sequence[ProviderSpec], available: Sequence[str] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The requested providers this onnxruntime build has, in order; CPU when none is left."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    pairs = [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in requested]
    chosen = [(name, options) for name, options in pairs if name in available]
    skipped = [name for name, _ in pairs if name not in available]
    if skipped:
        log.warning("onnxruntime here lacks %s (available: %s)", skipped, list(available))
    if not chosen:
        chosen = [(CPU_PROVIDER, {})]
    log.info("onnxruntime providers: %s", [name for name, _ in chosen])
    return chosen


def open_session(
    model: Path, providers: Sequence[ProviderSpec], *, intra_op_threads: int = 0,
) -> InferenceSession:
    """An onnxruntime session on the first available ``providers`` (logs what really runs)."""
    import onnxruntime

    chosen = choose_providers(providers)
    for name, options in chosen:
        if name == TENSORRT_PROVIDER and options.get("trt_engine_cache_path"):
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    names = [name for name, _ in chosen]
    try:
        session = onnxruntime.InferenceSession(
            str(model), session_options, providers=names,
            provider_options=[options for _, options in chosen],
        )
    except onnxruntime_errors() as err:
        raise BundleError(f"onnxruntime cannot open {model.name} on {names}: {err}") from err
    log.info("encoder session runs on %s", session.get_providers())
    return session


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exception classes of onnxruntime's C++ core (``Fail``, ``EPFail``, ``InvalidGraph``...).

    They derive from ``Exception`` only and differ between onnxruntime releases, so they are
    collected from the module that defines them, to be caught precisely.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(value for value in vars(state).values()
                 if isinstance(value, type) and issubclass(value, Exception))


class OpenVinoSession:
    """OpenVINO's CPU runtime behind the two session calls ``OnnxEncoder`` makes (``run``,
    ``get_providers``), on a graph OpenVINO compiled from the bundle's ONNX file."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._lock = threading.Lock()  # one compiled model has one implicit infer request

    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            try:  # share_outputs=False: arrays of their own, not views the next run overwrites
                results = self._compiled(feed, share_outputs=False)
            except RuntimeError as err:
                raise EncoderError(f"OpenVINO inference failed: {_last_line(err)}") from err
            return [results[self._compiled.output(name)] for name in output_names]

    def get_providers(self) -> list[str]:
        return [OPENVINO_CPU]


def open_openvino_session(model: Path, *, threads: int = 0) -> OpenVinoSession | None:
    """``model`` compiled by OpenVINO for this CPU; None when the ``openvino`` package is not
    installed (the caller then uses onnxruntime)."""
    try:
        import openvino
    except ImportError:
        return None
    # f32: the float parts of the graph are computed as onnxruntime does, whatever the CPU
    # (OpenVINO's default is bf16 on CPUs that have it); measured no slower (docs/bundle.md).
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                              "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
    except RuntimeError as err:
        raise BundleError(f"OpenVINO cannot open {model.name}: {_last_line(err)}") from err
    log.info("encoder runs on OpenVINO %s (CPU)", openvino.__version__)
    return OpenVinoSession(compiled)


def _last_line(err: Exception) -> str:
    """OpenVINO's messages carry C++ source locations on their first lines; the cause is last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class OnnxEncoder(nn.Module):
    """An encoder session (onnxruntime's, or ``OpenVinoSession``) as a frozen module:
    pixels (B, 3, S, S) -> tokens (B, V, d); a failed run raises ``EncoderError``."""

    def __init__(self, session: InferenceSession | OpenVinoSession, input_name: str,
                 output_name: str, batch_size: int = 8) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.session = session
        self.input_name = input_name
        self.output_name = output_name
        self.batch_size = batch_size

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, V, d)
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        chunks = [self._run(chunk) for chunk in pixels.split(self.batch_size)]
        return torch.cat(chunks)

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: pixels.detach().float().contiguous().numpy()}
        try:
            (tokens,) = self.session.run([self.output_name], feed)
        except onnxruntime_errors() as err:
            raise EncoderError(f"onnxruntime inference failed: {err}") from err
        return torch.from_numpy(np.asarray(tokens, dtype=np.float32))


# -------------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class SelfTestReport:
    """What ``NanoEdgeRuntime.self_test`` measured."""

    shape: tuple[int, ...]
    min_cosine: float
    mean_cosine: float
    threshold: float
    latency_ms: float
    providers: tuple[str, ...]


@dataclass
class NanoEdgeRuntime:
    """A verified bundle, opened: ONNX encoder + connector, tokenizer, embedder, adapters."""

    folder: Path
    manifest: BundleManifest
    target: EncoderTarget  # which of the bundle's encoder graphs runs here
    encoder: OnnxEncoder
    tokenizer: HFTokenizer
    template: PromptTemplate
    adapter_config: AdapterConfig
    edge: NanoEdge

    @property
    def bundle_version(self) -> str:
        return self.manifest.bundle_version

    @property
    def variant(self) -> EncoderVariant:
        """The manifest's record of the encoder graph in use (file, calibration, gate)."""
        return self.manifest.encoders[self.target]

    @property
    def n_visual(self) -> int:
        return self.manifest.model.n_visual

    @property
    def providers(self) -> list[str]:
        return self.encoder.providers

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:  # -> (B, 3, S, S)
        """The bundle's preprocessing (RGB, bilinear resize, (x*255-127)/128)."""
        return preprocess(images, size=self.manifest.model.image_size)

    def visual_tokens(self, images: Sequence[Image.Image]) -> torch.Tensor:  # -> (B, V, d)
        """Frozen encoder + connector (onnxruntime or OpenVINO): what the feature cache stores."""
        return self.edge.visual_tokens(self.pixels(images))

    def self_test(self) -> SelfTestReport:
        """A real inference on the shipped image vs its fp32 tokens; ``SelfTestError`` if off."""
        info, variant = self.manifest.self_test, self.variant
        threshold = variant.quality_gate.threshold
        with Image.open(self.folder / info.image) as image:
            pixels = self.pixels([image])  # (1, 3, S, S)
        expected = load_file(str(self.folder / info.reference))[SELFTEST_TENSOR].float()  # (V, d)
        tokens, latency_ms = self._timed_tokens(pixels)  # (1, V, d)
        _check_tokens(tokens, (1, self.n_visual, self.manifest.model.width))
        cos = torch.cosine_similarity(tokens[0], expected, dim=-1)  # (V,)
        report = SelfTestReport(tuple(tokens.shape), float(cos.min()), float(cos.mean()),
                                threshold, latency_ms, tuple(self.providers))
        if report.min_cosine < threshold:
            raise SelfTestError(
                f"self-test of the {self.target} graph on {report.providers}: token cosine to "
                f"fp32 min {report.min_cosine:.4f} < {threshold:.4f} (CPU gave "
                f"{variant.self_test_cosine:.4f} at export); this provider mis-runs the bundle")
        log.info("self-test of the %s graph passed on %s: cosine min %.4f, %.1f ms",
                 self.target, report.providers, report.min_cosine, latency_ms)
        return report

    def _timed_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(1, 3, S, S) -> (1, V, d) and milliseconds; inference failures -> SelfTestError."""
        started = time.perf_counter()
        try:
            tokens = self.edge.visual_tokens(pixels)  # (1, V, d)
        except EncoderError as err:
            raise SelfTestError(f"self-test: inference failed on {self.providers}: {err}") from err
        return tokens, (time.perf_counter() - started) * 1e3


def _check_tokens(tokens: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tokens.shape) != shape:
        raise SelfTestError(f"self-test: visual tokens shape {tuple(tokens.shape)}, "
                            f"expected {shape}")
    if not bool(torch.isfinite(tokens).all()):
        raise SelfTestError("self-test: visual tokens contain NaN or Inf")


def load_bundle(
    path: Path,
    providers: Sequence[ProviderSpec] = (CPU_PROVIDER,),
    *,
    target: EncoderTarget | None = None,
    intra_op_threads: int = 0,
    batch_size: int = 8,
    self_test: bool = True,
    engine: Engine = "onnxruntime",
) -> NanoEdgeRuntime:
    """Verify and open the bundle folder ``path``; runs ``self_test()`` unless told not to.

    ``providers`` are onnxruntime provider names or ``(name, options)`` pairs in priority
    order (``RuntimeSettings.ort_providers(state_dir)`` gives them); the ones this onnxruntime
    build lacks are skipped, with CPU as the last resort. ``target`` picks the encoder graph;
    None: the one made for the first provider that is really available (``encoder_target``).
    ``engine="openvino"`` runs the CPU graph on OpenVINO instead (onnxruntime, with a warning,
    when the ``openvino`` package is missing); it takes no other provider or graph.
    """
    folder = Path(path)
    manifest = verify_bundle(folder)
    model = manifest.model
    chosen = choose_providers(providers)
    target = target or encoder_target([name for name, _ in chosen])
    variant = manifest.encoders[target]
    log.info("bundle %s: %s encoder graph %s (%s activations)", manifest.bundle_version, target,
             variant.file, variant.calibration.activations or "fp32")
    session = _open_encoder(folder / variant.file, chosen, engine, target, intra_op_threads)
    encoder = OnnxEncoder(session, model.input, model.output, batch_size=batch_size)
    embedder = load_embedder(folder / EMBEDDER_NAME, manifest.embedder.dtype)
    if (embedder.num_embeddings, embedder.embedding_dim) != (model.vocab_size, model.width):
        raise BundleError(f"embedder is {tuple(embedder.weight.shape)}, manifest says "
                          f"({model.vocab_size}, {model.width})")
    config = AdapterConfig.model_validate_json((folder / ADAPTER_CONFIG_NAME).read_bytes())
    runtime = NanoEdgeRuntime(
        folder=folder, manifest=manifest, target=target, encoder=encoder,
        tokenizer=HFTokenizer.from_file(str(folder / TOKENIZER_NAME)),
        template=_read_template(folder / TEMPLATE_NAME), adapter_config=config,
        edge=NanoEdge(nn.Identity(), embedder, config, encoder=encoder),
    )
    _warn_tensorrt_u8(runtime)
    if self_test:
        runtime.self_test()
    return runtime


def _open_encoder(
    model: Path, providers: list[tuple[str, dict[str, Any]]], engine: Engine,
    target: EncoderTarget, threads: int,
) -> InferenceSession | OpenVinoSession:
    if engine == "openvino":
        names = [name for name, _ in providers]
        if target != "cpu" or names != [CPU_PROVIDER]:
            raise BundleError(f"OpenVINO runs the cpu graph on the CPU alone, not the {target} "
                              f"graph on {names}")
        try:
            session = open_openvino_session(model, threads=threads)
        except BundleError as err:
            log.warning("%s: the encoder runs on onnxruntime instead", err)
        else:
            if session is not None:
                return session
            log.warning("the profile's engine is openvino but the openvino package is not "
                        "installed here: the encoder runs on onnxruntime (pip install openvino)")
    return open_session(model, providers, intra_op_threads=threads)


def encoder_target(providers: Sequence[str]) -> EncoderTarget:
    """The graph for these (available, ordered) providers: TensorRT's if it comes first.

    onnxruntime assigns each node to the first provider that takes it, so the first provider
    runs the graph; with CUDA first the QDQ graph runs as float kernels either way, and the
    CPU graph is the one whose leftovers run fastest on the CPU.
    """
    return "tensorrt" if providers and providers[0] == TENSORRT_PROVIDER else "cpu"


def _warn_tensorrt_u8(runtime: NanoEdgeRuntime) -> None:
    if TENSORRT_PROVIDER in runtime.providers and (
            runtime.variant.calibration.activations == "u8"):
        log.warning("bundle %s: the %s graph has asymmetric u8 activations, which TensorRT does "
                    "not run; use the tensorrt graph (profile runtime.encoder) on Jetson devices",
                    runtime.bundle_version, runtime.target)


def load_bundle_for_profile(
    path: Path, runtime: RuntimeSettings, state_dir: Path, *, self_test: bool = True,
) -> NanoEdgeRuntime:
    """``load_bundle`` with the providers, encoder graph, threads and batch of a profile."""
    loaded = load_bundle(path, runtime.ort_providers(state_dir),
                         target=None if runtime.encoder == "auto" else runtime.encoder,
                         intra_op_threads=runtime.intra_op_threads,
                         batch_size=runtime.batch_size, self_test=self_test,
                         engine=runtime.engine)
    if loaded.manifest.precision != runtime.precision:
        log.warning("profile precision is %s but the bundle's model is %s: it runs as exported",
                    runtime.precision, loaded.manifest.precision)
    return loaded


def _read_template(path: Path) -> PromptTemplate:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return PromptTemplate(**data)
    except TypeError as err:
        raise BundleError(f"{path}: not a prompt template: {err}") from err
