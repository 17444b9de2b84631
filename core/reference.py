"""The pure-Python reference of the kernel: the readable specification.

``apply_batch`` has exactly the signature and effect of
``cardcore.ext.kernel.apply_batch``; the rules it applies are documented in
``rules``. It is slow on purpose-free grounds (struct per field) and is used
by the differential tests and the benchmark, never by the server.
"""
from __future__ import annotations

import hmac
import struct

from cardcore import layout as L
from cardcore.rules import (TIER_REVIEW_DAYS_MAX, TIER_REVIEW_DAYS_MIN, available_minor,
                            card_expiry_us, expired, line_refund, month_of, paid_minor,
                            points_earned, redemption, review_due, review_start, spend,
                            undo_money, undo_share)


def _day(ts_us: int) -> int:
    """Rule 11's day: UTC days since 1970-01-01 (a time before 1970 counts as day 0)."""
    return max(ts_us, 0) // L.DAY_US


def apply_batch(program: bytes, ops: bytes, lines: bytearray, slots, records: bytearray,
                extras: bytearray, item_slots, items: bytearray, journal_out: bytearray,
                slot_dirty: bytearray, item_dirty: bytearray, ts_us: int,
                first_seq: int) -> int:
    """Apply ``len(ops) // 192`` operations in order; return the next free sequence number.

    ``slots[i]`` is the index of operation i's card in ``records`` (128-byte
    card records; version 0 = no such card yet) and in ``extras`` (128-byte
    card program states, layout.CARD_EXT; zeros = none yet). ``lines`` holds
    the purchase lines of the operations in order (each takes its op's
    ``line_count``); the kernel fills their output fields once the purchase is
    past its category check. An operation that changes its card (applied, or a
    wrong PIN counted) updates the records in place, sets bit 0 (card) and bit 1
    (program state) of ``slot_dirty[slot]`` for what it changed, and gets a
    journal entry with the next sequence; others (and a balance inquiry with the
    right PIN) get an entry with ``reason`` set and ``seq = 0``. ``journal_out``
    receives one 256-byte v2 entry per operation, its digest zero (the ledger
    chains it). The record an operation names by ref_id (its serial) is at ``item_slots[i]``
    in ``items`` (64 bytes each; SLOT_NONE for every other operation): a purchase's coupon
    (layout.COUPON), a package use's package (layout.PACKAGE). An operation that uses it
    changes it in place and sets ``item_dirty[its slot]``.
    """
    n = len(ops) // L.OP_SIZE
    assert len(ops) == n * L.OP_SIZE and len(journal_out) == n * L.JOURNAL_SIZE
    assert len(records) % L.CARD_SIZE == 0 and len(slot_dirty) == len(records) // L.CARD_SIZE
    assert len(extras) == len(records) and len(items) % L.COUPON_SIZE == 0
    assert len(item_dirty) == len(items) // L.COUPON_SIZE and len(item_slots) == n
    prog = CompiledProgram(program)
    line_total = sum(L.OP_PROGRAM.unpack_from(ops, i * L.OP_SIZE + L.OP_OFF_PROGRAM)[0]
                     for i in range(n))
    if len(program) != L.PROGRAM_SIZE or len(lines) != line_total * L.LINE_SIZE:
        raise ValueError("program or lines buffer has the wrong size")
    seq = first_seq
    line_at = 0
    for i in range(n):
        (op, tier, pin_flags, caller_kind, home_store, amount, store, terminal, staff, operator, tag,
         card_id, client_time, pin_check, new_pin_check, caller_id, birth_month, link_seq, ref_id,
         basket, line_count, op_flags, redeem, _) = L.OP.unpack_from(ops, i * L.OP_SIZE)
        if not L.card_op(op) or op == L.OP_PIN_FAILED:
            raise ValueError(f"unknown operation type {op}")
        my_lines = range(line_at, line_at + line_count)
        line_at += line_count
        slot = slots[i]
        cslot = item_slots[i]
        capture = op == L.OP_PURCHASE and bool(op_flags[0] & L.CAPTURE)
        if needs_item(op, ref_id, op_flags[0]) != (cslot != L.SLOT_NONE) or (
                cslot != L.SLOT_NONE and cslot >= len(item_dirty)):
            raise ValueError("an operation's coupon or package and its slot do not match")
        item = None if cslot == L.SLOT_NONE else L.COUPON.unpack_from(items, cslot * L.COUPON_SIZE)
        coupon = item if op == L.OP_PURCHASE and not capture else None
        hold = None
        if op in (L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED) or capture:
            hold = list(L.HOLD.unpack_from(items, cslot * L.COUPON_SIZE))
            check_hold(hold)
        d_held = released = 0
        roff = slot * L.CARD_SIZE
        card = Card(L.CARD.unpack_from(records, roff))
        card.check()
        if hold is not None and hold[0] and hold[1] == L.HOLD_OPEN and hold[4] > card.held:
            raise ValueError("an open hold is past what its card holds")
        ext = CardState(L.CARD_EXT.unpack_from(extras, roff))
        ext.check()
        # rule 14: at or after its expiry a card is expired, whatever its stored status says
        lapsed = expired(card.expires_us, ts_us)
        status_now = (L.STATUS_EXPIRED if lapsed and card.status in L.STATUSES_LIVE
                      else card.status)
        undo = None
        if op in (L.OP_REFUND, L.OP_REVERSAL):
            undo = list(L.UNDO.unpack_from(items, cslot * L.COUPON_SIZE))
            check_undo(undo)
        complete = undo_changed = False
        tier_before = card.tier
        reason = L.R_OK
        checked = ""  # "right" or "failed" once the PIN was compared
        discount = d_principal = d_bonus = d_points = 0
        taken_points = redeemed = coupon_off = 0
        partial = False
        promotion_id = 0  # the entry's item_id: a promotion or a coupon definition
        entry_ref = ref_id
        ext_changed = False

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
                if card.pin_tries >= prog.pin_tries_max:
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

        entry_lines = line_count  # the entry's line_count: a refund by line's, those asked
        if (line_count and op not in (L.OP_PURCHASE, L.OP_REFUND) or redeem < 0 or line_count > L.LINES_MAX
                or redeem and op not in (L.OP_PURCHASE, L.OP_COUPON_ISSUE, L.OP_POINTS_EXCHANGE,
                                         L.OP_IMPORT_CARD)
                or op_flags[0] & L.CAPTURE and (op != L.OP_PURCHASE or ref_id or redeem
                                                or op_flags[0] & L.ALLOW_PARTIAL)
                or op_flags[0] & L.ISSUE_ONLY and op != L.OP_OPEN):
            reason = L.R_INVALID_ARGUMENT
        elif op == L.OP_OPEN:
            if birth_month > 12:
                reason = L.R_INVALID_ARGUMENT
            elif card.version != 0:
                reason = L.R_CARD_ALREADY_EXISTS
            elif tier >= prog.tier_count:
                reason = L.R_INVALID_TIER
            else:
                issued = bool(op_flags[0] & L.ISSUE_ONLY)
                card = Card((L.CARD_VERSION, L.STATUS_ISSUED if issued else L.STATUS_ACTIVE,
                             tier, 0, 0, 0, 0, 0, 0, 0, 0, ts_us, home_store, birth_month,
                             bytes(32), bytes(24)))
                card.expires_us = card_expiry_us(ts_us, prog.card_valid_months, prog.utc_offset)
                tier_before = tier
                if not issued:  # an issued card's come with its activation
                    d_points = prog.activation_points
                if pin_flags & L.NEW_PIN:
                    set_pin()
                if prog.review_days:  # rule 11: tracked from its opening day
                    ext = CardState(L.CARD_EXT.unpack(bytes(L.CARD_EXT_SIZE)))
                    ext.start_period(card, _day(ts_us), prog.review_days)
                    ext_changed = True
        elif op == L.OP_IMPORT_CARD:  # rule 18: amount principal, ref_id bonus, redeem points
            if birth_month > 12 or pin_flags or op_flags[0]:
                reason = L.R_INVALID_ARGUMENT  # an import never carries a PIN
            elif card.version != 0:
                reason = L.R_CARD_ALREADY_EXISTS
            elif tier >= prog.tier_count:
                reason = L.R_INVALID_TIER
            elif amount < 0 or ref_id > L.INT64_MAX - amount:
                reason = L.R_INVALID_AMOUNT
            else:
                card = Card((L.CARD_VERSION, L.STATUS_ACTIVE, tier, 0, 0, 0, 0, 0, 0, 0, 0, ts_us,
                             home_store, birth_month, bytes(32), bytes(24)))
                card.expires_us = card_expiry_us(ts_us, prog.card_valid_months, prog.utc_offset)
                tier_before = tier
                d_principal, d_bonus, d_points = amount, ref_id, redeem
                entry_ref = 0
                if prog.review_days:  # rule 11: tracked from its import day
                    ext = CardState(L.CARD_EXT.unpack(bytes(L.CARD_EXT_SIZE)))
                    ext.start_period(card, _day(ts_us), prog.review_days)
                    ext_changed = True
        elif card.version == 0:
            reason = L.R_CARD_NOT_FOUND
        elif op == L.OP_RESET_PIN:
            if card.status == L.STATUS_REPLACED:
                reason = L.R_CARD_REPLACED  # rule 16: the number is dead
            else:
                set_pin()
        elif op == L.OP_CARD_STATUS:  # rule 14: an operator's change of the card's life, or expiry
            activating = card.status == L.STATUS_ISSUED and tier == L.STATUS_ACTIVE
            if amount or ref_id:
                reason = L.R_INVALID_ARGUMENT
            elif tier == L.STATUS_EXPIRED:  # the server's, at or after the card's expiry only
                if not (lapsed and card.status in L.STATUSES_LIVE):
                    reason = L.R_ILLEGAL_TRANSITION
            elif tier not in L.CARD_TRANSITIONS.get(card.status, ()):
                reason = L.R_ILLEGAL_TRANSITION
            elif status_now == L.STATUS_EXPIRED and tier != L.STATUS_CLOSED:
                reason = L.R_CARD_EXPIRED  # past its expiry: closed (or replaced), nothing else
            elif tier == L.STATUS_CLOSED and card.held:
                reason = L.R_HOLDS_OPEN  # rule 15: the holds are voided first
            elif activating and card.points + prog.activation_points > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            if reason == L.R_OK:
                entry_ref = card.status  # the status it left
                if tier == L.STATUS_CLOSED:  # the principal paid back, the rest forfeited
                    amount = card.principal
                    d_principal, d_bonus, d_points = -card.principal, -card.bonus, -card.points
                elif activating:
                    d_points = prog.activation_points
                card.status = tier
        elif op == L.OP_REVERSAL:  # whatever the card's status: it undoes what was done
            (version, flags, original, tier0, tier1, item_id, refunded, paid, principal, bonus,
             *_) = undo
            if amount:
                reason = L.R_INVALID_AMOUNT
            elif card.status == L.STATUS_CLOSED:
                reason = L.R_CARD_NOT_ACTIVE  # paid out and emptied for ever: nothing comes back
            elif card.status == L.STATUS_REPLACED:
                reason = L.R_CARD_REPLACED  # rule 16: what it held moved on
            elif version == 0:
                pass  # never applied: an entry that moves nothing (the ledger keeps the tombstone)
            elif flags & L.UNDO_REVERSED:
                pass  # reversed before: nothing more to undo
            elif original == L.OP_PURCHASE:
                reason, figures = give_back(undo, card, refunded, paid, prog.shortfall)
                if reason == L.R_OK:
                    d_principal, d_bonus, take, back = figures
                    d_points, taken_points = back - take, take
                    redeemed = paid - refunded - d_principal - d_bonus
                    amount = paid - refunded
                    undo_changed = complete = True
            elif original == L.OP_TOP_UP:
                if (card.principal < principal or card.bonus < bonus
                        or card.principal - principal + card.bonus - bonus < card.held):
                    reason = L.R_INSUFFICIENT_FUNDS
                else:
                    d_principal, d_bonus, amount = -principal, -bonus, paid
                    ext.take_back_top_up(principal, item_id)
                    ext_changed = undo_changed = complete = True
            elif original == L.OP_HOLD:  # rule 15: what the hold still holds (0: closed)
                if paid > card.held:
                    reason = L.R_INVALID_ARGUMENT
                else:
                    d_held, amount = -paid, paid
                    undo_changed = complete = True
            elif original == L.OP_PACKAGE_USE:  # rule 13: the use comes back (the writer's)
                undo_changed = complete = True
            elif original == L.OP_GIFT_REDEEM:  # rule 13: its points come back (the writer: stock)
                if undo[10] < 0 or undo[10] > L.INT64_MAX - card.points:
                    reason = L.R_AMOUNT_OVERFLOW
                else:
                    d_points = undo[10]
                    undo_changed = complete = True
            else:
                reason = L.R_NOT_REVERSIBLE
            if reason == L.R_OK and undo_changed and card.tier == tier1 and tier0 < card.tier:
                card.tier = tier0  # the upgrade it made, undone
        elif op == L.OP_TIER_REVIEWED:  # whatever the card's status, like an expiry
            if amount or ref_id:
                reason = L.R_INVALID_ARGUMENT
            else:
                reason, amount, entry_ref = prog.review(card, ext, ts_us)
                ext_changed = True
        elif op == L.OP_POINTS_EXPIRED:  # whatever the card's status: points expire all the same
            if amount <= 0:
                reason = L.R_INVALID_AMOUNT
            elif amount > card.points:
                reason = L.R_INSUFFICIENT_POINTS
            else:
                d_points = -amount
        elif op in (L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED):  # rule 15: whatever the status
            if amount or ref_id:
                reason = L.R_INVALID_ARGUMENT
            else:
                reason = hold_check(hold, op, store, operator)
                if reason == L.R_OK and op == L.OP_HOLD_EXPIRED and ts_us < hold[6]:
                    reason = L.R_INVALID_ARGUMENT  # not expired yet: the writer's to get right
                if reason == L.R_OK:
                    amount = hold[4]
                    d_held = -amount
        elif status_now != L.STATUS_ACTIVE and not (status_now == L.STATUS_EXPIRED
                                                    and op == L.OP_REFUND):
            reason = {L.STATUS_REPLACED: L.R_CARD_REPLACED, L.STATUS_EXPIRED: L.R_CARD_EXPIRED,
                      L.STATUS_ISSUED: L.R_CARD_NOT_ACTIVATED}.get(status_now, L.R_CARD_NOT_ACTIVE)
        elif op == L.OP_REFERRAL_BONUS:
            if amount <= 0:
                reason = L.R_INVALID_AMOUNT
            elif card.points + amount > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            else:
                d_points = amount
        elif op == L.OP_REFUND:
            version, flags, original, *_, refunded, paid = undo[:8]
            if version == 0:
                reason = L.R_ORIGINAL_NOT_FOUND
            elif original != L.OP_PURCHASE:
                reason = L.R_NOT_REFUNDABLE
            elif flags & L.UNDO_REVERSED:
                reason = L.R_ALREADY_REVERSED
            elif amount < 0:
                reason = L.R_INVALID_AMOUNT
            elif line_count and amount:
                reason = L.R_INVALID_ARGUMENT  # by line or by amount, not both
            else:
                whole = True
                if line_count:
                    reason, amount, entry_lines, whole = refund_lines(lines, my_lines, paid)
                else:
                    amount = amount or paid - refunded  # 0: all that is left
                if reason != L.R_OK:
                    pass
                elif (amount == 0 and not line_count) or amount > paid - refunded:
                    reason = L.R_REFUND_EXCEEDS_ORIGINAL
                    redeemed = paid - refunded  # what is left, for the answer
                else:
                    reason, figures = give_back(undo, card, refunded, refunded + amount,
                                                prog.shortfall)
                    if reason == L.R_OK:
                        d_principal, d_bonus, take, back = figures
                        d_points, taken_points = back - take, take
                        redeemed = amount - d_principal - d_bonus
                        undo_changed = True
                        complete = refunded + amount == paid and whole
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
        elif op == L.OP_COUPON_ISSUE:
            d = prog.coupon_def(ref_id)
            if d is None:
                reason = L.R_COUPON_NOT_FOUND
            elif redeem == 0 and operator == 0:
                reason = L.R_OPERATOR_REQUIRED  # given away: an operator (a campaign) gives it
            elif redeem and redeem != d[7]:
                reason = L.R_COUPON_NOT_FOR_SALE  # bought: at its points price, when it has one
            elif redeem and card.points < redeem:
                reason = L.R_INSUFFICIENT_POINTS  # (a coupon given: whatever the points, a debt too)
            else:
                d_points, taken_points, promotion_id = -redeem, redeem, ref_id
        elif op == L.OP_POINTS_EXCHANGE:
            blocks = redeem // prog.exchange_points if prog.exchange_points else 0
            if not prog.exchange_points:
                reason = L.R_EXCHANGE_NOT_OFFERED
            elif amount != 0 or blocks == 0:
                reason = L.R_INVALID_ARGUMENT  # fewer points than one block offered
            elif card.points < redeem:
                reason = L.R_INSUFFICIENT_POINTS
            elif card.principal + card.bonus + blocks * prog.exchange_bonus > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            else:
                taken_points = blocks * prog.exchange_points
                d_points, d_bonus = -taken_points, blocks * prog.exchange_bonus
        elif op == L.OP_GIFT_REDEEM:
            g = prog.gift_def(ref_id)
            given = L.GIFT.unpack_from(items, cslot * L.COUPON_SIZE)[3]
            if amount != 0:
                reason = L.R_INVALID_AMOUNT
            elif g is None:
                reason = L.R_GIFT_NOT_FOUND
            elif given >= g[2]:
                reason = L.R_GIFT_OUT_OF_STOCK
            elif card.points < g[1]:
                reason = L.R_INSUFFICIENT_POINTS
            else:
                taken_points, d_points, promotion_id = g[1], -g[1], ref_id
        elif op == L.OP_PACKAGE_USE:
            version, kind, package_id, uses_left, valid_from, valid_until, *_ = \
                L.PACKAGE.unpack_from(items, cslot * L.COUPON_SIZE)
            if amount != 0:
                reason = L.R_INVALID_AMOUNT
            elif version != L.PACKAGE_VERSION:
                reason = L.R_PACKAGE_NOT_FOUND
            elif not valid_from <= ts_us < valid_until:
                reason = L.R_PACKAGE_NOT_VALID_NOW
            elif kind == L.PACKAGE_COUNT and uses_left == 0:
                reason = L.R_PACKAGE_USED_UP
            else:
                promotion_id = package_id
        elif amount <= 0:
            reason = L.R_INVALID_AMOUNT
        elif op == L.OP_HOLD:  # rule 15: held, not spent
            if not 1 <= ref_id <= L.HOLD_MINUTES_MAX:
                reason = L.R_INVALID_ARGUMENT
            elif amount > available_minor(card.principal, card.bonus, card.held):
                reason = L.R_INSUFFICIENT_FUNDS
            elif ts_us + ref_id * 60_000_000 > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            else:
                d_held = amount
                entry_ref = ts_us + ref_id * 60_000_000  # its expiry
        elif op == L.OP_PACKAGE_SELL:
            d = prog.package_def(ref_id)
            if d is None:
                reason = L.R_PACKAGE_NOT_FOUND
            elif amount != d[5]:
                reason = L.R_INVALID_AMOUNT  # at the program's price
            elif card.tier >= prog.tier_count:
                reason = L.R_INVALID_TIER
            elif amount > card.principal + card.bonus - card.held:
                reason = L.R_INSUFFICIENT_FUNDS
            elif card.lifetime + amount > L.INT64_MAX:
                reason = L.R_AMOUNT_OVERFLOW
            else:  # paid like a purchase at full price: no discount, no points
                d_principal, d_bonus = spend(amount, card.principal, card.bonus, prog.spend_order)
                d_principal, d_bonus = -d_principal, -d_bonus
                card.lifetime += amount
                card.tier = prog.upgrade(card.tier, prog.up_spend,
                                         prog.period_spend(card.lifetime, ext))
                promotion_id = ref_id
        elif op == L.OP_TOP_UP:
            promotion_id, bonus, slot_k = prog.best_promotion(ext, amount, ts_us)
            if (card.principal + card.bonus + amount + bonus > L.INT64_MAX
                    or ext.lifetime_top_up + amount > L.INT64_MAX):
                reason = L.R_AMOUNT_OVERFLOW
            else:
                d_principal, d_bonus = amount, bonus
                ext.top_up(amount, promotion_id if slot_k is not None else 0, slot_k)
                ext_changed = True
                card.tier = prog.upgrade(card.tier, prog.up_top_up, amount)
        elif card.tier >= prog.tier_count:
            reason = L.R_INVALID_TIER
        else:
            if capture:  # rule 15: paid from its hold, which it closes
                reason = hold_check(hold, op, store, operator)
                if reason == L.R_OK and ts_us >= hold[6]:
                    reason = L.R_HOLD_EXPIRED
                released = hold[4]
            figures = ()
            if reason == L.R_OK:
                reason, figures = purchase(prog, card, lines, my_lines, amount, redeem, coupon,
                                           ts_us, op_flags[0], released)
            if reason == L.R_OK and capture and figures[6] > released:
                reason = L.R_CAPTURE_EXCEEDS_HOLD
            if reason == L.R_OK:
                d_held = -released
                paid, earned, taken_points, redeemed, coupon_off, coupon_id, due = figures
                if coupon is not None:
                    promotion_id = coupon_id
                discount = amount - paid
                partial = due < paid - redeemed
                d_principal, d_bonus = spend(due, card.principal, card.bonus, prog.spend_order)
                d_principal, d_bonus = -d_principal, -d_bonus
                d_points = earned - taken_points
                card.lifetime += due
                card.tier = prog.upgrade(card.tier, prog.up_spend,
                                         prog.period_spend(card.lifetime, ext))
        entry_seq = 0
        pin_failed = checked == "failed"
        if reason == L.R_OK:
            if checked == "right":
                card.pin_tries = 0
            card.principal += d_principal
            card.bonus += d_bonus
            card.points += d_points
            card.held += d_held
        if pin_failed or (reason == L.R_OK and op != L.OP_BALANCE_INQUIRY):
            entry_seq = seq
            seq += 1
            card.last_seq = entry_seq
            card.check()
            L.CARD.pack_into(records, roff, *card.fields())
            slot_dirty[slot] |= 1
            if ext_changed and reason == L.R_OK:
                L.CARD_EXT.pack_into(extras, roff, *ext.fields())
                slot_dirty[slot] |= 2
            if coupon is not None and reason == L.R_OK:
                L.COUPON.pack_into(items, cslot * L.COUPON_SIZE, *coupon[:1], L.COUPON_USED,
                                   *coupon[2:7], entry_seq, coupon_off, coupon[9])
                item_dirty[cslot] = 1
            if op == L.OP_GIFT_REDEEM and reason == L.R_OK:
                given = L.GIFT.unpack_from(items, cslot * L.COUPON_SIZE)[3]
                L.GIFT.pack_into(items, cslot * L.COUPON_SIZE, L.GIFT_VERSION, ref_id, 0,
                                 given + 1, bytes(48))
                item_dirty[cslot] = 1
            if undo_changed and reason == L.R_OK:
                undo[6] = undo[7] if op == L.OP_REVERSAL else undo[6] + amount  # refunded
                if op == L.OP_REVERSAL:
                    undo[1] |= L.UNDO_REVERSED
                    undo[12] = entry_seq
                L.UNDO.pack_into(items, cslot * L.COUPON_SIZE, *undo)
                item_dirty[cslot] = 1
            if reason == L.R_OK and hold is not None:
                hold[1] = (L.HOLD_CAPTURED if capture else
                           L.HOLD_VOIDED if op == L.OP_HOLD_VOID else L.HOLD_EXPIRED)
                hold[8], hold[9] = entry_seq, figures[6] if capture else 0
                L.HOLD.pack_into(items, cslot * L.COUPON_SIZE, *hold)
                item_dirty[cslot] = 1
            if op == L.OP_PACKAGE_USE and reason == L.R_OK:
                f = list(L.PACKAGE.unpack_from(items, cslot * L.COUPON_SIZE))
                if f[1] == L.PACKAGE_COUNT:
                    f[3] -= 1
                f[7], f[8] = entry_seq, min(f[8] + 1, 0xFFFFFFFF)
                L.PACKAGE.pack_into(items, cslot * L.COUPON_SIZE, *f)
                item_dirty[cslot] = 1
        if op in (L.OP_COUPON_ISSUE, L.OP_PACKAGE_SELL):
            entry_ref = entry_seq  # the new coupon's or package's serial: this entry's sequence
        L.JOURNAL.pack_into(
            journal_out, i * L.JOURNAL_SIZE, L.JOURNAL_VERSION,
            L.OP_PIN_FAILED if pin_failed else op, tier_before, card.status, reason,
            card.pin_tries, card.flags & 0xFF, entry_seq, card_id, 0 if pin_failed else amount,
            discount, d_principal, d_bonus, d_points, card.principal, card.bonus, card.points, ts_us,
            store, terminal, staff, operator, tag, prog.version, caller_kind,
            bytes(3), caller_id, 0, link_seq, entry_ref, basket, client_time, bytes(48), bytes(32))
        applied = reason == L.R_OK
        L.JOURNAL_PROGRAM.pack_into(journal_out, i * L.JOURNAL_SIZE + L.JOURNAL_OFF_PROGRAM,
                                    taken_points, redeemed, card.tier,
                                    entry_lines if applied else 0, promotion_id if applied else 0)
        journal_out[i * L.JOURNAL_SIZE + L.JOURNAL_OFF_BIRTH_MONTH] = card.birth_month & 0xFF
        L.JOURNAL_PURCHASE_FLAGS.pack_into(journal_out, i * L.JOURNAL_SIZE
                                           + L.JOURNAL_OFF_PURCHASE_FLAGS,
                                           (L.PARTIAL_PAYMENT if applied and partial else 0)
                                           | (L.UNDO_COMPLETE if applied and complete else 0))
        L.JOURNAL_COUPON_OFF.pack_into(journal_out, i * L.JOURNAL_SIZE + L.JOURNAL_OFF_COUPON,
                                       coupon_off)
    return seq


