"""Member metrics: who joined, who buys, who comes back and who drifts away (issue 11, marketing's
figures in ``DOMAIN.md``), kept in the writer's write transaction beside the day totals.

**Definitions** (the one place they are written):

- A **member** is a card opened or imported (``OP_OPEN``, ``OP_IMPORT_CARD``). A replacement's
  new card (``OP_REPLACEMENT_OPENED``) continues its old card's member: the member keeps the id of
  its *first* card (its root) and the activity of every card of the lineage counts under it, so a
  replacement is neither a new member nor a churned one. The member is named to operators by its
  current card (the newest replacement): its card id and masked number, never the number.
- A **purchase** is an ``OP_PURCHASE`` entry that is not a later payment of a split tender's
  basket (``daytotals.later_payments``: the basket is one visit, counted with its first payment).
  Its **spend** is gross minus discount (what the member's basket cost, however it was paid).
  Refunds and reversals do not undo a purchase here (the visit happened), as in the day totals.
- Days are business days (``daytotals.DayTotals.business_day_of``: the entry's program version's
  clock and cutoff); months are calendar months of business days (a member's months never go
  back: a purchase that a program's new clock puts in an earlier month than the member's last
  counts in that last month). Periods of the figures are whole months (``from_month`` ..
  ``to_month``); the dormant list is as of a day.
- **new**: opened in the period (``OP_OPEN``). **imported**: brought from a legacy system in the
  period (``OP_IMPORT_CARD``): a customer already, so neither new nor ever activated.
  **activated**: a new member's first purchase ever, in the period. **active**: at least one
  purchase in the period. **repeat**: active with 2 or more purchases in the period
  (repeat rate = repeat / active). **churned**: active in the previous period of the same number
  of months and not in this one (churn rate = churned / active in the previous period).
  **members**: opened or imported up to the period's last day (activation rate = new /
  members).
- **dormant as of day D**: 3 or more purchases on days D-182 .. D and none on days D-60 .. D
  (a purchase k days before D, k = D - its day: the last purchase has k >= 61, the third-last
  k <= 182). A member who bought after D is not listed (as of a past D: the members dormant then
  who have not bought since).

**Aggregates** (sub-databases ``member_*``, fixed-size records with a version byte, derived from
the journal entries alone, so replicas that apply the same groups hold the same records):

    member_cards   card_id                 -> MEMBER (64 B): a member's record under its root card
                                              (opened day, first and last three purchase days,
                                              purchases, the month of its last purchase and its
                                              purchases and spend in it, current card), or a
                                              replacement card's alias naming its root
    member_months  month (u32 BE) | root   -> MEMBER_MONTH (16 B): purchases and spend in a month
                                              before the month of the member's last purchase
    member_days    business day (u32 BE)   -> MEMBER_DAY (16 B): members new, activated and imported
                                              that day
    member_last    last day (u32 BE) | root -> empty: members by their last purchase's day
    member_month_totals month (u32 BE)     -> MEMBER_TOTALS (32 B): the month's active, repeat and
                                              retained (active the month before too) members,
                                              purchases and spend: a one-month report's figures

A member's month is written to ``member_months`` only when a purchase in a later month comes (its
record holds the month under way), so a purchase writes one record (and the last-purchase index
once a day): the writer's cost. A group whose only entries for the metrics are purchases (most)
goes through a C loop (``ext/members.pyx``, ``Members.add_group``) over the packed records;
``Members._purchase`` is its reference, held to it by a hypothesis test. A month's figures are
then the rows of the month plus the records
of the members whose last purchase is in it (``member_last``, a range read of its days). So a
report is range reads: the period's months (and the previous period's) for active, repeat and
churned, the days for new and activated, and for the dormant list the members whose last purchase
is on D-182 .. D-61, each checked against its record (third-last purchase >= D-182).
"""
from __future__ import annotations

import calendar
import datetime as dt
import re
import struct
from array import array

from cardcore import daytotals
from cardcore import layout as L
from cardcore.ext import members as native
from cardcore.idempotency import InvariantError
from cardcore.profiles import masked_of

DB_NAMES = ("member_cards", "member_months", "member_days", "member_last", "member_month_totals")
# Meta: set while the member metrics hold every journal entry; a writer run without them (a
# benchmark's) clears it, and the next one with them fills them again from the journal.
META_MEMBER_METRICS = b"member_metrics"

