"""The journal's chained digest: a flipped bit or a forged entry in a stored journal is found.

Journal entries are fixed-size byte records whose digest field (the last 32 bytes in the
journal layout) holds a SHA-256 chained over every entry before it::

    digest[n] = SHA-256(digest[n-1] || entry[n][0:digest_offset])
    digest[-1] = 32 zero bytes (the genesis, GENESIS)

and digest[n] is stored in entry[n][digest_offset:digest_offset+32]. Changing any byte of
entry k before its digest field changes digest k and every later digest; changing the stored
digest itself breaks the check at k. Bytes after the digest field, if a layout has any, are not
covered. Someone who rewrites entry k *and* recomputes every digest from k on is found only by
comparing the head digest against one kept elsewhere (a checkpoint, a replica, a backup).

``chain_reference`` is the readable pure-Python definition (hashlib). ``chain`` is the name
callers use: the Cython/OpenSSL ``cardcore.ext.chain.chain_digests`` (the loop in C, the GIL
released) when the extension is built, else the reference. A hypothesis test holds the two to
identical buffers and results. ``check_chain`` verifies stored entries one at a time.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

GENESIS = bytes(32)
DIGEST_SIZE = 32


def _check_sizes(nbytes: int, prev_len: int, entry_size: int, digest_offset: int) -> None:
    """The sizes chain_digests checks, with the same messages, before anything is written."""
    if prev_len != DIGEST_SIZE:
        raise ValueError("prev is a 32-byte digest")
    if entry_size < DIGEST_SIZE or digest_offset < 0 or digest_offset > entry_size - DIGEST_SIZE:
        raise ValueError("an entry holds its 32-byte digest: 0 <= digest_offset <= entry_size - 32")
    if nbytes % entry_size:
        raise ValueError("entries is a whole number of entry_size-byte entries")


def link(prev: bytes, body) -> bytes:
    """One link of the chain: SHA-256(the previous digest | the entry's bytes before its digest).
    The rule in one place for Python: the reference, ``check_chain`` and ``verify`` call it."""
    h = hashlib.sha256(prev)
    h.update(body)
    return h.digest()


def chain_reference(entries: bytearray, prev: bytes, entry_size: int, digest_offset: int) -> bytes:
    """Fill the digest field of every entry in ``entries`` in place; return the last digest.

    ``entries`` is a writable contiguous buffer (a bytearray) of whole ``entry_size``-byte
    entries, ``prev`` the 32-byte digest before the first of them (GENESIS at the start of the
    journal), and each entry's digest goes to [digest_offset, digest_offset + 32). Returns
    ``prev`` (as bytes) when ``entries`` is empty. Raises BufferError for a read-only buffer
    and ValueError on a bad size, before anything is written.
    """
    view = memoryview(entries).cast("B")
    if view.readonly:
        raise BufferError("Object is not writable.")
    prev = bytes(prev)
    _check_sizes(len(view), len(prev), entry_size, digest_offset)
    last = prev
    for start in range(0, len(view), entry_size):
        last = link(last, view[start:start + digest_offset])
        view[start + digest_offset:start + digest_offset + DIGEST_SIZE] = last
    return last


def check_chain(entries: Iterable[tuple[int, bytes]], prev: bytes,
                digest_offset: int) -> tuple[int, bytes]:
    """Verify stored entries, in order, against the chain that starts after ``prev``.

    ``entries`` yields (seq, entry) pairs: seq is the entry's journal sequence number (from 1;
    only reported, not checked for order), entry its stored bytes, at least digest_offset + 32
    long. ``prev`` is the digest before the first entry (GENESIS at the start of the journal).

    Returns ``(bad_seq, digest)``. When every stored digest equals the recomputed one, bad_seq
    is 0 and digest the last entry's (``prev`` when there are none): pass it as ``prev`` to
    verify the next run of entries. Otherwise checking stops at the first entry whose stored
    digest differs: bad_seq is its seq and digest the one recomputed for it (what it should
    hold, given the entries before it). Raises ValueError for a short entry, seq 0, or a
    ``prev`` that is not 32 bytes.
    """
    last = bytes(prev)
    if len(last) != DIGEST_SIZE:
        raise ValueError("prev is a 32-byte digest")
    if digest_offset < 0:
        raise ValueError("digest_offset is 0 or more")
    end = digest_offset + DIGEST_SIZE
    for seq, entry in entries:
        if seq == 0:
            raise ValueError("journal seqs start at 1; 0 means no mismatch")
        view = memoryview(entry).cast("B")
        if len(view) < end:
            raise ValueError(f"entry {seq} is shorter than digest_offset + 32")
        last = link(last, view[:digest_offset])
        if view[digest_offset:end] != last:
            return seq, last
    return 0, last


try:
    from cardcore.ext.chain import chain_digests as chain
except ImportError:  # the extension is not built: the reference, same contract
    chain = chain_reference
