"""``cardcore verify``: the ledger checked against its journal, entry by entry."""
from __future__ import annotations

from cardcore import layout as L
from cardcore.idempotency import request_tag


def verify(ledger, problems_max: int = 50) -> dict:
    """Check the ledger against its journal; return counts, totals and problems.

    Each entry must mean what its type says (an opening moves nothing, a
    top-up adds its amount to principal, a purchase takes gross - discount
    from principal and bonus and adds points); sequences run 1, 2, 3, ...
    with no gap; each entry's after-balances equal the running sums, which
    never go negative; every card's principal, bonus, points, lifetime paid
    and last sequence equal what its entries add up to; every applied
    request record points at the entry with its request tag, and declined
    ones at none; the totals match.
    """
    problems: list[str] = []

    def problem(msg: str) -> None:
        if len(problems) < problems_max:
            problems.append(msg)

    # card id -> principal, bonus, points, last seq, paid, PIN state (tries | flags << 8)
    sums: dict[bytes, list[int]] = {}
    totals = [0, 0, 0]
    admin = 0
    expect_seq = 1
    with ledger._resize_gate, ledger.env.begin() as txn:  # verify runs in its own process
        for key, entry in txn.cursor(db=ledger.journal):
            (version, op, _, _, reason, pin_tries, pin_flags, seq, cid, amount, discount, dp, db_, dpts, pa, ba,
             ptsa, *_rest) = L.JOURNAL.unpack(entry)
            if L.SEQ_KEY.unpack(key)[0] != seq or seq != expect_seq:
                problem(f"journal sequence {seq} where {expect_seq} was expected")
            expect_seq = seq + 1
            if version != L.JOURNAL_VERSION or reason != (
                    L.R_PIN_WRONG if op == L.OP_PIN_FAILED else L.R_OK):
                problem(f"journal entry {seq}: version {version}, reason {reason}")
            if op >= L.OP_ADMIN_MIN:
                admin += 1
                if op > L.OP_DATA_KEY_ROTATED or amount or discount or dp or db_ or dpts:
                    problem(f"journal entry {seq}: an admin entry {op} that moves value")
                continue
            s = sums.get(cid)
            if op == L.OP_OPEN:
                if s is not None:
                    problem(f"journal entry {seq}: a second opening of the same card")
                if amount or discount or dp or db_ or dpts:
                    problem(f"journal entry {seq}: an opening that moves value")
                s = sums[cid] = [0, 0, 0, 0, 0, 0]
            elif s is None:
                problem(f"journal entry {seq}: first entry of a card is not an opening")
                s = sums[cid] = [0, 0, 0, 0, 0, 0]
            elif op == L.OP_TOP_UP:
                if amount <= 0 or dp != amount or db_ or dpts or discount:
                    problem(f"journal entry {seq}: a top-up that does not add its amount")
            elif op == L.OP_PURCHASE:
                paid = amount - discount
                if (amount <= 0 or not 0 <= discount <= amount or dp > 0 or db_ > 0
                        or dp + db_ != -paid or dpts < 0):
                    problem(f"journal entry {seq}: a purchase whose debit is not gross - discount")
                s[4] += paid
            elif op in (L.OP_SET_PIN, L.OP_RESET_PIN, L.OP_PIN_FAILED):
                if amount or discount or dp or db_ or dpts:
                    problem(f"journal entry {seq}: a PIN entry that moves value")
            else:
                problem(f"journal entry {seq}: unknown operation type {op}")
            s[0] += dp
            s[1] += db_
            s[2] += dpts
            s[3] = seq
            s[5] = pin_tries | pin_flags << 8
            totals[0] += dp
            totals[1] += db_
            totals[2] += dpts
            if (s[0], s[1], s[2]) != (pa, ba, ptsa):
                problem(f"journal entry {seq}: after-balances differ from the running sums")
            if min(s[0], s[1], s[2]) < 0:
                problem(f"journal entry {seq}: a balance below zero")
        card_totals = [0, 0, 0]
        cards = 0
        for cid, raw in txn.cursor(db=ledger.cards):
            cards += 1
            rec = L.CARD.unpack(raw)
            principal, bonus, points, held, lifetime, last_seq = rec[5:11]
            card_totals[0] += principal
            card_totals[1] += bonus
            card_totals[2] += points
            s = sums.pop(cid, None)
            if rec[0] != L.CARD_VERSION or min(principal, bonus, points) < 0 or held != 0:
                problem(f"card ...{cid.hex()[:8]}: invalid record (no holds exist yet)")
            if s is None:
                problem(f"card ...{cid.hex()[:8]}: no journal entries")
            elif (principal, bonus, points, last_seq, lifetime, rec[3] | (rec[4] & 0xFF) << 8) != tuple(s):
                problem(f"card ...{cid.hex()[:8]}: record {principal}/{bonus}/{points}/#{last_seq}"
                        f"/paid {lifetime} but journal adds up to {s[0]}/{s[1]}/{s[2]}/#{s[3]}"
                        f"/paid {s[4]}")
        for cid in sums:
            problem(f"journal names card ...{cid.hex()[:8]} that has no record")
        requests = journaled = 0
        for key, idem in txn.cursor(db=ledger.requests):
            requests += 1
            _, _, reason, _, _, seq, _, _ = L.IDEM.unpack(idem)
            if reason in (L.R_OK, L.R_PIN_WRONG):  # applied, or a wrong PIN counted
                journaled += 1
                entry = txn.get(L.SEQ_KEY.pack(seq), db=ledger.journal)
                if entry is None or entry[120:128] != request_tag(key):
                    problem(f"request record for seq {seq} does not match its journal entry")
            elif seq != 0:
                problem(f"a declined request record points at journal entry {seq}")
        if journaled != expect_seq - 1:
            problem(f"{journaled} request records with a journal entry for {expect_seq - 1} "
                    "journal entries")
    if card_totals != totals:
        problem(f"card totals {card_totals} differ from journal totals {totals}")
    return {
        "ok": not problems,
        "cards": cards,
        "journal_entries": expect_seq - 1,
        "admin_entries": admin,
        "card_entries": expect_seq - 1 - admin,
        "requests": requests,
        "principal_minor": card_totals[0],
        "bonus_minor": card_totals[1],
        "points": card_totals[2],
        "problems": problems,
    }
