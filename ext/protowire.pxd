"""Protobuf's wire format, the part the C parsers share (``wire.pyx``: purchase lines;
``batchwire.pyx``: SubmitBatch): varints, lengths, stepping over a field. Every read is bounded
by ``end``; a value that runs past it, or a varint past 10 bytes, is malformed (0)."""
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

cdef enum:
    WIRE_VARINT = 0
    WIRE_I64 = 1
    WIRE_LEN = 2
    WIRE_I32 = 5


cdef inline int varint(const uint8_t* p, Py_ssize_t end, Py_ssize_t* at, uint64_t* out) noexcept nogil:
    """One varint at ``at``; 0 when the bytes end first or it runs past 10 bytes."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while at[0] < end and shift < 70:
        b = p[at[0]]
        at[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift if shift < 64 else 0
        if not b & 0x80:
            out[0] = v
            return 1
        shift += 7
    return 0


cdef inline int length_at(const uint8_t* p, Py_ssize_t end, Py_ssize_t* at, Py_ssize_t* stop) noexcept nogil:
    """A length-delimited value's end into ``stop``; 0 when it runs past ``end``."""
    cdef uint64_t v
    if not varint(p, end, at, &v) or v > <uint64_t>(end - at[0]):
        return 0
    stop[0] = at[0] + <Py_ssize_t>v
    return 1


cdef inline int skip(const uint8_t* p, Py_ssize_t end, Py_ssize_t* at, uint32_t wire) noexcept nogil:
    """Step over one field's value of wire type ``wire``; 0 on a malformed one, or a group."""
    cdef uint64_t v
    cdef Py_ssize_t stop
    if wire == WIRE_VARINT:
        return varint(p, end, at, &v)
    if wire == WIRE_I64:
        at[0] += 8
    elif wire == WIRE_I32:
        at[0] += 4
    elif wire == WIRE_LEN:
        if not length_at(p, end, at, &stop):
            return 0
        at[0] = stop
    else:
        return 0
    return at[0] <= end


cdef inline Py_ssize_t put_varint(uint8_t* q, uint64_t v) noexcept nogil:
    """``v`` as a varint at ``q`` (room for 10 bytes); its length."""
    cdef Py_ssize_t n = 0
    while v >= 0x80:
        q[n] = <uint8_t>(v & 0x7F) | 0x80
        v >>= 7
        n += 1
    q[n] = <uint8_t>v
    return n + 1


cdef inline Py_ssize_t put_int(uint8_t* q, uint32_t field, int64_t value) noexcept nogil:
    """A varint field (int64, uint32, enum, bool alike: negatives take ten bytes); none when 0,
    as proto3 writes it."""
    if value == 0:
        return 0
    cdef Py_ssize_t n = put_varint(q, (<uint64_t>field << 3) | WIRE_VARINT)
    return n + put_varint(q + n, <uint64_t>value)