def needs_item(op: int, ref_id: int, op_flags: int = 0) -> bool:
    """Whether an operation names a coupon, package, gift, undo record or hold the kernel must
    be given."""
    return (op in (L.OP_PACKAGE_USE, L.OP_GIFT_REDEEM, L.OP_REFUND, L.OP_REVERSAL,
                   L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED)
            or (op == L.OP_PURCHASE and (ref_id != 0 or bool(op_flags & L.CAPTURE))))


def check_hold(hold: list) -> None:
    version, state, _, _, amount, _, _, _, _, captured, _ = hold
    if version not in (0, L.HOLD_VERSION) or (version and not (
            L.HOLD_OPEN <= state <= L.HOLD_REVERSED and amount > 0 and 0 <= captured <= amount)):
        raise ValueError("hold breaks an invariant")


def hold_check(hold: list, op: int, store: int, operator: int) -> int:
    """Rule 15: whether ``op`` may close this hold of its card (another card's is not in the
    item: zeros; one closed by a terminal of another store is not found either)."""
    if hold[0] != L.HOLD_VERSION or (op != L.OP_HOLD_EXPIRED and not operator
                                     and store != hold[3]):
        return L.R_HOLD_NOT_FOUND
    return L.R_OK if hold[1] == L.HOLD_OPEN else L.R_HOLD_CLOSED


