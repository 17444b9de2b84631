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
    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new() nogil
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX* ctx) nogil
    const EVP_CIPHER* EVP_aes_128_ecb() nogil
    const EVP_CIPHER* EVP_aes_192_ecb() nogil
    const EVP_CIPHER* EVP_aes_256_ecb() nogil
    int EVP_CipherInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, void* impl,
                          const unsigned char* key, const unsigned char* iv, int enc) nogil
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX* ctx, int pad) nogil
    int EVP_CipherUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                         const unsigned char* inp, int inl) nogil

DATA_BYTES_MAX = 1 << 16


cdef bytes _ecb(const uint8_t[::1] key, const uint8_t[::1] data, int enc):
    cdef const EVP_CIPHER* cipher
    cdef Py_ssize_t n = data.shape[0]
    if key.shape[0] == 16:
        cipher = EVP_aes_128_ecb()
    elif key.shape[0] == 24:
        cipher = EVP_aes_192_ecb()
    elif key.shape[0] == 32:
        cipher = EVP_aes_256_ecb()
    else:
        raise ValueError("an AES key is 16, 24 or 32 bytes")
    if n == 0 or n % 16 or n > DATA_BYTES_MAX:
        raise ValueError("AES-ECB takes whole 16-byte blocks")
    out = bytearray(n)
    cdef unsigned char[::1] view = out
    cdef int outl = 0
    cdef int ok
    cdef EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL:
        raise MemoryError()
    with nogil:
        ok = (EVP_CipherInit_ex(ctx, cipher, NULL, &key[0], NULL, enc) == 1
              and EVP_CIPHER_CTX_set_padding(ctx, 0) == 1
              and EVP_CipherUpdate(ctx, &view[0], &outl, &data[0], <int>n) == 1
              and outl == n)
        EVP_CIPHER_CTX_free(ctx)
    if not ok:
        raise RuntimeError("OpenSSL AES-ECB failed")
    return bytes(out)


def ecb_encrypt(const uint8_t[::1] key, const uint8_t[::1] data) -> bytes:
    """AES-ECB encryption of whole blocks (no padding)."""
    return _ecb(key, data, 1)


def ecb_decrypt(const uint8_t[::1] key, const uint8_t[::1] data) -> bytes:
    """AES-ECB decryption of whole blocks (no padding)."""
    return _ecb(key, data, 0)
