"""The pure-Python reference of the kernel: the readable specification.

``apply_batch`` has exactly the signature and effect of
``cardcore.ext.kernel.apply_batch``; the rules it applies are documented in
``rules``. It is slow on purpose-free grounds (struct per field) and is used
by the differential tests and the benchmark, never by the server.
"""
from __future__ import annotations

import hmac

from cardcore import layout as L
from cardcore.rules import paid_minor, points_earned


def apply_batch(program: bytes, ops: bytes, slots, records: bytearray,
                journal_out: bytearray, slot_dirty: bytearray, ts_us: int, first_seq: int) -> int:
    """Apply ``len(ops) // 192`` operations in order; return the next free sequence number.

    ``slots[i]`` is the index of operation i's card record in ``records``
    (128 bytes each; version 0 = no such card yet). An operation that changes
    its record (applied, or a wrong PIN counted) updates it in place, sets
    ``slot_dirty[slot] = 1`` and gets a journal entry with the next sequence;
    others (and a balance inquiry with the right PIN) get an entry with
    ``reason`` set and ``seq = 0``. ``journal_out`` receives one 256-byte v2
    entry per operation, its digest field zero (the ledger chains it).
    """
    n = len(ops) // L.OP_SIZE
    assert len(ops) == n * L.OP_SIZE and len(journal_out) == n * L.JOURNAL_SIZE
    assert len(records) % L.CARD_SIZE == 0 and len(slot_dirty) == len(records) // L.CARD_SIZE
    tier_count, tries_max, unit, per_unit, *rest = L.PROGRAM.unpack(program)
    rates = rest[:L.MAX_TIERS]
    program_version = rest[L.MAX_TIERS]
    seq = first_seq
    for i in range(n):
        (op, tier, pin_flags, caller_kind, home_store, amount, store, terminal, staff, operator, tag,
         card_id, client_time, pin_check, new_pin_check, caller_id, _, link_seq, ref_id, basket,
         _) = L.OP.unpack_from(ops, i * L.OP_SIZE)
        if not L.OP_OPEN <= op <= L.OP_KERNEL_MAX or op == L.OP_PIN_FAILED:
            raise ValueError(f"unknown operation type {op}")
        slot = slots[i]
        roff = slot * L.CARD_SIZE
        card = _Card(L.CARD.unpack_from(records, roff))
        card.check()
        reason = L.R_OK
        checked = ""  # "right" or "failed" once the PIN was compared
        discount = d_principal = d_bonus = d_points = 0

        def gate(pin_flags: int = pin_flags) -> int:
            """The PIN rule of ``layout``; a right PIN resets the count only if the operation applies."""
            nonlocal checked
            presented = pin_flags & L.PIN_PRESENTED
            if not presented and not pin_flags & L.PIN_REQUIRED:
                return L.R_OK
            if not card.flags & L.CARD_PIN_SET:
                return L.R_PIN_NOT_SET if presented or not pin_flags & L.PIN_OPTIONAL_UNSET else L.R_OK
            if card.flags & L.CARD_PIN_LOCKED:
                return L.R_PIN_LOCKED
            if not presented:
                return L.R_PIN_REQUIRED
            if not hmac.compare_digest(pin_check, card.pin_check):
                card.pin_tries += 1
                if card.pin_tries >= tries_max:
                    card.flags |= L.CARD_PIN_LOCKED
                checked = "failed"
                return L.R_PIN_WRONG
            checked = "right"
            return L.R_OK

        def set_pin() -> None:
            new = pin_flags & L.NEW_PIN
            card.pin_check = new_pin_check if new else bytes(32)
            card.flags = L.CARD_PIN_SET if new else 0
            card.pin_tries = 0

        if op == L.OP_OPEN:
            if card.version != 0:
                reason = L.R_CARD_ALREADY_EXISTS
            elif tier >= tier_count:
                reason = L.R_INVALID_TIER
            else:
                card = _Card((L.CARD_VERSION, L.STATUS_ACTIVE, tier, 0, 0, 0, 0, 0, 0, 0, 0, ts_us,
                              home_store, 0, bytes(32), bytes(24)))
                if pin_flags & L.NEW_PIN:
                    set_pin()
        elif card.version == 0:
            reason = L.R_CARD_NOT_FOUND
        elif op == L.OP_RESET_PIN:
            set_pin()
        elif card.status != L.STATUS_ACTIVE:
            reason = L.R_CARD_NOT_ACTIVE
        elif op == L.OP_SET_PIN:
            if not pin_flags & L.NEW_PIN:
                reason = L.R_INVALID_ARGUMENT
            elif card.flags & L.CARD_PIN_SET or pin_flags & L.PIN_PRESENTED:
                reason = gate(pin_flags | L.PIN_REQUIRED)  # changing a PIN always needs the old one
            elif operator == 0:
                reason = L.R_OPERATOR_REQUIRED  # a first PIN is set with an operator at the till
            if reason == L.R_OK:
                set_pin()
        elif op == L.OP_BALANCE_INQUIRY:
            # the PIN like a purchase; a right one changes nothing (no entry, tries untouched)
            reason = gate(pin_flags | L.PIN_REQUIRED)
            if checked == "right":
                checked = ""
        elif (reason := gate()) != L.R_OK:
            pass
        elif amount <= 0:
            reason = L.R_INVALID_AMOUNT
        elif op == L.OP_TOP_UP:
            if card.principal + card.bonus + amount > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            else:
                d_principal = amount
        elif card.tier >= tier_count:
            reason = L.R_INVALID_TIER
        else:
            paid = paid_minor(amount, rates[card.tier])
            earned = points_earned(paid, unit, per_unit)
            if paid > card.principal + card.bonus - card.held:
                reason = L.R_INSUFFICIENT_FUNDS
            elif card.points + earned > L.INT64_MAX or card.lifetime + paid > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            else:
                discount = amount - paid
                d_principal = -min(paid, card.principal)
                d_bonus = -(paid + d_principal)
                d_points = earned
                card.lifetime += paid
        entry_seq = 0
        pin_failed = checked == "failed"
        if reason == L.R_OK:
            if checked == "right":
                card.pin_tries = 0
            card.principal += d_principal
            card.bonus += d_bonus
            card.points += d_points
        if pin_failed or (reason == L.R_OK and op != L.OP_BALANCE_INQUIRY):
            entry_seq = seq
            seq += 1
            card.last_seq = entry_seq
            card.check()
            L.CARD.pack_into(records, roff, *card.fields())
            slot_dirty[slot] = 1
        L.JOURNAL.pack_into(
            journal_out, i * L.JOURNAL_SIZE, L.JOURNAL_VERSION,
            L.OP_PIN_FAILED if pin_failed else op, card.tier, card.status, reason,
            card.pin_tries, card.flags & 0xFF, entry_seq, card_id, 0 if pin_failed else amount,
            discount, d_principal, d_bonus, d_points, card.principal, card.bonus, card.points, ts_us,
            store, terminal, staff, operator, tag, program_version, caller_kind, bytes(3), caller_id,
            0, link_seq, ref_id, basket, client_time, bytes(48), bytes(32))
    return seq


class _Card:
    """A card record's fields by name (layout.CARD order)."""

    __slots__ = ("version", "status", "tier", "pin_tries", "flags", "principal", "bonus", "points",
                 "held", "lifetime", "last_seq", "opened_us", "home_store", "reserved0",
                 "pin_check", "reserved1")

    def __init__(self, fields) -> None:
        for name, value in zip(self.__slots__, fields, strict=True):
            setattr(self, name, value)

    def fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def check(self) -> None:
        """Invariants of a card record, checked after every read and before every write."""
        if self.version == 0:
            return
        if self.version != L.CARD_VERSION:
            raise ValueError(f"card record version {self.version} unknown")
        if min(self.principal, self.bonus, self.points, self.held, self.lifetime) < 0:
            raise ValueError("card record has a negative balance")
        if self.principal + self.bonus > L.INT64_MAX:
            raise ValueError("card record principal + bonus exceeds int64")
        if self.flags & ~(L.CARD_PIN_SET | L.CARD_PIN_LOCKED) or (
                self.flags & L.CARD_PIN_LOCKED and not self.flags & L.CARD_PIN_SET):
            raise ValueError("card record has unknown or inconsistent PIN flags")