def refund_lines(lines: bytearray, my_lines: range, paid: int) -> tuple[int, int, int, bool]:
    """Rule 12 by line, over the sale's lines as the writer marks them (layout.LINE line_tag):
    (reason, fen given back, lines asked, whether no line of the sale is left after them)."""
    total = before = now = asked = 0
    bad = again = False
    whole = True
    for k in my_lines:
        _, tag, _, gross, discount, *_ = L.LINE.unpack_from(lines, k * L.LINE_SIZE)
        if tag > (L.LINE_ASKED | L.LINE_REFUNDED) or gross <= 0 or not 0 <= discount <= gross:
            bad = True
            continue
        p = gross - discount
        total += p
        if tag & L.LINE_REFUNDED:
            before += p
            again = again or bool(tag & L.LINE_ASKED)
        elif tag & L.LINE_ASKED:
            now += p
            asked += 1
        else:
            whole = False
    if bad or total > L.INT64_MAX or total < paid:
        return L.R_INVALID_ARGUMENT, 0, 0, False  # not the lines of a sale that cost paid
    if again:
        return L.R_LINE_ALREADY_REFUNDED, 0, 0, False
    if not asked:
        return L.R_INVALID_ARGUMENT, 0, 0, False
    return L.R_OK, line_refund(paid, total, before, before + now), asked, whole


