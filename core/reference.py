"""The pure-Python reference of the kernel: the readable specification.

``apply_batch`` has exactly the signature and effect of
``cardcore.ext.kernel.apply_batch``; the rules it applies are documented in
``rules``. It is slow on purpose-free grounds (struct per field) and is used
by the differential tests and the benchmark, never by the server.
"""
from __future__ import annotations

from . import layout as L
from .rules import paid_minor, points_earned


def apply_batch(program: bytes, ops: bytes, slots, records: bytearray,
                journal_out: bytearray, slot_dirty: bytearray, ts_us: int, first_seq: int) -> int:
    """Apply ``len(ops) // 64`` operations in order; return the next free sequence number.

    ``slots[i]`` is the index of operation i's card record in ``records``
    (128 bytes each; version 0 = no such card yet). Accepted operations update
    their record in place, set ``slot_dirty[slot] = 1`` and get a journal entry
    with the next sequence; declined ones get an entry with ``reason`` set and
    ``seq = 0``. ``journal_out`` receives one 128-byte entry per operation.
    """
    n = len(ops) // L.OP_SIZE
    assert len(ops) == n * L.OP_SIZE and len(journal_out) == n * L.JOURNAL_SIZE
    assert len(records) % L.CARD_SIZE == 0 and len(slot_dirty) == len(records) // L.CARD_SIZE
    tier_count, _, unit, per_unit, *rest = L.PROGRAM.unpack(program)
    rates = rest[:L.MAX_TIERS]
    seq = first_seq
    for i in range(n):
        (op, tier, _, home_store, amount, store, terminal, staff, _, tag, card_id,
         _) = L.OP.unpack_from(ops, i * L.OP_SIZE)
        slot = slots[i]
        roff = slot * L.CARD_SIZE
        rec = list(L.CARD.unpack_from(records, roff))
        _check_record(rec)
        (version, status, ctier, _, _, principal, bonus, points, held, lifetime, _, _, _, _, _,
         _) = rec
        reason = L.R_OK
        discount = d_principal = d_bonus = d_points = 0
        if op == L.OP_OPEN:
            if version != 0:
                reason = L.R_CARD_ALREADY_EXISTS
            elif tier >= tier_count:
                reason = L.R_INVALID_TIER
            else:
                rec = [L.CARD_VERSION, L.STATUS_ACTIVE, tier, 0, 0, 0, 0, 0, 0, 0, 0, ts_us,
                       home_store, 0, bytes(32), bytes(24)]
                status, ctier = L.STATUS_ACTIVE, tier
        elif op in (L.OP_TOP_UP, L.OP_PURCHASE):
            if version == 0:
                reason = L.R_CARD_NOT_FOUND
            elif status != L.STATUS_ACTIVE:
                reason = L.R_CARD_NOT_ACTIVE
            elif amount <= 0:
                reason = L.R_INVALID_AMOUNT
            elif op == L.OP_TOP_UP:
                if principal + bonus + amount > L.INT64_MAX:
                    reason = L.R_AMOUNT_OVERFLOW
                else:
                    d_principal = amount
            elif ctier >= tier_count:
                reason = L.R_INVALID_TIER
            else:
                paid = paid_minor(amount, rates[ctier])
                earned = points_earned(paid, unit, per_unit)
                if paid > principal + bonus - held:
                    reason = L.R_INSUFFICIENT_FUNDS
                elif points + earned > L.INT64_MAX or lifetime + paid > L.INT64_MAX:
                    reason = L.R_AMOUNT_OVERFLOW
                else:
                    discount = amount - paid
                    d_principal = -min(paid, principal)
                    d_bonus = -(paid + d_principal)
                    d_points = earned
                    rec[9] = lifetime + paid
        else:
            raise ValueError(f"unknown operation type {op}")
        entry_seq = 0
        if reason == L.R_OK:
            entry_seq = seq
            seq += 1
            rec[5] += d_principal
            rec[6] += d_bonus
            rec[7] += d_points
            rec[10] = entry_seq
            _check_record(rec)
            L.CARD.pack_into(records, roff, *rec)
            slot_dirty[slot] = 1
        L.JOURNAL.pack_into(
            journal_out, i * L.JOURNAL_SIZE, L.JOURNAL_VERSION, op, ctier, status, reason, 0,
            entry_seq, card_id, amount, discount, d_principal, d_bonus, d_points,
            rec[5], rec[6], rec[7], ts_us, store, terminal, staff, 0, tag)
    return seq


def _check_record(rec: list) -> None:
    """Invariants of a card record, checked after every read and before every write."""
    if rec[0] == 0:
        return
    if rec[0] != L.CARD_VERSION:
        raise ValueError(f"card record version {rec[0]} unknown")
    if rec[5] < 0 or rec[6] < 0 or rec[7] < 0 or rec[8] < 0 or rec[9] < 0:
        raise ValueError("card record has a negative balance")
    if rec[5] + rec[6] > L.INT64_MAX:
        raise ValueError("card record principal + bonus exceeds int64")
