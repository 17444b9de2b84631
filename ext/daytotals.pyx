# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The day totals' inner loop (``cardcore.daytotals``): a run of journal entries of one business
day added up per store, and the clearing rule's home of the money followed card by card, in C.
``daytotals.add_figures`` and ``DayTotals._money`` are the reference it is held to (tests:
the same records either way); this is only their speed."""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcmp, memcpy, memset
from cardsort cimport CardAt, sort_cards
from fixedint cimport cc_sat_add, cc_sat_wide, cc_wide, i64, u16

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


cdef inline int64_t sat(int64_t a, int64_t b) noexcept nogil:
    """a + b, held at int64's limits (core/daytotals.py saturated: the same rule)."""
    return cc_sat_add(a, b)


cdef inline int64_t sat_sum(int64_t a, cc_wide v) noexcept nogil:
    """a + v, ``v`` an exact sum of several amounts (128 bits: never wrapped), held at int64's
    limits once (core/daytotals.py _add: ``saturated(a + the Python sum)``, the same rule)."""
    return cc_sat_wide(a, v)


cdef inline int64_t wrap(int64_t a, int64_t b) noexcept nogil:
    """a + b round int64 (core/daytotals.py wrapped: the nets of both signs)."""
    return <int64_t>(<uint64_t>a + <uint64_t>b)


cdef inline int64_t neg(int64_t a) noexcept nogil:
    """-a round int64 (-INT64_MIN is INT64_MIN, as core/daytotals.py wrapped says; a signed
    negation of it is undefined in C)."""
    return <int64_t>(<uint64_t>0 - <uint64_t>a)


cdef inline int64_t add_figure(Py_ssize_t k, int64_t a, int64_t b) noexcept nogil:
    """Figure or value ``k`` of a row added (core/daytotals.py clamped: the same rule)."""
    return wrap(a, b) if F_NETS_FIRST <= k < NF else sat(a, b)


def width():
    """Values per accumulator row (daytotals.WIDTH checks it)."""
    return WIDTH


ctypedef struct Net:
    int64_t cell     # debtor slot * slots + creditor slot (a clearing's cell); in the table: + 1
    int64_t amount   # what the debtor owes the creditor, net, wrapped


cdef inline int add_net(Net* table, uint64_t mask, int64_t cell, int64_t amount) noexcept nogil:
    """``amount`` added (wrapped) to ``cell``'s net in an open-addressing table (cell + 1 kept,
    0: an empty bucket) of mask + 1 buckets, at most half full (a run's entries each add one
    cell at most, and the table has two buckets an entry)."""
    cdef uint64_t h = (<uint64_t>cell * <uint64_t>0x9E3779B97F4A7C15) >> 32
    h &= mask
    while table[h].cell != 0 and table[h].cell != cell + 1:
        h = (h + 1) & mask
    table[h].cell = cell + 1
    table[h].amount = wrap(table[h].amount, amount)
    return 0


cdef int by_cell(const void* x, const void* y) noexcept nogil:
    cdef const Net* a = <const Net*>x
    cdef const Net* b = <const Net*>y
    return (a.cell > b.cell) - (a.cell < b.cell)


