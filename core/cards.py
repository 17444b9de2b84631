"""Card numbers: validation, masking and the keyed index that replaces them at rest.

A card number never reaches LMDB, the journal or a log: the ledger keys cards
by ``card_id = HMAC-SHA256(index_key, number)[:16]`` (128 bits: collisions
need ~2**64 cards) and shows people only the masked form.
"""
from __future__ import annotations

import hashlib
import hmac
import random

CARD_NUMBER_LEN_MIN = 8
CARD_NUMBER_LEN_MAX = 19


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The digit that makes ``partial + digit`` pass the Luhn check (tests, card issuing)."""
    for d in "0123456789":
        if luhn_ok(partial + d):
            return d
    raise AssertionError("unreachable: one digit always completes a Luhn number")


def number_ok(number: str, require_luhn: bool) -> bool:
    """8..19 ASCII digits, and a valid check digit when the program asks for one."""
    if not CARD_NUMBER_LEN_MIN <= len(number) <= CARD_NUMBER_LEN_MAX:
        return False
    if not (number.isascii() and number.isdigit()):
        return False
    return luhn_ok(number) or not require_luhn


MASK_HIDDEN_MIN = 6


def mask(number: str) -> str:
    """At most the first 6 and the last 4 digits, never fewer than 6 hidden (short numbers show less)."""
    n = len(number)
    last = min(4, max(0, n - MASK_HIDDEN_MIN))
    first = min(6, max(0, n - MASK_HIDDEN_MIN - last))
    return number[:first] + "*" * (n - first - last) + number[n - last:]


def card_id(index_key: bytes, number: str) -> bytes:
    """The 16-byte keyed index of a card number (the reference; CardIndex is the fast path)."""
    return hmac.digest(index_key, number.encode("ascii"), hashlib.sha256)[:16]


class PreparedHmac:
    """HMAC-SHA256 with the key's inner and outer states computed once (RFC 2104).

    Every swipe computes one or two keyed hashes (card id, PIN check); copying
    two prepared states costs a fraction of a one-shot HMAC, which sets the key
    up anew each time. A test holds it to ``hmac.digest``.
    """

    __slots__ = ("_inner", "_outer")
    BLOCK = 64

    def __init__(self, key: bytes):
        if not 16 <= len(key) <= self.BLOCK:
            raise ValueError("an HMAC key here is 16 to 64 bytes")
        padded = key.ljust(self.BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class CardIndex(PreparedHmac):
    """card_id() on prepared HMAC states: the fast path of every swipe."""

    __slots__ = ()

    def card_id(self, number: str) -> bytes:
        return self.digest(number.encode("ascii"))[:16]


def random_number(rng: random.Random, prefix: str = "62", length: int = 16) -> str:
    """A random card number with a valid check digit (tests, benchmarks, issuing stock)."""
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return body + luhn_check_digit(body)
