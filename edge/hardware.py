"""Jetson hardware facts: modules, JetPack releases, power modes, onnxruntime providers.

A profile's ``hardware`` section (``HardwareSettings``) names the module, its JetPack release
(which implies L4T, CUDA and TensorRT) and the power mode *by name*; the tables here are what
those names are checked against.

Power-mode ids differ per module and JetPack release (and per flash config: the "super" modes of
JetPack 6.2), so profiles name modes and ``resolve_power_mode`` maps the name to an id at run
time, preferring the device's own ``/etc/nvpmodel.conf`` over the tables below.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from edge.config_files import StrictModel, did_you_mean

NVPMODEL_CONF = Path("/etc/nvpmodel.conf")

# ------------------------------------------------------------------------------- the tables


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
        key = version_key(jetpack)
        for table in self.power_tables:
            if key >= version_key(table.since):
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


# ------------------------------------------------------------------- the hardware section


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
                         f"{jetpack}{did_you_mean(power_mode, modes)}; known: {list(modes)}")


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


def query_power_mode(
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> tuple[str, int]:
    """Run ``nvpmodel -q`` on the device and parse it (never run in tests: pass ``run``)."""
    done = run(["nvpmodel", "-q"], capture_output=True, text=True, check=True, timeout=10)
    return parse_nvpmodel_query(done.stdout)


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


def version_key(version: str) -> tuple[int, ...]:
    """``"6.2.1"`` -> ``(6, 2, 1)``: release numbers compared as numbers, not as text."""
    return tuple(int(part) for part in version.split("."))
