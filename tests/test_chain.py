"""The journal's chained digest: the Cython/OpenSSL loop against the hashlib reference, known
answers, tamper detection and the size checks."""
from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardcore import chain as C
from cardcore.ext.chain import chain_digests

IMPLS = [chain_digests, C.chain_reference]
ENTRY_SIZE, OFFSET = 256, 224  # the coming journal layout: the digest in the last 32 bytes


def entries_of(buf: bytes | bytearray, size: int = ENTRY_SIZE):
    """(seq, entry) pairs from a contiguous buffer, seqs from 1 as in the journal."""
    return [(i // size + 1, bytes(buf[i:i + size])) for i in range(0, len(buf), size)]


def digests_of(buf: bytes | bytearray, size: int = ENTRY_SIZE, offset: int = OFFSET):
    return [bytes(buf[i + offset:i + offset + 32]) for i in range(0, len(buf), size)]


@st.composite
def chains(draw):
    """A buffer of 0..50 random entries, an entry size, a digest offset and a random prev."""
    size = draw(st.integers(32, 300))
    offset = draw(st.integers(0, size - 32))
    count = draw(st.integers(0, 50))
    data = draw(st.binary(min_size=count * size, max_size=count * size))
    prev = draw(st.binary(min_size=32, max_size=32))
    return bytearray(data), prev, size, offset


@settings(max_examples=500, deadline=None)
@given(chains())
def test_cython_equals_reference(case):
    data, prev, size, offset = case
    fast, slow = bytearray(data), bytearray(data)
    got_fast = chain_digests(fast, prev, size, offset)
    got_slow = C.chain_reference(slow, prev, size, offset)
    assert type(got_fast) is bytes and type(got_slow) is bytes
    assert got_fast == got_slow
    assert fast == slow
    if not data:
        assert got_fast == prev
    else:
        assert got_fast == bytes(fast[-size + offset:][:32])
    # only the digest fields were written
    for i in range(0, len(data), size):
        e, o = data[i:i + size], fast[i:i + size]
        assert o[:offset] == e[:offset] and o[offset + 32:] == e[offset + 32:]
    # and the chain verifies
    assert C.check_chain(entries_of(fast, size), prev, offset) == (0, got_fast)


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer(impl):
    e0 = bytes(range(224)) + bytes(32)
    e1 = bytes(255 - i for i in range(224)) + bytes(32)
    d0 = hashlib.sha256(bytes(32) + e0[:224]).digest()
    d1 = hashlib.sha256(d0 + e1[:224]).digest()
    # independently, from `openssl dgst -sha256` over the same bytes
    assert d0.hex() == "c5574dae8316de05e9fed811d0bc9f4d95b2a15df3c62b54b6b790c97766221b"
    assert d1.hex() == "e65de1a1d364eba92f4be9fbddf7b307ea8465aab82eaf8add393e435aa4f14c"
    buf = bytearray(e0 + e1)
    assert impl(buf, C.GENESIS, 256, 224) == d1
    assert bytes(buf) == e0[:224] + d0 + e1[:224] + d1
    # a chain continued from its last digest is the same chain
    buf2 = bytearray(e1)
    assert impl(buf2, d0, 256, 224) == d1


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_returns_prev(impl):
    prev = bytes(range(32))
    assert impl(bytearray(), prev, 256, 224) == prev
    assert C.check_chain([], prev, 224) == (0, prev)


def test_fast_path_is_the_extension():
    assert C.chain is chain_digests


@st.composite
def tampered(draw):
    """A chained journal of 1..20 entries, one entry k, one byte in it and a bit to flip."""
    count = draw(st.integers(1, 20))
    data = bytearray(draw(st.binary(min_size=count * ENTRY_SIZE, max_size=count * ENTRY_SIZE)))
    prev = draw(st.sampled_from([C.GENESIS, bytes(range(32))]))
    head = chain_digests(data, prev, ENTRY_SIZE, OFFSET)
    k = draw(st.integers(0, count - 1))
    byte = draw(st.integers(0, ENTRY_SIZE - 1))
    bit = draw(st.integers(0, 7))
    return data, prev, head, k, byte, bit


@settings(max_examples=300, deadline=None)
@given(tampered())
def test_flipped_bit_is_found(case):
    data, prev, head, k, byte, bit = case
    stored = bytearray(data)
    stored[k * ENTRY_SIZE + byte] ^= 1 << bit
    # check_chain over the stored (tampered) journal reports entry k, whichever byte it was
    bad, digest = C.check_chain(entries_of(stored), prev, OFFSET)
    assert bad == k + 1  # seqs from 1
    if byte < OFFSET:
        # re-chaining the tampered bytes changes digest k and every later one
        rechained = bytearray(stored)
        new_head = chain_digests(rechained, prev, ENTRY_SIZE, OFFSET)
        before, after = digests_of(data), digests_of(rechained)
        assert after[:k] == before[:k]
        assert all(a != b for a, b in zip(after[k:], before[k:]))
        assert new_head != head
        assert digest == after[k]
    else:
        # the stored digest itself was changed: the recomputed one is the original
        assert digest == digests_of(data)[k]


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 10), st.data())
def test_forged_entry_is_found_at_the_next(count, data):
    """A forger who rewrites entry k with a valid digest for it is found at entry k + 1; one who
    rewrites the whole tail is found only against a head digest kept elsewhere."""
    buf = bytearray(data.draw(st.binary(min_size=count * ENTRY_SIZE, max_size=count * ENTRY_SIZE)))
    head = chain_digests(buf, C.GENESIS, ENTRY_SIZE, OFFSET)
    k = data.draw(st.integers(0, count - 2))
    forged = bytearray(data.draw(st.binary(min_size=ENTRY_SIZE, max_size=ENTRY_SIZE)))
    prev_k = C.GENESIS if k == 0 else digests_of(buf)[k - 1]
    chain_digests(forged, prev_k, ENTRY_SIZE, OFFSET)
    stored = bytearray(buf)
    stored[k * ENTRY_SIZE:(k + 1) * ENTRY_SIZE] = forged
    if forged[:OFFSET] == buf[k * ENTRY_SIZE:k * ENTRY_SIZE + OFFSET]:
        return  # not a forgery
    assert C.check_chain(entries_of(stored), C.GENESIS, OFFSET)[0] == k + 2
    rechained = bytearray(stored)
    assert chain_digests(rechained, C.GENESIS, ENTRY_SIZE, OFFSET) != head
    assert C.check_chain(entries_of(rechained), C.GENESIS, OFFSET) == (
        0, chain_digests(bytearray(rechained), C.GENESIS, ENTRY_SIZE, OFFSET))


