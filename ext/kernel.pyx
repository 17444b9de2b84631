# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ledger's arithmetic over fixed-size records: the hot loop of every group commit.

Works on bytes and C structs only: the records buffer, the operations buffer,
the slot array and the journal output are typed memoryviews; the loop touches
no Python object. The rules are in cardcore.rules; cardcore.reference is the
readable twin and the differential tests hold the two to the same output.
Bounds are checked once, before the loop (boundscheck is off inside it).
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset

from records cimport cc_card_t, cc_i128, cc_journal_t, cc_op_t, cc_program_t

cdef extern from "<stdint.h>":
    const int64_t INT64_MAX

cdef enum:
    CARD_SIZE = 128
    JOURNAL_SIZE = 256
    OP_SIZE = 192
    PROGRAM_SIZE = 96
    PIN_CHECK_SIZE = 32

# Values of cardcore.v1.OperationType / CardStatus / Reason and the flag bits of
# cardcore.layout (tests check they agree).
cdef enum:
    OP_OPEN = 1
    OP_TOP_UP = 2
    OP_PURCHASE = 3
    OP_SET_PIN = 4
    OP_RESET_PIN = 5
    OP_PIN_FAILED = 6
    OP_BALANCE_INQUIRY = 7
    STATUS_ACTIVE = 1
    R_OK = 0
    R_INVALID_ARGUMENT = 1
    R_INVALID_AMOUNT = 2
    R_INVALID_TIER = 5
    R_CARD_NOT_FOUND = 8
    R_CARD_ALREADY_EXISTS = 9
    R_CARD_NOT_ACTIVE = 10
    R_INSUFFICIENT_FUNDS = 11
    R_AMOUNT_OVERFLOW = 12
    R_PIN_REQUIRED = 20
    R_PIN_WRONG = 21
    R_PIN_LOCKED = 22
    R_PIN_NOT_SET = 23
    R_OPERATOR_REQUIRED = 40
    CARD_PIN_SET = 1
    CARD_PIN_LOCKED = 2
    PIN_PRESENTED = 1
    PIN_REQUIRED = 2
    PIN_OPTIONAL_UNSET = 4
    NEW_PIN = 8
    PIN_RIGHT = 1
    PIN_FAILED = 2


cdef inline int record_ok(const cc_card_t* rec) noexcept nogil:
    """Invariants of a stored card record, checked after read and before write."""
    if rec.version == 0:
        return 1
    if rec.version != 1:
        return 0
    if (rec.principal_minor < 0 or rec.bonus_minor < 0 or rec.points < 0
            or rec.held_minor < 0 or rec.lifetime_paid_minor < 0):
        return 0
    if rec.flags & ~<uint32_t>(CARD_PIN_SET | CARD_PIN_LOCKED):
        return 0
    if rec.flags & CARD_PIN_LOCKED and not rec.flags & CARD_PIN_SET:
        return 0
    return rec.principal_minor <= INT64_MAX - rec.bonus_minor


cdef inline int same_check(const uint8_t* a, const uint8_t* b) noexcept nogil:
    """Constant-time equality of two PIN verification values."""
    cdef uint8_t diff = 0
    cdef int i
    for i in range(PIN_CHECK_SIZE):
        diff |= a[i] ^ b[i]
    return diff == 0


cdef inline uint8_t pin_gate(const cc_program_t* prog, const cc_op_t* op, uint8_t pin_flags,
                             cc_card_t* rec, int* checked) noexcept nogil:
    """The PIN rule of cardcore.layout. *checked becomes PIN_RIGHT or PIN_FAILED (a wrong PIN
    counted) when the PIN was compared; a right PIN resets the count only if the operation
    then applies (the caller does that)."""
    cdef int presented = pin_flags & PIN_PRESENTED
    if not presented and not pin_flags & PIN_REQUIRED:
        return R_OK
    if not rec.flags & CARD_PIN_SET:
        if presented or not pin_flags & PIN_OPTIONAL_UNSET:
            return R_PIN_NOT_SET
        return R_OK
    if rec.flags & CARD_PIN_LOCKED:
        return R_PIN_LOCKED
    if not presented:
        return R_PIN_REQUIRED
    if not same_check(op.pin_check, rec.pin_check):
        rec.pin_tries += 1
        if rec.pin_tries >= prog.pin_tries_max:
            rec.flags |= CARD_PIN_LOCKED
        checked[0] = PIN_FAILED
        return R_PIN_WRONG
    checked[0] = PIN_RIGHT
    return R_OK


