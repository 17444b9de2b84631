"""TLS files checked before gRPC sees them: gRPC answers a missing, swapped or mismatched file
only with "Socket closed" or a handshake failure on its own log. The messages name the option
and the file, never anything read from it."""
from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TlsFileError(Exception):
    """A TLS file that cannot be used, in one line."""


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileError(f"{option} {path}: {exc.strerror or exc}") from None


def _certificates(data: bytes, path: str, option: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsFileError(f"{option} {path} holds no PEM certificate")
    return certs


def _private_key(data: bytes, path: str, option: str):
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, NotImplementedError):
        # TypeError: encrypted (gRPC takes a clear key; the file's mode protects it)
        raise TlsFileError(f"{option} {path} is not an unencrypted PEM private key") from None


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def read_ca(path: str, option: str) -> bytes:
    """A CA bundle: PEM certificates."""
    data = _read(path, option)
    _certificates(data, path, option)
    return data


def read_pair(cert_path: str, key_path: str, cert_option: str, key_option: str,
              ) -> tuple[bytes, bytes]:
    """(certificate chain, private key), PEM: readable, of the right kind, the key the
    certificate's, and the certificate in its validity period."""
    cert_data, key_data = _read(cert_path, cert_option), _read(key_path, key_option)
    leaf = _certificates(cert_data, cert_path, cert_option)[0]
    key = _private_key(key_data, key_path, key_option)
    if _public(key.public_key()) != _public(leaf.public_key()):
        raise TlsFileError(f"{key_option} {key_path} is not the key of {cert_option} {cert_path}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > leaf.not_valid_after_utc:
        raise TlsFileError(f"{cert_option} {cert_path} expired on "
                           f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < leaf.not_valid_before_utc:
        raise TlsFileError(f"{cert_option} {cert_path} is not valid before "
                           f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (this host's clock?)")
    return cert_data, key_data
