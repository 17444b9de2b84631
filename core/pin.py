"""PINs: ISO 9564-1 format 4 PIN blocks and the stored PIN verification value.

Terminals encipher with psec; the host deciphers with psec's algorithm on
OpenSSL's AES (cardcore.ext.aes), held equal to psec by a hypothesis test.

- A PIN block is 16 bytes, AES-enciphered under the transaction's DUKPT PIN
  key and bound to the card number: deciphering with another card number
  yields a field whose control nibble is not 4, which is refused. Only
  format 4 is accepted (formats 0, 1, 3 are TDES-era 8-byte blocks).
- The PIN is never stored: a card record holds
  ``HMAC-SHA256(pin_key, card_id || 0x00 || PIN)`` with the key kept outside
  LMDB, so a stolen data folder cannot be brute-forced over the small PIN
  space. The kernel compares check values in constant time.
- psec's error messages can carry decoded digits: they are swallowed here and
  replaced by ``PinBlockError`` with no detail. Never log a PIN, a PIN block or
  an exception raised while handling one.
"""
from __future__ import annotations

import hashlib
import hmac

from psec import pinblock

from cardcore.cards import PreparedHmac
from cardcore.ext.aes import pin_block_decode

PIN_BLOCK_SIZE = 16
PIN_LEN_MIN, PIN_LEN_MAX = 4, 12
PIN_CHECK_SIZE = 32


class PinBlockError(Exception):
    """The PIN block is not a valid format 4 block for this card (no detail, on purpose)."""


def encipher(pin_key: bytes, pin: str, card_number: str) -> bytes:
    """Terminal side: the format 4 PIN block for ``pin`` bound to ``card_number``."""
    if not (PIN_LEN_MIN <= len(pin) <= PIN_LEN_MAX and pin.isascii() and pin.isdigit()):
        raise ValueError("a PIN is 4 to 12 digits")
    return pinblock.encipher_pinblock_iso_4(pin_key, pin, card_number)


def decipher(pin_key: bytes, block: bytes, card_number: str) -> str:
    """Host side: the PIN inside a format 4 block, or PinBlockError (wrong key, card or format)."""
    if len(block) != PIN_BLOCK_SIZE:
        raise PinBlockError()
    # psec's decipher_pinblock_iso_4 step for step, in C on OpenSSL's AES (psec builds a
    # Python cipher per block); a hypothesis test holds the two equal on right, wrong-card and
    # random blocks.
    pin = pin_block_decode(pin_key, block, card_number)
    if pin is None:
        raise PinBlockError()
    return pin


def pin_check(pin_key: bytes, card_id: bytes, pin: str) -> bytes:
    """The 32-byte PIN verification value stored in the card record (the reference;
    PinChecker is the fast path)."""
    return hmac.digest(pin_key, _check_data(card_id, pin), hashlib.sha256)


def _check_data(card_id: bytes, pin: str) -> bytes:
    return card_id + b"\x00" + pin.encode("ascii")


class PinChecker(PreparedHmac):
    """pin_check() on prepared HMAC states."""

    __slots__ = ()

    def check(self, card_id: bytes, pin: str) -> bytes:
        return self.digest(_check_data(card_id, pin))


def is_weak(pin: str, birthday: str = "") -> bool:
    """Obvious PINs a chain refuses at set or change: one repeated digit, a run up or
    down (1234, 9876), or the member's birthday (MMDD, DDMM, YYYY, YYMMDD, DDMMYY, MMDDYY)."""
    digits = [ord(c) - 48 for c in pin]
    if len(set(digits)) == 1:
        return True
    steps = {b - a for a, b in zip(digits, digits[1:], strict=False)}
    if steps in ({1}, {-1}):
        return True
    if len(birthday) == 10:  # YYYY-MM-DD
        y, m, d = birthday[:4], birthday[5:7], birthday[8:]
        if pin in {m + d, d + m, y, y[2:] + m + d, d + m + y[2:], m + d + y[2:], y + m + d}:
            return True
    return False