def check_undo(undo: list) -> None:
    version, _, _, _, _, _, refunded, paid, principal, bonus, redeemed, earned, _ = undo
    if version not in (0, L.UNDO_VERSION) or (version and not (
            0 <= refunded <= paid and min(principal, bonus, redeemed, earned) >= 0)):
        raise ValueError("undo record breaks an invariant")


def give_back(undo: list, card: "Card", before: int, after: int,
              shortfall: int = L.SHORTFALL_FORGIVE) -> tuple[int, tuple]:
    """Rules 12 and 13: (reason, (principal, bonus, points taken back, points given back)) of a
    purchase from ``before`` to ``after`` of its paid amount; the card's lifetime paid goes
    down by the money."""
    paid, principal, bonus, redeemed, earned = undo[7:12]

    def part(x: int) -> int:
        if paid == 0:
            return x if before == 0 else 0
        return undo_share(x, paid, before, after)

    p, b = undo_money(principal, bonus, paid, before, after)
    back, take = part(redeemed), part(earned)
    if card.principal + card.bonus + p + b > L.INT64_MAX or card.points + back > L.INT64_MAX:
        return L.R_AMOUNT_OVERFLOW, ()
    if shortfall == L.SHORTFALL_OWE:  # all of them: the card may owe points
        if card.points - take < -L.INT64_MAX:
            return L.R_AMOUNT_OVERFLOW, ()
    else:  # what the card holds: never below zero (nothing from a debt)
        take = min(take, max(card.points, 0))
    card.lifetime = max(card.lifetime - p - b, 0)
    return L.R_OK, (p, b, take, back)


