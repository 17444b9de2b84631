"""ISO 9564-1 format 4 PIN blocks under DUKPT PIN keys, and the stored PIN check."""
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cardcore import dukpt, pin
from cardcore.dukpt import KeyUsage, Ksn

BDK = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1")
IKID = bytes.fromhex("1234567890123456")
CARD = "6225880000001231"


def pin_key(counter: int) -> bytes:
    return dukpt.host_working_key(BDK, Ksn.parse(IKID + counter.to_bytes(4, "big")),
                                  KeyUsage.PIN_ENCRYPTION)


def aes(key, block, decrypt=False):
    c = Cipher(algorithms.AES(key), modes.ECB())
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(block) + op.finalize()


def test_a_terminal_block_deciphers_on_the_host():
    terminal_key = dukpt.working_key(dukpt.initial_key(BDK, IKID), Ksn.parse(IKID + b"\0\0\0\x07"),
                                     KeyUsage.PIN_ENCRYPTION)
    block = pin.encipher(terminal_key, "480362", CARD)
    assert len(block) == 16 and pin.decipher(pin_key(7), block, CARD) == "480362"


def test_the_block_has_the_format_4_layout():
    """Decipher by hand per ISO 9564-1 (independent of psec): PIN field = 4 | len | digits | A fill."""
    key = pin_key(1)
    block = pin.encipher(key, "4803", CARD)
    b = aes(key, block, decrypt=True)
    pan_field = bytes.fromhex(f"{len(CARD) - 12:x}{CARD}".ljust(32, "0"))
    pin_field = aes(key, bytes(x ^ y for x, y in zip(b, pan_field, strict=True)), decrypt=True).hex().upper()
    assert pin_field[:16] == "444803AAAAAAAAAA"
    assert pin.encipher(key, "4803", CARD) != block


@pytest.mark.parametrize("mutate", ["other card", "other key", "flipped bit", "short"])
def test_a_block_for_another_card_or_key_or_damaged_is_refused_without_detail(mutate):
    key = pin_key(1)
    block = pin.encipher(key, "4803", CARD)
    args = {"other card": (key, block, "6225880000001249"),
            "other key": (pin_key(2), block, CARD),
            "flipped bit": (key, bytes([block[0] ^ 1]) + block[1:], CARD),
            "short": (key, block[:8], CARD)}[mutate]
    with pytest.raises(pin.PinBlockError) as err:
        pin.decipher(*args)
    assert str(err.value) == "" and "4803" not in repr(err.value)


def test_the_stored_check_is_keyed_and_bound_to_the_card():
    a = pin.pin_check(b"k" * 32, b"c" * 16, "4803")
    assert len(a) == 32 and a == pin.pin_check(b"k" * 32, b"c" * 16, "4803")
    assert a != pin.pin_check(b"k" * 32, b"d" * 16, "4803")
    assert a != pin.pin_check(b"K" * 32, b"c" * 16, "4803")
    assert a != pin.pin_check(b"k" * 32, b"c" * 16, "4804")


@pytest.mark.parametrize("candidate,weak", [
    ("1234", True), ("9876", True), ("0000", True), ("777777", True), ("0517", True),
    ("1705", True), ("1990", True), ("900517", True), ("4803", False), ("135790", False),
])
def test_obvious_pins_are_weak(candidate, weak):
    assert pin.is_weak(candidate, birthday="1990-05-17") is weak


# ---- the host's fast path against psec and cryptography ------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from psec import pinblock  # noqa: E402

from cardcore.ext import aes as fast_aes  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from([16, 24, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       blocks=st.integers(1, 8).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n)))
def test_openssl_aes_ecb_equals_cryptography(key, blocks):
    assert fast_aes.ecb_encrypt(key, blocks) == aes(key, blocks)
    assert fast_aes.ecb_decrypt(key, blocks) == aes(key, blocks, decrypt=True)


def test_openssl_aes_refuses_bad_sizes():
    for key, data in ((b"k" * 15, b"d" * 16), (b"k" * 16, b"d" * 15), (b"k" * 16, b"")):
        with pytest.raises(ValueError):
            fast_aes.ecb_encrypt(key, data)


def psec_decipher(key, block, number):
    try:
        return pinblock.decipher_pinblock_iso_4(key, block, number)
    except ValueError:
        return None


def ours(key, block, number):
    try:
        return pin.decipher(key, block, number)
    except pin.PinBlockError:
        return None


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16),
       the_pin=st.text(alphabet="0123456789", min_size=4, max_size=12),
       number=st.text(alphabet="0123456789", min_size=8, max_size=19),
       other=st.text(alphabet="0123456789", min_size=8, max_size=19),
       garbage=st.binary(min_size=16, max_size=16))
def test_host_decipher_equals_psec(key, the_pin, number, other, garbage):
    block = pin.encipher(key, the_pin, number)
    assert ours(key, block, number) == psec_decipher(key, block, number) == the_pin
    assert ours(key, block, other) == psec_decipher(key, block, other)
    assert ours(key, garbage, number) == psec_decipher(key, garbage, number)


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=16, max_size=64), card_id=st.binary(min_size=16, max_size=16),
       the_pin=st.text(alphabet="0123456789", min_size=4, max_size=12))
def test_the_fast_pin_check_equals_the_reference(key, card_id, the_pin):
    assert pin.PinChecker(key).check(card_id, the_pin) == pin.pin_check(key, card_id, the_pin)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from([16, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
       nonce=st.binary(min_size=12, max_size=12), plain=st.binary(min_size=1, max_size=64),
       aad=st.binary(max_size=32), flip=st.integers(0, 10_000))
def test_openssl_gcm_decrypt_equals_cryptography(key, nonce, plain, aad, flip):
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sealed = AESGCM(key).encrypt(nonce, plain, aad)
    assert fast_aes.gcm_decrypt(key, nonce, sealed, aad) == plain
    damaged = bytearray(sealed)
    damaged[flip % len(damaged)] ^= 1 << (flip % 8)
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt(nonce, bytes(damaged), aad)
    with pytest.raises(fast_aes.AuthenticationError):
        fast_aes.gcm_decrypt(key, nonce, bytes(damaged), aad)
    with pytest.raises(fast_aes.AuthenticationError):
        fast_aes.gcm_decrypt(key, nonce, sealed, aad + b"x")
