"""The ledger: card records, journal, request records and admin state in one LMDB environment.

Sub-databases (all in one environment, so one write transaction covers them)::

    cards         card_id (16 B)          -> card record (128 B, layout.CARD)
    journal       seq (u64 big-endian)    -> journal entry (256 B, layout.JOURNAL)
    requests      request key             -> idempotency record (64 B, layout.IDEM)
    request_times group ts_us (u64 BE)    -> the group's request keys: the pruning order
    profiles      card_id                 -> member profile (JSON, cold)
    cardnos       card_id                 -> the card number sealed under a data key
    terminals     terminal id (u32 BE)    -> terminal record (64 B, layout.TERMINAL)
    operators     name (UTF-8)            -> operator (JSON: id, role, stores, token SHA-256)
    operator_ids  operator id (u32 BE)    -> name
    programs      version (u32 BE)        -> the program document of that version (JSON)
    meta          name                    -> format, current program, tier counts, horizons
    card_ext      card_id                 -> card program state (128 B, layout.CARD_EXT)
    journal_lines seq (u64 big-endian)    -> an applied purchase's lines (64 B each, layout.LINE)
    coupons       card_id | serial (u64)  -> an issued coupon (64 B, layout.COUPON); serial = the
                                             sequence of the entry that issued it
    packages      card_id | serial (u64)  -> a package sold (64 B, layout.PACKAGE); likewise
    points_lots   card_id | day (u32 BE)  -> points left and earned that day (layout.POINTS_LOT)
    lots_by_day   day (u32 BE) | card_id  -> empty: the order in which lots expire
    gift_stock    gift id (u32 BE)        -> how many of the gift were given (layout.GIFT)
    baskets       basket tag | seq (BE)   -> empty: a split-tender basket's card payments
    undone        seq (u64 big-endian)    -> what refunds and a reversal took back of that
                                             entry (64 B, layout.UNDO)
    card_entries  card_id | seq (BE)      -> the entry's op and time: a card's history
    holds         card_id | serial (u64)  -> a hold (64 B, layout.HOLD); serial = the sequence of
                                             its authorization entry
    holds_by_expiry expires_us | card_id | serial -> empty: the open holds, in release order
    card_links    0x01 | old card_id      -> the card that replaced it (rule 16)
                  0x02 | new card_id      -> the card it replaced
    members       kind | digest | card_id -> empty: the member lookup index (rule 17,
                                             layout.MEMBER_KEY): keyed digests of the
                                             profiles' phones and names, never them
    cards_by_expiry expires_us | card_id  -> empty: the cards that have an expiry and have not
                                             expired, closed or been replaced (rule 14)
    refunded_lines seq (u64 big-endian)   -> the sale's lines refunds by line gave back (32 B,
                                             layout.LINE_REFUNDS)
    day_totals    store | business day    -> what the day's entries moved (704 B,
                                             layout.DAY_TOTALS; cardcore.daytotals)
    day_chain     business day            -> the chain's: every store's of the day, added
    store_days    store | business day    -> a closed day (32 B, layout.STORE_DAY)
    day_clearing  store | day | other     -> what the store owes the other that day, net (i64)
    day_staff     store | day | staff id  -> the staff's sales and top-ups (layout.DAY_STAFF)
    day_money_home card_id                -> u32: the store that holds the card's principal
    member_cards, member_months, member_days, member_last, member_month_totals: the member
                  metrics (cardcore.members)
    chain_regions region id (u32 BE)      -> a region: its name (96 B, layout.REGION)
    chain_stores  store id (u32 BE)       -> a store: name, region, own business day (112 B,
                                             layout.STORE; cardcore.stores)
    chain_region_stores region | store    -> empty: each region's stores

The last thirty came with card programs, refunds, holds, replacement, member lookup, card
expiry, refunds by line, the daily close, the member metrics and the chain's shape (regions and
stores, empty at first): a writer that opens a ledger made before them creates them (absent
records read as zeros: nothing to migrate; the member index is filled from the profiles once, by
a writer that has the lookup key; every card before expiry has none; the day totals and the
member metrics are filled from the journal once).

``apply_group`` is the only writer. It applies a group of queued operations
strictly in the order they arrived, in one write transaction (one fsync when
``sync`` is on): card operations go to the Cython kernel in runs of
consecutive card operations, admin operations in between, and every check
that depends on admin state is made when its operation is applied
(``admin.AdminState``). The group's time comes with the group and never goes
back (``max(time, last + 1)``), so two ledgers that apply the same groups end
identical. Each journal entry's digest chains the previous one's
(``chain``): ``verify`` finds a flipped bit or a forged entry.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from array import array

import lmdb

from cardcore import layout as L
from cardcore.admin import (META_CLOCK, META_FORMAT, META_PROGRAM, META_PRUNED_THROUGH,
                            META_WINDOW, OPERATOR_NEXT_ID, U32, AdminState, I64,
                            META_ADMIN_RELAY, META_DATA_KEY, recorded_data_key)
from cardcore import lots
from cardcore.chain import GENESIS, chain
from cardcore import daytotals
from cardcore import members as member_metrics
from cardcore import stores
from cardcore.ext import kernel, writerglue
from cardcore.idempotency import (CLIENT_TIME_AHEAD_MAX_US, CLOCK_STEP_MAX_US, PRUNE_STEP_MAX,
                                  entry_line_count, lines_digest,
                                  REQUEST_WINDOW_S_DEFAULT, REQUEST_WINDOW_S_MIN, InvariantError,
                                  Outcome, PendingOp, legacy_digest, legacy_key,
                                  pack_request_keys, record, repeat, unpack_request_keys,
                                  replay)
from cardcore.lookup import MemberIndex
from cardcore.profiles import ProfileBox, ProfileError, masked_of
from cardcore.profiles import encode as encode_profile
from cardcore.program import DEFAULT_PROGRAM_TOML, parse_program
from cardcore.rules import Program, available_minor, card_expiry_us, expired, review_due

log = logging.getLogger("cardcore.ledger")

MAP_SIZE_INITIAL = 1 << 30      # virtual address space; the file grows only as used
MAP_GROW_FACTOR = 2
MAP_GROW_ATTEMPTS = 8
MAX_READERS = 512
MAX_DBS = 48
EMPTY_RECORD = bytes(L.CARD_SIZE)
DB_NAMES = ("cards", "journal", "requests", "request_times", "profiles", "cardnos", "terminals",
            "operators", "operator_ids", "programs", "meta", "card_ext", "journal_lines", "coupons",
            "packages", "points_lots", "lots_by_day", "gift_stock", "baskets", "undone",
            "card_entries", "holds", "holds_by_expiry", "card_links", "members",
            "cards_by_expiry", "refunded_lines", *daytotals.DB_NAMES, *member_metrics.DB_NAMES,
            *stores.DB_NAMES)
# created on open when missing (cards_by_expiry: empty, as every card before it has no expiry)
ADDED_DB_NAMES = frozenset(("card_ext", "journal_lines", "coupons", "packages", "points_lots",
                            "lots_by_day", "gift_stock", "baskets", "undone", "card_entries",
                            "holds", "holds_by_expiry", "card_links", "members",
                            "cards_by_expiry", "refunded_lines", *daytotals.DB_NAMES,
                            *member_metrics.DB_NAMES, *stores.DB_NAMES))
SUCCESSOR, PREDECESSOR = b"\x01", b"\x02"  # card_links key prefixes
LINEAGE_MAX = 64  # replacements a card's history and refunds follow back, at most
HISTORY_PAGE_MAX = 100        # entries a history page holds at most
HISTORY_SCAN_MAX = 10_000     # index entries one page looks at, at most (filters that match few)
JOURNAL_PAGE_MAX = 1_000      # entries one read_journal reads at most: one short read transaction
BASKET_KEY = struct.Struct(">QQ")  # basket tag, seq
EMPTY_COUPON = bytes(L.COUPON_SIZE)
EMPTY_EXT = bytes(L.CARD_EXT_SIZE)
EMPTY_UNDO = bytes(L.UNDO.size)
_ENTRY_TS = struct.Struct("<96xq")  # layout.JOURNAL: ts_us
_UNDO_FIELDS = struct.Struct("<xBB29xq8xqqq")  # layout.JOURNAL: op, tier, amount, principal,
# bonus and points deltas
_CARD_HELD = 32  # layout.CARD offset of held_minor
_CARD_BIRTH_MONTH = 68  # layout.CARD offset of birth_month
META_BIRTHS = b"birth_months"  # set once card records hold the members' birth months
# Set while the member index names every profile's phone and name (rule 17); a writer without
# the lookup key that stores a profile clears it, and the next one with the key fills it again.
META_MEMBERS = b"member_index"
# Set while every stored profile is sealed (cardcore.profiles); a writer without the profile key
# that stores a profile clears it.
META_PROFILES_SEALED = b"profiles_sealed"
META_DAY_TOTALS = daytotals.META_DAY_TOTALS
# The number of the last group of the group log (cardcore.grouplog) this LMDB state holds: written
# in each checkpoint's transaction, so recovery replays the log from the next one.
META_LOG_APPLIED = b"log_applied"
U64 = struct.Struct("<Q")
LEGACY_PREFIX = L.REQUEST_KEY_HEAD.pack(L.CALLER_LEGACY, 0)
NO_OPERATOR = bytes(4)  # an operation's operator_id (layout.OP offset 28) when none acts
# The fields of a kernel output entry the writer needs: op, tier, reason, seq, principal and
# bonus after (layout.JOURNAL offsets 1, 2, 4, 8, 72, 80).
_ENTRY_HEAD = struct.Struct("<xBBxHxxQ56xqq")
assert _ENTRY_HEAD.size == 88
_TIER_AFTER = 192  # layout.JOURNAL offset of tier_after
_U64, _I64, _U16 = struct.Struct("<Q"), struct.Struct("<q"), struct.Struct("<H")
_OP_REF = struct.Struct("<144xQ")  # an operation's ref_id (layout.OP offset 144), read alone
_ENTRY_BASKET = struct.Struct("<160xQ")  # a journal entry's basket_tag (layout.JOURNAL 160)
_OP_REFERRER = 176  # layout.OP offset of referrer_id
_OP_CARD = 40  # layout.OP offset of card_id
NO_REFERRER = bytes(L.CARD_ID_SIZE)  # an operation's referrer_id when it names none
DIRTY_CARD, DIRTY_EXT = 1, 2  # the kernel's slot_dirty bits
# Operations whose rules read the card program state; under a program that reviews tiers
# (rule 11) every card operation does (rule 8's spend is the period's).
EXT_READERS = frozenset((L.OP_TOP_UP, L.OP_REVERSAL))
_OP_LINK, _OP_BASKET = 136, 152  # layout.OP offsets of link_seq and basket_tag
_OP_FLAGS = 162  # layout.OP offset of op_flags
RELAYED_KEY_HEAD = L.RELAYED_KEY_PREFIX[0]  # an admin shard's request keys, relayed: kept
NAMED_CARD_OPS = L.CARD_OPS | {L.OP_CARD_REPLACED}  # operations on a card (expiry, review first)
_HOLD_CLOSERS = frozenset((L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED))
_ENTRY_ITEM_ID = 196  # layout.JOURNAL item_id (u16): a purchase's coupon definition, 0 = none
# Whether the writer's per-operation glue runs in C where it can (ext/writerglue.pyx): a run of
# purchases and top-ups, the card history's items, the request-time index. The Python code it
# stands for stays the reference, and runs whatever C does not take; tests turn this off to hold
# the two equal.
GLUE_IN_C = True
_CARD_ENTRY_MASK = bytes(op in L.CARD_ENTRY_OPS for op in range(256))  # for writerglue
_LIVE_MASK = bytes(status in L.STATUSES_LIVE for status in range(256))  # likewise
_ITEM_UNDONE = frozenset((L.OP_PACKAGE_USE, L.OP_GIFT_REDEEM))  # reversals the writer completes  # and a capture (a purchase)


def _capture(packed: bytes) -> bool:
    """Whether operation ``packed`` is a capture (rule 15): a purchase paid from a hold."""
    return packed[0] == L.OP_PURCHASE and bool(packed[_OP_FLAGS] & L.CAPTURE)


_HOLD_AMOUNT = struct.Struct("<8xq")  # layout.HOLD: amount_minor
_ENTRY_AMOUNT = struct.Struct("<32xq")  # layout.JOURNAL: amount_minor
_ENTRY_TILL_STORE = struct.Struct("<104xI")  # layout.JOURNAL: store_id
_TOMBSTONE_WRITTEN = "written"  # a tombstone's state in a group, once a reversal of it applied
_EXT_REVIEW = struct.Struct("<xB78xII")  # layout.CARD_EXT: flags (1), review_day, its period (80)


def _mark_begun_elsewhere(packed: bytes, journal_out: bytearray) -> None:
    """The applied split-tender payments of a run that a front marked BASKET_ELSEWHERE (their
    basket has a payment made on another card shard): their entries say so
    (BASKET_BEGUN_ELSEWHERE), and the day totals and member metrics count the basket's sale
    with that other payment, once (``daytotals.later_payments``; docs/cluster.md)."""
    size, at_flags = L.JOURNAL_SIZE, L.JOURNAL_OFF_PURCHASE_FLAGS
    for k, route in enumerate(packed[L.OP_OFF_ROUTE_FLAGS::L.OP_SIZE]):
        at = k * size
        if (route & L.BASKET_ELSEWHERE and journal_out[at + 1] == L.OP_PURCHASE
                and journal_out[at + 4] == L.R_OK):
            flags = L.JOURNAL_PURCHASE_FLAGS.unpack_from(journal_out, at + at_flags)[0]
            L.JOURNAL_PURCHASE_FLAGS.pack_into(journal_out, at + at_flags,
                                               flags | L.BASKET_BEGUN_ELSEWHERE)


def items_of(txn, ledger: "Ledger", ops: list[PendingOp],
             undo: list | None = None, packed: bytes | None = None) -> tuple[array, list, bytearray]:
    """The records ``ops`` name, each read once: a purchase's coupon, a package use's package, a
    gift's stock; a refund's or reversal's undo record, as ``undo`` gives it (same positions as
    ``ops``: (key or None, record, entry)). (An item slot per operation, SLOT_NONE for the
    others; the slots' (database, key), a database None for a record never written; their
    records, zeros for one that is not there.) ``packed``: the operations' bytes, laid end to
    end, for a look in C first (``writerglue.coupon_items``: most runs name no record, or only
    purchases' coupons)."""
    slots = array("I", [L.SLOT_NONE]) * len(ops)
    if packed is not None:
        located = writerglue.coupon_items(packed, slots, ledger.coupons)
        if located is not None:
            get = txn.get
            return slots, located, bytearray(b"".join(
                [get(key, db=db) or EMPTY_COUPON for db, key in located]))
        slots = array("I", [L.SLOT_NONE]) * len(ops)  # another record: the loop below
    keys: list[tuple] = []
    slot_of: dict[tuple, int] = {}
    given: dict[tuple, bytes] = {}
    for k, op in enumerate(ops):
        packed = op.packed
        kind = packed[0]
        if kind == L.OP_PURCHASE:  # most operations: first, one test each
            if packed[_OP_FLAGS] & L.CAPTURE:  # a capture's hold (rule 15)
                where = ("holds", L.COUPON_KEY.pack(op.card_id,
                                                    _U64.unpack_from(packed, _OP_LINK)[0]))
            elif ref := _OP_REF.unpack_from(packed)[0]:
                where = ("coupons", L.COUPON_KEY.pack(op.card_id, ref))
            else:
                continue  # no record: a purchase without a coupon
        elif kind == L.OP_REFUND or kind == L.OP_REVERSAL:
            key, value, _ = undo[k]  # type: ignore[index]
            where = ("undone", key) if key else ("", k)  # nothing found: a slot of its own
            given.setdefault(where, value)
        elif kind == L.OP_GIFT_REDEEM:  # (an id past u16 is no gift: the kernel says so)
            where = ("gift_stock", L.GIFT_KEY.pack(min(_OP_REF.unpack_from(op.packed)[0],
                                                       0xFFFFFFFF)))
        elif kind == L.OP_PACKAGE_USE:
            where = ("packages", L.COUPON_KEY.pack(op.card_id, _OP_REF.unpack_from(op.packed)[0]))
        elif kind in _HOLD_CLOSERS:
            where = ("holds", L.COUPON_KEY.pack(op.card_id, _U64.unpack_from(packed, _OP_LINK)[0]))
        else:
            continue  # no record: the other operations
        s = slot_of.get(where)
        if s is None:
            s = slot_of[where] = len(keys)
            keys.append(where)
        slots[k] = s
    if not keys:
        return slots, keys, bytearray()
    dbs = {name: getattr(ledger, name) if name else None for name in {name for name, _ in keys}}
    located = [(dbs[name], key) for name, key in keys]
    get = txn.get
    records = [given[where] if given and where in given
               else (get(key, db=db) if db is not None else None) or EMPTY_COUPON
               for where, (db, key) in zip(keys, located)]
    return slots, located, bytearray(b"".join(records))


def history_items(entries) -> list[tuple[bytes, bytes]]:
    """The card history's items (``card_entries``) of journal entries: one per card entry."""
    cards, key, value, ts = L.CARD_ENTRY_OPS, L.CARD_ENTRY_KEY.pack, L.CARD_ENTRY.pack, _ENTRY_TS
    return [(key(e[16:32], _U64.unpack_from(e, L.JOURNAL_OFF_SEQ)[0]),
             value(e[1], ts.unpack_from(e)[0])) for e in entries if e[1] in cards]


EMPTY_LINE_REFUNDS = bytes(L.LINE_REFUNDS.size)
_OP_LINE_COUNT = 160  # layout.OP offset of line_count


def _set_line_count(op: PendingOp, count: int) -> None:
    """The writer's line_count of a refund by line (layout.OP): the sale's lines it passes."""
    op.packed = (op.packed[:_OP_LINE_COUNT] + count.to_bytes(2, "little")
                 + op.packed[_OP_LINE_COUNT + 2:])


def line_numbers(payload: bytes) -> list[int]:
    """A refund by line's line numbers (1-based), from its payload (u8 each, as asked)."""
    return list(payload)


def refund_input_lines(sale_lines: bytes, refunded: bytes, asked: list[int]) -> bytes:
    """Rule 12 by line: the kernel's input for a refund of lines ``asked`` (1-based, each within
    the sale's): the sale's stored lines, each marked (layout.LINE line_tag) LINE_ASKED when
    asked, LINE_REFUNDED when the sale's line refunds record ``refunded`` says so."""
    bits = L.LINE_REFUNDS.unpack(refunded)[3]
    wanted = set(asked)
    out = bytearray(sale_lines)
    for k in range(len(sale_lines) // L.LINE_SIZE):
        tag = ((L.LINE_ASKED if k + 1 in wanted else 0)
               | (L.LINE_REFUNDED if bits[k // 8] >> (k % 8) & 1 else 0))
        _U16.pack_into(out, k * L.LINE_SIZE + L.LINE_OFF_TAG, tag)
    return bytes(out)


def refund_stored_lines(input_lines: bytes) -> bytes:
    """What an applied refund by line stores under its seq: the lines it gave back, in the
    sale's order, each with its line number (1-based) in line_tag."""
    out = []
    for k in range(len(input_lines) // L.LINE_SIZE):
        line = input_lines[k * L.LINE_SIZE:(k + 1) * L.LINE_SIZE]
        if L.LINE_TAG.unpack_from(line)[0] == L.LINE_ASKED:
            out.append(line[:2] + (k + 1).to_bytes(2, "little") + line[4:])
    return b"".join(out)


def lines_refunded(record: bytes, stored: bytes, refund_seq: int) -> bytes:
    """A sale's line refunds record (layout.LINE_REFUNDS) after a refund that stored ``stored``."""
    _, count, _, bits, _ = L.LINE_REFUNDS.unpack(record)
    bits = bytearray(bits)
    for k in range(len(stored) // L.LINE_SIZE):
        number = L.LINE_TAG.unpack_from(stored, k * L.LINE_SIZE)[0]
        bits[(number - 1) // 8] |= 1 << ((number - 1) % 8)
        count += 1
    return L.LINE_REFUNDS.pack(L.LINE_REFUNDS_VERSION, count, 0, bytes(bits), refund_seq)


def undo_record(entry: bytes) -> bytes:
    """The undo record (layout.UNDO) of a journal entry nothing has undone yet: a purchase's
    buckets and points, a top-up's amount and bonus, a gift's points; another type's, with its
    type only (a package use's: the writer gives the use back; others the kernel refuses)."""
    op, tier, amount, dp, db_, dpts = _UNDO_FIELDS.unpack_from(entry)
    taken, redeemed, tier_after, _, item_id = L.JOURNAL_PROGRAM.unpack_from(
        entry, L.JOURNAL_OFF_PROGRAM)
    if op == L.OP_PURCHASE:
        return L.UNDO.pack(L.UNDO_VERSION, 0, op, tier, tier_after, item_id, 0,
                           -dp - db_ + redeemed, -dp, -db_, taken, dpts + taken, 0)
    if op == L.OP_TOP_UP:
        return L.UNDO.pack(L.UNDO_VERSION, 0, op, tier, tier_after, item_id, 0, amount, dp, db_,
                           0, 0, 0)
    if op == L.OP_GIFT_REDEEM:  # rule 13: the points it took, and the gift (its stock)
        return L.UNDO.pack(L.UNDO_VERSION, 0, op, tier, tier_after, item_id, 0, 0, 0, 0, taken,
                           0, 0)
    return L.UNDO.pack(L.UNDO_VERSION, 0, op, tier, tier_after, 0, 0, 0, 0, 0, 0, 0, 0)


def profile_month(profile: dict) -> int:
    """The birth month (1..12) of a member profile's birthday; 0 when there is none or it is
    not a YYYY-MM-DD date (a legacy profile is never a reason to stop)."""
    try:
        birthday = str(profile.get("birthday", ""))
        month = int(birthday[5:7]) if len(birthday) == 10 else 0
    except (ValueError, AttributeError, TypeError):
        return 0
    return month if 1 <= month <= 12 else 0


def _new_item(entry: bytes, lookup) -> tuple[int, int, int, object]:
    """(serial, group time, definition id, definition) of the coupon or package an applied
    entry creates: its serial is the entry's sequence, its definition ``lookup(id)`` under the
    program the entry was computed with."""
    seq, = _U64.unpack_from(entry, L.JOURNAL_OFF_SEQ)
    ts_us, = _I64.unpack_from(entry, L.JOURNAL_OFF_TS)
    item_id = L.JOURNAL_PROGRAM.unpack_from(entry, L.JOURNAL_OFF_PROGRAM)[4]
    definition = lookup(item_id)
    if definition is None:
        raise InvariantError(f"an entry creates item {item_id}, which its program does not define")
    return seq, ts_us, item_id, definition


def sold_package(program: Program, card_id: bytes, entry: bytes) -> tuple[bytes, bytes]:
    """The package record an applied sale entry creates (key, value)."""
    seq, ts_us, package_id, definition = _new_item(entry, program.package)
    until = min(ts_us + definition.days * L.DAY_US, L.INT64_MAX)
    return (L.COUPON_KEY.pack(card_id, seq),
            L.PACKAGE.pack(L.PACKAGE_VERSION, definition.kind, package_id, definition.uses, ts_us,
                           until, seq, 0, 0, 0, bytes(16)))


def authorized_hold(card_id: bytes, entry: bytes) -> tuple[bytes, bytes, bytes]:
    """The hold an applied authorization entry makes (rule 15): its key, its record (open,
    for the entry's amount, till's store and expiry, its ref_id) and its expiry index key."""
    seq, = _U64.unpack_from(entry, L.JOURNAL_OFF_SEQ)
    ts_us, = _I64.unpack_from(entry, L.JOURNAL_OFF_TS)
    expires_us = L.JOURNAL_TAIL.unpack_from(entry)[4]
    store_id = _ENTRY_TILL_STORE.unpack_from(entry)[0]
    hold = L.HOLD.pack(L.HOLD_VERSION, L.HOLD_OPEN, 0, store_id, _ENTRY_AMOUNT.unpack_from(entry)[0],
                       ts_us, expires_us, seq, 0, 0, bytes(8))
    return L.COUPON_KEY.pack(card_id, seq), hold, hold_index_key(card_id, hold)


def linked(get, prefix: bytes, card_id: bytes) -> list[bytes]:
    """Rule 16: the cards ``card_id`` replaced (``PREDECESSOR``: the latest first), or that
    replaced it (``SUCCESSOR``: the next first, the card holding it now last), by the card
    links ``get`` reads (key -> value or None: the ledger's, or verify's rebuilt ones); at most
    LINEAGE_MAX."""
    found: list[bytes] = []
    while len(found) < LINEAGE_MAX and (card_id := get(prefix + card_id)) is not None:
        found.append(card_id)
    return found


def _links(txn, ledger: "Ledger"):
    """``linked``'s reader of the ledger's card links in ``txn``."""
    if ledger.card_links is None:
        return lambda key: None
    return lambda key: txn.get(key, db=ledger.card_links)


def predecessors(txn, ledger: "Ledger", card_id: bytes) -> list[bytes]:
    """The cards ``card_id`` replaced (rule 16), the latest first."""
    return linked(_links(txn, ledger), PREDECESSOR, card_id)


def hold_index_key(card_id: bytes, hold: bytes) -> bytes:
    """A hold's key in ``holds_by_expiry`` (layout.HOLD record ``hold``)."""
    f = L.HOLD.unpack(hold)
    return L.HOLD_EXPIRY_KEY.pack(f[6], card_id, f[7])


def issued_coupon(program: Program, card_id: bytes, entry: bytes) -> tuple[bytes, bytes]:
    """The coupon record an applied issue entry creates (key, value): valid from the group's time
    for its definition's days."""
    seq, ts_us, coupon_id, definition = _new_item(entry, program.coupon)
    until = min(ts_us + definition.valid_days * L.DAY_US, L.INT64_MAX)
    return (L.COUPON_KEY.pack(card_id, seq),
            L.COUPON.pack(L.COUPON_VERSION, L.COUPON_ISSUED, coupon_id, 0, ts_us, until, seq, 0, 0,
                          bytes(16)))


class _LmdbLots:
    """``lots.Lots``' store over ``points_lots`` and ``lots_by_day`` in a write transaction. The
    lots go through one cursor: a card's next read or write after ``oldest`` lands on the page
    the cursor is on, which LMDB checks before it searches from the root."""

    def __init__(self, txn, ledger: "Ledger") -> None:
        self.txn, self.db, self.by_day = txn, ledger.points_lots, ledger.lots_by_day
        self.cursor = txn.cursor(db=self.db) if self.db is not None else None

    def get(self, card_id: bytes, day: int):
        raw = self.cursor.get(L.LOT_KEY.pack(card_id, day))
        return None if raw is None else L.POINTS_LOT.unpack(raw)

    def put(self, card_id: bytes, day: int, left: int, earned: int, new: bool) -> None:
        self.cursor.put(L.LOT_KEY.pack(card_id, day), L.POINTS_LOT.pack(left, earned))
        if new:  # an existing lot is in the index already
            self.txn.put(L.LOT_DAY_KEY.pack(day, card_id), b"", db=self.by_day)

    def delete(self, card_id: bytes, day: int) -> None:
        self.txn.delete(L.LOT_KEY.pack(card_id, day), db=self.db)
        self.txn.delete(L.LOT_DAY_KEY.pack(day, card_id), db=self.by_day)

    def oldest(self, card_id: bytes):
        cur = self.cursor
        if not cur.set_range(card_id):
            return None
        key, value = cur.item()
        if key[:L.CARD_ID_SIZE] != card_id:
            return None
        return (L.LOT_KEY.unpack(key)[1], *L.POINTS_LOT.unpack(value))


class LedgerFormatError(Exception):
    """The folder holds a ledger of another format (a v1 ledger: run ``cardcore migrate``)."""


class Ledger:
    def __init__(self, path: str, *, initial_program: str | None = None, sync: bool = True,
                 map_size: int = MAP_SIZE_INITIAL, readonly: bool = False,
                 initial_request_window_s: int = REQUEST_WINDOW_S_DEFAULT,
                 lookup_key: bytes | None = None, profile_key: bytes | None = None,
                 day_totals: bool = True, member_metrics_kept: bool = True,
                 initial_time_us: int | None = None) -> None:
        """Open (or, writable, create) the ledger at ``path``. A new ledger stores
        ``initial_program`` (a TOML document; default: the default program) as version 1, and
        its request retention window (changed later through the writer: ``window_op``).
        ``lookup_key`` (``lookup.lookup_key``): the writer keeps the member index with it (the
        server's writer has it; tools and tests that write without it leave the index to be
        filled again by the next writer that has it). ``profile_key``
        (``profiles.profile_key``): stored profiles are read with it (without it, of a sealed
        profile only its masked number), and a writer that has it seals the ones stored before
        profiles were sealed. ``day_totals`` False: the writer keeps no day totals (for the
        benchmark that measures their cost only; the next writer with them fills them again);
        ``member_metrics_kept`` False: likewise for the member metrics (``cardcore.members``).
        ``initial_time_us``: a new ledger journals its program at this time, not now (Cluster:
        a shard's replicas start identical from its genesis record, docs/cluster.md)."""
        self._initial_time_us = initial_time_us
        if initial_request_window_s < REQUEST_WINDOW_S_MIN:
            raise ValueError(f"the request window is at least {REQUEST_WINDOW_S_MIN} s")
        self.path = path
        self.readonly = readonly
        self.member_index = MemberIndex(lookup_key) if lookup_key is not None else None
        self.profile_box = ProfileBox(profile_key)
        self._initial_window_s = initial_request_window_s
        self.request_window_us = initial_request_window_s * 1_000_000
        self.keep_day_totals = day_totals  # (self.day_totals is the sub-database)
        self.keep_member_metrics = member_metrics_kept
        self.day_settings: dict[int, tuple[int, int]] = {}  # program version -> business day
        # Explicit options: durability (sync/metasync) is the point of the ledger;
        # writemap off keeps stray pointer writes from touching the file.
        self.env = lmdb.open(path, subdir=True, map_size=map_size, max_dbs=MAX_DBS, sync=sync,
                             metasync=sync, writemap=False, readahead=False,
                             max_readers=MAX_READERS, lock=True, readonly=readonly)
        # Readers hold this while a read transaction is open; the writer holds it to
        # grow the map, which LMDB allows only with no transaction active.
        self._resize_gate = threading.Lock()
        if not readonly:
            self.reader_check()
        self._open_dbs()
        self.program: Program | None = None
        self.program_version = 0
        self.program_packed = b""
        self.pruned_through_us = 0
        self.forwards: dict[bytes, int] = {}  # card numbers forwarded (layout.FORWARD): shard
        self.legacy = False
        if not readonly and self._read(lambda txn: txn.get(META_BIRTHS, db=self.meta)) is None:
            self._fill_birth_months()
        if (not readonly and day_totals
                and self._read(lambda txn: txn.get(META_DAY_TOTALS, db=self.meta))
                != daytotals.DAY_TOTALS_FILLED):
            self._fill_day_totals()
        if (not readonly and member_metrics_kept and self._read(
                lambda txn: txn.get(member_metrics.META_MEMBER_METRICS, db=self.meta)) is None):
            self._fill_member_metrics()
        if (not readonly and self.member_index is not None
                and self._read(lambda txn: txn.get(META_MEMBERS, db=self.meta)) is None):
            self._fill_members()
        if (not readonly and self.profile_box.keyed
                and self._read(lambda txn: txn.get(META_PROFILES_SEALED, db=self.meta)) is None):
            self._seal_profiles()
        if not readonly and self._read(lambda txn: txn.get(META_PROGRAM, db=self.meta)) is None:
            # a new ledger (or one whose creation stopped before its program was stored)
            self._initialise(DEFAULT_PROGRAM_TOML if initial_program is None else initial_program)
        self._load_state()

    def _open_dbs(self) -> None:
        """Open every sub-database, creating them in a new ledger (writable)."""
        try:
            self.meta = self.env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            try:
                self.env.open_db(b"journal", create=False)
            except lmdb.NotFoundError:
                if self.readonly:
                    raise LedgerFormatError(f"{self.path}: no ledger yet") from None
            else:
                raise LedgerFormatError(f"{self.path}: a ledger of format 1: run cardcore migrate "
                                        "(or start the server, which migrates it)") from None
            # one write transaction (one fsync, not one per sub-database), so a crash while a
            # ledger is made leaves all its sub-databases or none (its program and the fills
            # below come in transactions of their own, each done again by the next open)
            with self.env.begin(write=True) as txn:
                for name in DB_NAMES:
                    setattr(self, name, self.env.open_db(name.encode(), txn=txn, create=True))
                txn.put(META_FORMAT, U32.pack(L.LEDGER_FORMAT), db=self.meta)
                txn.put(META_PRUNED_THROUGH, I64.pack(0), db=self.meta)
                txn.put(META_WINDOW, U32.pack(self._initial_window_s), db=self.meta)
            return
        missing = []
        for name in DB_NAMES:
            try:
                db = self.env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                if name not in ADDED_DB_NAMES:
                    raise
                db = None  # a read-only look at a ledger made before it: nothing stored there
                missing.append(name)
            setattr(self, name, db)
        if missing and not self.readonly:
            self._add_card_programs(missing)
        fmt = self._read(lambda txn: txn.get(META_FORMAT, db=self.meta))
        if fmt is None or U32.unpack(fmt)[0] != L.LEDGER_FORMAT:
            raise LedgerFormatError(f"{self.path}: ledger format {fmt!r} unknown")

    def _fill_birth_months(self) -> None:
        """Cards opened before card records kept the member's birth month (rule 5's birthday
        points) get it from their profiles, once, in one write transaction."""
        with self.env.begin(write=True) as txn:
            updates = []
            for card_id, raw in txn.cursor(db=self.profiles):
                month = profile_month(self.open_profile(card_id, raw))
                rec = txn.get(card_id, db=self.cards) if month else None
                if rec is not None and rec[_CARD_BIRTH_MONTH] == 0:
                    updates.append((card_id, b"".join((rec[:_CARD_BIRTH_MONTH], U32.pack(month),
                                                       rec[_CARD_BIRTH_MONTH + 4:]))))
            txn.cursor(db=self.cards).putmulti(updates)
            txn.put(META_BIRTHS, b"\x01", db=self.meta)
        if updates:
            log.info("birth months kept in %d card records, from their profiles", len(updates))

    def _fill_day_totals(self) -> None:
        """The day totals from the whole journal, in one write transaction: once for a ledger
        made before them (or after a writer that ran without them: what it left is dropped)."""
        with self.env.begin(write=True) as txn:
            for name in daytotals.DB_NAMES:
                txn.drop(getattr(self, name), delete=False)
            count = daytotals.fill(txn, self)
            txn.put(META_DAY_TOTALS, daytotals.DAY_TOTALS_FILLED, db=self.meta)
        if count:
            log.info("day totals filled from %d journal entries", count)

    def _fill_member_metrics(self) -> None:
        """The member metrics from the whole journal, in one write transaction: once for a
        ledger made before them (or after a writer that ran without them)."""
        with self.env.begin(write=True) as txn:
            count = member_metrics.fill(txn, self)
        if count:
            log.info("member metrics filled from the journal: %d members", count)

    def _seal_profiles(self) -> None:
        """Profiles stored before they were sealed (their JSON), sealed once (``cardcore.
        profiles``), in one write transaction; a writer without the key leaves a mark unset, so
        the next one with it seals what that one stored."""
        box = self.profile_box
        with self.env.begin(write=True) as txn:
            sealed = [(cid, box.seal(cid, self.open_profile(cid, raw)))
                      for cid, raw in txn.cursor(db=self.profiles) if not box.is_sealed(raw)]
            txn.cursor(db=self.profiles).putmulti(sealed)
            txn.put(META_PROFILES_SEALED, b"\x01", db=self.meta)
        if sealed:
            log.info("sealed %d member profiles stored before profiles were sealed", len(sealed))

    def _fill_members(self) -> None:
        """The member index (rule 17) rebuilt from every profile, in one write transaction: once
        for cards opened before it existed, and again after a writer without the lookup key
        stored profiles."""
        with self.env.begin(write=True) as txn:
            items = self.member_index.items(
                (card_id, self.open_profile(card_id, raw))
                for card_id, raw in txn.cursor(db=self.profiles))
            txn.drop(self.members, delete=False)
            txn.cursor(db=self.members).putmulti(items)
            txn.put(META_MEMBERS, b"\x01", db=self.meta)
        log.info("member index: %d phone and name keys, from the profiles", len(items))

    def _add_card_programs(self, missing: list[str]) -> None:
        """Create the card programs' sub-databases in a ledger made before them, and give every
        card that was topped up its program state (top-up count and total) from the journal, so
        a "first top-up" promotion knows the card's past: one write transaction, so a crash
        leaves either the old ledger or the whole addition."""
        with self.env.begin(write=True) as txn:
            for name in missing:
                setattr(self, name, self.env.open_db(name.encode(), txn=txn, create=True))
            counts: dict[bytes, list[int]] = {}
            for _, entry in (txn.cursor(db=self.journal) if "card_ext" in missing else ()):
                if entry[1] == L.OP_TOP_UP:
                    _, _, _, _, _, _, _, _, cid, amount = L.JOURNAL.unpack_from(entry)[:10]
                    c = counts.setdefault(cid, [0, 0])
                    c[0] += 1
                    c[1] += amount
            if "card_ext" in missing:
                txn.cursor(db=self.card_ext).putmulti(
                    [(cid, L.CARD_EXT.pack(L.CARD_EXT_VERSION, 0, bytes(2), min(n, 0xFFFFFFFF),
                                           total, *[0] * (2 * L.PROMOTION_SLOTS), 0, 0, 0, 0,
                                           bytes(24)))
                     for cid, (n, total) in sorted(counts.items())])
            if "card_entries" in missing:  # every card's history, from the journal
                txn.cursor(db=self.card_entries).putmulti(sorted(
                    history_items(entry for _, entry in txn.cursor(db=self.journal))))
            if "points_lots" in missing:  # every point the cards hold, in the lot it was earned in
                records = lots.rebuild(txn.cursor(db=self.journal)).records()
                txn.cursor(db=self.points_lots).putmulti(sorted(records.items()))
                txn.cursor(db=self.lots_by_day).putmulti(sorted(
                    (L.LOT_DAY_KEY.pack(day, cid), b"")
                    for cid, day in (L.LOT_KEY.unpack(k) for k in records)))
        log.info("added the card programs' sub-databases %s; %d cards' top-ups counted",
                 ", ".join(missing), len(counts))

    def _initialise(self, program_source: str) -> None:
        parse_program(program_source)  # a bad initial program fails here, before anything is written
        outcome = self.apply_group([PendingOp.admin(b"", L.OP_PROGRAM_LOADED, bytes(16),
                                                    program_source.encode(), 0)],
                                   self._initial_time_us or time.time_ns() // 1000)[0]
        if outcome.reason != L.R_OK:
            raise InvariantError(f"the initial program was refused: {outcome.reason}")

    def _load_state(self) -> None:
        """What the writer keeps between groups: the current program, the request horizons."""
        def read(txn):
            meta = dict(txn.cursor(db=self.meta))
            version = U32.unpack(meta[META_PROGRAM])[0]
            cur = txn.cursor(db=self.requests)
            legacy = cur.set_range(LEGACY_PREFIX) and cur.key().startswith(LEGACY_PREFIX)
            forwards = {key[len(L.FORWARD_KEY_PREFIX):]: L.FORWARD.unpack(value)[1]
                        for key, value in meta.items() if key.startswith(L.FORWARD_KEY_PREFIX)}
            return (version, json.loads(txn.get(L.VERSION_KEY.pack(version), db=self.programs)),
                    I64.unpack(meta[META_PRUNED_THROUGH])[0], legacy,
                    U32.unpack(meta[META_WINDOW])[0], forwards)

        # legacy: request records migrated from a v1 ledger remain (looked up by request_id
        # alone until they are pruned)
        version, rec, self.pruned_through_us, self.legacy, window_s, self.forwards = \
            self._read(read)
        self.request_window_us = window_s * 1_000_000
        self.program = parse_program(rec["source"])
        self.program_version = version
        self.program_packed = self.program.packed(version)

    def read_data_key(self) -> tuple[int, bytes]:
        """The data key version the last rotation made current and its key's fingerprint
        ((0, zeros): none recorded; zeros: a rotation from before fingerprints)."""
        return recorded_data_key(self._read(lambda txn: txn.get(META_DATA_KEY, db=self.meta)))

    def read_admin_relay(self, txn=None) -> tuple[int, int, int] | None:
        """(admin shard, role, its last group relayed here) if this ledger is a shard of a
        cluster with an admin shard (docs/cluster.md, "The admin shard"; layout.RELAY_ROLE_*);
        None: it takes admin changes itself."""
        def read(t):
            raw = t.get(META_ADMIN_RELAY, db=self.meta)
            return None if raw is None else L.ADMIN_RELAY_SUBJECT.unpack(raw)
        return read(txn) if txn is not None else self._read(read)

    def read_outbox(self, limit: int = L.OUTBOX_DONE_MAX) -> list[tuple]:
        """The outbox (layout.OUTBOX), oldest first, at most ``limit`` records: what this card
        shard owes other card shards, not yet delivered."""
        def read(txn):
            out = []
            cur = txn.cursor(db=self.meta)
            if cur.set_range(L.OUTBOX_KEY_PREFIX):
                for key, value in cur:
                    if not key.startswith(L.OUTBOX_KEY_PREFIX) or len(out) >= limit:
                        break
                    out.append(L.OUTBOX.unpack(value))
            return out
        return self._read(read)

    def read_forwards(self, after: int = 0) -> list[tuple[int, bytes, int]]:
        """The card numbers this card shard forwarded after its ``after``-th, in the order made:
        (n, card id, the shard that holds the card) (layout.FORWARD)."""
        def read(txn):
            out = []
            cur = txn.cursor(db=self.meta)
            if cur.set_range(L.FORWARDS_KEY_PREFIX + L.FORWARDS_KEY.pack(after + 1)):
                for key, card in cur:
                    if not key.startswith(L.FORWARDS_KEY_PREFIX):
                        break
                    _, shard, n = L.FORWARD.unpack(txn.get(L.FORWARD_KEY_PREFIX + card,
                                                           db=self.meta))
                    out.append((n, card, shard))
            return out
        return self._read(read)

    def read_program_version(self) -> int:
        """The current program's version as LMDB holds it now (a reader compares it with
        ``program_version`` to know whether to ``refresh_program``)."""
        return self._read(lambda txn: U32.unpack(txn.get(META_PROGRAM, db=self.meta))[0])

    def of_card(self, card_id: bytes) -> "Ledger":
        """The ledger that holds card ``card_id``: this one (a front over several card shards
        reads through one that answers the card's shard's: ``server.sharded.ShardedLedger``)."""
        return self

    def refresh_program(self) -> None:
        """A reader adopts the current program after a program load (the writer does at once)."""
        self._load_state()

    def reader_check(self) -> int:
        """Clear the reader slots of processes that died (kill -9): they would pin old pages for
        ever. The writer runs it at start and on a timer."""
        stale = self.env.reader_check()
        if stale:
            log.warning("cleared %d stale LMDB reader slots", stale)
        return stale

    def _read(self, fn):
        """Run ``fn(txn)`` in a read transaction; adopt a map another process has grown."""
        for _ in range(MAP_GROW_ATTEMPTS):
            try:
                with self._resize_gate, self.env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                with self._resize_gate:
                    self.env.set_mapsize(0)
        raise RuntimeError("LMDB map keeps being resized")

    def close(self) -> None:
        self.env.close()

    @property
    def next_seq(self) -> int:
        return self._read(lambda txn: _head(self, txn)[0])

    # ---- writer -------------------------------------------------------------

    def apply_group(self, ops: list[PendingOp], ts_us: int) -> list[Outcome]:
        """Apply ``ops`` in arrival order in one write transaction; return one outcome each.

        Raises on a broken invariant (the transaction is aborted, nothing is
        written); grows the map and retries when LMDB reports it full.
        """
        for _ in range(MAP_GROW_ATTEMPTS):
            try:
                group = _Group(self, ops, ts_us)
                with self.env.begin(write=True) as txn:
                    outcomes = group.apply(txn)
                group.adopt()  # only once the commit (and its fsync) succeeded
                return outcomes
            except lmdb.MapFullError:
                self.grow_map()
        raise RuntimeError("LMDB map still full after growing it")

    def apply_in(self, txn, ops: list[PendingOp], ts_us: int) -> list[Outcome]:
        """Apply ``ops`` in ``txn`` (the group log's writer: a write transaction that spans
        groups until a checkpoint commits it) and adopt what the group changed at once; the caller
        that aborts ``txn`` instead calls ``reload``. Raises as ``apply_group`` does, except that a
        full map is the caller's to handle (``txn`` is spoilt)."""
        group = _Group(self, ops, ts_us)
        outcomes = group.apply(txn)
        group.adopt()
        return outcomes

    def reload(self) -> None:
        """Forget what groups of an aborted transaction adopted: back to the committed state
        (a program version they loaded may come again with other settings)."""
        self.day_settings.clear()
        self._load_state()

    def journal_head(self, txn) -> tuple[int, bytes]:
        """(the last journal seq, 0 if none; its chained digest)."""
        next_seq, digest, _ = _head(self, txn)
        return next_seq - 1, digest

    def log_applied(self, txn=None) -> int:
        """The last group of the group log this ledger holds (0: none)."""
        def read(t):
            raw = t.get(META_LOG_APPLIED, db=self.meta)
            return U64.unpack(raw)[0] if raw is not None else 0
        return read(txn) if txn is not None else self._read(read)

    def set_log_applied(self, txn, group_no: int) -> None:
        txn.put(META_LOG_APPLIED, U64.pack(group_no), db=self.meta)

    def grow_map(self) -> None:
        with self._resize_gate:
            new_size = self.env.info()["map_size"] * MAP_GROW_FACTOR
            self.env.set_mapsize(new_size)
        log.warning("LMDB map grown to %d MiB", new_size >> 20)

    def landed(self, ops: list[PendingOp]) -> list[Outcome]:
        """After a write that failed for the storage's sake (disk full, I/O error), what landed?

        A failed LMDB commit normally leaves the previous state, but a failure
        while syncing can leave the new one: so ask the ledger, not the error.
        An operation whose request record is there was applied (its original
        outcome); any other was not (REASON_STORAGE_UNAVAILABLE), including
        the server's own operations, which have no record (they are repeated
        later: a re-seal and a floor are compare-and-set, a prune step
        repeats itself).
        """
        def read(txn):
            out, seen = [], set()
            for op in ops:
                key = op.request_key
                idem = txn.get(key, db=self.requests) if key else None
                if idem is None:
                    out.append(Outcome(L.R_STORAGE_UNAVAILABLE, False, op.op_type, None))
                else:
                    landed = replay(txn, self.journal, idem, op.digest, self.journal_lines)
                    out.append(landed._replace(replayed=key in seen))
                seen.add(key)
            return out

        return self._read(read)

    # ---- readers (never wait for the writer) --------------------------------

    def read_card(self, card_id: bytes) -> tuple[tuple, dict] | None:
        """The card's record fields (layout.CARD order) and its profile, or None."""
        def read(txn):
            raw = txn.get(card_id, db=self.cards)
            return None if raw is None else (raw, txn.get(card_id, db=self.profiles))

        found = self._read(read)
        if found is None:
            return None
        raw, profile = found
        rec = L.CARD.unpack(raw)
        if rec[0] != L.CARD_VERSION:
            raise InvariantError(f"card record version {rec[0]} unknown")
        return rec, self.open_profile(card_id, profile)

    def open_profile(self, card_id: bytes, raw: bytes | None) -> dict:
        """A stored profile, opened (``cardcore.profiles``): a damaged one reads as empty, and
        says so in the log, never stopping a read or a write."""
        try:
            return self.profile_box.open(card_id, raw)
        except (ProfileError, ValueError):
            log.error("card ...%s: its stored profile does not open", card_id.hex()[:8])
            return {}

    def read_lineage(self, card_id: bytes) -> list[bytes]:
        """The cards ``card_id`` replaced (rule 16), the latest first."""
        return self._read(lambda txn: predecessors(txn, self, card_id))

    def read_replacement(self, card_id: bytes) -> str:
        """The masked number of the card that replaced ``card_id`` (rule 16), or ""."""
        def read(txn):
            later = linked(_links(txn, self), SUCCESSOR, card_id)  # the last holds it now
            return txn.get(later[-1], db=self.profiles) if later else None

        return masked_of(self._read(read))

    def quote(self, op: PendingOp, ts_us: int, blind: bool = False) -> tuple[bytes, bytes, bytes]:
        """A dry run of operation ``op`` through the kernel, on copies of its card's records
        under the current program: (its journal entry, its lines as the kernel filled them, the
        card record after). Nothing is written and no sequence is taken (the entry's seq is
        non-zero when it would apply). A tier review due first (rule 11) is run first. ``blind``: as if the card held enough money and the points
        offered, so the answer tells nothing of its balances (a terminal without the PIN)."""
        def read(txn):
            ext = txn.get(op.card_id, db=self.card_ext) if self.card_ext is not None else None
            return txn.get(op.card_id, db=self.cards), ext, items_of(txn, self, [op])

        rec, ext, (coupon_slots, _, coupons) = self._read(read)
        records = bytearray(rec or EMPTY_RECORD)
        if blind and rec is not None:
            f = list(L.CARD.unpack(rec))
            f[5], f[6], f[8] = L.INT64_MAX // 4, 0, 0  # principal, bonus, held
            f[7] = min(L.OP_PROGRAM.unpack_from(op.packed, L.OP_OFF_PROGRAM)[1], L.INT64_MAX // 4)
            records = bytearray(L.CARD.pack(*f))
        extras = bytearray(ext or EMPTY_EXT)
        ops, slots = op.packed, array("I", [0])
        period = self.program.tier_review_days if self.program is not None else 0
        if rec is not None and review_due(period, *_EXT_REVIEW.unpack_from(extras),
                                          lots.day_of(ts_us)):
            # the review the writer would run first (rule 11): the purchase at the new tier
            ops = PendingOp.build(b"", L.OP_TIER_REVIEWED, op.card_id).packed + ops
            slots.append(0)
            coupon_slots.insert(0, L.SLOT_NONE)
        lines, out = bytearray(op.lines), bytearray(len(slots) * L.JOURNAL_SIZE)
        kernel.apply_batch(self.program_packed, ops, lines, slots, records, extras,
                           coupon_slots, coupons, out, bytearray(1),
                           bytearray(len(coupons) // L.COUPON_SIZE), ts_us, 1)
        return bytes(out[-L.JOURNAL_SIZE:]), bytes(lines), bytes(records)

    def read_coupons(self, card_id: bytes) -> list[tuple]:
        """The card's coupons (layout.COUPON fields each, serial order), used or not."""
        return [L.COUPON.unpack(v) for v in self._read_items(self.coupons, card_id)]

    def read_packages(self, card_id: bytes) -> list[tuple]:
        """The card's packages (layout.PACKAGE fields each, serial order), used up or not."""
        return [L.PACKAGE.unpack(v) for v in self._read_items(self.packages, card_id)]

    def read_holds(self, card_id: bytes) -> list[tuple]:
        """The card's open holds (layout.HOLD fields each, serial order)."""
        return [f for f in map(L.HOLD.unpack, self._read_items(self.holds, card_id))
                if f[1] == L.HOLD_OPEN]

    def read_lots(self, card_id: bytes) -> list[tuple[int, int, int]]:
        """The card's points lots, oldest first: (earned day, points left, points earned)."""
        if self.points_lots is None:
            return []

        def read(txn):
            cur = txn.cursor(db=self.points_lots)
            out = []
            if cur.set_range(card_id):
                for key, value in cur:
                    if key[:L.CARD_ID_SIZE] != card_id:
                        break
                    out.append((L.LOT_KEY.unpack(key)[1], *L.POINTS_LOT.unpack(value)))
            return out

        return self._read(read)

    def _read_items(self, db, card_id: bytes) -> list[bytes]:
        if db is None:
            return []

        def read(txn):
            cur = txn.cursor(db=db)
            out = []
            if cur.set_range(card_id):
                for key, value in cur:
                    if key[:L.CARD_ID_SIZE] != card_id:
                        break
                    out.append(value)
            return out

        return self._read(read)

    def read_basket(self, tag: int) -> list[bytes]:
        """The journal entries of a basket's payments (split tender), in sequence order."""
        if self.baskets is None:
            return []

        def read(txn):
            cur = txn.cursor(db=self.baskets)
            out = []
            if cur.set_range(BASKET_KEY.pack(tag, 0)):
                for key, _ in cur:
                    key_tag, seq = BASKET_KEY.unpack(key)
                    if key_tag != tag:
                        break
                    out.append(txn.get(L.SEQ_KEY.pack(seq), db=self.journal))
            return out

        return self._read(read)

    def read_lines(self, seq: int) -> bytes:
        """The lines of the applied purchase at ``seq`` (layout.LINE each), or b""."""
        if self.journal_lines is None:
            return b""
        return self._read(lambda txn: txn.get(L.SEQ_KEY.pack(seq), db=self.journal_lines)) or b""

    def read_history(self, card_id: bytes, before_seq: int = 0, limit: int = 20,
                     from_us: int = 0, to_us: int = 0,
                     types: frozenset[int] = frozenset()) -> tuple[list[tuple[bytes, bytes]], int]:
        """A card's journal entries, newest first: (up to ``limit`` of (entry, its lines), the seq
        to ask ``before_seq`` next, 0 when there are no more). Only entries below ``before_seq``
        (0: all), in ``[from_us, to_us)`` (0: open) and of ``types`` (empty: all), judged on the
        card's history index; one page looks at HISTORY_SCAN_MAX index entries at most (then the
        next page goes on from there). A card that replaced another (rule 16) goes on with the
        history of the card it replaced, whose entries are all older."""
        assert 1 <= limit <= HISTORY_PAGE_MAX

        def read(txn):
            if self.card_entries is None:
                return [], 0
            cur = txn.cursor(db=self.card_entries)
            page, scanned = [], 0
            for cid in (card_id, *predecessors(txn, self, card_id)):
                start = L.CARD_ENTRY_KEY.pack(cid, before_seq or (1 << 64) - 1)
                found = cur.prev() if cur.set_range(start) else cur.last()  # the last below start
                while found:
                    key = cur.key()
                    if key[:L.CARD_ID_SIZE] != cid:
                        break
                    seq = L.CARD_ENTRY_KEY.unpack(key)[1]
                    if len(page) == limit or scanned == HISTORY_SCAN_MAX:
                        return page, seq + 1  # the page ends above this one: ask below seq + 1
                    scanned += 1
                    op, ts_us = L.CARD_ENTRY.unpack(cur.value())
                    # (no early stop below from_us: entries migrated from release 1 may go back
                    # in time; the scan cap bounds the page)
                    if (from_us <= ts_us and (not to_us or ts_us < to_us)
                            and (not types or op in types)):
                        page.append(self._entry_and_lines(txn, seq))
                    found = cur.prev()
            return page, 0

        return self._read(read)

    def read_entry(self, seq: int) -> tuple[bytes, bytes] | None:
        """Journal entry ``seq`` and its lines, or None."""
        return self._read(lambda txn: self._entry_and_lines(txn, seq))

    def read_journal(self, from_seq: int, limit: int) -> list[tuple[bytes, bytes]]:
        """The journal from ``from_seq`` on, in seq order: at most ``limit`` (entry, its lines),
        from one read transaction, held only for the page (a long one would pin old pages and
        grow the file). Fewer than ``limit``: the journal ended there when it was read. The
        journal feed's page; seqs have no gaps, so the next page starts at the last seq + 1."""
        assert 1 <= limit <= JOURNAL_PAGE_MAX and from_seq >= 0

        def read(txn):
            cur = txn.cursor(db=self.journal)
            page = []
            if not cur.set_range(L.SEQ_KEY.pack(from_seq)):
                return page
            for key, entry in cur.iternext():
                page.append((entry, self._lines_of(txn, key, entry)))
                if len(page) == limit:
                    break
            return page

        return self._read(read)

    def _entry_and_lines(self, txn, seq: int) -> tuple[bytes, bytes] | None:
        """Journal entry ``seq`` and its purchase lines (b"" for an entry without), or None."""
        key = L.SEQ_KEY.pack(seq)
        entry = txn.get(key, db=self.journal)
        if entry is None:
            return None
        return entry, self._lines_of(txn, key, entry)

    def _lines_of(self, txn, key: bytes, entry: bytes) -> bytes:
        """The stored lines of the journal entry under ``key`` (b"" for an entry without)."""
        return txn.get(key, db=self.journal_lines) or b"" if entry_line_count(entry) else b""

    def read_operation(self, key: bytes) -> Outcome | None:
        """The original outcome of a request (its key: namespace and request_id), or None."""
        def read(txn):
            idem = txn.get(key, db=self.requests)
            if idem is None:
                return None
            return replay(txn, self.journal, idem, None, self.journal_lines)

        return self._read(read)

    def read_horizons(self) -> tuple[int, int, int]:
        """(pruned_through_us, request window in µs, the ledger's time) as the ledger holds them
        now: a request is too old for the writer when its client time is at or before the first
        or older than the window at the ledger's time."""
        pruned, window, clock = self._read(lambda txn: (
            txn.get(META_PRUNED_THROUGH, db=self.meta), txn.get(META_WINDOW, db=self.meta),
            _head(self, txn)[2]))
        return I64.unpack(pruned)[0], U32.unpack(window)[0] * 1_000_000, clock

    def read_terminal(self, terminal_id: int) -> tuple | None:
        raw = self._read(lambda txn: txn.get(L.TERMINAL_KEY.pack(terminal_id), db=self.terminals))
        return None if raw is None else L.TERMINAL.unpack(raw)

    def read_terminals(self) -> list[tuple]:
        return self._read(lambda txn: [L.TERMINAL.unpack(v) for _, v in txn.cursor(db=self.terminals)])

    def read_operators(self) -> list[dict]:
        return self._read(lambda txn: [json.loads(v) for k, v in txn.cursor(db=self.operators)
                                       if k != OPERATOR_NEXT_ID])

    def read_programs(self) -> dict[int, dict]:
        """Every stored program version: its record (source, sha256, loaded_us, loaded_by)."""
        return self._read(lambda txn: {L.VERSION_KEY.unpack(k)[0]: json.loads(v)
                                       for k, v in txn.cursor(db=self.programs)})

    def read_tree(self) -> tuple[list[dict], list[dict]]:
        """Every region and every store (``stores.read_tree``)."""
        return self._read(lambda txn: stores.read_tree(txn, self))

    def read_region(self, region_id: int) -> dict | None:
        return self._read(lambda txn: stores.read_one(txn, self, "region", region_id))

    def read_store(self, store_id: int) -> dict | None:
        return self._read(lambda txn: stores.read_one(txn, self, "store", store_id))

    def read_store_regions(self) -> dict[int, int]:
        """store -> region of every store in a region (``stores.store_regions``)."""
        return self._read(lambda txn: stores.store_regions(txn, self))

    def read_store_known(self, store_id: int) -> bool:
        """Whether a store is in the registry or has a day totals record (an entry ever)."""
        def read(txn):
            if stores.read_one(txn, self, "store", store_id) is not None:
                return True
            if self.day_totals is None:
                return True  # a read-only look at a ledger before them: cannot tell
            cur = txn.cursor(db=self.day_totals)
            return cur.set_range(L.DAY_KEY.pack(store_id, 0)) and \
                L.DAY_KEY.unpack(cur.key())[0] == store_id
        return self._read(read)

    def read_region_stores(self, region_id: int) -> list[int]:
        """The stores of a region now (``stores.region_stores``)."""
        return self._read(lambda txn: stores.region_stores(txn, self, region_id))

    def read_day(self, store: int, day: int) -> tuple[list[int], tuple | None, list, int]:
        """A store's business day: figures, its close, its clearing, its holds outstanding
        (``daytotals.read_day``)."""
        if self.day_totals is None:
            return [0] * daytotals.WIDTH, None, [], 0
        return self._read(lambda txn: daytotals.read_day(txn, self, store, day))

    def read_report(self, store: int | None, from_day: int, to_day: int, granularity: int,
                    staff: bool = False) -> dict:
        """A store's (None: the chain's) report over business days (``daytotals.report``)."""
        return self._read(lambda txn: daytotals.report(txn, self, store, from_day, to_day,
                                                        granularity, staff))

    def read_by_store(self, from_day: int, to_day: int, covers, report_of: str,
                      granularity: int, staff: bool = False, region_id: int = 0) -> dict:
        """A report with each store's figures over the days (``stores``: [(store, name,
        figures)], ``stores_truncated``), in one read: of the chain (``report_of`` "chain"), a
        region's stores ("region") or the stores ``covers`` admits ("scope": the rows are their
        sum)."""
        def read(txn):
            in_region = (set(stores.region_stores(txn, self, region_id))
                         if report_of == "region" else None)
            admits = (lambda s: s in in_region) if in_region is not None else covers
            listed, truncated = ([], False) if self.day_totals is None else \
                daytotals.stores_in_range(txn, self, from_day, to_day, admits,
                                          daytotals.STORE_ROWS_MAX)
            if report_of == "chain":
                result = daytotals.report(txn, self, None, from_day, to_day, granularity, staff)
            else:  # the sums over every store of the scope, not only the ones listed: a store
                # without entries in the range may still hold money (its holds outstanding),
                # and a listing cut at STORE_ROWS_MAX must not cut the total
                result = daytotals.report(
                    txn, self, None, from_day, to_day, granularity, staff,
                    region_stores=(sorted(in_region) if in_region is not None
                                   else [] if self.day_totals is None
                                   else daytotals.stores_with_records(txn, self, covers)))
            names = {s: (stores.read_one(txn, self, "store", s) or {}).get("name", "")
                     for s, _ in listed}
            result["stores"] = [(s, names[s], values) for s, values in listed]
            result["stores_truncated"] = truncated
            return result
        return self._read(read)

    def read_members(self, from_month: int, to_month: int, as_of: int, limit: int,
                     after: bytes = b"") -> tuple[dict, dict] | None:
        """The member figures of the months and the members dormant as of a day, in one read
        transaction (``cardcore.members``); None: a read-only look at a ledger without them."""
        if self.member_cards is None:
            return None
        return self._read(lambda txn: (
            member_metrics.figures(txn, self, from_month, to_month),
            member_metrics.dormant(txn, self, as_of, limit, after)))
    def read_region_report(self, region_id: int, from_day: int, to_day: int, granularity: int,
                           staff: bool = False) -> dict:
        """A region's report: its stores' now, summed day by day (``daytotals.report``)."""
        def read(txn):
            return daytotals.report(txn, self, None, from_day, to_day, granularity, staff,
                                    region_stores=stores.region_stores(txn, self, region_id))
        return self._read(read)

    def read_sealed(self, after: bytes = b"", limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (card_id, sealed number) pairs with card_id > ``after``, in key order."""
        def read(txn):
            cur = txn.cursor(db=self.cardnos)
            out = []
            if not cur.set_range(after):
                return out
            for key, value in cur:
                if key == after:
                    continue
                out.append((key, value))
                if len(out) >= limit:
                    break
            return out

        return self._read(read)

    def find_members(self, prefix: bytes,
                     limit: int = L.MEMBER_MATCHES_MAX) -> tuple[list[tuple[bytes, tuple, dict]], bool]:
        """Rule 17: the cards under one phone's or name's index prefix, at most ``limit``, each
        (card id, record fields, profile); and whether there are more. Read in one transaction."""
        assert len(prefix) == L.MEMBER_PREFIX.size and 0 < limit <= L.MEMBER_MATCHES_MAX

        def read(txn):
            found: list[tuple[bytes, bytes, bytes | None]] = []
            if self.members is None:
                return found, False
            cur = txn.cursor(db=self.members)
            if not cur.set_range(prefix):
                return found, False
            for key in cur.iternext(values=False):
                if key[:len(prefix)] != prefix:
                    break
                if len(found) == limit:
                    return found, True
                card_id = key[len(prefix):]
                raw = txn.get(card_id, db=self.cards)
                if raw is not None:
                    found.append((card_id, raw, txn.get(card_id, db=self.profiles)))
            return found, False

        found, more = self._read(read)
        return [(card_id, L.CARD.unpack(raw), self.open_profile(card_id, profile))
                for card_id, raw, profile in found], more

    def backup(self, dest_dir: str) -> None:
        """A consistent, compacted copy of the whole environment into ``dest_dir`` (a new folder).

        LMDB copies from one read transaction, so this runs while the server
        serves: the copy is the ledger as of that snapshot, and a reader never
        blocks the writer.
        """
        os.makedirs(dest_dir, exist_ok=False)
        self.env.copy(dest_dir, compact=True)

    def dump(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """Every key and value of every sub-database (tests compare copies with this)."""
        return self._read(lambda txn: {name: list(txn.cursor(db=getattr(self, name)))
                                       for name in DB_NAMES if getattr(self, name) is not None})

    def map_usage(self) -> tuple[int, int]:
        """(map size, bytes in use) for monitoring; under the resize gate, like every read."""
        def read(txn):
            info = self.env.info()
            return info["map_size"], (info["last_pgno"] + 1) * self.env.stat()["psize"]

        return self._read(read)

    def stats(self) -> dict:
        def read(txn):
            return {"cards": txn.stat(self.cards)["entries"],
                    "journal": txn.stat(self.journal)["entries"],
                    "requests": txn.stat(self.requests)["entries"],
                    "map_size": self.env.info()["map_size"]}

        return self._read(read)

    def verify(self, problems_max: int = 50, lookup_key: bytes | None = None) -> dict:
        """Check the ledger against its journal (``cardcore.verify``); with the lookup key (or
        the ledger's own), the member index against the profiles too."""
        from cardcore.verify import verify  # only verify's callers load it

        return verify(self, problems_max, lookup_key)


def group_time(given_us: int, last_us: int) -> int:
    """A group's time: the clock it came with, but never back from the ledger's last time and
    never more than CLOCK_STEP_MAX_US past it in one group, so one wild clock step cannot push the
    ledger's time (and the request ages judged on it) days ahead; after a long stop it catches
    up within a few groups (the idle writer gets one a second)."""
    if last_us == 0:
        return given_us
    return max(last_us + 1, min(given_us, last_us + CLOCK_STEP_MAX_US))


def _head(ledger: Ledger, txn) -> tuple[int, bytes, int]:
    """(next journal sequence, the last entry's digest, the ledger's time: the last group's).
    The journal is the truth: read in every write transaction, so a writer that starts while an
    old one finishes its last group stays in sequence."""
    next_seq, digest, last_ts = 1, GENESIS, 0
    cur = txn.cursor(db=ledger.journal)
    if cur.last():
        entry = cur.value()
        next_seq = L.SEQ_KEY.unpack(cur.key())[0] + 1
        digest = entry[L.JOURNAL_DIGEST_OFFSET:]
        last_ts = int.from_bytes(entry[L.JOURNAL_OFF_TS:L.JOURNAL_OFF_TS + 8], "little", signed=True)
    raw = txn.get(META_CLOCK, db=ledger.meta)
    if raw is not None:
        last_ts = max(last_ts, I64.unpack(raw)[0])
    return next_seq, digest, last_ts


class _Group:
    """One group's write: the parent function of every change (the kernel computes, the admin
    state checks, this writes)."""

    def __init__(self, ledger: Ledger, ops: list[PendingOp], ts_us: int):
        self.ledger = ledger
        self.ops = ops
        self.ts_us = ts_us
        self.outcomes: list[Outcome | None] = [None] * len(ops)
        self.entries: list[bytes] = []          # in sequence order, digests not yet chained
        self.idem_items: list[tuple[bytes, bytes]] = []
        self.profile_items: list[tuple[bytes, bytes]] = []
        self.sealed_items: list[tuple[bytes, bytes]] = []
        self.line_items: list[tuple[int, bytes]] = []   # (seq, an applied purchase's lines)
        self.item_items: list[tuple] = []  # (database, key, record): coupons, packages, holds
        self.unindexed: list[bytes] = []   # expiry index keys of holds closed in the run
        self.expired = 0                   # cards whose points the sweep expired
        self.basket_items: list[tuple[bytes, bytes]] = []  # split-tender payments' index
        self.run: list[int] = []                # consecutive card operations for the kernel
        # refunds and reversals: op index -> (undone key or None, undo record, original entry)
        self.undo_of: dict[int, tuple] = {}
        # refunds by line (rule 12): sale seq -> its line refunds record as the group left it;
        # the sales a refund by line of the pending run names (the next is judged after it)
        self.line_refunds: dict[int, bytes] = {}
        self.line_refund_run: set[int] = set()
        # a request key reversed unseen -> the reversals of it pending in the group, or WRITTEN
        self.tombstones: dict[bytes, list[int] | str] = {}
        # reversals of authorizations: op index -> (hold key, the open hold, or None if closed)
        self.hold_reversals: dict[int, tuple[bytes, bytes | None]] = {}
        # refunds and reversals that run alone, ending their run: what they change outside the
        # kernel (a hold, a package, a gift's stock) is read after, and seen by, the others
        self.alone: set[int] = set()
        self.admin: AdminState | None = None
        self.pruned_through_us = ledger.pruned_through_us

    def apply(self, txn) -> list[Outcome]:
        ledger, ops, outcomes = self.ledger, self.ops, self.outcomes
        self.txn = txn
        self.first_seq, prev_digest, last_ts = _head(ledger, txn)
        self.seq = self.first_seq
        ts = self.ts = group_time(self.ts_us, last_ts)
        self.admin = admin = AdminState(ledger, txn)
        admin.given_ts_us = self.ts_us
        self.lots = lots.Lots(_LmdbLots(txn, ledger))
        self._expire()  # before the group's operations: expired points are never spent
        self._release_holds()  # and expired holds hold nothing
        self._expire_cards()  # and an expired card is stored expired before anything names it
        self._review()  # and they run at the tier the card's last period earned
        keys = [op.request_key for op in ops if op.request_key]
        known = dict(txn.cursor(db=ledger.requests).getmulti(keys)) if keys else {}
        legacy = {}
        if keys and ledger.legacy:  # card operations only: see _legacy
            legacy = dict(txn.cursor(db=ledger.requests).getmulti(
                [legacy_key(op.request_key) for op in ops if op.request_key
                 and op.packed[0] <= L.OP_RESET_PIN and op.request_key not in known]))
        holds_no_cards = admin.role() == L.RELAY_ROLE_ADMIN
        card_kinds = L.CARD_OPS | {L.OP_CARD_REPLACED}
        oldest_us, newest_us = self._request_ages()
        first_index: dict[bytes, int] = {}
        repeats: list[tuple[int, int]] = []
        client_time = L.OP_CLIENT_TIME.unpack_from
        card_ops = L.CARD_OPS
        for i, op in enumerate(ops):
            packed = op.packed
            kind = packed[0]
            key = op.request_key
            if holds_no_cards and kind not in L.ADMIN_OPS and kind not in L.INTERNAL_OPS:
                outcomes[i] = Outcome(L.R_NOT_A_CARD_SHARD, False, kind, None)  # (no record,
                continue  # no KSN spent: an access refusal)
            if admin.forwards and kind in card_kinds and op.card_id in admin.forwards:
                outcomes[i] = Outcome(L.R_CARD_ELSEWHERE, False, kind, None)  # (the same:
                continue  # its front sends it on to the shard that holds the card)
            if key:
                client_us = client_time(packed)[0]
                if client_us < oldest_us or client_us > newest_us:
                    outcomes[i] = Outcome(L.R_REQUEST_TOO_OLD if client_us < oldest_us
                                          else L.R_CLIENT_TIME_AHEAD, False, kind, None)
                    continue
            if op.ksn_counter:
                # Before idempotency: a used KSN is refused even on an exact re-send (a terminal
                # retries with a fresh KSN and the same request_id). Access refusals are not
                # business outcomes: no request record, so that retry can still pass.
                reason = admin.take_ksn(op)
                if reason != L.R_OK:
                    outcomes[i] = Outcome(reason, False, kind, None)
                    continue
            if op.need_role or packed[28:32] != NO_OPERATOR:  # an operator: checked now
                reason = admin.authorize(op)
                if reason != L.R_OK:
                    outcomes[i] = Outcome(reason, False, kind, None)
                    continue
            if key and self.tombstones and key in self.tombstones:
                if self.tombstones[key] != _TOMBSTONE_WRITTEN and self.run:
                    self._flush_run()  # whether a reversal of it applied, before judging it
                if self.tombstones.get(key) == _TOMBSTONE_WRITTEN:
                    outcomes[i] = Outcome(L.R_REVERSED, False, kind, None)  # reversed earlier
                    continue  # in this group: the tombstone is its request record
            if key:
                idem = known.get(key)
                if idem is not None:
                    outcomes[i] = replay(txn, ledger.journal, idem, op.digest, ledger.journal_lines)
                    continue
                if legacy and kind <= L.OP_RESET_PIN:  # card operations only (see legacy_digest)
                    idem = legacy.get(legacy_key(key))
                    if idem is not None and L.IDEM.unpack(idem)[4] == legacy_digest(op):
                        outcomes[i] = replay(txn, ledger.journal, idem, None, ledger.journal_lines)
                        continue
                if key in first_index:
                    repeats.append((i, first_index[key]))
                    continue
                first_index[key] = i
            if kind == L.OP_REFUND or kind == L.OP_REVERSAL:
                reason = self._resolve_undo(i, op, first_index)
                if reason != L.R_OK:  # refused before the kernel: the reversal window passed
                    outcomes[i] = Outcome(reason, False, kind, None)
                    if key:
                        self.idem_items.append((key, record(kind, reason, op.digest, 0, 0, ts,
                                                            op.client_time_us)))
                    continue
            if kind in card_ops:
                self.run.append(i)
                if self.alone and i in self.alone:
                    self.alone.discard(i)
                    self._flush_run()  # what comes after it reads the hold, package or stock
            elif kind == L.OP_CARD_REPLACED:
                self._flush_run()  # it reads both cards as the operations before it left them
                self._replace(i, op)
            else:
                self._flush_run()
                self._admin(i, op, kind)
                oldest_us, newest_us = self._request_ages()  # (its window, or a relay's mark)
        self._flush_run()
        for i, j in repeats:
            outcomes[i] = repeat(outcomes[j], ops[i].digest == ops[j].digest)
        self._write(prev_digest)
        return outcomes  # type: ignore[return-value]

    def _request_ages(self) -> tuple[int, int]:
        """(oldest, newest) client time a request with a key may carry. Too old: a re-send of a
        request whose record may be pruned (judged at ``AdminState.judged_us``: the group's time,
        which never goes back, or as the admin shard judged it), never at or before the last
        record pruned; an admin shard prunes none, nor a card shard what it relays (so neither
        judges by that floor: a window raised later judges alike on both). Too far ahead: judged
        on the clock the group came with (a relayed group's: its admin group's), a sanity check
        only (pruning never depends on it)."""
        admin = self.admin
        keeps_all = admin.relaying or admin.role() == L.RELAY_ROLE_ADMIN
        oldest = max(admin.judged_us(self.ts) - admin.request_window_us,
                     0 if keeps_all else self.pruned_through_us + 1)
        return oldest, (admin.relay_ts_us or self.ts_us) + CLIENT_TIME_AHEAD_MAX_US

    def _expire(self) -> None:
        """The expiry sweep (``cardcore.lots``), first thing in a group: lots whose day is at
        least the program's ``points_expire_days`` before this group's day expire, each card's
        through one points-expired operation in the kernel (journaled, its lots consumed by the
        rule like any spend). First the cards the group's operations name (so they never spend
        expired points), then the oldest others, up to EXPIRY_CARDS_MAX of those a group."""
        program = self.admin.program
        days = program.points_expire_days if program is not None else 0
        if not days:
            return
        last_day = lots.day_of(self.ts) - days  # lots of this day and before have expired
        txn, ledger = self.txn, self.ledger
        due: dict[bytes, list[int]] = {}  # card -> [points, newest expired day]
        lot_cur = txn.cursor(db=ledger.points_lots)
        for card_id in dict.fromkeys(op.card_id for op in self.ops
                                     if op.packed[0] in NAMED_CARD_OPS):
            if lot_cur.set_range(card_id):
                for key, value in lot_cur:
                    cid, day = L.LOT_KEY.unpack(key)
                    if cid != card_id or day > last_day:
                        break
                    d = due.setdefault(card_id, [0, day])
                    d[0] += L.POINTS_LOT.unpack(value)[0]
                    d[1] = day
        others = 0
        for key, _ in txn.cursor(db=ledger.lots_by_day):
            day, card_id = L.LOT_DAY_KEY.unpack(key)
            if day > last_day:
                break
            if card_id in due and due[card_id][1] >= day:
                continue  # counted above
            if card_id not in due:
                if others == lots.EXPIRY_CARDS_MAX:
                    break
                others += 1
            lot = txn.get(L.LOT_KEY.pack(card_id, day), db=ledger.points_lots)
            if lot is None:
                raise InvariantError("the lot index names a lot that is not there")
            d = due.setdefault(card_id, [0, day])
            d[0] += L.POINTS_LOT.unpack(lot)[0]
            d[1] = day
        if not due:
            return
        expiries = [PendingOp.build(b"", L.OP_POINTS_EXPIRED, card_id, points, ref_id=day,
                                    caller=(L.CALLER_SYSTEM, 0))
                    for card_id, (points, day) in due.items()]
        if any(o.reason != L.R_OK for o in self._run_internal(expiries)):
            raise InvariantError("a points expiry was declined: the lots and the card disagree")
        self.expired = len(expiries)

    def _release_holds(self) -> None:
        """Rule 15's release, first thing in a group after the points expiry: the open holds
        whose expiry is at or before the group's time, oldest first, up to HOLD_RELEASES_MAX a
        group, each through a hold-expired operation in the kernel (journaled, the server's).
        An idle writer's maintenance groups run it too, so a hold is released within a tick of
        its expiry with no traffic; a capture after its expiry is refused (HOLD_EXPIRED) even
        if its release waits for a later group."""
        if self.ledger.holds_by_expiry is None:
            return
        due = []
        for key, _ in self.txn.cursor(db=self.ledger.holds_by_expiry):
            expires_us, card_id, serial = L.HOLD_EXPIRY_KEY.unpack(key)
            if expires_us > self.ts or len(due) == L.HOLD_RELEASES_MAX:
                break
            due.append(PendingOp.build(b"", L.OP_HOLD_EXPIRED, card_id, link_seq=serial,
                                       caller=(L.CALLER_SYSTEM, 0)))
        if not due:
            return
        if any(o.reason != L.R_OK for o in self._run_internal(due)):
            raise InvariantError("a hold's release was declined: the hold and its index disagree")
        self.expired += len(due)

    def _expire_cards(self) -> None:
        """Rule 14's expiry, first thing in a group after the holds' release: every card the
        group's operations name whose expiry is at or before the group's time, then the oldest
        others the expiry index names, up to CARD_EXPIRIES_MAX, each through a status change to
        expired in the kernel (journaled, the server's, operator 0). The kernel judges an
        operation on a card past its expiry as expired whatever the sweep did; the sweep keeps
        the stored status, GetCard and the journal's story in step with it."""
        index = self.ledger.cards_by_expiry
        if index is None:
            return
        txn, ts = self.txn, self.ts
        first = txn.cursor(db=index)
        if not first.first() or L.CARD_EXPIRY_KEY.unpack(first.key())[0] > ts:
            return  # the index names every card still to expire: none is due (most groups)
        named = list(dict.fromkeys(op.card_id for op in self.ops
                                   if op.packed[0] in NAMED_CARD_OPS))
        due: dict[bytes, None] = {}
        for cid, rec in txn.cursor(db=self.ledger.cards).getmulti(named):
            expires_us = L.CARD_EXPIRES.unpack_from(rec, L.CARD_OFF_EXPIRES)[0]
            if expired(expires_us, ts) and rec[1] in L.STATUSES_LIVE:
                due[cid] = None
        others = 0
        for key, _ in txn.cursor(db=index):
            expires_us, cid = L.CARD_EXPIRY_KEY.unpack(key)
            if expires_us > ts or others == L.CARD_EXPIRIES_MAX:
                break
            if cid not in due:
                due[cid] = None
                others += 1
        if not due:
            return
        changes = [PendingOp.build(b"", L.OP_CARD_STATUS, cid, tier=L.STATUS_EXPIRED,
                                   caller=(L.CALLER_SYSTEM, 0)) for cid in due]
        if any(o.reason != L.R_OK for o in self._run_internal(changes)):
            raise InvariantError("a card's expiry was declined: the card and its index disagree")
        self.expired += len(changes)

    def _resolve_undo(self, i: int, op: PendingOp, first_index: dict[bytes, int]) -> int:
        """What refund or reversal ``i`` undoes (rules 12 and 13), before it joins the run: the
        original's undo record (stored, or assembled from its entry) for the kernel, or none
        (zeros). An original earlier in this group is applied first. A reversal finds its
        original by request key and gets its seq as link_seq; one that was never seen leaves a
        tombstone. The reversal window is checked here (REVERSAL_WINDOW_PASSED)."""
        txn, ledger, kind = self.txn, self.ledger, op.packed[0]
        window_us = self.admin.program.reversal_window_minutes * 60_000_000
        if kind == L.OP_REFUND:
            seq = _U64.unpack_from(op.packed, _OP_LINK)[0]
            if (seq >= self.seq or seq in self.line_refund_run) and self.run:
                self._flush_run()  # perhaps a sale of the pending run, or lines given back in it
            if op.lines:  # marked by an earlier attempt at this group: judged afresh
                op.lines = b""
                _set_line_count(op, 0)
        else:
            live = self._live(op.card_id)
            if live != op.card_id:  # rule 16: sent with a card replaced since: undone on its new
                op.card_id = live   # card, which holds what the request moved
                op.packed = op.packed[:_OP_CARD] + live + op.packed[_OP_CARD + L.CARD_ID_SIZE:]
            original = op.payload
            if original.startswith(L.RELAYED_KEY_PREFIX):  # never a caller's: a record of it
                return L.R_ORIGINAL_NOT_FOUND  # would answer a change relayed later
            j = first_index.get(original)
            if (j is not None or original in self.tombstones) and self.run:
                self._flush_run()  # the original, or a reversal of it, earlier in this group
            seq = 0
            if j is not None:
                done = self.outcomes[j]
                if done is not None and done.reason == L.R_OK and done.entry is not None:
                    seq = _U64.unpack_from(done.entry, L.JOURNAL_OFF_SEQ)[0]
            elif original not in self.tombstones:
                stored = txn.get(original, db=ledger.requests)
                if stored is None:
                    # Never seen, or its record already pruned: only the first can be told.
                    sent_us = _OP_REF.unpack_from(op.packed)[0]  # the original's time, if given
                    if max(self.pruned_through_us, 0) >= (sent_us or self.ts - window_us):
                        return L.R_REVERSAL_WINDOW_PASSED
                    self.tombstones[original] = [i]  # written once a reversal of it applies
                else:
                    _, _, reason, _, _, applied_seq = L.IDEM.unpack(stored)[:6]
                    seq = applied_seq if reason == L.R_OK else 0
            elif self.tombstones[original] != _TOMBSTONE_WRITTEN:
                self.tombstones[original].append(i)
        entry = None
        if seq:
            entry = (self.entries[seq - self.first_seq] if self.first_seq <= seq < self.seq
                     else txn.get(L.SEQ_KEY.pack(seq), db=ledger.journal))
            if (entry is not None and entry[16:32] != op.card_id and entry[1] in L.CARD_OPS
                    and entry[16:32] in predecessors(txn, ledger, op.card_id)):
                pass  # an entry of a card this one replaced (rule 16): undone on this one
            elif entry is None or entry[16:32] != op.card_id or entry[1] not in L.CARD_OPS:
                if kind == L.OP_REVERSAL:  # applied, but not to this card: not this card's to undo
                    return L.R_ORIGINAL_NOT_FOUND
                entry = None
        if kind == L.OP_REVERSAL:  # its link, and its basket (a basket's payment undone)
            basket = _ENTRY_BASKET.unpack_from(entry)[0] if entry is not None else 0
            op.packed = (op.packed[:_OP_LINK] + _U64.pack(seq) + op.packed[_OP_LINK + 8:_OP_BASKET]
                         + _U64.pack(basket) + op.packed[_OP_BASKET + 8:])
        if entry is None:
            self.undo_of[i] = (None, EMPTY_UNDO, None)
            return L.R_OK
        if kind == L.OP_REVERSAL and (
                self.ts - _I64.unpack_from(entry, L.JOURNAL_OFF_TS)[0] > window_us):
            return L.R_REVERSAL_WINDOW_PASSED
        key = L.SEQ_KEY.pack(seq)
        if kind == L.OP_REFUND and op.payload and entry[1] == L.OP_PURCHASE:
            reason = self._mark_lines(op, seq, entry)
            if reason != L.R_OK:
                return reason
        undo = txn.get(key, db=ledger.undone)
        if (kind == L.OP_REVERSAL and entry[1] in _ITEM_UNDONE) or (
                entry[1] == L.OP_PURCHASE and entry[_ENTRY_ITEM_ID] | entry[_ENTRY_ITEM_ID + 1]):
            # alone: what came before it wrote the package or the gift's stock first, and what
            # comes after it sees the coupon it gives back (as it would in a group of its own)
            if self.run:
                self._flush_run()
            self.alone.add(i)
        if kind == L.OP_REVERSAL and entry[1] == L.OP_HOLD and undo is None:
            undo = self._hold_undo(i, op, seq, entry)
            if undo is None:
                return L.R_NOT_REVERSIBLE  # captured: the capture is what to reverse
        self.undo_of[i] = (key, undo or undo_record(entry), entry)
        return L.R_OK

    def _live(self, card_id: bytes) -> bytes:
        """The card that holds what ``card_id`` held: itself, or the card that replaced it (rule
        16), followed while that one was replaced too (only a replaced card has a successor)."""
        later = linked(_links(self.txn, self.ledger), SUCCESSOR, card_id)
        return later[-1] if later else card_id

    def _mark_lines(self, op: PendingOp, seq: int, entry: bytes) -> int:
        """Rule 12 by line: the refund's input lines (the sale's, marked), or why not (a sale
        without lines: INVALID_ARGUMENT; a number it has no line for: LINE_NOT_FOUND). The kernel
        judges the rest."""
        count = entry_line_count(entry)
        asked = line_numbers(op.payload or b"")
        if not count:
            return L.R_INVALID_ARGUMENT
        if any(not 1 <= n <= count for n in asked):
            return L.R_LINE_NOT_FOUND
        sale_lines = next((lines for s, lines in reversed(self.line_items) if s == seq), None)
        if sale_lines is None:
            sale_lines = self.txn.get(L.SEQ_KEY.pack(seq), db=self.ledger.journal_lines)
        if sale_lines is None or len(sale_lines) != count * L.LINE_SIZE:
            raise InvariantError("a purchase with lines has none stored")
        refunded = self.line_refunds.get(seq) or self.txn.get(
            L.SEQ_KEY.pack(seq), db=self.ledger.refunded_lines) or EMPTY_LINE_REFUNDS
        op.lines = refund_input_lines(sale_lines, refunded, asked)
        _set_line_count(op, count)
        self.line_refund_run.add(seq)
        return L.R_OK

    def _hold_undo(self, i: int, op: PendingOp, seq: int, entry: bytes) -> bytes | None:
        """Rule 15: the undo record of an authorization a reversal names, from its hold as the
        group left it so far: what the hold still holds (0: voided or released), or None for a
        captured one. The reversal runs alone at the end of its run (see apply), so what comes
        after it sees the hold closed."""
        if self.run:
            self._flush_run()  # a capture or void of it earlier in the group, first
        hold_key = L.COUPON_KEY.pack(op.card_id, seq)
        hold = self.txn.get(hold_key, db=self.ledger.holds)
        if hold is None:
            raise InvariantError("an applied authorization has no hold")
        state, amount = hold[1], _HOLD_AMOUNT.unpack_from(hold)[0]
        if state == L.HOLD_CAPTURED:
            return None
        self.hold_reversals[i] = (hold_key, hold if state == L.HOLD_OPEN else None)
        self.alone.add(i)
        return L.UNDO.pack(L.UNDO_VERSION, 0, L.OP_HOLD, entry[2], entry[_TIER_AFTER], 0, 0,
                           amount if state == L.HOLD_OPEN else 0, 0, 0, 0, 0, 0)

    def _review(self) -> None:
        """The tier review (``rules`` rule 11), first in a group after the expiry sweep: each
        card the group's operations name whose period has ended, or that the reviewing program
        does not track yet, gets its review entry before them. A card no operation names keeps
        its tier until it is next used."""
        program = self.admin.program
        period = program.tier_review_days if program is not None else 0
        if not period:
            return
        txn, ledger = self.txn, self.ledger
        ids = list(dict.fromkeys(op.card_id for op in self.ops
                                 if op.packed[0] in NAMED_CARD_OPS))
        known = [cid for cid, raw in txn.cursor(db=ledger.cards).getmulti(ids)
                 if raw[1] != L.STATUS_REPLACED]  # dead for ever: nothing to review
        states = dict(txn.cursor(db=ledger.card_ext).getmulti(known))
        today = lots.day_of(self.ts)
        due = [cid for cid in known
               if review_due(period, *_EXT_REVIEW.unpack_from(states.get(cid, EMPTY_EXT)), today)]
        if not due:
            return
        reviews = [PendingOp.build(b"", L.OP_TIER_REVIEWED, cid, caller=(L.CALLER_SYSTEM, 0))
                   for cid in due]
        if any(o.reason != L.R_OK for o in self._run_internal(reviews)):
            raise InvariantError("a tier review was declined: the card's state and the program "
                                 "disagree")

    def _add_gains(self, gains: dict) -> None:
        """Points earned, into their lots (``cardcore.lots``): all pending. Read and written in
        one getmulti and one putmulti: the lots cost an earning purchase little."""
        items = list(gains.items())
        gains.clear()
        txn, ledger = self.txn, self.ledger
        keys = [L.LOT_KEY.pack(cid, day) for (cid, day), _ in items]
        have = dict(txn.cursor(db=ledger.points_lots).getmulti(keys))
        puts, index = [], []
        for key, ((cid, day), gain) in zip(keys, items):
            old = have.get(key)
            left, earned = L.POINTS_LOT.unpack(old) if old is not None else (0, 0)
            puts.append((key, L.POINTS_LOT.pack(left + gain, earned + gain)))
            if old is None:
                index.append((L.LOT_DAY_KEY.pack(day, cid), b""))
        txn.cursor(db=ledger.points_lots).putmulti(puts)
        if index:
            txn.cursor(db=ledger.lots_by_day).putmulti(index)

    def _run_internal(self, internal: list[PendingOp]) -> list[Outcome]:
        """The writer's own card operations (expiries, referral bonuses) through the kernel, as
        one run after what came before them; their outcomes (no request records, no answers)."""
        ops, outcomes, pending = self.ops, self.outcomes, self.run  # the group's own, kept as is
        base = len(ops)
        self.ops = ops + internal
        self.outcomes = outcomes + [None] * len(internal)
        self.run = list(range(base, base + len(internal)))
        self._flush_run()
        done = self.outcomes[base:]
        self.ops, self.outcomes, self.run = ops, outcomes, pending
        return done  # type: ignore[return-value]

    def _admin(self, i: int, op: PendingOp, kind: int) -> None:
        if kind == L.OP_ADMIN_RELAY and i != 0:
            raise InvariantError("an admin relay's mark is not its group's first operation")
        reason, entry = self.admin.apply(op, kind, self.ts, self.seq)
        count = seq = 0
        if kind in L.INTERNAL_OPS:
            count, entry = entry, None
        elif reason == L.R_ADMIN_ELSEWHERE:  # an access refusal: no request record, so that
            self.outcomes[i] = Outcome(reason, False, kind, None)  # a key relayed later is new
            return
        elif reason == L.R_OK:
            self.entries.append(entry)
            seq = self.seq
            self.seq += 1
        if op.request_key:
            self.idem_items.append((op.request_key, record(
                kind, reason, op.digest, seq, 0, self.ts, op.client_time_us)))
        self.outcomes[i] = Outcome(reason, False, kind, entry, 0, count)

    def _flush_run(self) -> None:
        """The kernel over the pending run of card operations, records read in one getmulti and
        written back before anything after the run reads them."""
        run = self.run
        if not run:
            return
        self.run = []
        self.line_refund_run = set()
        ledger, ops, txn, admin = self.ledger, self.ops, self.txn, self.admin
        packed = b"".join([ops[i].packed for i in run])
        # a slot per card, in the order the run names them; whether an operation that changes
        # held_minor (rule 15) is in the run
        if GLUE_IN_C:
            slots = array("I", [0]) * len(run)
            card_ids, hold_run = writerglue.card_slots(packed, slots)
        else:
            slot_of: dict[bytes, int] = {}
            card_ids = []
            slots = array("I")
            hold_run = False
            for i in run:
                op = ops[i]
                cid = op.card_id
                if op.packed[0] >= L.OP_REVERSAL or op.packed[_OP_FLAGS] & L.CAPTURE:
                    hold_run = True
                s = slot_of.get(cid)
                if s is None:
                    s = slot_of[cid] = len(card_ids)
                    card_ids.append(cid)
                slots.append(s)
        cards = txn.cursor(db=ledger.cards)
        stored = dict(cards.getmulti(card_ids))
        records = bytearray(b"".join([stored.get(c, EMPTY_RECORD) for c in card_ids]))
        # Program states: only a top-up reads one (rule 7), so only its cards' are read; unless
        # the program reviews tiers (rule 11), which needs every card's.
        if admin.program is not None and admin.program.tier_review_days:
            ext_ids = set(card_ids)
        else:
            ext_ids = {ops[i].card_id for i in run if ops[i].packed[0] in EXT_READERS}
        ext_cur = txn.cursor(db=ledger.card_ext)
        ext_stored = dict(ext_cur.getmulti(list(ext_ids))) if ext_ids else {}
        extras = bytearray(b"".join([ext_stored.get(c, EMPTY_EXT) for c in card_ids]))
        lines = bytearray(b"".join([ops[i].lines for i in run]))
        undo_of = self.undo_of
        coupon_slots, coupon_keys, coupons = items_of(
            txn, ledger, [ops[i] for i in run], [undo_of.get(i) for i in run] if undo_of else None,
            packed if GLUE_IN_C else None)
        coupon_dirty = bytearray(len(coupon_keys))
        journal_out = bytearray(len(run) * L.JOURNAL_SIZE)
        dirty = bytearray(len(card_ids))
        next_seq = kernel.apply_batch(admin.program_packed, packed,
                                      lines, slots, records, extras, coupon_slots, coupons,
                                      journal_out, dirty, coupon_dirty, self.ts, self.seq)
        if coupon_keys:
            self.item_items.extend(
                writerglue.dirty_items(coupon_keys, coupons, coupon_dirty, L.COUPON_SIZE)
                if GLUE_IN_C else
                [(*coupon_keys[s], bytes(coupons[s * L.COUPON_SIZE:(s + 1) * L.COUPON_SIZE]))
                 for s in range(len(coupon_keys)) if coupon_dirty[s]])
        rec_view, ext_view = memoryview(records), memoryview(extras)
        if GLUE_IN_C:
            cards.putmulti(writerglue.dirty_records(card_ids, records, dirty, DIRTY_CARD,
                                                    L.CARD_SIZE))
            not_live = writerglue.ended_slots(records, dirty, DIRTY_CARD, _LIVE_MASK)
        else:
            cards.putmulti([(card_ids[s], bytes(rec_view[s * L.CARD_SIZE:(s + 1) * L.CARD_SIZE]))
                            for s in range(len(card_ids)) if dirty[s] & DIRTY_CARD])
            not_live = [s for s in range(len(card_ids)) if dirty[s] & DIRTY_CARD
                        and records[s * L.CARD_SIZE + 1] not in L.STATUSES_LIVE]
        ended: list[bytes] = []  # rule 14: cards with an expiry the run expired, closed, replaced
        for s in not_live:
            expires_us = L.CARD_EXPIRES.unpack_from(records, s * L.CARD_SIZE
                                                    + L.CARD_OFF_EXPIRES)[0]
            if expires_us:
                ended.append(L.CARD_EXPIRY_KEY.pack(expires_us, card_ids[s]))
        if ext_ids:
            changed = writerglue.dirty_records(
                card_ids, extras, dirty, DIRTY_EXT, L.CARD_EXT_SIZE) if GLUE_IN_C else [
                (card_ids[s], bytes(ext_view[s * L.CARD_EXT_SIZE:(s + 1) * L.CARD_EXT_SIZE]))
                for s in range(len(card_ids)) if dirty[s] & DIRTY_EXT]
            if any(cid not in ext_ids for cid, _ in changed):
                raise InvariantError("the kernel changed a program state the ledger did not read")
            ext_cur.putmulti(changed)
        if any(packed[L.OP_OFF_ROUTE_FLAGS::L.OP_SIZE]):  # (a front's marks: rare)
            _mark_begun_elsewhere(packed, journal_out)
        out = bytes(journal_out)
        filled_lines = bytes(lines)  # as the kernel filled them: sliced once per purchase below
        line_at = 0
        size, head, ts = L.JOURNAL_SIZE, _ENTRY_HEAD.unpack_from, self.ts
        outcomes, entries, idem_items = self.outcomes, self.entries, self.idem_items
        referrals: list[PendingOp] = []  # one level: a referral bonus never pays another
        day = lots.day_of(ts)
        # (card, day) -> points earned in this run: C's, for a run it takes (ext/writerglue.pyx)
        gains: dict[tuple[bytes, int], int] | None = None
        if GLUE_IN_C and not hold_run:
            gains = self._finish_in_c(run, out, packed, records, slots, filled_lines, day)
        glued = gains is not None
        if gains is None:
            gains = {}
        running: dict[int, int] = {}  # a hold run's cards: slot -> held_minor as the run goes
        for k, i in enumerate(() if glued else run):  # the reference: each run C does not take
            op = ops[i]
            op_type = op.packed[0]
            _, tier, reason, seq, principal_after, bonus_after = head(out, k * size)
            entry = out[k * size:(k + 1) * size]
            available = held_after = 0
            if reason == L.R_OK or reason == L.R_INSUFFICIENT_FUNDS or \
                    reason == L.R_CAPTURE_EXCEEDS_HOLD:
                # held_minor before it: the record's when no operation of the run moves it, else
                # as the run left it so far (from the stored record)
                s = slots[k]
                if not hold_run:
                    held = _I64.unpack_from(records, s * L.CARD_SIZE + _CARD_HELD)[0]
                elif (held := running.get(s)) is None:
                    raw = stored.get(card_ids[s])
                    held = _I64.unpack_from(raw, _CARD_HELD)[0] if raw else 0
            if reason == L.R_OK:  # the card's held_minor after it: the answer's available
                held_after = held
                if hold_run:
                    held_after = running[s] = self._held_after(op, entry, held, coupons,
                                                               coupon_slots[k])
            elif reason == L.R_INSUFFICIENT_FUNDS or reason == L.R_CAPTURE_EXCEEDS_HOLD:
                if _capture(op.packed):
                    hold_amount = _HOLD_AMOUNT.unpack_from(coupons, coupon_slots[k] * L.COUPON_SIZE)[0]
                    # a capture could use its hold: what it holds, or the card's with it released
                    held -= hold_amount
                available = (hold_amount if reason == L.R_CAPTURE_EXCEEDS_HOLD
                             else available_minor(principal_after, bonus_after, held))
            filled = b""
            if op.lines:
                if seq and reason == L.R_OK:
                    filled = filled_lines[line_at:line_at + len(op.lines)]
                    if op_type == L.OP_REFUND:  # by line: the lines it gave back, numbered
                        filled = refund_stored_lines(filled)
                        sale = _U64.unpack_from(op.packed, _OP_LINK)[0]
                        self.line_refunds[sale] = lines_refunded(
                            self.line_refunds.get(sale) or txn.get(
                                L.SEQ_KEY.pack(sale), db=ledger.refunded_lines)
                            or EMPTY_LINE_REFUNDS, filled, seq)
                    self.line_items.append((seq, filled))
                    entry = b"".join((entry[:L.JOURNAL_OFF_LINES_DIGEST], lines_digest(filled),
                                      entry[L.JOURNAL_OFF_LINES_DIGEST + L.LINES_DIGEST_SIZE:]))
                line_at += len(op.lines)
            if seq:  # applied, or a wrong PIN counted
                if seq != self.seq:
                    raise InvariantError("kernel sequence does not match the journal entries")
                entries.append(entry)
                self.seq += 1
            if seq and reason == L.R_OK:
                basket = _ENTRY_BASKET.unpack_from(out, k * size)[0]
                if basket:
                    self.basket_items.append((BASKET_KEY.pack(basket, seq), b""))
                gain, loss = lots.movement(out, k * size)
                if loss:  # oldest first: the gains this run has pending for the card (all of
                    # them today's) go in first; then its own, loss then gain (the rule's
                    # order), while the card's lots are at hand
                    try:
                        if gains and (pending := gains.pop((op.card_id, day), 0)):
                            self.lots.apply(op.card_id, ts, pending, 0)
                        self.lots.apply(op.card_id, ts, gain, loss)
                    except ValueError as exc:
                        raise InvariantError(str(exc)) from None
                elif gain:  # added up per card and day, written once a run
                    where = (op.card_id, day)
                    gains[where] = gains.get(where, 0) + gain
            if reason == L.R_OK and out[k * size + _TIER_AFTER] != tier:  # an upgrade (rule 8)
                counts = admin.tier_cards()
                counts[tier] -= 1
                counts[out[k * size + _TIER_AFTER]] += 1
            if reason == L.R_OK and op_type == L.OP_COUPON_ISSUE:
                self.item_items.append((ledger.coupons,
                                        *issued_coupon(admin.program, op.card_id, entry)))
            if reason == L.R_OK and op_type == L.OP_PACKAGE_SELL:
                self.item_items.append((ledger.packages,
                                        *sold_package(admin.program, op.card_id, entry)))
            if reason == L.R_OK and op_type in L.OPENINGS:  # an opening, or an import (rule 18)
                referrer = op.packed[_OP_REFERRER:_OP_REFERRER + L.CARD_ID_SIZE]
                points = admin.program.referral_points
                refers = (points and referrer != NO_REFERRER and referrer != op.card_id
                          and entry[3] == L.STATUS_ACTIVE)  # an issued stock card refers no one
                if refers and (op.packed[L.OP_OFF_ROUTE_FLAGS] & L.REFERRER_ELSEWHERE
                               or referrer in admin.forwards):
                    # the referrer is another card shard's (a front's mark; or this shard
                    # forwarded its number, which a front may not have read yet): its bonus
                    # owed there, in the outbox, which a front delivers (docs/cluster.md, "Two
                    # cards on two card shards")
                    txn.put(L.OUTBOX_KEY_PREFIX + L.OUTBOX_KEY.pack(seq), L.OUTBOX.pack(
                        L.OUTBOX_VERSION, L.OUTBOX_REFERRAL, seq, referrer, points, ts),
                        db=ledger.meta)
                elif refers:
                    referrals.append(PendingOp.build(b"", L.OP_REFERRAL_BONUS, referrer, points,
                                                     link_seq=seq, caller=(L.CALLER_SYSTEM, 0)))
                admin.tier_cards()[tier] += 1
                expires_us = L.CARD_EXPIRES.unpack_from(
                    records, slots[k] * L.CARD_SIZE + L.CARD_OFF_EXPIRES)[0]
                if expires_us:  # rule 14: in the expiry index until it expires or ends
                    txn.put(L.CARD_EXPIRY_KEY.pack(expires_us, op.card_id), b"",
                            db=ledger.cards_by_expiry)
                if op.profile is not None:
                    self.profile_items.append((op.card_id, op.profile))
                if op.sealed is not None:
                    self.sealed_items.append((op.card_id, op.sealed))
            if op_type == L.OP_REFUND or op_type == L.OP_REVERSAL:
                available = self._after_undo(i, op, reason, seq, entry,
                                             coupons, coupon_slots[k]) or available
            if op.request_key:
                idem_items.append((op.request_key, record(
                    op_type, reason, op.digest, seq, held_after if reason == L.R_OK else available,
                    ts, op.client_time_us)))
            outcomes[i] = Outcome(reason, False, op_type, entry, available, 0, filled, held_after)
        if next_seq != self.seq:
            raise InvariantError("kernel sequence does not match the journal entries")
        if gains:
            self._add_gains(gains)
        # Coupons, packages and holds issued, sold or used: written before anything after the
        # run reads them, like the cards (a coupon used by each basket purchase that names one).
        self._put_items()
        for key in ended:  # after the openings' keys: a card opened and closed in one run
            txn.delete(key, db=ledger.cards_by_expiry)  # (a refund of an expired one: gone)
        for key in self.unindexed:  # holds closed in the run
            if not txn.delete(key, db=ledger.holds_by_expiry):
                raise InvariantError("a hold closed that its expiry index did not name")
        self.unindexed.clear()
        if referrals:  # the referrers' points, before anything after the run (an unknown or
            self._run_internal(referrals)  # inactive referrer is declined: no bonus, no entry)

    def _finish_in_c(self, run: list[int], out: bytes, packed: bytes, records: bytearray,
                     slots: array, filled_lines: bytes, day: int) -> dict | None:
        """What the loop of ``_flush_run`` does after the kernel, in C (``writerglue.finish_run``)
        for a run of purchases and top-ups: the points gained {(card, day): points}, or None
        for a run it does not take (nothing changed: the loop does it)."""
        ops = self.ops
        done = writerglue.finish_run(
            out, packed, records, slots, filled_lines, [ops[i].request_key for i in run],
            b"".join([ops[i].digest for i in run]), run, self.outcomes, Outcome, self.entries,
            self.idem_items, self.line_items, self.basket_items, self.ts, self.seq, day)
        if done is None:
            return None
        self.seq, gains, moves, upgrades = done
        if moves:  # each card's in the loop's order, by lots.Lots.apply's rule (in C)
            store = self.lots.store
            try:
                writerglue.move_lots(store.cursor, self.txn, store.db, store.by_day, moves, day)
            except ValueError as exc:
                raise InvariantError(str(exc)) from None
        if upgrades:  # rule 8
            counts = self.admin.tier_cards()
            for tier, after in upgrades:
                counts[tier] -= 1
                counts[after] += 1
        return gains

    def _put_items(self) -> None:
        """The pending coupons, packages, holds and gift stock, one putmulti per sub-database
        (in the order made: a record written twice in a run keeps its last value)."""
        by_db: dict = {}
        for db, key, value in self.item_items:
            by_db.setdefault(db, []).append((key, value))
        self.item_items.clear()
        for db, items in by_db.items():
            self.txn.cursor(db=db).putmulti(items)

    def _replace(self, i: int, op: PendingOp) -> None:
        """Rule 16: card ``op.card_id`` replaced by the card its referrer_id names, in Python (the
        kernel has nothing to compute: everything is copied). Two entries, the old card's then
        the new card's; the new card's record, program state, lots, coupons, packages and profile
        are the old card's, moved; the old card keeps its history and closed holds."""
        txn, ledger, ts, kind = self.txn, self.ledger, self.ts, op.packed[0]
        old_id, new_id = op.card_id, op.packed[_OP_REFERRER:_OP_REFERRER + L.CARD_ID_SIZE]
        raw = txn.get(old_id, db=ledger.cards)
        old = L.CARD.unpack(raw) if raw is not None else None
        status = old[1] if old is not None else 0
        if old is None:
            reason = L.R_CARD_NOT_FOUND
        elif status == L.STATUS_REPLACED:
            reason = L.R_CARD_REPLACED
        elif (new_id == old_id or txn.get(new_id, db=ledger.cards) is not None
              or new_id in self.admin.forwards):
            reason = L.R_CARD_ALREADY_EXISTS  # the new number is a card already (maybe of
            #                                   another shard, which this one forwarded it to)
        elif status not in L.REPLACEABLE:
            reason = L.R_ILLEGAL_TRANSITION
        elif old[8]:  # held_minor
            reason = L.R_HOLDS_OPEN
        else:
            reason = L.R_OK
        if reason != L.R_OK:
            if op.request_key:
                self.idem_items.append((op.request_key, record(
                    kind, reason, op.digest, 0, 0, ts, op.client_time_us)))
            declined = bytes(3) + bytes((status,)) + bytes(L.JOURNAL_SIZE - 4)  # the status
            self.outcomes[i] = Outcome(reason, False, kind, declined)
            return
        (version, _, tier, tries, flags, principal, bonus, points, _, lifetime_paid, _,
         opened_us, home_store, birth_month, pin_check, reserved) = old
        out_seq, in_seq = self.seq, self.seq + 1
        pin_flags = op.packed[2]
        new_flags, new_check = ((L.CARD_PIN_SET, op.packed[96:128]) if pin_flags & L.NEW_PIN
                                else (0, bytes(32)))
        txn.put(old_id, L.CARD.pack(version, L.STATUS_REPLACED, tier, tries, flags, 0, 0, 0, 0,
                                    lifetime_paid, out_seq, opened_us, home_store, birth_month,
                                    pin_check, reserved), db=ledger.cards)
        # rule 14: the old card leaves the expiry index; the new one expires as a card opened now
        old_expires = L.CARD_EXPIRES.unpack_from(reserved)[0]
        if old_expires:
            txn.delete(L.CARD_EXPIRY_KEY.pack(old_expires, old_id), db=ledger.cards_by_expiry)
        program = self.admin.program
        new_expires = card_expiry_us(ts, program.card_valid_months, program.utc_offset_minutes)
        if new_expires:
            txn.put(L.CARD_EXPIRY_KEY.pack(new_expires, new_id), b"", db=ledger.cards_by_expiry)
        txn.put(new_id, L.CARD.pack(version, L.STATUS_ACTIVE, tier, 0, new_flags, principal,
                                    bonus, points, 0, lifetime_paid, in_seq, opened_us,
                                    home_store, birth_month, new_check,
                                    L.CARD_EXPIRES.pack(new_expires) + reserved[8:]),
                db=ledger.cards)
        head = L.OP.unpack(op.packed)
        money = principal + bonus
        out_entry = self._replacement_entry(head, L.OP_CARD_REPLACED, out_seq, old_id, tier,
                                            L.STATUS_REPLACED, tries, flags, money,
                                            (-principal, -bonus, -points), (0, 0, 0), in_seq,
                                            status, birth_month)
        in_entry = self._replacement_entry(head, L.OP_REPLACEMENT_OPENED, in_seq, new_id, tier,
                                           L.STATUS_ACTIVE, 0, new_flags, money,
                                           (principal, bonus, points), (principal, bonus, points),
                                           out_seq, 0, birth_month)
        self.entries += (out_entry, in_entry)
        self.seq += 2
        for db in (ledger.coupons, ledger.packages):
            self._move_items(db, old_id, new_id)
        ext = txn.get(old_id, db=ledger.card_ext)
        if ext is not None:
            txn.put(new_id, ext, db=ledger.card_ext)
            txn.delete(old_id, db=ledger.card_ext)
        if self.lots.move(old_id, new_id) != max(points, 0):  # (owing points: no lots, rule 12)
            raise InvariantError("a replaced card's lots do not add up to its points")
        txn.put(SUCCESSOR + old_id, new_id, db=ledger.card_links)
        txn.put(PREDECESSOR + new_id, old_id, db=ledger.card_links)
        self.profile_items.append((new_id, self._moved_profile(old_id, new_id, op)))
        if op.sealed is not None:
            self.sealed_items.append((new_id, op.sealed))
        # (tier counts: the new card counts where the old one did, which no longer counts)
        if op.request_key:
            self.idem_items.append((op.request_key, record(
                kind, L.R_OK, op.digest, in_seq, 0, ts, op.client_time_us)))
        self.outcomes[i] = Outcome(L.R_OK, False, kind, in_entry)

    def _moved_profile(self, old_id: bytes, new_id: bytes, op: PendingOp) -> bytes:
        """The new card's profile. Sealed where the request was built (the old card's stored
        profile with the new number's mask, ``operations.replace_card_op``): stored as it came,
        so a ledger with the profile key and one without store the same bytes. Else (a tool's
        request, or the old card opened earlier in this group) the old card's profile (stored,
        or opened earlier in this group) with the request's mask: sealed again for the new card
        (the same bytes on every ledger with the key: ``cardcore.profiles``), or JSON in a
        ledger opened without the key (of a sealed profile, only the mask survives)."""
        ledger = self.ledger
        if ledger.profile_box.is_sealed(op.profile):
            return op.profile
        raw = next((p for cid, p in reversed(self.profile_items) if cid == old_id), None)
        if raw is None:
            raw = self.txn.get(old_id, db=ledger.profiles)
        doc = dict(ledger.open_profile(old_id, raw), **json.loads(op.profile or b"{}"))
        if not ledger.profile_box.keyed:
            return encode_profile(doc)
        return ledger.profile_box.seal(new_id, doc)

    def _replacement_entry(self, head: tuple, kind: int, seq: int, card_id: bytes, tier: int,
                           status: int, tries: int, flags: int, amount: int, deltas: tuple,
                           after: tuple, link_seq: int, ref_id: int, birth_month: int) -> bytes:
        """One of a replacement's two journal entries (layout.JOURNAL), at the request's till."""
        (_, _, _, caller_kind, _, _, store, terminal, staff, operator, tag, _, client_us, *_,
         caller_id) = head[:16]
        entry = bytearray(L.JOURNAL.pack(
            L.JOURNAL_VERSION, kind, tier, status, L.R_OK, tries, flags & 0xFF, seq, card_id,
            amount, 0, *deltas, *after, self.ts, store, terminal, staff, operator, tag,
            self.admin.program_version, caller_kind, bytes(3), caller_id, 0, link_seq, ref_id, 0,
            client_us, bytes(48), bytes(L.DIGEST_SIZE)))
        L.JOURNAL_PROGRAM.pack_into(entry, L.JOURNAL_OFF_PROGRAM, 0, 0, tier, 0, 0)
        entry[L.JOURNAL_OFF_BIRTH_MONTH] = birth_month & 0xFF
        return bytes(entry)

    def _move_items(self, db, old_id: bytes, new_id: bytes) -> None:
        """A replaced card's coupons or packages, each under the new card with its serial."""
        cur = self.txn.cursor(db=db)
        moved = []
        if cur.set_range(old_id):
            for key, value in cur:
                if key[:L.CARD_ID_SIZE] != old_id:
                    break
                moved.append((new_id + key[L.CARD_ID_SIZE:], value))
        for key, value in moved:
            self.txn.delete(old_id + key[L.CARD_ID_SIZE:], db=db)
            self.txn.put(key, value, db=db)

    def _held_after(self, op: PendingOp, entry: bytes, held: int, items: bytearray,
                    item_slot: int) -> int:
        """Rule 15 in a run that moves held_minor: the card's held after applied operation
        ``op``, from ``held`` before it; an authorization's hold and index written, a closed
        hold taken out of the index."""
        kind = op.packed[0]
        if kind == L.OP_HOLD:
            key, hold, index_key = authorized_hold(op.card_id, entry)
            self.item_items.append((self.ledger.holds, key, hold))
            self.item_items.append((self.ledger.holds_by_expiry, index_key, b""))
            held += _HOLD_AMOUNT.unpack_from(hold)[0]
        elif kind in _HOLD_CLOSERS or _capture(op.packed):
            hold = bytes(items[item_slot * L.COUPON_SIZE:(item_slot + 1) * L.COUPON_SIZE])
            self.unindexed.append(hold_index_key(op.card_id, hold))
            held -= _HOLD_AMOUNT.unpack_from(hold)[0]
        elif kind == L.OP_REVERSAL and items[item_slot * L.COUPON_SIZE + 2] == L.OP_HOLD:
            held -= _ENTRY_AMOUNT.unpack_from(entry)[0]  # an authorization undone (its undo record)
        return held

    def _after_undo(self, i: int, op: PendingOp, reason: int, seq: int, entry: bytes,
                    items: bytearray, slot: int) -> int:
        """A refund's or reversal's part outside the kernel (rules 12 and 13): the tombstone of
        a request reversed before it arrived; the sale's coupon given back when nothing is left
        to refund (a refund: while it is valid); what is left to refund, for a refund that
        asked more (its available_minor)."""
        _, _, original = self.undo_of.pop(i)
        reversed_hold = self.hold_reversals.pop(i, None)
        if reason == L.R_OK and reversed_hold is not None and reversed_hold[1] is not None:
            hold_key, hold = reversed_hold  # rule 15: the open hold it released, closed
            f = L.HOLD.unpack(hold)
            self.item_items.append((self.ledger.holds, hold_key, L.HOLD.pack(
                *f[:1], L.HOLD_REVERSED, *f[2:8], seq, 0, f[10])))
            self.unindexed.append(hold_index_key(op.card_id, hold))
        if reason == L.R_REFUND_EXCEEDS_ORIGINAL:  # what is left, as the kernel judged it
            return L.JOURNAL_PROGRAM.unpack_from(entry, L.JOURNAL_OFF_PROGRAM)[1]
        pending = self.tombstones.get(op.payload) if op.packed[0] == L.OP_REVERSAL else None
        if pending is not None and pending != _TOMBSTONE_WRITTEN and i in pending:
            if reason == L.R_OK:  # the first reversal of it that applies writes the tombstone
                self.tombstones[op.payload] = _TOMBSTONE_WRITTEN
                self.idem_items.append((op.payload, record(
                    L.OP_REVERSAL, L.R_REVERSED, bytes(16), 0, 0, self.ts, op.client_time_us)))
            else:
                pending.remove(i)
                if not pending:  # every reversal of it declined: no tombstone after all
                    del self.tombstones[op.payload]
        if reason != L.R_OK:
            return 0
        flags = L.JOURNAL_PURCHASE_FLAGS.unpack_from(entry, L.JOURNAL_OFF_PURCHASE_FLAGS)[0]
        if (original is not None and original[1] in _ITEM_UNDONE and op.packed[0] == L.OP_REVERSAL
                and flags & L.UNDO_COMPLETE):  # (not when reversed before: nothing to give back)
            self._item_back(op.card_id, original)
            return 0
        if original is None or original[1] != L.OP_PURCHASE or not flags & L.UNDO_COMPLETE:
            return 0
        serial = L.JOURNAL_TAIL.unpack_from(original)[4]
        if not serial:
            return 0
        key = L.COUPON_KEY.pack(op.card_id, serial)
        raw = self.txn.get(key, db=self.ledger.coupons)
        if raw is None:
            return 0
        coupon = L.COUPON.unpack(raw)
        original_seq = _U64.unpack_from(original, L.JOURNAL_OFF_SEQ)[0]
        if coupon[1] == L.COUPON_USED and coupon[7] == original_seq and (
                op.packed[0] == L.OP_REVERSAL or self.ts < coupon[5]):
            self.item_items.append((self.ledger.coupons, key, L.COUPON.pack(
                coupon[0], L.COUPON_ISSUED, *coupon[2:7], 0, 0, coupon[9])))
        return 0

    def _item_back(self, card_id: bytes, original: bytes) -> None:
        """Rule 13: a reversed package use's use back to its package (a count package one more
        use left; either kind one use fewer), a reversed gift redemption's gift back to the
        stock; read as the runs before left them (the reversal runs alone: see _resolve_undo)."""
        txn, ledger = self.txn, self.ledger
        if original[1] == L.OP_PACKAGE_USE:
            key = L.COUPON_KEY.pack(card_id, L.JOURNAL_TAIL.unpack_from(original)[4])
            raw = txn.get(key, db=ledger.packages)
            if raw is None:
                raise InvariantError("a package use names a package that is not there")
            p = list(L.PACKAGE.unpack(raw))
            p[3] += p[1] == L.PACKAGE_COUNT
            p[8] = max(p[8] - 1, 0)
            self.item_items.append((ledger.packages, key, L.PACKAGE.pack(*p)))
        else:
            gift_id = L.JOURNAL_PROGRAM.unpack_from(original, L.JOURNAL_OFF_PROGRAM)[4]
            key = L.GIFT_KEY.pack(gift_id)
            raw = txn.get(key, db=ledger.gift_stock)
            if raw is None:
                raise InvariantError("a gift redemption names a gift with no stock record")
            g = list(L.GIFT.unpack(raw))
            g[3] -= 1  # given, one fewer
            self.item_items.append((ledger.gift_stock, key, L.GIFT.pack(*g)))

    def _write(self, prev_digest: bytes) -> None:
        """Everything the group made, each sub-database written once."""
        ledger, txn = self.ledger, self.txn
        if self.entries:
            buf = bytearray(b"".join(self.entries))
            chain(buf, prev_digest, L.JOURNAL_SIZE, L.JOURNAL_DIGEST_OFFSET)
            size, seq_key, first = L.JOURNAL_SIZE, L.SEQ_KEY.pack, self.first_seq
            view = memoryview(buf)
            added, _ = txn.cursor(db=ledger.journal).putmulti(
                writerglue.journal_items(buf, first) if GLUE_IN_C else
                [(seq_key(first + k), bytes(view[k * size:(k + 1) * size]))
                 for k in range(len(self.entries))], append=True)
            if added != len(self.entries):
                raise InvariantError("journal append refused: sequence not increasing")
            # the entries as journaled, and a split tender's later payments, once for both
            # aggregates
            entries = bytes(buf) if ledger.keep_day_totals or ledger.keep_member_metrics else b""
            later = daytotals.later_payments(txn, ledger, entries, set()) if entries else []
            if ledger.keep_day_totals:  # every entry, in sequence order (cardcore.daytotals)
                totals = daytotals.DayTotals(txn, ledger, ledger.day_settings)
                totals.add_all(entries, later=later)
                totals.write()
            else:
                txn.delete(META_DAY_TOTALS, db=ledger.meta)
            member_metrics.keep(txn, ledger, entries, later)  # beside them (cardcore.members)
        if self.idem_items:
            txn.cursor(db=ledger.requests).putmulti(self.idem_items)
            pruned = ([] if self.admin.role() == L.RELAY_ROLE_ADMIN else
                      [key for key, _ in self.idem_items if key[0] != RELAYED_KEY_HEAD])
            if pruned and not txn.cursor(db=ledger.request_times).put(
                    L.REQUEST_TIME_KEY.pack(self.ts), pack_request_keys(pruned), append=True):
                raise InvariantError("request time index append refused: time went back")
        if self.entries:
            txn.cursor(db=ledger.card_entries).putmulti(
                writerglue.history_items(buf, _CARD_ENTRY_MASK) if GLUE_IN_C
                else history_items(self.entries))
        if self.line_items:
            added, _ = txn.cursor(db=ledger.journal_lines).putmulti(
                [(L.SEQ_KEY.pack(seq), value) for seq, value in self.line_items], append=True)
            if added != len(self.line_items):
                raise InvariantError("journal lines append refused: sequence not increasing")
        if self.basket_items:
            txn.cursor(db=ledger.baskets).putmulti(self.basket_items)
        if self.line_refunds:
            txn.cursor(db=ledger.refunded_lines).putmulti(
                [(L.SEQ_KEY.pack(sale), value) for sale, value in self.line_refunds.items()])
        if self.profile_items:
            txn.cursor(db=ledger.profiles).putmulti(self.profile_items)
            if not all(ledger.profile_box.is_sealed(raw) for _, raw in self.profile_items):
                txn.delete(META_PROFILES_SEALED, db=ledger.meta)  # a tool's or a test's
            if ledger.member_index is not None:  # rule 17: found by phone and name at once
                txn.cursor(db=ledger.members).putmulti(ledger.member_index.items(
                    (cid, ledger.open_profile(cid, raw)) for cid, raw in self.profile_items))
            else:
                txn.delete(META_MEMBERS, db=ledger.meta)
        if self.sealed_items:
            txn.cursor(db=ledger.cardnos).putmulti(self.sealed_items)
        self.admin.flush()
        pruned = self._prune()
        # The ledger's time, so the next group's cannot go back (or leap) from it. An idle
        # maintenance group that found nothing to prune writes nothing: no commit, no fsync.
        if pruned or self.expired or any(op.packed[0] != L.OP_MAINTENANCE for op in self.ops):
            txn.put(META_CLOCK, I64.pack(self.ts), db=ledger.meta)

    def _prune(self) -> int:
        """Delete request records that no re-send could reach any more: their client time is
        older than the window at this group's time, and group times never go back, so a re-send
        is refused as too old from now on. Oldest applied first, in small steps, every group: up
        to PRUNE_STEP_MAX plus twice the group's size, so pruning keeps up with any arrival
        rate (a record whose client clock ran ahead holds the ones behind it back a little)."""
        ledger, txn = self.ledger, self.txn
        step = PRUNE_STEP_MAX + 2 * len(self.ops)
        horizon_us = self.ts - self.admin.request_window_us
        cur = txn.cursor(db=ledger.request_times)
        pruned, through_us, young = 0, self.pruned_through_us, False
        while pruned < step and not young and cur.first():
            keys = (writerglue.unpack_request_keys if GLUE_IN_C
                    else unpack_request_keys)(cur.value())
            done = 0
            for request in keys:
                if pruned >= step:
                    break
                idem = txn.get(request, db=ledger.requests)
                if idem is None:
                    raise InvariantError("the request time index names a request with no record")
                client_us = L.IDEM.unpack(idem)[8]
                if client_us >= horizon_us:
                    young = True
                    break
                txn.delete(request, db=ledger.requests)
                pruned += 1
                done += 1
                through_us = max(through_us, client_us)
            if done == len(keys):
                cur.delete()
            else:
                if done:
                    cur.put(cur.key(), pack_request_keys(keys[done:]))
                break
        if pruned:
            # No request whose client time is at or before this can apply any more, whatever
            # the window is later set to: its record may be gone.
            self.pruned_through_us = through_us
            txn.put(META_PRUNED_THROUGH, I64.pack(through_us), db=ledger.meta)
        return pruned

    def adopt(self) -> None:
        """After the commit: the ledger keeps what the group changed between groups."""
        ledger, admin = self.ledger, self.admin
        ledger.pruned_through_us = self.pruned_through_us
        if admin is not None:
            ledger.request_window_us = admin.request_window_us
            ledger.forwards = admin.forwards
        if admin is not None and admin.program_version != ledger.program_version:
            ledger.program, ledger.program_version = admin.program, admin.program_version
            ledger.program_packed = admin.program_packed