def add_run(const unsigned char[::1] entries, const uint32_t[::1] slot_of, int64_t[::1] acc,
            const uint32_t[::1] card_of, uint32_t[::1] home, uint8_t[::1] home_set,
            int64_t[::1] nets, uint32_t nslots, uint32_t moving):
    """Add ``entries`` (whole journal entries, in sequence order) to ``acc`` (one WIDTH row per
    store slot; ``slot_of``: each entry's store's slot). Clearing: ``card_of`` each entry's card
    slot (NO_CARD: it moves no principal), ``home`` each card slot's home store slot (updated;
    ``home_set`` marks the changed); what each debtor slot owes each creditor slot, net, into
    ``nets`` (two values an entry at least): (debtor * nslots + creditor, amount) pairs, the
    cells whose net is not zero in cell order (the order of a debtor x creditor matrix, which
    this is without its zeros: a run's cells are at most one an entry, its stores may be
    thousands); ``moving`` the home a replacement moves (its old card's entry came before the
    run; NO_CARD: none). Returns (the home a replacement moves after the run, the cells)."""
    cdef Py_ssize_t n = entries.shape[0] // ENTRY_SIZE, k, size = 16, used = 0
    cdef Net* table
    cdef Net* out
    if slot_of.shape[0] < n or card_of.shape[0] < n or acc.shape[0] < <Py_ssize_t>nslots * WIDTH \
            or nets.shape[0] < 2 * n or home.shape[0] != home_set.shape[0] \
            or (moving >= nslots and moving != NO_CARD):
        raise ValueError("day totals: buffers too small")
    while size < 2 * n:
        size *= 2
    table = <Net*>malloc(size * sizeof(Net))
    if table == NULL:
        raise MemoryError()
    memset(table, 0, size * sizeof(Net))
    try:
        moving = run_entries(entries, n, slot_of, acc, card_of, home, home_set, nslots, moving,
                             table, size - 1)
        out = <Net*>&nets[0]
        for k in range(size):
            if table[k].cell != 0 and table[k].amount != 0:
                out[used].cell = table[k].cell - 1
                out[used].amount = table[k].amount
                used += 1
        qsort(out, used, sizeof(Net), by_cell)
    finally:
        free(table)
    return moving, used


cdef uint32_t run_entries(const unsigned char[::1] entries, Py_ssize_t n,
                          const uint32_t[::1] slot_of, int64_t[::1] acc,
                          const uint32_t[::1] card_of, uint32_t[::1] home, uint8_t[::1] home_set,
                          uint32_t nslots, uint32_t moving, Net* table,
                          uint64_t mask) except? 0xFFFFFFFE:
    """``add_run``'s loop (its table freed whatever happens): the entries' figures into ``acc``,
    the clearing's amounts into ``table``; returns the home a replacement moves."""
    cdef Py_ssize_t k
    cdef const unsigned char* e
    cdef int64_t* a
    cdef uint8_t op
    cdef int64_t amount, discount, dp, db, dpts, redeemed_pts, before
    cdef bint cont
    cdef uint32_t s, c, h
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
            a[F_P_OUT] = sat_sum(a[F_P_OUT], -<cc_wide>dp)  # (-INT64_MIN too)
        if db > 0:
            a[F_B_IN] = sat(a[F_B_IN], db)
        elif db < 0:
            a[F_B_OUT] = sat_sum(a[F_B_OUT], -<cc_wide>db)
        # the slot's own-day nets, wrapped as the reference adds them entry by entry (never from
        # the capped columns above: past int64 those depend on the grouping); taken out of the
        # row by whoever lands or folds it (a store's row keeps no own-day net)
        a[F_OWN_P] = wrap(a[F_OWN_P], dp)
        a[F_OWN_B] = wrap(a[F_OWN_B], db)
        if dpts > 0:
            a[F_PTS_IN] = sat(a[F_PTS_IN], dpts)
        elif dpts < 0:
            a[F_PTS_OUT] = sat_sum(a[F_PTS_OUT], -<cc_wide>dpts)
        if op == OP_PURCHASE:
            redeemed_pts = i64(e + 176)
            if cont:  # core/daytotals.py CONTINUED: the basket's sale was counted already
                a[F_T_TILL] = sat_sum(a[F_T_TILL], <cc_wide>dp + db - i64(e + 184))
            else:
                a[F_GROSS] = sat(a[F_GROSS], amount)
                a[F_DISCOUNT] = sat(a[F_DISCOUNT], discount)
                a[F_COUPON_OFF] = sat(a[F_COUPON_OFF], i64(e + 216))
                if u16(e + 198) & PARTIAL_PAYMENT:
                    a[F_T_TILL] = sat_sum(a[F_T_TILL], <cc_wide>amount - discount + dp + db
                                          - i64(e + 184))
            a[F_T_PRINCIPAL] = sat_sum(a[F_T_PRINCIPAL], -<cc_wide>dp)
            a[F_T_BONUS] = sat_sum(a[F_T_BONUS], -<cc_wide>db)
            a[F_T_POINTS] = sat(a[F_T_POINTS], i64(e + 184))
            a[F_ISSUED] = sat_sum(a[F_ISSUED], <cc_wide>dpts + redeemed_pts)
            a[F_REDEEMED] = sat(a[F_REDEEMED], redeemed_pts)
            if u16(e + 196):
                a[F_COUPONS_USED] = sat(a[F_COUPONS_USED], 1)
        elif op == OP_POINTS_EXPIRED:
            a[F_EXPIRED] = sat_sum(a[F_EXPIRED], -<cc_wide>dpts)
        elif dpts != 0 and op != OP_REFUND and op != OP_REVERSAL and op != OP_CARD_REPLACED \
                and op != OP_REPLACEMENT_OPENED and op != OP_CARD_STATUS and op != OP_IMPORT_CARD:
            if dpts > 0:
                a[F_ISSUED] = sat(a[F_ISSUED], dpts)
            else:
                a[F_REDEEMED] = sat_sum(a[F_REDEEMED], -<cc_wide>dpts)
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
            before = wrap(i64(e + 72), neg(dp))  # principal after - dp, round int64
            if h != s and before != 0:
                add_net(table, mask, <int64_t>h * nslots + s, before)
            home[c] = s
            home_set[c] = 1
        elif dp != 0:
            h = home[c]
            if h != s:
                add_net(table, mask, <int64_t>h * nslots + s, neg(dp))
    return moving


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