cdef inline void set_pin(const cc_op_t* op, cc_card_t* rec) noexcept nogil:
    """The new PIN from the operation, or none when it carries none; unlocks."""
    if op.pin_flags & NEW_PIN:
        memcpy(rec.pin_check, op.new_pin_check, PIN_CHECK_SIZE)
        rec.flags = CARD_PIN_SET
    else:
        memset(rec.pin_check, 0, PIN_CHECK_SIZE)
        rec.flags = 0
    rec.pin_tries = 0


cdef inline uint8_t apply_one(const cc_program_t* prog, const cc_op_t* op, cc_card_t* rec,
                              cc_journal_t* out, int64_t ts_us, uint64_t seq) noexcept nogil:
    """Apply one operation to its record; fill its journal entry; return the reason.

    The entry's seq is non-zero when the record changed: the operation was
    applied, or a wrong PIN was counted (a PIN-failed entry, reason PIN_WRONG).
    """
    cdef uint8_t reason = R_OK
    cdef uint8_t entry_op = op.op
    cdef int checked = 0
    cdef int64_t amount = op.amount_minor
    cdef int64_t d_principal = 0, d_bonus = 0, d_points = 0, discount = 0, paid = 0
    cdef cc_i128 wide
    cdef int64_t earned, available
    if op.op == OP_OPEN:
        if rec.version != 0:
            reason = R_CARD_ALREADY_EXISTS
        elif op.tier >= prog.tier_count:
            reason = R_INVALID_TIER
        else:
            memset(rec, 0, CARD_SIZE)
            rec.version = 1
            rec.status = STATUS_ACTIVE
            rec.tier = op.tier
            rec.opened_us = ts_us
            rec.home_store_id = op.home_store_id
            if op.pin_flags & NEW_PIN:
                set_pin(op, rec)
    elif rec.version == 0:
        reason = R_CARD_NOT_FOUND
    elif op.op == OP_RESET_PIN:
        set_pin(op, rec)
    elif rec.status != STATUS_ACTIVE:
        reason = R_CARD_NOT_ACTIVE
    elif op.op == OP_SET_PIN:
        if not op.pin_flags & NEW_PIN:
            reason = R_INVALID_ARGUMENT
        elif rec.flags & CARD_PIN_SET or op.pin_flags & PIN_PRESENTED:
            # changing a PIN always needs the old one
            reason = pin_gate(prog, op, op.pin_flags | PIN_REQUIRED, rec, &checked)
        elif op.operator_id == 0:
            reason = R_OPERATOR_REQUIRED  # a first PIN is set with an operator at the till
        if reason == R_OK:
            set_pin(op, rec)
    elif op.op == OP_BALANCE_INQUIRY:
        # the PIN like a purchase; a right one changes nothing (no entry, tries untouched)
        reason = pin_gate(prog, op, op.pin_flags | PIN_REQUIRED, rec, &checked)
        checked = PIN_FAILED if checked == PIN_FAILED else 0
    else:  # top-up or purchase (the caller checked the type)
        reason = pin_gate(prog, op, op.pin_flags, rec, &checked)
        if reason != R_OK:
            pass
        elif amount <= 0:
            reason = R_INVALID_AMOUNT
        elif op.op == OP_TOP_UP:
            if rec.principal_minor + rec.bonus_minor > INT64_MAX - amount:
                reason = R_AMOUNT_OVERFLOW
            else:
                d_principal = amount
        elif rec.tier >= prog.tier_count:
            reason = R_INVALID_TIER
        else:
            wide = <cc_i128>amount * prog.rate_bp[rec.tier] + 5000
            paid = <int64_t>(wide // 10000)  # <= amount: fits
            available = rec.principal_minor + rec.bonus_minor - rec.held_minor
            wide = <cc_i128>(paid // prog.points_unit_minor) * prog.points_per_unit
            if paid > available:
                reason = R_INSUFFICIENT_FUNDS
            elif wide > <cc_i128>(INT64_MAX - rec.points) or paid > INT64_MAX - rec.lifetime_paid_minor:
                reason = R_AMOUNT_OVERFLOW
            else:
                earned = <int64_t>wide
                discount = amount - paid
                d_principal = -(paid if paid < rec.principal_minor else rec.principal_minor)
                d_bonus = -(paid + d_principal)
                d_points = earned
                rec.lifetime_paid_minor += paid
    cdef int pin_failed = checked == PIN_FAILED
    if pin_failed:
        entry_op = OP_PIN_FAILED
        amount = 0
    if reason == R_OK:
        if checked == PIN_RIGHT:
            rec.pin_tries = 0
        rec.principal_minor += d_principal
        rec.bonus_minor += d_bonus
        rec.points += d_points
    cdef int changed = pin_failed or (reason == R_OK and op.op != OP_BALANCE_INQUIRY)
    if changed:
        rec.last_seq = seq
    memset(out, 0, JOURNAL_SIZE)
    out.version = 2
    out.op = entry_op
    out.tier = rec.tier
    out.status = rec.status
    out.reason = reason
    out.pin_tries = rec.pin_tries
    out.pin_flags = <uint8_t>rec.flags
    out.seq = seq if changed else 0
    memcpy(out.card_id, op.card_id, 16)
    out.amount_minor = amount
    out.discount_minor = discount
    out.principal_delta_minor = d_principal
    out.bonus_delta_minor = d_bonus
    out.points_delta = d_points
    out.principal_after_minor = rec.principal_minor
    out.bonus_after_minor = rec.bonus_minor
    out.points_after = rec.points
    out.ts_us = ts_us
    out.store_id = op.store_id
    out.terminal_id = op.terminal_id
    out.staff_id = op.staff_id
    out.operator_id = op.operator_id
    memcpy(out.request_tag, op.request_tag, 8)
    out.program_version = prog.program_version
    out.caller_kind = op.caller_kind
    out.caller_id = op.caller_id
    out.link_seq = op.link_seq
    out.ref_id = op.ref_id
    out.basket_tag = op.basket_tag
    out.client_time_us = op.client_time_us
    return reason


def apply_batch(const uint8_t[::1] program, const uint8_t[::1] ops, const uint32_t[::1] slots,
                uint8_t[::1] records, uint8_t[::1] journal_out, uint8_t[::1] slot_dirty,
                int64_t ts_us, uint64_t first_seq):
    """Apply len(ops) // 192 operations in order; return the next free sequence number.

    Same contract as cardcore.reference.apply_batch. Raises ValueError, and
    leaves the caller to abort its transaction, if any input breaks the
    layout or a record breaks an invariant: the writer never writes a
    half-truth.
    """
    cdef Py_ssize_t n = ops.shape[0] // OP_SIZE
    cdef Py_ssize_t nslots = records.shape[0] // CARD_SIZE
    cdef Py_ssize_t i
    cdef uint32_t slot
    cdef uint64_t seq = first_seq
    cdef int bad = 0
    if program.shape[0] != PROGRAM_SIZE or ops.shape[0] != n * OP_SIZE:
        raise ValueError("program or operations buffer has the wrong size")
    if slots.shape[0] != n or journal_out.shape[0] != n * JOURNAL_SIZE:
        raise ValueError("slots or journal buffer does not match the operations")
    if records.shape[0] != nslots * CARD_SIZE or slot_dirty.shape[0] != nslots:
        raise ValueError("records or dirty buffer has the wrong size")
    cdef const cc_program_t* prog = <const cc_program_t*>&program[0]
    if (prog.tier_count < 1 or prog.tier_count > 16 or prog.points_unit_minor <= 0
            or prog.points_per_unit < 0 or prog.pin_tries_max < 1 or prog.pin_tries_max > 15
            or prog.program_version < 1):
        raise ValueError("program out of range")
    for i in range(prog.tier_count):
        if prog.rate_bp[i] < 1 or prog.rate_bp[i] > 10000:
            raise ValueError("program rate out of range")
    if n == 0:
        return seq
    cdef const cc_op_t* op_base = <const cc_op_t*>&ops[0]
    cdef cc_card_t* rec_base = <cc_card_t*>&records[0] if nslots else NULL
    cdef cc_journal_t* out_base = <cc_journal_t*>&journal_out[0]
    cdef const cc_op_t* op
    cdef cc_card_t* rec
    with nogil:
        for i in range(n):
            op = op_base + i
            slot = slots[i]
            if (slot >= nslots or op.op < OP_OPEN or op.op > OP_BALANCE_INQUIRY
                    or op.op == OP_PIN_FAILED):
                bad = 1
                break
            rec = rec_base + slot
            if not record_ok(rec):
                bad = 2
                break
            apply_one(prog, op, rec, out_base + i, ts_us, seq)
            if out_base[i].seq != 0:
                seq += 1
                slot_dirty[slot] = 1
                if not record_ok(rec):
                    bad = 3
                    break
    if bad == 1:
        raise ValueError("operation with an unknown type or a slot out of range")
    if bad:
        raise ValueError("card record breaks an invariant")
    return seq
