# cython: language_level=3, boundscheck=False, wraparound=False
"""AES-ECB over whole blocks through OpenSSL's EVP interface: the block cipher the DUKPT key
derivation and the PIN block need, without building a Python cipher object per block.

A DUKPT swipe needs about six single-block AES operations, each under a different key;
``cryptography`` creates a Python cipher context for each (a few microseconds apiece, more
in a busy server). Here each call is one C context, keyed and freed in C. This is OpenSSL's
AES, not our own: the module only moves bytes across the boundary. ``cardcore.dukpt`` and
``cardcore.pin`` are checked against the standard's test values and against ``cryptography``
and psec by hypothesis tests.
"""
from libc.stdint cimport uint8_t

cdef extern from "openssl/evp.h":
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new()
    EVP_CIPHER* EVP_CIPHER_fetch(void* libctx, const char* algorithm, const char* properties)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, void* impl,
                          const unsigned char* key, const unsigned char* iv, int enc)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX* ctx, int pad)
    int EVP_CipherUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                         const unsigned char* inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* outm, int* outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX* ctx, int type, int arg, void* ptr)
    enum:
        EVP_CTRL_GCM_SET_IVLEN
        EVP_CTRL_GCM_SET_TAG

cdef enum:
    DATA_BYTES_MAX = 65536
    NONCE_SIZE = 12
    TAG_SIZE = 16

# Fetched once (OpenSSL 3 looks an algorithm up in its provider on every implicit use) and one
# context per key size, re-keyed per call. Calls hold the GIL throughout, so no two use a
# context at once; the contexts live as long as the process.
cdef const EVP_CIPHER* _ciphers[5]
cdef EVP_CIPHER_CTX* _contexts[5]
for _i, _name in enumerate((b"AES-128-ECB", b"AES-192-ECB", b"AES-256-ECB", b"AES-128-GCM",
                            b"AES-256-GCM")):
    _ciphers[_i] = EVP_CIPHER_fetch(NULL, _name, NULL)
    _contexts[_i] = EVP_CIPHER_CTX_new()
    if _ciphers[_i] == NULL or _contexts[_i] == NULL:
        raise ImportError("OpenSSL has no AES-ECB or AES-GCM")


class AuthenticationError(ValueError):
    """AES-GCM: the tag does not match (tampered, or another key, nonce or associated data)."""


cdef bytes _ecb(const uint8_t[::1] key, const uint8_t[::1] data, int enc):
    cdef Py_ssize_t n = data.shape[0]
    cdef int which
    if key.shape[0] == 16:
        which = 0
    elif key.shape[0] == 24:
        which = 1
    elif key.shape[0] == 32:
        which = 2
    else:
        raise ValueError("an AES key is 16, 24 or 32 bytes")
    if n == 0 or n % 16 or n > DATA_BYTES_MAX:
        raise ValueError("AES-ECB takes whole 16-byte blocks")
    out = bytearray(n)
    cdef unsigned char[::1] view = out
    cdef int outl = 0
    cdef EVP_CIPHER_CTX* ctx = _contexts[which]
    cdef int ok = (EVP_CipherInit_ex(ctx, _ciphers[which], NULL, &key[0], NULL, enc) == 1
                   and EVP_CIPHER_CTX_set_padding(ctx, 0) == 1
                   and EVP_CipherUpdate(ctx, &view[0], &outl, &data[0], <int>n) == 1
                   and outl == n)
    if not ok:
        raise RuntimeError("OpenSSL AES-ECB failed")
    return bytes(out)


def ecb_encrypt(const uint8_t[::1] key, const uint8_t[::1] data) -> bytes:
    """AES-ECB encryption of whole blocks (no padding)."""
    return _ecb(key, data, 1)


def ecb_decrypt(const uint8_t[::1] key, const uint8_t[::1] data) -> bytes:
    """AES-ECB decryption of whole blocks (no padding)."""
    return _ecb(key, data, 0)


def gcm_decrypt(const uint8_t[::1] key, const uint8_t[::1] nonce, const uint8_t[::1] data,
                const uint8_t[::1] aad) -> bytes:
    """AES-GCM decryption of ``data`` = ciphertext || 16-byte tag, with a 12-byte nonce; raises
    AuthenticationError unless the tag verifies (checked by EVP_CipherFinal_ex, below)."""
    cdef int which
    if key.shape[0] == 16:
        which = 3
    elif key.shape[0] == 32:
        which = 4
    else:
        raise ValueError("an AES-GCM key here is 16 or 32 bytes")
    cdef Py_ssize_t n = data.shape[0] - TAG_SIZE
    if nonce.shape[0] != NONCE_SIZE or n < 1 or n > DATA_BYTES_MAX or aad.shape[0] > DATA_BYTES_MAX:
        raise ValueError("AES-GCM takes a 12-byte nonce and 1 byte or more of ciphertext")
    tag = bytearray(data[n:])
    cdef unsigned char[::1] tag_view = tag
    out = bytearray(n + 16)
    cdef unsigned char[::1] view = out
    cdef int outl = 0, finl = 0
    cdef EVP_CIPHER_CTX* ctx = _contexts[which]
    if not (EVP_CipherInit_ex(ctx, _ciphers[which], NULL, NULL, NULL, 0) == 1
            and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, NULL) == 1
            and EVP_CipherInit_ex(ctx, NULL, NULL, &key[0], &nonce[0], 0) == 1):
        raise RuntimeError("OpenSSL AES-GCM failed")
    if aad.shape[0] and EVP_CipherUpdate(ctx, NULL, &outl, &aad[0], <int>aad.shape[0]) != 1:
        raise RuntimeError("OpenSSL AES-GCM failed")
    if (EVP_CipherUpdate(ctx, &view[0], &outl, &data[0], <int>n) != 1
            or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, &tag_view[0]) != 1):
        raise RuntimeError("OpenSSL AES-GCM failed")
    if EVP_CipherFinal_ex(ctx, &view[outl], &finl) != 1:  # the tag check
        raise AuthenticationError()
    return bytes(out[:outl + finl])


