"""Firmware device profiles: how one hardware kind runs FedNano (``firmware_configs/*.yaml``).

A profile names the hardware (``edge.hardware``: module, JetPack release, power mode by name),
the onnxruntime providers in priority order, the encoder precision and batch, a memory budget
checked against the module's usable memory, the feature-cache limits, the device's
local-training values (a ``shared.training.TrainConfig``) and the largest update the device may
publish. The file is read and reported on as every device config file is
(``edge.config_files``); the names of those two modules that callers use are re-exported here.

Nothing here imports torch or onnxruntime: validating a profile is cheap on any machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from edge.config_files import (
    ConfigError,
    Issue,
    StrictModel,
    did_you_mean,
    read_yaml_mapping,
    validate_model,
    validation_issues,
)
from edge.hardware import (
    CPU,
    CUDA,
    JETPACK_RELEASES,
    JETSON_PROVIDERS,
    KNOWN_ORT_PROVIDERS,
    MODULES,
    NVPMODEL_CONF,
    TENSORRT,
    HardwareSettings,
    JetPackRelease,
    ModuleSpec,
    PowerModeTable,
    parse_nvpmodel_modes,
    parse_nvpmodel_query,
    query_power_mode,
    read_device_power_modes,
    resolve_power_mode,
    version_key,
)
from shared.identity import default_profiles_dir as default_profiles_dir
from shared.identity import list_profiles as list_profiles
from shared.training import TrainConfig

__all__ = [  # with the config-file and hardware names callers import from here
    "CPU", "CUDA", "JETPACK_RELEASES", "JETSON_PROVIDERS", "KNOWN_ORT_PROVIDERS", "MODULES",
    "MQTT_MAX_PACKET_BYTES", "NVPMODEL_CONF", "PROFILE_SCHEMA_FILE", "TENSORRT", "ConfigError",
    "DeviceProfile", "FeatureCacheSettings", "HardwareSettings", "Issue", "JetPackRelease",
    "ModuleSpec", "PowerModeTable", "RuntimeSettings", "StrictModel", "TensorRTSettings",
    "default_profiles_dir", "list_profiles", "load_profile", "parse_nvpmodel_modes",
    "parse_nvpmodel_query", "profile_json_schema", "profile_path", "query_power_mode",
    "read_device_power_modes", "read_yaml_mapping", "resolve_power_mode", "validate_model",
    "validation_issues",
]

PROFILE_SCHEMA_FILE = "profile.schema.json"
MQTT_MAX_PACKET_BYTES = 268_435_455  # the protocol's largest packet (MQTT 3.1.1 and 5)
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"

# ---------------------------------------------------------------------------------- sections


class TensorRTSettings(StrictModel):
    """TensorRT execution-provider settings (engines take minutes to build: cache them)."""

    engine_cache_dir: Path = Field(
        Path("trt-engines"), description="relative paths are under the device's state_dir")
    workspace_mib: int = Field(1024, ge=64, le=65536)
    timing_cache: bool = True


class RuntimeSettings(StrictModel):
    """How the frozen encoder + connector run: onnxruntime, or OpenVINO on x86 CPUs."""

    providers: tuple[str, ...] = Field(
        description="onnxruntime execution providers, highest priority first, CPU last")
    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="int8: the bundle's static QDQ model; fp16: TensorRT/CUDA only")
    encoder: Literal["auto", "cpu", "tensorrt"] = Field(
        "auto", description="which of the bundle's encoder graphs to run; auto: the TensorRT "
        "graph when TensorRT is the first provider onnxruntime has here, the CPU graph otherwise")
    engine: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="what runs the encoder graph; openvino: OpenVINO's CPU "
        "runtime runs the cpu graph (faster than onnxruntime at batches of 8-16 on the x86 CPU "
        "measured, slower at 1: docs/bundle.md), onnxruntime when the openvino package is not "
        "installed or cannot compile the graph")
    batch_size: int = Field(8, ge=1, le=1024, description="encoder inference batch")
    intra_op_threads: int = Field(0, ge=0, le=256,
                                  description="the encoder's CPU threads; 0: the engine's default")
    tensorrt: TensorRTSettings | None = Field(
        None, description="required when TensorrtExecutionProvider is listed")

    @field_validator("providers")
    @classmethod
    def _known_and_ordered(cls, providers: tuple[str, ...]) -> tuple[str, ...]:
        if not providers:
            raise ValueError(f"list at least {CPU!r}")
        for name in providers:
            if name not in KNOWN_ORT_PROVIDERS:
                hint = did_you_mean(name, KNOWN_ORT_PROVIDERS)
                raise ValueError(f"unknown onnxruntime provider {name!r}{hint}")
        if len(set(providers)) != len(providers):
            raise ValueError(f"duplicate providers in {list(providers)}")
        if providers[-1] != CPU:
            raise ValueError(f"{CPU!r} must come last (the fallback), got {list(providers)}")
        if TENSORRT in providers and CUDA in providers and (
            providers.index(TENSORRT) > providers.index(CUDA)
        ):
            raise ValueError(f"{TENSORRT!r} must come before {CUDA!r}, got {list(providers)}")
        return providers

    @model_validator(mode="after")
    def _provider_settings(self) -> RuntimeSettings:
        if (TENSORRT in self.providers) != (self.tensorrt is not None):
            raise ValueError(f"tensorrt settings go with {TENSORRT!r}: give both or neither")
        if self.engine == "openvino" and (self.providers != (CPU,) or self.encoder == "tensorrt"
                                          or self.precision != "int8"):
            raise ValueError(f"engine openvino runs the int8 cpu graph with providers [{CPU!r}] "
                             f"alone, got {list(self.providers)}, encoder {self.encoder}, "
                             f"precision {self.precision}")
        if self.precision == "fp16" and not {TENSORRT, CUDA} & set(self.providers):
            raise ValueError("precision fp16 needs TensorrtExecutionProvider or "
                             f"CUDAExecutionProvider, got {list(self.providers)}")
        return self

    def ort_providers(self, state_dir: Path) -> list[tuple[str, dict[str, Any]]]:
        """``(name, options)`` pairs for ``onnxruntime.InferenceSession(providers=...)``.

        TensorRT option names are onnxruntime's; not exercised on a Jetson here.
        """
        return [(name, self._provider_options(name, state_dir)) for name in self.providers]

    def _provider_options(self, name: str, state_dir: Path) -> dict[str, Any]:
        if name != TENSORRT or self.tensorrt is None:
            return {}
        trt = self.tensorrt
        cache = trt.engine_cache_dir if trt.engine_cache_dir.is_absolute() else (
            state_dir / trt.engine_cache_dir)
        return {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": trt.timing_cache,
            "trt_max_workspace_size": trt.workspace_mib * 2**20,
            "trt_fp16_enable": self.precision in ("fp16", "int8"),
            "trt_int8_enable": self.precision == "int8",
        }


class FeatureCacheSettings(StrictModel):
    """Connector outputs cached per local sample and bundle version, on disk."""

    dir: Path = Field(Path("features"), description="relative paths are under state_dir")
    max_mib: int = Field(1024, ge=1, description="disk budget; oldest entries go first")
    max_entries: int = Field(100_000, ge=1)


# ---------------------------------------------------------------------------------- profile


class DeviceProfile(StrictModel):
    """A firmware profile: one validated YAML file in ``firmware_configs/``."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=_NAME_PATTERN, description="the file's name without .yaml")
    description: str = ""
    hardware: HardwareSettings
    runtime: RuntimeSettings
    memory_budget_mib: int = Field(gt=0, description="all of the agent's memory, CPU + GPU")
    feature_cache: FeatureCacheSettings = FeatureCacheSettings()
    # The device's own values (its batch sizes are its memory budget); a round's task sets
    # only what the operator or the strategy chose (shared.training.resolve_training).
    training: TrainConfig = TrainConfig()
    max_update_bytes: int = Field(
        ge=1024, le=MQTT_MAX_PACKET_BYTES,
        description="the device refuses to publish a larger update; keep it under the "
        "broker's max_packet_size")

    @field_validator("runtime")
    @classmethod
    def _providers_fit_module(
        cls, runtime: RuntimeSettings, info: ValidationInfo
    ) -> RuntimeSettings:
        hardware = info.data.get("hardware")
        if hardware is None:
            return runtime
        allowed = JETSON_PROVIDERS if hardware.spec.jetson else (CPU,)
        extra = [p for p in runtime.providers if p not in allowed]
        if extra:
            raise ValueError(f"providers {extra} do not run on {hardware.module}; "
                             f"use some of {list(allowed)}")
        return runtime

    @field_validator("memory_budget_mib")
    @classmethod
    def _fits_module(cls, budget: int, info: ValidationInfo) -> int:
        hardware: HardwareSettings | None = info.data.get("hardware")
        spec = hardware.spec if hardware is not None else None
        if spec is not None and spec.usable_mib is not None and budget > spec.usable_mib:
            raise ValueError(f"{budget} MiB exceeds the ~{spec.usable_mib} MiB usable on "
                             f"{spec.name} ({spec.memory_mib} MiB physical)")
        runtime = info.data.get("runtime")
        if runtime is not None and runtime.tensorrt and runtime.tensorrt.workspace_mib >= budget:
            raise ValueError(f"{budget} MiB leaves no room beyond the TensorRT workspace "
                             f"({runtime.tensorrt.workspace_mib} MiB)")
        return budget

    def warnings(self) -> list[str]:
        """Things that validate but deserve an operator's attention."""
        release = self.hardware.release
        if release is not None and version_key(release.python) < (3, 10):
            return [f"JetPack {release.version} ships Python {release.python}; the edge agent "
                    "needs Python >= 3.10 (a container or a separate interpreter)"]
        return []


