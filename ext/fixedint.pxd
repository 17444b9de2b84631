"""Fixed-size integers as the C loops of ``daytotals.pyx`` and ``members.pyx`` both need them
(one copy): little-endian fields read and written at any byte offset of a record (journal
entries, member records; memcpy, so an unaligned field is fine), and int64 addition held at
int64's limits (core/daytotals.py ``saturated``: the same rule)."""
from libc.stdint cimport int64_t, uint16_t, uint32_t
from libc.string cimport memcpy


cdef inline uint16_t u16(const unsigned char* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline uint32_t u32(const unsigned char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline void put32(unsigned char* p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline int64_t i64(const unsigned char* p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline void put64(unsigned char* p, int64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cdef extern from *:
    """
    static inline int64_t cc_sat_add(int64_t a, int64_t b) {
        int64_t r;
        if (__builtin_add_overflow(a, b, &r)) return b > 0 ? INT64_MAX : INT64_MIN;
        return r;
    }
    """
    int64_t cc_sat_add(int64_t a, int64_t b) nogil