MEMBER_VERSION = 1
# a member opened here, a replacement card's alias, a member imported from a legacy system
KIND_MEMBER, KIND_ALIAS, KIND_IMPORTED = 1, 2, 3
# version, kind, opened day, first purchase day, last three purchase days (newest first; as many
# as purchases, the rest 0), purchases (saturating), the month of the last purchase (its index:
# months since 1970-01) and the purchases and spend_minor in it, card: a member's current card,
# an alias's root
MEMBER = struct.Struct("<BBxxII3IIII4xq16s")
MEMBER_MONTH = struct.Struct("<BxxxIq")   # version, purchases, spend_minor
MEMBER_DAY = struct.Struct("<BxxxIII")    # version, new, activated, imported
# version, active, repeat, retained (active the month before too), purchases, spend_minor
MEMBER_TOTALS = struct.Struct("<BxxxIIIQq")
assert MEMBER.size == 64 and MEMBER_MONTH.size == 16 and MEMBER_DAY.size == 16
assert MEMBER_TOTALS.size == 32
MONTH_KEY = struct.Struct(">I16s")        # month index (months since 1970-01), root card id
LAST_KEY = struct.Struct(">I16s")         # last purchase day, root card id
DAY_KEY = struct.Struct(">I")
U32_MAX = 0xFFFFFFFF

DORMANT_QUIET_DAYS = 60    # none on D-60 .. D
DORMANT_SPAN_DAYS = 182    # 3+ on D-182 .. D (six months)
DORMANT_PURCHASES_MIN = 3
REPORT_MONTHS_MAX = 24     # a report's months at most (and as many before it, for churn)
DORMANT_PAGE_MAX = 10_000  # dormant members one answer lists at most
MONTH_RE = re.compile(r"\d{4}-\d{2}")

# What the metrics read of a journal entry (layout.JOURNAL): op, card id, amount, discount,
# time, store, program version.
_ENTRY = struct.Struct("<xB14x16sqq48xqI20xI")
assert _ENTRY.size == 132
_OPS = frozenset((L.OP_OPEN, L.OP_IMPORT_CARD, L.OP_PURCHASE, L.OP_CARD_REPLACED,
                  L.OP_REPLACEMENT_OPENED))
# what is not a member's record to read first: openings (new), a store's entry (its business day,
# followed as the day totals follow it: daytotals.DayTotals.store_put)
_NO_RECORD_READ = frozenset((L.OP_OPEN, L.OP_IMPORT_CARD, L.OP_STORE_PUT))
_NO_CARD = bytes(16)
_CARD = 11  # MEMBER's card field, unpacked
_KIND_ALIAS_BYTE = bytes((KIND_ALIAS,))  # MEMBER's kind byte of an alias
_OFF_CARD = 48  # ... and its offset, packed
# layout.JOURNAL as columns of u32: store, program version; of i64: time
_I_STORE, _I_VERSION, _I_PER_ENTRY = 104 // 4, 128 // 4, L.JOURNAL_SIZE // 4
_Q_TS, _Q_PER_ENTRY = L.JOURNAL_OFF_TS // 8, L.JOURNAL_SIZE // 8
_TABLE_MAX = native.table_max()
_EPOCH_ORDINAL = daytotals.EPOCH.toordinal()
_DAY_MAX = dt.date.max.toordinal() - _EPOCH_ORDINAL  # 9999-12-31: the last day month_of_day takes


