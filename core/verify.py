"""``cardcore verify``: the ledger checked against its journal, entry by entry.

What is checked (each broken rule is one problem, up to ``problems_max``):

- the journal: sequences run 1, 2, 3, ... with no gap; every entry is v2; its
  digest is SHA-256(the previous digest | its first 224 bytes), so a flipped
  bit or a forged entry is found where it is; times never go back;
- every entry means what its type says: an opening moves nothing, a top-up
  adds its amount to principal and its promotion's bonus to bonus, a purchase
  takes what is due from principal and bonus and moves points, admin and PIN
  entries move nothing; and, under the program version the entry names (0:
  migrated from v1, not recomputed), each top-up and purchase is recomputed
  with the reference arithmetic of that version from the card's state as the
  journal leaves it before the entry: the promotion chosen and its bonus, each
  line's discount, redeemed share and points (the stored lines), the spend
  order's split, the tier it was computed with and any upgrade; each entry
  names the version current at its place in the journal;
- an import (rule 18) opens its card active, without a PIN, at a tier of its program, with its
  principal (its amount), bonus and points in, each >= 0, and nothing else;
- the running sums: each entry's after-balances equal them and never go
  negative; every card's principal, bonus, points, lifetime paid, last
  sequence and PIN state equal what its entries add up to; the totals match;
- the request records: applied ones point at the entry carrying their
  request tag, declined ones at none; each has exactly one place in the
  pruning index;
- the stored programs are whole (their SHA-256), the current one is the
  newest, and the tier counts equal the cards' tiers;
- holds (rule 15): each authorization holds at most what its card had available,
  for 1..HOLD_MINUTES_MAX whole minutes, moving no money; each capture, void,
  release and reversal closes an open hold of its card once (a capture before
  the expiry, paying at most its amount; a release at or after it); every
  card's held_minor is what its open holds add up to; the hold records and
  their expiry index are what the journal makes; no card is closed holding any;
- the member index (rule 17), given the lookup key (the server's keyring): exactly the keys
  the stored profiles make, so a tampered, forged or missing entry is found. Without the key
  the report says it was not checked.
- card life (rule 14): every status change is one rule 14 allows from the status the journal
  left (an opening active or issued, the activation points with becoming active, once); each
  card's expiry is what its opening's program gives at the opening's time; nothing but a
  closing (and the server's change to expired, at or after the expiry, operator 0) happens to
  a card past its expiry but refunds and what any status allows; the expiry index names
  exactly the cards with an expiry in a status they expire from.
- the day totals (``cardcore.daytotals``): every store's day, the chain's, the clearing, the
  staff figures, the homes of the money and the closed days are what the journal's entries
  make, computed again from nothing (once they hold every entry: a writer fills them).
- the member metrics (``cardcore.members``): every member's record, month, day and last
  purchase index are what the journal's entries make, computed again from nothing (likewise).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter

from cardcore import daytotals
from cardcore import members as member_metrics
from cardcore import layout as L
from cardcore import lots
from cardcore import stores
from cardcore.shards import SHARD_NUMBER_MAX
from cardcore.admin import META_PROGRAM, META_TIER_CARDS, TIER_CARDS, U32
from cardcore.chain import GENESIS, link
from cardcore.idempotency import lines_digest, referrer_tag, request_tag, unpack_request_keys
from cardcore.ledger import (EMPTY_LINE_REFUNDS, META_MEMBERS, PREDECESSOR, SUCCESSOR,
                             history_items, hold_index_key, issued_coupon, lines_refunded,
                             linked, profile_month, refund_input_lines, refund_stored_lines,
                             sold_package, undo_record)
from cardcore.lookup import MemberIndex
from cardcore.profiles import ProfileError, masked_of
from cardcore.program import ProgramError, parse_program
from cardcore.reference import (Card, CardState, CompiledProgram, give_back, purchase,
                                refund_lines)
from cardcore.rules import card_expiry_us, expired, spend

_MOVES = slice(9, 14)  # amount, discount, principal, bonus and points deltas (JOURNAL_V1 fields)
# Rule 14: what only an active card does (the kernel's "card active" check comes before them).
_OWN_STATUS = frozenset((L.OP_OPEN, L.OP_IMPORT_CARD, L.OP_CARD_STATUS, L.OP_CARD_REPLACED,
                         L.OP_REPLACEMENT_OPENED))  # entries that set the card's status
_NOT_LOTS = frozenset((L.OP_PIN_FAILED, L.OP_CARD_REPLACED, L.OP_REPLACEMENT_OPENED))


_ACTIVE_ONLY = frozenset((L.OP_TOP_UP, L.OP_PURCHASE, L.OP_SET_PIN, L.OP_COUPON_ISSUE,
                          L.OP_PACKAGE_SELL, L.OP_PACKAGE_USE, L.OP_POINTS_EXCHANGE,
                          L.OP_GIFT_REDEEM, L.OP_REFERRAL_BONUS, L.OP_REFUND, L.OP_HOLD))
_MINUTE_US = 60_000_000


def verify(ledger, problems_max: int = 50, lookup_key: bytes | None = None) -> dict:
    problems: list[str] = []
    index = MemberIndex(lookup_key) if lookup_key is not None else ledger.member_index

    def problem(msg: str) -> None:
        if len(problems) < problems_max:
            problems.append(msg)

    with ledger._resize_gate, ledger.env.begin() as txn:  # verify runs in its own process
        programs = _programs(txn, ledger, problem)
        journal = _journal(txn, ledger, programs, problem)
        cards = _cards(txn, ledger, journal["sums"], journal["statuses"], journal["held"],
                       journal["expiries"], problem)
        if ledger.cards_by_expiry is not None and {
                k for k, _ in txn.cursor(db=ledger.cards_by_expiry)} != {
                L.CARD_EXPIRY_KEY.pack(exp, cid) for cid, exp in journal["expiries"].items()
                if exp and journal["statuses"].get(cid, L.STATUS_ACTIVE) in L.STATUSES_LIVE}:
            problem("the cards' expiry index does not name exactly the cards that will expire")
        if ledger.holds is not None and ledger.holds_by_expiry is not None:
            rebuilt_holds = {k: L.HOLD.pack(*v) for k, v in journal["holds"].items()}
            if dict(txn.cursor(db=ledger.holds)) != rebuilt_holds:
                problem("the hold records are not what the journal's authorizations and what "
                        "closed them make")
            if {k for k, _ in txn.cursor(db=ledger.holds_by_expiry)} != {
                    hold_index_key(k[:L.CARD_ID_SIZE], rebuilt_holds[k])
                    for k, v in journal["holds"].items() if v[1] == L.HOLD_OPEN}:
                problem("the holds' expiry index does not name exactly the open holds")
        # A sub-database the card programs added is missing only in a ledger no writer of this
        # release has opened yet (a read-only look at an older one): what the writer would
        # build there on its first open is not checked.
        if ledger.card_ext is not None:
            _states(txn, ledger, journal["states"], problem)
        if ledger.gift_stock is not None and dict(txn.cursor(db=ledger.gift_stock)) != {
                L.GIFT_KEY.pack(g): L.GIFT.pack(L.GIFT_VERSION, g, 0, n, bytes(48))
                for g, n in journal["gifts"].items()}:
            problem("the gifts' stock records are not what the journal's redemptions make")
        rebuilt_lots = journal["lots"].records()
        if ledger.points_lots is not None and ledger.lots_by_day is not None:
            stored_lots = dict(txn.cursor(db=ledger.points_lots))
            if stored_lots != rebuilt_lots:
                problem(f"points lots: {len(stored_lots)} stored, not the {len(rebuilt_lots)} "
                        "the journal makes")
            if {k for k, _ in txn.cursor(db=ledger.lots_by_day)} != {
                    L.LOT_DAY_KEY.pack(day, cid)
                    for cid, day in (L.LOT_KEY.unpack(k) for k in rebuilt_lots)}:
                problem("the lots' expiry index does not name exactly the lots")
        for name, layout in (("coupons", L.COUPON), ("packages", L.PACKAGE)):
            db = getattr(ledger, name)
            if db is None:
                continue
            stored = dict(txn.cursor(db=db))
            rebuilt = {k: layout.pack(*v) for k, v in journal[name].items()}
            for k in set(stored) | set(rebuilt):
                if stored.get(k) != rebuilt.get(k):
                    problem(f"{name[:-1]} ...{k[:4].hex()}/{L.COUPON_KEY.unpack(k)[1]}: not what "
                            "the journal's entries for it make")
        if ledger.card_entries is not None and dict(txn.cursor(db=ledger.card_entries)) != dict(
                history_items(entry for _, entry in txn.cursor(db=ledger.journal))):
            problem("the cards' history index does not name exactly the cards' journal entries")
        if ledger.card_links is not None and dict(txn.cursor(db=ledger.card_links)) != journal[
                "links"]:
            problem("the card links are not the replacements the journal made")
        if ledger.undone is not None and dict(txn.cursor(db=ledger.undone)) != {
                k: L.UNDO.pack(*v) for k, v in journal["undone"].items()}:
            problem("the undo records are not what the journal's refunds and reversals make")
        if ledger.refunded_lines is not None and dict(txn.cursor(db=ledger.refunded_lines)) != \
                journal["refunded_lines"]:
            problem("the sales' line refunds records are not what the journal's refunds by line "
                    "make")
        # records of an older version are filled again when a writer opens the ledger
        if ledger.day_totals is not None and txn.get(daytotals.META_DAY_TOTALS,
                                                     db=ledger.meta) == daytotals.DAY_TOTALS_FILLED:
            for name in daytotals.check(txn, ledger):
                problem(f"the day totals' {name} are not what the journal's entries make")
        if ledger.member_cards is not None and txn.get(member_metrics.META_MEMBER_METRICS,
                                                       db=ledger.meta) is not None:
            for name in member_metrics.check(txn, ledger):
                problem(f"the member metrics' {name} are not what the journal's entries make")
        for text in stores.check(txn, ledger):
            problem(text)
        requests = _requests(txn, ledger, problem)
        members = _members(txn, ledger, index, problem)
        profiles_checked = _profiles(txn, ledger, problem)
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
        "member_index": members,
        "profiles": profiles_checked,
        "problems": problems,
    }


def _profiles(txn, ledger, problem) -> str:
    """Every sealed profile opens under its own card, to the masked number its clear head shows
    (a profile moved or planted from another card does not). Says what was checked."""
    box = ledger.profile_box
    if not box.keyed:
        return "not checked: no profile key (give verify the keyring)"
    count = bad = 0
    for cid, raw in txn.cursor(db=ledger.profiles):
        if not box.is_sealed(raw):
            continue  # JSON from before sealing: the first writer with the key seals it
        count += 1
        try:
            if box.open(cid, raw).get("masked", "") != masked_of(raw):
                bad += 1
        except (ProfileError, ValueError):
            bad += 1
    if bad:
        problem(f"{bad} of {count} sealed profiles do not open under their card, or open to "
                "another masked number than their clear one")
        return "checked: differs"
    return f"checked: {count} sealed"


def _members(txn, ledger, index: MemberIndex | None, problem) -> str:
    """Rule 17: the member index is exactly what the profiles make. Says what was checked."""
    if index is None:
        return "not checked: no lookup key (give verify the keyring)"
    if ledger.members is None or txn.get(META_MEMBERS, db=ledger.meta) is None:
        return "not checked: not built yet (the server's writer builds it when it starts)"
    if not ledger.profile_box.keyed:
        return "not checked: no profile key (give verify the keyring)"
    expected = {k for k, _ in index.items((cid, ledger.open_profile(cid, raw))
                                          for cid, raw in txn.cursor(db=ledger.profiles))}
    stored = set(txn.cursor(db=ledger.members).iternext(values=False))
    if stored != expected:
        problem(f"the member index does not name exactly the profiles' phones and names: "
                f"{len(stored - expected)} keys no profile makes, {len(expected - stored)} "
                "missing")
        return "checked: differs"
    return f"checked: {len(stored)} keys"


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


def _outbox(txn, ledger, programs: dict, opens: dict, referred: set, problem) -> None:
    """Each outbox record (layout.OUTBOX: a referral bonus owed to another card shard, not yet
    delivered) names an opening of this journal on a referral by that card, whose bonus this
    shard did not give itself, for points its program gives."""
    cur = txn.cursor(db=ledger.meta)
    if not cur.set_range(L.OUTBOX_KEY_PREFIX):
        return
    given = {p.referral_points for p, _ in programs.values()}  # (by some program version)
    for key, value in cur:
        if not key.startswith(L.OUTBOX_KEY_PREFIX):
            break
        version, kind, seq, referrer, points, _ = L.OUTBOX.unpack(value)
        opened_card, opened_ref = opens.get(seq, (None, 0))
        if (version != L.OUTBOX_VERSION or kind != L.OUTBOX_REFERRAL or len(key) != len(
                L.OUTBOX_KEY_PREFIX) + 8 or L.OUTBOX_KEY.unpack_from(key, len(
                L.OUTBOX_KEY_PREFIX))[0] != seq or opened_card is None or opened_card == referrer
                or opened_ref != referrer_tag(referrer) or seq in referred or points <= 0
                or points not in given):
            problem(f"outbox record of journal entry {seq}: not a referral bonus an opening "
                    "there owes another card shard")


def _forwards(txn, ledger, journaled: dict, problem) -> None:
    """The card numbers this card shard forwarded (layout.FORWARD): each once, numbered 1, 2,
    ... in the order index; none a card this shard holds or ever journaled."""
    cur = txn.cursor(db=ledger.meta)
    forwarded: dict[bytes, int] = {}
    if cur.set_range(L.FORWARD_KEY_PREFIX):
        for key, value in cur:
            if not key.startswith(L.FORWARD_KEY_PREFIX):
                break
            card = key[len(L.FORWARD_KEY_PREFIX):]
            version, shard, n = (L.FORWARD.unpack(value) if len(value) == L.FORWARD.size
                                 else (0, 0, 0))
            if (version != L.FORWARD_VERSION or len(card) != L.CARD_ID_SIZE or value[1] or
                    value[4:8] != bytes(4) or shard > SHARD_NUMBER_MAX):
                problem(f"forward record {card.hex()}: not one")
            elif card in journaled or txn.get(card, db=ledger.cards) is not None:
                problem(f"card {card.hex()}: forwarded to another shard, and held here")
            forwarded[card] = n
    order = {}
    if cur.set_range(L.FORWARDS_KEY_PREFIX):
        for key, card in cur:
            if not key.startswith(L.FORWARDS_KEY_PREFIX):
                break
            order[L.FORWARDS_KEY.unpack(key[len(L.FORWARDS_KEY_PREFIX):])[0]] = card
    if order != {n: card for card, n in forwarded.items()} or sorted(order) != list(
            range(1, len(order) + 1)):
        problem("the forwarded card numbers' order index is not theirs, numbered from 1")


def _journal(txn, ledger, programs: dict, problem) -> dict:
    # card id -> principal, bonus, points, last seq, paid, PIN state (tries | flags << 8)
    sums: dict[bytes, list[int]] = {}
    totals = [0, 0, 0]
    admin = 0
    expect_seq = 1
    last_digest = GENESIS
    last_ts = 0
    program_now = 0   # the version the next entry must name (0 until a program is loaded)
    compiled: dict[int, CompiledProgram] = {}
    coupons: dict[bytes, tuple] = {}  # coupon key -> the record the journal rebuilds
    packages: dict[bytes, tuple] = {}  # likewise for packages
    point_lots = lots.DictLots()       # every card's points lots, as the journal makes them
    gifts_given: dict[int, int] = {}   # gift id -> how many the journal gave
    opens: dict[int, tuple] = {}       # an opening's seq -> (its card, its referrer's tag)
    referred: set[int] = set()         # openings whose referrer got its bonus (once)
    referred_elsewhere: set[tuple] = set()  # likewise, (shard + 1, seq) on other card shards
    lot_rule = lots.Lots(point_lots)
    states: dict[bytes, CardState] = {}  # card id -> its program state as the journal rebuilds it
    opened_us: dict[bytes, int] = {}     # card id -> its opening's time (rule 11's periods)
    undone: dict[bytes, list] = {}       # an entry's undo record as refunds and reversals leave it
    refunded: dict[bytes, bytes] = {}    # a sale's line refunds record, as refunds by line leave it
    statuses: dict[bytes, int] = {}      # card id -> its status, where rule 14 changed it
    expiries: dict[bytes, int] = {}      # card id -> its expiry (rule 14), from its opening
    holds: dict[bytes, list] = {}        # hold key -> its record (layout.HOLD) as rebuilt
    held: dict[bytes, int] = {}          # card id -> what its open holds hold
    replaced: tuple | None = None        # rule 16: the last CARD_REPLACED entry (card, seq, f)
    links: dict[bytes, bytes] = {}       # card_links as the replacements make them

    def state_of(cid: bytes) -> CardState:
        state = states.get(cid)
        if state is None:
            state = states[cid] = CardState(L.CARD_EXT.unpack(bytes(L.CARD_EXT_SIZE)))
        return state

    def compiled_of(version: int) -> CompiledProgram | None:
        program = programs.get(version, (None,))[0]
        if program is None:
            return None
        if version not in compiled:
            compiled[version] = CompiledProgram(program.packed(version))
        return compiled[version]
    for key, entry in txn.cursor(db=ledger.journal):
        f = L.JOURNAL.unpack(entry)
        taken, redeemed, tier_after, line_count, promotion_id = L.JOURNAL_PROGRAM.unpack_from(
            entry, L.JOURNAL_OFF_PROGRAM)
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
        if op in L.ADMIN_OPS:
            admin += 1
            if any(f[_MOVES]):
                problem(f"journal entry {seq}: an admin entry {op} that moves value")
            continue
        s = sums.get(cid)
        status_now = statuses.get(cid, L.STATUS_ACTIVE)
        lapsed = expired(expiries.get(cid, 0), ts_us)  # rule 14: past its expiry
        ended = status_now == L.STATUS_EXPIRED or (lapsed and status_now in L.STATUSES_LIVE)
        if (op in _ACTIVE_ONLY and (status_now != L.STATUS_ACTIVE or lapsed)
                and not (op == L.OP_REFUND and ended)) or (
                op == L.OP_REVERSAL and status_now == L.STATUS_CLOSED):
            problem(f"journal entry {seq}: type {op} on a card whose status is {status_now}")
        if op not in _OWN_STATUS and f[3] != status_now:
            problem(f"journal entry {seq}: status {f[3]} where the card's is {status_now}")
        if op in L.OPENINGS:
            if s is not None:
                problem(f"journal entry {seq}: a second opening of the same card")
            opened_with = programs.get(program_version, (None,))[0]
            active = f[3] == L.STATUS_ACTIVE  # an issued card gets its points when activated
            if op == L.OP_IMPORT_CARD:
                why = _import_problem(opened_with, f)
                if why:
                    problem(f"journal entry {seq}: {why}")
            elif any(f[9:13]) or dpts != (opened_with.activation_points if opened_with and active
                                          else 0) or f[3] not in (L.STATUS_ACTIVE, L.STATUS_ISSUED):
                problem(f"journal entry {seq}: an opening that moves value (beyond the "
                        "program's activation points), or opens it neither active nor issued")
            statuses[cid] = f[3]
            expiries[cid] = card_expiry_us(ts_us, opened_with.card_valid_months,
                                           opened_with.utc_offset_minutes) if opened_with else 0
            s = sums[cid] = [0, 0, 0, 0, 0, 0, tier, 0]
            opens[seq] = (cid, f[29])
            opened_us[cid] = ts_us
            if opened_with is not None and opened_with.tier_review_days:
                state_of(cid).start_period(Card(_card_at(tier, s, ts_us)), lots.day_of(ts_us),
                                           opened_with.tier_review_days)
        elif op == L.OP_REPLACEMENT_OPENED:  # rule 16: right after its card's CARD_REPLACED
            old = replaced[0] if replaced is not None and replaced[1] == seq - 1 else None
            if s is not None or old is None or f[28] != seq - 1 or f[3] != L.STATUS_ACTIVE or (
                    f[9:14] != (replaced[2][9], 0, -replaced[2][11], -replaced[2][12],
                                -replaced[2][13])) or tier != replaced[2][2] or tier_after != tier:
                problem(f"journal entry {seq}: a replacement's opening that is not the mirror of "
                        "the entry before it")
            s_old = sums.get(old, [0] * 8)
            s = sums[cid] = [0, 0, 0, 0, s_old[4], 0, tier, s_old[7]]
            program = programs.get(program_version, (None,))[0]  # a new card: its own expiry
            expiries[cid] = card_expiry_us(ts_us, program.card_valid_months,
                                           program.utc_offset_minutes) if program else 0
            if old is not None:
                opened_us[cid] = opened_us.get(old, 0)
                if old in states:
                    states[cid] = states.pop(old)
                for items in (coupons, packages):
                    for k in [k for k in items if k[:L.CARD_ID_SIZE] == old]:
                        items[cid + k[L.CARD_ID_SIZE:]] = items.pop(k)
                lot_rule.move(old, cid)
                links[SUCCESSOR + old], links[PREDECESSOR + cid] = cid, old
            replaced = None
        elif s is None:
            problem(f"journal entry {seq}: first entry of a card is not an opening")
            s = sums[cid] = [0, 0, 0, 0, 0, 0, tier, 0]
        elif program_version and tier != s[6]:
            problem(f"journal entry {seq}: computed at tier {tier}, but the card was at {s[6]}")
        # Every entry carries the card's birth month: set at opening, or once by the upgrade
        # that filled older cards' from their profiles (entries before it say 0); never changed.
        month = entry[L.JOURNAL_OFF_BIRTH_MONTH]
        if month != s[7]:
            if s[7] or month > 12:
                problem(f"journal entry {seq}: birth month {month} where the card had {s[7]}")
            s[7] = month
        if op in (L.OP_TOP_UP, L.OP_PURCHASE, L.OP_COUPON_ISSUE, L.OP_PACKAGE_SELL,
                  L.OP_PACKAGE_USE):
            program = programs.get(program_version, (None,))[0]
            prog = compiled_of(program_version)
            state = state_of(cid)
            if op == L.OP_TOP_UP:
                why = _top_up_problem(prog, state, f, tier_after, promotion_id)
            elif op == L.OP_PACKAGE_SELL:
                why = _sale_problem(program, prog, s, f, promotion_id, tier_after, state)
                if why is None and program is not None:
                    k, value = sold_package(program, cid, entry)
                    packages[k] = L.PACKAGE.unpack(value)
                    s[4] += f[9]  # lifetime paid
            elif op == L.OP_PACKAGE_USE:
                k = L.COUPON_KEY.pack(cid, f[29])
                why = _use_problem(packages.get(k), f, promotion_id)
                if why is None:
                    p = list(packages[k])
                    p[3] -= p[1] == L.PACKAGE_COUNT
                    p[7], p[8] = seq, min(p[8] + 1, 0xFFFFFFFF)
                    packages[k] = tuple(p)
            elif op == L.OP_COUPON_ISSUE:
                why = _issue_problem(program, prog, f, taken, promotion_id)
                if why is None and program is not None:
                    k, value = issued_coupon(program, cid, entry)
                    coupons[k] = L.COUPON.unpack(value)
            else:
                lines = (txn.get(key, db=ledger.journal_lines) if line_count else None) or b""
                carried = entry[L.JOURNAL_OFF_LINES_DIGEST:][:L.LINES_DIGEST_SIZE]
                if carried != (lines_digest(lines) if line_count else bytes(L.LINES_DIGEST_SIZE)):
                    problem(f"journal entry {seq}: its stored lines are not the ones it carries "
                            "the digest of (changed or lost)")
                coupon_key = L.COUPON_KEY.pack(cid, f[29]) if f[29] else None
                coupon = coupons.get(coupon_key) if coupon_key else None
                if coupon_key and coupon is None:
                    coupon = L.COUPON.unpack(bytes(L.COUPON_SIZE))
                hold_key = L.COUPON_KEY.pack(cid, f[28]) if f[28] else None  # a capture's hold
                hold = holds.get(hold_key) if hold_key else None
                released = hold[4] if hold is not None else 0
                why = _purchase_problem(prog, s, f, entry, tier_after, line_count, lines, coupon,
                                        state, held.get(cid, 0), released)
                if why is None and hold_key:
                    why = _close_hold(hold, f, L.HOLD_CAPTURED, held)
                if why is None and coupon_key:  # used here: as the kernel left it
                    coupons[coupon_key] = (*coupon[:1], L.COUPON_USED, *coupon[2:7], seq,
                                           L.JOURNAL_COUPON_OFF.unpack_from(
                                               entry, L.JOURNAL_OFF_COUPON)[0], coupon[9])
            if why:
                problem(f"journal entry {seq}: {why}")
            if op == L.OP_PURCHASE:
                s[4] -= dp + db_  # lifetime paid: what purchases took from the balance
        elif op in (L.OP_SET_PIN, L.OP_RESET_PIN, L.OP_PIN_FAILED):
            if any(f[_MOVES]):
                problem(f"journal entry {seq}: a PIN entry that moves value")
        elif op == L.OP_POINTS_EXCHANGE:
            program = programs.get(program_version, (None,))[0]
            n = program.exchange_points if program else 0
            if (not n or taken <= 0 or taken % n or dpts != -taken or f[9] or f[10] or dp
                    or db_ != taken // n * program.exchange_bonus_minor):
                problem(f"journal entry {seq}: an exchange of {taken} points for {db_} bonus its "
                        "program does not give")
        elif op == L.OP_GIFT_REDEEM:
            program = programs.get(program_version, (None,))[0]
            gift = program.gift(promotion_id) if program else None
            given = gifts_given.get(promotion_id, 0)
            if (gift is None or given >= gift.stock or taken != gift.points_price
                    or dpts != -taken or any(f[9:13]) or f[29] != promotion_id):
                problem(f"journal entry {seq}: gift {promotion_id} for {taken} points that its "
                        "program and stock do not give")
            gifts_given[promotion_id] = given + 1
        elif op == L.OP_REFERRAL_BONUS and f[29]:  # for an opening on card shard f[29] - 1
            # (its seq f[28]): that shard's program gave the points, its journal the opening
            if dpts <= 0 or f[9] != dpts or any(f[10:13]) or (f[29], f[28]) in referred_elsewhere:
                problem(f"journal entry {seq}: a referral bonus for another card shard's opening "
                        "that is not positive points, or is that opening's second")
            referred_elsewhere.add((f[29], f[28]))
        elif op == L.OP_REFERRAL_BONUS:
            program = programs.get(program_version, (None,))[0]
            opened_card, opened_ref = opens.get(f[28], (None, 0))
            if (program is None or dpts != program.referral_points or dpts <= 0 or f[9] != dpts
                    or any(f[10:13]) or opened_card is None or opened_card == cid
                    or opened_ref != referrer_tag(cid) or f[28] in referred):
                problem(f"journal entry {seq}: a referral bonus its program and the opening it "
                        "names do not explain")
            referred.add(f[28])
        elif op in (L.OP_REFUND, L.OP_REVERSAL):
            why = _undo_problem(txn, ledger, f, entry, s, state_of(cid), undone, coupons,
                                compiled_of(program_version), holds, held, refunded, links,
                                packages, gifts_given)
            if why:
                problem(f"journal entry {seq}: {why}")
        elif op == L.OP_HOLD:
            minutes, rest = divmod(f[29] - ts_us, _MINUTE_US)
            if (not 0 < amount <= s[0] + s[1] - held.get(cid, 0) or any(f[10:14])
                    or not 1 <= minutes <= L.HOLD_MINUTES_MAX or rest or tier_after != tier
                    or taken or redeemed):
                problem(f"journal entry {seq}: an authorization of {amount} for {minutes} minutes "
                        "that its card's available money or rule 15 does not allow")
            else:
                holds[L.COUPON_KEY.pack(cid, seq)] = [L.HOLD_VERSION, L.HOLD_OPEN, 0, f[18], amount,
                                                      ts_us, f[29], seq, 0, 0, bytes(8)]
                held[cid] = held.get(cid, 0) + amount
        elif op in (L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED):
            hold = holds.get(L.COUPON_KEY.pack(cid, f[28]))
            why = _close_hold(hold, f, L.HOLD_VOIDED if op == L.OP_HOLD_VOID else L.HOLD_EXPIRED,
                              held)
            if why is None and (any(f[10:14]) or taken or redeemed or tier_after != tier or (
                    amount != hold[4])):
                why = "a hold closed that moves value, or not by its amount"
            if why:
                problem(f"journal entry {seq}: {why}")
        elif op == L.OP_CARD_STATUS:
            was, now = f[29], f[3]
            closing = now == L.STATUS_CLOSED
            if closing and held.get(cid, 0):
                problem(f"journal entry {seq}: a card closed that holds money for open holds")
            program = programs.get(program_version, (None,))[0]
            activating = was == L.STATUS_ISSUED and now == L.STATUS_ACTIVE
            want = ((s[0], 0, -s[0], -s[1], -s[2]) if closing else
                    (0, 0, 0, 0, program.activation_points if program else 0) if activating
                    else (0, 0, 0, 0, 0))
            # to expired: the server's, at or after the expiry; past it: nothing else but closing
            by_server = f[21] == 0 and f[24] == L.CALLER_SYSTEM
            if (was != statuses.get(cid, L.STATUS_ACTIVE)
                    or now not in L.CARD_TRANSITIONS.get(was, ()) or f[9:14] != want
                    or tier_after != tier or taken or redeemed
                    or (now == L.STATUS_EXPIRED and not (lapsed and by_server))
                    or (lapsed and now not in (L.STATUS_EXPIRED, L.STATUS_CLOSED))):
                problem(f"journal entry {seq}: a card status change {was} -> {now} that its card "
                        "or rule 14 does not allow (or that moves other than a closing's value)")
            statuses[cid] = now
        elif op == L.OP_CARD_REPLACED:  # rule 16: everything out, to the next entry's card
            want = (s[0] + s[1], 0, -s[0], -s[1], -s[2])
            if (f[29] != status_now or status_now not in L.REPLACEABLE or held.get(cid, 0)
                    or f[3] != L.STATUS_REPLACED or f[9:14] != want or f[28] != seq + 1
                    or tier_after != tier or taken or redeemed):
                problem(f"journal entry {seq}: a replacement of a card whose status, holds or "
                        "balances rule 16 does not allow (or that moves other than all it held)")
            statuses[cid] = L.STATUS_REPLACED
            replaced = (cid, seq, f)
        elif op == L.OP_TIER_REVIEWED:
            prog = compiled_of(program_version)
            card = Card(_card_at(tier, s, opened_us.get(cid, 0)))
            state = state_of(cid)
            if prog is None or not prog.review_days or any(f[10:14]):
                why = "a tier review that moves value, or under a program without reviews"
            else:
                why = None
                got = prog.review(card, state, ts_us)
                if got != (L.R_OK, amount, f[29]) or card.tier != tier_after:
                    why = (f"a review of spend {amount} to tier {tier_after} from day {f[29]}, but "
                           f"its program gives {got[1]} to tier {card.tier} from day {got[2]}")
            if why:
                problem(f"journal entry {seq}: {why}")
        elif op == L.OP_POINTS_EXPIRED:
            program = programs.get(program_version, (None,))[0]
            lot_days = point_lots.cards.get(cid, {})
            due = sum(left for day, (left, _) in lot_days.items() if day <= f[29])
            if (program is None or not program.points_expire_days or f[9] <= 0 or dpts != -f[9]
                    or any(f[10:13]) or f[29] > lots.day_of(f[17]) - program.points_expire_days
                    or due != f[9]):
                problem(f"journal entry {seq}: an expiry of {f[9]} points that its lots and "
                        "program do not explain")
        elif op not in L.OPENINGS and op != L.OP_REPLACEMENT_OPENED:  # (checked above)
            problem(f"journal entry {seq}: unknown operation type {op}")
        if op not in _NOT_LOTS:  # a replacement's points move with their lots (above)
            gain, loss = lots.movement(entry)
            if gain or loss:
                try:
                    lot_rule.apply(cid, f[17], gain, loss)
                except ValueError:
                    problem(f"journal entry {seq}: spends points its card's lots do not hold")
        s[0] += dp
        s[1] += db_
        s[2] += dpts
        s[3] = seq
        s[5] = pin_tries | pin_flags << 8
        s[6] = tier_after if program_version else tier  # migrated v1 entries never upgraded
        totals[0] += dp
        totals[1] += db_
        totals[2] += dpts
        if (s[0], s[1], s[2]) != (pa, ba, ptsa):
            problem(f"journal entry {seq}: after-balances differ from the running sums")
        if min(s[0], s[1]) < 0 or (s[2] < 0 and dpts < 0 and op != L.OP_REPLACEMENT_OPENED and not (
                op in (L.OP_REFUND, L.OP_REVERSAL)
                and (prog_of := compiled_of(program_version)) is not None
                and prog_of.shortfall == L.SHORTFALL_OWE)):
            problem(f"journal entry {seq}: a balance below zero")  # points: a refund's debt only
    if replaced is not None:
        problem(f"journal entry {replaced[1]}: a replacement with no opening of the new card")
    _outbox(txn, ledger, programs, opens, referred, problem)
    _forwards(txn, ledger, sums, problem)
    return {"sums": sums, "totals": totals, "admin": admin, "entries": expect_seq - 1, "undone": undone,
            "links": links, "refunded_lines": refunded,
            "statuses": statuses, "holds": holds, "held": held, "expiries": expiries,
            "head_digest": last_digest, "states": states, "coupons": coupons,
            "packages": packages, "lots": point_lots, "gifts": gifts_given}


def _import_problem(program, f: tuple) -> str | None:
    """Why an import entry (rule 18) is not a card opened active with its figures (None: it is):
    principal, bonus and points in, each >= 0, the amount its principal, nothing else moved, no
    PIN, at a tier of its program."""
    amount, discount, dp, db_, dpts = f[9:14]
    if (f[3] != L.STATUS_ACTIVE or amount != dp or discount or min(dp, db_, dpts) < 0
            or f[5] or f[6] or f[29] or f[28]
            or (program is not None and f[2] >= len(program.tiers))):
        return (f"an import of {dp} principal, {db_} bonus and {dpts} points that is not a card "
                "opened active with them, without a PIN, at a tier of its program")
    return None


def _top_up_problem(prog: CompiledProgram | None, state: CardState, f: tuple, tier_after: int,
                    promotion_id: int) -> str | None:
    """Why a top-up entry is not what its program makes of it (None: it is). ``state`` is the
    card's program state before it, rebuilt from the journal, and moves on past it."""
    amount, discount, dp, db_, dpts, ts_us = f[9], f[10], f[11], f[12], f[13], f[17]
    if amount <= 0 or dp != amount or dpts or discount or db_ < 0:
        return "a top-up that does not add its amount"
    if prog is None:  # migrated from v1: counted, not recomputed
        state.top_up(amount, 0, None)
        return "a migrated top-up with a bonus" if db_ or promotion_id else None
    pid, bonus, slot_k = prog.best_promotion(state, amount, ts_us)
    state.top_up(amount, pid if slot_k is not None else 0, slot_k)
    if (pid, bonus) != (promotion_id, db_):
        return (f"promotion {promotion_id} with bonus {db_}, but the program gives promotion "
                f"{pid} with bonus {bonus}")
    expect = prog.upgrade(f[2], prog.up_top_up, amount)
    if tier_after != expect:
        return f"tier {tier_after} after it, but the program gives {expect}"
    return None


