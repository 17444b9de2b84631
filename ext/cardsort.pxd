"""Card ids sorted into LMDB's key order, as the C loops of ``daytotals.pyx`` and ``members.pyx``
both need them (one copy): the keys they read in one go (a cursor that moves forward mostly
stays on its page), each with the number of the entry it came from."""
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcmp, memcpy, memset

cdef enum:
    CARD_ID_SIZE = 16


ctypedef struct CardAt:
    unsigned char id[CARD_ID_SIZE]
    uint32_t k             # the entry's (or the purchase's) number


cdef inline int by_card(const void* x, const void* y) noexcept nogil:
    """Card ids in LMDB's key order (bytes compared unsigned), then by entry."""
    cdef const CardAt* a = <const CardAt*>x
    cdef const CardAt* b = <const CardAt*>y
    cdef int c = memcmp(a.id, b.id, CARD_ID_SIZE)
    if c:
        return c
    return (a.k > b.k) - (a.k < b.k)


cdef inline int sort_cards(CardAt* cards, Py_ssize_t n) noexcept nogil:
    """``cards`` in ``by_card``'s order, in place: counted into 256 buckets by their first byte,
    then each bucket sorted (card ids are keyed digests, so a bucket of a group's 1,000 holds ~4:
    a few comparisons each instead of qsort's ~10 over all; ids alike in their first byte only
    make one bucket, a plain qsort). -1: no memory (nothing changed)."""
    cdef Py_ssize_t start[257]
    cdef Py_ssize_t i, b
    cdef CardAt* out
    if n < 64:  # (a bucket pass costs more than it saves)
        qsort(cards, n, sizeof(CardAt), by_card)
        return 0
    out = <CardAt*>malloc(n * sizeof(CardAt))
    if out == NULL:
        return -1
    memset(start, 0, sizeof(start))
    for i in range(n):
        start[cards[i].id[0] + 1] += 1
    for b in range(256):
        start[b + 1] += start[b]
    for i in range(n):  # (stable: each bucket in entry order)
        b = cards[i].id[0]
        memcpy(&out[start[b]], &cards[i], sizeof(CardAt))
        start[b] += 1
    memcpy(cards, out, n * sizeof(CardAt))
    free(out)
    b = 0
    for i in range(256):  # start[i]: bucket i's end now, so bucket i is start[i-1] .. start[i]
        if start[i] - b > 1:
            qsort(&cards[b], start[i] - b, sizeof(CardAt), by_card)
        b = start[i]
    return 0