def purchase(prog: "CompiledProgram", card: "Card", lines: bytearray, my_lines: range, amount: int,
             offered: int, coupon: tuple | None = None, ts_us: int = 0,
             flags: int = 0, released: int = 0) -> tuple[int, tuple[int, int, int, int, int, int, int]]:
    """Rules 2-6 for one purchase: (reason, (paid, earned, points taken, redeemed fen, coupon
    off, coupon definition, what the card pays)); paid is after the tier's rate and the coupon.
    Fills the lines'
    output fields once they passed the category check (a line's discount includes its share of
    the coupon)."""
    none = (0, 0, 0, 0, 0, 0, 0)
    if my_lines:
        items = [list(L.LINE.unpack_from(lines, k * L.LINE_SIZE)) for k in my_lines]
    else:
        items = [[0, 0, 0, amount, 0, 0, 0, b""]]
    if any(it[3] <= 0 for it in items) or sum(it[3] for it in items) != amount:
        return L.R_INVALID_AMOUNT, none
    if any(it[0] >= L.MAX_CATEGORIES or not prog.category_flags[it[0]] & L.CATEGORY_DEFINED
           for it in items):
        return L.R_UNKNOWN_CATEGORY, none
    tier = card.tier
    line_paid = [paid_minor(it[3], prog.rate(tier, it[0])) for it in items]
    paid = sum(line_paid)
    for it, p in zip(items, line_paid):
        it[4], it[5], it[6] = it[3] - p, 0, 0
    reason, taken, redeemed, off, coupon_id = L.R_OK, 0, 0, 0, 0
    if coupon is not None:
        reason, off, coupon_id = prog.apply_coupon(coupon, items, line_paid, ts_us)
        paid -= off
    if reason != L.R_OK:
        pass
    elif offered:
        if not prog.redeem_points:
            reason = L.R_REDEMPTION_NOT_OFFERED
        elif card.points < offered:
            reason = L.R_INSUFFICIENT_POINTS
        else:
            taken, redeemed = redemption(offered, paid, prog.redeem_points, prog.redeem_value,
                                         prog.redeem_cap_bp)
    earned = 0
    birthday = (prog.birthday_bp and card.birth_month
                and month_of(ts_us, prog.utc_offset) == card.birth_month)
    card_pay = 0
    if reason == L.R_OK:
        due = paid - redeemed
        available = available_minor(card.principal, card.bonus, card.held - released)
        card_pay = due  # rule 6b: a partial payment takes what the card has, the till the rest
        if flags & L.ALLOW_PARTIAL and due > available > 0:
            card_pay = available
        left, left_card = redeemed, card_pay
        for it, p in zip(items, line_paid):
            on_line = min(left, p)
            left -= on_line
            it[6] = on_line
            share = min(left_card, p - on_line)  # the card pays the lines in order too
            left_card -= share
            raw = points_earned(share, prog.points_unit, prog.per_unit(tier, it[0]))
            if birthday:
                raw = raw * prog.birthday_bp // 10000
            it[5] = min(raw, L.INT64_MAX)  # a line past int64 overflows the purchase below
            earned += raw
        if card_pay > available:
            reason = L.R_INSUFFICIENT_FUNDS
        elif (earned > L.INT64_MAX  # rule 5: a figure of the entry, whatever a debt absorbs
              or card.points - taken + earned > L.INT64_MAX
              or card.lifetime + card_pay > L.INT64_MAX):
            reason = L.R_AMOUNT_OVERFLOW
    for k, it in zip(my_lines, items):
        L.LINE.pack_into(lines, k * L.LINE_SIZE, *it)
    return reason, (paid, earned, taken, redeemed, off, coupon_id, card_pay)


