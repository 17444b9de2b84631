"""Day totals: what each store's business day moved, kept in the writer's write transaction.

Every journal entry a group writes is added, in sequence order, to its store's business day
(``add_figures``: one function from an entry to its figures, so a refund, a reversal, a replacement
and the expiry sweep are counted like everything else), and to the chain's record of that day
(``day_chain``, apart: any u32 is a store id). Records are fixed-size (``layout.DAY_TOTALS``);
reports read ranges of them, never the journal. They depend on the journal entries alone (their
time, store and program version), so two ledgers that apply the same groups hold the same totals,
and a ledger made before them fills them once from its journal (``fill``).

**Business day.** The day of an entry's time (the group's) on its store's clock shifted back by
its store's cutoff hour: a store with a business day of its own (``cardcore.stores``: a UTC
offset and a cutoff hour, set by PutStore) uses them; every other store (head office too) the
chain's clock (``business_day_utc_offset_minutes``, default UTC+8) and cutoff
(``business_day_cutoff_hour``, default 4) of the program version the entry was computed under:
with the defaults a sale at 01:30 local belongs to the day before. A store's settings are those
of the last store entry (``OP_STORE_PUT``) before the entry, so they come from the journal alone:
a group reads the registry as the groups before it left it and follows the store entries it adds;
a fill or a check from the journal's start follows them from nothing. A change of a store's
clock takes effect for the entries after it; its closed days stay closed. Days are numbered from
1970-01-01 (day 0) and shown as dates.

**Closed days** (``CloseDay``, op ``OP_CLOSE_DAY``): from the first close's entry on (a later close
of the day is journaled too and changes nothing), nothing lands in that store's day; an entry whose
day is closed for its store lands in the store's next open day (its own time stays in the journal).
Only days that have begun can be closed, so the next open day is at most the day after the current
one.

**Clearing** (money topped up at one store and spent at another). The rule: a card's principal has
one *home*, the store of its last top-up (``day_money_home``), which holds the cash for all of it.
When principal leaves the card at another store (a purchase, a package sale, a cancelled card's
pay-back, a reversed top-up), the home owes that store the amount; when it comes back at another
store (a refund, a reversed sale), that store owes the home. A top-up at a store other than the
home moves the home there, and the old home owes the new one the principal the card held before it.
A replacement moves the home with the money; a card imported from a legacy system
(``OP_IMPORT_CARD``) counts as topped up at the import's store. A card's money without a home (none
yet) is headquarters' (store 0). Bonus money is the chain's promotion, not cleared. Each amount is
written on both sides (``day_clearing``) in the first day open at both stores (which may be later
than the day its entry landed in, when the other store's day is closed), so every day's clearing
table nets to zero over the chain; amounts are net (a store can be owed a negative amount on a day
of refunds)."""
from __future__ import annotations

import datetime as dt
import json
import re
import struct
import sys
from array import array

from cardcore import layout as L
from cardcore import stores as chain_stores
from cardcore.ext import daytotals as native
from cardcore.idempotency import InvariantError
from cardcore.program import parse_program

DAY_US = L.DAY_US
HOUR_US = 3_600_000_000
MINUTE_US = 60_000_000
EPOCH = dt.date(1970, 1, 1)
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
FILL_CHUNK = 10_000  # journal entries the fill reads the homes of at once
CLOSED_WALK_MAX = 4000  # closed days an entry walks past at most (more: a broken invariant)
DEFAULT_SETTINGS = (480, 4)  # entries without a program version (migrated from v1)
# The ledger's sub-databases of the day totals (layout.DAY_TOTALS and after).
DB_NAMES = ("day_totals", "day_chain", "store_days", "day_clearing", "day_staff",
            "day_money_home")
# Meta: set while the day totals hold every journal entry; a writer run without them (a
# benchmark's) clears it, and the next one with them fills them again from the journal.
META_DAY_TOTALS = b"day_totals"
# Its value: the version of what the records hold; a ledger whose records are older refills them
# (2: the chain's liability figures kept by each entry's own business day).
DAY_TOTALS_FILLED = b"\x03"  # 3: and holds outstanding (the figures, the close's)

# What ``add_figures`` and ``add`` read of a journal entry (layout.JOURNAL): op, seq, card id,
# amount, discount, principal, bonus and points deltas, principal after, time, store, staff,
# operator, program version, points redeemed, redeemed fen, item id, purchase flags, coupon off.
_ENTRY = struct.Struct("<xB6xQ16s6q16xqI4xII8xI44x2q4x2H16xq")
assert _ENTRY.size == 224
_NF, _NO = L.DAY_FIGURE_SLOTS, L.DAY_OPS
WIDTH = _NF + 2 * _NO  # an accumulator: figures, then counts by op, then amounts by op
assert native.width() == WIDTH
assert L.DAY_FIGURES.index("clearing_owes_minor") == 18  # ext/daytotals.pyx F_NETS_FIRST
(F_ENTRIES, F_P_IN, F_P_OUT, F_B_IN, F_B_OUT, F_PTS_IN, F_PTS_OUT, F_GROSS, F_DISCOUNT,
 F_COUPON_OFF, F_T_PRINCIPAL, F_T_BONUS, F_T_POINTS, F_T_TILL, F_ISSUED, F_REDEEMED, F_EXPIRED,
 F_COUPONS_USED, F_OWES, F_OWED, F_OWN_P, F_OWN_B, F_HOLDS, F_OWN_HELD) = range(len(L.DAY_FIGURES))
# points that move, not earned or spent: undone, moved to a new card, forfeited on cancelling
# (an import brings the old system's points: none earned under this chain's program that day)
_POINTS_MOVED = frozenset((L.OP_REFUND, L.OP_REVERSAL, L.OP_CARD_REPLACED,
                           L.OP_REPLACEMENT_OPENED, L.OP_CARD_STATUS, L.OP_IMPORT_CARD))
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_U32_KEY = struct.Struct(">I")  # chain_stores' key
_UNREAD = object()
_CLOSE = struct.Struct("<II8x")  # a close's subject
# Entries a run of the C loop never holds: a close (the days after it land elsewhere) and a store
# entry (the business days after it are counted anew).
_RUN_BREAKS = frozenset((L.OP_CLOSE_DAY, L.OP_STORE_PUT))
# layout.JOURNAL offsets the runs read as columns: principal delta, store, staff, program version
_OFF_DP, _OFF_STORE, _OFF_STAFF, _OFF_VERSION = 48, 104, 112, 128
_Q_PER_ENTRY, _I_PER_ENTRY = L.JOURNAL_SIZE // 8, L.JOURNAL_SIZE // 4
_OFF_SEQ, _OFF_BASKET = 8, 160  # layout.JOURNAL: seq, basket_tag
_OFF_LINK = 144  # layout.JOURNAL: link_seq (a capture's, void's, expiry's, reversal's hold)
_HOLD_CLOSERS = frozenset((L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED, L.OP_PURCHASE, L.OP_REVERSAL))
_HOLD_FIELDS = struct.Struct("<32xq56xqI")  # layout.JOURNAL: amount_minor, ts_us, store_id
# In the day totals' own copy of an entry only (never stored): a later card's payment of a split
# tender's basket. The basket's sale (gross, discount, the staff's credit) was counted with its
# first payment, and that payment's remainder as the till's; this card's payment leaves the till.
CONTINUED = 0x8000
_BASKET_FIRST = struct.Struct(">QQ")  # the baskets index key: basket tag, seq
_NO_CARD = 0xFFFFFFFF
# Values stored as no record: a home of the money at head office (store 0, as with no home yet),
# a clearing between two stores that nets to zero.
_ZERO_ROW = bytes(8 * WIDTH)
_ZERO_RECORD = bytes(L.DAY_TOTALS.size)
_ZERO_I64 = array("q", [0])


def _empty_totals() -> bytes:
    """A day totals record of nothing (a store whose day's clearing netted to zero)."""
    record = bytearray(_ZERO_RECORD)
    native.add_record(record, array("q", _ZERO_ROW))
    return bytes(record)