cdef int record_add(unsigned char* record, const int64_t* row) noexcept nogil:
    """A row added into a packed day totals record (layout.DAY_TOTALS), in place; -1 (the
    record left as it may be half-added: the caller raises, the write transaction aborts) when
    the record's version is unknown or a count would leave u32."""
    cdef Py_ssize_t k
    cdef int64_t v
    cdef uint32_t c
    if record[0] != 1 and record[0] != 0:
        return -1
    record[0] = 1
    for k in range(NF):
        memcpy(&v, &record[RECORD_FIGURES + 8 * k], 8)
        v = add_figure(k, v, row[k])
        memcpy(&record[RECORD_FIGURES + 8 * k], &v, 8)
    for k in range(NOPS):
        memcpy(&c, &record[RECORD_COUNTS + 4 * k], 4)
        if row[NF + k] < 0 or <int64_t>c + row[NF + k] > <int64_t>0xFFFFFFFF:
            return -1
        c += <uint32_t>row[NF + k]
        memcpy(&record[RECORD_COUNTS + 4 * k], &c, 4)
        memcpy(&v, &record[RECORD_AMOUNTS + 8 * k], 8)
        v = sat(v, row[NF + NOPS + k])
        memcpy(&record[RECORD_AMOUNTS + 8 * k], &v, 8)
    return 0


def add_record(unsigned char[::1] record, const int64_t[::1] row):
    """A row added into a packed day totals record (layout.DAY_TOTALS, its version set), in
    place: the write's read-add-write of one store's day."""
    if record.shape[0] != RECORD_SIZE or row.shape[0] != WIDTH:
        raise ValueError("day totals: a record or a row of the wrong size")
    if record_add(&record[0], &row[0]) < 0:
        raise ValueError("day totals: a record of an unknown version or a count out of range")


cdef object stored_of(list keys, list found, Py_ssize_t i, Py_ssize_t* j):
    """The stored value of ``keys[i]`` (None: none) from ``found``, a getmulti's (key, value)
    pairs of ``keys`` (in key order, those stored), ``j[0]`` the next one not yet met: the keys
    and what was found walked together, no dict between them."""
    cdef tuple pair
    if j[0] < len(found):
        pair = found[j[0]]
        if pair[0] == keys[i]:
            j[0] += 1
            return pair[1]
    return None


