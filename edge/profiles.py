"""Firmware device profiles: how one hardware kind runs FedNano (``firmware_configs/*.yaml``).

A profile names the module, its JetPack release (which implies L4T, CUDA and TensorRT), the
power mode *by name*, the onnxruntime providers in priority order, the encoder precision and
batch, a memory budget checked against the module's usable memory, the feature-cache limits,
the device's local-training values (a ``shared.training.TrainConfig``) and the largest update
the device may publish. Every section forbids unknown keys, so a typo fails at boot naming the
field; ``ConfigError`` carries every problem as ``file: field: message``.

Power-mode ids differ per module and JetPack release (and per flash config: the "super" modes of
JetPack 6.2), so profiles name modes and ``resolve_power_mode`` maps the name to an id at run
time, preferring the device's own ``/etc/nvpmodel.conf`` over the table below.

Nothing here imports torch or onnxruntime: validating a profile is cheap on any machine.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.training import TrainConfig

PROFILE_SCHEMA_FILE = "profile.schema.json"
NVPMODEL_CONF = Path("/etc/nvpmodel.conf")
MQTT_MAX_PACKET_BYTES = 268_435_455  # the protocol's largest packet (MQTT 3.1.1 and 5)
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"

# ---------------------------------------------------------------------------- hardware facts


@dataclass(frozen=True)
class JetPackRelease:
    """What a JetPack release ships (NVIDIA's JetPack/Jetson Linux release notes)."""

    version: str
    l4t: str
    cuda: str
    tensorrt: str
    ubuntu: str
    python: str  # the distribution's python3; the edge agent needs >= 3.10


# JetPack 5.1.x: Ubuntu 20.04, CUDA 11.4, TensorRT 8.5.2 (release notes). JetPack 6.0: CUDA 12.2,
# TensorRT 8.6.2; 6.1/6.2/6.2.1: CUDA 12.6, TensorRT 10.3, cuDNN 9.3 (NVIDIA docs, Torch-TensorRT's
# JetPack page). Add newer releases here once documented.
JETPACK_RELEASES: Mapping[str, JetPackRelease] = MappingProxyType({
    r.version: r for r in (
        JetPackRelease("5.1.1", "35.3.1", "11.4", "8.5.2", "20.04", "3.8"),
        JetPackRelease("5.1.2", "35.4.1", "11.4", "8.5.2", "20.04", "3.8"),
        JetPackRelease("5.1.3", "35.5.0", "11.4", "8.5.2", "20.04", "3.8"),
        JetPackRelease("5.1.4", "35.6.0", "11.4", "8.5.2", "20.04", "3.8"),
        JetPackRelease("6.0", "36.3.0", "12.2", "8.6.2", "22.04", "3.10"),
        JetPackRelease("6.1", "36.4.0", "12.6", "10.3", "22.04", "3.10"),
        JetPackRelease("6.2", "36.4.3", "12.6", "10.3", "22.04", "3.10"),
        JetPackRelease("6.2.1", "36.4.4", "12.6", "10.3", "22.04", "3.10"),
    )
})
_JETPACK_5 = ("5.1.1", "5.1.2", "5.1.3", "5.1.4")
_JETPACK_6 = ("6.0", "6.1", "6.2", "6.2.1")


@dataclass(frozen=True)
class PowerModeTable:
    """nvpmodel name -> id as shipped from JetPack ``since`` on (until a newer table)."""

    since: str
    modes: Mapping[str, int]


@dataclass(frozen=True)
class ModuleSpec:
    """A hardware kind: memory, supported JetPack releases, power-mode tables (newest first)."""

    name: str
    jetson: bool
    memory_mib: int | None  # physical; CPU and GPU share it on Jetson
    usable_mib: int | None  # what applications can plan on after L4T, carve-outs and desktop
    jetpacks: tuple[str, ...] = ()
    power_tables: tuple[PowerModeTable, ...] = field(default=())

    def power_modes(self, jetpack: str) -> Mapping[str, int]:
        """The documented name -> id table for ``jetpack`` (empty when none applies)."""
        key = _version_key(jetpack)
        for table in self.power_tables:
            if key >= _version_key(table.since):
                return table.modes
        return MappingProxyType({})


# Power modes. From NVIDIA documentation: Orin NX 16GB MAXN_SUPER=0, Orin Nano MAXN_SUPER=2,
# AGX Orin 64GB MAXN=0 and 50W=3. The rest of the Orin Nano 6.2 table (15W=0, 25W=1, 7W=3), the
# AGX 15W=1/30W=2 and the Xavier NX ids match nvpmodel listings users published; the other Orin NX
# ids are our reading of NVIDIA's tables, unverified on a device. That is why a device resolves
# names against its own /etc/nvpmodel.conf (``resolve_power_mode``) and these are the fallback.
# Usable memory: Orin Nano 8GB ~5 GB is NVIDIA's figure; the others are our estimate with the same
# ~3 GiB reserve. Xavier NX (8 GB module) stops at JetPack 5.x.
MODULES: Mapping[str, ModuleSpec] = MappingProxyType({
    m.name: m for m in (
        ModuleSpec(
            "jetson-orin-nano-8gb", True, 8192, 5120, _JETPACK_5 + _JETPACK_6,
            (PowerModeTable("6.2", {"15W": 0, "25W": 1, "MAXN_SUPER": 2, "7W": 3}),
             PowerModeTable("5.1.1", {"15W": 0, "7W": 1})),
        ),
        ModuleSpec(
            "jetson-orin-nx-16gb", True, 16384, 13312, _JETPACK_5 + _JETPACK_6,
            (PowerModeTable("6.2", {"MAXN_SUPER": 0, "10W": 1, "15W": 2, "25W": 3, "40W": 4}),
             PowerModeTable("5.1.1", {"MAXN": 0, "10W": 1, "15W": 2, "25W": 3})),
        ),
        ModuleSpec(
            "jetson-agx-orin-64gb", True, 65536, 61440, _JETPACK_5 + _JETPACK_6,
            (PowerModeTable("5.1.1", {"MAXN": 0, "15W": 1, "30W": 2, "50W": 3}),),
        ),
        ModuleSpec(
            "jetson-xavier-nx", True, 8192, 5120, _JETPACK_5,
            (PowerModeTable("5.1.1", {
                "MODE_15W_2CORE": 0, "MODE_15W_4CORE": 1, "MODE_15W_6CORE": 2,
                "MODE_10W_2CORE": 3, "MODE_10W_4CORE": 4, "MODE_10W_DESKTOP": 5,
                "MODE_20W_2CORE": 6, "MODE_20W_4CORE": 7, "MODE_20W_6CORE": 8,
            }),),
        ),
        ModuleSpec("sim-cpu", False, None, None),
    )
})
ModuleName = Literal[
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-xavier-nx",
    "sim-cpu",
]

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# onnxruntime.get_all_providers() of onnxruntime 1.32 (a test keeps this in step).
KNOWN_ORT_PROVIDERS = frozenset({
    TENSORRT, CUDA, "MIGraphXExecutionProvider", "OpenVINOExecutionProvider",
    "DnnlExecutionProvider", "VitisAIExecutionProvider", "QNNExecutionProvider",
    "NnapiExecutionProvider", "VSINPUExecutionProvider", "JsExecutionProvider",
    "CoreMLExecutionProvider", "DmlExecutionProvider", "RknpuExecutionProvider",
    "WebNNExecutionProvider", "WebGpuExecutionProvider", "XnnpackExecutionProvider",
    "CANNExecutionProvider", "AzureExecutionProvider", CPU,
})
JETSON_PROVIDERS = (TENSORRT, CUDA, CPU)  # NVIDIA's Jetson onnxruntime-gpu builds

# ----------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Issue:
    """One problem in one file: the dotted field path ('' for the whole file) and why."""

    source: Path | None
    field: str
    message: str

    def __str__(self) -> str:
        where = [str(self.source)] if self.source else []
        where += [self.field] if self.field else []
        return ": ".join([*where, self.message])


class ConfigError(ValueError):
    """A profile or device config that cannot be loaded; ``issues`` lists every problem."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def single(cls, source: Path | None, field: str, message: str) -> ConfigError:
        return cls([Issue(source, field, message)])


# ---------------------------------------------------------------------------------- sections


class StrictModel(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors (typos fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HardwareSettings(StrictModel):
    """Module, JetPack release and nvpmodel power mode (by name); none of the last two on CPU."""

    module: ModuleName
    jetpack: str | None = Field(None, description='JetPack release, quoted: "6.2"')
    power_mode: str | None = Field(None, description="nvpmodel mode name, e.g. MAXN_SUPER, 15W")

    @field_validator("jetpack", "power_mode", mode="before")
    @classmethod
    def _quoted(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{info.field_name} must be a quoted string (YAML reads 6.2 or 15 "
                             f"as a number), got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> HardwareSettings:
        spec = self.spec
        if not spec.jetson:
            if self.jetpack is not None or self.power_mode is not None:
                raise ValueError(f"{spec.name} has no JetPack or power mode: leave both out")
            return self
        _check_jetpack(spec, self.jetpack)
        _check_power_mode(spec, self.jetpack or "", self.power_mode)
        return self

    @property
    def spec(self) -> ModuleSpec:
        return MODULES[self.module]

    @property
    def release(self) -> JetPackRelease | None:
        return JETPACK_RELEASES[self.jetpack] if self.jetpack else None

    @property
    def known_power_mode_id(self) -> int | None:
        """The documented id of ``power_mode`` (prefer ``resolve_power_mode`` on a device)."""
        if self.power_mode is None or self.jetpack is None:
            return None
        return self.spec.power_modes(self.jetpack)[self.power_mode]


def _check_jetpack(spec: ModuleSpec, jetpack: str | None) -> None:
    if jetpack is None:
        raise ValueError(f"jetpack is required for {spec.name}; one of {list(spec.jetpacks)}")
    if jetpack not in JETPACK_RELEASES:
        raise ValueError(f"jetpack {jetpack!r} is not a known JetPack release; known: "
                         f"{list(JETPACK_RELEASES)}")
    if jetpack not in spec.jetpacks:
        raise ValueError(f"{spec.name} does not run JetPack {jetpack}; supported: "
                         f"{list(spec.jetpacks)}")


def _check_power_mode(spec: ModuleSpec, jetpack: str, power_mode: str | None) -> None:
    modes = spec.power_modes(jetpack)
    if power_mode is None:
        raise ValueError(f"power_mode is required for {spec.name}; one of {list(modes)}")
    if power_mode not in modes:
        raise ValueError(f"power_mode {power_mode!r} is not a mode of {spec.name} on JetPack "
                         f"{jetpack}{_did_you_mean(power_mode, modes)}; known: {list(modes)}")


class TensorRTSettings(StrictModel):
    """TensorRT execution-provider settings (engines take minutes to build: cache them)."""

    engine_cache_dir: Path = Field(
        Path("trt-engines"), description="relative paths are under the device's state_dir")
    workspace_mib: int = Field(1024, ge=64, le=65536)
    timing_cache: bool = True


class RuntimeSettings(StrictModel):
    """How the frozen encoder + connector run in onnxruntime."""

    providers: tuple[str, ...] = Field(
        description="onnxruntime execution providers, highest priority first, CPU last")
    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="int8: the bundle's static QDQ model; fp16: TensorRT/CUDA only")
    encoder: Literal["auto", "cpu", "tensorrt"] = Field(
        "auto", description="which of the bundle's encoder graphs to run; auto: the TensorRT "
        "graph when TensorRT is the first provider onnxruntime has here, the CPU graph otherwise")
    batch_size: int = Field(8, ge=1, le=1024, description="encoder inference batch")
    intra_op_threads: int = Field(0, ge=0, le=256, description="0: onnxruntime's default")
    tensorrt: TensorRTSettings | None = Field(
        None, description="required when TensorrtExecutionProvider is listed")

    @field_validator("providers")
    @classmethod
    def _known_and_ordered(cls, providers: tuple[str, ...]) -> tuple[str, ...]:
        if not providers:
            raise ValueError(f"list at least {CPU!r}")
        for name in providers:
            if name not in KNOWN_ORT_PROVIDERS:
                hint = _did_you_mean(name, KNOWN_ORT_PROVIDERS)
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
        if release is not None and _version_key(release.python) < (3, 10):
            return [f"JetPack {release.version} ships Python {release.python}; the edge agent "
                    "needs Python >= 3.10 (a container or a separate interpreter)"]
        return []


# ------------------------------------------------------------------------- loading profiles


def default_profiles_dir() -> Path:
    """``$FEDNANO_PROFILES_DIR`` if set, else the repository's ``firmware_configs/``."""
    env = os.environ.get("FEDNANO_PROFILES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "firmware_configs"


def list_profiles(directory: Path | None = None) -> list[str]:
    """Names of the profiles shipped in ``directory`` (default: ``default_profiles_dir()``)."""
    folder = directory or default_profiles_dir()
    if not folder.is_dir():
        raise ValueError(f"profiles directory does not exist, got {str(folder)!r}")
    return sorted(path.stem for path in folder.glob("*.yaml"))


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
        hint = _did_you_mean(path.stem, known)
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


# ----------------------------------------------------------------------- YAML + validation


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse ``path`` as a YAML mapping (safe loader, no duplicate keys) or raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError.single(path, "", f"cannot read: {err}") from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError.single(path, "", f"invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError.single(path, "", f"expected a mapping, got {type(data).__name__}")
    return data


_Model = typing.TypeVar("_Model", bound=BaseModel)


def validate_model(
    model: type[_Model], data: Any, source: Path | None, context: dict[str, Any] | None = None,
) -> _Model:
    """``model.model_validate(data)`` with pydantic's errors turned into a ``ConfigError``."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(validation_issues(err, model, source)) from err


def validation_issues(
    err: ValidationError, model: type[BaseModel], source: Path | None,
) -> list[Issue]:
    """One ``Issue`` per pydantic error; unknown keys get a did-you-mean from the real fields."""
    issues = []
    for error in err.errors():
        loc = tuple(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            hint = _did_you_mean(str(loc[-1]), fields)
            message = f"unknown field{hint}" if hint else f"unknown field; known: {fields}"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif _echoable(error):
            message += f", got {error['input']!r}"
        issues.append(Issue(source, ".".join(str(part) for part in loc), message))
    return issues


def _echoable(error: Any) -> bool:
    """Add the bad input to pydantic's message? Short scalars only, and never a password."""
    value, loc = error["input"], error["loc"]
    return (error["type"] != "value_error" and "password" not in loc
            and isinstance(value, (str, int, float)) and len(str(value)) <= 80)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: type[BaseModel] = model
    for part in loc:
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        nested = [t for t in (info.annotation, *typing.get_args(info.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return list(current.model_fields)


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# ------------------------------------------------------------------------------- nvpmodel

_CONF_MODE = re.compile(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)\s*>")
_VERBOSE_MODE = re.compile(r"POWER_MODEL:\s*ID=(\d+)\s+NAME=(\S+)")
_QUERY_MODE = re.compile(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)")


def parse_nvpmodel_modes(text: str) -> dict[str, int]:
    """Name -> id from ``/etc/nvpmodel.conf`` or from ``nvpmodel -p --verbose`` output."""
    modes: dict[str, int] = {}
    for pattern in (_CONF_MODE, _VERBOSE_MODE):
        for match in pattern.finditer(text):
            modes.setdefault(match.group(2), int(match.group(1)))
    return modes


def parse_nvpmodel_query(text: str) -> tuple[str, int]:
    """``(name, id)`` of the active mode from ``nvpmodel -q`` ("NV Power Mode: X" then the id)."""
    match = _QUERY_MODE.search(text)
    if match is None:
        raise ValueError(f"no 'NV Power Mode' in nvpmodel output, got {text[:200]!r}")
    return match.group(1), int(match.group(2))


def read_device_power_modes(conf: Path = NVPMODEL_CONF) -> dict[str, int]:
    """The device's own mode table (``/etc/nvpmodel.conf`` links to the board's file)."""
    return parse_nvpmodel_modes(conf.read_text(encoding="utf-8", errors="replace"))


def resolve_power_mode(
    hardware: HardwareSettings, device_modes: Mapping[str, int] | None = None,
) -> int:
    """The nvpmodel id of the profile's mode: the device's table if given, else the documented one.

    A device flashed without JetPack 6.2's "super" config has no MAXN_SUPER: the error lists the
    modes it does have.
    """
    if hardware.power_mode is None:
        raise ValueError(f"{hardware.module} has no power modes")
    if device_modes is None:
        device_modes = hardware.spec.power_modes(hardware.jetpack or "")
    if hardware.power_mode not in device_modes:
        raise ValueError(f"nvpmodel has no mode {hardware.power_mode!r} here; modes: "
                         f"{dict(device_modes)}")
    return device_modes[hardware.power_mode]


def query_power_mode(
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> tuple[str, int]:
    """Run ``nvpmodel -q`` on the device and parse it (never run in tests: pass ``run``)."""
    done = run(["nvpmodel", "-q"], capture_output=True, text=True, check=True, timeout=10)
    return parse_nvpmodel_query(done.stdout)
