"""Build, version and load the frozen base MLLM (encoder + aligned connector + LLM).

``build_base`` runs: load the LLM (cached) -> load the encoder -> extract the pooled features of
the alignment images -> align the projector -> save ``connector.safetensors`` and
``manifest.json`` under ``home/base/<version>/`` and point ``home/base/current`` at it.
``load_base`` verifies the files against the manifest and assembles what the rest of FedNano uses:
a NanoEdge for devices, the in-process LLM backend, the tokenizer and the VQA prompt template.

Verification on load: the connector and the encoder weights are hashed in full (a few MB);
the LLM cache (~540 MB) passes on unchanged size + mtime and is hashed only when those differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cloud.base.align import (
    CAPTION_MIDDLE,
    INSTRUCTIONS,
    VQA_TEMPLATE,
    AlignConfig,
    align_connector,
)
from cloud.base.features import FeatureStore, feature_dir
from cloud.base.llm import LLM_DESCRIPTION, SOURCE_NAME, llm_cache_dir, load_llm
from cloud.base.manifest import (
    MANIFEST_NAME,
    BaseConfig,
    BaseFiles,
    BaseIntegrityError,
    BaseManifest,
    file_record,
    read_json,
    read_manifest,
    sha256_file,
    swap_in_dir,
    write_current,
    write_json,
)
from cloud.layout import Layout
from cloud.llm_backend import InProcessLLM
from cloud.split import frozen_embedding_copy, split_causal_lm
from shared.adapters import AdapterConfig
from shared.connector import PoolingConnector
from shared.data.base import VQATask
from shared.nanoedge import NanoEdge
from shared.prompts import HFTokenizer, PromptTemplate
from shared.vision import ENCODER_NAME, efficientnet_lite0_weights_path, load_efficientnet_lite0

log = logging.getLogger(__name__)

CONNECTOR_NAME = "connector.safetensors"
MANIFEST_FORMAT = 1


def default_home() -> Path:
    """``Layout.default().home``: ``$FEDNANO_HOME`` or ``~/.cache/fednano``, read when called."""
    return Layout.default().home


@dataclass
class Pretrained:
    """The pretrained parts a base is built from; load once per process and pass around."""

    model: Any  # transformers *ForCausalLM, frozen
    tokenizer: Any  # transformers tokenizer
    llm_dir: Path  # the folder the LLM was loaded from (hashed into the manifest)
    encoder: nn.Module  # (B, 3, 224, 224) -> (B, C, H, W), frozen
    encoder_weights: Path  # the encoder's weights file (hashed into the manifest)
    encoder_name: str = ENCODER_NAME
    llm_name: str = LLM_DESCRIPTION

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def feature_channels(self) -> int:
        return int(getattr(self.encoder, "out_channels", 1280))


def load_pretrained(home: Path) -> Pretrained:
    """SmolLM2 (cached under ``home``) and EfficientNet-Lite0 with their packaged weights."""
    model, tokenizer = load_llm(home)
    return Pretrained(model, tokenizer, llm_cache_dir(home), load_efficientnet_lite0(),
                      efficientnet_lite0_weights_path())


def new_connector(in_channels: int, width: int, grid: int, seed: int) -> PoolingConnector:
    """A PoolingConnector whose projector is initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PoolingConnector(in_channels, width, grid=grid)


@dataclass
class LoadedBase:
    """A built base, verified and assembled for use in this process."""

    version: str
    home: Path
    # manifest.json as read and checked (``BaseManifest``), as plain JSON for the callers
    # (bundle export, simulation) that look up its records
    manifest: dict[str, Any]
    connector: PoolingConnector  # frozen, aligned
    edge: NanoEdge  # connector + embedder + fresh adapters, encoder attached
    backend: InProcessLLM  # the frozen LLM
    tokenizer: HFTokenizer
    template: PromptTemplate  # the VQA prompt devices use
    features: FeatureStore  # pooled features cached for this encoder and grid
    pretrained: Pretrained = field(repr=False)
    # the NanoAdapters' config: the one the base records unless load_base was given another
    adapter_config: AdapterConfig = field(default_factory=AdapterConfig)

    def make_edge(self, adapter_config: AdapterConfig | None = None, *,
                  with_encoder: bool = True) -> NanoEdge:
        """Another NanoEdge over the same frozen parts, with fresh adapters (one per device;
        default: the base's adapter config)."""
        encoder = self.pretrained.encoder if with_encoder else None
        return NanoEdge(self.connector, self.edge.embedder,
                        adapter_config or self.adapter_config, encoder=encoder)