def add_records(list keys, list found, const int64_t[::1] rows, const uint32_t[::1] slots):
    """[(key, its stored record (from ``found``, a getmulti's pairs of ``keys``, in key order;
    none: a record of nothing yet) with its row added)] for ``keys`` in key order: key k's row
    is the one at ``slots[k]`` of ``rows`` (WIDTH values a row; ``slots`` None: the k-th).
    ``add_record`` over a group's records in one call (the write's read-add-write), each record
    made once, in the bytes it is returned in."""
    cdef Py_ssize_t i, n = len(keys), at, j = 0
    cdef const unsigned char[::1] raw
    cdef unsigned char* out
    cdef list made = []
    if slots is not None and slots.shape[0] != n:
        raise ValueError("day totals: keys and rows of different counts")
    for i in range(n):
        at = (slots[i] if slots is not None else i) * <Py_ssize_t>WIDTH
        if at + WIDTH > rows.shape[0]:
            raise ValueError("day totals: a row out of range")
        record = PyBytes_FromStringAndSize(NULL, RECORD_SIZE)  # (new: filled before it is seen)
        out = <unsigned char*>PyBytes_AS_STRING(record)
        stored = stored_of(keys, found, i, &j)
        if stored is None:
            memset(out, 0, RECORD_SIZE)
        else:
            raw = stored
            if raw.shape[0] != RECORD_SIZE:
                raise ValueError("day totals: a record of the wrong size")
            memcpy(out, &raw[0], RECORD_SIZE)
        if record_add(out, &rows[at]) < 0:
            raise ValueError("day totals: a record of an unknown version or a count out of range")
        made.append((keys[i], record))
    if j != len(found):
        raise ValueError("day totals: records found that were not asked for, or not in key order")
    return made


def sum_rows(int64_t[::1] dst, list rows):
    """dst[k] += row[k] for every row of ``rows`` (int64 arrays of WIDTH), in order: a day's
    chain row from its stores' rows, ``add_rows``'s rule in one call."""
    cdef const int64_t[::1] row
    cdef Py_ssize_t k
    if dst.shape[0] != WIDTH:
        raise ValueError("day totals: rows of the wrong size")
    for r in rows:
        row = r
        if row.shape[0] != WIDTH:
            raise ValueError("day totals: rows of the wrong size")
        for k in range(WIDTH):
            dst[k] = add_figure(k, dst[k], row[k])


def add_nets(list keys, list found, const int64_t[::1] amounts):
    """[(key, its stored i64 (8 bytes little-endian, from ``found``, a getmulti's pairs of
    ``keys``, in key order; none: 0) plus its amount, wrapped round int64 (core/daytotals.py
    wrapped), packed)] for ``keys`` in key order: the clearing records' read-add-write in one
    call."""
    cdef Py_ssize_t i, n = len(keys), j = 0
    cdef const unsigned char[::1] raw
    cdef int64_t v
    cdef list made = []
    if amounts.shape[0] != n:
        raise ValueError("day totals: keys and amounts of different counts")
    for i in range(n):
        v = 0
        stored = stored_of(keys, found, i, &j)
        if stored is not None:
            raw = stored
            if raw.shape[0] != 8:
                raise ValueError("day totals: a clearing record of the wrong size")
            memcpy(&v, &raw[0], 8)
        v = wrap(v, amounts[i])
        made.append((keys[i], PyBytes_FromStringAndSize(<const char*>&v, 8)))
    if j != len(found):
        raise ValueError("day totals: records found that were not asked for, or not in key order")
    return made


cdef enum:
    F_OWES = 18
    F_OWED = 19
    F_OWN_P = 20
    F_OWN_B = 21

ctypedef struct Side:
    uint32_t store
    uint32_t other
    int64_t amount


cdef int by_side(const void* x, const void* y) noexcept nogil:
    """Clearing sides in LMDB's key order (layout.DAY_PAIR_KEY of one day: store, then other)."""
    cdef const Side* a = <const Side*>x
    cdef const Side* b = <const Side*>y
    if a.store != b.store:
        return (a.store > b.store) - (a.store < b.store)
    return (a.other > b.other) - (a.other < b.other)