# ... and a day's totals of nothing (the C loop adds no zero cells; the entry-by-entry path may
# make one: as no record, both paths, and a fill cut anywhere, hold the same records)
_NO_RECORD = {"day_money_home": bytes(4), "day_clearing": bytes(8),
              "day_totals": _empty_totals(), "day_chain": _empty_totals()}
_index_run = native.index_run  # (add_all's ``native`` is its flag)
NATIVE_RUN_MIN = 4  # shorter runs go entry by entry
# a run with more stores (and homes of the money) goes entry by entry: the C loop's rows are 832
# bytes a store, zeroed for each run (its clearing is kept by cell, one at most an entry)
NATIVE_STORES_MAX = 4096
# A group that is one run on one business day open at all its stores (most): its records' sums
# made in C at the write (``native.fold``); False: landed and summed in Python (the reference).
FOLD_NATIVE = True
_AMOUNTS = struct.Struct("<32xqq")  # layout.JOURNAL: amount_minor, discount_minor


class DayError(ValueError):
    """A business day or a range that is not valid (the field's name in ``field``)."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


def business_day(ts_us: int, utc_offset_minutes: int, cutoff_hour: int) -> int:
    """The business day (days since 1970-01-01) of Unix time ``ts_us`` (microseconds)."""
    return (ts_us + utc_offset_minutes * MINUTE_US - cutoff_hour * HOUR_US) // DAY_US


def day_of_date(text: str, field: str = "business_day") -> int:
    """A "YYYY-MM-DD" date as a day number; DayError if it is not one."""
    if not DATE_RE.fullmatch(text):
        raise DayError(field, f"{field} must be a date, YYYY-MM-DD")
    try:
        day = (dt.date.fromisoformat(text) - EPOCH).days
    except ValueError:
        raise DayError(field, f"{field} is not a calendar date") from None
    if day < 0:
        raise DayError(field, f"{field} is before 1970-01-01")
    return day


def date_of_day(day: int) -> str:
    return (EPOCH + dt.timedelta(days=day)).isoformat()


def close_subject(store: int, day: int) -> bytes:
    """A close's subject (its entry's card_id field): u32 store | u32 day | zeros."""
    return _CLOSE.pack(store, day)


def closed_day(subject: bytes) -> tuple[int, int]:
    """(store, day) a close's subject names."""
    return _CLOSE.unpack(subject)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def saturated(v: int) -> int:
    """A day figure that would pass int64 stays at its limit (never wraps, never stops the
    writer): no real day comes near, but an operator's extreme amounts must not break the
    ledger. The C loop (``ext/daytotals.pyx``) saturates alike."""
    return INT64_MAX if v > INT64_MAX else INT64_MIN if v < INT64_MIN else v


def wrapped(v: int) -> int:
    """A net figure of both signs (clearing, the own-day nets, holds) past int64 wraps round
    (two's complement, as the C loop's unsigned addition does) instead of saturating: sums of
    amounts of both signs are then the same in any order and any grouping (the writer's groups,
    verify's whole journal), which saturation is not. No real chain comes near."""
    return ((v + (1 << 63)) & 0xFFFF_FFFF_FFFF_FFFF) - (1 << 63)


def clamped(k: int, v: int) -> int:
    """Figure ``k``'s value ``v`` (a Python sum) as stored and sent: the nets wrapped, the rest
    (figures that only grow, counts and amounts by operation) saturated."""
    return wrapped(v) if F_OWES <= k < _NF else saturated(v)


def _add(a, k: int, v: int) -> None:
    a[k] = clamped(k, a[k] + v)


def add_figures(a: list[int], f: tuple) -> None:
    """Add one journal entry (``f``: its ``_ENTRY`` fields, ``_ENTRY.unpack(entry)``) to
    accumulator ``a``: the one place that says what an entry counts for in the day totals."""
    (op, _, _, amount, discount, dp, db, dpts, _, _, _, _, _, _, redeemed_pts, redeemed_minor,
     item_id, flags, coupon_off) = f
    _add(a, F_ENTRIES, 1)
    _add(a, _NF + op, 1)
    continued = op == L.OP_PURCHASE and flags & CONTINUED
    _add(a, _NF + _NO + op, 0 if continued else amount)
    if dp > 0:
        _add(a, F_P_IN, dp)
    elif dp:
        _add(a, F_P_OUT, -(dp))
    if db > 0:
        _add(a, F_B_IN, db)
    elif db:
        _add(a, F_B_OUT, -(db))
    if dpts > 0:
        _add(a, F_PTS_IN, dpts)
    elif dpts:
        _add(a, F_PTS_OUT, -(dpts))
    if op == L.OP_PURCHASE:
        if continued:  # what this card pays of the basket's rest is no longer the till's
            _add(a, F_T_TILL, dp + db - redeemed_minor)
        else:
            _add(a, F_GROSS, amount)
            _add(a, F_DISCOUNT, discount)
            _add(a, F_COUPON_OFF, coupon_off)
            if flags & L.PARTIAL_PAYMENT:  # split tender: the rest of what was due, the till's
                _add(a, F_T_TILL, amount - discount + dp + db - redeemed_minor)
        _add(a, F_T_PRINCIPAL, -(dp))
        _add(a, F_T_BONUS, -(db))
        _add(a, F_T_POINTS, redeemed_minor)
        _add(a, F_ISSUED, dpts + redeemed_pts)
        _add(a, F_REDEEMED, redeemed_pts)
        if item_id:
            _add(a, F_COUPONS_USED, 1)
    elif op == L.OP_POINTS_EXPIRED:
        _add(a, F_EXPIRED, -(dpts))
    elif dpts and op not in _POINTS_MOVED:
        if dpts > 0:
            _add(a, F_ISSUED, dpts)
        else:
            _add(a, F_REDEEMED, -(dpts))