def build_base(
    home: Path,
    *,
    grid: int = 2,
    align_steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    instruction_fraction: float = 0.5,
    n_align_images: int = 400,
    data_seed: int = 0,
    task: VQATask | None = None,
    pretrained: Pretrained | None = None,
    adapter: AdapterConfig | None = None,
    make_current: bool = True,
    progress: bool = True,
) -> Path:
    """Build and save a base version; returns its folder ``home/base/<version>``.

    ``task`` defaults to ``load_easy_vqa(n_align_images, data_seed)`` (its ``align`` pairs are
    the alignment data; use the same ``data_seed`` as the device split so the reserved images
    match); ``seed`` drives the projector init and batch order; ``pretrained`` defaults to
    ``load_pretrained(home)``; ``adapter`` (default ``AdapterConfig()``) is recorded as the
    NanoAdapters' config every service of this base uses.
    """
    config = AlignConfig(steps=align_steps, batch_size=batch_size, lr=lr, seed=seed,
                         instruction_fraction=instruction_fraction)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if pretrained is None:
        pretrained = load_pretrained(home)
        timings["load_pretrained_s"] = time.perf_counter() - started
    task = task if task is not None else _default_task(n_align_images, data_seed)
    if not task.align:
        raise ValueError(f"task {task.name!r} has no alignment pairs (task.align is empty)")
    keys, captions = [k for k, _ in task.align], [c for _, c in task.align]
    connector = new_connector(pretrained.feature_channels, pretrained.width, grid, seed)
    store = _feature_store(home, pretrained, grid)
    mark = time.perf_counter()
    store.extract(keys, task.load_image, pretrained.encoder, connector, progress=progress)
    timings["features_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    losses = align_connector(
        connector, frozen_embedding_copy(pretrained.model.get_input_embeddings()),
        InProcessLLM.from_causal_lm(pretrained.model), HFTokenizer(pretrained.tokenizer),
        store.get(keys), captions, config, progress=progress,
    )
    timings["align_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    alignment = _alignment_record(task, captions, config, losses)
    folder = _save_version(home, connector, pretrained, store, alignment, timings,
                           adapter or AdapterConfig())
    if make_current:
        write_current(home, folder.name)
    log.info("base %s built in %.0f s (loss %.3f -> %.3f)", folder.name, timings["total_s"],
             losses[0], losses[-1])
    return folder


def _default_task(n_align_images: int, seed: int) -> VQATask:
    from shared.data.easyvqa import load_easy_vqa

    return load_easy_vqa(n_align_images=n_align_images, seed=seed)


def _feature_store(home: Path, pretrained: Pretrained, grid: int) -> FeatureStore:
    sha = sha256_file(pretrained.encoder_weights)
    return FeatureStore(feature_dir(Layout(home).features, encoder_name=pretrained.encoder_name,
                                    encoder_sha256=sha, grid=grid))


def _alignment_record(
    task: VQATask, captions: Sequence[str], config: AlignConfig, losses: list[float]
) -> dict[str, Any]:
    window = min(10, len(losses))
    return {
        "settings": _alignment_settings(task, captions, config),
        "caption_example": captions[0],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first10_mean": sum(losses[:window]) / window,
        "loss_last10_mean": sum(losses[-window:]) / window,
        "loss_curve": [round(x, 4) for x in losses],
    }


def _alignment_settings(
    task: VQATask, captions: Sequence[str], config: AlignConfig
) -> dict[str, Any]:
    """What the alignment was given (part of the version id; results are not)."""
    return {
        "data": f"{task.name}: {len(captions)} reserved images with captions, "
                "kept out of every device's data",
        "task": task.name,
        "n_pairs": len(captions),
        "pairs_sha256": hashlib.sha256(json.dumps(task.align).encode()).hexdigest(),
        "caption_middle": CAPTION_MIDDLE,
        "instructions": list(INSTRUCTIONS),
        **dataclasses.asdict(config),
    }


def _config_record(connector: PoolingConnector, pretrained: Pretrained,
                   store: FeatureStore) -> BaseConfig:
    first = connector.projector[0]
    assert isinstance(first, nn.Linear)  # PoolingConnector's projector starts with its Linear
    return BaseConfig(
        encoder=pretrained.encoder_name, llm=pretrained.llm_name, grid=connector.grid,
        n_visual=connector.num_tokens, in_channels=connector.in_channels,
        width=connector.width, hidden=first.out_features, vqa_template=VQA_TEMPLATE,
        features_dir=store.directory.name,
    )


def _file_records(home: Path, folder: Path, pretrained: Pretrained) -> BaseFiles:
    """Connector relative to its version folder, LLM files relative to ``home`` when inside it
    (so a moved home stays valid), the encoder weights by absolute path (a package file)."""
    llm_dir, home = pretrained.llm_dir.resolve(), home.resolve()
    llm_files = [
        file_record(p, home if p.is_relative_to(home) else None)
        for p in sorted(llm_dir.rglob("*")) if p.is_file()
    ]
    return BaseFiles.model_validate({
        "connector": file_record(folder / CONNECTOR_NAME, folder),
        "encoder_weights": file_record(pretrained.encoder_weights.resolve()),
        "llm": llm_files,
    })


def _save_version(
    home: Path, connector: PoolingConnector, pretrained: Pretrained, store: FeatureStore,
    alignment: dict[str, Any], timings: dict[str, float], adapter: AdapterConfig,
) -> Path:
    root = Layout(home).bases
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        save_file({k: v.contiguous() for k, v in connector.state_dict().items()},
                  tmp / CONNECTOR_NAME)
        manifest = BaseManifest(
            format=MANIFEST_FORMAT, version="",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config=_config_record(connector, pretrained, store),
            files=_file_records(home, tmp, pretrained), alignment=alignment, adapter=adapter,
            llm_source=_llm_source(pretrained.llm_dir),
            timings_s={k: round(v, 2) for k, v in timings.items()},
        )
        version = manifest.content_version()
        write_json(tmp / MANIFEST_NAME,
                   manifest.model_copy(update={"version": version}).model_dump(mode="json"))
        final = root / version
        swap_in_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _llm_source(llm_dir: Path) -> dict[str, Any]:
    path = llm_dir / SOURCE_NAME
    return read_json(path) if path.is_file() else {}


def load_base(
    home: Path,
    version: str | None = None,
    *,
    pretrained: Pretrained | None = None,
    adapter_config: AdapterConfig | None = None,
    full_verify: bool = False,
) -> LoadedBase:
    """Load a built base (default: ``current``), verified against its manifest.

    Its NanoAdapters take the base's recorded ``AdapterConfig`` unless ``adapter_config`` is
    given (a tool trying another rank on the same frozen parts).

    Raises ``BaseNotBuiltError`` (telling you to run ``fednano base build``) when there is none
    and ``BaseIntegrityError`` when a file changed since the build. Pass ``pretrained`` to reuse
    models already loaded in this process.
    """
    manifest = read_manifest(home, version)
    pretrained = pretrained if pretrained is not None else load_pretrained(home)
    try:
        manifest.verify(home, encoder_weights=pretrained.encoder_weights, full=full_verify)
    except BaseIntegrityError as err:
        raise BaseIntegrityError(
            f"base {manifest.version} no longer matches its manifest ({err}); "
            "rebuild it with `fednano base build`"
        ) from err
    connector = _load_connector(home, manifest)
    adapter_config = adapter_config or manifest.adapter
    edge, backend = split_causal_lm(pretrained.model, connector, pretrained.encoder,
                                    adapter_config)
    store = FeatureStore(Layout(home).features / manifest.config.features_dir)
    return LoadedBase(
        version=manifest.version, home=home, manifest=manifest.model_dump(mode="json"),
        connector=connector,
        edge=edge, backend=backend,
        tokenizer=HFTokenizer(pretrained.tokenizer),
        template=manifest.config.vqa_template,
        features=store, pretrained=pretrained, adapter_config=adapter_config,
    )


def _load_connector(home: Path, manifest: BaseManifest) -> PoolingConnector:
    config = manifest.config
    connector = PoolingConnector(config.in_channels, config.width, grid=config.grid,
                                 hidden=config.hidden)
    state = load_file(Layout(home).base(manifest.version) / CONNECTOR_NAME)
    connector.load_state_dict(state, strict=True)
    return connector.requires_grad_(False).eval()