class MonthError(ValueError):
    """A month that is not valid (the field's name in ``field``)."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


def month_of_day(day: int) -> int:
    """The calendar month (months since 1970-01) of business day ``day``."""
    d = dt.date.fromordinal(_EPOCH_ORDINAL + day)
    return (d.year - 1970) * 12 + d.month - 1


def month_text(month: int) -> str:
    return f"{1970 + month // 12:04d}-{month % 12 + 1:02d}"


def month_of_text(text: str, field: str) -> int:
    """A "YYYY-MM" month as a month index; MonthError if it is not one (or before 1970-01)."""
    if not MONTH_RE.fullmatch(text):
        raise MonthError(field, f"{field} must be a month, YYYY-MM")
    year, month = int(text[:4]), int(text[5:])
    if not 1 <= month <= 12 or year < 1970:
        raise MonthError(field, f"{field} must be a month from 1970-01 on, YYYY-MM")
    return (year - 1970) * 12 + month - 1


def month_days(month: int) -> tuple[int, int]:
    """(first, last) business day of a month (9999-12 too)."""
    year, month_no = 1970 + month // 12, month % 12 + 1
    first = dt.date(year, month_no, 1).toordinal() - _EPOCH_ORDINAL
    return first, first + calendar.monthrange(year, month_no)[1] - 1


def _member(raw: bytes) -> list:
    f = list(MEMBER.unpack(raw))
    if f[0] != MEMBER_VERSION or f[1] not in (KIND_MEMBER, KIND_ALIAS, KIND_IMPORTED):
        raise InvariantError(f"member record version {f[0]} kind {f[1]} unknown")
    return f


def _checked(raw: bytes, record: struct.Struct) -> tuple:
    f = record.unpack(raw)
    if f[0] != MEMBER_VERSION:
        raise InvariantError(f"member metrics record version {f[0]} unknown")
    return f


class Members:
    """One write transaction's additions to the member metrics: entries added in sequence order
    (``add_all``, the reference; the writer's groups through ``add_group``: the C loop where it
    can), written once (``write``) at the end of the group."""

    def __init__(self, txn, ledger, settings: dict[int, tuple[int, int]], fresh: bool = False):
        """``fresh``: from nothing, read nothing stored (``check`` and ``fill``: the whole
        journal in memory)."""
        self.txn, self.ledger, self.fresh = txn, ledger, fresh
        self.days_of = daytotals.DayTotals(txn, ledger, settings, fresh=fresh)
        self.records: dict[bytes, list] = {}      # card id -> MEMBER fields (read or new)
        self.changed: set[bytes] = set()
        self.last_stored: dict[bytes, int | None] = {}  # root -> its member_last day as stored
        self.months: dict[tuple[int, bytes], list[int]] = {}  # (month, root) -> [purchases, spend]
        self.days: dict[int, list[int]] = {}       # day -> [new, activated, imported]
        self.totals: dict[int, list[int]] = {}     # month -> MEMBER_TOTALS' figures
        self.baskets_seen: set[int] = set()
        self.replaced: bytes | None = None        # a replacement's old card, until its new one
        # what a group's purchases made through the C loop (``add_group``): member_cards items,
        # and the last-purchase index's keys that no longer hold and items to put (key order)
        self.packed: list[tuple[bytes, bytes]] = []
        self.packed_last: tuple[list[bytes], list[tuple[bytes, bytes]]] = ([], [])

    # ---- additions ------------------------------------------------------------------------------

    def add_group(self, entries: list[bytes], later: list[int] | None = None) -> None:
        """A group's journal entries (the writer's, this Members' only addition): its purchases
        through the C loop (``cardcore.ext.members``) when purchases are all the group holds for
        the member metrics, at one time and program version (most groups); else, or when the C
        loop declines, ``add_all``, the reference. ``later``: as ``add_all``'s."""
        assert not (self.records or self.packed or self.fresh)
        buf = daytotals.joined(entries)
        if not buf:
            return
        ops = buf[1::L.JOURNAL_SIZE]
        if any(op in _OPS or op == L.OP_STORE_PUT for op in set(ops).difference((L.OP_PURCHASE,))):
            self.add_all(buf, later)
            return
        if later is None:
            later = daytotals.later_payments(self.txn, self.ledger, buf, self.baskets_seen)
        if not self._add_purchases(buf, ops, later):
            self.add_all(entries, later)

    def _add_purchases(self, buf: bytes, ops: bytes, later: list[int]) -> bool:
        """The group's purchases (every entry the member metrics count is one) through the C
        loop: their members' records read in one go (and the roots of the cards that are
        aliases), updated packed, kept in ``packed``. False, nothing kept: not for the C loop
        (the entries' times or versions differ, a record is missing or not as it expects)."""
        view = memoryview(buf)
        times = view.cast("q")[_Q_TS::_Q_PER_ENTRY]
        versions = view.cast("I")[_I_VERSION::_I_PER_ENTRY]
        n = len(ops)
        if times.tolist().count(times[0]) != n or versions.tolist().count(versions[0]) != n:
            return False
        if later:  # (rare) a split tender: the reference checks its later payments' records too
            return False
        skip = bytearray(n)  # (no later payment to skip: see above)
        index, slot_of = array("I", bytes(4 * n)), array("I", bytes(4 * n))
        m, keys = native.purchases(buf, skip, index, slot_of)
        if not m:
            return True
        del index[m:], slot_of[m:]
        cards = self.txn.cursor(db=self.ledger.member_cards)
        found = cards.getmulti(keys)
        joined = native.joined_records(found, len(keys))
        if joined is None:
            return False  # a card never opened, a record of another size: the reference says so
        aliases = ({cid: raw[_OFF_CARD:] for cid, raw in found
                    if raw[1] == KIND_ALIAS and raw[0] == MEMBER_VERSION}
                   if _KIND_ALIAS_BYTE in joined[1::MEMBER.size] else None)  # (kinds at once)
        if aliases:  # (rare) each alias's purchases to its root's record
            roots = dict(found)
            for cid in aliases:
                del roots[cid]
            missing = sorted(set(aliases.values()).difference(roots))
            got = cards.getmulti(missing)
            if len(got) != len(missing) or any(len(raw) != MEMBER.size for _, raw in got):
                return False
            roots.update(got)
            order = sorted(roots)
            slot = {cid: s for s, cid in enumerate(order)}
            to_root = [slot[aliases.get(cid, cid)] for cid in keys]
            slot_of = array("I", [to_root[s] for s in slot_of])
            records = bytearray(b"".join([roots[cid] for cid in order]))
        else:
            order = keys
            records = joined
        if len(records) != MEMBER.size * len(order):
            return False
        stores = view.cast("I")[_I_STORE::_I_PER_ENTRY].tolist()
        # the purchases' stores only: another entry's day is none of the member metrics' business
        day_of_store = self.days_of.days_of_stores(
            set(stores) if m == n else set(map(stores.__getitem__, index)), versions[0], times[0])
        if not all(0 <= day <= _DAY_MAX for day in day_of_store.values()):
            return False  # a day before 1970 or past 9999 (a synthetic clock): the reference's
        month_of_day_ = {day: month_of_day(day) for day in set(day_of_store.values())}
        if len(month_of_day_) == 1:  # one day for all (most groups)
            (day, month), = month_of_day_.items()
            days, months = array("I", [day]) * m, array("I", [month]) * m
        else:
            days = array("I", [day_of_store[stores[k]] for k in index])
            months = array("I", [month_of_day_[d] for d in days])
        before = array("q", [-2]) * len(order)
        months_out = array("q", bytes(32 * m))
        totals = array("q", bytes(8 * 6 * _TABLE_MAX))
        activated = array("q", bytes(8 * 2 * _TABLE_MAX))
        done = native.add_purchases(buf, index, slot_of, days, months, records, before,
                                    months_out, totals, activated)
        if done is None:
            return False
        n_months, n_totals, n_activated = done
        for r in range(0, 4 * n_months, 4):
            self._add_month(months_out[r + 1], order[months_out[r]], months_out[r + 2],
                            months_out[r + 3])
        for r in range(0, 6 * n_totals, 6):
            t = self.totals.setdefault(totals[r], [0, 0, 0, 0, 0])
            for k in range(4):
                t[k] += totals[r + 1 + k]
            t[4] = daytotals.saturated(t[4] + totals[r + 5])
        for r in range(0, 2 * n_activated, 2):
            self._day(activated[r])[1] += activated[r + 1]
        self.packed = native.items(order, records)
        self.packed_last = native.last_moves(records, before, order)
        return True

    def add_all(self, entries, later: list[int] | None = None) -> None:
        """Journal entries, in sequence order (the group's, or a chunk of the journal's).
        ``later``: their ``daytotals.later_payments`` when the caller has them (the writer: one
        group, one call, the list the day totals use); None: found here."""
        assert not self.packed  # (the C loop's records are not read back)
        buf = daytotals.joined(entries)
        if not buf:
            return
        size = L.JOURNAL_SIZE
        ops = buf[1::size]
        wanted = [k for k, op in enumerate(ops) if op in _OPS or op == L.OP_STORE_PUT]
        if not wanted:
            return
        if later is None:
            later = daytotals.later_payments(self.txn, self.ledger, buf, self.baskets_seen)
        later = set(later)
        self._read_records([buf[k * size + 16:k * size + 32] for k in wanted
                            if ops[k] not in _NO_RECORD_READ])
        unpack = _ENTRY.unpack_from
        day_of = self.days_of.business_day_of
        days: dict[tuple[int, int, int], tuple[int, int]] = {}  # (store, version, time) -> days
        purchase = self._purchase
        for k in wanted:
            op, card_id, amount, discount, ts_us, store, version = unpack(buf, k * size)
            if op == L.OP_STORE_PUT:  # the entries after it: the store's day as it sets it
                self.days_of.store_put(card_id)
                days.clear()
                continue
            when = days.get((store, version, ts_us))
            if when is None:
                day = day_of(store, version, ts_us)
                when = days[(store, version, ts_us)] = (day, month_of_day(day))
            if op == L.OP_PURCHASE:
                if k not in later:
                    purchase(card_id, when[0], when[1], amount - discount)
            elif op == L.OP_CARD_REPLACED:
                self.replaced = card_id
            elif op == L.OP_REPLACEMENT_OPENED:
                self._replacement(card_id)
            else:
                self._opened(card_id, when[0], op == L.OP_IMPORT_CARD)

    def _read_records(self, card_ids: list[bytes]) -> None:
        """The stored records of the cards (and of the roots of those that are aliases), read in
        one go each, so the loop reads nothing."""
        for _ in range(2):
            wanted = sorted({cid for cid in card_ids if cid not in self.records})
            if not wanted or self.fresh:
                return
            found = dict(self.txn.cursor(db=self.ledger.member_cards).getmulti(wanted))
            card_ids = []
            for cid, raw in found.items():
                rec = self.records[cid] = _member(raw)
                if rec[1] == KIND_ALIAS:
                    card_ids.append(rec[_CARD])

    def _record(self, card_id: bytes) -> list | None:
        rec = self.records.get(card_id)
        if rec is None and not self.fresh:
            raw = self.txn.get(card_id, db=self.ledger.member_cards)
            if raw is not None:
                rec = self.records[card_id] = _member(raw)
        return rec

    def _root(self, card_id: bytes) -> tuple[bytes, list]:
        """(the member's root card id, its record) of a card: itself, or its alias's root."""
        rec = self._record(card_id)
        if rec is not None and rec[1] == KIND_ALIAS:
            card_id = rec[_CARD]
            rec = self._record(card_id)
        if rec is None or rec[1] == KIND_ALIAS:
            raise InvariantError("member metrics: an entry of a card that was never opened")
        return card_id, rec

    def _day(self, day: int) -> list[int]:
        d = self.days.get(day)
        if d is None:
            d = self.days[day] = [0, 0, 0]
        return d

    def _opened(self, card_id: bytes, day: int, imported: bool) -> None:
        if self._record(card_id) is not None:
            raise InvariantError("member metrics: a card opened twice")
        self.records[card_id] = [MEMBER_VERSION, KIND_IMPORTED if imported else KIND_MEMBER, day,
                                 0, 0, 0, 0, 0, 0, 0, 0, card_id]
        self.changed.add(card_id)
        self._day(day)[2 if imported else 0] += 1

    def _replacement(self, new_id: bytes) -> None:
        """The new card names its old card's member; the member's current card is the new one."""
        if self.replaced is None:
            raise InvariantError("member metrics: a replacement's new card without its old "
                                 "card's entry before it")
        root, rec = self._root(self.replaced)
        self.replaced = None
        if self._record(new_id) is not None:
            raise InvariantError("member metrics: a replacement's new card was a card already")
        self.records[new_id] = [MEMBER_VERSION, KIND_ALIAS, 0, 0, 0, 0, 0, 0, 0, 0, 0, root]
        rec[_CARD] = new_id
        self.changed.update((new_id, root))

    def _purchase(self, card_id: bytes, day: int, month: int, spend_minor: int) -> None:
        rec = self.records.get(card_id)
        if rec is None or rec[1] == KIND_ALIAS:
            card_id, rec = self._root(card_id)
        count = rec[7]
        if card_id not in self.last_stored:
            self.last_stored[card_id] = rec[4] if count else None
        self.changed.add(card_id)
        rec[7] = count + 1 if count < U32_MAX else count
        if count and month < rec[8]:  # a program's new clock put it in an earlier month: it
            month = rec[8]            # counts in the month under way (months never go back)
        totals = self.totals.get(month)
        if totals is None:
            totals = self.totals[month] = [0, 0, 0, 0, 0]
        totals[3] += 1
        totals[4] = daytotals.saturated(totals[4] + spend_minor)
        if not count:  # the first: activated (an imported member was a customer already)
            rec[3] = rec[4] = day
            rec[8], rec[9], rec[10] = month, 1, spend_minor
            totals[0] += 1
            if rec[1] == KIND_MEMBER:
                self._day(day)[1] += 1
            return
        # the last three purchases' days, newest first (a program's new clock may put a day
        # before the last: kept in order)
        if day >= rec[4]:
            rec[4], rec[5], rec[6] = day, rec[4], rec[5]
        elif count == 1 or day >= rec[5]:
            rec[5], rec[6] = day, rec[5]
        elif count == 2 or day > rec[6]:
            rec[6] = day
        if month == rec[8]:  # the month under way
            rec[9] += 1
            rec[10] = daytotals.saturated(rec[10] + spend_minor)
            if rec[9] == 2:
                totals[1] += 1
        else:  # a later month: the one under way is done, into member_months
            self._add_month(rec[8], card_id, rec[9], rec[10])
            totals[0] += 1
            if rec[8] == month - 1:
                totals[2] += 1
            rec[8], rec[9], rec[10] = month, 1, spend_minor

    def _add_month(self, month: int, root: bytes, purchases: int, spend_minor: int) -> None:
        m = self.months.get((month, root))
        if m is None:
            m = self.months[(month, root)] = [0, 0]
        m[0] += purchases
        m[1] = daytotals.saturated(m[1] + spend_minor)

    # ---- the write ------------------------------------------------------------------------------

    def write(self) -> None:
        """Add the group's changes to the stored records (each key read and written once)."""
        txn, ledger = self.txn, self.ledger
        out = self.items()
        gone = out.pop("member_last_deleted")
        if gone:  # in key order: one cursor moving forward (mostly on its page)
            cur = txn.cursor(db=ledger.member_last)
            for key in gone:
                if not (cur.set_key(key) and cur.delete()):
                    raise InvariantError("member metrics: a member's last purchase was not indexed")
        for name, items in out.items():
            if items:
                txn.cursor(db=getattr(ledger, name)).putmulti(items)

    def items(self) -> dict[str, list]:
        """What the additions make of the records they touch, by sub-database, in key order
        (with ``member_last_deleted``: the last-purchase index keys that no longer hold)."""
        cards = (sorted([(cid, MEMBER.pack(*self.records[cid])) for cid in self.changed]
                        + self.packed) if self.changed else self.packed)  # (in key order)
        month_keys = sorted(MONTH_KEY.pack(*k) for k in self.months)
        stored = self._stored("member_months", month_keys)
        months = []
        for key in month_keys:
            old = _checked(stored[key], MEMBER_MONTH) if key in stored else (0, 0, 0)
            purchases, spend = self.months[MONTH_KEY.unpack(key)]
            months.append((key, MEMBER_MONTH.pack(MEMBER_VERSION, min(old[1] + purchases, U32_MAX),
                                                  daytotals.saturated(old[2] + spend))))
        day_keys = sorted(DAY_KEY.pack(d) for d in self.days)
        stored = self._stored("member_days", day_keys)
        days = []
        for key in day_keys:
            old = _checked(stored[key], MEMBER_DAY) if key in stored else (0, 0, 0, 0)
            added = self.days[DAY_KEY.unpack(key)[0]]
            days.append((key, MEMBER_DAY.pack(MEMBER_VERSION, *(min(x + y, U32_MAX) for x, y in
                                                                zip(old[1:], added)))))
        total_keys = sorted(DAY_KEY.pack(m) for m in self.totals)
        stored = self._stored("member_month_totals", total_keys)
        totals = []
        for key in total_keys:
            old = _checked(stored[key], MEMBER_TOTALS) if key in stored else (0, 0, 0, 0, 0, 0)
            t = self.totals[DAY_KEY.unpack(key)[0]]
            totals.append((key, MEMBER_TOTALS.pack(
                MEMBER_VERSION, *(min(old[k + 1] + t[k], U32_MAX) for k in range(3)),
                old[4] + t[3], daytotals.saturated(old[5] + t[4]))))
        deleted, last = self.packed_last  # (the C loop's, or the reference's below: never both)
        if self.last_stored:
            deleted, last = [], []
            for root, before in self.last_stored.items():
                now = self.records[root][4]
                if before != now:
                    if before is not None:
                        deleted.append(LAST_KEY.pack(before, root))
                    last.append((LAST_KEY.pack(now, root), b""))
            deleted.sort()
            last.sort()
        return {"member_cards": cards, "member_months": months, "member_days": days,
                "member_month_totals": totals, "member_last": last,
                "member_last_deleted": deleted}

    def _stored(self, name: str, keys: list[bytes]) -> dict[bytes, bytes]:
        if self.fresh or not keys:
            return {}
        return dict(self.txn.cursor(db=getattr(self.ledger, name)).getmulti(keys))


