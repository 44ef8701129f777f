"""What ``fednano-edge run`` assembles before the agent starts: the device's model and data.

NanoEdge bundle (onnxruntime with the profile's providers, or OpenVINO where the profile's
engine says so; self-tested) -> feature cache of the
local images' visual tokens (computed once per bundle version, then read every step) -> a
``DeviceModel``; the local samples come from a ``DataSpec`` (a simulated device's shard). The
LLM is reached through ``RemoteLLM`` on the agent's own broker connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from edge.config import DeviceConfig
from edge.device_round import DeviceModel
from edge.feature_cache import FeatureCache, ImageLoader
from edge.local_data import DataSpec, load_local_data
from edge.remote_llm import RemoteLLM
from edge.runtime import NanoEdgeRuntime, load_bundle_for_profile
from shared.activations import DEFAULT_ENCODING, ActivationEncoding
from shared.backend import LLMBackend
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.mqtt import MqttClient

log = logging.getLogger(__name__)

BUNDLE_SUBDIR = "bundle"  # where ``fetch-bundle --dest`` puts it by default: <state_dir>/bundle


@dataclass(frozen=True)
class LLMSettings:
    """How the device reaches the cloud LLM: waits (a shutdown may wait for one call) and
    the encoding of its activations and gradients (``shared.activations``)."""

    timeout_s: float = 30.0
    retries: int = 3
    encoding: ActivationEncoding = DEFAULT_ENCODING


def default_bundle_dir(config: DeviceConfig) -> Path:
    """``<state_dir>/bundle``: where ``run`` looks for the bundle unless told otherwise."""
    return config.state_dir / BUNDLE_SUBDIR


def load_device(
    config: DeviceConfig, bundle_dir: Path, data: DataSpec | None,
) -> tuple[DeviceModel, list[VQASample]]:
    """Open the bundle, load the local samples and warm the feature cache with their images."""
    runtime = load_bundle_for_profile(bundle_dir, config.profile.runtime, config.state_dir)
    if data is None:
        log.warning("%s: no local data (--data): the device joins but refuses tasks",
                    config.device_id)
        return _device_model(runtime, _no_images, config), []
    task, samples = load_local_data(data)
    log.info("%s: %d local samples from %s", config.device_id, len(samples), data.label())
    model = _device_model(runtime, task.load_image, config)
    _warm(model, sorted({s.image_key for s in samples}))
    return model, samples


def _device_model(runtime: NanoEdgeRuntime, load_image: ImageLoader,
                  config: DeviceConfig) -> DeviceModel:
    cache = FeatureCache.from_settings(config.profile.feature_cache, config.state_dir,
                                       runtime.bundle_version)
    lookup = cache.visual_lookup(load_image, runtime.visual_tokens,
                                 batch_size=config.profile.runtime.batch_size)
    batcher = VQABatcher(runtime.tokenizer, runtime.template, lookup, runtime.n_visual)
    return DeviceModel(runtime.edge, batcher, base_version=runtime.manifest.base_version,
                       bundle_version=runtime.bundle_version, providers=runtime.providers)


def _warm(model: DeviceModel, keys: Sequence[str]) -> None:
    """Compute the visual tokens of every local image now, in chunks, with a progress log."""
    chunk = 256
    for start in range(0, len(keys), chunk):
        model.batcher.visual(keys[start:start + chunk])
        log.info("feature cache: %d of %d local images ready",
                 min(start + chunk, len(keys)), len(keys))


def _no_images(key: str) -> Image.Image:
    raise ValueError(f"this device has no local data, so no image {key!r}")


@dataclass(frozen=True)
class RemoteLLMFactory:
    """Builds a device's ``RemoteLLM`` on the agent's connection (an ``agent.BackendFactory``)."""

    device_id: str
    base_version: str
    settings: LLMSettings

    def __call__(self, client: MqttClient, stop: threading.Event) -> LLMBackend:
        return RemoteLLM(client, device_id=self.device_id, base_version=self.base_version,
                         timeout_s=self.settings.timeout_s, retries=self.settings.retries,
                         stop=stop, encoding=self.settings.encoding)
