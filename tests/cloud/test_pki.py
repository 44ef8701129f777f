"""The device CA: certificates it signs verify against it, name the device, and a CA that
cannot be used is refused in one line saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cloud.pki import Issuer, PkiError


def test_a_device_certificate_names_the_device_and_verifies_against_the_ca() -> None:
    ca = Issuer.create()
    issued = ca.device_certificate("orin-7")
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem)
    certificate.verify_directly_issued_by(ca.certificate)
    assert certificate.subject.rfc4514_string() == "CN=orin-7"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.sha256 == certificate.fingerprint(certificate.signature_hash_algorithm).hex()  # type: ignore[arg-type]
    assert b"PRIVATE KEY" in issued.key_pem and "PRIVATE" not in repr(issued)
    with pytest.raises(ValueError, match="device id"):
        ca.device_certificate("bad/id")


def test_a_server_certificate_covers_names_and_addresses() -> None:
    issued = Issuer.create().server_certificate(["192.0.2.7", "mqtt.example"])
    certificate = x509.load_pem_x509_certificate(issued.certificate_pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.example"]


def test_the_ca_round_trips_through_its_files(tmp_path: Path) -> None:
    ca = Issuer.create()
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    loaded = Issuer.load(tmp_path / "ca.crt", tmp_path / "ca.key")
    certificate = x509.load_pem_x509_certificate(loaded.device_certificate("d1").certificate_pem)
    certificate.verify_directly_issued_by(ca.certificate)


def test_unusable_ca_files_are_refused_saying_why(tmp_path: Path) -> None:
    ca, other = Issuer.create(), Issuer.create()
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    other.write(tmp_path / "other.crt", tmp_path / "other.key")
    leaf = ca.device_certificate("d1")
    (tmp_path / "leaf.crt").write_bytes(leaf.certificate_pem)
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem)
    (tmp_path / "junk").write_text("not a certificate")
    cases = {
        ("missing.crt", "ca.key"): "cannot read the CA certificate",
        ("junk", "ca.key"): "is not a PEM certificate",
        ("ca.crt", "junk"): "is not an unencrypted PEM private key",
        ("ca.crt", "other.key"): "is not the key of",
        ("leaf.crt", "leaf.key"): "is not a CA certificate",
    }
    Issuer.create(days=10).write(tmp_path / "old.crt", tmp_path / "old.key")
    cases[("old.crt", "old.key")] = "expires .*: device certificates would outlive it"
    for (cert, key), message in cases.items():
        with pytest.raises(PkiError, match=message) as refused:
            Issuer.load(tmp_path / cert, tmp_path / key)
        assert "\n" not in str(refused.value)