def _from_journal(txn, ledger) -> Members:
    """The member metrics the whole journal makes, from nothing, in memory."""
    members = Members(txn, ledger, {}, fresh=True)
    for chunk in daytotals.journal_chunks(txn, ledger):
        members.add_all(chunk)
    return members


def keep(txn, ledger, entries: bytes | list[bytes], later: list[int] | None = None) -> None:
    """The writer's call, in the group's write transaction: its journal entries added (``later``:
    their ``daytotals.later_payments``, found once for the day totals and these), or, for a
    writer run without the member metrics (a benchmark's), their mark cleared."""
    if not ledger.keep_member_metrics:
        txn.delete(META_MEMBER_METRICS, db=ledger.meta)
        return
    members = Members(txn, ledger, ledger.day_settings)
    members.add_group(entries, later)
    members.write()


def fill(txn, ledger) -> int:
    """Every journal entry added to the member metrics (empty until now, dropped), and the mark
    set, in one write transaction: once, for a ledger made before them. Returns the members."""
    for name in DB_NAMES:
        txn.drop(getattr(ledger, name), delete=False)
    members = _from_journal(txn, ledger)
    members.write()
    txn.put(META_MEMBER_METRICS, b"\x01", db=ledger.meta)
    return sum(1 for rec in members.records.values() if rec[1] != KIND_ALIAS)