class CompiledProgram:
    """The compiled program (layout: Program v3) by name."""

    def __init__(self, packed: bytes) -> None:
        (self.tier_count, self.pin_tries_max, self.points_unit, self.redeem_points,
         self.redeem_value, self.redeem_cap_bp, self.version, self.spend_order,
         self.promotion_count, tail, flags, *ups) = L.PROGRAM_HEAD.unpack_from(packed)
        self.card_valid_months, self.shortfall = L.PROGRAM_HEAD_TAIL.unpack(tail)
        self.category_flags = flags
        self.up_spend, self.up_top_up = ups[:L.MAX_TIERS], ups[L.MAX_TIERS:]
        self.promotions = [
            L.PROMOTION.unpack_from(packed, L.PROGRAM_HEAD.size + k * L.PROMOTION_SIZE)
            for k in range(self.promotion_count)]
        count, n_packages = struct.unpack_from("<II", packed, L.PROGRAM_COUPON_COUNT_OFFSET)
        if count > L.MAX_COUPONS or n_packages > L.MAX_PACKAGES:
            raise ValueError("program out of range")
        self.packages = [L.PACKAGE_DEF.unpack_from(packed, L.PROGRAM_PACKAGES_OFFSET + 32 * k)
                         for k in range(n_packages)]
        (self.activation_points, self.exchange_points, self.exchange_bonus, n_gifts,
         self.birthday_bp, self.utc_offset, self.review_days) = L.PROGRAM_POINTS.unpack_from(
             packed, L.PROGRAM_POINTS_OFFSET)
        if (n_gifts > L.MAX_GIFTS or self.activation_points < 0 or self.exchange_points < 0
                or self.exchange_bonus < 0 or self.birthday_bp > 100_000
                or 0 < self.birthday_bp < 10000
                or not -720 <= self.utc_offset <= 840
                or (self.review_days and not (
                    TIER_REVIEW_DAYS_MIN <= self.review_days <= TIER_REVIEW_DAYS_MAX))):
            raise ValueError("program out of range")
        self.gifts = [L.GIFT_DEF.unpack_from(packed, L.PROGRAM_GIFTS_OFFSET + L.GIFT_DEF.size * k)
                      for k in range(n_gifts)]
        self.coupons = [L.COUPON_DEF.unpack_from(packed, L.PROGRAM_COUPONS_OFFSET + 48 * k)
                        for k in range(count)]
        cells = L.MAX_TIERS * L.MAX_CATEGORIES
        self.rates = struct.unpack_from(f"<{cells}H", packed, L.PROGRAM_RATES_OFFSET)
        self.per_units = struct.unpack_from(f"<{cells}q", packed, L.PROGRAM_PER_UNIT_OFFSET)
        if not (1 <= self.tier_count <= L.MAX_TIERS and self.points_unit > 0 and self.version >= 1
                and 1 <= self.pin_tries_max <= L.PIN_TRIES_MAX_LIMIT
                and self.promotion_count <= L.MAX_PROMOTIONS and self.redeem_points >= 0
                and (self.redeem_points == 0 or self.redeem_value > 0)
                and self.redeem_cap_bp <= 10000 and self.spend_order <= L.SPEND_PROPORTIONAL
                and self.card_valid_months <= L.CARD_VALID_MONTHS_MAX
                and self.shortfall <= L.SHORTFALL_OWE):
            raise ValueError("program out of range")
        for t in range(self.tier_count):  # the kernel's checks, in the same terms
            for c in range(L.MAX_CATEGORIES):
                if self.category_flags[c] & L.CATEGORY_DEFINED and (
                        not 1 <= self.rate(t, c) <= 10000 or self.per_unit(t, c) < 0):
                    raise ValueError("program rate out of range")

    def gift_def(self, gift_id: int) -> tuple | None:
        """The catalogue's gift ``gift_id`` (layout.GIFT_DEF fields), or None."""
        return next((g for g in self.gifts if g[0] == gift_id), None)

    def package_def(self, package_id: int) -> tuple | None:
        """The definition of package ``package_id`` (layout.PACKAGE_DEF fields), or None."""
        return next((d for d in self.packages if d[0] == package_id), None)

    def coupon_def(self, coupon_id: int) -> tuple | None:
        """The definition of coupon ``coupon_id`` (layout.COUPON_DEF fields), or None."""
        return next((d for d in self.coupons if d[0] == coupon_id), None)

    def apply_coupon(self, coupon: tuple, items: list, line_paid: list[int],
                     ts_us: int) -> tuple[int, int, int]:
        """Rule 4a: (reason, fen off, definition id); on success the lines' paid amounts and
        discounts carry the coupon's share (it takes off the eligible lines in order)."""
        version, state, coupon_id, _, valid_from, valid_until, *_ = coupon
        if version != L.COUPON_VERSION:
            return L.R_COUPON_NOT_FOUND, 0, 0
        if state != L.COUPON_ISSUED:
            return L.R_COUPON_USED, 0, 0
        if not valid_from <= ts_us < valid_until:
            return L.R_COUPON_NOT_VALID_NOW, 0, 0
        d = self.coupon_def(coupon_id)
        if d is None:  # the chain no longer offers it
            return L.R_COUPON_NOT_APPLICABLE, 0, 0
        _, kind, category, min_spend, amount_off, percent_bp, max_off, _ = d
        eligible = [k for k, it in enumerate(items)
                    if (it[0] == category if category >= 0
                        else self.category_flags[it[0]] & L.CATEGORY_DISCOUNTABLE)]
        base = sum(line_paid[k] for k in eligible)
        if not base or base < min_spend:
            return L.R_COUPON_NOT_APPLICABLE, 0, 0
        if kind == L.COUPON_AMOUNT_OFF:
            off = min(amount_off, base)
        elif kind == L.COUPON_PERCENT_OFF:
            off = base * percent_bp // 10000
        else:  # one free item: the first eligible line
            off = line_paid[eligible[0]]
        if kind != L.COUPON_AMOUNT_OFF and max_off:
            off = min(off, max_off)
        if not off:
            return L.R_COUPON_NOT_APPLICABLE, 0, 0
        left = off
        for k in eligible:
            share = min(left, line_paid[k])
            line_paid[k] -= share
            items[k][4] += share
            left -= share
        return L.R_OK, off, coupon_id

    def rate(self, tier: int, code: int) -> int:
        return self.rates[tier * L.MAX_CATEGORIES + code]

    def per_unit(self, tier: int, code: int) -> int:
        return self.per_units[tier * L.MAX_CATEGORIES + code]

    def upgrade(self, tier: int, thresholds, reached: int) -> int:
        """Rule 8: the highest tier above ``tier`` whose threshold (> 0) ``reached`` meets."""
        for t in range(self.tier_count - 1, tier, -1):
            if 0 < thresholds[t] <= reached:
                return t
        return tier

    def period_spend(self, lifetime: int, ext: "CardState") -> int:
        """Rule 8's spend, of a card that paid ``lifetime`` in all: the lifetime's, or the current
        period's while rule 11 tracks the card."""
        if self.review_days and ext.flags & L.REVIEW_STARTED:
            return lifetime - ext.period_base
        return lifetime

    def review(self, card: "Card", ext: "CardState", ts_us: int) -> tuple[int, int, int]:
        """Rule 11: (reason, the ended period's spend, the new period's first day); the card's
        tier reviewed at the end of its period, or its tracking started."""
        period, today = self.review_days, _day(ts_us)
        if not period:
            return L.R_INVALID_ARGUMENT, 0, 0
        if not ext.flags & L.REVIEW_STARTED or ext.review_period != period:
            start = review_start(_day(card.opened_us), today, period)
            ext.start_period(card, start, period)
            return L.R_OK, 0, start
        if not review_due(period, ext.flags, ext.review_day, ext.review_period, today):
            return L.R_INVALID_ARGUMENT, 0, 0  # not due: the writer never asks
        k = (today - ext.review_day) // period
        spent, top = (card.lifetime - ext.period_base, ext.top_up_max) if k == 1 else (0, 0)
        reached = next((t for t in range(self.tier_count - 1, 0, -1)
                        if 0 < self.up_spend[t] <= spent or 0 < self.up_top_up[t] <= top), 0)
        if card.tier < self.tier_count and (self.up_spend[card.tier] > 0
                                            or self.up_top_up[card.tier] > 0):
            card.tier = min(card.tier, reached)  # a tier given at opening, not earned, is kept
        start = ext.review_day + k * period
        ext.start_period(card, start, period)
        return L.R_OK, spent, start

    def best_promotion(self, ext: "CardState", amount: int,
                       ts_us: int) -> tuple[int, int, int | None]:
        """Rule 7: (promotion id, bonus, the card's use slot for it or None) of the best
        promotion for this top-up; (0, 0, None) when none applies."""
        best = (0, 0, None)
        for (pid, kind, limit, bonus_bp, low, bonus_minor, cap, starts, ends,
             _) in self.promotions:
            if not starts <= ts_us < ends or amount < low:
                continue
            if kind == L.PROMO_FIRST_TOP_UP and ext.top_up_count:
                continue
            slot_k = None
            if limit:
                slot_k = ext.slot_for(pid, {p[0] for p in self.promotions})
                if slot_k is None or (ext.ids[slot_k] == pid and ext.uses[slot_k] >= limit):
                    continue
            if kind == L.PROMO_PERCENT:
                bonus = amount * bonus_bp // 10000
                bonus = min(bonus, cap) if cap else bonus
            else:
                bonus = bonus_minor
            if bonus > best[1]:
                best = (pid, bonus, slot_k)
        return best


