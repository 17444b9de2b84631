"""Fixed-size integers as the C loops of ``daytotals.pyx``, ``members.pyx`` and ``writerglue.pyx`` need them
(one copy): little-endian fields read and written at any byte offset of a record (journal
entries, member records; memcpy, so an unaligned field is fine), and int64 addition held at
int64's limits (core/daytotals.py ``saturated``: the same rule), of two int64 or of one and
the exact sum of several (``cc_wide``)."""
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
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


cdef inline uint64_t u64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


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


cdef extern from *:
    """
    #ifndef __SIZEOF_INT128__
    #error "cardcore's C loops need a 128-bit integer (gcc or clang on a 64-bit target)"
    #endif
    typedef __int128 cc_wide;
    static inline int64_t cc_sat_wide(int64_t a, cc_wide v) {
        cc_wide r = (cc_wide)a + v;
        return r > INT64_MAX ? INT64_MAX : r < INT64_MIN ? (int64_t)INT64_MIN : (int64_t)r;
    }
    """
    # 128 bits in C: the exact sum of a few int64 (Cython only needs to pass it through)
    ctypedef long long cc_wide
    # a + v held at int64's limits once: a figure made of several amounts (v, summed exactly in
    # cc_wide) capped as core/daytotals.py caps the Python sum, never a part of it first
    int64_t cc_sat_wide(int64_t a, cc_wide v) nogil
