# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Purchase lines between protobuf's wire format and fixed-size line records (layout.LINE).

A basket of five lines cost the gRPC process about 5 µs to read field by field from the parsed
request and 5 µs to write back as LineResult messages: half of what lines add to a purchase.
Here both run over bytes in one C loop: ``lines_of`` reads the PurchaseLine elements of a
serialized request (the message re-serialized by protobuf, so well formed) into line records
with the checks the service makes where lines enter, and ``line_results`` writes the
LineResult elements of a reply for protobuf to merge. The wire format is protobuf's documented
encoding (varints, length-delimited fields); the tests hold both to protobuf's own parser.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from protowire cimport (WIRE_I32, WIRE_I64, WIRE_LEN, WIRE_VARINT, length_at, put_int,
                       put_varint, skip, varint)
from libc.string cimport memcpy, memset

cdef enum:
    LINE_SIZE = 64
    LINES_MAX = 100
    MAX_CATEGORIES = 64
    SKU_LEN_MAX = 24

# The problems ``lines_of`` reports, each with the index of the first line that has it.
cdef enum:
    P_OK = 0
    P_BAD_WIRE = 1
    P_TOO_MANY = 2
    P_BAD_AMOUNT = 3
    P_BAD_CATEGORY = 4
    P_SKU_TOO_LONG = 5
    P_SKU_NOT_PRINTABLE = 6
    P_TOTAL_TOO_BIG = 7
OK, BAD_WIRE, TOO_MANY, BAD_AMOUNT, BAD_CATEGORY = P_OK, P_BAD_WIRE, P_TOO_MANY, P_BAD_AMOUNT, P_BAD_CATEGORY
SKU_TOO_LONG, SKU_NOT_PRINTABLE, TOTAL_TOO_BIG = P_SKU_TOO_LONG, P_SKU_NOT_PRINTABLE, P_TOTAL_TOO_BIG
SIZES = {"LINE_SIZE": LINE_SIZE, "LINES_MAX": LINES_MAX, "MAX_CATEGORIES": MAX_CATEGORIES,
         "SKU_LEN_MAX": SKU_LEN_MAX}  # held equal to cardcore.layout's by the tests
cdef int64_t INT64_MAX = 0x7FFFFFFFFFFFFFFF




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


def lines_of(const uint8_t[::1] message, uint32_t field_number):
    """The repeated PurchaseLine field ``field_number`` of a serialized message: (line records,
    their gross total, problem, index of the line with it). Too many lines is reported before
    any line's problem, and the total's overflow after them, as the service checks them."""
    cdef Py_ssize_t end = message.shape[0], at = 0, length, count = 0, bad_at = 0
    cdef const uint8_t* p = &message[0] if end else NULL
    cdef uint64_t key, v
    cdef uint32_t wire
    cdef int problem = P_OK, got, overflow = 0
    cdef int64_t amount, total = 0
    cdef uint8_t out[LINES_MAX * LINE_SIZE]
    with nogil:
        while at < end:
            if not varint(p, end, &at, &key):
                problem = P_BAD_WIRE
                break
            wire = <uint32_t>(key & 7)
            if <uint32_t>(key >> 3) != field_number or wire != WIRE_LEN:
                if not skip(p, end, &at, wire):
                    problem = P_BAD_WIRE
                    break
                continue
            if not varint(p, end, &at, &v) or v > <uint64_t>(end - at):
                problem = P_BAD_WIRE
                break
            length = <Py_ssize_t>v
            if count < LINES_MAX:
                amount = 0
                got = one_line(p, at, at + length, out + count * LINE_SIZE, &amount)
                if got == P_BAD_WIRE:
                    problem = P_BAD_WIRE
                    break
                if got != P_OK and problem == P_OK:
                    problem, bad_at = got, count
                if got == P_OK:
                    if amount > INT64_MAX - total:
                        overflow = 1
                    else:
                        total += amount
            at += length
            count += 1
    if problem == P_BAD_WIRE:
        return b"", 0, P_BAD_WIRE, 0
    if count > LINES_MAX:
        return b"", 0, P_TOO_MANY, 0
    if problem != P_OK:
        return b"", 0, problem, bad_at
    if overflow:
        return b"", 0, P_TOTAL_TOO_BIG, 0
    return bytes(out[:count * LINE_SIZE]), total, P_OK, 0




def line_results(const uint8_t[::1] lines, uint32_t field_number):
    """The repeated LineResult field ``field_number`` for line records as the kernel filled them
    (layout.LINE), serialized for the reply message's MergeFromString."""
    cdef Py_ssize_t n = lines.shape[0] // LINE_SIZE, k, size, at = 0, sku_len
    if lines.shape[0] != n * LINE_SIZE or n > LINES_MAX:
        raise ValueError("line records buffer has the wrong size")
    if n == 0:
        return b""
    # per line: key and length (up to 2 + 2); in the element, a category of up to 4 bytes,
    # 5 int64 fields of up to 11, a quantity of up to 6, the SKU's 2 + 24, a refund's line
    # number (field 40: a 2-byte key) of up to 5: at most 96
    cdef uint8_t out[LINES_MAX * 100]
    cdef uint8_t body[96]
    cdef uint16_t number
    cdef const uint8_t* rec
    cdef int64_t amount, discount, redeemed
    cdef uint64_t key = (<uint64_t>field_number << 3) | WIRE_LEN
    if field_number < 1 or field_number > 2047:
        raise ValueError("field numbers past 2047 take a key of more than two bytes")
    with nogil:
        for k in range(n):
            rec = &lines[k * LINE_SIZE]
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
    return bytes(out[:at])
