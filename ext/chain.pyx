# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The journal's chained digest in C: OpenSSL's SHA-256 over a buffer of fixed-size entries.

Each entry's digest covers the previous entry's digest and the entry's own bytes before its
digest field, so a flipped bit or a forged entry in a stored journal breaks the chain::

    digest[n] = SHA-256(digest[n-1] || entry[n][0:digest_offset])
    digest[-1] = 32 zero bytes (the genesis, cardcore.chain.GENESIS)

and digest[n] is stored in entry[n][digest_offset:digest_offset+32] (the last 32 bytes of an
entry in the journal layout). Bytes after the digest field, if any, are not covered.

The readable reference is cardcore.chain.chain_reference; a hypothesis test holds the two to
the same buffers and results. Sizes are checked before the loop; the loop touches only C
pointers and runs with the GIL released, so other threads run while a long journal is hashed.
This is OpenSSL's SHA-256 (SHA-NI where the CPU has it), not our own.
"""
from libc.stdint cimport uint8_t
from libc.string cimport memcpy

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD_CTX:
        pass
    ctypedef struct EVP_MD:
        pass
    EVP_MD* EVP_MD_fetch(void* libctx, const char* algorithm, const char* properties)
    EVP_MD_CTX* EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX* ctx)
    int EVP_DigestInit_ex(EVP_MD_CTX* ctx, const EVP_MD* type, void* impl)
    int EVP_DigestUpdate(EVP_MD_CTX* ctx, const void* d, size_t cnt)
    int EVP_DigestFinal_ex(EVP_MD_CTX* ctx, unsigned char* md, unsigned int* s)

cdef enum:
    DIGEST_SIZE = 32

# Fetched once: OpenSSL 3 looks an algorithm up in its provider on every implicit use
# (EVP_sha256() in EVP_DigestInit_ex). The EVP_MD lives as long as the process. A context is
# per call (the loop runs without the GIL, so calls may overlap) and reused across its entries.
cdef const EVP_MD* _sha256 = EVP_MD_fetch(NULL, b"SHA256", NULL)
if _sha256 == NULL:
    raise ImportError("OpenSSL has no SHA-256")


def chain_digests(uint8_t[::1] entries, const uint8_t[::1] prev, Py_ssize_t entry_size,
                  Py_ssize_t digest_offset) -> bytes:
    """Fill the digest field of every entry in ``entries`` in place; return the last digest.

    ``entries`` is a writable contiguous buffer (a bytearray) of whole ``entry_size``-byte
    entries, ``prev`` the 32-byte digest before the first of them (GENESIS at the start of
    the journal), and each entry's digest goes to [digest_offset, digest_offset + 32).
    Returns ``prev`` (as bytes) when ``entries`` is empty. Raises ValueError on a bad size,
    before anything is written, and RuntimeError if OpenSSL fails (entries up to the failing
    one then hold their digests).
    """
    cdef Py_ssize_t n = entries.shape[0]
    if prev.shape[0] != DIGEST_SIZE:
        raise ValueError("prev is a 32-byte digest")
    if entry_size < DIGEST_SIZE or digest_offset < 0 or digest_offset > entry_size - DIGEST_SIZE:
        raise ValueError("an entry holds its 32-byte digest: 0 <= digest_offset <= entry_size - 32")
    if n % entry_size:
        raise ValueError("entries is a whole number of entry_size-byte entries")
    cdef uint8_t head[DIGEST_SIZE]
    memcpy(head, &prev[0], DIGEST_SIZE)  # prev may be a view into entries
    if n == 0:
        return <bytes>(<char*>head)[:DIGEST_SIZE]

    cdef Py_ssize_t count = n // entry_size, i
    cdef uint8_t* entry = &entries[0]
    cdef const uint8_t* last = head
    cdef size_t covered = <size_t>digest_offset
    cdef unsigned int outl = 0
    cdef int ok = 1
    cdef EVP_MD_CTX* ctx = EVP_MD_CTX_new()
    if ctx == NULL:
        raise MemoryError()
    with nogil:
        for i in range(count):
            # The digest field is written only after the bytes before it were read, and
            # `last` (the previous entry's field, or head) is never the field being written.
            if (EVP_DigestInit_ex(ctx, _sha256, NULL) != 1
                    or EVP_DigestUpdate(ctx, last, DIGEST_SIZE) != 1
                    or EVP_DigestUpdate(ctx, entry, covered) != 1
                    or EVP_DigestFinal_ex(ctx, entry + digest_offset, &outl) != 1
                    or outl != DIGEST_SIZE):
                ok = 0
                break
            last = entry + digest_offset
            entry += entry_size
    EVP_MD_CTX_free(ctx)
    if not ok:
        raise RuntimeError("OpenSSL SHA-256 failed")
    return <bytes>(<const char*>last)[:DIGEST_SIZE]
