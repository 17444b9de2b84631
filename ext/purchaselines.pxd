"""A purchase's lines between protobuf's wire format and line records (layout.LINE), once, for
the two C parsers that read them: ``wire.pyx`` (``lines_of``: Purchase, Quote, Capture,
SubmitBatch's Python path) and ``batchwire.pyx`` (SubmitBatch's baskets built in C); and the
LineResult elements of a reply, for ``wire.line_results`` and ``batchwire.Results``. Every read
is bounded by ``end``; the checks are the service's where lines enter."""
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from protowire cimport WIRE_LEN, WIRE_VARINT, put_int, put_varint, skip, varint

cdef enum:
    LINE_SIZE = 64         # layout.LINE
    LINES_MAX = 100        # layout.LINES_MAX
    MAX_CATEGORIES = 64    # layout.MAX_CATEGORIES
    SKU_LEN_MAX = 24       # layout.SKU_LEN_MAX
    # one LineResult element at most: key and length (2 + 2); in the element, a category of up
    # to 4 bytes, 5 int64 fields of up to 11, a quantity of up to 6, the SKU's 2 + 24, a
    # refund's line number (field 40: a 2-byte key) of up to 5: 96, so 100
    LINE_RESULT_MAX = 100

# The problems ``read_lines`` reports, each with the index of the first line that has it.
cdef enum:
    P_OK = 0
    P_BAD_WIRE = 1
    P_TOO_MANY = 2
    P_BAD_AMOUNT = 3
    P_BAD_CATEGORY = 4
    P_SKU_TOO_LONG = 5
    P_SKU_NOT_PRINTABLE = 6
    P_TOTAL_TOO_BIG = 7


cdef inline int one_line(const uint8_t* p, Py_ssize_t start, Py_ssize_t end, uint8_t* rec,
                         int64_t* amount) noexcept nogil:
    """One PurchaseLine element into a line record; its problem (P_OK when none)."""
    cdef Py_ssize_t at = start, sku_at = 0, sku_len = 0, k
    cdef uint64_t key, v
    cdef uint32_t field, wire, category = 0, quantity = 0, chars = 0
    cdef int64_t gross = 0
    while at < end:
        if not varint(p, end, &at, &key):
            return P_BAD_WIRE
        field, wire = <uint32_t>(key >> 3), <uint32_t>(key & 7)
        if wire == WIRE_VARINT and 1 <= field <= 3:
            if not varint(p, end, &at, &v):
                return P_BAD_WIRE
            if field == 1:
                category = <uint32_t>v  # uint32: protobuf keeps the low 32 bits
            elif field == 2:
                gross = <int64_t>v
            else:
                quantity = <uint32_t>v
        elif wire == WIRE_LEN and field == 4:
            if not varint(p, end, &at, &v) or v > <uint64_t>(end - at):
                return P_BAD_WIRE
            sku_at, sku_len = at, <Py_ssize_t>v
            at += sku_len
        elif not skip(p, end, &at, wire):
            return P_BAD_WIRE
    if at != end:
        return P_BAD_WIRE
    amount[0] = gross
    if gross <= 0:
        return P_BAD_AMOUNT
    if category >= MAX_CATEGORIES:
        return P_BAD_CATEGORY
    for k in range(sku_len):  # characters, not bytes: UTF-8 continuation bytes do not count
        chars += (p[sku_at + k] & 0xC0) != 0x80
    if chars > SKU_LEN_MAX:
        return P_SKU_TOO_LONG
    for k in range(sku_len):
        if p[sku_at + k] < 0x20 or p[sku_at + k] > 0x7E:
            return P_SKU_NOT_PRINTABLE
    memset(rec, 0, LINE_SIZE)
    (<uint16_t*>rec)[0] = <uint16_t>category
    (<uint32_t*>(rec + 4))[0] = quantity
    (<int64_t*>(rec + 8))[0] = gross
    if sku_len:
        memcpy(rec + 40, p + sku_at, sku_len)
    return P_OK


