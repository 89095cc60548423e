"""Certificates for remote targets: a CA and the server/client pairs for mutual TLS.

ECDSA P-256 throughout (Mbed TLS inside NNG cannot use Ed25519 for TLS). Private keys
are written 0600. ``lugh target certs NAME`` calls :func:`make_target_certs`; the kernel
(:mod:`kernel.remote`) and the SDK (:mod:`lugh_sdk.targets`) load the PEM files into
pynng ``TLSConfig`` objects with :func:`tls_config`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LughOS"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, days: int = 3650):
    """A self-signed CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, cn: str, *, server: bool, hosts=("127.0.0.1", "localhost"), days: int = 825,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None):
    """A leaf certificate signed by the CA: (key, certificate). ``not_before`` and
    ``not_after`` override the validity (tests make expired certificates with them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - dt.timedelta(minutes=5))
               .not_valid_after(not_after or now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_target_certs(out: Path, name: str, hosts=("127.0.0.1", "localhost"), days: int = 825) -> dict:
    """A new CA and a server and a client pair for target ``name`` in ``out`` (0700).
    Returns the paths by role."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_key, ca_cert = make_ca(f"LughOS target CA {name}")
    _write_key(out / "ca.key", ca_key)
    _write_cert(out / "ca.pem", ca_cert)
    for role in ("server", "client"):
        key, cert = issue(ca_key, ca_cert, f"{name} {role}", server=role == "server", hosts=hosts, days=days)
        _write_key(out / f"{role}.key", key)
        _write_cert(out / f"{role}.pem", cert)
    return {f: out / f for f in FILES}


def tls_config(mode: str, ca: Path, cert: Path | None, key: Path | None, server_name: str | None = None):
    """A pynng TLSConfig: ``mode`` "server" (client certificates required) or "client"."""
    import pynng

    kw = dict(ca_string=Path(ca).read_text())
    if cert is not None and key is not None:
        kw.update(own_cert_string=Path(cert).read_text(), own_key_string=Path(key).read_text())
    if mode == "server":
        return pynng.TLSConfig(pynng.TLSConfig.MODE_SERVER, auth_mode=pynng.TLSConfig.AUTH_MODE_REQUIRED, **kw)
    return pynng.TLSConfig(pynng.TLSConfig.MODE_CLIENT, auth_mode=pynng.TLSConfig.AUTH_MODE_REQUIRED,
                           server_name=server_name, **kw)