cdef object be_key(uint32_t a, uint32_t b, uint32_t c, int three):
    """A big-endian key: (a, b) (layout.DAY_KEY) or (a, b, c) (layout.DAY_PAIR_KEY)."""
    cdef unsigned char k[12]
    cdef uint32_t v[3]
    cdef int i
    v[0], v[1], v[2] = a, b, c
    for i in range(3):
        k[4 * i] = (v[i] >> 24) & 0xFF
        k[4 * i + 1] = (v[i] >> 16) & 0xFF
        k[4 * i + 2] = (v[i] >> 8) & 0xFF
        k[4 * i + 3] = v[i] & 0xFF
    return PyBytes_FromStringAndSize(<const char*>k, 12 if three else 8)


def fold(int64_t[::1] acc, const int64_t[::1] nets, const uint32_t[::1] stores, uint32_t day,
         int64_t[::1] chain):
    """A group's one run on one business day ``day``, open at every store of it, folded into
    what its records get (``DayTotals.records``' additions, in C; ``DayTotals._land_run`` and
    ``records`` are the reference, held to it by tests): ``acc`` (one WIDTH row per slot,
    ``stores[slot]`` its store, from ``add_run``) gets each slot's clearing owes and owed from
    ``nets`` (``add_run``'s (debtor slot * slots + creditor slot, amount) pairs); ``chain``
    (WIDTH, zeros) the day's chain row (the touched slots' rows in slot order, and the day's own
    principal and bonus nets). Returns (the day_totals keys in key order, their slots, the
    day_clearing keys in key order, what each gets, wrapped): the keys to read, add to and
    write."""
    cdef Py_ssize_t n = stores.shape[0], d, c, s, k, m = nets.shape[0] // 2, j, w
    cdef int64_t v
    cdef uint64_t own_p = 0, own_b = 0
    cdef unsigned char* touched
    cdef Side* sides
    cdef Side* slots
    cdef list totals_keys = [], totals_slots = [], side_keys = [], side_amounts = []
    if acc.shape[0] != n * WIDTH or nets.shape[0] % 2 or chain.shape[0] != WIDTH:
        raise ValueError("day totals: buffers of the wrong size")
    for j in range(m):
        if nets[2 * j] < 0 or nets[2 * j] >= <int64_t>n * n:
            raise ValueError("day totals: a clearing cell out of range")
    touched = <unsigned char*>malloc(n + 1)
    sides = <Side*>malloc((2 * m + 1) * sizeof(Side))
    slots = <Side*>malloc((n + 1) * sizeof(Side))
    if touched == NULL or sides == NULL or slots == NULL:
        free(touched)
        free(sides)
        free(slots)
        raise MemoryError()
    try:
        j = 0
        for d in range(n):
            touched[d] = acc[d * WIDTH + F_ENTRIES] != 0
        for k in range(m):  # (in cell order: debtor, then creditor)
            d, c, v = nets[2 * k] // n, nets[2 * k] % n, nets[2 * k + 1]
            if v == 0:
                continue
            acc[d * WIDTH + F_OWES] = wrap(acc[d * WIDTH + F_OWES], v)
            acc[c * WIDTH + F_OWED] = wrap(acc[c * WIDTH + F_OWED], v)
            touched[d] = 1
            touched[c] = 1
            sides[j].store, sides[j].other, sides[j].amount = stores[d], stores[c], v
            sides[j + 1].store, sides[j + 1].other = stores[c], stores[d]
            sides[j + 1].amount = <int64_t>(<uint64_t>0 - <uint64_t>v)
            j += 2
        w = 0
        for s in range(n):  # the own-day nets add_run kept in the row, taken out of it
            own_p += <uint64_t>acc[s * WIDTH + F_OWN_P]
            own_b += <uint64_t>acc[s * WIDTH + F_OWN_B]
            acc[s * WIDTH + F_OWN_P] = 0
            acc[s * WIDTH + F_OWN_B] = 0
            if not touched[s]:
                continue
            for k in range(WIDTH):
                chain[k] = add_figure(k, chain[k], acc[s * WIDTH + k])
            slots[w].store, slots[w].other, slots[w].amount = stores[s], 0, s
            w += 1
        chain[F_OWN_P] = wrap(chain[F_OWN_P], <int64_t>own_p)
        chain[F_OWN_B] = wrap(chain[F_OWN_B], <int64_t>own_b)
        qsort(slots, w, sizeof(Side), by_side)
        for s in range(w):
            totals_keys.append(be_key(slots[s].store, day, 0, 0))
            totals_slots.append(slots[s].amount)
        qsort(sides, j, sizeof(Side), by_side)
        s = 0
        while s < j:  # both sides of each pair; a key met twice (A owes B and B owes A) once
            v = sides[s].amount
            k = s + 1
            while k < j and sides[k].store == sides[s].store and sides[k].other == sides[s].other:
                v = wrap(v, sides[k].amount)
                k += 1
            side_keys.append(be_key(sides[s].store, day, sides[s].other, 1))
            side_amounts.append(v)
            s = k
    finally:
        free(touched)
        free(sides)
        free(slots)
    return totals_keys, totals_slots, side_keys, side_amounts