# ---- the host's per-swipe steps, in C: Python glue cost more than the AES they wrap ---------

cdef extern from "string.h":
    void* memcpy(void* dst, const void* src, size_t n)


cdef int _ecb128(const uint8_t* key, const uint8_t* inp, uint8_t* out, int nbytes, int enc):
    cdef int outl = 0
    cdef EVP_CIPHER_CTX* ctx = _contexts[0]
    return (EVP_CipherInit_ex(ctx, _ciphers[0], NULL, key, NULL, enc) == 1
            and EVP_CIPHER_CTX_set_padding(ctx, 0) == 1
            and EVP_CipherUpdate(ctx, out, &outl, inp, nbytes) == 1 and outl == nbytes)


cdef inline void _derivation_data(uint8_t* d, unsigned int usage, const uint8_t* low,
                                  unsigned int counter):
    """X9.24-3 derivation data for an AES-128 key (cardcore.dukpt._derivation_data)."""
    d[0] = 1; d[1] = 1
    d[2] = usage >> 8; d[3] = usage & 0xFF
    d[4] = 0; d[5] = 2; d[6] = 0; d[7] = 128
    memcpy(d + 8, low, 4)
    d[12] = counter >> 24; d[13] = (counter >> 16) & 0xFF; d[14] = (counter >> 8) & 0xFF
    d[15] = counter & 0xFF


def dukpt_walk(const uint8_t[::1] key, const uint8_t[::1] low, unsigned int working,
               unsigned int counter, usages):
    """From the derivation key ``key`` at counter prefix ``working``, walk the remaining set
    bits of ``counter`` (usage 8000) and derive one AES-128 working key per usage.

    Returns (the new (prefix, key) path entries, the working keys); cardcore.dukpt.KeyPath
    keeps the path. Held to cardcore.dukpt.working_key by a hypothesis test.
    """
    if key.shape[0] != 16 or low.shape[0] != 4 or working & ~counter:
        raise ValueError("a 16-byte key, 4 bytes of key ID and a prefix of the counter")
    cdef uint8_t k[16]
    cdef uint8_t d[16]
    cdef uint8_t out[16]
    cdef unsigned int rest = counter ^ working, bit
    memcpy(k, &key[0], 16)
    entries = []
    while rest:
        bit = 1u << (31 - __builtin_clz(rest))
        rest ^= bit
        working |= bit
        _derivation_data(d, 0x8000, &low[0], working)
        if not _ecb128(k, d, out, 16, 1):
            raise RuntimeError("OpenSSL AES-ECB failed")
        memcpy(k, out, 16)
        entries.append((working, bytes(out[:16])))
    keys = []
    for usage in usages:
        _derivation_data(d, <unsigned int>usage, &low[0], counter)
        if not _ecb128(k, d, out, 16, 1):
            raise RuntimeError("OpenSSL AES-ECB failed")
        keys.append(bytes(out[:16]))
    return entries, keys


cdef extern int __builtin_clz(unsigned int x)


def pin_block_decode(const uint8_t[::1] key, const uint8_t[::1] block, str pan):
    """The PIN in an ISO 9564-1 format 4 block (AES-128), or None when the block is not one for
    this card and key. psec's decipher_pinblock_iso_4 step for step; tested equal to it."""
    cdef Py_ssize_t n = len(pan), i
    if key.shape[0] != 16 or block.shape[0] != 16 or n < 1 or n > 19:
        return None
    cdef uint8_t pan_field[16]
    cdef uint8_t b[16]
    cdef uint8_t f[16]
    cdef int nib[32]
    cdef Py_UCS4 ch
    for i in range(32):
        nib[i] = 0
    nib[0] = n - 12 if n > 12 else 0
    for i in range(n):  # right-justified in 12 digits when shorter, else from nibble 1
        ch = pan[i]
        if ch < u'0' or ch > u'9':
            return None
        nib[1 + (12 - n if n < 12 else 0) + i] = <int>ch - 48
    for i in range(16):
        pan_field[i] = (nib[2 * i] << 4) | nib[2 * i + 1]
    if not _ecb128(&key[0], &block[0], b, 16, 0):
        raise RuntimeError("OpenSSL AES-ECB failed")
    for i in range(16):
        b[i] ^= pan_field[i]
    if not _ecb128(&key[0], b, f, 16, 0):
        raise RuntimeError("OpenSSL AES-ECB failed")
    for i in range(16):
        nib[2 * i], nib[2 * i + 1] = f[i] >> 4, f[i] & 0xF
    cdef int length = nib[1]
    if nib[0] != 4 or length < 4 or length > 12:
        return None
    for i in range(2, 2 + length):
        if nib[i] > 9:
            return None
    for i in range(2 + length, 16):
        if nib[i] != 0xA:
            return None
    return "".join([chr(48 + nib[i]) for i in range(2, 2 + length)])
