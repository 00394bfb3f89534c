"""A private CA and a server certificate for the embedded Prosody.

Clients verify the server for real (``ca_certs=ca.pem`` and hostname checking against the
XMPP domain) instead of switching verification off, so tests exercise the same TLS path as
production. The CA is kept across runs so clients that already trust it keep working; only the
server certificate is reissued when the domain or addresses change.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=3650)
# Reissue well before expiry, and backdate so small clock skews do not matter.
RENEW_MARGIN = dt.timedelta(days=30)
BACKDATE = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertPaths:
    """Where the CA certificate, the server certificate and the server key live."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_directory(cls, directory: Path, service: str = "server") -> CertPaths:
        """The fixed file names `ensure_certificates` uses inside `directory`."""
        return cls(ca=directory / "ca.pem", cert=directory / f"{service}.pem", key=directory / f"{service}-key.pem")


def ensure_certificates(directory: Path, domain: str, ips: Sequence[str] = ("127.0.0.1",),
                        service: str = "server", hosts: Sequence[str] = ()) -> CertPaths:
    """Create (or reuse, when still valid for `domain` and `ips`) a CA and a certificate for one
    service of the grid: the XMPP server (``server.pem``), or e.g. the relay's SMTP STARTTLS
    (``service="relay"``: ``relay.pem``, issued by the same CA, for the address it listens on).
    `hosts` are further DNS names the service is dialled by (a container's service name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths.in_directory(directory, service)
    ca_key_path = directory / "ca-key.pem"

    ca = _load_ca(paths.ca, ca_key_path)
    if ca is None:
        ca = _new_ca(domain)
        _write_key(ca_key_path, ca[1])
        _write_cert(paths.ca, ca[0])
    ca_cert, ca_key = ca

    if not _server_cert_ok(paths, ca_cert, domain, ips, hosts):
        cert, key = _new_server_cert(ca_cert, ca_key, domain, ips, hosts)
        _write_key(paths.key, key)
        _write_cert(paths.cert, cert)
    return paths


def cert_ips(host: str) -> list[str]:
    """The IP addresses a service listening on `host` is reached at: loopback always, plus `host`
    when it is one specific IP (a host name is covered by the DNS names)."""
    ips = ["127.0.0.1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ips
    return list(dict.fromkeys([*ips, str(address)]))


# --- building ---------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca(domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gridpresence"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"gridpresence private CA for {domain}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, domain: str, ips: Sequence[str],
    hosts: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_wanted_names(domain, ips, hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _wanted_names(domain: str, ips: Sequence[str], hosts: Sequence[str] = ()) -> list[x509.GeneralName]:
    """SANs: the domain, its subdomains (components), localhost, each further host name and
    each IP address."""
    names: list[x509.GeneralName] = []
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    try:
        addresses.insert(0, ipaddress.ip_address(domain))  # an IP literal as the XMPP domain
    except ValueError:
        names += [x509.DNSName(domain), x509.DNSName(f"*.{domain}")]
    if domain.lower() != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [x509.DNSName(h) for h in dict.fromkeys(hosts) if h.lower() not in (domain.lower(), "localhost")]
    names += [x509.IPAddress(a) for a in dict.fromkeys(addresses)]
    return names


# --- reuse checks -----------------------------------------------------------------------


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The stored CA when both files load, belong together and are far from expiry."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    if not _fresh(cert):
        return None
    return cert, key


def _server_cert_ok(paths: CertPaths, ca_cert: x509.Certificate, domain: str, ips: Sequence[str],
                    hosts: Sequence[str] = ()) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return (
        key.public_key() == cert.public_key()
        and _fresh(cert)
        and set(_wanted_names(domain, ips, hosts)) <= set(sans)
    )


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - RENEW_MARGIN > _now() >= cert.not_valid_before_utc


# --- writing ----------------------------------------------------------------------------


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(path, pem, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with `mode`, so a key is never briefly world-readable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)  # exact mode, whatever the umask or a leftover tmp file had
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