class CardState:
    """A card program state (layout.CARD_EXT) by name."""

    def __init__(self, fields) -> None:
        (self.version, self.flags, _, self.top_up_count, self.lifetime_top_up, *rest) = fields
        self.ids = list(rest[:L.PROMOTION_SLOTS])
        self.uses = list(rest[L.PROMOTION_SLOTS:2 * L.PROMOTION_SLOTS])
        (self.review_day, self.review_period, self.period_base, self.top_up_max,
         _) = rest[2 * L.PROMOTION_SLOTS:]

    def start_period(self, card: "Card", day: int, period_days: int) -> None:
        """Rule 11: a qualification period of ``period_days`` starts on ``day``."""
        self.version = L.CARD_EXT_VERSION
        self.flags |= L.REVIEW_STARTED
        self.review_day, self.review_period = day, period_days
        self.period_base, self.top_up_max = card.lifetime, 0

    def slot_for(self, pid: int, in_program: set[int]) -> int | None:
        """The use slot of promotion ``pid``: its own, else the first free one (id 0, or a
        promotion the program no longer has); None when all 16 are taken."""
        if pid in self.ids:
            return self.ids.index(pid)
        return next((k for k, other in enumerate(self.ids)
                     if other == 0 or other not in in_program), None)

    def top_up(self, amount: int, pid: int, slot_k: int | None) -> None:
        self.version = L.CARD_EXT_VERSION
        self.top_up_count = min(self.top_up_count + 1, 0xFFFFFFFF)
        self.lifetime_top_up += amount
        if self.flags & L.REVIEW_STARTED:
            self.top_up_max = max(self.top_up_max, amount)
        if pid and slot_k is not None:
            if self.ids[slot_k] != pid:
                self.ids[slot_k], self.uses[slot_k] = pid, 0
            self.uses[slot_k] += 1

    def take_back_top_up(self, amount: int, pid: int) -> None:
        """Rule 13: a reversed top-up's count, total and promotion use."""
        if self.top_up_count not in (0, 0xFFFFFFFF):
            self.top_up_count -= 1
        self.lifetime_top_up -= min(amount, self.lifetime_top_up)
        for k in range(L.PROMOTION_SLOTS):
            if pid and self.ids[k] == pid and self.uses[k] > 0:
                self.uses[k] -= 1
                break

    def check(self) -> None:
        if (self.version not in (0, L.CARD_EXT_VERSION) or self.lifetime_top_up < 0
                or self.period_base < 0 or self.top_up_max < 0):
            raise ValueError("card program state breaks an invariant")

    def fields(self) -> tuple:
        return (self.version, self.flags, bytes(2), self.top_up_count, self.lifetime_top_up,
                *self.ids, *self.uses, self.review_day, self.review_period, self.period_base,
                self.top_up_max,
                bytes(24))