cdef inline int read_lines(const uint8_t* p, Py_ssize_t end, uint32_t field_number, uint8_t* out,
                           Py_ssize_t* count, int64_t* total, Py_ssize_t* bad_at) noexcept nogil:
    """The repeated PurchaseLine field ``field_number`` of the message at [0, end) into ``out``
    (room for LINES_MAX records): their count and gross total; the problem (P_OK when none)
    and, for a line's own problem, that line's index. Too many lines is reported before any
    line's problem, and the total's overflow after them, as the service checks them."""
    cdef Py_ssize_t at = 0, length, n = 0, first_bad = 0
    cdef uint64_t key, v
    cdef uint32_t wire
    cdef int problem = P_OK, got, overflow = 0
    cdef int64_t amount, sum_minor = 0
    count[0], total[0], bad_at[0] = 0, 0, 0
    while at < end:
        if not varint(p, end, &at, &key):
            return P_BAD_WIRE
        wire = <uint32_t>(key & 7)
        if <uint32_t>(key >> 3) != field_number or wire != WIRE_LEN:
            if not skip(p, end, &at, wire):
                return P_BAD_WIRE
            continue
        if not varint(p, end, &at, &v) or v > <uint64_t>(end - at):
            return P_BAD_WIRE
        length = <Py_ssize_t>v
        if n < LINES_MAX:
            amount = 0
            got = one_line(p, at, at + length, out + n * LINE_SIZE, &amount)
            if got == P_BAD_WIRE:
                return P_BAD_WIRE
            if got != P_OK and problem == P_OK:
                problem, first_bad = got, n
            if got == P_OK:
                if amount > INT64_MAX - sum_minor:
                    overflow = 1
                else:
                    sum_minor += amount
        at += length
        n += 1
    if n > LINES_MAX:
        return P_TOO_MANY
    if problem != P_OK:
        bad_at[0] = first_bad
        return problem
    if overflow:
        return P_TOTAL_TOO_BIG
    count[0], total[0] = n, sum_minor
    return P_OK


cdef inline Py_ssize_t put_line_results(const uint8_t* lines, Py_ssize_t n, uint64_t key,
                                        uint8_t* out) noexcept nogil:
    """The LineResult elements (field key ``key``, of at most two bytes) of ``n`` line records
    as the kernel filled them (layout.LINE) at ``out`` (room for n * LINE_RESULT_MAX); their
    length."""
    cdef Py_ssize_t k, size, at = 0, sku_len
    cdef uint8_t body[96]
    cdef uint16_t number
    cdef const uint8_t* rec
    cdef int64_t amount, discount, redeemed
    for k in range(n):
        rec = lines + k * LINE_SIZE
        amount = (<const int64_t*>(rec + 8))[0]
        discount = (<const int64_t*>(rec + 16))[0]
        redeemed = (<const int64_t*>(rec + 32))[0]
        size = put_int(body, 1, (<const uint16_t*>rec)[0])
        size += put_int(body + size, 2, amount)
        size += put_int(body + size, 3, discount)
        size += put_int(body + size, 4, redeemed)
        size += put_int(body + size, 5, amount - discount - redeemed)
        size += put_int(body + size, 6, (<const int64_t*>(rec + 24))[0])
        size += put_int(body + size, 7, (<const uint32_t*>(rec + 4))[0])
        sku_len = 0
        while sku_len < SKU_LEN_MAX and rec[40 + sku_len] != 0:
            sku_len += 1
        if sku_len:
            body[size] = (8 << 3) | WIRE_LEN
            body[size + 1] = <uint8_t>sku_len
            memcpy(body + size + 2, rec + 40, sku_len)
            size += 2 + sku_len
        number = (<const uint16_t*>(rec + 2))[0]  # layout.LINE line_tag: a refund's line
        if number:
            size += put_varint(body + size, 40 << 3)
            size += put_varint(body + size, number)
        at += put_varint(out + at, key)
        at += put_varint(out + at, <uint64_t>size)
        memcpy(out + at, body, size)
        at += size
    return at