def check(txn, ledger) -> list[str]:
    """The member metrics against the journal (``cardcore verify``): the sub-databases whose
    stored records differ from what the whole journal makes."""
    made = _from_journal(txn, ledger).items()
    made.pop("member_last_deleted")
    return [name for name, items in made.items()
            if dict(items) != dict(txn.cursor(db=getattr(ledger, name)))]


# ---- reads (reports) -----------------------------------------------------------------------------

def _month_rows(txn, ledger, from_month: int, to_month: int) -> dict[bytes, list[int]]:
    """root -> [purchases, spend_minor] over the months: the months' rows (a range read), and the
    months under way in the records of the members whose last purchase is in them (a range read
    of the last-purchase index over the months' days)."""
    out: dict[bytes, list[int]] = {}
    cur = txn.cursor(db=ledger.member_months)
    if cur.set_range(MONTH_KEY.pack(from_month, _NO_CARD)):
        end = MONTH_KEY.pack(to_month, b"\xff" * 16)
        unpack = MEMBER_MONTH.unpack
        for key, value in cur:
            if key > end:
                break
            _, purchases, spend = unpack(value)
            row = out.get(key[4:])
            if row is None:
                out[key[4:]] = [purchases, spend]
            else:
                row[0] += purchases
                row[1] += spend
    first, _ = month_days(from_month)
    _, last = month_days(to_month)
    for _, root, rec in _by_last_purchase(txn, ledger, first, last):
        if not from_month <= rec[8] <= to_month:
            raise InvariantError("member metrics: a member's month under way is not its "
                                 "last purchase's")
        row = out.get(root)
        if row is None:
            out[root] = [rec[9], rec[10]]
        else:
            row[0] += rec[9]
            row[1] += rec[10]
    return out


