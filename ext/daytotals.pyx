# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The day totals' inner loop (``cardcore.daytotals``): a run of journal entries of one business
day added up per store, and the clearing rule's home of the money followed card by card, in C.
``daytotals.add_figures`` and ``DayTotals._money`` are the reference it is held to (tests:
the same records either way); this is only their speed."""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

# layout.JOURNAL offsets, layout.DAY_FIGURES positions, operation types
cdef enum:
    ENTRY_SIZE = 256
    NF = 24          # layout.DAY_FIGURE_SLOTS
    NOPS = 40        # layout.DAY_OPS
    WIDTH = NF + 2 * NOPS
    F_ENTRIES = 0
    F_P_IN = 1
    F_P_OUT = 2
    F_B_IN = 3
    F_B_OUT = 4
    F_PTS_IN = 5
    F_PTS_OUT = 6
    F_GROSS = 7
    F_DISCOUNT = 8
    F_COUPON_OFF = 9
    F_T_PRINCIPAL = 10
    F_T_BONUS = 11
    F_T_POINTS = 12
    F_T_TILL = 13
    F_ISSUED = 14
    F_REDEEMED = 15
    F_EXPIRED = 16
    F_COUPONS_USED = 17
    F_NETS_FIRST = 18  # clearing owes/owed, the own-day nets, holds: layout.DAY_FIGURES 18..23
    OP_TOP_UP = 2
    OP_PURCHASE = 3
    OP_POINTS_EXPIRED = 11
    OP_REFUND = 24
    OP_REVERSAL = 25
    OP_CARD_STATUS = 26
    OP_CARD_REPLACED = 30
    OP_REPLACEMENT_OPENED = 31
    OP_IMPORT_CARD = 37
    PARTIAL_PAYMENT = 1
    CONTINUED = 0x8000    # core/daytotals.py: a later card payment of a split tender's basket
    NO_CARD = 0xFFFFFFFF


cdef inline int64_t i64(const unsigned char* p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef extern from *:
    """
    static inline int64_t cc_sat_add(int64_t a, int64_t b) {
        int64_t r;
        if (__builtin_add_overflow(a, b, &r)) return b > 0 ? INT64_MAX : INT64_MIN;
        return r;
    }
    """
    int64_t cc_sat_add(int64_t a, int64_t b) nogil


cdef inline int64_t sat(int64_t a, int64_t b) noexcept nogil:
    """a + b, held at int64's limits (core/daytotals.py saturated: the same rule)."""
    return cc_sat_add(a, b)


cdef inline int64_t wrap(int64_t a, int64_t b) noexcept nogil:
    """a + b round int64 (core/daytotals.py wrapped: the nets of both signs)."""
    return <int64_t>(<uint64_t>a + <uint64_t>b)


cdef inline int64_t add_figure(Py_ssize_t k, int64_t a, int64_t b) noexcept nogil:
    """Figure or value ``k`` of a row added (core/daytotals.py clamped: the same rule)."""
    return wrap(a, b) if F_NETS_FIRST <= k < NF else sat(a, b)