class DayTotals:
    """One write transaction's additions to the day totals: entries added in sequence order,
    written once (``write``) at the end of the group."""

    def __init__(self, txn, ledger, settings: dict[int, tuple[int, int]], fresh: bool = False,
                 from_start: bool = False):
        """``fresh``: from nothing, read nothing stored but the programs (``check``: the whole
        journal in memory, beside the stored records). ``fresh`` or ``from_start`` (``fill``):
        the entries come from the journal's first, so the stores' business days come from the
        store entries among them, not from the registry (which holds the last ones)."""
        self.txn, self.ledger, self.fresh = txn, ledger, fresh
        self.settings = settings  # program version -> (utc offset minutes, cutoff hour): cache
        # store -> its own (utc offset minutes, cutoff hour), or None: the program's
        self.store_days: dict[int, tuple[int, int] | None] = {0: None}
        self.stores_stored = (not (fresh or from_start) and ledger.chain_stores is not None
                              and txn.stat(ledger.chain_stores)["entries"] > 0)  # none: no reads
        self.acc: dict[tuple[int, int], array] = {}  # (store, day) -> WIDTH int64 values
        self.pairs: dict[tuple[int, int, int], int] = {}
        self.staff: dict[tuple[int, int, int], list[int]] = {}
        self.homes: dict[bytes, int] = {}
        self.homes_changed: set[bytes] = set()
        self.baskets_seen: set[int] = set()  # basket tags with a payment among the entries added
        self.closed: dict[tuple[int, int], bool] = {}
        self.closes: list[tuple[bytes, bytes]] = []
        self.landing: dict[tuple[int, int], int] = {}
        self.slots: dict[tuple[int, int, int], tuple[array, int, int]] = {}
        self.both: dict[tuple[int, int, int], int] = {}  # (debtor, creditor, day) -> clearing day
        # business day -> [principal, bonus, held] net, by each entry's own business day
        self.own: dict[int, list[int]] = {}
        # a replacement's home, from the old card's entry to the new one's, right after it (the
        # writer writes them together); None between replacements
        self.moving_home: int | None = None
        # a run kept as the C loop left it (slot_index, acc, nets, days: ``_add_run``'s), to be
        # folded into the records in C at the write (``records``) or landed (``_land_run``) when
        # anything else is added; None: none
        self.folding: tuple | None = None

    # ---- reads, through the group's own changes -----------------------------------------------

    def _settings(self, store: int, version: int) -> tuple[int, int]:
        """(UTC offset minutes, cutoff hour) of an entry of ``store`` under program ``version``:
        the store's own, else the program's."""
        own = self.store_days.get(store, _UNREAD)
        if own is _UNREAD:
            self._read_stores((store,))
            own = self.store_days[store]
        if own is not None:
            return own
        s = self.settings.get(version)
        if s is None:
            s = DEFAULT_SETTINGS
            if version:
                raw = self.txn.get(L.VERSION_KEY.pack(version), db=self.ledger.programs)
                p = parse_program(json.loads(raw)["source"])
                s = (p.business_day_utc_offset_minutes, p.business_day_cutoff_hour)
            self.settings[version] = s
        return s

    def _read_stores(self, stores) -> None:
        """The business days of ``stores`` not known yet, from the registry in one read (none:
        from the journal's start, where a store has none until its first store entry)."""
        known = self.store_days
        wanted = [s for s in stores if s not in known]
        if not wanted:
            return
        if not self.stores_stored:
            known.update(dict.fromkeys(wanted))
            return
        found = dict(self.txn.cursor(db=self.ledger.chain_stores).getmulti(
            [_U32_KEY.pack(s) for s in wanted]))
        for s in wanted:
            known[s] = chain_stores.store_day(found.get(_U32_KEY.pack(s)))

    def store_put(self, subject: bytes) -> None:
        """A store entry: the entries after it use the store's business day as it sets it."""
        store, _, day = chain_stores.subject_store(subject)
        self.store_days[store] = day
        self.slots.clear()

    def is_closed(self, store: int, day: int) -> bool:
        closed = self.closed.get((store, day))
        if closed is None:
            closed = self.closed[(store, day)] = not self.fresh and self.txn.get(
                L.DAY_KEY.pack(store, day), db=self.ledger.store_days) is not None
        return closed

    def _land(self, store: int, day: int) -> int:
        """The day an entry of ``store`` whose time is in ``day`` lands in: its next open day."""
        landed = self.landing.get((store, day))
        if landed is None:
            landed = day
            for _ in range(CLOSED_WALK_MAX):
                if not self.is_closed(store, landed):
                    break
                landed += 1
            else:
                raise InvariantError(f"store {store}: more than {CLOSED_WALK_MAX} closed days in "
                                     "a row ahead of an entry")
            self.landing[(store, day)] = landed
        return landed

    def _home(self, card_id: bytes) -> int:
        home = self.homes.get(card_id)
        if home is None:
            raw = None if self.fresh else self.txn.get(card_id, db=self.ledger.day_money_home)
            home = self.homes[card_id] = _U32.unpack(raw)[0] if raw is not None else 0
        return home

    def _acc(self, store: int, day: int) -> array:
        a = self.acc.get((store, day))
        if a is None:
            a = self.acc[(store, day)] = array("q", _ZERO_ROW)
        return a

    # ---- additions ------------------------------------------------------------------------------

    def add_all(self, entries, native: bool = True, later: list[int] | None = None) -> None:
        """Journal entries, in sequence order: the cards whose principal moves have their homes
        read in one go first; runs of one time and program version without a close go through
        the C loop (``native``; False: entry by entry, the reference). ``later``: the entries'
        ``later_payments`` when the caller has them (the writer: one group, one call, the same
        list for the member metrics); None: found here."""
        buf = joined(entries)
        if not buf:
            return
        marked = self._mark_continued(buf, later)
        if marked is not None:
            buf = marked
        size = L.JOURNAL_SIZE
        view = memoryview(buf)
        ops = buf[1::size]
        times = view.cast("q")[L.JOURNAL_OFF_TS // 8::_Q_PER_ENTRY].tolist()
        versions = view.cast("I")[_OFF_VERSION // 4::_I_PER_ENTRY].tolist()
        n = len(ops)
        if (native and n >= NATIVE_RUN_MIN and times.count(times[0]) == n
                and versions.count(versions[0]) == n and not _RUN_BREAKS.intersection(ops)):
            self._holds(view, ops)
            if self._add_run(view, ops, versions[0], times[0]):
                return  # a group's entries: one run (most groups)
            for k in range(n):
                self.add(buf[k * size:(k + 1) * size])
            return
        # the homes of every card whose principal moves (or a replacement's), read in one go
        self._read_homes(_index_run(buf, array("I", bytes(4 * n)), array("I", bytes(4 * n)))[1])
        start = 0
        for k in range(1, n + 1):  # runs: one time, one version, no close
            if k < n and times[k] == times[start] and versions[k] == versions[start] \
                    and ops[k] not in _RUN_BREAKS and ops[start] not in _RUN_BREAKS:
                continue
            # never across a close or a store entry (a hold's day is its store's). The C loop
            # takes only the group's first run: a later run's row, landed on a total the group
            # has already, would be capped once where the reference caps entry by entry (the
            # same only below int64's limits; found by a review); later runs are rare (a close,
            # a store entry or a program change inside a group)
            first = not self.acc and self.folding is None  # (a hold's figures only wrap)
            self._holds(view[start * size:k * size], ops[start:k])
            if not (native and first and k - start >= NATIVE_RUN_MIN
                    and ops[start] not in _RUN_BREAKS
                    and self._add_run(view[start * size:k * size], ops[start:k],
                                      versions[start], times[start])):
                for j in range(start, k):
                    self.add(buf[j * size:(j + 1) * size])
            start = k

    def _mark_continued(self, buf: bytes, later: list[int] | None) -> bytes | None:
        """A copy of the entries with CONTINUED set on every later payment of a split tender's
        basket (``later``, or ``later_payments`` found here), or None when there is none."""
        if later is None:
            later = later_payments(self.txn, self.ledger, buf, self.baskets_seen)
        if not later:
            return None
        out = bytearray(buf)
        for k in later:
            at = k * L.JOURNAL_SIZE + L.JOURNAL_OFF_PURCHASE_FLAGS
            flags = L.JOURNAL_PURCHASE_FLAGS.unpack_from(out, at)[0]
            L.JOURNAL_PURCHASE_FLAGS.pack_into(out, at, flags | CONTINUED)
        return bytes(out)

    def business_day_of(self, store: int, version: int, ts_us: int) -> int:
        """The business day of an entry of ``store`` at ``ts_us`` under program ``version``
        (the member metrics' too: one definition of an entry's day)."""
        return business_day(ts_us, *self._settings(store, version))

    def days_of_stores(self, stores, version: int, ts_us: int) -> dict[int, int]:
        """store -> the business day of its entries at ``ts_us`` under program ``version`` (the
        C loops' runs: the stores' settings read in one go; most runs: one day for all)."""
        own = self.store_days
        if not self.stores_stored and not any(own.values()):  # no store has a day of its own
            return dict.fromkeys(stores, business_day(ts_us, *self._settings(0, version)))
        self._read_stores(stores)
        if any(own[store] is not None for store in stores):
            return {store: business_day(ts_us, *self._settings(store, version))
                    for store in stores}  # each store's own
        # every store on the program's clock: one day
        return dict.fromkeys(stores, business_day(ts_us, *self._settings(0, version)))

    def _read_homes(self, card_ids: list[bytes]) -> None:
        """The homes of the money of ``card_ids`` (in key order) not known yet, read in one go
        (no record: head office's; fresh: none read, all head office's)."""
        homes = self.homes
        wanted = [cid for cid in card_ids if cid not in homes] if homes else card_ids
        if not wanted:
            return
        read = dict.fromkeys(wanted, 0)
        found = (None if self.fresh
                 else self.txn.cursor(db=self.ledger.day_money_home).getmulti(wanted))
        if found:  # (the homes at once: u32 each, little-endian as _U32 packs them)
            values = [value for _, value in found]
            if any(len(value) != 4 for value in values):  # (each: two wrong sizes may add up)
                raise InvariantError("a home of the money of the wrong size")
            homes_read = array("I", b"".join(values))
            if sys.byteorder != "little":
                homes_read.byteswap()
            read.update(zip([cid for cid, _ in found], homes_read))
        homes.update(read)

    def _add_run(self, run: memoryview, ops: bytes, version: int, ts_us: int) -> bool:
        """A run of entries of one time and program version, without a close, through the C
        loop (``cardcore.ext.daytotals``): the same additions as ``add``, entry by entry.
        False (nothing added): more stores than NATIVE_STORES_MAX (a row each)."""
        self._unfold()  # (a run before it in the group: folded only when it is the one)
        n = len(ops)
        size = L.JOURNAL_SIZE
        # slots: the run's stores in order of first appearance, then the cards' homes; cards:
        # those whose principal moves (or a replacement's), in key order
        slot_of, card_of = array("I", bytes(4 * n)), array("I", bytes(4 * n))
        run_stores, card_ids = native.index_run(run, slot_of, card_of)
        slot_index = dict(zip(run_stores, range(len(run_stores))))
        self._read_homes(card_ids)
        home_stores = list(map(self.homes.__getitem__, card_ids))
        for store in dict.fromkeys(home_stores):
            slot_index.setdefault(store, len(slot_index))
        homes = array("I", map(slot_index.__getitem__, home_stores))
        moving_slot = (_NO_CARD if self.moving_home is None
                       else slot_index.setdefault(self.moving_home, len(slot_index)))
        nslots = len(slot_index)
        if nslots > NATIVE_STORES_MAX:
            return False
        days = self.days_of_stores(slot_index, version, ts_us)  # a clearing's: its creditor's
        closed = self.closed
        unknown = [store_day for store_day in days.items() if store_day not in closed]
        if unknown and not self.fresh:  # whether each store's day is closed, read in one go
            keys = [L.DAY_KEY.pack(store, day) for store, day in unknown]
            found = set(self.txn.cursor(db=self.ledger.store_days).getmulti(keys, values=False))
            closed.update(zip(unknown, map(found.__contains__, keys)))
        home_set = bytearray(len(card_ids))
        acc = _ZERO_I64 * (nslots * WIDTH)  # zeros by repetition (from bytes: 30x slower)
        nets = _ZERO_I64 * (2 * n)  # the clearing: (debtor x creditor cell, net) pairs
        moving_slot, cells = native.add_run(run, slot_of, acc, card_of, homes, home_set, nets,
                                            nslots, moving_slot)
        del nets[2 * cells:]
        by_slot = list(slot_index)
        self.moving_home = None if moving_slot == _NO_CARD else by_slot[moving_slot]
        one_day = len(set(days.values())) == 1  # most runs: every store's own day the same
        if (FOLD_NATIVE and one_day and self.folding is None
                and not (self.acc or self.pairs or self.own)
                and all(self.closed.get(store_day) is False for store_day in days.items())):
            self.folding = (slot_index, acc, nets, days)  # (most groups) at the write, in C
        else:
            self._land_run(slot_index, acc, nets, days)
        if 1 in home_set:  # a top-up or a replacement moved a home (purchases: none)
            for c, cid in enumerate(card_ids):
                if home_set[c]:
                    self._set_home(cid, by_slot[homes[c]])
        staffs = run.cast("I")[_OFF_STAFF // 4::_I_PER_ENTRY].tolist()
        if not any(staffs):
            return True  # no entry credits a staff id (most runs)
        stores = run.cast("I")[_OFF_STORE // 4::_I_PER_ENTRY].tolist()
        flags = run.cast("H")[L.JOURNAL_OFF_PURCHASE_FLAGS // 2::size // 2].tolist()
        for k, staff in enumerate(staffs):
            if staff and ((ops[k] == L.OP_PURCHASE and not flags[k] & CONTINUED)
                          or ops[k] == L.OP_TOP_UP):
                self._add_staff(stores[k], self._land(stores[k], days[stores[k]]), staff, ops[k],
                                *_AMOUNTS.unpack_from(run, k * size))
        return True

    def _land_run(self, slot_index: dict[int, int], acc: array, nets: array,
                  days: dict[int, int]) -> None:
        """A run's rows (``acc``, a row per slot of ``slot_index``, store -> slot) landed in
        their stores' next open days and its clearing (``nets``: (debtor slot * slots + creditor
        slot, net) pairs, ``native.add_run``'s) in the first day open at both,
        added to the group's; ``days``: store -> its business day. The reference of ``fold``."""
        by_slot, nslots = list(slot_index), len(slot_index)
        own: dict[int, list[int]] = {}  # day -> [principal, bonus]: one _own a day, not a store
        one_day = len(set(days.values())) == 1  # most runs: every store's own day the same
        # the slots' own-day nets, which add_run keeps wrapped in their rows (never from the
        # capped IN/OUT columns: past int64 those would depend on the grouping), taken out of
        # the rows before they land (a store's row keeps no own-day net)
        own_p, own_b = acc[F_OWN_P::WIDTH].tolist(), acc[F_OWN_B::WIDTH].tolist()
        acc[F_OWN_P::WIDTH] = acc[F_OWN_B::WIDTH] = _ZERO_I64 * nslots
        landing, accs, add_rows, closed = self.landing, self.acc, native.add_rows, self.closed
        for store, s in slot_index.items():
            row = s * WIDTH
            if acc[row + F_ENTRIES]:
                day = days[store]
                landed = landing.get((store, day))
                if landed is None:
                    if closed.get((store, day)) is False:  # open (read above): lands there
                        landed = landing[(store, day)] = day
                    else:
                        landed = self._land(store, day)
                a = accs.get((store, landed))
                if a is None:  # the run's row is the store-day's first: a copy of it
                    accs[(store, landed)] = acc[row:row + WIDTH]
                else:
                    add_rows(a, acc, row)
                if not one_day:
                    o = own.get(day)
                    if o is None:
                        o = own[day] = [0, 0]
                    o[0] += own_p[s]
                    o[1] += own_b[s]
        if one_day:  # a slot without entries has nets of zero: the sums
            own[days[by_slot[0]]] = [sum(own_p), sum(own_b)]
        for day, (principal, bonus) in own.items():  # wrapped: the same in any grouping
            self._own(day, wrapped(principal), wrapped(bonus))
        cleared = self.pairs
        for cell, amount in zip(nets[0::2], nets[1::2]):  # (in cell order, none zero)
            debtor, creditor = by_slot[cell // nslots], by_slot[cell % nslots]
            day = days[creditor]  # the entry's store's (the clearing rule)
            if landing.get((debtor, day)) == day and landing.get((creditor, day)) == day:
                k = (debtor, day, creditor)  # open at both (most): ``_clear``'s day, no walk
                cleared[k] = wrapped(cleared.get(k, 0) + amount)
            else:
                self._clear(debtor, creditor, amount, day)

    def _unfold(self) -> None:
        """A run kept for the fold landed the Python way: something else comes after it."""
        if self.folding is not None:
            folding, self.folding = self.folding, None
            self._land_run(*folding)

    def add(self, entry: bytes) -> None:
        """One journal entry, in sequence order."""
        self._unfold()
        f = _ENTRY.unpack_from(entry)
        op, store = f[0], f[10]
        slot = self.slots.get((store, f[13], f[9]))  # (store, program version, time)
        if slot is None:
            slot = self._slot(store, f[13], f[9])
        a, day, landed = slot
        add_figures(a, f)
        dp = f[5]
        if dp or f[6]:
            self._own(day, dp, f[6])
        if dp or op >= L.OP_CARD_REPLACED:
            self._money(op, f[2], store, dp, f[8], day)
        staff = f[11]
        if staff and ((op == L.OP_PURCHASE and not f[17] & CONTINUED) or op == L.OP_TOP_UP):
            self._add_staff(store, landed, staff, op, f[3], f[4])
        if op == L.OP_STORE_PUT:
            self.store_put(f[2])
        if op == L.OP_CLOSE_DAY and not self.is_closed(*closed_day(f[2])):  # the first closes
            closed = closed_day(f[2])
            self.closed[closed] = True
            self.landing.clear()  # the entries after it land elsewhere
            self.slots.clear()
            self.both.clear()
            self.closes.append((L.DAY_KEY.pack(*closed), L.STORE_DAY.pack(
                L.STORE_DAY_VERSION, L.DAY_CLOSED, f[12], f[1], f[9], self._held_through(*closed))))

    def _held_through(self, store: int, day: int) -> int:
        """What the store's holds held at the end of ``day``, from what is added so far: its
        stored records up to the day and this batch's (a close keeps it: a later entry whose own
        day is earlier, under moved business-day settings, cannot change a closed day's answer)."""
        held = 0 if self.fresh else sum(
            v[F_HOLDS] for _, v in read_range(self.txn, self.ledger, store, 0, day))
        for (s, d), a in self.acc.items():
            if s == store and d <= day:
                held += a[F_HOLDS]
        return wrapped(held)

    def _own(self, day: int, principal_minor: int, bonus_minor: int, held_minor: int = 0) -> None:
        """Net principal, bonus and held money moved by entries whose own business day is
        ``day`` (the chain's liability and holds outstanding, ``layout.DAY_TOTALS``)."""
        o = self.own.get(day)
        if o is None:
            o = self.own[day] = [0, 0, 0]
        o[0] = wrapped(o[0] + principal_minor)
        o[1] = wrapped(o[1] + bonus_minor)
        o[2] = wrapped(o[2] + held_minor)

    def _holds(self, view: memoryview, ops: bytes) -> None:
        """What the entries change in the money held by open holds (rule 15), for the store
        that placed each hold: + an authorization's amount; - a capture's, void's or expiry's
        hold amount, and a reversed authorization's amount (what it still held). The closing
        entries name their hold by link_seq; its entry (in the journal already: the writer
        writes the group's entries before their totals) says its store and amount. Called on
        each stretch of entries between closes, in order, so a close before a void in the same
        group keeps its day as it closed it."""
        links = view.cast("Q")[_OFF_LINK // 8::_Q_PER_ENTRY].tolist()
        if L.OP_HOLD not in ops and not any(links):
            return  # most groups: purchases and top-ups, none linked
        self._unfold()
        size = L.JOURNAL_SIZE
        for k, op in enumerate(ops):
            if op == L.OP_HOLD:
                amount, ts_us, store = _HOLD_FIELDS.unpack_from(view, k * size)
            elif links[k] and op in _HOLD_CLOSERS:
                hold = self.txn.get(L.SEQ_KEY.pack(links[k]), db=self.ledger.journal)
                if hold is None or hold[1] != L.OP_HOLD:
                    continue  # a refund's or reversal's sale, a reversal of a top-up
                held, _, store = _HOLD_FIELDS.unpack_from(hold)
                amount, ts_us, _ = _HOLD_FIELDS.unpack_from(view, k * size)
                amount = -(held if op == L.OP_PURCHASE else amount)
            else:
                continue
            day = self.business_day_of(store, _U32.unpack_from(view, k * size + _OFF_VERSION)[0],
                                       ts_us)  # the hold store's day
            _add(self._acc(store, self._land(store, day)), F_HOLDS, amount)
            self._own(day, 0, 0, amount)

    def _add_staff(self, store: int, day: int, staff: int, op: int, amount: int,
                   discount: int) -> None:
        """A purchase (its gross minus discount) or a top-up credited to ``staff``."""
        s = self.staff.get((store, day, staff))
        if s is None:
            s = self.staff[(store, day, staff)] = [0, 0, 0, 0]
        if op == L.OP_PURCHASE:
            s[0] += 1
            s[1] = saturated(s[1] + amount - discount)
        else:
            s[2] += 1
            s[3] = saturated(s[3] + amount)

    def _slot(self, store: int, version: int, ts_us: int) -> tuple[array, int, int]:
        """(the accumulator, the business day, the day it lands in) of an entry of ``store`` at
        ``ts_us`` under program ``version``."""
        if len(self.slots) > 4096:  # a fill: a new time every group
            self.slots.clear()
        day = business_day(ts_us, *self._settings(store, version))
        landed = self._land(store, day)
        slot = self.slots[(store, version, ts_us)] = (self._acc(store, landed), day, landed)
        return slot

    def _money(self, op: int, card_id: bytes, store: int, dp: int, principal_after: int,
               day: int) -> None:
        """The clearing rule (module docstring) for one entry that moves principal, or a
        replacement's."""
        if op == L.OP_CARD_REPLACED:
            self.moving_home = self._home(card_id)
        elif op == L.OP_REPLACEMENT_OPENED:
            if self.moving_home is None:
                raise InvariantError("a replacement's new card without its old card's entry "
                                     "before it")
            self._set_home(card_id, self.moving_home)
            self.moving_home = None
        elif (op == L.OP_TOP_UP or op == L.OP_IMPORT_CARD) and dp > 0:
            home, before = self._home(card_id), principal_after - dp
            if home != store and before:
                self._clear(home, store, before, day)
            self._set_home(card_id, store)
        elif dp:
            home = self._home(card_id)
            if home != store:
                self._clear(home, store, -dp, day)

    def _set_home(self, card_id: bytes, store: int) -> None:
        if self._home(card_id) != store:
            self.homes[card_id] = store
            self.homes_changed.add(card_id)

    def _clear(self, debtor: int, creditor: int, amount_minor: int, day: int) -> None:
        """``debtor`` owes ``creditor`` ``amount_minor`` (net; may be negative), on both sides,
        in the first day from ``day`` that is open at both stores, so every day's clearing
        nets to zero over the chain (the stores' figures are added at the write)."""
        key = (debtor, creditor, day)
        both = self.both.get(key)
        if both is None:
            both = day
            for _ in range(CLOSED_WALK_MAX):
                d = max(self._land(debtor, both), self._land(creditor, both))
                if d == both:
                    break
                both = d
            else:
                raise InvariantError(f"stores {debtor} and {creditor}: no open day in common")
            self.both[key] = both
        k = (debtor, both, creditor)
        self.pairs[k] = wrapped(self.pairs.get(k, 0) + amount_minor)

    # ---- the write ------------------------------------------------------------------------------

    def write(self) -> None:
        """Add the group's figures to the stored records (each key read and written once)."""
        txn, ledger = self.txn, self.ledger
        for name, items in self.records().items():
            if name == "store_days":
                for key, value in items:
                    if not txn.put(key, value, db=ledger.store_days, overwrite=False):
                        raise InvariantError("a day was closed twice")
            elif name in _NO_RECORD:  # a home back at head office, a clearing back at zero
                db, none = getattr(ledger, name), _NO_RECORD[name]
                kept = [item for item in items if item[1] != none]
                if len(kept) != len(items):  # (rare: most groups delete none)
                    for key, value in items:
                        if value == none:
                            txn.delete(key, db=db)
                if kept:  # the rest in one call, in key order
                    txn.cursor(db=db).putmulti(kept)
            elif items:
                txn.cursor(db=getattr(ledger, name)).putmulti(items)

    def records(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """What the additions make of the stored records they touch (read through ``stored``;
        a fresh DayTotals: from nothing), by sub-database, in key order; the values of
        ``_NO_RECORD`` are no record (so a ledger filled from its journal and one kept group by
        group hold the same records)."""
        if self.folding is not None:
            return self._folded()
        sides: dict[bytes, int] = {}  # day_clearing key -> what this group adds to it
        nets: dict[tuple[int, int], list[int]] = {}  # (store, day) -> [owes, owed]: one _add each
        pack = L.DAY_PAIR_KEY.pack
        for (debtor, day, creditor), amount in self.pairs.items():
            net = nets.get((debtor, day))
            if net is None:
                net = nets[(debtor, day)] = [0, 0]
            net[0] += amount
            net = nets.get((creditor, day))
            if net is None:
                net = nets[(creditor, day)] = [0, 0]
            net[1] += amount
            key = pack(debtor, day, creditor)
            sides[key] = sides.get(key, 0) + amount
            key = pack(creditor, day, debtor)
            sides[key] = sides.get(key, 0) - amount
        for (store, day), (owes, owed) in nets.items():  # wrapped: the same in any grouping
            a = self._acc(store, day)
            _add(a, F_OWES, owes)
            _add(a, F_OWED, owed)
        self.pairs = {}
        by_day: dict[int, list[array]] = {}  # day -> its stores' rows, in the order added
        for (_, day), a in self.acc.items():
            rows = by_day.get(day)
            if rows is None:
                rows = by_day[day] = []
            rows.append(a)
        chain: dict[int, array] = {}
        for day, rows in by_day.items():  # (most groups: one day)
            c = chain[day] = array("q", _ZERO_ROW)
            native.sum_rows(c, rows)
        for day, (principal, bonus, held) in self.own.items():
            c = chain.get(day)
            if c is None:
                c = chain[day] = array("q", _ZERO_ROW)
            _add(c, F_OWN_P, principal)
            _add(c, F_OWN_B, bonus)
            _add(c, F_OWN_HELD, held)
        self.own = {}
        totals = self._added("day_totals", *_rows(
            (L.DAY_KEY.pack(*k), a) for k, a in self.acc.items()))
        chain_days = self._added("day_chain", *_rows(
            (L.DAY_CHAIN_KEY.pack(day), c) for day, c in chain.items()))
        side_keys = sorted(sides)
        clearing = native.add_nets(  # wrapped: stored + amount, round int64
            side_keys, self.stored("day_clearing", side_keys),
            array("q", [wrapped(sides[k]) for k in side_keys]))
        return {"day_totals": totals, "day_chain": chain_days, "day_clearing": clearing,
                **self._kept()}

    def _folded(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """``records`` of a group that is one run kept for the fold (``folding``): its rows, the
        day's chain row and its clearing summed in C (``native.fold``), added to the stored."""
        slot_index, acc, nets, days = self.folding
        self.folding = None
        day = next(iter(days.values()))
        chain = array("q", _ZERO_ROW)
        keys, slots, side_keys, sides = native.fold(acc, nets, array("I", slot_index), day, chain)
        totals = self._added("day_totals", keys, acc, array("I", slots))
        chain_days = self._added("day_chain", [L.DAY_CHAIN_KEY.pack(day)], chain)
        clearing = native.add_nets(side_keys, self.stored("day_clearing", side_keys),
                                   array("q", sides))
        return {"day_totals": totals, "day_chain": chain_days, "day_clearing": clearing,
                **self._kept()}

    def _kept(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """``records``' staff, homes and closes (the same whether the rows were folded or not)."""
        staff_items = sorted((L.DAY_PAIR_KEY.pack(*k), s) for k, s in self.staff.items())
        stored = dict(self.stored("day_staff", [key for key, _ in staff_items]))
        staff = [(key, L.DAY_STAFF.pack(*(saturated(x + y) for x, y in zip(
            L.DAY_STAFF.unpack(stored[key]) if key in stored else (0, 0, 0, 0), s))))
            for key, s in staff_items]
        homes = sorted((cid, _U32.pack(self.homes[cid])) for cid in self.homes_changed)
        return {"day_staff": staff, "day_money_home": homes, "store_days": sorted(self.closes)}

    def _added(self, name: str, keys: list[bytes], rows: array,
               slots: array | None = None) -> list[tuple[bytes, bytes]]:
        """Day totals records (``name``: day_totals or day_chain) of ``keys`` (in key order)
        with their rows added: key k's the row at ``slots[k]`` of ``rows`` (WIDTH values a row;
        None: the k-th)."""
        return native.add_records(keys, self.stored(name, keys), rows, slots)

    def stored(self, name: str, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
        """The stored records of ``keys`` (in key order) in sub-database ``name``: (key, record)
        of those stored, in key order (fresh: none), as ``native.add_records`` and ``add_nets``
        walk them beside the keys."""
        if self.fresh or not keys:
            return []
        return self.txn.cursor(db=getattr(self.ledger, name)).getmulti(keys)


def _rows(items) -> tuple[list[bytes], array]:
    """(the keys in key order, their rows end to end): records' (key, row) for ``_added``."""
    items = sorted(items)
    rows = array("q")
    for _, a in items:
        rows.extend(a)
    return [key for key, _ in items], rows


def joined(entries) -> bytes:
    """Journal entries as one buffer: a list of them joined, or the bytes themselves (the
    writer's group, joined once for the day totals and the member metrics)."""
    buf = entries if isinstance(entries, bytes) else b"".join(entries)
    if len(buf) % L.JOURNAL_SIZE:
        raise InvariantError("journal entries of the wrong size")
    return buf


def later_payments(txn, ledger, buf: bytes, seen: set[int]) -> list[int]:
    """The indexes of the entries in ``buf`` (journal entries, in sequence order) that are a
    later payment of a split tender's basket: a purchase whose basket had a payment before it,
    among the entries already looked at (``seen``: basket tags, updated), in the baskets index
    at a smaller seq, or on another card shard (its entry marked BASKET_BEGUN_ELSEWHERE). The
    day totals and the member metrics count the basket's sale once."""
    size = L.JOURNAL_SIZE
    view = memoryview(buf)
    tags = view.cast("Q")[_OFF_BASKET // 8::_Q_PER_ENTRY].tolist()
    if not any(tags):
        return []
    seqs = view.cast("Q")[_OFF_SEQ // 8::_Q_PER_ENTRY].tolist()
    out = []
    db = ledger.baskets
    for k, tag in enumerate(tags):
        if not tag or buf[k * size + 1] != L.OP_PURCHASE:
            continue
        earlier = tag in seen or bool(L.JOURNAL_PURCHASE_FLAGS.unpack_from(
            buf, k * size + L.JOURNAL_OFF_PURCHASE_FLAGS)[0] & L.BASKET_BEGUN_ELSEWHERE)
        if not earlier and db is not None:
            cur = txn.cursor(db=db)
            if cur.set_range(_BASKET_FIRST.pack(tag, 0)):
                got_tag, got_seq = _BASKET_FIRST.unpack(cur.key())
                earlier = got_tag == tag and got_seq < seqs[k]
        seen.add(tag)
        if earlier:
            out.append(k)
    return out


def unpack_totals(raw: bytes) -> tuple:
    """A day totals record's WIDTH values (figures, counts by op, amounts by op)."""
    f = L.DAY_TOTALS.unpack(raw)
    if f[0] != L.DAY_TOTALS_VERSION:
        raise InvariantError(f"day totals record version {f[0]} unknown")
    return f[1:]


def check(txn, ledger) -> list[str]:
    """The day totals against the journal (``cardcore verify``): what the whole journal makes
    from nothing, in memory, beside what is stored; the sub-databases that differ."""
    totals = DayTotals(txn, ledger, {}, fresh=True)
    for chunk in journal_chunks(txn, ledger):
        totals.add_all(chunk)
    return [name for name, items in totals.records().items()
            if {k: v for k, v in items if v != _NO_RECORD.get(name)}
            != dict(txn.cursor(db=getattr(ledger, name)))]


def fill(txn, ledger) -> int:
    """Every journal entry added to the day totals (empty until now), in one write transaction:
    once, for a ledger made before them. Returns how many entries it added."""
    totals = DayTotals(txn, ledger, {}, from_start=True)
    n = 0
    for chunk in journal_chunks(txn, ledger):
        totals.add_all(chunk)
        n += len(chunk)
    totals.write()
    return n


def journal_chunks(txn, ledger):
    """The whole journal in order, FILL_CHUNK entries at a time (fills and checks from it)."""
    chunk: list[bytes] = []
    for _, entry in txn.cursor(db=ledger.journal):
        chunk.append(entry)
        if len(chunk) == FILL_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- reads (reports) -----------------------------------------------------------------------------

def read_day(txn, ledger, store: int, day: int) -> tuple[list[int], tuple | None, list, int]:
    """(the store's figures of ``day`` (zeros: nothing landed), its close (operator, seq, time)
    or None, its clearing rows [(counterparty, owes_minor)], the money its holds still held at
    the end of the day)"""
    raw = txn.get(L.DAY_KEY.pack(store, day), db=ledger.day_totals)
    values = list(unpack_totals(raw)) if raw is not None else [0] * WIDTH
    closed = txn.get(L.DAY_KEY.pack(store, day), db=ledger.store_days)
    close = L.STORE_DAY.unpack(closed)[2:5] if closed is not None else None
    held = (L.STORE_DAY.unpack(closed)[5] if closed is not None
            else holds_outstanding(txn, ledger, store, day))
    rows = []
    prefix = L.DAY_KEY.pack(store, day)
    cur = txn.cursor(db=ledger.day_clearing)
    if cur.set_range(prefix):
        for key, value in cur:
            if not key.startswith(prefix):
                break
            amount = _I64.unpack(value)[0]
            if amount:
                rows.append((L.DAY_PAIR_KEY.unpack(key)[2], amount))
    return values, close, rows, held


def read_range(txn, ledger, store: int | None, from_day: int,
               to_day: int) -> list[tuple[int, list]]:
    """The store's (None: the chain's) records from ``from_day`` to ``to_day`` inclusive, days
    with none left out: one range read."""
    if store is None:
        db, first, end = (ledger.day_chain, L.DAY_CHAIN_KEY.pack(from_day),
                          L.DAY_CHAIN_KEY.pack(to_day))
    else:
        db, first, end = (ledger.day_totals, L.DAY_KEY.pack(store, from_day),
                          L.DAY_KEY.pack(store, to_day))
    out = []
    cur = txn.cursor(db=db)
    if cur.set_range(first):
        for key, value in cur:
            if key > end:
                break
            out.append((int.from_bytes(key[-4:], "big"), list(unpack_totals(value))))  # the day
    return out


def read_stores_range(txn, ledger, stores: list[int], from_day: int,
                      to_day: int) -> list[tuple[int, list]]:
    """The stores' records from ``from_day`` to ``to_day`` added up day by day (a region's):
    one range read per store."""
    days: dict[int, list[int]] = {}
    for store in stores:
        for day, values in read_range(txn, ledger, store, from_day, to_day):
            acc = days.get(day)
            if acc is None:
                days[day] = values
            else:
                for k in range(WIDTH):
                    acc[k] += values[k]
    return sorted(days.items())


def _stores_holding(txn, ledger, from_day: int, to_day: int):
    """Every store with a record from ``from_day`` to ``to_day``, in store order: one seek per
    store holding records (keys are store then day), never a read of a store's other days."""
    cur = txn.cursor(db=ledger.day_totals)
    store = 0
    while cur.set_range(L.DAY_KEY.pack(store, from_day)):
        found, day = L.DAY_KEY.unpack(cur.key())
        if found != store and day < from_day:  # a later store's earlier days: seek its range
            store = found
            continue
        if day <= to_day:
            yield found
        if found == 0xFFFF_FFFF:
            return
        store = found + 1


def stores_with_records(txn, ledger, covers) -> list[int]:
    """Every store with a record of any day that ``covers(store)``, in store order (what a
    scope's sums and holds outstanding are over)."""
    return [s for s in _stores_holding(txn, ledger, 0, 0xFFFF_FFFF) if covers(s)]


def stores_in_range(txn, ledger, from_day: int, to_day: int, covers,
                    limit: int) -> tuple[list[tuple[int, list[int]]], bool]:
    """([(store, its figures summed over the days)], truncated): every store with a record
    from ``from_day`` to ``to_day`` that ``covers(store)``, in store order, at most ``limit``
    (truncated: more had records)."""
    out: list[tuple[int, list[int]]] = []
    for store in _stores_holding(txn, ledger, from_day, to_day):
        if not covers(store):
            continue
        if len(out) == limit:
            return out, True
        acc = [0] * WIDTH
        for _, values in read_range(txn, ledger, store, from_day, to_day):
            for k in range(WIDTH):
                acc[k] += values[k]
        out.append((store, [clamped(k, x) for k, x in enumerate(acc)]))
    return out, False


def liability(txn, ledger, through_day: int) -> tuple[int, int, int]:
    """(principal, bonus, held) the chain owes its members at the end of business day
    ``through_day``, and how much of it open holds held: the range sum of the chain's daily net
    changes up to it, by each entry's own business day."""
    principal = bonus = held = 0
    for _, v in read_range(txn, ledger, None, 0, through_day):
        principal += v[F_OWN_P]
        bonus += v[F_OWN_B]
        held += v[F_OWN_HELD]
    return wrapped(principal), wrapped(bonus), wrapped(held)


def holds_outstanding(txn, ledger, store: int, through_day: int) -> int:
    """What the holds placed at ``store`` still held at the end of its business day
    ``through_day`` (as landed: a store's figures): the range sum of its records up to it."""
    return wrapped(sum(v[F_HOLDS] for _, v in read_range(txn, ledger, store, 0, through_day)))


def read_staff(txn, ledger, store: int | None, from_day: int, to_day: int,
               rows_max: int) -> dict[int, list[int]]:
    """Sales and top-ups by staff id over the days (a store's, or every store's: one seek per
    store), at most ``rows_max`` staff ids."""
    out: dict[int, list[int]] = {}
    cur = txn.cursor(db=ledger.day_staff)
    s = 0 if store is None else store
    while cur.set_range(L.DAY_PAIR_KEY.pack(s, from_day, 0)):
        key_store, day, _ = L.DAY_PAIR_KEY.unpack(cur.key())
        if store is not None and key_store != store:
            break
        if key_store != s:  # the next store that has any: from its first day in the range
            s = key_store
            continue
        for key, value in cur:
            key_store, day, staff = L.DAY_PAIR_KEY.unpack(key)
            if key_store != s or day > to_day:
                break
            row = out.get(staff)
            if row is None:
                if len(out) == rows_max:
                    return out
                row = out[staff] = [0, 0, 0, 0]
            for k, x in enumerate(L.DAY_STAFF.unpack(value)):
                row[k] += x
        if store is not None or s == 0xFFFFFFFF:
            break
        s += 1
    return out


GRANULARITY_DAY, GRANULARITY_MONTH, GRANULARITY_YEAR = 1, 2, 3  # cardcore.v1.ReportGranularity
REPORT_DAYS_MAX = 3660   # a report's range, days (ten years of daily rows at most)
STAFF_ROWS_MAX = 1000    # staff ids one report lists at most
STORE_ROWS_MAX = 1000    # stores one report lists at most (by_store)


def periods(from_day: int, to_day: int, granularity: int) -> list[tuple[str, int, int]]:
    """The report's rows: (label, first day, last day) of each day, calendar month or year
    that the range touches, cut to the range."""
    if granularity == GRANULARITY_DAY:
        return [(date_of_day(d), d, d) for d in range(from_day, to_day + 1)]
    width = 7 if granularity == GRANULARITY_MONTH else 4  # "2026-11" or "2026"
    out: list[list] = []
    for d in range(from_day, to_day + 1):
        label = date_of_day(d)[:width]
        if out and out[-1][0] == label:
            out[-1][2] = d
        else:
            out.append([label, d, d])
    return [tuple(p) for p in out]


def report(txn, ledger, store: int | None, from_day: int, to_day: int, granularity: int,
           staff: bool, region_stores: list[int] | None = None) -> dict:
    """A store's (``store``) or the chain's (None) figures over the days, by period, from range
    reads of the day totals: {"rows": [(label, first, last, values, liability principal, bonus,
    days closed, holds outstanding)], "total": values, "staff": {staff id: [sales, sales_minor,
    top-ups, top_up_minor]}}. The chain's rows carry the liability at the end of their last day;
    every row the money holds (the store's, or all) still held then. ``region_stores`` (with
    ``store`` None): a region's, the sum of those stores' records day by day, their holds
    outstanding and staff (no liability, no closed days)."""
    if ledger.day_totals is None:  # a read-only look at a ledger made before them
        return {"rows": [(label, first, last, [0] * WIDTH, 0, 0, 0, 0) for label, first, last
                         in periods(from_day, to_day, granularity)],
                "total": [0] * WIDTH, "staff": {}}
    days = dict(read_range(txn, ledger, store, from_day, to_day) if region_stores is None
                else read_stores_range(txn, ledger, region_stores, from_day, to_day))
    closed = {} if store is None else _closes(txn, ledger, store, from_day, to_day)
    chain = store is None and region_stores is None
    principal, bonus, held = (liability(txn, ledger, from_day - 1) if chain and from_day
                              else (0, 0, 0))
    spans = periods(from_day, to_day, granularity)
    holds = None if chain else _holds_by_row(
        txn, ledger, region_stores if region_stores is not None else [store], from_day, to_day,
        spans)  # (an empty region or scope holds nothing: never the store None's)
    total = [0] * WIDTH
    rows = []
    for n, (label, first, last) in enumerate(spans):
        acc = [0] * WIDTH
        for d in range(first, last + 1):
            v = days.get(d)
            if v is not None:
                for k in range(WIDTH):
                    acc[k] += v[k]
        for k in range(WIDTH):
            total[k] += acc[k]
        if chain:
            principal += acc[F_OWN_P]
            bonus += acc[F_OWN_B]
            held += acc[F_OWN_HELD]
        else:
            held = holds[n]
        rows.append((label, first, last, [clamped(k, x) for k, x in enumerate(acc)],
                     wrapped(principal), wrapped(bonus),
                     sum(1 for d in closed if first <= d <= last), wrapped(held)))
    return {"rows": rows, "total": [clamped(k, x) for k, x in enumerate(total)],
            "staff": (read_staff(txn, ledger, store, from_day, to_day, STAFF_ROWS_MAX)
                      if region_stores is None else region_staff(txn, ledger, region_stores,
                                                                  from_day, to_day))
            if staff else {}}


def _closes(txn, ledger, store: int, from_day: int, to_day: int) -> dict[int, int]:
    """The store's closed days in the range -> the holds outstanding each close kept."""
    out: dict[int, int] = {}
    cur = txn.cursor(db=ledger.store_days)
    if cur.set_range(L.DAY_KEY.pack(store, from_day)):
        end = L.DAY_KEY.pack(store, to_day)
        for key, value in cur:
            if key > end:
                break
            out[L.DAY_KEY.unpack(key)[1]] = L.STORE_DAY.unpack(value)[5]
    return out


def _holds_by_row(txn, ledger, stores: list[int], from_day: int, to_day: int,
                  spans: list[tuple[str, int, int]]) -> list[int]:
    """The holds outstanding at the end of each period, summed over ``stores`` (one, or a
    region's): each store's running sum of its records, except that a closed day answers what
    its close kept (the running sum goes on underneath, so a later day does not depend on where
    the report starts)."""
    out = [0] * len(spans)
    for s in stores:
        days = dict(read_range(txn, ledger, s, 0, to_day))  # one read: before the range, and in it
        running = sum(v[F_HOLDS] for d, v in days.items() if d < from_day)
        closed = _closes(txn, ledger, s, from_day, to_day)
        for n, (_, first, last) in enumerate(spans):
            running += sum(days[d][F_HOLDS] for d in range(first, last + 1) if d in days)
            out[n] += closed.get(last, running)
    return out


def region_staff(txn, ledger, stores: list[int], from_day: int,
                 to_day: int) -> dict[int, list[int]]:
    """A region's staff figures: its stores', added up by staff id (at most STAFF_ROWS_MAX)."""
    merged: dict[int, list[int]] = {}
    for s in stores:
        add_staff(merged, read_staff(txn, ledger, s, from_day, to_day, STAFF_ROWS_MAX))
    return merged


def add_staff(merged: dict[int, list[int]], rows: dict[int, list[int]]) -> None:
    """Staff figures ``rows`` added into ``merged`` by staff id (at most STAFF_ROWS_MAX ids:
    a new id past them is left out, as ``read_staff`` leaves them out)."""
    for staff_id, row in rows.items():
        acc = merged.get(staff_id)
        if acc is None:
            if len(merged) == STAFF_ROWS_MAX:
                continue
            acc = merged[staff_id] = [0, 0, 0, 0]
        for k in range(4):
            acc[k] += row[k]


def merge_reports(results: list[dict]) -> dict:
    """One report from the same report read on several card shards (a front over several:
    docs/cluster.md, "Several shards"): every card is on one shard, so the figures, the
    liability and the holds add up (as the C loop adds: nets wrapped, the rest saturated); a
    day closed is closed on every shard (the close is an admin change every card shard
    applies), so its count is the most any shard has, never a sum. Staff and stores add up by
    id, at most STAFF_ROWS_MAX and STORE_ROWS_MAX (``stores_truncated`` then, or if any shard's
    listing was cut). The admin entries every card shard holds (relayed: an operator added, a
    store put, a day closed) count once, as the most any shard has."""
    assert results
    first = results[0]
    rows = []
    for n, (label, day0, day1, *_rest) in enumerate(first["rows"]):
        principal, bonus, closed, held = 0, 0, 0, 0
        for r in results:
            row = r["rows"][n]
            assert row[:3] == (label, day0, day1), (row[:3], label)  # the same periods
            principal += row[4]
            bonus += row[5]
            closed = max(closed, row[6])
            held += row[7]
        rows.append((label, day0, day1, _merged_values([r["rows"][n][3] for r in results]),
                     wrapped(principal), wrapped(bonus), closed, wrapped(held)))
    staff: dict[int, list[int]] = {}
    for r in results:
        add_staff(staff, r["staff"])
    merged = {"rows": rows, "total": _merged_values([r["total"] for r in results]),
              "staff": staff}
    if "stores" in first:
        by_store: dict[int, tuple[str, list[int]]] = {}
        truncated = False
        for r in results:
            truncated = truncated or r["stores_truncated"]
            for store, name, values in r["stores"]:
                had = by_store.get(store)
                if had is None:
                    by_store[store] = (name, [values])
                else:
                    had[1].append(values)
                    by_store[store] = (had[0] or name, had[1])
        listed = sorted(by_store.items())
        merged["stores"] = [(s, name, _merged_values(values)) for s, (name, values) in
                            listed[:STORE_ROWS_MAX]]
        merged["stores_truncated"] = truncated or len(listed) > STORE_ROWS_MAX
    return merged


_RELAYED_OPS = [op for op in sorted(L.ADMIN_OPS) if op < _NO]  # (admin entries: no money)


def _merged_values(values: list[list[int]]) -> list[int]:
    """Several card shards' figures of one period as one (``merge_reports``): summed, but each
    admin operation's count and amount the most any shard has, and the entries less the
    copies."""
    acc = [sum(v[k] for v in values) for k in range(WIDTH)]
    for op in _RELAYED_OPS:
        for k in (_NF + op, _NF + _NO + op):
            once = max(v[k] for v in values)
            if k == _NF + op:
                acc[F_ENTRIES] -= acc[k] - once
            acc[k] = once
    return [clamped(k, x) for k, x in enumerate(acc)]


def merge_days(days: list[tuple[list[int], tuple | None, list, int]],
               close: tuple | None) -> tuple[list[int], tuple | None, list, int]:
    """One store's business day (``read_day``) from several card shards' (a front over several:
    docs/cluster.md): the figures as ``merge_reports`` adds them, the clearing rows added up by
    counterparty, the holds outstanding added up; ``close``: the admin shard's record of it (the
    close is made there, then relayed to every card shard)."""
    assert days
    clearing: dict[int, int] = {}
    for _, _, rows, _ in days:
        for other, amount in rows:
            clearing[other] = clearing.get(other, 0) + amount
    return (_merged_values([d[0] for d in days]), close,
            [(other, wrapped(amount)) for other, amount in sorted(clearing.items())
             if wrapped(amount)],
            wrapped(sum(d[3] for d in days)))
