"""AES DUKPT against the test values of ANSI X9.24-3-2017 (../shared/SECURITY_NOTES.md)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardcore import dukpt
from cardcore.dukpt import KeyUsage, Ksn

BDK = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1")
IKID = bytes.fromhex("1234567890123456")


def test_initial_key():
    assert dukpt.initial_key(BDK, IKID).hex().upper() == "1273671EA26AC29AFA4D1084127652A1"


@pytest.mark.parametrize("counter,usage,key", [
    (1, KeyUsage.PIN_ENCRYPTION, "AF8CB133A78F8DC2D1359F18527593FB"),
    (1, KeyUsage.MAC_GENERATION, "A2DC23DE6FDE0824A2BC321E08E4B8B7"),
    (1, KeyUsage.DATA_ENCRYPTION, "A35C412EFD41FDB98B69797C02DCD08F"),
    (1, KeyUsage.KEY_ENCRYPTION, "36A724B7BEFA5A25F5E7B5782A4554A2"),
    (2, KeyUsage.PIN_ENCRYPTION, "D30BDC73EC9714B000BEC66BDB7B6D09"),
])
def test_host_working_keys(counter, usage, key):
    ksn = Ksn.parse(IKID + counter.to_bytes(4, "big"))
    assert dukpt.host_working_key(BDK, ksn, usage).hex().upper() == key


def test_derivation_key_at_the_last_counter():
    ik = dukpt.initial_key(BDK, IKID)
    assert dukpt.derivation_key(ik, IKID, 0xFFFF0000).hex().upper() == "F6BA59389BD14A9855BE9727E7C52E3C"


def test_terminal_and_host_derive_the_same_key():
    ik = dukpt.initial_key(BDK, IKID)
    ksn = Ksn.parse(IKID + (0x00010203).to_bytes(4, "big"))
    assert dukpt.working_key(ik, ksn, KeyUsage.PIN_ENCRYPTION) == \
        dukpt.host_working_key(BDK, ksn, KeyUsage.PIN_ENCRYPTION)


@pytest.mark.parametrize("ksn", [
    IKID + (0).to_bytes(4, "big"),              # counter 0 is never used
    IKID + (0xFFFF0001).to_bytes(4, "big"),     # beyond the largest counter
    IKID + (0x0001FFFF).to_bytes(4, "big"),     # 17 one-bits
    IKID + b"\x01",                             # not 12 bytes
])
def test_impossible_ksns_are_refused(ksn):
    with pytest.raises(ValueError):
        Ksn.parse(ksn)


valid_counters = st.integers(1, dukpt.COUNTER_MAX).filter(
    lambda c: bin(c).count("1") <= dukpt.COUNTER_ONE_BITS_MAX)


@settings(max_examples=100, deadline=None)
@given(starts=st.lists(valid_counters, min_size=1, max_size=6), run=st.integers(1, 40))
def test_the_cached_key_path_equals_the_full_derivation(starts, run):
    """KeyPath (host and terminal) remembers the last path; it must give the standard's keys,
    for runs of consecutive counters and for jumps up and down between them."""
    ik = dukpt.initial_key(BDK, IKID)
    path = dukpt.KeyPath(ik, IKID)
    for counter in starts:
        for _ in range(run):
            ksn = Ksn(IKID, counter)
            data, pin_key = path.working_keys(counter, KeyUsage.DATA_ENCRYPTION,
                                              KeyUsage.PIN_ENCRYPTION)
            assert data == dukpt.working_key(ik, ksn, KeyUsage.DATA_ENCRYPTION)
            assert pin_key == dukpt.working_key(ik, ksn, KeyUsage.PIN_ENCRYPTION)
            if counter >= dukpt.COUNTER_MAX - 0x10000:
                break
            counter = dukpt.next_counter(counter)


def test_next_counter_skips_counters_with_more_than_16_one_bits():
    assert dukpt.next_counter(0) == 1
    assert dukpt.next_counter(0xFFFF) == 0x10000
    c = dukpt.next_counter(0x0000FFFF << 8)  # 16 one bits: +1 gives 17 -> carried past
    assert bin(c).count("1") <= 16 and c > 0x0000FFFF << 8
    with pytest.raises(ValueError):
        dukpt.next_counter(dukpt.COUNTER_MAX)
