"""``cardcore verify``: the ledger checked against its journal, entry by entry.

What is checked (each broken rule is one problem, up to ``problems_max``):

- the journal: sequences run 1, 2, 3, ... with no gap; every entry is v2; its
  digest is SHA-256(the previous digest | its first 224 bytes), so a flipped
  bit or a forged entry is found where it is; times never go back;
- every entry means what its type says: an opening moves nothing, a top-up
  adds its amount to principal, a purchase takes gross - discount from
  principal and bonus and adds points, admin and PIN entries move nothing;
  and, under the program version the entry names (0: migrated from v1, not
  recomputed), the purchase's discount and points are recomputed with the
  rules of that version; each entry names the version current at its place
  in the journal;
- the running sums: each entry's after-balances equal them and never go
  negative; every card's principal, bonus, points, lifetime paid, last
  sequence and PIN state equal what its entries add up to; the totals match;
- the request records: applied ones point at the entry carrying their
  request tag, declined ones at none; each has exactly one place in the
  pruning index;
- the stored programs are whole (their SHA-256), the current one is the
  newest, and the tier counts equal the cards' tiers.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter

from cardcore import layout as L
from cardcore.admin import META_PROGRAM, META_TIER_CARDS, TIER_CARDS, U32
from cardcore.chain import GENESIS, link
from cardcore.idempotency import request_tag, unpack_request_keys
from cardcore.program import ProgramError, parse_program
from cardcore.rules import paid_minor, points_earned

_MOVES = slice(9, 14)  # amount, discount, principal, bonus and points deltas (JOURNAL_V1 fields)


def verify(ledger, problems_max: int = 50) -> dict:
    problems: list[str] = []

    def problem(msg: str) -> None:
        if len(problems) < problems_max:
            problems.append(msg)

    with ledger._resize_gate, ledger.env.begin() as txn:  # verify runs in its own process
        programs = _programs(txn, ledger, problem)
        journal = _journal(txn, ledger, programs, problem)
        cards = _cards(txn, ledger, journal["sums"], problem)
        requests = _requests(txn, ledger, problem)
        current = txn.get(META_PROGRAM, db=ledger.meta)
        if programs and (current is None or U32.unpack(current)[0] != max(programs)):
            problem("the current program is not the newest stored version")
    if cards["totals"] != journal["totals"]:
        problem(f"card totals {cards['totals']} differ from journal totals {journal['totals']}")
    entries = journal["entries"]
    return {
        "ok": not problems,
        "cards": cards["count"],
        "journal_entries": entries,
        "admin_entries": journal["admin"],
        "card_entries": entries - journal["admin"],
        "requests": requests,
        "principal_minor": cards["totals"][0],
        "bonus_minor": cards["totals"][1],
        "points": cards["totals"][2],
        "program_version": max(programs, default=0),
        "head_digest": journal["head_digest"].hex(),
        "problems": problems,
    }


def _programs(txn, ledger, problem) -> dict[int, tuple]:
    """version -> (the program, the first 12 bytes of its document's SHA-256, as the journal's
    load entry must name them)."""
    out = {}
    for key, raw in txn.cursor(db=ledger.programs):
        version = L.VERSION_KEY.unpack(key)[0]
        rec = json.loads(raw)
        digest = hashlib.sha256(rec["source"].encode()).digest()
        if digest.hex() != rec["sha256"]:
            problem(f"program version {version}: its document does not match its SHA-256")
        try:
            out[version] = (parse_program(rec["source"]), digest[:12])
        except ProgramError as exc:
            problem(f"program version {version} does not parse: {exc}")
    if sorted(out) != list(range(1, len(out) + 1)):
        problem(f"program versions {sorted(out)} are not 1, 2, 3, ...")
    return out


def _journal(txn, ledger, programs: dict, problem) -> dict:
    # card id -> principal, bonus, points, last seq, paid, PIN state (tries | flags << 8)
    sums: dict[bytes, list[int]] = {}
    totals = [0, 0, 0]
    admin = 0
    expect_seq = 1
    last_digest = GENESIS
    last_ts = 0
    program_now = 0   # the version the next entry must name (0 until a program is loaded)
    for key, entry in txn.cursor(db=ledger.journal):
        f = L.JOURNAL.unpack(entry)
        (version, op, tier, _, reason, pin_tries, pin_flags, seq, cid, amount, discount, dp, db_,
         dpts, pa, ba, ptsa, ts_us) = f[:18]
        program_version = f[23]
        if L.SEQ_KEY.unpack(key)[0] != seq or seq != expect_seq:
            problem(f"journal sequence {seq} where {expect_seq} was expected")
        expect_seq = seq + 1
        stored_digest = entry[L.JOURNAL_DIGEST_OFFSET:]
        if link(last_digest, entry[:L.JOURNAL_DIGEST_OFFSET]) != stored_digest:
            problem(f"journal entry {seq}: its digest does not chain (changed or forged)")
        last_digest = stored_digest
        if program_version:  # release 1 took the wall clock as it was: migrated entries are exempt
            if ts_us < last_ts:
                problem(f"journal entry {seq}: its time goes back")
            last_ts = ts_us
        if version != L.JOURNAL_VERSION or reason != (
                L.R_PIN_WRONG if op == L.OP_PIN_FAILED else L.R_OK):
            problem(f"journal entry {seq}: version {version}, reason {reason}")
        if op == L.OP_PROGRAM_LOADED:
            program_now += 1
            stored = programs.get(program_now)
            if (int.from_bytes(cid[:4], "little") != program_now or stored is None
                    or stored[1] != cid[4:16]):
                problem(f"journal entry {seq}: program version {program_now} as loaded differs "
                        "from the stored document (changed or forged)")
        if program_version != program_now and not (program_version == 0 and program_now == 0):
            problem(f"journal entry {seq}: program version {program_version} where "
                    f"{program_now} was current")
        if op >= L.OP_ADMIN_MIN:
            admin += 1
            if op > L.OP_ADMIN_MAX or any(f[_MOVES]):
                problem(f"journal entry {seq}: an admin entry {op} that moves value")
            continue
        s = sums.get(cid)
        if op == L.OP_OPEN:
            if s is not None:
                problem(f"journal entry {seq}: a second opening of the same card")
            if any(f[_MOVES]):
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
            program = programs.get(program_version, (None,))[0]
            if program is not None and amount > 0:
                if tier >= len(program.tiers):
                    problem(f"journal entry {seq}: tier {tier} is not in program "
                            f"version {program_version}")
                else:
                    expect_paid = paid_minor(amount, program.tiers[tier].rate_bp)
                    expect_points = points_earned(expect_paid, program.points_unit_minor,
                                                  program.points_per_unit)
                    if (paid, dpts) != (expect_paid, expect_points):
                        problem(f"journal entry {seq}: paid {paid} and {dpts} points, but program "
                                f"version {program_version} gives {expect_paid} and "
                                f"{expect_points}")
            s[4] += paid
        elif op in (L.OP_SET_PIN, L.OP_RESET_PIN, L.OP_PIN_FAILED):
            if any(f[_MOVES]):
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
    return {"sums": sums, "totals": totals, "admin": admin, "entries": expect_seq - 1,
            "head_digest": last_digest}


def _cards(txn, ledger, sums: dict, problem) -> dict:
    totals = [0, 0, 0]
    count = 0
    tiers: Counter = Counter()
    for cid, raw in txn.cursor(db=ledger.cards):
        count += 1
        rec = L.CARD.unpack(raw)
        principal, bonus, points, held, lifetime, last_seq = rec[5:11]
        tiers[rec[2]] += 1
        totals[0] += principal
        totals[1] += bonus
        totals[2] += points
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
    raw = txn.get(META_TIER_CARDS, db=ledger.meta)
    counted = list(TIER_CARDS.unpack(raw)) if raw else [0] * L.MAX_TIERS
    if counted != [tiers[t] for t in range(L.MAX_TIERS)]:
        problem(f"tier counts {counted} differ from the cards' tiers {dict(tiers)}")
    return {"count": count, "totals": totals}


def _requests(txn, ledger, problem) -> int:
    count = 0
    for key, idem in txn.cursor(db=ledger.requests):
        count += 1
        version, _, reason, _, _, seq, *_ = L.IDEM.unpack(idem)
        if version != L.IDEM_VERSION:
            problem(f"a request record of version {version}")
        # release 1 tagged entries with the bare request_id
        tag = request_tag(key[L.REQUEST_KEY_HEAD.size:] if key[0] == L.CALLER_LEGACY else key)
        if reason in (L.R_OK, L.R_PIN_WRONG):  # applied, or a wrong PIN counted
            entry = txn.get(L.SEQ_KEY.pack(seq), db=ledger.journal)
            if entry is None or entry[L.JOURNAL_OFF_TAG:L.JOURNAL_OFF_TAG + 8] != tag:
                problem(f"request record for seq {seq} does not match its journal entry")
        elif seq != 0:
            problem(f"a declined request record points at journal entry {seq}")
    indexed = Counter(key for _, value in txn.cursor(db=ledger.request_times)
                      for key in unpack_request_keys(value))
    if sum(indexed.values()) != count or any(n != 1 for n in indexed.values()) or any(
            txn.get(k, db=ledger.requests) is None for k in indexed):
        problem("the request time index does not match the request records one to one")
    return count
