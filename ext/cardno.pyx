# cython: language_level=3, boundscheck=False, wraparound=False
"""Card-number syntax check (length, ASCII digits, Luhn) for the request path.

The readable reference is cardcore.cards.number_ok; a hypothesis test holds
the two to the same answer. Runs on every swipe, before the keyed hash.
"""

cdef enum:
    LEN_MIN = 8
    LEN_MAX = 19


def number_ok(str number, bint require_luhn) -> bool:
    """8..19 ASCII digits, and a valid Luhn check digit when require_luhn."""
    cdef Py_ssize_t n = len(number)
    cdef Py_ssize_t i
    cdef Py_UCS4 ch
    cdef int d, total = 0
    if n < LEN_MIN or n > LEN_MAX:
        return False
    for i in range(n):
        ch = number[n - 1 - i]
        if ch < u'0' or ch > u'9':
            return False
        d = <int>ch - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0 or not require_luhn