cdef inline uint16_t u16(const unsigned char* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


def width():
    """Values per accumulator row (daytotals.WIDTH checks it)."""
    return WIDTH


def add_run(const unsigned char[::1] entries, const uint32_t[::1] slot_of, int64_t[::1] acc,
            const uint32_t[::1] card_of, uint32_t[::1] home, uint8_t[::1] home_set,
            int64_t[::1] pairs, uint32_t nslots, uint32_t moving):
    """Add ``entries`` (whole journal entries, in sequence order) to ``acc`` (one WIDTH row per
    store slot; ``slot_of``: each entry's store's slot). Clearing: ``card_of`` each entry's card
    slot (NO_CARD: it moves no principal), ``home`` each card slot's home store slot (updated;
    ``home_set`` marks the changed), ``pairs[debtor * nslots + creditor]`` what the debtor owes
    the creditor, net; ``moving`` the home a replacement moves (its old card's entry came
    before the run; NO_CARD: none). Returns the home a replacement moves after the run."""
    cdef Py_ssize_t n = entries.shape[0] // ENTRY_SIZE, k
    cdef const unsigned char* e
    cdef int64_t* a
    cdef uint8_t op
    cdef int64_t amount, discount, dp, db, dpts, redeemed_pts, before
    cdef bint cont
    cdef uint32_t s, c, h
    if slot_of.shape[0] < n or card_of.shape[0] < n or acc.shape[0] < <Py_ssize_t>nslots * WIDTH \
            or pairs.shape[0] < <Py_ssize_t>nslots * nslots or home.shape[0] != home_set.shape[0] \
            or (moving >= nslots and moving != NO_CARD):
        raise ValueError("day totals: buffers too small")
    for k in range(n):
        e = &entries[k * ENTRY_SIZE]
        op = e[1]
        s = slot_of[k]
        if s >= nslots or op >= NOPS:
            raise ValueError("day totals: a slot or an operation type out of range")
        a = &acc[s * WIDTH]
        amount = i64(e + 32)
        discount = i64(e + 40)
        dp = i64(e + 48)
        db = i64(e + 56)
        dpts = i64(e + 64)
        a[F_ENTRIES] = sat(a[F_ENTRIES], 1)
        a[NF + op] = sat(a[NF + op], 1)
        cont = op == OP_PURCHASE and (u16(e + 198) & CONTINUED) != 0
        a[NF + NOPS + op] = sat(a[NF + NOPS + op], 0 if cont else amount)
        if dp > 0:
            a[F_P_IN] = sat(a[F_P_IN], dp)
        elif dp < 0:
            a[F_P_OUT] = sat(a[F_P_OUT], -(dp))
        if db > 0:
            a[F_B_IN] = sat(a[F_B_IN], db)
        elif db < 0:
            a[F_B_OUT] = sat(a[F_B_OUT], -(db))
        if dpts > 0:
            a[F_PTS_IN] = sat(a[F_PTS_IN], dpts)
        elif dpts < 0:
            a[F_PTS_OUT] = sat(a[F_PTS_OUT], -(dpts))
        if op == OP_PURCHASE:
            redeemed_pts = i64(e + 176)
            if cont:  # core/daytotals.py CONTINUED: the basket's sale was counted already
                a[F_T_TILL] = sat(a[F_T_TILL], dp + db - i64(e + 184))
            else:
                a[F_GROSS] = sat(a[F_GROSS], amount)
                a[F_DISCOUNT] = sat(a[F_DISCOUNT], discount)
                a[F_COUPON_OFF] = sat(a[F_COUPON_OFF], i64(e + 216))
                if u16(e + 198) & PARTIAL_PAYMENT:
                    a[F_T_TILL] = sat(a[F_T_TILL], amount - discount + dp + db - i64(e + 184))
            a[F_T_PRINCIPAL] = sat(a[F_T_PRINCIPAL], -(dp))
            a[F_T_BONUS] = sat(a[F_T_BONUS], -(db))
            a[F_T_POINTS] = sat(a[F_T_POINTS], i64(e + 184))
            a[F_ISSUED] = sat(a[F_ISSUED], dpts + redeemed_pts)
            a[F_REDEEMED] = sat(a[F_REDEEMED], redeemed_pts)
            if u16(e + 196):
                a[F_COUPONS_USED] = sat(a[F_COUPONS_USED], 1)
        elif op == OP_POINTS_EXPIRED:
            a[F_EXPIRED] = sat(a[F_EXPIRED], -(dpts))
        elif dpts != 0 and op != OP_REFUND and op != OP_REVERSAL and op != OP_CARD_REPLACED \
                and op != OP_REPLACEMENT_OPENED and op != OP_CARD_STATUS and op != OP_IMPORT_CARD:
            if dpts > 0:
                a[F_ISSUED] = sat(a[F_ISSUED], dpts)
            else:
                a[F_REDEEMED] = sat(a[F_REDEEMED], -(dpts))
        c = card_of[k]
        if c == NO_CARD:
            continue
        if c >= <uint32_t>home.shape[0]:
            raise ValueError("day totals: a card slot out of range")
        if op == OP_CARD_REPLACED:
            moving = home[c]
        elif op == OP_REPLACEMENT_OPENED:
            if moving == NO_CARD:
                raise ValueError("day totals: a replacement's new card without its old card's "
                                 "entry before it")
            home[c] = moving
            home_set[c] = 1
            moving = NO_CARD
        elif (op == OP_TOP_UP or op == OP_IMPORT_CARD) and dp > 0:
            h = home[c]
            before = i64(e + 72) - dp
            if h != s and before != 0:
                pairs[h * nslots + s] = wrap(pairs[h * nslots + s], before)
            home[c] = s
            home_set[c] = 1
        elif dp != 0:
            h = home[c]
            if h != s:
                pairs[h * nslots + s] = wrap(pairs[h * nslots + s], -(dp))
    return moving


def nonzero(const int64_t[::1] values):
    """[(index, value)] of the values that are not zero, in index order (the clearing matrix)."""
    cdef Py_ssize_t i
    out = []
    for i in range(values.shape[0]):
        if values[i] != 0:
            out.append((i, values[i]))
    return out


def add_rows(int64_t[::1] dst, const int64_t[::1] src, Py_ssize_t at):
    """dst[k] += src[at + k] for the WIDTH values of one row."""
    cdef Py_ssize_t k
    if dst.shape[0] != WIDTH or src.shape[0] < at + WIDTH or at < 0:
        raise ValueError("day totals: rows of the wrong size")
    for k in range(WIDTH):
        dst[k] = add_figure(k, dst[k], src[at + k])


cdef enum:
    RECORD_SIZE = 704     # layout.DAY_TOTALS
    RECORD_FIGURES = 8    # i64[NF]
    RECORD_COUNTS = 200   # u32[NOPS]
    RECORD_AMOUNTS = 360  # i64[NOPS]


def add_record(unsigned char[::1] record, const int64_t[::1] row):
    """A row added into a packed day totals record (layout.DAY_TOTALS, its version set), in
    place: the write's read-add-write of one store's day."""
    cdef Py_ssize_t k
    cdef int64_t v
    cdef uint32_t c
    if record.shape[0] != RECORD_SIZE or row.shape[0] != WIDTH:
        raise ValueError("day totals: a record or a row of the wrong size")
    if record[0] != 1 and record[0] != 0:
        raise ValueError("day totals: a record of an unknown version")
    record[0] = 1
    for k in range(NF):
        memcpy(&v, &record[RECORD_FIGURES + 8 * k], 8)
        v = add_figure(k, v, row[k])
        memcpy(&record[RECORD_FIGURES + 8 * k], &v, 8)
    for k in range(NOPS):
        memcpy(&c, &record[RECORD_COUNTS + 4 * k], 4)
        if row[NF + k] < 0 or <int64_t>c + row[NF + k] > 0xFFFFFFFF:
            raise ValueError("day totals: a count out of range")
        c += <uint32_t>row[NF + k]
        memcpy(&record[RECORD_COUNTS + 4 * k], &c, 4)
        memcpy(&v, &record[RECORD_AMOUNTS + 8 * k], 8)
        v = sat(v, row[NF + NOPS + k])
        memcpy(&record[RECORD_AMOUNTS + 8 * k], &v, 8)