def _close_hold(hold: list | None, f: tuple, state: int, held: dict) -> str | None:
    """Rule 15: why entry ``f`` cannot close ``hold`` (None: it closes it, and the card holds
    that much less)."""
    seq, cid, ts_us, store, operator = f[7], f[8], f[17], f[18], f[21]
    if hold is None or hold[1] != L.HOLD_OPEN:
        return f"it closes hold {f[28]}, which is not an open hold of its card"
    if state == L.HOLD_EXPIRED and (ts_us < hold[6] or f[24] != L.CALLER_SYSTEM):
        return "a hold released before its expiry, or not by the server"
    if state == L.HOLD_CAPTURED and (ts_us >= hold[6] or -(f[11] + f[12]) > hold[4]):
        return "a capture after its hold's expiry, or of more than it holds"
    if state in (L.HOLD_CAPTURED, L.HOLD_VOIDED) and not operator and store != hold[3]:
        return "a hold closed by a terminal of another store"
    hold[1], hold[8] = state, seq
    hold[9] = -(f[11] + f[12]) if state == L.HOLD_CAPTURED else 0
    held[cid] -= hold[4]
    return None


def _undo_problem(txn, ledger, f: tuple, entry: bytes, s: list, state: CardState, undone: dict,
                  coupons: dict, prog: CompiledProgram | None, holds: dict,
                  held: dict, refunded: dict, links: dict, packages: dict,
                  gifts_given: dict) -> str | None:
    """Why a refund or reversal entry is not what rules 12 and 13 make of its original, as the
    journal left it before (None: it is). Moves the card's lifetime paid (``s``), its program
    state, the original's undo record and a coupon it gives back along."""
    op, tier, seq, cid, amount, link, ts_us = f[1], f[2], f[7], f[8], f[9], f[28], f[17]
    dp, db_, dpts = f[11], f[12], f[13]
    taken, redeemed, tier_after, line_count = L.JOURNAL_PROGRAM.unpack_from(
        entry, L.JOURNAL_OFF_PROGRAM)[:4]
    flags = L.JOURNAL_PURCHASE_FLAGS.unpack_from(entry, L.JOURNAL_OFF_PURCHASE_FLAGS)[0]
    if prog is None:
        return "a refund or reversal without a program"
    original = txn.get(L.SEQ_KEY.pack(link), db=ledger.journal) if 0 < link < seq else None
    mine = original is not None and (original[16:32] == cid or (
        original[16:32] in linked(links.get, PREDECESSOR, cid)))  # rule 16: undone on the card that replaced it
    if not mine or original[1] not in L.CARD_OPS:
        if op == L.OP_REVERSAL and not link and not any(f[9:14]) and tier_after == tier:
            return None  # nothing was applied: an entry that moves nothing
        return f"it links entry {link}, not an earlier entry of its card"
    key = L.SEQ_KEY.pack(link)
    undo = undone.get(key) or list(L.UNDO.unpack(undo_record(original)))
    card = Card(_card_at(tier, s, 0))
    want_moves, want_amount, complete = (0, 0, 0, 0, 0), 0, False
    if op == L.OP_REFUND:
        left = undo[7] - undo[6]
        whole, lines = True, None
        if line_count:  # by line (rule 12): the sale's lines it names, not given back before
            lines = txn.get(L.SEQ_KEY.pack(seq), db=ledger.journal_lines) or b""
            if lines_digest(lines) != entry[L.JOURNAL_OFF_LINES_DIGEST:][:L.LINES_DIGEST_SIZE]:
                return "its stored lines are not the ones it carries the digest of"
            sale_lines = txn.get(key, db=ledger.journal_lines) or b""
            numbers = [L.LINE_TAG.unpack_from(lines, k * L.LINE_SIZE)[0]
                       for k in range(len(lines) // L.LINE_SIZE)]
            marked = refund_input_lines(sale_lines, refunded.get(key, EMPTY_LINE_REFUNDS),
                                        numbers)
            why, by_lines, _, whole = refund_lines(
                bytearray(marked), range(len(marked) // L.LINE_SIZE), undo[7])
            if (why != L.R_OK or refund_stored_lines(marked) != lines
                    or len(numbers) != line_count or by_lines != amount):
                return f"a refund of lines {numbers} that its sale's lines do not give"
        if undo[0] != L.UNDO_VERSION or undo[2] != L.OP_PURCHASE or undo[1] & L.UNDO_REVERSED \
                or not (0 <= amount if line_count else 0 < amount) or amount > left:
            return f"a refund of {amount} that its original does not allow ({left} left)"
        reason, figures = give_back(undo, card, undo[6], undo[6] + amount, prog.shortfall)
        if reason != L.R_OK:
            return "a refund that overflows"
        p, b, take, back = figures
        want_moves, want_amount = (p, b, back - take, take, amount - p - b), amount
        complete = undo[6] + amount == undo[7] and whole
        undo[6] += amount
        if lines is not None:
            refunded[key] = lines_refunded(refunded.get(key, EMPTY_LINE_REFUNDS), lines, seq)
    elif undo[1] & L.UNDO_REVERSED:
        if any(f[9:14]) or tier_after != tier:
            return "a second reversal that moves value"
        undone[key] = undo
        return None
    elif undo[2] == L.OP_PURCHASE:
        left = undo[7] - undo[6]
        reason, figures = give_back(undo, card, undo[6], undo[7], prog.shortfall)
        if reason != L.R_OK:
            return "a reversal that overflows"
        p, b, take, back = figures
        want_moves, want_amount, complete = (p, b, back - take, take, left - p - b), left, True
    elif undo[2] == L.OP_TOP_UP:
        want_moves, want_amount, complete = (-undo[8], -undo[9], 0, 0, 0), undo[7], True
        state.take_back_top_up(undo[8], undo[5])
    elif undo[2] == L.OP_HOLD and op == L.OP_REVERSAL:  # rule 15: what the hold still held
        hold = holds.get(L.COUPON_KEY.pack(cid, link))
        if hold is None or hold[1] == L.HOLD_CAPTURED:
            return "a reversal of an authorization captured (or with no hold)"
        undo[7] = hold[4] if hold[1] == L.HOLD_OPEN else 0
        want_amount, complete = undo[7], True
        if hold[1] == L.HOLD_OPEN:
            hold[1], hold[8] = L.HOLD_REVERSED, seq
            held[cid] -= hold[4]
    elif undo[2] == L.OP_PACKAGE_USE and op == L.OP_REVERSAL:  # rule 13: the use back
        package_key = L.COUPON_KEY.pack(cid, L.JOURNAL_TAIL.unpack_from(original)[4])
        package = packages.get(package_key)
        if package is None:
            return "a reversal of a use of a package the journal never sold"
        p = list(package)
        p[3] += p[1] == L.PACKAGE_COUNT
        p[8] = max(p[8] - 1, 0)
        packages[package_key] = tuple(p)
        complete = True
    elif undo[2] == L.OP_GIFT_REDEEM and op == L.OP_REVERSAL:  # rule 13: points and stock back
        want_moves, complete = (0, 0, undo[10], 0, 0), True
        gift_id = L.JOURNAL_PROGRAM.unpack_from(original, L.JOURNAL_OFF_PROGRAM)[4]
        gifts_given[gift_id] = gifts_given.get(gift_id, 0) - 1
    else:
        return f"a reversal of an entry of type {undo[2]}, which is not reversible"
    if op == L.OP_REVERSAL:
        undo[6], undo[1], undo[12] = undo[7], undo[1] | L.UNDO_REVERSED, seq
        if card.tier == undo[4] and undo[3] < card.tier:
            card.tier = undo[3]
    got = (dp, db_, dpts, taken, redeemed)
    if got != want_moves or amount != want_amount or tier_after != card.tier or (
            bool(flags & L.UNDO_COMPLETE) != complete):
        return (f"gives back {got} of {amount} (tier {tier_after}), but its original's figures "
                f"give {want_moves} of {want_amount} (tier {card.tier})")
    undone[key] = undo
    s[4] = card.lifetime  # lifetime paid, down by the money given back
    serial = L.JOURNAL_TAIL.unpack_from(original)[4]
    coupon_key = L.COUPON_KEY.pack(cid, serial)
    coupon = coupons.get(coupon_key) if complete and original[1] == L.OP_PURCHASE and serial \
        else None
    if coupon is not None and coupon[1] == L.COUPON_USED and coupon[7] == link and (
            op == L.OP_REVERSAL or ts_us < coupon[5]):
        coupons[coupon_key] = (coupon[0], L.COUPON_ISSUED, *coupon[2:7], 0, 0, coupon[9])
    return None


def _card_at(tier: int, s: list, opened_us: int, held: int = 0) -> tuple:
    """A card record's fields (layout.CARD order) from its running sums ``s``: what the
    reference's rules read of it."""
    return (L.CARD_VERSION, L.STATUS_ACTIVE, tier, 0, 0, s[0], s[1], s[2], held, s[4], 0,
            opened_us, 0, s[7], bytes(32), bytes(24))


def _sale_problem(program, prog: CompiledProgram | None, s: list, f: tuple, package_id: int,
                  tier_after: int, state: CardState) -> str | None:
    """Why a package sale entry is not what its program makes of it (None: it is): paid at the
    program's price from the buckets in its spend order, no discount, no points."""
    amount, discount, dp, db_, dpts = f[9:14]
    if prog is None or discount or dpts or dp > 0 or db_ > 0 or -(dp + db_) != amount:
        return "a package sale that does not take its price"
    definition = program.package(package_id)
    if definition is None or definition.price_minor != amount:
        return f"package {package_id} sold for {amount}, not at its program's price"
    if spend(amount, s[0], s[1], prog.spend_order) != (-dp, -db_):
        return "its split between principal and bonus is not its program's spend order"
    expect = prog.upgrade(f[2], prog.up_spend, prog.period_spend(s[4] + amount, state))
    if tier_after != expect:
        return f"tier {tier_after} after it, but the program gives {expect}"
    return None


def _use_problem(package: tuple | None, f: tuple, package_id: int) -> str | None:
    """Why a package use entry is not one its package allowed then (None: it is)."""
    if any(f[9:14]):
        return "a package use that moves value"
    if package is None:
        return "a use of a package the journal never sold"
    _, kind, pid, uses_left, valid_from, valid_until, *_ = package
    ts_us = f[17]
    if pid != package_id or not valid_from <= ts_us < valid_until or (
            kind == L.PACKAGE_COUNT and uses_left == 0):
        return f"a use of package {pid} it did not allow (expired, used up, or another package)"
    return None


def _issue_problem(program, prog: CompiledProgram | None, f: tuple, taken: int,
                   coupon_id: int) -> str | None:
    """Why a coupon issue entry is not what its program allows (None: it is)."""
    amount, discount, dp, db_, dpts = f[9:14]
    if amount or discount or dp or db_ or dpts != -taken or prog is None:
        return "a coupon issue that moves money, or points other than its price"
    definition = program.coupon(coupon_id)
    if definition is None:
        return f"coupon {coupon_id} is not in its program version"
    if taken != (definition.points_price if taken else 0) or (not taken and not f[21]):
        return (f"coupon {coupon_id} for {taken} points (its price: {definition.points_price}; "
                "free only from an operator)")
    return None


def _purchase_problem(prog: CompiledProgram | None, s: list, f: tuple, entry: bytes,
                      tier_after: int, line_count: int, lines: bytes,
                      coupon: tuple | None, state: CardState, held: int = 0,
                      released: int = 0) -> str | None:
    """Why a purchase entry is not what its program makes of it from the card's running sums
    ``s`` and its coupon as the journal left it (None: it is): the reference arithmetic re-run
    on its stored lines."""
    taken, redeemed = L.JOURNAL_PROGRAM.unpack_from(entry, L.JOURNAL_OFF_PROGRAM)[:2]
    coupon_off, = L.JOURNAL_COUPON_OFF.unpack_from(entry, L.JOURNAL_OFF_COUPON)
    amount, discount, dp, db_, dpts, ts_us = f[9], f[10], f[11], f[12], f[13], f[17]
    due = -(dp + db_)  # what the card paid
    flags = L.JOURNAL_PURCHASE_FLAGS.unpack_from(entry, L.JOURNAL_OFF_PURCHASE_FLAGS)[0]
    partial = flags & L.PARTIAL_PAYMENT
    if flags & L.BASKET_BEGUN_ELSEWHERE and not any(entry[160:168]):  # (layout.JOURNAL basket_tag)
        return "a purchase marked as a later payment of a basket, without a basket"
    if (amount <= 0 or not 0 <= discount <= amount or dp > 0 or db_ > 0 or taken < 0
            or not 0 <= redeemed or flags & ~(L.PARTIAL_PAYMENT | L.BASKET_BEGUN_ELSEWHERE)
            or (due != amount - discount - redeemed if not partial
                else not 0 < due < amount - discount - redeemed)):
        return "a purchase whose debit is not gross - discount - redeemed (or less, if partial)"
    if prog is None:  # migrated from v1: not recomputed
        return None
    tier = f[2]
    if tier >= prog.tier_count:
        return f"tier {tier} is not in its program version"
    if len(lines) != line_count * L.LINE_SIZE:
        return f"{line_count} lines in the entry, {len(lines) // L.LINE_SIZE} stored"
    before = Card(_card_at(tier, s, 0, held))
    buf = bytearray(b"".join(L.LINE.pack(*(x[:4] + (0, 0, 0) + x[7:]))
                             for x in L.LINE.iter_unpack(lines)))
    reason, (paid, earned, took, red, off, _, card_pay) = purchase(
        prog, before, buf, range(line_count), amount, taken, coupon, ts_us,
        L.ALLOW_PARTIAL if partial else 0, released)
    if reason != L.R_OK or (paid, took, red, earned - took, off, card_pay) != (
            amount - discount, taken, redeemed, dpts, coupon_off, due):
        return (f"paid {amount - discount} ({coupon_off} off by a coupon), {taken} points for "
                f"{redeemed} and {dpts} points, but its program gives {paid} ({off}), {took} for "
                f"{red} and {earned - took} ({reason})")
    if bytes(buf) != lines:
        return "its stored lines differ from its program's arithmetic"
    if spend(due, s[0], s[1], prog.spend_order) != (-dp, -db_):
        return "its split between principal and bonus is not its program's spend order"
    expect = prog.upgrade(tier, prog.up_spend, prog.period_spend(s[4] + due, state))
    if tier_after != expect:
        return f"tier {tier_after} after it, but the program gives {expect}"
    return None


def _states(txn, ledger, states: dict, problem) -> None:
    """Every card's stored program state is the one its journal rebuilds (none: all zeros)."""
    stored = dict(txn.cursor(db=ledger.card_ext)) if ledger.card_ext is not None else {}
    for cid in set(stored) | set(states):
        state = states.get(cid)
        want = L.CARD_EXT.pack(*state.fields()) if state else bytes(L.CARD_EXT_SIZE)
        if stored.get(cid, bytes(L.CARD_EXT_SIZE)) != want:
            problem(f"card ...{cid.hex()[:8]}: its program state is not what its top-ups make")


def _cards(txn, ledger, sums: dict, statuses: dict, held_of: dict, expiries: dict,
           problem) -> dict:
    totals = [0, 0, 0]
    count = 0
    tiers: Counter = Counter()
    for cid, raw in txn.cursor(db=ledger.cards):
        count += 1
        rec = L.CARD.unpack(raw)
        principal, bonus, points, held, lifetime, last_seq = rec[5:11]
        if rec[1] != L.STATUS_REPLACED:  # rule 16: its new card counts in its place
            tiers[rec[2]] += 1
        totals[0] += principal
        totals[1] += bonus
        totals[2] += points
        s = sums.pop(cid, None)
        if rec[1] != statuses.get(cid, L.STATUS_ACTIVE):
            problem(f"card ...{cid.hex()[:8]}: status {rec[1]}, but its entries leave it "
                    f"{statuses.get(cid, L.STATUS_ACTIVE)}")
        if rec[0] != L.CARD_VERSION or min(principal, bonus) < 0 or points < -L.INT64_MAX:
            problem(f"card ...{cid.hex()[:8]}: invalid record")
        expires_us = L.CARD_EXPIRES.unpack_from(raw, L.CARD_OFF_EXPIRES)[0]
        if expires_us != expiries.get(cid, 0):
            problem(f"card ...{cid.hex()[:8]}: expires at {expires_us}, but its opening gives "
                    f"{expiries.get(cid, 0)}")
        if held != held_of.get(cid, 0):
            problem(f"card ...{cid.hex()[:8]}: holds {held}, but its open holds add up to "
                    f"{held_of.get(cid, 0)}")
        if s is not None and s[7] == 0 and rec[13]:
            # filled from the profile by the upgrade, and no entry since to carry it (a sealed
            # profile, without the keyring: taken as the record says, not checked)
            raw_profile = txn.get(cid, db=ledger.profiles)
            box = ledger.profile_box
            if (not box.keyed and box.is_sealed(raw_profile)) or profile_month(
                    ledger.open_profile(cid, raw_profile)) == rec[13]:
                s[7] = rec[13]
        if s is None:
            problem(f"card ...{cid.hex()[:8]}: no journal entries")
        elif (principal, bonus, points, last_seq, lifetime, rec[3] | (rec[4] & 0xFF) << 8,
              rec[2], rec[13]) != tuple(s):
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
    count = pruned = 0
    relay = ledger.read_admin_relay(txn)  # an admin shard indexes none: it keeps them all
    keeps_all = relay is not None and relay[1] == L.RELAY_ROLE_ADMIN
    for key, idem in txn.cursor(db=ledger.requests):
        count += 1
        version, _, reason, _, _, seq, *_ = L.IDEM.unpack(idem)
        if version != L.IDEM_VERSION:
            problem(f"a request record of version {version}")
        if key.startswith(L.RELAYED_KEY_PREFIX):  # an admin shard's, relayed: never pruned,
            key = key[len(L.RELAYED_KEY_PREFIX):]  # tagged with the caller's own key
        elif not keeps_all:
            pruned += 1
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
    if sum(indexed.values()) != pruned or any(n != 1 for n in indexed.values()) or any(
            txn.get(k, db=ledger.requests) is None for k in indexed):
        problem("the request time index does not match the request records one to one")
    return count
