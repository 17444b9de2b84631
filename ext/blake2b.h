/* BLAKE2b (RFC 7693) for short messages, unkeyed, any digest size 1..64: what hashlib.blake2b
 * computes with digest_size=N and no key, salt or person. The gRPC process hashes every
 * operation's request key (8 bytes out) and its digest fields (16 bytes out) with it in one C
 * loop (ext/batchwire.pyx); tests/test_batchwire.py holds it to hashlib. */
#ifndef CARDCORE_BLAKE2B_H
#define CARDCORE_BLAKE2B_H
#include <stdint.h>
#include <string.h>

static const uint64_t cc_b2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};

static const uint8_t cc_b2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define CC_ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define CC_B2B_G(a, b, c, d, x, y) do { \
    v[a] = v[a] + v[b] + (x); v[d] = CC_ROTR64(v[d] ^ v[a], 32); \
    v[c] = v[c] + v[d];       v[b] = CC_ROTR64(v[b] ^ v[c], 24); \
    v[a] = v[a] + v[b] + (y); v[d] = CC_ROTR64(v[d] ^ v[a], 16); \
    v[c] = v[c] + v[d];       v[b] = CC_ROTR64(v[b] ^ v[c], 63); } while (0)

static void cc_b2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t v[16], m[16];
    int i;
    for (i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = cc_b2b_iv[i]; }
    v[12] ^= t;  /* messages here are far below 2^64 bytes: the high counter word stays 0 */
    if (last) v[14] = ~v[14];
    memcpy(m, block, 128);  /* little-endian host (layout.py asserts it) */
    for (i = 0; i < 12; i++) {
        const uint8_t *s = cc_b2b_sigma[i];
        CC_B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        CC_B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        CC_B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        CC_B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        CC_B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        CC_B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        CC_B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        CC_B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* out[0:outlen] = BLAKE2b-(8*outlen)(data[0:len]), unkeyed. */
static void cc_blake2b(uint8_t *out, size_t outlen, const uint8_t *data, size_t len) {
    uint64_t h[8];
    uint8_t block[128];
    size_t done = 0;
    int i;
    for (i = 0; i < 8; i++) h[i] = cc_b2b_iv[i];
    h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;
    while (len - done > 128) {
        memcpy(block, data + done, 128);
        done += 128;
        cc_b2b_compress(h, block, (uint64_t)done, 0);
    }
    memset(block, 0, 128);
    if (len - done) memcpy(block, data + done, len - done);
    cc_b2b_compress(h, block, (uint64_t)len, 1);
    memcpy(out, h, outlen);
}
#endif
