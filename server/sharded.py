"""Cluster: a front over an admin shard and several card shards (docs/cluster.md, "Several
shards"; ``cardcore serve --cluster --shard A --card-shards 1,2``).

It is the one-shard front (``cardcore.server.front``) once per shard, behind the same two
interfaces the services use, so that the services stay the single server's code:

- ``ShardedWriter`` (the ``Writer``'s interface): an admin change goes to the admin shard (which
  every card shard relays), a card's operation to the card shard its slot is routed to
  (``cardcore.shards``); a call's operations on several shards go to each at once and are
  answered in the call's order. An operation naming two cards on two shards is refused
  (``R_CROSS_SHARD``): nothing changed, nothing sent.
- ``ShardedLedger`` (the read side of ``Ledger``): admin state (terminals, operators, the program,
  regions and stores) from the admin shard's follower; a card's reads from its card shard's
  follower (``of_card``); a request (GetOperation) from whichever shard holds it; FindCards, a
  basket's payments and reports merged over the card shards. A read it does not serve yet raises
  ``OneShardOnly`` (the services answer UNIMPLEMENTED, ``REASON_ONE_SHARD_ONLY``).
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Callable

from cardcore import daytotals
from cardcore import layout as L
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger, Outcome
from cardcore.shards import slot_of

from .errors import OneShardOnly
from .front import ClusterWriter
from .writer import Overloaded, Stopped, _uniform

log = logging.getLogger("cardcore.front")

_OP_SECOND_CARD = slice(176, 192)  # layout.OP: referrer_id (an opening's referrer, a
#                                    replacement's new card)
_NO_CARD = bytes(L.CARD_ID_SIZE)
_TWO_CARD_OPS = L.OPENINGS | {L.OP_CARD_REPLACED}
_TS, _SEQ = struct.Struct("<q"), struct.Struct("<Q")  # layout.JOURNAL's ts_us (96), seq (8)


def to_admin_shard(op: PendingOp) -> bool:
    """An admin change (and an operator id floor): the admin shard's, relayed to every card
    shard (``cardcore.admin.relayed``)."""
    return op.packed[0] in L.ADMIN_OPS or op.packed[0] == L.OP_FLOOR


class ShardedWriter:
    """The ``Writer`` of a front over an admin shard and card shards."""

    def __init__(self, admin: ClusterWriter, cards: dict[int, ClusterWriter],
                 make_table: Callable[[ClusterWriter], list[int]]) -> None:
        """``make_table(admin)``: the cluster's routing table, read (or made) once the admin
        shard's writer has started."""
        assert cards and admin.shard not in cards
        self.admin = admin
        self.cards = cards
        self.loop = admin.loop
        self.metrics = admin.metrics
        self.journal_signal = admin.journal_signal
        self._make_table = make_table
        self.table: list[int] = []
        self.ledger: ShardedLedger | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def every(self) -> list[ClusterWriter]:
        return [self.admin, *self.cards.values()]

    @property
    def on_advance(self):
        return self.admin.on_advance

    @on_advance.setter
    def on_advance(self, fn) -> None:  # admin state: the admin shard's follower's
        self.admin.on_advance = fn

    @property
    def queued_ops(self) -> int:
        return sum(w.queued_ops for w in self.every)

    @property
    def groups(self) -> int:
        return sum(w.groups for w in self.every)

    @property
    def ops_applied(self) -> int:
        return sum(w.ops_applied for w in self.every)

    @property
    def queue_max_ops(self) -> int:
        return self.admin.queue_max_ops

    def start(self) -> None:
        """The admin shard's writer and follower, the routing table, then each card shard's
        (FrontSetting: a card shard the table does not name, or one it names missing)."""
        from .front import FrontSetting

        started: list[ClusterWriter] = []
        try:
            self.admin.start()
            started.append(self.admin)
            self.table = self._make_table(self.admin)
            routed = sorted(set(self.table))
            if routed != sorted(self.cards):
                raise FrontSetting(
                    f"--card-shards {','.join(map(str, sorted(self.cards)))}: the cluster's "
                    f"routing table routes cards to shards {','.join(map(str, routed))} "
                    "(fixed by the first front over several card shards): give those")
            for w in self.cards.values():
                w.start()
                started.append(w)
        except BaseException:
            for w in started:
                w.follower.stop()
                w.nt.close()
            raise

    def attach(self, ledger: Ledger, open_ledger: Callable[[ClusterWriter], Ledger]) -> "ShardedLedger":
        """The admin shard's follower's reader (the server's ``ledger``), and one per card shard
        (``open_ledger``): the services' ledger is the ShardedLedger returned."""
        self.admin.attach(ledger)
        cards = {}
        for shard, w in self.cards.items():
            cards[shard] = open_ledger(w)
            w.attach(cards[shard])
            w.on_advance = _program_follower(cards[shard])
        self.ledger = ShardedLedger(ledger, cards, self.table)
        return self.ledger

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        await asyncio.gather(*(w.stop(timeout_s) for w in self.every))
        if self.ledger is not None:
            self.ledger.close_cards()

    # ---- writes ----------------------------------------------------------------------------

    def _route(self, op: PendingOp) -> tuple[ClusterWriter | None, int]:
        """(the writer an operation goes to, None if refused; the reason)."""
        if to_admin_shard(op):
            return self.admin, L.R_OK
        w = self.cards[self.table[slot_of(op.card_id)]]
        if op.packed[0] in _TWO_CARD_OPS:
            other = op.packed[_OP_SECOND_CARD]
            if other != _NO_CARD and self.table[slot_of(other)] != w.shard:
                return None, L.R_CROSS_SHARD
        return w, L.R_OK

    def submit(self, ops: list[PendingOp], deadline: float | None = None,
               on_answer: Callable[[list[PendingOp], list[Outcome]], None] | None = None
               ) -> asyncio.Future:
        """As ``Writer.submit``. All on one shard (a swipe, most batches of one store's tills
        are not): that shard's writer's submit itself. Else a submit to each shard at once, the
        outcomes put back in the call's order; Overloaded if any shard's queue has no room for
        its part (nothing sent then)."""
        assert ops
        parts: dict[ClusterWriter, list[int]] = {}
        refused: dict[int, Outcome] = {}
        for i, op in enumerate(ops):
            w, reason = self._route(op)
            if w is None:
                refused[i] = _uniform(reason, [op])[0]
            else:
                parts.setdefault(w, []).append(i)
        if not refused and len(parts) == 1:
            return next(iter(parts)).submit(ops, deadline, on_answer)
        for w, idx in parts.items():
            if w._stopping:
                raise Stopped()
            if w.queued_ops + len(idx) > w.queue_max_ops:
                raise Overloaded()
        futures = [(idx, w.submit([ops[i] for i in idx], deadline)) for w, idx in parts.items()]
        fut = self.loop.create_future()
        task = self.loop.create_task(self._gather(ops, refused, futures, fut, on_answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    @staticmethod
    async def _gather(ops: list[PendingOp], refused: dict[int, Outcome], futures: list,
                      fut: asyncio.Future, on_answer) -> None:
        outcomes: list[Outcome | None] = [None] * len(ops)
        for i, outcome in refused.items():
            outcomes[i] = outcome
        for idx, part in futures:
            try:
                got = await part
            except Exception:  # (a shard's writer answers every item: never seen)
                log.exception("front: a shard's part of a submit failed")
                got = _uniform(L.R_OUTCOME_UNKNOWN, [ops[i] for i in idx])
            for i, outcome in zip(idx, got, strict=True):
                outcomes[i] = outcome
        assert all(o is not None for o in outcomes)
        if on_answer is not None:
            try:
                on_answer(ops, outcomes)
            except Exception:  # the caller must get its answer whatever a hook does
                log.exception("answer hook failed")
        if not fut.done():
            fut.set_result(outcomes)

    # ---- reads -----------------------------------------------------------------------------

    async def fresh(self, card_ids: tuple[bytes, ...] = (), keys: tuple[bytes, ...] = (),
                    everything: bool = False) -> None:
        """As ``ClusterWriter.fresh``, on each shard the read looks at: a card's, its shard;
        everything or a request (which may be on any shard), every shard."""
        if everything or keys:
            await asyncio.gather(*(w.fresh(keys=keys, everything=everything)
                                   for w in self.every))
            return
        by_shard: dict[int, list[bytes]] = {}
        for c in card_ids:
            by_shard.setdefault(self.table[slot_of(c)], []).append(c)
        await asyncio.gather(*(self.cards[s].fresh(tuple(cs)) for s, cs in by_shard.items()))


# Reads of one card, which go to its shard's ledger (``ShardedLedger.of_card``): asked of the
# ShardedLedger itself, a service forgot to route one (the admin shard holds no cards).
CARD_READS = frozenset({"read_card", "read_packages", "read_coupons", "read_lots", "read_holds",
                        "read_replacement", "read_history", "read_entry", "read_lineage",
                        "quote"})
# Reads not served over several card shards yet: what each needs, said to the caller.
ONE_SHARD_ONLY = {
    "read_journal": "the journal feed (each shard has its own journal): ask a front of one shard",
    "next_seq": "the journal feed (each shard has its own journal): ask a front of one shard",
    "read_day": "the daily close over several card shards: make it through a front of one shard",
    "read_members": "member reports over several card shards: ask a front of each card shard",
    "read_sealed": "a data key's rotation and re-seal: make them through a front of one shard",
}


class ShardedLedger:
    """The services' read side of a front over an admin shard and card shards."""

    def __init__(self, admin: Ledger, cards: dict[int, Ledger], table: list[int]) -> None:
        self.admin = admin
        self.cards = cards
        self.table = table

    def of_card(self, card_id: bytes) -> Ledger:
        """The ledger of the card shard that holds ``card_id``."""
        return self.cards[self.table[slot_of(card_id)]]

    def __getattr__(self, name: str):
        """Admin state: the admin shard's (every card shard holds the same, relayed)."""
        if name in CARD_READS:
            raise AssertionError(f"{name}: a card's read goes through of_card")
        if name in ONE_SHARD_ONLY:
            raise OneShardOnly(ONE_SHARD_ONLY[name])
        return getattr(self.admin, name)

    def close_cards(self) -> None:
        for ledger in self.cards.values():
            ledger.close()

    def stats(self) -> dict:
        cards = [ledger.stats() for ledger in self.cards.values()]
        return {"cards": sum(s["cards"] for s in cards),
                "journal": sum(s["journal"] for s in cards) + self.admin.stats()["journal"]}

    def read_operation(self, key: bytes) -> Outcome | None:
        """A request's outcome from the shard that holds it (an admin change's: the admin
        shard's; a card's: its card shard's, which the key does not tell)."""
        for ledger in (self.admin, *self.cards.values()):
            outcome = ledger.read_operation(key)
            if outcome is not None:
                return outcome
        return None

    def read_horizons(self) -> tuple[int, int, int]:
        """As a card shard's (GetOperation's "expired"): a request not found is expired when any
        shard would call it so, the one that pruned the most and is latest."""
        got = [ledger.read_horizons() for ledger in (self.admin, *self.cards.values())]
        return max(h[0] for h in got), self.admin.read_horizons()[1], max(h[2] for h in got)

    def find_members(self, prefix: bytes,
                     limit: int = L.MEMBER_MATCHES_MAX) -> tuple[list, bool]:
        """Every card shard's cards under the prefix, in card id order, at most ``limit``."""
        found, more = [], False
        for ledger in self.cards.values():
            got, got_more = ledger.find_members(prefix, limit)
            found.extend(got)
            more = more or got_more
        found.sort(key=lambda f: f[0])
        return found[:limit], more or len(found) > limit

    def read_basket(self, tag: int) -> list[bytes]:
        """A basket's payments on every card shard (split tender over cards of two shards), in
        the order of their time, then sequence."""
        entries = [e for ledger in self.cards.values() for e in ledger.read_basket(tag)]
        entries.sort(key=lambda e: (_TS.unpack_from(e, L.JOURNAL_OFF_TS)[0],
                                    _SEQ.unpack_from(e, 8)[0]))
        return entries

    def read_report(self, *args, **kw) -> dict:
        return daytotals.merge_reports([ledger.read_report(*args, **kw)
                                        for ledger in self.cards.values()])

    def read_region_report(self, *args, **kw) -> dict:
        return daytotals.merge_reports([ledger.read_region_report(*args, **kw)
                                        for ledger in self.cards.values()])

    def read_by_store(self, *args, **kw) -> dict:
        return daytotals.merge_reports([ledger.read_by_store(*args, **kw)
                                        for ledger in self.cards.values()])


def routing_table(admin: ClusterWriter, card_shards: list[int]) -> list[int]:
    """The cluster's routing table (``jetlog.ROUTES_KEY``): read, or made from ``card_shards``
    (``shards.spread``) by the first front over several card shards. FrontSetting: a stored
    table that is not one, or a front user NATS does not let read it; FrontUnavailable: NATS or
    the cluster's buckets not there yet."""
    import nats.errors

    from cardcore.jetlog import ShardMissing, ensure_routes
    from cardcore.shards import RoutesInvalid, decode_routes, encode_routes, spread

    from .front import FrontSetting, FrontUnavailable

    nt = admin.nt
    nt.refused_subject = ""  # (a violation reported during this call alone counts)
    try:
        stored = nt.call(ensure_routes(nt.js, encode_routes(spread(card_shards))))
    except ShardMissing as exc:
        raise FrontUnavailable(str(exc)) from None
    except (nats.errors.Error, TimeoutError) as exc:
        if nt.refused_subject:
            raise FrontSetting(f"NATS refused this front's user the routing table: "
                               f"{nt.refused_subject} (a front role of before 2026-12-02: "
                               "docs/cluster.md, upgrading the users)") from None
        raise FrontUnavailable(f"the routing table could not be read: "
                               f"{type(exc).__name__}: {exc}") from None
    try:
        return decode_routes(stored)
    except RoutesInvalid as exc:
        raise FrontSetting(str(exc)) from None


# The AdminService calls a front over several card shards does not serve yet, refused before
# anything is read or sent (CloseDay would close the day, then find its figures on several
# shards), with what to do instead.
UNSERVED_CALLS = {
    "CloseDay": "the daily close over several card shards is not built: close the day through "
                "a front of the admin shard alone; its figures are each card shard's (a front "
                "of that shard)",
    "GetMemberReport": "member reports over several card shards are not built: ask a front of "
                       "each card shard",
    "RotateDataKey": "a data key's rotation and re-seal over several card shards are not "
                     "built: rotate through a front of the admin shard, then start a front of "
                     "each card shard once to re-seal its cards",
    "WatchJournal": "each shard has a journal of its own: watch it through a front of that "
                    "shard",
}


def refuse_unserved(admin_service) -> None:
    """Make ``admin_service``'s UNSERVED_CALLS answer UNIMPLEMENTED, REASON_ONE_SHARD_ONLY."""
    from cardcore.v1 import common_pb2 as cpb

    from .errors import abort, failure

    for name, why in UNSERVED_CALLS.items():
        if name == "WatchJournal":  # (a server-streaming call: an async generator)
            async def call(request, context, why=why):
                await abort(context, failure(cpb.REASON_ONE_SHARD_ONLY, detail=why))
                yield  # (never reached)
        else:
            async def call(request, context, why=why):
                await abort(context, failure(cpb.REASON_ONE_SHARD_ONLY, detail=why))
        setattr(admin_service, name, call)


def _program_follower(ledger: Ledger) -> Callable[[], None]:
    """A card shard's reader adopts the program its shard relayed (quotes run under it)."""
    def follow() -> None:
        if ledger.read_program_version() != ledger.program_version:
            ledger.refresh_program()
    return follow
