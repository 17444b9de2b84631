# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""SubmitBatch's per-operation glue in one C loop: purchases and top-ups in, results out.

The gRPC process spent ~43 % of its SubmitBatch samples building operations from protobuf
(``Operations.purchase_op``: field reads, the request id's regex, the card number's keyed
hash, ``layout.OP.pack``, two BLAKE2b) and ~15 % building results (``result_of``). Here both
run over bytes:

- ``MoneyOps.build`` reads a SubmitBatchRequest as protobuf serialized it and builds, for each
  *plain* purchase or top-up (request id, card number, till, amount, client time; nothing else
  set), and each purchase that adds lines, points offered or a coupon (a basket: its lines
  read by purchaselines.pxd, the code ``wire.lines_of`` runs for the Python path), that passes
  every check ``Operations.purchase_op`` (``top_up_op``) makes, the same ``PendingOp`` the
  Python path builds. Anything else (another operation, a PIN block, partial payment, a basket
  id, a field it does not know, any value the Python path would refuse) is left to the Python
  path (None at its place), so a refusal is always the reference's own, reason and field alike.
  (A basket cost the Python path ~12 µs of the gRPC process's CPU more than a plain purchase.)
- ``Results.fill`` writes the serialized OperationResult of each outcome of the writer: an
  applied purchase (its lines, points and coupon too) or top-up in C, a capture, a partial
  payment and anything else through ``result_of`` (the reference).
- The hop's per-operation loops in the gRPC process: ``encode_group`` (groups.encode_group),
  ``decode_answer`` (writer.decode_answer), ``mark_dirty`` (the writer's dirty-card marks).

The Python path stays the reference: tests/test_batchwire.py holds each part equal to it with
hypothesis, on valid and invalid input.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from protowire cimport (WIRE_I32, WIRE_I64, WIRE_LEN, WIRE_VARINT, length_at, put_int,
                       put_varint, skip, varint)
from purchaselines cimport LINE_RESULT_MAX, LINE_SIZE, LINES_MAX, P_OK, put_line_results, read_lines
from libc.string cimport memcmp, memcpy, memmove, memset

cdef extern from "blake2b.h" nogil:
    void cc_blake2b(uint8_t* out, size_t outlen, const uint8_t* data, size_t length)

cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t length)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

cdef enum:
    OP_SIZE = 192          # layout.OP
    CARD_ID_SIZE = 16
    TAG_SIZE = 8           # layout.REQUEST_TAG_SIZE
    DIGEST_SIZE = 16
    REQUEST_ID_MAX = 64    # operations.REQUEST_ID_RE: 1..64 of [A-Za-z0-9._:-]
    NUMBER_MIN = 8         # a card number: 8..19 ASCII digits (cardno.number_ok)
    NUMBER_MAX = 19
    SPANS_MAX = 16
    HMAC_BLOCK = 64
    # field numbers of the contract (proto/cardcore/v1); held to the descriptors by the tests
    F_BATCH_OPERATIONS = 1     # SubmitBatchRequest.operations
    F_OPERATION_TOP_UP = 2     # Operation.top_up
    F_OPERATION_PURCHASE = 3   # Operation.purchase
    F_REQUEST_ID = 1           # PurchaseRequest, and TopUpRequest alike
    F_CARD = 2
    F_GROSS = 3
    F_TILL = 4
    F_CLIENT_TIME = 6
    F_LINES = 7                # PurchaseRequest only, as the two below
    F_REDEEM_POINTS = 8
    F_COUPON_SERIAL = 9
    F_CARD_NUMBER = 1          # CardRef.card_number
    # layout.OP offsets
    AT_OP = 0
    AT_PIN_FLAGS = 2
    AT_CALLER_KIND = 3
    AT_AMOUNT = 8
    AT_STORE = 16
    AT_TERMINAL = 20
    AT_STAFF = 24
    AT_OPERATOR = 28
    AT_TAG = 32
    AT_CARD_ID = 40
    AT_CLIENT_TIME = 56
    AT_CALLER_ID = 128
    AT_REF_ID = 144        # a purchase's coupon serial
    AT_LINE_COUNT = 160
    AT_REDEEM_POINTS = 168
    # a purchase's extra digest input (idempotency.purchase_extra): line count u16, points i64,
    # the lines
    EXTRA_HEAD = 10

SIZES = {"OP_SIZE": OP_SIZE, "CARD_ID_SIZE": CARD_ID_SIZE, "REQUEST_TAG_SIZE": TAG_SIZE,
         "AT_OP": AT_OP, "AT_PIN_FLAGS": AT_PIN_FLAGS, "AT_CALLER_KIND": AT_CALLER_KIND,
         "AT_AMOUNT": AT_AMOUNT, "AT_STORE": AT_STORE, "AT_TERMINAL": AT_TERMINAL,
         "AT_STAFF": AT_STAFF, "AT_OPERATOR": AT_OPERATOR, "AT_TAG": AT_TAG,
         "AT_CARD_ID": AT_CARD_ID, "AT_CLIENT_TIME": AT_CLIENT_TIME, "AT_CALLER_ID": AT_CALLER_ID,
         "AT_REF_ID": AT_REF_ID, "AT_LINE_COUNT": AT_LINE_COUNT,
         "AT_REDEEM_POINTS": AT_REDEEM_POINTS, "EXTRA_HEAD": EXTRA_HEAD}
FIELDS = {"SubmitBatchRequest.operations": F_BATCH_OPERATIONS,
          "Operation.purchase": F_OPERATION_PURCHASE, "Operation.top_up": F_OPERATION_TOP_UP,
          "TopUpRequest.request_id": F_REQUEST_ID, "TopUpRequest.card": F_CARD,
          "TopUpRequest.amount_minor": F_GROSS, "TopUpRequest.till": F_TILL,
          "TopUpRequest.client_time_us": F_CLIENT_TIME, "PurchaseRequest.request_id": F_REQUEST_ID,
          "PurchaseRequest.card": F_CARD, "PurchaseRequest.gross_amount_minor": F_GROSS,
          "PurchaseRequest.till": F_TILL, "PurchaseRequest.client_time_us": F_CLIENT_TIME,
          "PurchaseRequest.lines": F_LINES, "PurchaseRequest.redeem_points": F_REDEEM_POINTS,
          "PurchaseRequest.coupon_serial": F_COUPON_SERIAL,
          "CardRef.card_number": F_CARD_NUMBER}


def blake2b(const uint8_t[::1] data, int digest_size):
    """BLAKE2b of ``data`` (unkeyed) in ``digest_size`` bytes: for the tests against hashlib."""
    cdef uint8_t out[64]
    if not 1 <= digest_size <= 64:
        raise ValueError("digest_size is 1..64")
    cc_blake2b(out, digest_size, &data[0] if data.shape[0] else NULL, data.shape[0])
    return PyBytes_FromStringAndSize(<char*>out, digest_size)





cdef inline bint request_id_char(uint8_t c) noexcept nogil:
    return ((c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5A) or (c >= 0x61 and c <= 0x7A)
            or c == 0x2E or c == 0x5F or c == 0x3A or c == 0x2D)


cdef inline bint number_ok(const uint8_t* s, Py_ssize_t n, bint require_luhn) noexcept nogil:
    """cardno.number_ok over ASCII bytes: 8..19 digits, the Luhn check digit when asked."""
    cdef Py_ssize_t i
    cdef int d, total = 0
    if n < NUMBER_MIN or n > NUMBER_MAX:
        return 0
    for i in range(n):
        d = <int>s[n - 1 - i] - 48
        if d < 0 or d > 9:
            return 0
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0 or not require_luhn


cdef struct Money:
    Py_ssize_t rid_at, rid_len, number_at, number_len
    int64_t gross, client_time_us, redeem_points
    uint64_t coupon_serial
    uint32_t store, terminal, staff
    bint lines  # a purchase with lines (read by purchaselines.read_lines)


cdef int money_request(const uint8_t* p, Py_ssize_t at, Py_ssize_t end, bint require_luhn,
                       bint purchase, Money* out) noexcept nogil:
    """1 when the PurchaseRequest (or TopUpRequest: the same fields, numbered alike, without a
    basket's) at [at, end) is one the Python path would accept as far as its fields go (every
    value checked as ``purchase_op`` and ``top_up_op`` check it; a purchase's lines and their
    total are the caller's to check): plain, or a purchase with lines, points offered, a
    coupon; 0 for anything else, left to that path."""
    cdef uint64_t key, v
    cdef uint32_t field, wire
    cdef Py_ssize_t stop, inner, k
    cdef int got = 0  # bits: request id, card number, gross above 0, client time
    memset(out, 0, sizeof(Money))
    while at < end:
        if not varint(p, end, &at, &key):
            return 0
        field, wire = <uint32_t>(key >> 3), <uint32_t>(key & 7)
        if wire == WIRE_VARINT and (field == F_GROSS or field == F_CLIENT_TIME):
            if not varint(p, end, &at, &v) or <int64_t>v < 0:
                return 0  # below 0: the Python path refuses it
            if field == F_GROSS:
                out.gross = <int64_t>v  # 0 (not set): a basket's gross is its lines' total
                got = (got | 4) if v else (got & ~4)
            elif v == 0:
                return 0  # a client time is above 0
            else:
                out.client_time_us = <int64_t>v
                got |= 8
        elif purchase and wire == WIRE_VARINT and field == F_REDEEM_POINTS:
            if not varint(p, end, &at, &v) or <int64_t>v < 0:
                return 0  # points offered are >= 0
            out.redeem_points = <int64_t>v
        elif purchase and wire == WIRE_VARINT and field == F_COUPON_SERIAL:
            if not varint(p, end, &at, &v):
                return 0
            out.coupon_serial = v
        elif purchase and wire == WIRE_LEN and field == F_LINES:
            if not length_at(p, end, &at, &stop):
                return 0
            at = stop  # each line is read and checked by read_lines, in order
            out.lines = 1
        elif wire == WIRE_LEN and field == F_REQUEST_ID:
            if not length_at(p, end, &at, &stop) or stop == at or stop - at > REQUEST_ID_MAX:
                return 0
            for k in range(at, stop):
                if not request_id_char(p[k]):
                    return 0
            out.rid_at, out.rid_len = at, stop - at
            at = stop
            got |= 1
        elif wire == WIRE_LEN and field == F_CARD:
            if not length_at(p, end, &at, &stop):
                return 0
            # exactly one field: the card number (not a secure swipe, not a card id)
            if at == stop or not varint(p, stop, &at, &key) or key != ((F_CARD_NUMBER << 3) | WIRE_LEN):
                return 0
            if not length_at(p, stop, &at, &inner) or inner != stop:
                return 0
            if not number_ok(p + at, stop - at, require_luhn):
                return 0
            out.number_at, out.number_len = at, stop - at
            at = stop
            got |= 2
        elif wire == WIRE_LEN and field == F_TILL:
            if not length_at(p, end, &at, &stop):
                return 0
            while at < stop:
                if not varint(p, stop, &at, &key) or (key & 7) != WIRE_VARINT or not 1 <= (key >> 3) <= 3:
                    return 0
                if not varint(p, stop, &at, &v):
                    return 0
                if key >> 3 == 1:
                    out.store = <uint32_t>v  # uint32: protobuf keeps the low 32 bits
                elif key >> 3 == 2:
                    out.terminal = <uint32_t>v
                else:
                    out.staff = <uint32_t>v
        else:
            return 0  # a PIN block, partial payment, a basket id, a field unknown here
    # a gross amount above 0, unless the purchase has lines (then 0 or their total: the caller's)
    return (got | (4 if out.lines else 0)) == 15


cdef class MoneyOps:
    """Builds the PendingOps of a batch's purchases (plain ones and baskets) and top-ups for one
    server (its card index key, the digest fields of both, the PendingOp class, the op types:
    all given by the Python side, the one place each is defined)."""
    cdef SHA256_CTX inner, outer
    cdef int n_spans
    cdef int span_at[SPANS_MAX]
    cdef int span_size[SPANS_MAX]
    cdef object pending_op
    cdef uint8_t op_purchase, op_top_up

    def __init__(self, bytes index_key, list digest_spans, pending_op, int op_purchase,
                 int op_top_up):
        cdef uint8_t pad[HMAC_BLOCK]
        cdef Py_ssize_t k, n = len(index_key), total = 0
        if not 16 <= n <= HMAC_BLOCK:
            raise ValueError("an HMAC key here is 16 to 64 bytes")  # as cards.PreparedHmac
        if not 0 < len(digest_spans) <= SPANS_MAX:
            raise ValueError("digest spans")
        for k in range(HMAC_BLOCK):
            pad[k] = (<uint8_t>index_key[k] if k < n else 0) ^ 0x36
        SHA256_Init(&self.inner)
        SHA256_Update(&self.inner, pad, HMAC_BLOCK)
        for k in range(HMAC_BLOCK):
            pad[k] = (<uint8_t>index_key[k] if k < n else 0) ^ 0x5C
        SHA256_Init(&self.outer)
        SHA256_Update(&self.outer, pad, HMAC_BLOCK)
        self.n_spans = len(digest_spans)
        for k, (at, size) in enumerate(digest_spans):
            if at < 0 or size <= 0 or at + size > OP_SIZE:
                raise ValueError("digest span outside the operation")
            self.span_at[k], self.span_size[k] = at, size
            total += size
        if total > OP_SIZE:  # the spans are copied ahead of the lines in one buffer (build)
            raise ValueError("digest spans longer than an operation")
        self.pending_op = pending_op
        self.op_purchase, self.op_top_up = op_purchase, op_top_up

    cdef void card_id(self, const uint8_t* number, Py_ssize_t n, uint8_t* out) noexcept nogil:
        """cards.CardIndex.card_id: HMAC-SHA256 on the prepared states, its first 16 bytes."""
        cdef SHA256_CTX c
        cdef uint8_t md[32]
        c = self.inner
        SHA256_Update(&c, number, n)
        SHA256_Final(md, &c)
        c = self.outer
        SHA256_Update(&c, md, 32)
        SHA256_Final(md, &c)
        memcpy(out, md, CARD_ID_SIZE)

    def build(self, bytes batch, int purchase_pin_flags, int top_up_pin_flags,
              bint require_luhn, int caller_kind, uint32_t caller_id, uint32_t operator_id,
              int need_role, int scope):
        """(ops, request_ids, built) of a serialized SubmitBatchRequest: per operation, in order,
        its PendingOp and request id (str) when it is a plain purchase or top-up, or a purchase
        with lines, points offered and a coupon, built here; else None in both; ``built``: how
        many were. None: a batch with a field it cannot step over (a group), all of it for the
        Python path. ``operator_id`` 0: no operator (then ``need_role`` and ``scope`` are 0
        too); otherwise the caller checked that the operator covers every store."""
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(batch)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(batch), at = 0, stop, op_at, op_stop
        cdef uint64_t key
        cdef Money money
        cdef uint8_t packed[OP_SIZE]
        cdef uint8_t keybuf[5 + REQUEST_ID_MAX]
        # the digest's input: the spans of the operation, then a purchase's extra (its length,
        # line count, points, lines: idempotency.payload_digest and purchase_extra)
        cdef uint8_t spans[OP_SIZE + 4 + EXTRA_HEAD + LINES_MAX * LINE_SIZE]
        cdef uint8_t digest[DIGEST_SIZE]
        cdef uint8_t* lines
        cdef Py_ssize_t k, span_len, n_lines, bad_at
        cdef int64_t amount
        cdef int ok
        cdef Py_ssize_t built = 0
        ops, rids = [], []
        while at < end:
            if not varint(p, end, &at, &key):
                raise ValueError("not a serialized SubmitBatchRequest")
            if key != ((F_BATCH_OPERATIONS << 3) | WIRE_LEN):
                # an unknown field of the batch (a field of a newer contract, or one sent with
                # another wire type): protobuf keeps it, nobody reads it
                if not skip(p, end, &at, <uint32_t>(key & 7)):
                    return None  # (a group, say: the whole batch to the Python path)
                continue
            if not length_at(p, end, &at, &stop):
                raise ValueError("not a serialized SubmitBatchRequest")
            op_at = at
            ok = 0
            n_lines = 0
            # an Operation whose one field is the purchase or the top-up
            if varint(p, stop, &op_at, &key) and (
                    key == ((F_OPERATION_PURCHASE << 3) | WIRE_LEN)
                    or key == ((F_OPERATION_TOP_UP << 3) | WIRE_LEN)) \
                    and length_at(p, stop, &op_at, &op_stop) and op_stop == stop:
                ok = money_request(p, op_at, op_stop, require_luhn,
                                   key >> 3 == F_OPERATION_PURCHASE, &money)
            at = stop
            # the lines go where the digest's extra takes them, after its head
            lines = spans + OP_SIZE + 4 + EXTRA_HEAD
            if ok:
                amount = money.gross
                if money.lines:
                    # operations.basket's checks: the lines' own (read_lines, as wire.lines_of
                    # for the Python path), then a gross amount of 0 or their total
                    ok = read_lines(p + op_at, op_stop - op_at, F_LINES, lines, &n_lines,
                                    &amount, &bad_at) == P_OK and money.gross in (0, amount)
            if not ok:
                ops.append(None)
                rids.append(None)
                continue
            memset(packed, 0, OP_SIZE)
            if key >> 3 == F_OPERATION_PURCHASE:
                packed[AT_OP], packed[AT_PIN_FLAGS] = self.op_purchase, <uint8_t>purchase_pin_flags
            else:
                packed[AT_OP], packed[AT_PIN_FLAGS] = self.op_top_up, <uint8_t>top_up_pin_flags
            packed[AT_CALLER_KIND] = <uint8_t>caller_kind
            (<int64_t*>(packed + AT_AMOUNT))[0] = amount
            (<uint32_t*>(packed + AT_STORE))[0] = money.store
            (<uint32_t*>(packed + AT_TERMINAL))[0] = money.terminal
            (<uint32_t*>(packed + AT_STAFF))[0] = money.staff
            (<uint32_t*>(packed + AT_OPERATOR))[0] = operator_id
            (<int64_t*>(packed + AT_CLIENT_TIME))[0] = money.client_time_us
            (<uint32_t*>(packed + AT_CALLER_ID))[0] = caller_id
            (<uint64_t*>(packed + AT_REF_ID))[0] = money.coupon_serial
            (<uint16_t*>(packed + AT_LINE_COUNT))[0] = <uint16_t>n_lines
            (<int64_t*>(packed + AT_REDEEM_POINTS))[0] = money.redeem_points
            # the request key: caller kind, caller id (big-endian), the request id
            keybuf[0] = <uint8_t>caller_kind
            keybuf[1], keybuf[2] = <uint8_t>(caller_id >> 24), <uint8_t>(caller_id >> 16)
            keybuf[3], keybuf[4] = <uint8_t>(caller_id >> 8), <uint8_t>caller_id
            memcpy(keybuf + 5, p + money.rid_at, money.rid_len)
            cc_blake2b(packed + AT_TAG, TAG_SIZE, keybuf, 5 + money.rid_len)
            self.card_id(p + money.number_at, money.number_len, packed + AT_CARD_ID)
            # (before the digest's input moves them next to its spans)
            line_records = (PyBytes_FromStringAndSize(<char*>lines, n_lines * LINE_SIZE)
                            if n_lines else b"")
            span_len = 0
            for k in range(self.n_spans):
                memcpy(spans + span_len, packed + self.span_at[k], self.span_size[k])
                span_len += self.span_size[k]
            if n_lines or money.redeem_points:  # purchase_extra: None for a purchase without
                (<uint32_t*>(spans + span_len))[0] = <uint32_t>(EXTRA_HEAD + n_lines * LINE_SIZE)
                span_len += 4
                (<uint16_t*>(spans + span_len))[0] = <uint16_t>n_lines
                (<int64_t*>(spans + span_len + 2))[0] = money.redeem_points
                span_len += EXTRA_HEAD
                if span_len != OP_SIZE + 4 + EXTRA_HEAD:  # the lines where they were read to
                    memmove(spans + span_len, lines, n_lines * LINE_SIZE)
                span_len += n_lines * LINE_SIZE
            cc_blake2b(digest, DIGEST_SIZE, spans, span_len)
            op = self.pending_op.__new__(self.pending_op)
            op.request_key = PyBytes_FromStringAndSize(<char*>keybuf, 5 + money.rid_len)
            op.card_id = PyBytes_FromStringAndSize(<char*>packed + AT_CARD_ID, CARD_ID_SIZE)
            op.packed = PyBytes_FromStringAndSize(<char*>packed, OP_SIZE)
            op.digest = PyBytes_FromStringAndSize(<char*>digest, DIGEST_SIZE)
            op.profile = None
            op.ksn_counter = 0
            op.sealed = None
            op.payload = None
            op.need_role = need_role
            op.scope = scope
            op.scope_store_id = money.store if scope else 0
            op.lines = line_records
            ops.append(op)
            rids.append(PyUnicode_DecodeASCII(<char*>p + money.rid_at, money.rid_len, NULL))
            built += 1
        return ops, rids, built


# ---- results ---------------------------------------------------------------------------------

cdef enum:
    # a result: its own fields far less than 512 (request id 66, 24 varints of <= 13 with their
    # keys), then up to LINES_MAX lines
    RESULT_MAX = 512 + LINES_MAX * LINE_RESULT_MAX
    F_RESULT_LINES = 23    # OperationResult.lines
    OUTCOMES_TYPES = 64    # counts: op types below this, reasons below REASONS
    REASONS = 256
    ENTRY_MIN = 200        # the journal entry's fields read here end at 200 (layout.JOURNAL)
    ENTRY_COUPON_MIN = 224 # ... and a coupon's at 224
    # layout.JOURNAL offsets (service._REPLY_FIELDS, _REPLY_PROGRAM)
    J_OP = 1
    J_TIER = 2
    J_SEQ = 8
    J_AMOUNT = 32
    J_DISCOUNT = 40
    J_PRINCIPAL_DELTA = 48
    J_BONUS_DELTA = 56
    J_POINTS_DELTA = 64
    J_PRINCIPAL_AFTER = 72
    J_BONUS_AFTER = 80
    J_POINTS_AFTER = 88
    J_TS = 96
    J_PROGRAM_VERSION = 128
    J_LINK_SEQ = 144
    J_COUPON_SERIAL = 152  # layout.JOURNAL_TAIL's [4]: a purchase's coupon used
    J_POINTS_TAKEN = 176
    J_REDEEMED = 184
    J_TIER_AFTER = 192
    J_PROMOTION = 196
    J_FLAGS = 198
    J_COUPON_OFF = 216     # layout.JOURNAL_OFF_COUPON

JOURNAL_AT = {"J_OP": J_OP, "J_TIER": J_TIER, "J_SEQ": J_SEQ, "J_AMOUNT": J_AMOUNT,
              "J_DISCOUNT": J_DISCOUNT, "J_PRINCIPAL_DELTA": J_PRINCIPAL_DELTA,
              "J_BONUS_DELTA": J_BONUS_DELTA, "J_POINTS_DELTA": J_POINTS_DELTA,
              "J_PRINCIPAL_AFTER": J_PRINCIPAL_AFTER, "J_BONUS_AFTER": J_BONUS_AFTER,
              "J_POINTS_AFTER": J_POINTS_AFTER, "J_TS": J_TS,
              "J_PROGRAM_VERSION": J_PROGRAM_VERSION, "J_LINK_SEQ": J_LINK_SEQ,
              "J_POINTS_TAKEN": J_POINTS_TAKEN, "J_REDEEMED": J_REDEEMED,
              "J_TIER_AFTER": J_TIER_AFTER, "J_PROMOTION": J_PROMOTION, "J_FLAGS": J_FLAGS,
              "J_COUPON_SERIAL": J_COUPON_SERIAL, "J_COUPON_OFF": J_COUPON_OFF}
RESULT_FIELDS = {"OperationResult.lines": F_RESULT_LINES}




cdef inline int64_t i64(const uint8_t* e, Py_ssize_t at) noexcept nogil:
    return (<const int64_t*>(e + at))[0]


cdef class Results:
    """Writes SubmitBatch's results as protobuf's bytes: an applied purchase (plain, or with
    lines, points redeemed and a coupon used) or top-up here, unless it is a capture or a
    partial payment; anything else by ``fallback(request_id, outcome)`` (service.result_of,
    serialized): the reference."""
    cdef int op_purchase, op_top_up, partial_payment

    def __init__(self, int op_purchase, int op_top_up, int partial_payment):
        self.op_purchase, self.op_top_up = op_purchase, op_top_up
        self.partial_payment = partial_payment

    cdef Py_ssize_t applied(self, uint8_t* q, str request_id, bint replayed, bytes entry,
                            int64_t held, bytes lines) except -1:
        """The serialized OperationResult of an applied purchase or top-up (result_of's fields
        for it, in field-number order, as protobuf writes them); 0: one this does not write."""
        cdef const uint8_t* e = <const uint8_t*>PyBytes_AS_STRING(entry)
        cdef Py_ssize_t entry_len = PyBytes_GET_SIZE(entry)
        cdef Py_ssize_t lines_len = PyBytes_GET_SIZE(lines)
        cdef int op = e[J_OP]
        cdef uint16_t promotion = (<const uint16_t*>(e + J_PROMOTION))[0]
        cdef Py_ssize_t n = 0, rid_len, body
        cdef const char* rid
        cdef int64_t pa, ba, dp = i64(e, J_PRINCIPAL_DELTA), db = i64(e, J_BONUS_DELTA)
        cdef int64_t taken = i64(e, J_POINTS_TAKEN)
        cdef uint8_t balance[64]
        if op != self.op_purchase and op != self.op_top_up:
            return 0
        if (<const uint16_t*>(e + J_FLAGS))[0] & self.partial_payment:
            return 0  # a remainder due: result_of's
        if op == self.op_purchase and i64(e, J_LINK_SEQ):
            return 0  # a capture: its hold, result_of's
        if op == self.op_purchase and promotion and entry_len < ENTRY_COUPON_MIN:
            return 0
        if lines_len % LINE_SIZE or lines_len > LINES_MAX * LINE_SIZE:
            return 0  # (never from the writer) result_of's to refuse
        rid = PyUnicode_AsUTF8AndSize(request_id, &rid_len)
        if rid_len > 127:
            return 0
        if rid_len:
            q[0] = (1 << 3) | WIRE_LEN
            q[1] = <uint8_t>rid_len
            memcpy(q + 2, rid, rid_len)
            n = 2 + rid_len
        n += put_int(q + n, 4, replayed)
        n += put_int(q + n, 5, i64(e, J_SEQ))
        n += put_int(q + n, 6, op)
        pa, ba = i64(e, J_PRINCIPAL_AFTER), i64(e, J_BONUS_AFTER)
        body = put_int(balance, 1, pa)
        body += put_int(balance + body, 2, ba)
        body += put_int(balance + body, 3, pa + ba - held)  # rules.available_minor
        body += put_int(balance + body, 4, i64(e, J_POINTS_AFTER))
        body += put_int(balance + body, 5, held)
        q[n] = (7 << 3) | WIRE_LEN  # always there: result_of sets its fields, zero or not
        q[n + 1] = <uint8_t>body
        memcpy(q + n + 2, balance, body)
        n += 2 + body
        n += put_int(q + n, 8, i64(e, J_AMOUNT))
        n += put_int(q + n, 9, i64(e, J_DISCOUNT))
        n += put_int(q + n, 10, -(dp + db) if op == self.op_purchase else 0)
        n += put_int(q + n, 11, i64(e, J_POINTS_DELTA) + taken)  # points_earned
        n += put_int(q + n, 12, i64(e, J_TS))
        n += put_int(q + n, 14, (<const uint32_t*>(e + J_PROGRAM_VERSION))[0])
        n += put_int(q + n, 16, taken)  # points_redeemed
        n += put_int(q + n, 17, i64(e, J_REDEEMED))
        n += put_int(q + n, 18, dp)
        n += put_int(q + n, 19, db)
        n += put_int(q + n, 20, e[J_TIER])
        n += put_int(q + n, 21, e[J_TIER_AFTER])
        if op == self.op_top_up:
            n += put_int(q + n, 22, promotion)  # a top-up's promotion
        if lines_len:
            n += put_line_results(<const uint8_t*>PyBytes_AS_STRING(lines), lines_len // LINE_SIZE,
                                  (F_RESULT_LINES << 3) | WIRE_LEN, q + n)
        if op == self.op_purchase and promotion:  # the coupon it used
            n += put_int(q + n, 24, <int64_t>(<const uint64_t*>(e + J_COUPON_SERIAL))[0])
            n += put_int(q + n, 25, promotion)
            n += put_int(q + n, 26, i64(e, J_COUPON_OFF))
        return n

    def fill(self, list results, list places, list request_ids, list outcomes, fallback,
             dict counts, list declined):
        """results[places[k]] = the serialized result of outcomes[k] (for request_ids[k]), for
        every k; counts[(type, reason)] += 1 for each; (request id, reason) of each outcome
        that is not OK appended to ``declined``."""
        cdef Py_ssize_t k, n = len(outcomes), size
        cdef uint8_t q[RESULT_MAX]
        cdef object outcome, entry, lines
        cdef int reason, op
        cdef dict local = {}
        if len(places) != n or len(request_ids) != n:
            raise ValueError("places, request ids and outcomes differ in length")
        for k in range(n):
            outcome = outcomes[k]
            reason = outcome[0]
            entry = outcome[3]
            size = 0
            op = outcome[2]
            if reason == 0 and type(entry) is bytes and len(<bytes>entry) >= ENTRY_MIN:
                op = (<bytes>entry)[J_OP]  # an applied result's type is its entry's
                lines = outcome[6]
                if type(lines) is bytes:
                    size = self.applied(q, <str>request_ids[k], outcome[1], <bytes>entry,
                                        outcome[7], <bytes>lines)
            elif reason != 0:
                declined.append((request_ids[k], reason))
            if size:
                results[places[k]] = PyBytes_FromStringAndSize(<char*>q, size)
            else:
                results[places[k]] = fallback(request_ids[k], outcome)
            pair = (op, reason)
            local[pair] = local.get(pair, 0) + 1
        for pair, count in local.items():
            counts[pair] = counts.get(pair, 0) + count


def frame(list results, uint32_t field_number):
    """The repeated message field ``field_number`` of already serialized messages: what
    SubmitBatchResponse(results=...) serializes to, without parsing them again."""
    cdef Py_ssize_t k, n = len(results), total = 0, at = 0
    cdef bytes item
    cdef uint8_t head[16]
    cdef Py_ssize_t head_len
    cdef uint64_t key = (<uint64_t>field_number << 3) | WIRE_LEN
    for k in range(n):
        if type(results[k]) is not bytes:  # a hole would frame as an empty, "OK" result
            raise TypeError("a result to frame is not bytes")
        total += 2 * 10 + PyBytes_GET_SIZE(<bytes>results[k])
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* w = <uint8_t*>PyBytes_AS_STRING(out)
    for k in range(n):
        item = <bytes>results[k]
        size = PyBytes_GET_SIZE(item)
        at += put_varint(w + at, key)
        at += put_varint(w + at, <uint64_t>size)
        memcpy(w + at, PyBytes_AS_STRING(item), size)
        at += size
    return out[:at]


# ---- the hop to the writer: a group out, its answer in ------------------------------------------

cdef enum:
    GROUP_HEAD_SIZE = 12   # groups.GROUP_HEAD: ts_us i64, n u32
    OP_HEAD_SIZE = 23      # groups.OP_HEAD: key_len u8, ksn u32, 3 lengths u32, role u8, scope u8, store u32
    ANSWER_SIZE = 240      # writer.ANSWER: reason u16, replayed u8, op u8, money i64, count u32, entry
    ENTRY_HEAD = 224       # writer.ENTRY_HEAD_SIZE
    ENTRY_CARD = 16        # layout.JOURNAL: card_id
    ENTRY_LINE_COUNT = 194 # layout.JOURNAL_PROGRAM's line count (JOURNAL_OFF_PROGRAM + 18)

cdef uint32_t NONE_LEN = 0xFFFFFFFF  # groups.NONE_LEN: an extra that is None
HOP = {"GROUP_HEAD_SIZE": GROUP_HEAD_SIZE, "OP_HEAD_SIZE": OP_HEAD_SIZE, "NONE_LEN": NONE_LEN,
       "ANSWER_SIZE": ANSWER_SIZE, "ENTRY_HEAD": ENTRY_HEAD, "ENTRY_CARD": ENTRY_CARD,
       "ENTRY_LINE_COUNT": ENTRY_LINE_COUNT}
cdef uint8_t NO_ENTRY[ENTRY_HEAD]
memset(NO_ENTRY, 0, ENTRY_HEAD)


cdef inline bytes as_bytes(object x):
    return x if type(x) is bytes else bytes(x)


cdef inline uint32_t extra_len(object x) except? 0xFFFFFFFE:
    """The header's length of an extra already made bytes (as_bytes), or NONE_LEN for None."""
    if x is None:
        return NONE_LEN
    if PyBytes_GET_SIZE(<bytes>x) >= NONE_LEN:
        raise ValueError("an operation's extra is too long")
    return <uint32_t>PyBytes_GET_SIZE(<bytes>x)


cdef inline Py_ssize_t copy_in(uint8_t* w, Py_ssize_t at, Py_ssize_t total,
                               bytes part) except -1:
    """``part`` written at ``at``, never past ``total`` (sizes counted before, from len())."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(part)
    if size > total - at:
        raise ValueError("an operation's part is longer than its len()")
    memcpy(w + at, PyBytes_AS_STRING(part), size)
    return at + size


def encode_group(list ops, int64_t ts_us):
    """groups.encode_group (the reference, and the format's description) in one C loop: the
    same bytes, tests/test_batchwire.py holds them equal."""
    cdef Py_ssize_t k, n = len(ops), total = GROUP_HEAD_SIZE, at
    cdef uint8_t* w
    cdef bytes part
    cdef uint32_t lens[3]
    cdef int j
    for op in ops:
        total += OP_HEAD_SIZE + len(op.packed) + len(op.digest) + len(op.request_key) + len(op.lines)
        for x in (op.profile, op.sealed, op.payload):
            if x is not None:
                total += len(x)
    if n > 0xFFFFFFFF:
        raise ValueError("too many operations for a group")
    out = PyBytes_FromStringAndSize(NULL, total)
    w = <uint8_t*>PyBytes_AS_STRING(out)
    (<int64_t*>w)[0] = ts_us
    (<uint32_t*>(w + 8))[0] = <uint32_t>n
    at = GROUP_HEAD_SIZE
    for op in ops:
        key = as_bytes(op.request_key)
        if len(key) > 255:
            raise ValueError("a request key is at most 255 bytes")
        extras = tuple(None if x is None else as_bytes(x)
                       for x in (op.profile, op.sealed, op.payload))
        for j in range(3):
            lens[j] = extra_len(extras[j])
        if OP_HEAD_SIZE > total - at:
            raise ValueError("an operation's part is longer than its len()")
        w[at] = <uint8_t>len(key)
        (<uint32_t*>(w + at + 1))[0] = <uint32_t>op.ksn_counter
        (<uint32_t*>(w + at + 5))[0] = lens[0]
        (<uint32_t*>(w + at + 9))[0] = lens[1]
        (<uint32_t*>(w + at + 13))[0] = lens[2]
        w[at + 17] = <uint8_t>op.need_role
        w[at + 18] = <uint8_t>op.scope
        (<uint32_t*>(w + at + 19))[0] = <uint32_t>op.scope_store_id
        at += OP_HEAD_SIZE
        for part in (as_bytes(op.packed), as_bytes(op.digest), key):
            at = copy_in(w, at, total, part)
        for j in range(3):
            if extras[j] is not None:
                at = copy_in(w, at, total, extras[j])
        at = copy_in(w, at, total, as_bytes(op.lines))
    if at != total:
        raise RuntimeError("group size changed while it was written")
    return out


def decode_answer(bytes data, outcome_cls, int r_ok):
    """writer.decode_answer (the reference) in one C loop: the same Outcomes."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data), n, end, k, pos, lines_len
    cdef const uint8_t* a
    cdef int reason
    cdef int64_t money
    cdef bint with_lines
    if size < 4:
        raise ValueError("answer message too short")
    n = (<const uint32_t*>p)[0]
    end = 4 + n * ANSWER_SIZE
    if end > size:
        raise ValueError("answer message too short")
    with_lines = end != size
    pos = end
    out = []
    new = tuple.__new__
    for k in range(n):
        a = p + 4 + k * ANSWER_SIZE
        reason = (<const uint16_t*>a)[0]
        money = (<const int64_t*>(a + 4))[0]
        entry = None
        if memcmp(a + 16, NO_ENTRY, ENTRY_HEAD) != 0:
            entry = PyBytes_FromStringAndSize(<const char*>a + 16, ENTRY_HEAD)
        lines = b""
        if with_lines and reason == r_ok and entry is not None:
            lines_len = (<const uint16_t*>(a + 16 + ENTRY_LINE_COUNT))[0] * 64
            if lines_len:
                if pos + lines_len > size:
                    raise ValueError("answer message too short for its lines")
                lines = PyBytes_FromStringAndSize(<const char*>p + pos, lines_len)
                pos += lines_len
        out.append(new(outcome_cls, (reason, a[2] != 0, a[3], entry,
                                     0 if reason == r_ok else money,
                                     (<const uint32_t*>(a + 12))[0], lines,
                                     money if reason == r_ok else 0)))
    if pos != size:
        raise ValueError("answer message has trailing bytes")
    return out


def mark_dirty(dict cards, dict keys, list items, list outcomes, object group,
               int r_storage_unavailable):
    """Writer._mark_dirty's loop (the cards and request keys of a group answered before a
    checkpoint holds it) in C: ``group`` for each operation's card and key, unless refused for
    the storage, and for the card of every entry."""
    cdef Py_ssize_t k = 0
    for item in items:
        for op in item.ops:
            if outcomes[k][0] != r_storage_unavailable:
                cards[op.card_id] = group
                key = op.request_key
                if key:
                    keys[key] = group
            k += 1
    for outcome in outcomes:
        entry = outcome[3]
        if entry is not None:
            cards[bytes(entry[ENTRY_CARD:ENTRY_CARD + 16])] = group