def _day_counts(txn, ledger, first: int, last: int) -> tuple[int, int, int]:
    """(new, activated, imported) over business days first .. last: one range read."""
    sums = [0, 0, 0]
    cur = txn.cursor(db=ledger.member_days)
    if cur.set_range(DAY_KEY.pack(first)):
        end = DAY_KEY.pack(last)
        for key, value in cur:
            if key > end:
                break
            f = _checked(value, MEMBER_DAY)
            for k in range(3):
                sums[k] += f[k + 1]
    return sums[0], sums[1], sums[2]


def rate_bp(part: int, whole: int) -> int:
    """part / whole in basis points, rounded half up (0 of nothing)."""
    return (part * 20_000 + whole) // (2 * whole) if whole else 0


def _month_totals(txn, ledger, month: int) -> tuple:
    """A month's MEMBER_TOTALS figures (active, repeat, retained, purchases, spend_minor)."""
    raw = txn.get(DAY_KEY.pack(month), db=ledger.member_month_totals) if month >= 0 else None
    return _checked(raw, MEMBER_TOTALS)[1:] if raw is not None else (0, 0, 0, 0, 0)


def figures(txn, ledger, from_month: int, to_month: int) -> dict:
    """The member figures of months ``from_month`` .. ``to_month`` (indexes): one month from its
    totals and the month before's (two reads), more from the months' members (range reads of
    the members active in the period and in the one before)."""
    n = to_month - from_month + 1
    assert 1 <= n <= REPORT_MONTHS_MAX
    first, _ = month_days(from_month)
    _, last = month_days(to_month)
    if n == 1:
        active, repeat, retained, purchases, spend = _month_totals(txn, ledger, from_month)
        previous_active = _month_totals(txn, ledger, from_month - 1)[0]
        churned = previous_active - retained
    else:
        now = _month_rows(txn, ledger, from_month, to_month)
        before = _month_rows(txn, ledger, max(0, from_month - n), from_month - 1) \
            if from_month else {}
        active, previous_active = len(now), len(before)
        repeat = sum(1 for p, _ in now.values() if p >= 2)
        churned = sum(1 for root in before if root not in now)
        purchases = sum(p for p, _ in now.values())
        spend = daytotals.saturated(sum(s for _, s in now.values()))  # as each month's is
    new, activated, imported = _day_counts(txn, ledger, first, last)
    opened, _, imported_ever = _day_counts(txn, ledger, 0, last)
    members = opened + imported_ever
    return {"from_month": from_month, "to_month": to_month,
            "previous_from_month": max(0, from_month - n), "previous_to_month": from_month - 1,
            "members": members, "new": new, "activated": activated, "imported": imported,
            "active": active, "repeat": repeat, "purchases": purchases, "spend_minor": spend,
            "previous_active": previous_active, "churned": churned,
            "activation_rate_bp": rate_bp(new, members), "repeat_rate_bp": rate_bp(repeat, active),
            "churn_rate_bp": rate_bp(churned, previous_active)}


