"""Card data on the wire: the card number encrypted under a DUKPT data key, both sides.

A terminal sends ``CardRef.secure``: nonce (12 bytes) || AES-128-GCM(number) || tag (16 bytes)
under the transaction's "data encryption" working key, with the 12-byte KSN as associated data.
The terminal library encrypts (``encrypt_card_data``); the server opens every swipe with
``decrypt_card_data``. It lives here, in the core both share, so the server never imports a
client library.
"""
from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cardcore.ext.aes import AuthenticationError, gcm_decrypt

NONCE_SIZE, TAG_SIZE = 12, 16
CARD_DATA_SIZE_MAX = NONCE_SIZE + 19 + TAG_SIZE


class CardDataError(Exception):
    """Encrypted card data that does not open under this transaction's data key (no detail)."""


def encrypt_card_data(data_key: bytes, ksn: bytes, number: str) -> bytes:
    """Terminal side: a fresh random nonce per transaction."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(data_key).encrypt(nonce, number.encode("ascii"), ksn)


def decrypt_card_data(data_key: bytes, ksn: bytes, blob: bytes) -> str:
    """Host side (every swipe): OpenSSL's AES-GCM through cardcore.ext.aes, one C context
    reused; a test holds it to cryptography's AESGCM."""
    if not NONCE_SIZE + TAG_SIZE < len(blob) <= CARD_DATA_SIZE_MAX:
        raise CardDataError()
    try:
        return gcm_decrypt(data_key, blob[:NONCE_SIZE], blob[NONCE_SIZE:], ksn).decode("ascii")
    except (AuthenticationError, UnicodeDecodeError):
        raise CardDataError() from None
