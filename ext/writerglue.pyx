# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The writer's per-operation glue in C: a group's way through the writer process, where it
ran Python for each operation (``durable._decode``, ``ledger._Group``, ``writer_main``).

Measured before it (cProfile, groups of 1,000 plain purchases): the loop after
``kernel.apply_batch`` cost ~6.3 µs a purchase of its own Python, the card history's items
~1.5, the idempotency records ~0.9, the request-time index's unpacking ~0.5; the group's
decoding ~1.2 and the answer's encoding ~0.4 (timeit). Here, each the Python code it names in
one C loop, that code staying the reference (``ledger.GLUE_IN_C`` off runs it):

- ``decode_group`` (``groups.decode_group``) and ``encode_answer`` (``writer.encode_answer``);
- before the kernel: ``card_slots`` (the loop at the top of ``_flush_run``), ``coupon_items``
  (``items_of``'s loop for a run that names no record or only purchases' coupons: most runs);
  after it: ``dirty_records``, ``dirty_items`` and ``ended_slots`` (the records to write back,
  the coupons used, the cards ended);
- ``move_lots``: the points lots a run's redemptions move (``finish_run``'s movements), by
  ``lots.Lots.apply``'s rule over the writer's LMDB store, the same calls in the same order;
- ``finish_run``: for a run whose operations are all purchases and top-ups (lines, a coupon
  and points offered included; no capture: the caller passes only runs that move no hold),
  what the Python loop after the kernel does for each: its outcome, its journal entry (a
  purchase's stored lines and their digest in the entry), its request record, its basket index
  key, its points gained per card (the run's day) or its lots movement, a tier upgrade. It reads
  bytes and buffers (the kernel's output, the run's operations, the card records, the filled
  lines, the request keys and digests) and returns None, having changed nothing, for anything
  else: the Python loop then does the run;
- in ``_write`` and ``_prune``: ``journal_items``, ``history_items`` (``ledger.history_items``)
  and ``unpack_request_keys`` (``idempotency.unpack_request_keys``).

tests/test_writerglue.py holds each to its reference with hypothesis, and the whole: the same
random groups applied with and without it leave byte-identical ledgers and identical outcomes.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_Append
from cpython.object cimport PyObject, PyTypeObject

cdef extern from "Python.h":
    PyTypeObject PyTuple_Type


cdef inline object named_tuple(type cls, tuple fields):
    """``cls(*fields)`` for a NamedTuple class, as its own ``__new__`` makes it (tuple.__new__
    over the fields), without that Python-level call: ~1/4 of its cost."""
    cdef tuple args = (fields,)
    return PyTuple_Type.tp_new(cls, <PyObject*>args, NULL)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from fixedint cimport i64, u16, u32, u64

cdef extern from "blake2b.h" nogil:
    void cc_blake2b(uint8_t* out, size_t outlen, const uint8_t* data, size_t length)

cdef enum:
    OP_SIZE = 192             # layout.OP
    JOURNAL_SIZE = 256        # layout.JOURNAL
    CARD_SIZE = 128           # layout.CARD
    IDEM_SIZE = 64            # layout.IDEM
    LINE_SIZE = 64            # layout.LINE
    CARD_ID_SIZE = 16
    COUPON_KEY_SIZE = 24      # layout.COUPON_KEY: card id, serial (big-endian)
    LOT_KEY_SIZE = 20         # layout.LOT_KEY: card id, earned day (big-endian u32)
    LOT_DAY_KEY_SIZE = 20     # layout.LOT_DAY_KEY: earned day, card id
    LOT_SIZE = 16             # layout.POINTS_LOT: points left, points earned (i64 each)
    DIGEST_SIZE = 16          # a request's payload digest
    LINES_DIGEST_SIZE = 16    # layout.LINES_DIGEST_SIZE
    IDEM_VERSION = 2          # layout.IDEM_VERSION
    OP_TOP_UP = 2
    OP_PURCHASE = 3
    OP_PACKAGE_USE = 10
    OP_GIFT_REDEEM = 13
    OP_REFUND = 24
    OP_REVERSAL = 25          # and every type after it moves held_minor or may (rule 15)
    OP_HOLD_VOID = 28
    OP_HOLD_EXPIRED = 29
    CAPTURE = 2               # layout.CAPTURE: a purchase paid from a hold
    R_OK = 0
    R_INSUFFICIENT_FUNDS = 11
    R_CAPTURE_EXCEEDS_HOLD = 89
    # layout.OP offsets
    AT_OP_TYPE = 0
    AT_OP_CARD = 40
    AT_OP_CLIENT_TIME = 56
    AT_OP_REF = 144
    AT_OP_LINE_COUNT = 160
    AT_OP_FLAGS = 162
    # layout.JOURNAL offsets
    AT_J_OP = 1
    AT_J_TIER = 2
    AT_J_REASON = 4
    AT_J_SEQ = 8
    AT_J_CARD = 16
    AT_J_POINTS_DELTA = 64
    AT_J_PRINCIPAL_AFTER = 72
    AT_J_BONUS_AFTER = 80
    AT_J_POINTS_AFTER = 88
    AT_J_TS = 96
    AT_J_BASKET = 160
    AT_J_POINTS_REDEEMED = 176
    AT_J_TIER_AFTER = 192
    AT_J_LINES_DIGEST = 200
    AT_CARD_HELD = 32         # layout.CARD offset of held_minor
    CARD_ENTRY_KEY_SIZE = 24  # layout.CARD_ENTRY_KEY: card id, seq (big-endian)
    CARD_ENTRY_SIZE = 16      # layout.CARD_ENTRY: op, 7 zero bytes, ts_us
    BASKET_KEY_SIZE = 16      # ledger.BASKET_KEY: basket tag, seq (big-endian)
    GROUP_HEAD_SIZE = 12      # groups.GROUP_HEAD: ts_us i64, n u32
    ANSWER_SIZE = 240         # server.writer.ANSWER: reason u16, replayed u8, op u8, money i64,
    ENTRY_HEAD_SIZE = 224     # count u32, the entry's first 224 bytes
    OP_HEAD_SIZE = 23         # groups.OP_HEAD: key_len u8, ksn u32, 3 lengths u32, role u8,
                              # scope u8, scope_store u32

cdef uint32_t SLOT_NONE = 0xFFFFFFFF  # layout.SLOT_NONE (unsigned: no enum)

# The constants above, named as core/layout.py names them: held to it by the tests.
SIZES = {"OP_SIZE": OP_SIZE, "JOURNAL_SIZE": JOURNAL_SIZE, "CARD_SIZE": CARD_SIZE,
         "IDEM_SIZE": IDEM_SIZE, "LINE_SIZE": LINE_SIZE, "CARD_ID_SIZE": CARD_ID_SIZE,
         "COUPON_KEY_SIZE": COUPON_KEY_SIZE, "SLOT_NONE": SLOT_NONE,
         "LOT_KEY_SIZE": LOT_KEY_SIZE, "LOT_DAY_KEY_SIZE": LOT_DAY_KEY_SIZE, "LOT_SIZE": LOT_SIZE,
         "LINES_DIGEST_SIZE": LINES_DIGEST_SIZE, "IDEM_VERSION": IDEM_VERSION,
         "OP_TOP_UP": OP_TOP_UP, "OP_PURCHASE": OP_PURCHASE, "OP_REVERSAL": OP_REVERSAL,
         "CAPTURE": CAPTURE, "R_OK": R_OK, "OP_PACKAGE_USE": OP_PACKAGE_USE,
         "OP_GIFT_REDEEM": OP_GIFT_REDEEM, "OP_REFUND": OP_REFUND, "OP_HOLD_VOID": OP_HOLD_VOID,
         "OP_HOLD_EXPIRED": OP_HOLD_EXPIRED,
         "R_INSUFFICIENT_FUNDS": R_INSUFFICIENT_FUNDS,
         "R_CAPTURE_EXCEEDS_HOLD": R_CAPTURE_EXCEEDS_HOLD,
         "JOURNAL_OFF_SEQ": AT_J_SEQ, "JOURNAL_OFF_REASON": AT_J_REASON,
         "JOURNAL_OFF_TS": AT_J_TS, "JOURNAL_OFF_LINES_DIGEST": AT_J_LINES_DIGEST,
         "CARD_ENTRY_KEY_SIZE": CARD_ENTRY_KEY_SIZE, "CARD_ENTRY_SIZE": CARD_ENTRY_SIZE,
         "GROUP_HEAD_SIZE": GROUP_HEAD_SIZE, "OP_HEAD_SIZE": OP_HEAD_SIZE,
         "ANSWER_SIZE": ANSWER_SIZE, "ENTRY_HEAD_SIZE": ENTRY_HEAD_SIZE}
NONE_LEN = 0xFFFFFFFF  # groups.NONE_LEN: an extra that is not there


cdef inline void put_be64(uint8_t* p, uint64_t v) noexcept nogil:
    cdef int b
    for b in range(8):
        p[b] = <uint8_t>(v >> (56 - 8 * b))


cdef inline void put_be32(uint8_t* p, uint32_t v) noexcept nogil:
    cdef int b
    for b in range(4):
        p[b] = <uint8_t>(v >> (24 - 8 * b))


cdef inline void movement(const uint8_t* entry, int64_t* gain_out, int64_t* loss_out) noexcept nogil:
    """lots.movement, the rule's one definition, in C: (gain, loss) of an applied entry."""
    cdef int64_t points_delta = i64(entry + AT_J_POINTS_DELTA)
    cdef int64_t after = i64(entry + AT_J_POINTS_AFTER)
    cdef int64_t taken = i64(entry + AT_J_POINTS_REDEEMED)
    cdef int64_t gain = points_delta + taken, loss = taken
    cdef int64_t before, from_lots, debt
    if gain < 0:
        loss = loss - gain
        gain = 0
    before = after - points_delta
    if after >= 0 and 0 <= loss <= before:
        gain_out[0], loss_out[0] = gain, loss
        return
    from_lots = before if before > 0 else 0  # min(loss, max(before, 0))
    if loss < from_lots:
        from_lots = loss
    debt = (-before if before < 0 else 0) + loss - from_lots
    gain_out[0] = gain - debt if gain - debt > 0 else 0
    loss_out[0] = from_lots


def lots_movement(const uint8_t[::1] entry, Py_ssize_t offset=0):
    """(gain, loss) as lots.movement computes it: for the tests."""
    cdef int64_t gain, loss
    if offset < 0 or offset + JOURNAL_SIZE > entry.shape[0]:
        raise ValueError("no journal entry there")
    movement(&entry[offset], &gain, &loss)
    return gain, loss


def finish_run(const uint8_t[::1] out, const uint8_t[::1] packed, const uint8_t[::1] records,
               const uint32_t[::1] slots, bytes filled_lines, list keys,
               const uint8_t[::1] digests, list run, list outcomes, type outcome_type,
               list entries, list idem_items, list line_items, list basket_items,
               int64_t ts_us, uint64_t first_seq, uint32_t day):
    """What the Python loop of ``_flush_run`` does after the kernel, for a run of purchases and
    top-ups that moves no hold. ``out``: the kernel's entries; ``packed``: the run's operations
    as the kernel had them; ``records``: the card records after the kernel; ``slots``: each
    operation's card slot; ``filled_lines``: the lines as the kernel filled them; ``keys`` and
    ``digests``: each operation's request key (b"" none) and payload digest (16 bytes each).

    Sets ``outcomes[run[k]]``, appends to ``entries``, ``idem_items``, ``line_items`` and
    ``basket_items`` as the Python loop does, and returns (the next sequence, the points gained
    {(card id, day): points} in the Python loop's order, the lots movements [(card id, pending
    gain, gain, loss)] to apply in order, the tier upgrades [(tier, tier after)]). Returns None,
    having changed nothing, when the run holds anything else (another operation type, lines
    that do not add up, a sequence the journal does not expect): the Python loop does it."""
    cdef Py_ssize_t n = len(run), k, s, nslots = 0, line_at = 0, line_bytes
    cdef const uint8_t* e
    cdef const uint8_t* op
    cdef uint64_t seq, expected = first_seq
    cdef uint16_t reason
    cdef int64_t held, available, gain, loss, money
    cdef uint8_t* w
    cdef bytes entry, filled, rec, key
    cdef uint8_t lines_digest[LINES_DIGEST_SIZE]
    if (out.shape[0] < n * JOURNAL_SIZE or packed.shape[0] != n * OP_SIZE
            or slots.shape[0] != n or len(keys) != n or digests.shape[0] != n * DIGEST_SIZE):
        raise ValueError("a run's buffers do not match its operations")
    if not issubclass(outcome_type, tuple):  # named_tuple makes it as tuple.__new__ would
        raise TypeError("outcome_type is a tuple class (ledger.Outcome)")
    # First every check, so that a run it does not take is left to the Python loop untouched.
    for k in range(n):
        op = &packed[k * OP_SIZE]
        if op[AT_OP_TYPE] != OP_PURCHASE and op[AT_OP_TYPE] != OP_TOP_UP:
            return None
        e = &out[k * JOURNAL_SIZE]
        if u16(e + AT_J_REASON) == R_CAPTURE_EXCEEDS_HOLD:
            return None  # a capture's: the Python loop reads its hold
        seq = u64(e + AT_J_SEQ)
        if seq:
            if seq != expected:
                return None  # the Python loop says what is wrong
            expected += 1
        if slots[k] >= <uint32_t>(records.shape[0] // CARD_SIZE):
            return None
        if slots[k] >= <uint32_t>nslots:
            nslots = slots[k] + 1
        line_at += <Py_ssize_t>u16(op + AT_OP_LINE_COUNT) * LINE_SIZE
    if line_at != PyBytes_GET_SIZE(filled_lines):
        return None
    cdef const uint8_t* lines_base = <const uint8_t*>PyBytes_AS_STRING(filled_lines)
    # points gained per card slot, pending until the run ends, and each gain's place in the
    # dict's order (the Python loop's: a card's first gain, again after a movement popped it)
    cdef int64_t* pending = <int64_t*>calloc(nslots + 1, sizeof(int64_t))
    cdef Py_ssize_t* placed = <Py_ssize_t*>calloc(nslots + 1, sizeof(Py_ssize_t))  # 1 + place
    if pending == NULL or placed == NULL:
        free(pending)
        free(placed)
        raise MemoryError()
    order = []        # (slot, card id), in the order their gains entered the dict
    moves = []
    upgrades = []
    line_at = 0
    try:
        for k in range(n):
            op = &packed[k * OP_SIZE]
            e = &out[k * JOURNAL_SIZE]
            s = slots[k]
            reason = u16(e + AT_J_REASON)
            seq = u64(e + AT_J_SEQ)
            held = i64(&records[s * CARD_SIZE + AT_CARD_HELD])  # no operation of the run moves it
            available = 0
            if reason == R_INSUFFICIENT_FUNDS:
                available = i64(e + AT_J_PRINCIPAL_AFTER) + i64(e + AT_J_BONUS_AFTER) - held
            entry = PyBytes_FromStringAndSize(<const char*>e, JOURNAL_SIZE)
            filled = b""
            line_bytes = <Py_ssize_t>u16(op + AT_OP_LINE_COUNT) * LINE_SIZE
            if line_bytes:
                if seq and reason == R_OK:
                    filled = PyBytes_FromStringAndSize(<const char*>lines_base + line_at, line_bytes)
                    PyList_Append(line_items, (seq, filled))
                    cc_blake2b(lines_digest, LINES_DIGEST_SIZE, lines_base + line_at, line_bytes)
                    memcpy(<uint8_t*>PyBytes_AS_STRING(entry) + AT_J_LINES_DIGEST, lines_digest,
                           LINES_DIGEST_SIZE)
                line_at += line_bytes
            if seq:
                PyList_Append(entries, entry)
            if seq and reason == R_OK:
                if u64(e + AT_J_BASKET):
                    key = PyBytes_FromStringAndSize(NULL, BASKET_KEY_SIZE)
                    w = <uint8_t*>PyBytes_AS_STRING(key)
                    put_be64(w, u64(e + AT_J_BASKET))
                    put_be64(w + 8, seq)
                    PyList_Append(basket_items, (key, b""))
                movement(e, &gain, &loss)
                if loss:
                    moves.append((PyBytes_FromStringAndSize(<const char*>op + AT_OP_CARD, CARD_ID_SIZE),
                                  pending[s] if placed[s] else 0, gain, loss))
                    pending[s] = 0
                    placed[s] = 0
                elif gain:
                    if not placed[s]:
                        order.append((s, PyBytes_FromStringAndSize(<const char*>op + AT_OP_CARD,
                                                                   CARD_ID_SIZE)))
                        placed[s] = len(order)
                    pending[s] += gain
                if e[AT_J_TIER_AFTER] != e[AT_J_TIER]:  # an upgrade (rule 8)
                    upgrades.append((e[AT_J_TIER], e[AT_J_TIER_AFTER]))
            money = held if reason == R_OK else available
            key = keys[k]
            if PyBytes_GET_SIZE(key):
                rec = PyBytes_FromStringAndSize(NULL, IDEM_SIZE)
                w = <uint8_t*>PyBytes_AS_STRING(rec)
                memset(w, 0, IDEM_SIZE)  # layout.IDEM: version, op, reason, 0, digest, seq,
                w[0] = IDEM_VERSION      # the money, ts, client time, 8 zero bytes
                w[1] = op[AT_OP_TYPE]
                memcpy(w + 2, &reason, 2)
                memcpy(w + 8, &digests[k * DIGEST_SIZE], DIGEST_SIZE)
                memcpy(w + 24, &seq, 8)
                memcpy(w + 32, &money, 8)
                memcpy(w + 40, &ts_us, 8)
                memcpy(w + 48, op + AT_OP_CLIENT_TIME, 8)
                PyList_Append(idem_items, (key, rec))
            outcomes[run[k]] = named_tuple(outcome_type, (
                reason, False, op[AT_OP_TYPE], entry, available, 0, filled,
                held if reason == R_OK else 0))
        gains = {}
        for k, (s, card_id) in enumerate(order):
            if placed[s] == k + 1:
                gains[(card_id, day)] = pending[s]
    finally:
        free(pending)
        free(placed)
    return expected, gains, moves, upgrades


cdef extern from *:
    """
    static inline int cc_add_overflows(int64_t a, int64_t b, int64_t* r) {
        return __builtin_add_overflow(a, b, r);
    }
    """
    int cc_add_overflows(int64_t a, int64_t b, int64_t* r) noexcept nogil


cdef bytes _lot_value(int64_t left, int64_t earned):
    """layout.POINTS_LOT: points left, points earned."""
    cdef bytes value = PyBytes_FromStringAndSize(NULL, LOT_SIZE)
    cdef uint8_t* w = <uint8_t*>PyBytes_AS_STRING(value)
    memcpy(w, &left, 8)
    memcpy(w + 8, &earned, 8)
    return value


cdef bytes _lot_day_key(uint32_t day, const uint8_t* card_id):
    """layout.LOT_DAY_KEY: earned day (big-endian), card id."""
    cdef bytes key = PyBytes_FromStringAndSize(NULL, LOT_DAY_KEY_SIZE)
    cdef uint8_t* w = <uint8_t*>PyBytes_AS_STRING(key)
    put_be32(w, day)
    memcpy(w + 4, card_id, CARD_ID_SIZE)
    return key


cdef int64_t _sum(int64_t a, int64_t b) except? -1:
    cdef int64_t r
    if cc_add_overflows(a, b, &r):
        raise OverflowError("a points lot past int64")
    return r


cdef _move_lots(cursor, txn, db, by_day, bytes card_id, uint32_t today, int64_t gain,
                int64_t loss):
    """``lots.Lots.apply`` over ``ledger._LmdbLots`` for one card, making the same LMDB calls
    in the same order (so the same records, and the cursor where the Python leaves it)."""
    cdef const uint8_t* cid = <const uint8_t*>PyBytes_AS_STRING(card_id)
    cdef const uint8_t* k
    cdef const uint8_t* v
    cdef uint32_t day
    cdef int64_t left, earned, taken
    cdef bytes key, value
    while loss:
        if not cursor.set_range(card_id):
            raise ValueError("points spent beyond the card's lots")
        key, value = cursor.item()
        k = <const uint8_t*>PyBytes_AS_STRING(key)
        if PyBytes_GET_SIZE(key) < CARD_ID_SIZE or memcmp(k, cid, CARD_ID_SIZE):
            raise ValueError("points spent beyond the card's lots")
        if PyBytes_GET_SIZE(key) != LOT_KEY_SIZE or PyBytes_GET_SIZE(value) != LOT_SIZE:
            raise ValueError("a points lot of the wrong size")  # (the Python: struct.error)
        v = <const uint8_t*>PyBytes_AS_STRING(value)
        day = (<uint32_t>k[16] << 24) | (<uint32_t>k[17] << 16) | (<uint32_t>k[18] << 8) | k[19]
        left, earned = i64(v), i64(v + 8)
        taken = left if left < loss else loss
        loss -= taken
        if taken == left:
            txn.delete(key, db=db)
            txn.delete(_lot_day_key(day, cid), db=by_day)
        elif gain and day == today:  # (then loss is 0) the gain goes into today's lot: one write
            cursor.put(key, _lot_value(_sum(left - taken, gain), _sum(earned, gain)))
            return
        else:
            cursor.put(key, _lot_value(left - taken, earned))
    if gain:
        key = PyBytes_FromStringAndSize(NULL, LOT_KEY_SIZE)
        memcpy(<uint8_t*>PyBytes_AS_STRING(key), cid, CARD_ID_SIZE)
        put_be32(<uint8_t*>PyBytes_AS_STRING(key) + CARD_ID_SIZE, today)
        have = cursor.get(key)
        left = earned = 0
        if have is not None:
            if PyBytes_GET_SIZE(have) != LOT_SIZE:
                raise ValueError("a points lot of the wrong size")
            left, earned = i64(<const uint8_t*>PyBytes_AS_STRING(have)), \
                i64(<const uint8_t*>PyBytes_AS_STRING(have) + 8)
        cursor.put(key, _lot_value(_sum(left, gain), _sum(earned, gain)))
        if have is None:  # a new lot: into the expiry order
            txn.put(_lot_day_key(today, cid), b"", db=by_day)


def move_lots(cursor, txn, db, by_day, list moves, uint32_t today):
    """The lots movements ``finish_run`` returns [(card id, pending gain, gain, loss)], each
    as ``_finish_in_c``'s loop does it through ``lots.Lots.apply`` (the reference): the pending
    gain alone first, then the gain and the loss, by the rule of ``cardcore.lots``; ``cursor``
    and ``db`` on ``points_lots``, ``by_day`` ``lots_by_day``, in write transaction
    ``txn``; ``today`` the group's day. ValueError as the rule's when points are spent beyond
    a card's lots."""
    cdef int64_t pending, gain, loss
    for card_id, pending, gain, loss in moves:
        if not isinstance(card_id, bytes) or PyBytes_GET_SIZE(card_id) != CARD_ID_SIZE:
            raise ValueError("a card id is 16 bytes")
        if pending < 0 or gain < 0 or loss < 0:  # (the kernel makes none: its subtractions
            raise ValueError("points moved are never negative")  # below then never wrap)
        if pending:
            _move_lots(cursor, txn, db, by_day, card_id, today, pending, 0)
        _move_lots(cursor, txn, db, by_day, card_id, today, gain, loss)


cdef Py_ssize_t _ops_slotted(const uint8_t[::1] packed, uint32_t[::1] slots) except -1:
    """The run's operations in ``packed`` (whole 192-byte records), one slot each in ``slots``:
    their count (ValueError otherwise)."""
    cdef Py_ssize_t n = packed.shape[0] // OP_SIZE
    if packed.shape[0] % OP_SIZE or slots.shape[0] != n:
        raise ValueError("a slot for each operation of 192 bytes")
    return n


cdef inline Py_ssize_t _slot(dict slot_of, list found, object key, object item):
    """``key``'s slot: the one it was given, else the next, ``item`` appended to ``found``
    (slots in the order a run first names them: card_slots', coupon_items')."""
    s = slot_of.setdefault(key, len(found))
    if s == len(found):
        found.append(item)
    return s


def card_slots(const uint8_t[::1] packed, uint32_t[::1] slots):
    """The loop before the kernel in ``_flush_run``: each operation's card slot into ``slots``
    (a slot per card, in the order the run first names them); (the cards, whether an operation
    of the run moves held_minor or may: a capture, a reversal or a later type)."""
    cdef Py_ssize_t n = _ops_slotted(packed, slots), k
    cdef const uint8_t* op
    cdef bint hold_run = False
    slot_of = {}
    cards = []
    for k in range(n):
        op = &packed[k * OP_SIZE]
        if op[AT_OP_TYPE] >= OP_REVERSAL or op[AT_OP_FLAGS] & CAPTURE:
            hold_run = True
        card_id = PyBytes_FromStringAndSize(<const char*>op + AT_OP_CARD, CARD_ID_SIZE)
        slots[k] = _slot(slot_of, cards, card_id, card_id)
    return cards, hold_run


def coupon_items(const uint8_t[::1] packed, uint32_t[::1] slots, object db):
    """``items_of``'s loop in C for a run whose records are all purchases' coupons (the most
    common run that names any: baskets with a coupon): each operation's item slot into
    ``slots`` (SLOT_NONE for one that names none; a slot per coupon, in the order the run first
    names them) and the slots' (``db``, key: card id | serial, layout.COUPON_KEY), [] for a run
    that names none. None, ``slots`` left part-filled, when an operation names any other record
    (a capture's hold, a refund's or reversal's undo record, a gift's stock, a package, a hold
    closed): the Python loop reads those."""
    cdef Py_ssize_t n = _ops_slotted(packed, slots), k
    cdef const uint8_t* op
    cdef uint8_t kind
    cdef uint64_t ref
    cdef uint8_t key[COUPON_KEY_SIZE]
    slot_of = {}
    located = []
    for k in range(n):
        op = &packed[k * OP_SIZE]
        kind = op[AT_OP_TYPE]
        if kind == OP_PURCHASE:
            if op[AT_OP_FLAGS] & CAPTURE:
                return None
            ref = u64(op + AT_OP_REF)
            if not ref:
                slots[k] = SLOT_NONE
                continue
            memcpy(key, op + AT_OP_CARD, CARD_ID_SIZE)
            put_be64(key + CARD_ID_SIZE, ref)
            coupon_key = PyBytes_FromStringAndSize(<const char*>key, COUPON_KEY_SIZE)
            slots[k] = _slot(slot_of, located, coupon_key, (db, coupon_key))
        elif (kind == OP_REFUND or kind == OP_REVERSAL or kind == OP_GIFT_REDEEM
              or kind == OP_PACKAGE_USE or kind == OP_HOLD_VOID or kind == OP_HOLD_EXPIRED):
            return None
        else:
            slots[k] = SLOT_NONE
    return located


def names_items(const uint8_t[::1] packed):
    """Whether an operation of the run names a record ``ledger.items_of`` reads: a purchase's
    coupon or hold, a refund's or reversal's undo record, a gift's stock, a package, a hold
    closed. (The writer asks ``coupon_items`` now; this stays for bench/basket_writer.py
    ``--base``: an older revision's core/ledger.py calls it.)"""
    cdef Py_ssize_t k
    cdef const uint8_t* op
    cdef uint8_t kind
    cdef uint64_t ref
    if packed.shape[0] % OP_SIZE:
        raise ValueError("operations are 192 bytes each")
    for k in range(packed.shape[0] // OP_SIZE):
        op = &packed[k * OP_SIZE]
        kind = op[AT_OP_TYPE]
        if kind == OP_PURCHASE:
            memcpy(&ref, op + AT_OP_REF, 8)
            if op[AT_OP_FLAGS] & CAPTURE or ref:
                return True
        elif (kind == OP_REFUND or kind == OP_REVERSAL or kind == OP_GIFT_REDEEM
              or kind == OP_PACKAGE_USE or kind == OP_HOLD_VOID or kind == OP_HOLD_EXPIRED):
            return True
    return False


cdef int _check_records(const uint8_t[::1] records, const uint8_t[::1] dirty, Py_ssize_t n,
                        Py_ssize_t size, str each) except -1:
    """``records`` split whole into ``n`` of ``size`` bytes, and a dirty byte each (ValueError
    naming ``each`` otherwise): nothing read past the buffers."""
    if size <= 0 or records.shape[0] % size or records.shape[0] // size != n \
            or dirty.shape[0] != n:
        raise ValueError(f"a record and a dirty byte for each {each}")
    return 0


def dirty_items(list located, const uint8_t[::1] records, const uint8_t[::1] dirty,
                Py_ssize_t size):
    """(database, key, record) of each slot the kernel marked in ``dirty``: the records of
    ``size`` bytes it changed (``located``: the slots' (database, key)), for the writes of
    ``_put_items``."""
    cdef Py_ssize_t n = len(located), s
    _check_records(records, dirty, n, size, "slot")
    items = []
    for s in range(n):
        if dirty[s]:
            db, key = located[s]
            items.append((db, key,
                          PyBytes_FromStringAndSize(<const char*>&records[s * size], size)))
    return items


def dirty_records(list ids, const uint8_t[::1] records, const uint8_t[::1] dirty, uint8_t bit,
                  Py_ssize_t size):
    """(id, record) of each slot whose ``dirty`` has ``bit``: the records of ``size`` bytes
    the kernel changed, for a putmulti."""
    cdef Py_ssize_t n = len(ids), s
    _check_records(records, dirty, n, size, "id")
    items = []
    for s in range(n):
        if dirty[s] & bit:
            items.append((ids[s], PyBytes_FromStringAndSize(<const char*>&records[s * size], size)))
    return items


def ended_slots(const uint8_t[::1] records, const uint8_t[::1] dirty, uint8_t bit,
                const uint8_t[::1] live):
    """The slots of the card records the kernel changed (``dirty`` has ``bit``) whose status
    byte ``live`` (256 bytes, one per status) does not mark: expired, closed or replaced."""
    cdef Py_ssize_t n = dirty.shape[0], s
    if records.shape[0] != n * CARD_SIZE or live.shape[0] != 256:
        raise ValueError("a card record for each dirty byte; 256 status bytes")
    return [s for s in range(n) if dirty[s] & bit and not live[records[s * CARD_SIZE + 1]]]


def journal_items(const uint8_t[::1] entries, uint64_t first_seq):
    """The journal's (seq big-endian, entry) items of entries laid end to end from
    ``first_seq``: ``_write``'s putmulti."""
    cdef Py_ssize_t n = entries.shape[0] // JOURNAL_SIZE, k
    cdef bytes key
    if entries.shape[0] % JOURNAL_SIZE:
        raise ValueError("entries are 256 bytes each")
    items = []
    for k in range(n):
        key = PyBytes_FromStringAndSize(NULL, 8)
        put_be64(<uint8_t*>PyBytes_AS_STRING(key), first_seq + k)
        items.append((key, PyBytes_FromStringAndSize(<const char*>&entries[k * JOURNAL_SIZE],
                                                     JOURNAL_SIZE)))
    return items


def history_items(const uint8_t[::1] entries, const uint8_t[::1] card_entry_ops):
    """ledger.history_items over the entries laid end to end: (card id | seq, op | ts) of each
    entry whose op ``card_entry_ops`` (256 bytes, one per op) marks."""
    cdef Py_ssize_t n = entries.shape[0] // JOURNAL_SIZE, k
    cdef const uint8_t* e
    cdef bytes key, value
    cdef uint8_t* w
    if entries.shape[0] % JOURNAL_SIZE or card_entry_ops.shape[0] != 256:
        raise ValueError("entries are 256 bytes each, the op mask 256 bytes")
    items = []
    for k in range(n):
        e = &entries[k * JOURNAL_SIZE]
        if not card_entry_ops[e[AT_J_OP]]:
            continue
        key = PyBytes_FromStringAndSize(NULL, CARD_ENTRY_KEY_SIZE)
        w = <uint8_t*>PyBytes_AS_STRING(key)
        memcpy(w, e + AT_J_CARD, CARD_ID_SIZE)
        put_be64(w + CARD_ID_SIZE, u64(e + AT_J_SEQ))
        value = PyBytes_FromStringAndSize(NULL, CARD_ENTRY_SIZE)
        w = <uint8_t*>PyBytes_AS_STRING(value)
        memset(w, 0, CARD_ENTRY_SIZE)
        w[0] = e[AT_J_OP]
        memcpy(w + 8, e + AT_J_TS, 8)
        items.append((key, value))
    return items


def unpack_request_keys(bytes blob):
    """idempotency.unpack_request_keys in C: each key of a ``request_times`` value (u8 length |
    key), a key cut short by the end included as it is, as the Python one does."""
    cdef Py_ssize_t pos = 0, n, size = PyBytes_GET_SIZE(blob)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(blob)
    out = []
    while pos < size:
        n = p[pos]
        if pos + 1 + n > size:
            n = size - pos - 1
        out.append(PyBytes_FromStringAndSize(<const char*>p + pos + 1, n))
        pos += 1 + p[pos]
    return out


cdef inline object _extra(const uint8_t* base, Py_ssize_t* pos, Py_ssize_t size, uint32_t length):
    """An operation's extra of a group (None when its length says none), moving ``pos`` on."""
    if length == NONE_LEN:
        return None
    if length > size - pos[0]:
        raise ValueError("group message cut short")
    pos[0] += length
    return PyBytes_FromStringAndSize(<const char*>base + pos[0] - length, length)


def decode_group(bytes data, type pending_type):
    """groups.decode_group in one C loop: (the operations as ``pending_type`` (PendingOp) of
    the group ``data``, its time). Any length that runs past the end, or bytes left over,
    raise ValueError (the Python one raises too: struct.error or ValueError)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data), pos = GROUP_HEAD_SIZE, k, n_lines
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef const uint8_t* head
    cdef int64_t ts_us
    cdef uint32_t n
    cdef uint8_t key_len
    if size < GROUP_HEAD_SIZE:
        raise ValueError("group message cut short")
    memcpy(&ts_us, base, 8)
    n = u32(base + 8)
    if n > (size - GROUP_HEAD_SIZE) // (OP_HEAD_SIZE + OP_SIZE + DIGEST_SIZE):
        raise ValueError("group message cut short")
    ops = []
    for k in range(n):
        if size - pos < OP_HEAD_SIZE + OP_SIZE + DIGEST_SIZE:
            raise ValueError("group message cut short")
        head = base + pos
        key_len = head[0]
        pos += OP_HEAD_SIZE
        packed = PyBytes_FromStringAndSize(<const char*>base + pos, OP_SIZE)
        card_id = PyBytes_FromStringAndSize(<const char*>base + pos + AT_OP_CARD, CARD_ID_SIZE)
        n_lines = <Py_ssize_t>u16(base + pos + AT_OP_LINE_COUNT) * LINE_SIZE
        digest = PyBytes_FromStringAndSize(<const char*>base + pos + OP_SIZE, DIGEST_SIZE)
        pos += OP_SIZE + DIGEST_SIZE
        key = _extra(base, &pos, size, key_len)
        profile = _extra(base, &pos, size, u32(head + 5))
        sealed = _extra(base, &pos, size, u32(head + 9))
        payload = _extra(base, &pos, size, u32(head + 13))
        lines = _extra(base, &pos, size, <uint32_t>n_lines) if n_lines else b""
        ops.append(pending_type(key, card_id, packed, digest, profile, u32(head + 1), sealed,
                                payload, head[17], head[18], u32(head + 19), lines))
    if pos != size:
        raise ValueError("group message has trailing bytes")
    return ops, ts_us


def encode_answer(list outcomes):
    """server.writer.encode_answer in one C loop: the outcomes of a group (Outcome tuples) as
    the writer's answer: their count, each one's fixed part (the money: the card's held_minor
    of an applied one, else its available_minor; the entry's first 224 bytes, zeros when none),
    then the lines of those that have some, in order."""
    cdef Py_ssize_t n = len(outcomes), k, lines_size = 0, at
    cdef uint16_t reason
    cdef int64_t money
    cdef uint32_t count = n
    cdef uint8_t* w
    cdef tuple o
    for k in range(n):
        if not isinstance(outcomes[k], tuple):
            raise TypeError("an Outcome is a tuple")
        o = <tuple>outcomes[k]  # an Outcome: a tuple subclass
        if len(o) != 8 or not (o[3] is None or type(o[3]) is bytes) or type(o[6]) is not bytes:
            raise TypeError("an Outcome's entry and lines are bytes")
        if o[6]:
            lines_size += PyBytes_GET_SIZE(o[6])
    answer = PyBytes_FromStringAndSize(NULL, 4 + n * ANSWER_SIZE + lines_size)
    w = <uint8_t*>PyBytes_AS_STRING(answer)
    memcpy(w, &count, 4)
    at = 4 + n * ANSWER_SIZE
    for k in range(n):
        o = <tuple>outcomes[k]
        e = o[3]
        reason = o[0]
        money = o[7] if reason == R_OK else o[4]
        count = o[5]
        memcpy(w + 4 + k * ANSWER_SIZE, &reason, 2)
        w[6 + k * ANSWER_SIZE] = 1 if o[1] else 0
        w[7 + k * ANSWER_SIZE] = <uint8_t>o[2]
        memcpy(w + 8 + k * ANSWER_SIZE, &money, 8)
        memcpy(w + 16 + k * ANSWER_SIZE, &count, 4)
        memset(w + 20 + k * ANSWER_SIZE, 0, ENTRY_HEAD_SIZE)
        if e is not None:
            memcpy(w + 20 + k * ANSWER_SIZE, PyBytes_AS_STRING(e),
                   min(<Py_ssize_t>ENTRY_HEAD_SIZE, PyBytes_GET_SIZE(e)))
        if o[6]:
            memcpy(w + at, PyBytes_AS_STRING(o[6]), PyBytes_GET_SIZE(o[6]))
            at += PyBytes_GET_SIZE(o[6])
    return answer