def _by_last_purchase(txn, ledger, first_day: int, last_day: int):
    """(index key, member, its record's fields) of the members whose last purchase is on a day
    from ``first_day`` to ``last_day``, in index order (a range read of member_last)."""
    cur = txn.cursor(db=ledger.member_last)
    if not cur.set_range(LAST_KEY.pack(first_day, _NO_CARD)):
        return
    end = LAST_KEY.pack(last_day, b"\xff" * 16)
    cards = txn.cursor(db=ledger.member_cards)
    for key in cur.iternext(values=False):
        if key > end:
            return
        raw = cards.get(key[4:])
        if raw is None:
            raise InvariantError("member metrics: an indexed member without its record")
        yield key, key[4:], _member(raw)


def dormant(txn, ledger, as_of: int, limit: int, after: bytes = b"") -> dict:
    """The members dormant as of business day ``as_of``: how many, and up to ``limit`` of them
    after the resume point ``after`` (a member_last key; b"": from the first), in order of their
    last purchase, each as (current card id, masked number, last purchase day, third-last
    purchase day, purchases, opened day); ``next``: the resume point of the rest (b"": none);
    ``keys``: each row's resume point (``merge_reads``)."""
    assert 0 <= limit <= DORMANT_PAGE_MAX
    lo, hi = as_of - DORMANT_SPAN_DAYS, as_of - DORMANT_QUIET_DAYS - 1
    out = {"count": 0, "rows": [], "next": b"", "keys": []}
    if hi < 0:
        return out
    lo = max(lo, 0)
    rows = out["rows"]
    last_key = b""
    for key, _, rec in _by_last_purchase(txn, ledger, lo, hi):
        if rec[7] < DORMANT_PURCHASES_MIN or rec[6] < lo:
            continue
        out["count"] += 1
        if key <= after:
            continue
        if len(rows) < limit:
            card = rec[_CARD]
            rows.append((card, masked_of(txn.get(card, db=ledger.profiles)), rec[4], rec[6],
                         rec[7], rec[2]))
            out["keys"].append(key)
            last_key = key
        else:  # one more than the page holds: the rest resume after the page's last
            out["next"] = last_key
    if limit == 0:
        out["next"] = b""
    return out


