# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The member metrics' inner loop (``cardcore.members``): a group's purchases added to their
members' records (``members.MEMBER``, packed) and to the month totals, in C. ``Members._purchase``
is the reference it is held to (tests: the same records either way); this is only its speed.
Anything it does not expect (a record of another version or kind or with padding set, a month's
purchase count at its limit, a spend past int64, more months or days than its tables hold)
makes it return None having changed nothing the caller keeps, and the caller adds the group
through the reference instead: which keeps it, or says what is wrong."""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcmp, memcpy
from cardsort cimport CardAt, sort_cards
from fixedint cimport cc_sat_add, i64, put32, put64, u32

cdef enum:
    ENTRY_SIZE = 256      # layout.JOURNAL
    E_OP = 1
    E_CARD = 16           # card_id, 16 bytes
    CARD_SIZE = 16
    OP_PURCHASE = 3
    E_AMOUNT = 32         # amount_minor
    E_DISCOUNT = 40       # discount_minor
    RECORD_SIZE = 64      # members.MEMBER
    R_VERSION = 0
    R_KIND = 1
    R_FIRST = 8           # first purchase day
    R_LAST = 12           # the last three purchase days, newest first
    R_SECOND = 16
    R_THIRD = 20
    R_PURCHASES = 24
    R_MONTH = 28          # the month under way, its purchases and spend
    R_MONTH_PURCHASES = 32
    R_MONTH_SPEND = 40
    R_PAD = 36            # 4 bytes of padding (and 2 at 2), zero as MEMBER.pack writes them
    MEMBER_VERSION = 1
    KIND_MEMBER = 1
    KIND_IMPORTED = 3
    TOTALS = 6            # a totals row: month, active, repeat, retained, purchases, spend
    TABLE_MAX = 32        # rows of the totals and the activations tables
    UNTOUCHED = -2        # before[]: a record no purchase reached yet
    NO_PURCHASE = -1      # before[]: a member without a purchase before the group

cdef extern from *:
    """
    static inline int cc_sub_overflows(int64_t a, int64_t b, int64_t* r) {
        return __builtin_sub_overflow(a, b, r);
    }
    """
    int cc_sub_overflows(int64_t a, int64_t b, int64_t* r) nogil


cdef inline Py_ssize_t row_of(int64_t[::1] table, Py_ssize_t width, Py_ssize_t* rows,
                              int64_t key) noexcept nogil:
    """The row of ``key`` in a table of ``width`` values a row (the key first), added zeroed
    when new; -1 when the table is full."""
    cdef Py_ssize_t r, k
    for r in range(rows[0]):
        if table[r * width] == key:
            return r
    if rows[0] == TABLE_MAX:
        return -1
    r = rows[0]
    rows[0] += 1
    table[r * width] = key
    for k in range(1, width):
        table[r * width + k] = 0
    return r


def purchases(const unsigned char[::1] entries, const unsigned char[::1] skip,
              uint32_t[::1] index, uint32_t[::1] slot_of):
    """The purchases of ``entries`` (journal entries) but those ``skip`` marks (a split
    tender's later payments): their entry numbers into ``index`` and the number of their card
    among the distinct ones into ``slot_of``. Returns (how many, the distinct card ids sorted:
    the keys to read)."""
    cdef Py_ssize_t n = entries.shape[0] // ENTRY_SIZE, k, m = 0, j
    cdef CardAt* cards
    cdef list keys = []
    if skip.shape[0] != n or index.shape[0] < n or slot_of.shape[0] < n:
        raise ValueError("member metrics: buffers of the wrong size")
    if n == 0:
        return 0, keys
    cards = <CardAt*>malloc(n * sizeof(CardAt))
    if cards == NULL:
        raise MemoryError()
    try:
        for k in range(n):
            if entries[k * ENTRY_SIZE + E_OP] == OP_PURCHASE and not skip[k]:
                memcpy(cards[m].id, &entries[k * ENTRY_SIZE + E_CARD], CARD_SIZE)
                cards[m].k = <uint32_t>m
                index[m] = <uint32_t>k
                m += 1
        if sort_cards(cards, m) < 0:
            raise MemoryError()
        for j in range(m):
            if j == 0 or memcmp(cards[j].id, cards[j - 1].id, CARD_SIZE) != 0:
                keys.append(PyBytes_FromStringAndSize(<const char*>cards[j].id, CARD_SIZE))
            slot_of[cards[j].k] = <uint32_t>(len(keys) - 1)
    finally:
        free(cards)
    return m, keys


def joined_records(list found, Py_ssize_t wanted):
    """The records of a getmulti's ``found`` (key, record) pairs end to end, in a bytearray the
    C loop updates in place, when every one of the ``wanted`` keys was found and each record is
    RECORD_SIZE; else None (a card never opened, a record of another size: the reference
    says which)."""
    cdef Py_ssize_t i, n = len(found)
    cdef bytes raw
    cdef bytearray out
    cdef char* p
    if n != wanted:
        return None
    out = bytearray(n * RECORD_SIZE)
    p = out
    for i in range(n):
        raw = (<tuple?>found[i])[1]
        if len(raw) != RECORD_SIZE:
            return None
        memcpy(p + i * RECORD_SIZE, <const char*>raw, RECORD_SIZE)
    return out


def items(list keys, const unsigned char[::1] records):
    """[(key, its record)]: ``records`` (RECORD_SIZE each) paired with ``keys`` in order (the
    member_cards items to write)."""
    cdef Py_ssize_t s, n = len(keys)
    if records.shape[0] != n * RECORD_SIZE:
        raise ValueError("member metrics: buffers of the wrong size")
    out = []
    for s in range(n):
        out.append((keys[s], PyBytes_FromStringAndSize(<const char*>&records[s * RECORD_SIZE],
                                                         RECORD_SIZE)))
    return out


def table_max():
    """Rows of the totals and activations tables (members.py sizes its arrays by it)."""
    return TABLE_MAX


def add_purchases(const unsigned char[::1] entries, const uint32_t[::1] index,
                  const uint32_t[::1] slot_of, const uint32_t[::1] day_of,
                  const uint32_t[::1] month_of, unsigned char[::1] records, int64_t[::1] before,
                  int64_t[::1] months_out, int64_t[::1] totals, int64_t[::1] activated):
    """Purchase ``i`` is journal entry ``index[i]`` of ``entries``, its member's record (root,
    never an alias) is ``slot_of[i]`` of ``records`` (RECORD_SIZE each, updated in place), its
    business day and month ``day_of[i]``, ``month_of[i]``. Out: ``before[slot]`` the record's
    last purchase day before the group (NO_PURCHASE: none; the caller sets every one to
    UNTOUCHED), ``months_out`` rows (slot, month, purchases, spend) of months under way that a
    later month closed, ``totals`` rows (month, active, repeat, retained, purchases, spend)
    and ``activated`` rows (day, members activated). Returns (months_out rows, totals rows,
    activated rows), or None: not for this loop (see the module)."""
    cdef Py_ssize_t n = index.shape[0], nslots = records.shape[0] // RECORD_SIZE
    cdef Py_ssize_t i, t, a, n_out = 0, n_totals = 0, n_act = 0
    cdef const unsigned char* e
    cdef unsigned char* rec
    cdef uint32_t slot, day, month, count, last, second, mp
    cdef int64_t spend
    cdef int64_t* tot
    if slot_of.shape[0] != n or day_of.shape[0] != n or month_of.shape[0] != n \
            or records.shape[0] != nslots * RECORD_SIZE or before.shape[0] != nslots \
            or months_out.shape[0] < 4 * n or totals.shape[0] < TABLE_MAX * TOTALS \
            or activated.shape[0] < TABLE_MAX * 2:
        raise ValueError("member metrics: buffers of the wrong size")
    for i in range(n):
        if index[i] >= <uint32_t>(entries.shape[0] // ENTRY_SIZE) or slot_of[i] >= nslots:
            raise ValueError("member metrics: an entry or a record out of range")
        e = &entries[<Py_ssize_t>index[i] * ENTRY_SIZE]
        slot = slot_of[i]
        rec = &records[<Py_ssize_t>slot * RECORD_SIZE]
        if rec[R_VERSION] != MEMBER_VERSION or (rec[R_KIND] != KIND_MEMBER
                                                and rec[R_KIND] != KIND_IMPORTED) \
                or rec[2] != 0 or rec[3] != 0 or u32(rec + R_PAD) != 0:
            return None  # (padding set: the reference packs it zeroed)
        if cc_sub_overflows(i64(e + E_AMOUNT), i64(e + E_DISCOUNT), &spend):
            return None
        day, month = day_of[i], month_of[i]
        count = u32(rec + R_PURCHASES)
        if before[slot] == UNTOUCHED:
            before[slot] = <int64_t>u32(rec + R_LAST) if count else <int64_t>NO_PURCHASE
        if count != 0xFFFFFFFF:
            put32(rec + R_PURCHASES, count + 1)
        if count and month < u32(rec + R_MONTH):  # months never go back (members.py)
            month = u32(rec + R_MONTH)
        t = row_of(totals, TOTALS, &n_totals, month)
        if t < 0:
            return None
        tot = &totals[t * TOTALS]
        tot[4] += 1
        tot[5] = cc_sat_add(tot[5], spend)
        if not count:  # the first: activated (an imported member was a customer already)
            put32(rec + R_FIRST, day)
            put32(rec + R_LAST, day)
            put32(rec + R_MONTH, month)
            put32(rec + R_MONTH_PURCHASES, 1)
            put64(rec + R_MONTH_SPEND, spend)
            tot[1] += 1
            if rec[R_KIND] == KIND_MEMBER:
                a = row_of(activated, 2, &n_act, day)
                if a < 0:
                    return None
                activated[a * 2 + 1] += 1
            continue
        last, second = u32(rec + R_LAST), u32(rec + R_SECOND)
        if day >= last:
            put32(rec + R_LAST, day)
            put32(rec + R_SECOND, last)
            put32(rec + R_THIRD, second)
        elif count == 1 or day >= second:
            put32(rec + R_SECOND, day)
            put32(rec + R_THIRD, second)
        elif count == 2 or day > u32(rec + R_THIRD):
            put32(rec + R_THIRD, day)
        mp = u32(rec + R_MONTH_PURCHASES)
        if month == u32(rec + R_MONTH):  # the month under way
            if mp == 0xFFFFFFFF:
                return None
            put32(rec + R_MONTH_PURCHASES, mp + 1)
            put64(rec + R_MONTH_SPEND, cc_sat_add(i64(rec + R_MONTH_SPEND), spend))
            if mp + 1 == 2:
                tot[2] += 1
        else:  # a later month: the one under way is done (the caller adds it to member_months)
            months_out[n_out * 4] = slot
            months_out[n_out * 4 + 1] = u32(rec + R_MONTH)
            months_out[n_out * 4 + 2] = mp
            months_out[n_out * 4 + 3] = i64(rec + R_MONTH_SPEND)
            n_out += 1
            tot[1] += 1
            if u32(rec + R_MONTH) + 1 == month:
                tot[3] += 1
            put32(rec + R_MONTH, month)
            put32(rec + R_MONTH_PURCHASES, 1)
            put64(rec + R_MONTH_SPEND, spend)
    return n_out, n_totals, n_act


cdef enum:
    LAST_KEY_SIZE = 20    # members.LAST_KEY: the last purchase day (u32 big-endian) | root


cdef int by_last_key(const void* x, const void* y) noexcept nogil:
    return memcmp(x, y, LAST_KEY_SIZE)


cdef list sorted_keys(unsigned char* keys, Py_ssize_t n, bint as_items):
    """The ``n`` packed LAST_KEY_SIZE keys in key order, as bytes (``as_items``: (key, b""))."""
    cdef Py_ssize_t i
    cdef list out = []
    qsort(keys, n, LAST_KEY_SIZE, by_last_key)
    for i in range(n):
        key = PyBytes_FromStringAndSize(<const char*>&keys[i * LAST_KEY_SIZE], LAST_KEY_SIZE)
        out.append((key, b"") if as_items else key)
    return out


cdef inline void last_key(unsigned char* out, uint32_t day, const unsigned char* root) noexcept nogil:
    out[0], out[1], out[2], out[3] = (day >> 24) & 0xFF, (day >> 16) & 0xFF, (day >> 8) & 0xFF, day & 0xFF
    memcpy(out + 4, root, CARD_SIZE)


def last_moves(const unsigned char[::1] records, const int64_t[::1] before, list order):
    """The last-purchase index's changes of the records whose last purchase day the group moved
    (``before[slot]`` as ``add_purchases`` left it, ``order[slot]`` the record's root card id):
    (the keys that no longer hold: (day before, root) packed as members.LAST_KEY, in key order;
    the items to put: ((day now, root), b""), in key order)."""
    cdef Py_ssize_t s, nslots = before.shape[0], gone = 0, put = 0
    cdef uint32_t now
    cdef const unsigned char[::1] root
    cdef unsigned char* old_keys
    cdef unsigned char* new_keys
    if records.shape[0] != nslots * RECORD_SIZE or len(order) != nslots:
        raise ValueError("member metrics: buffers of the wrong size")
    old_keys = <unsigned char*>malloc(nslots * LAST_KEY_SIZE + 1)
    new_keys = <unsigned char*>malloc(nslots * LAST_KEY_SIZE + 1)
    if old_keys == NULL or new_keys == NULL:
        free(old_keys)
        free(new_keys)
        raise MemoryError()
    try:
        for s in range(nslots):
            if before[s] == UNTOUCHED:
                continue
            now = u32(&records[s * RECORD_SIZE + R_LAST])
            if before[s] == now:
                continue
            root = order[s]
            if root.shape[0] != CARD_SIZE:
                raise ValueError("member metrics: a root card id of the wrong size")
            if before[s] >= 0:
                last_key(&old_keys[gone * LAST_KEY_SIZE], <uint32_t>before[s], &root[0])
                gone += 1
            last_key(&new_keys[put * LAST_KEY_SIZE], now, &root[0])
            put += 1
        return sorted_keys(old_keys, gone, False), sorted_keys(new_keys, put, True)
    finally:
        free(old_keys)
        free(new_keys)