# ------------------------------------------------------------------------- loading profiles


def profile_path(name_or_path: str | Path, directory: Path | None = None) -> Path:
    """A path as given if it names a file (or ends in .yaml/.yml), else ``<dir>/<name>.yaml``."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file():
        return path
    if not re.fullmatch(_NAME_PATTERN, text):
        raise ConfigError.single(None, "profile", f"not a profile name or file, got {text!r}")
    return (directory or default_profiles_dir()) / f"{text}.yaml"


def load_profile(name_or_path: str | Path, *, directory: Path | None = None) -> DeviceProfile:
    """Load and validate a profile by name (from ``directory``) or by path.

    Raises ``ConfigError`` listing every problem as ``file: field: message``.
    """
    path = profile_path(name_or_path, directory)
    if not path.is_file():
        known = list_profiles(path.parent) if path.parent.is_dir() else []
        hint = did_you_mean(path.stem, known)
        raise ConfigError.single(path, "", f"no such profile{hint or f'; known: {known}'}")
    profile = validate_model(DeviceProfile, read_yaml_mapping(path), path)
    if profile.name != path.stem:
        raise ConfigError.single(
            path, "name", f"must match the file name {path.stem!r}, got {profile.name!r}")
    return profile


def profile_json_schema() -> dict[str, Any]:
    """JSON schema of a profile (``firmware_configs/profile.schema.json`` is this, exported)."""
    schema = DeviceProfile.model_json_schema()
    schema["title"] = "FedNano device profile"
    return schema