class Card:
    """A card record's fields by name (layout.CARD order)."""

    __slots__ = ("version", "status", "tier", "pin_tries", "flags", "principal", "bonus", "points",
                 "held", "lifetime", "last_seq", "opened_us", "home_store", "birth_month",
                 "pin_check", "reserved1")

    def __init__(self, fields) -> None:
        for name, value in zip(self.__slots__, fields, strict=True):
            setattr(self, name, value)

    def fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    @property
    def expires_us(self) -> int:
        """Rule 14: the card's expiry (bytes 104..111 of the record, the first of reserved1)."""
        return L.CARD_EXPIRES.unpack_from(self.reserved1)[0]

    @expires_us.setter
    def expires_us(self, value: int) -> None:
        self.reserved1 = L.CARD_EXPIRES.pack(value) + self.reserved1[L.CARD_EXPIRES.size:]

    def check(self) -> None:
        """Invariants of a card record, checked after every read and before every write."""
        if self.version == 0:
            return
        if self.expires_us < 0 or self.status not in (*L.CARD_TRANSITIONS, 5):  # 5: replaced
            raise ValueError("card record has a negative expiry or an unknown status")
        if self.version != L.CARD_VERSION:
            raise ValueError(f"card record version {self.version} unknown")
        if min(self.principal, self.bonus, self.held, self.lifetime) < 0 or (
                self.points < -L.INT64_MAX):
            raise ValueError("card record has a negative balance")
        if self.principal + self.bonus > L.INT64_MAX:
            raise ValueError("card record principal + bonus exceeds int64")
        if self.birth_month > 12:
            raise ValueError("card record has a birth month past 12")
        if self.flags & ~(L.CARD_PIN_SET | L.CARD_PIN_LOCKED) or (
                self.flags & L.CARD_PIN_LOCKED and not self.flags & L.CARD_PIN_SET):
            raise ValueError("card record has unknown or inconsistent PIN flags")