_ADDED = ("members", "new", "activated", "imported", "active", "repeat", "purchases",
          "previous_active", "churned")


def merge_reads(reads: list[tuple[dict, dict]], limit: int) -> tuple[dict, dict]:
    """One member report read (``figures``, ``dormant``) from several card shards' (a front over
    several: docs/cluster.md), each read with the same months, day, ``limit`` and resume point.
    A member and every card it was replaced by are on one shard, so the counts add up and the
    rates are computed again from them; the dormant page is the first ``limit`` rows of every
    shard's in resume-point order (each shard's page holds its first ``limit``)."""
    assert reads
    figures = dict(reads[0][0])
    for name in _ADDED:
        figures[name] = sum(r[0][name] for r in reads)
    figures["spend_minor"] = daytotals.saturated(sum(r[0]["spend_minor"] for r in reads))
    figures["activation_rate_bp"] = rate_bp(figures["new"], figures["members"])
    figures["repeat_rate_bp"] = rate_bp(figures["repeat"], figures["active"])
    figures["churn_rate_bp"] = rate_bp(figures["churned"], figures["previous_active"])
    rows = sorted((key, row) for _, d in reads for key, row in zip(d["keys"], d["rows"],
                                                                  strict=True))
    page = rows[:limit]
    more = len(rows) > limit or any(d["next"] for _, d in reads)
    dormant = {"count": sum(d["count"] for _, d in reads), "rows": [row for _, row in page],
               "next": page[-1][0] if more and page else b"", "keys": [key for key, _ in page]}
    return figures, dormant
