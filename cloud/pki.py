"""The cloud's certificate authority for devices: it signs each X.509 device's certificate.

A device provisioned with X.509 gets a private key (EC P-256) and a certificate whose common
name is its device id, signed by the CA the broker's certificate listener trusts
(``require_certificate``, ``use_identity_as_username``): the broker takes the device's identity
from the certificate, and the device's rights from the dynamic-security client of that name.
Revoking the device deletes that client at the broker; device ids are never reused, so a
revoked device's certificate never again names an account.

``Issuer.load`` reads the CA certificate and key (PEM) named by the cloud's settings;
``Issuer.create`` makes a new CA (tests, ``fednano fleet simulate --network tls``, a first
install); ``Issuer.server_certificate`` signs a broker's certificate for given names and
addresses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.identity import validate_device_id

DEVICE_CERT_DAYS = 825      # what browsers accept for a leaf; a device is re-provisioned after
CA_CERT_DAYS = 3650
MIN_CA_DAYS_LEFT = 30       # a CA closer to its end signs certificates that die with it
MAX_PEM_BYTES = 64 * 1024


class PkiError(ValueError):
    """A CA file is missing, unreadable or not a usable CA (the message says which)."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed certificate and its private key, both PEM; the key is shown once."""

    certificate_pem: bytes
    key_pem: bytes = field(repr=False)
    sha256: str  # hex fingerprint of the DER certificate, kept in the registry
    not_after: dt.datetime


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its signing key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @classmethod
    def create(cls, common_name: str = "FedNano device CA",
               days: int = CA_CERT_DAYS) -> Issuer:
        """A new self-signed CA (EC P-256)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
        return cls(certificate, key)

    @classmethod
    def load(cls, certificate_file: Path, key_file: Path) -> Issuer:
        """The CA from PEM files; ``PkiError`` saying what is wrong with them."""
        cert_pem, key_pem = _read(certificate_file, "CA certificate"), _read(key_file, "CA key")
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as err:
            raise PkiError(f"{certificate_file} is not a PEM certificate: {err}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as err:
            raise PkiError(f"{key_file} is not an unencrypted PEM private key: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PkiError(f"{key_file} holds a {type(key).__name__}, not an EC or RSA key")
        if _public_der(key.public_key()) != _public_der(certificate.public_key()):
            raise PkiError(f"{key_file} is not the key of {certificate_file}")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            raise PkiError(f"{certificate_file} is not a CA certificate (no basicConstraints "
                           "CA:TRUE)")
        if certificate.not_valid_after_utc <= _now() + dt.timedelta(days=MIN_CA_DAYS_LEFT):
            raise PkiError(f"{certificate_file} expires {certificate.not_valid_after_utc:%Y-%m-%d}"
                           f": device certificates would outlive it (make a new CA)")
        return cls(certificate, key)

    def write(self, certificate_file: Path, key_file: Path) -> None:
        """The CA as PEM files (the key mode 0600)."""
        from shared.files import atomic_write

        atomic_write(certificate_file, self.certificate_pem, mode=0o644)
        atomic_write(key_file, self.key_pem, mode=0o600)

    def device_certificate(self, device_id: str, *,
                           days: int = DEVICE_CERT_DAYS) -> IssuedCertificate:
        """A new key and a client certificate with common name ``device_id``."""
        validate_device_id(device_id)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._leaf(key, x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, device_id)]), days)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return self._sign(builder, key)

    def server_certificate(self, names: list[str], *,
                           days: int = DEVICE_CERT_DAYS) -> IssuedCertificate:
        """A new key and a server certificate for ``names`` (DNS names or IP addresses)."""
        if not names:
            raise ValueError("a server certificate needs at least one name or address")
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._leaf(key, x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), days)
        builder = (builder.add_extension(x509.SubjectAlternativeName(alternatives),
                                         critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
        return self._sign(builder, key)

    def _leaf(self, key: ec.EllipticCurvePrivateKey, subject: x509.Name,
              days: int) -> x509.CertificateBuilder:
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        return (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(self.certificate.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False))

    def _sign(self, builder: x509.CertificateBuilder,
              key: ec.EllipticCurvePrivateKey) -> IssuedCertificate:
        certificate = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key),
            certificate.fingerprint(hashes.SHA256()).hex(), certificate.not_valid_after_utc)


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    if len(data) > MAX_PEM_BYTES:
        raise PkiError(f"the {what} {path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
