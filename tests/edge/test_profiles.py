"""Firmware profiles: every shipped one validates; typos and impossible settings fail by name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from edge.cli import app
from edge.config import DEVICE_CONFIG_SCHEMA_FILE, device_config_json_schema
from edge.profiles import (
    JETPACK_RELEASES,
    KNOWN_ORT_PROVIDERS,
    MODULES,
    PROFILE_SCHEMA_FILE,
    ConfigError,
    DeviceProfile,
    default_profiles_dir,
    list_profiles,
    load_profile,
    parse_nvpmodel_modes,
    parse_nvpmodel_query,
    profile_json_schema,
    query_power_mode,
    resolve_power_mode,
)
from shared.training import TaskHParams, TrainConfig, resolve_training

SHIPPED = [
    "jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-xavier-nx",
    "sim-cpu",
]


def _shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load((default_profiles_dir() / f"{name}.yaml").read_text())


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _errors(tmp_path: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, data))
    return str(info.value)


def _changed(name: str, **changes: Any) -> dict[str, Any]:
    """Shipped profile ``name`` with ``section__key=value`` changes applied."""
    data = _shipped(name)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for part in parents:
            target = target[part]
        target[last] = value
    return data


def _nano(**changes: Any) -> dict[str, Any]:
    return _changed("jetson-orin-nano-8gb", **changes)


# ----------------------------------------------------------------------------- shipped


def test_the_five_profiles_ship() -> None:
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_validates(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.hardware.module == name
    assert profile.runtime.providers[-1] == "CPUExecutionProvider"
    if profile.hardware.spec.jetson:
        assert profile.hardware.known_power_mode_id is not None
        assert profile.runtime.tensorrt is not None


def test_shipped_jetson_stacks_match_the_docs() -> None:
    nano = load_profile("jetson-orin-nano-8gb").hardware
    assert nano.release is not None
    stack = (nano.release.l4t, nano.release.cuda, nano.release.tensorrt)
    assert stack == ("36.4.3", "12.6", "10.3")
    assert nano.known_power_mode_id == 2  # Orin Nano MAXN_SUPER
    assert load_profile("jetson-orin-nx-16gb").hardware.known_power_mode_id == 0
    xavier = load_profile("jetson-xavier-nx")
    assert xavier.hardware.release is not None and xavier.hardware.release.l4t.startswith("35.")
    assert "Python 3.8" in xavier.warnings()[0]
    sim = load_profile("sim-cpu")
    assert sim.runtime.providers == ("CPUExecutionProvider",) and sim.hardware.release is None


def test_load_by_path_equals_load_by_name() -> None:
    path = default_profiles_dir() / "sim-cpu.yaml"
    assert load_profile(path) == load_profile("sim-cpu")


def test_module_tables_are_consistent() -> None:
    for spec in MODULES.values():
        assert set(spec.jetpacks) <= set(JETPACK_RELEASES)
        for table in spec.power_tables:
            assert table.since in spec.jetpacks
        if spec.jetson:
            assert spec.usable_mib is not None and spec.memory_mib is not None
            assert spec.usable_mib < spec.memory_mib
    assert all(v.startswith("5.") for v in MODULES["jetson-xavier-nx"].jetpacks)


def test_known_providers_match_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    assert set(ort.get_all_providers()) == KNOWN_ORT_PROVIDERS


# ------------------------------------------------------------------------- training


def test_to_train_config_uses_the_profile_and_overrides() -> None:
    profile = load_profile("jetson-orin-nano-8gb")
    config = resolve_training(profile.training, TaskHParams(steps=5))
    assert isinstance(config, TrainConfig)
    assert (config.steps, config.batch_size, config.fisher_samples) == (5, 8, 32)


# ---------------------------------------------------------------------------- typos


def test_typo_at_top_level_names_the_field(tmp_path: Path) -> None:
    data = _nano()
    data["memory_budget_mb"] = data.pop("memory_budget_mib")
    message = _errors(tmp_path, data)
    assert "memory_budget_mb: unknown field (did you mean 'memory_budget_mib'?)" in message
    assert "memory_budget_mib: required field is missing" in message
    assert "jetson-orin-nano-8gb.yaml" in message


def test_typo_in_a_nested_section_names_the_dotted_field(tmp_path: Path) -> None:
    data = _nano()
    data["runtime"]["tensorrt"]["engine_cache"] = data["runtime"]["tensorrt"].pop(
        "engine_cache_dir")
    message = _errors(tmp_path, data)
    assert "runtime.tensorrt.engine_cache: unknown field (did you mean 'engine_cache_dir'?)" in (
        message)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = _nano(training__stpes=3, max_update_bytes=0)
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, data))
    fields = {issue.field for issue in info.value.issues}
    assert {"training.stpes", "max_update_bytes"} <= fields


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sim-cpu.yaml"
    text = (default_profiles_dir() / "sim-cpu.yaml").read_text()
    path.write_text(text + "memory_budget_mib: 99999\n")
    with pytest.raises(ConfigError, match="duplicate key 'memory_budget_mib'"):
        load_profile(path)


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "expected a mapping, got list"),
    ("name: [unclosed\n", "invalid YAML"),
])
def test_malformed_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_profile(path)


def test_unknown_profile_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'jetson-orin-nano-8gb'"):
        load_profile("jetson-orin-nano-8g")


def test_name_must_match_the_file(tmp_path: Path) -> None:
    data = _nano()
    path = tmp_path / "my-nano.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="name: must match the file name 'my-nano'"):
        load_profile(path)


# ------------------------------------------------------------------------ providers


@pytest.mark.parametrize("providers, expected", [
    (["TensorRTExecutionProvider", "CPUExecutionProvider"],
     "unknown onnxruntime provider 'TensorRTExecutionProvider' (did you mean "
     "'TensorrtExecutionProvider'?)"),
    (["CPUExecutionProvider", "CUDAExecutionProvider"], "must come last"),
    (["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"],
     "'TensorrtExecutionProvider' must come before 'CUDAExecutionProvider'"),
    (["TensorrtExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"],
     "duplicate providers"),
    ([], "list at least 'CPUExecutionProvider'"),
    (["OpenVINOExecutionProvider", "CPUExecutionProvider"],
     "providers ['OpenVINOExecutionProvider'] do not run on jetson-orin-nano-8gb"),
])
def test_bad_providers_fail(tmp_path: Path, providers: list[str], expected: str) -> None:
    message = _errors(tmp_path, _nano(runtime__providers=providers, runtime__tensorrt=None))
    assert "runtime" in message
    assert expected in message


def test_sim_cpu_runs_cpu_only(tmp_path: Path) -> None:
    data = _changed("sim-cpu", runtime__providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                    runtime__engine="onnxruntime")
    assert "do not run on sim-cpu" in _errors(tmp_path, data)


def test_tensorrt_settings_go_with_the_tensorrt_provider(tmp_path: Path) -> None:
    without = _nano(runtime__providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "tensorrt settings go with 'TensorrtExecutionProvider'" in _errors(tmp_path, without)
    missing = _nano(runtime__tensorrt=None)
    assert "give both or neither" in _errors(tmp_path, missing)


def test_fp16_needs_a_gpu_provider(tmp_path: Path) -> None:
    data = _changed("sim-cpu", runtime__precision="fp16", runtime__engine="onnxruntime")
    assert "precision fp16 needs" in _errors(tmp_path, data)


def test_openvino_takes_only_the_int8_cpu_graph_on_the_cpu(tmp_path: Path) -> None:
    assert load_profile("sim-cpu").runtime.engine == "openvino"
    for change in ({"runtime__precision": "fp16"}, {"runtime__encoder": "tensorrt"}):
        assert "engine openvino runs the int8 cpu graph" in _errors(
            tmp_path, _changed("sim-cpu", **change))


def test_ort_provider_options_resolve_the_engine_cache(tmp_path: Path) -> None:
    runtime = load_profile("jetson-orin-nano-8gb").runtime
    (trt, trt_options), (cuda, cuda_options), _ = runtime.ort_providers(tmp_path)
    assert (trt, cuda, cuda_options) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", {})
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "trt-engines")
    assert trt_options["trt_int8_enable"] is True
    assert trt_options["trt_max_workspace_size"] == 512 * 2**20


# ---------------------------------------------------------- hardware: JetPack, power mode


@pytest.mark.parametrize("changes, expected", [
    ({"hardware__power_mode": "MAXN"},
     "power_mode 'MAXN' is not a mode of jetson-orin-nano-8gb on JetPack 6.2"),
    ({"hardware__power_mode": "maxn_super"}, "(did you mean 'MAXN_SUPER'?)"),
    ({"hardware__jetpack": "6.1"}, "'MAXN_SUPER' is not a mode of jetson-orin-nano-8gb on "
                                   "JetPack 6.1"),
    ({"hardware__jetpack": "7.0"}, "jetpack '7.0' is not a known JetPack release"),
    ({"hardware__jetpack": 6.2}, "jetpack must be a quoted string"),
    ({"hardware__power_mode": None}, "power_mode is required for jetson-orin-nano-8gb"),
    ({"hardware__jetpack": None}, "jetpack is required for jetson-orin-nano-8gb"),
    ({"hardware__module": "jetson-nano"}, "hardware.module"),
])
def test_bad_hardware_fails(tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    message = _errors(tmp_path, _nano(**changes))
    assert "hardware" in message
    assert expected in message


def test_xavier_nx_cannot_run_jetpack_6(tmp_path: Path) -> None:
    data = _changed("jetson-xavier-nx", hardware__jetpack="6.2")
    assert "jetson-xavier-nx does not run JetPack 6.2" in _errors(tmp_path, data)


def test_sim_cpu_has_no_jetpack_or_power_mode(tmp_path: Path) -> None:
    data = _changed("sim-cpu", hardware__power_mode="15W")
    assert "sim-cpu has no JetPack or power mode" in _errors(tmp_path, data)


# -------------------------------------------------------------------- memory and sizes


def test_memory_budget_over_the_module_fails(tmp_path: Path) -> None:
    message = _errors(tmp_path, _nano(memory_budget_mib=6000))
    assert "memory_budget_mib: 6000 MiB exceeds the ~5120 MiB usable on jetson-orin-nano-8gb" in (
        message)


def test_memory_budget_must_leave_room_beyond_the_trt_workspace(tmp_path: Path) -> None:
    message = _errors(tmp_path, _nano(memory_budget_mib=512))
    assert "leaves no room beyond the TensorRT workspace" in message


def test_max_update_bytes_is_bounded_by_mqtt(tmp_path: Path) -> None:
    message = _errors(tmp_path, _nano(max_update_bytes=2**28))
    assert "max_update_bytes" in message


def test_profiles_are_frozen() -> None:
    profile = load_profile("sim-cpu")
    with pytest.raises(ValueError, match="frozen"):
        profile.memory_budget_mib = 1  # type: ignore[misc]


# -------------------------------------------------------------------------- nvpmodel

NVPMODEL_CONF = """\
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
< POWER_MODEL ID=0 NAME=15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=25W >
< POWER_MODEL ID=2 NAME=MAXN_SUPER >
< POWER_MODEL ID=3 NAME=7W >
< PM_CONFIG DEFAULT=0 >
"""
NVPMODEL_VERBOSE = """\
NVPM VERB: Config file: /etc/nvpmodel.conf
NVPM VERB: parsing done for /etc/nvpmodel.conf
NVPM VERB: POWER_MODEL: ID=0 NAME=15W
NVPM VERB: POWER_MODEL: ID=1 NAME=7W
"""
NVPMODEL_QUERY = "NV Power Mode: MAXN_SUPER\n2\n"


def test_parse_nvpmodel_conf_and_verbose_listing() -> None:
    assert parse_nvpmodel_modes(NVPMODEL_CONF) == {"15W": 0, "25W": 1, "MAXN_SUPER": 2, "7W": 3}
    assert parse_nvpmodel_modes(NVPMODEL_VERBOSE) == {"15W": 0, "7W": 1}


def test_parse_nvpmodel_query() -> None:
    assert parse_nvpmodel_query(NVPMODEL_QUERY) == ("MAXN_SUPER", 2)
    with pytest.raises(ValueError, match="no 'NV Power Mode'"):
        parse_nvpmodel_query("nvpmodel: command not found")


def test_resolve_power_mode_prefers_the_device_table() -> None:
    hardware = load_profile("jetson-orin-nano-8gb").hardware
    assert resolve_power_mode(hardware) == 2
    assert resolve_power_mode(hardware, {"MAXN_SUPER": 7}) == 7
    flashed_without_super = parse_nvpmodel_modes(NVPMODEL_VERBOSE)
    with pytest.raises(ValueError, match=r"no mode 'MAXN_SUPER'.*'15W': 0"):
        resolve_power_mode(hardware, flashed_without_super)
    with pytest.raises(ValueError, match="sim-cpu has no power modes"):
        resolve_power_mode(load_profile("sim-cpu").hardware)


def test_query_power_mode_parses_the_command_output() -> None:
    calls = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=NVPMODEL_QUERY, stderr="")

    assert query_power_mode(fake_run) == ("MAXN_SUPER", 2)
    assert calls == [["nvpmodel", "-q"]]


# ----------------------------------------------------------------------------- schema


def test_exported_schemas_are_current() -> None:
    folder = default_profiles_dir()
    exported = json.loads((folder / PROFILE_SCHEMA_FILE).read_text())
    assert exported == profile_json_schema(), "run `fednano-edge schema` to regenerate"
    exported = json.loads((folder / DEVICE_CONFIG_SCHEMA_FILE).read_text())
    assert exported == device_config_json_schema(), "run `fednano-edge schema` to regenerate"


def test_schema_forbids_unknown_keys() -> None:
    schema = profile_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["RuntimeSettings"]["additionalProperties"] is False
    assert DeviceProfile.model_config.get("extra") == "forbid"


# -------------------------------------------------------------------------------- CLI

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def test_cli_validate_a_shipped_profile_by_name() -> None:
    result = runner.invoke(app, ["validate", "jetson-orin-nano-8gb"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "profile jetson-orin-nano-8gb: valid" in result.output
    assert "MAXN_SUPER (documented id 2)" in result.output
    assert "L4T 36.4.3, CUDA 12.6, TensorRT 10.3" in result.output


def test_cli_validate_a_typo_exits_1_naming_the_field(tmp_path: Path) -> None:
    data = _nano()
    data["runtime"]["provders"] = data["runtime"].pop("providers")
    result = runner.invoke(app, ["validate", str(_write(tmp_path, data))], env=WIDE)
    assert result.exit_code == 1
    assert "runtime.provders: unknown field (did you mean 'providers'?)" in result.output
    assert "runtime.providers: required field is missing" in result.output


def test_cli_validate_an_unknown_kind_of_file(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("hello: world\n")
    result = runner.invoke(app, ["validate", str(path)], env=WIDE)
    assert result.exit_code == 1
    assert "neither a device config" in result.output


def test_cli_validate_a_missing_profile_name() -> None:
    result = runner.invoke(app, ["validate", "no-such-board"], env=WIDE)
    assert result.exit_code == 1
    assert "no such profile" in result.output


def test_cli_profiles_lists_all() -> None:
    result = runner.invoke(app, ["profiles"], env=WIDE)
    assert result.exit_code == 0, result.output
    for name in SHIPPED:
        assert name in result.output
    assert "MODE_20W_6CORE" in result.output


def test_cli_profiles_flags_a_broken_profile(tmp_path: Path) -> None:
    _write(tmp_path, _shipped("sim-cpu"))
    _write(tmp_path, _nano(memory_budget_mib=9000))
    result = runner.invoke(app, ["profiles", "--profiles-dir", str(tmp_path)], env=WIDE)
    assert result.exit_code == 1
    assert "INVALID" in result.output and "memory_budget_mib" in result.output


def test_cli_schema_writes_both_files(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schema", "--out", str(tmp_path)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / PROFILE_SCHEMA_FILE).read_text()) == profile_json_schema()
    assert (tmp_path / DEVICE_CONFIG_SCHEMA_FILE).is_file()


def test_cli_help_names_the_commands() -> None:
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0
    for command in ("validate", "profiles", "schema"):
        assert command in result.output


def test_a_task_batch_above_the_profile_is_split_not_imposed() -> None:
    # jetson-orin-nano-8gb puts at most 8 rows through a step: a round asking for 16 keeps
    # its batch of 16 (the same step) in micro-batches of 8 (the device's memory budget).
    profile = load_profile("jetson-orin-nano-8gb")
    config = resolve_training(profile.training, TaskHParams(batch_size=16, steps=5))
    assert (config.batch_size, config.micro_batch_size) == (16, 8)
    assert resolve_training(profile.training, TaskHParams(batch_size=4)).micro_batch_size is None