def index_run(const unsigned char[::1] entries, uint32_t[::1] slot_of, uint32_t[::1] card_of):
    """A run's (or a group's) slots, as ``add_run`` takes them: ``slot_of[k]`` entry k's store's
    slot (slots in order of the stores' first appearance), ``card_of[k]`` its card's slot among
    the cards whose principal it moves or that a replacement names (NO_CARD: none; the cards in
    key order). Returns (the stores by slot, the cards by slot): the homes to read."""
    cdef Py_ssize_t n = entries.shape[0] // ENTRY_SIZE, k, m = 0, size = 16, h, j
    cdef const unsigned char* e
    cdef uint32_t store, mask
    cdef uint32_t* table
    cdef CardAt* cards
    cdef list stores = [], ids = []
    if slot_of.shape[0] < n or card_of.shape[0] < n:
        raise ValueError("day totals: buffers too small")
    while size < 2 * n:
        size *= 2
    mask = <uint32_t>(size - 1)
    table = <uint32_t*>malloc(size * 2 * sizeof(uint32_t))  # (store, slot + 1) open addressing
    cards = <CardAt*>malloc((n + 1) * sizeof(CardAt))
    if table == NULL or cards == NULL:
        free(table)
        free(cards)
        raise MemoryError()
    try:
        memset(table, 0, size * 2 * sizeof(uint32_t))
        for k in range(n):
            e = &entries[k * ENTRY_SIZE]
            store = <uint32_t>e[104] | (<uint32_t>e[105] << 8) | (<uint32_t>e[106] << 16) \
                | (<uint32_t>e[107] << 24)
            h = (store * 2654435761u) & mask
            while table[2 * h + 1] != 0 and table[2 * h] != store:
                h = (h + 1) & mask
            if table[2 * h + 1] == 0:
                table[2 * h] = store
                table[2 * h + 1] = <uint32_t>len(stores) + 1
                stores.append(store)
            slot_of[k] = table[2 * h + 1] - 1
            card_of[k] = NO_CARD
            if i64(e + 48) != 0 or e[1] == OP_CARD_REPLACED or e[1] == OP_REPLACEMENT_OPENED:
                memcpy(cards[m].id, e + 16, 16)
                cards[m].k = <uint32_t>k
                m += 1
        if sort_cards(cards, m) < 0:
            raise MemoryError()
        for j in range(m):
            if j == 0 or memcmp(cards[j].id, cards[j - 1].id, 16) != 0:
                ids.append(PyBytes_FromStringAndSize(<const char*>cards[j].id, 16))
            card_of[cards[j].k] = <uint32_t>(len(ids) - 1)
    finally:
        free(table)
        free(cards)
    return stores, ids
