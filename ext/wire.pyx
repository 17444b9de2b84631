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
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from purchaselines cimport (LINE_RESULT_MAX, LINE_SIZE, LINES_MAX, MAX_CATEGORIES, P_BAD_AMOUNT,
                            P_BAD_CATEGORY, P_BAD_WIRE, P_OK, P_SKU_NOT_PRINTABLE,
                            P_SKU_TOO_LONG, P_TOO_MANY, P_TOTAL_TOO_BIG, SKU_LEN_MAX,
                            put_line_results, read_lines)

# The problems ``lines_of`` reports (purchaselines.pxd), each with the index of the first line
# that has it.
OK, BAD_WIRE, TOO_MANY, BAD_AMOUNT, BAD_CATEGORY = P_OK, P_BAD_WIRE, P_TOO_MANY, P_BAD_AMOUNT, P_BAD_CATEGORY
SKU_TOO_LONG, SKU_NOT_PRINTABLE, TOTAL_TOO_BIG = P_SKU_TOO_LONG, P_SKU_NOT_PRINTABLE, P_TOTAL_TOO_BIG
SIZES = {"LINE_SIZE": LINE_SIZE, "LINES_MAX": LINES_MAX, "MAX_CATEGORIES": MAX_CATEGORIES,
         "SKU_LEN_MAX": SKU_LEN_MAX}  # held equal to cardcore.layout's by the tests


def lines_of(const uint8_t[::1] message, uint32_t field_number):
    """The repeated PurchaseLine field ``field_number`` of a serialized message: (line records,
    their gross total, problem, index of the line with it). Too many lines is reported before
    any line's problem, and the total's overflow after them, as the service checks them."""
    cdef Py_ssize_t end = message.shape[0], count, bad_at
    cdef const uint8_t* p = &message[0] if end else NULL
    cdef int problem
    cdef int64_t total
    cdef uint8_t out[LINES_MAX * LINE_SIZE]
    with nogil:
        problem = read_lines(p, end, field_number, out, &count, &total, &bad_at)
    if problem != P_OK:
        return b"", 0, problem, bad_at
    return bytes(out[:count * LINE_SIZE]), total, P_OK, 0


def line_results(const uint8_t[::1] lines, uint32_t field_number):
    """The repeated LineResult field ``field_number`` for line records as the kernel filled them
    (layout.LINE), serialized for the reply message's MergeFromString."""
    cdef Py_ssize_t n = lines.shape[0] // LINE_SIZE, at
    if lines.shape[0] != n * LINE_SIZE or n > LINES_MAX:
        raise ValueError("line records buffer has the wrong size")
    if n == 0:
        return b""
    cdef uint8_t out[LINES_MAX * LINE_RESULT_MAX]
    if field_number < 1 or field_number > 2047:
        raise ValueError("field numbers past 2047 take a key of more than two bytes")
    with nogil:
        at = put_line_results(&lines[0], n, (<uint64_t>field_number << 3) | 2, out)
    return bytes(out[:at])
