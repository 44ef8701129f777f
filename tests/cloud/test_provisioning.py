"""Device kits: staged beside their folder until the registration is committed."""

from __future__ import annotations

import stat
from pathlib import Path

from cloud.db.models import Device
from cloud.provisioning import DeviceKit, DeviceNetwork


def _kit() -> DeviceKit:
    network = DeviceNetwork(broker_url="mqtts://mqtt.example:8883",
                            bundle_url="https://cloud.example/api/v1/bundles/latest",
                            ca_pem=b"-----BEGIN CERTIFICATE-----\n")
    return DeviceKit(Device(id="orin-7", profile="sim-cpu"), network, secret="s" * 43)


def test_a_staged_kit_is_placed_whole_or_discarded_whole(tmp_path: Path) -> None:
    staged = _kit().stage(tmp_path / "kits" / "orin-7")
    assert not (tmp_path / "kits" / "orin-7").exists()
    placed = staged.place()
    assert sorted(p.name for p in placed) == ["ca.crt", "device.yaml", "password"]
    assert stat.S_IMODE((tmp_path / "kits" / "orin-7" / "password").stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "kits").iterdir()] == ["orin-7"]  # staging gone

    _kit().stage(tmp_path / "other" / "orin-7").discard()
    assert list((tmp_path / "other").iterdir()) == []


def test_the_config_names_the_ca_only_over_tls() -> None:
    kit = _kit()
    assert kit.config["broker"] == {"url": "mqtts://mqtt.example:8883", "ca_file": "ca.crt"}
    plain = DeviceKit(kit.device, DeviceNetwork(broker_url="mqtt://10.0.0.5:1883",
                                                bundle_url="http://10.0.0.5:8000/b",
                                                ca_pem=b"pem"), secret="s" * 43)
    assert plain.config["broker"] == {"url": "mqtt://10.0.0.5:1883"}
    assert "ca.crt" not in plain.files()