def test_check_chain_in_runs():
    """check_chain's digest continues a verification over the next run of entries."""
    buf = bytearray(bytes(range(256)) * 6)
    head = chain_digests(buf, C.GENESIS, 256, 224)
    pairs = entries_of(buf)
    bad, mid = C.check_chain(pairs[:4], C.GENESIS, 224)
    assert bad == 0 and mid == digests_of(buf)[3]
    assert C.check_chain(pairs[4:], mid, 224) == (0, head)
    # a wrong starting digest is found at the first entry
    assert C.check_chain(pairs[4:], C.GENESIS, 224)[0] == 5


BAD_SIZES = [
    # (buffer length, prev length, entry_size, digest_offset)
    (256 * 2 + 1, 32, 256, 224),  # not whole entries
    (255, 32, 256, 224),
    (256, 31, 256, 224),  # prev not 32 bytes
    (256, 33, 256, 224),
    (256, 0, 256, 224),
    (256, 32, 256, 225),  # digest runs past the entry
    (256, 32, 256, 256),
    (256, 32, 256, -1),
    (0, 32, 256, -1),
    (0, 32, 256, 2**62),  # no overflow in digest_offset + 32
    (0, 32, 0, 0),  # no room for a digest
    (0, 32, 31, 0),
    (0, 32, -256, 0),
    (0, 32, -(2**62), -(2**62)),
    (0, 31, 256, 224),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nbytes,prev_len,entry_size,offset", BAD_SIZES)
def test_bad_sizes_raise_before_writing(impl, nbytes, prev_len, entry_size, offset):
    buf = bytearray(b"\xaa" * nbytes)
    with pytest.raises(ValueError):
        impl(buf, bytes(prev_len), entry_size, offset)
    assert buf == b"\xaa" * nbytes


@pytest.mark.parametrize("impl", IMPLS)
def test_read_only_buffer_is_refused(impl):
    with pytest.raises(BufferError):
        impl(bytes(512), C.GENESIS, 256, 224)


def test_check_chain_bad_input():
    with pytest.raises(ValueError):
        C.check_chain([(1, bytes(255))], C.GENESIS, 224)  # shorter than offset + 32
    with pytest.raises(ValueError):
        C.check_chain([(0, bytes(256))], C.GENESIS, 224)  # seq 0 is the no-mismatch answer
    with pytest.raises(ValueError):
        C.check_chain([], bytes(31), 224)


def test_prev_may_view_the_buffer():
    """prev read from the buffer being chained (entry 0's own digest field) is read before
    entry 0's digest is written."""
    data = bytearray(bytes(range(256)) * 3)
    expect = bytearray(data)
    want = C.chain_reference(expect, bytes(data[224:256]), 256, 224)
    assert chain_digests(data, memoryview(data)[224:256], 256, 224) == want
    assert data == expect


def test_threads_share_the_module():
    """Calls from several threads (the loop runs without the GIL) give the serial answers."""
    bufs = [bytearray(bytes([i]) * 256 * 2000) for i in range(4)]
    want = [C.chain_reference(bytearray(b), C.GENESIS, 256, 224) for b in bufs]
    got = [None] * len(bufs)

    def run(i):
        got[i] = chain_digests(bufs[i], C.GENESIS, 256, 224)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bufs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
