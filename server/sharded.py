"""Cluster: a front over an admin shard and several card shards (docs/cluster.md, "Several
shards"; ``cardcore serve --cluster --shard A --card-shards 1,2``).

It is the one-shard front (``cardcore.server.front``) once per shard, behind the same two
interfaces the services use, so that the services stay the single server's code:

- ``ShardedWriter`` (the ``Writer``'s interface): an admin change goes to the admin shard (which
  every card shard relays), a card's operation to the card shard its slot is routed to
  (``cardcore.shards``); a call's operations on several shards go to each at once and are
  answered in the call's order, an admin change once every card shard holds it. An opening
  whose referrer is on another card shard is marked so (``REFERRER_ELSEWHERE``): its shard puts
  the referrer's bonus in its outbox, which the front delivers (``_deliver_outboxes``). A
  replacement by a card whose slot routes to another shard makes the new card on the old card's
  shard, its number forwarded there first (``_replace_across``; ``Routes``). A split-tender
  payment whose basket has a payment made on another card shard is marked so
  (``BASKET_ELSEWHERE``): its shard counts no sale for it (``_basket_state``). What one card
  shard cannot make alone (a gift) is refused (``R_CROSS_SHARD``): nothing changed, nothing
  sent.
- ``ShardedLedger`` (the read side of ``Ledger``): admin state (terminals, operators, the program,
  regions and stores) from the admin shard's follower; a card's reads from its card shard's
  follower (``of_card``); a request (GetOperation) from whichever shard holds it; FindCards, a
  basket's payments, reports, a store's day and member reports merged over the card shards;
  terminals with their card shards' KSN counters.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import struct
import time
from typing import Callable

from cardcore import daytotals
from cardcore import members as member_metrics
from cardcore import layout as L
from cardcore.admin import RESEAL_ITEM
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger, Outcome
from cardcore.shards import (basket_elsewhere, forward, outbox_bonus, outbox_done,
                             referrer_elsewhere, slot_of)

from .errors import ShardBehind
from .front import ClusterWriter
from .writer import Overloaded, Stale, Stopped, _uniform

log = logging.getLogger("cardcore.front")

_OP_SECOND_CARD = slice(176, 192)  # layout.OP: referrer_id (an opening's referrer, a
#                                    replacement's new card)
_NO_CARD = bytes(L.CARD_ID_SIZE)
_TS, _SEQ = struct.Struct("<q"), struct.Struct("<Q")  # layout.JOURNAL's ts_us (96), seq (8)
_BASKET, _OP_BASKET_AT = struct.Struct("<Q"), 152  # layout.OP's basket_tag
BASKETS_KEPT = 100_000   # split-tender baskets a front remembers its payments of
CARD_SHARD_WAIT_S = 30.0  # a new card shard's first leader takes its place beside the admin shard
RELAY_WAIT_S = 5.0        # an admin change's answer waits this long for every card shard to hold it
RELAY_POLL_S = 0.02       # ... looking this often
OUTBOX_POLL_S = 0.25      # each card shard's outbox is read this often (docs/cluster.md)
OUTBOX_READ_MAX = 4096    # outbox records one round reads (OUTBOX_DONE_MAX a target shard)
# A delivered bonus's outcomes that settle its outbox record (no later delivery can pay it):
# declined as a single server declines a referrer's bonus, ...
OUTBOX_DECLINED = frozenset((L.R_CARD_NOT_FOUND, L.R_CARD_NOT_ACTIVE, L.R_CARD_REPLACED,
                             L.R_CARD_EXPIRED, L.R_CARD_NOT_ACTIVATED, L.R_AMOUNT_OVERFLOW,
                             L.R_INVALID_AMOUNT))
# ... made, or refused for good: its client time (the opening's) is older than the request
# window there, so its request record may be pruned and it is never applied again (paid if an
# earlier delivery was); a digest that differs (a bug: logged as an error)
OUTBOX_SETTLED = OUTBOX_DECLINED | {L.R_OK, L.R_REQUEST_TOO_OLD, L.R_DUPLICATE_REQUEST_MISMATCH}


class Routes:
    """Which card shard holds a card: the one the routing table routes its slot to, unless that
    shard forwarded its number to another (a replacement's new card, made on the old card's
    shard: layout.FORWARD). Each card shard's forwards are read off this front's follower of it,
    on from the last read (``learn``): at start, as that follower advances, every outbox round,
    before a cross-shard replacement and a re-seal chunk (``learn_all``), and at once for the
    forwards this front makes."""

    def __init__(self, table: list[int]) -> None:
        self.table = table
        self.forwarded: dict[bytes, int] = {}  # card id -> the shard that holds it
        self._read: dict[int, int] = {}  # card shard -> its forwards read (their n)

    def shard_of(self, card_id: bytes) -> int:
        if self.forwarded:
            shard = self.forwarded.get(card_id)
            if shard is not None:
                return shard
        return self.table[slot_of(card_id)]

    def home_of(self, card_id: bytes) -> int:
        """The card shard its slot routes to (which keeps its forward, if any)."""
        return self.table[slot_of(card_id)]

    def learn(self, shard: int, ledger: Ledger) -> None:
        """Card shard ``shard``'s forwards made since the last read, from its ledger here."""
        for n, card, to in ledger.read_forwards(self._read.get(shard, 0)):
            self.forwarded[card] = to
            self._read[shard] = n

    def learn_all(self, ledgers: dict[int, Ledger]) -> None:
        """Every card shard's (``ledgers``: by shard) forwards made since the last read."""
        for shard, ledger in ledgers.items():
            self.learn(shard, ledger)


def to_admin_shard(op: PendingOp) -> bool:
    """An admin change (and an operator id floor): the admin shard's, relayed to every card
    shard (``cardcore.admin.relayed``)."""
    return op.packed[0] in L.ADMIN_OPS or op.packed[0] == L.OP_FLOOR


class ShardedWriter:
    """The ``Writer`` of a front over an admin shard and card shards."""

    def __init__(self, admin: ClusterWriter, cards: dict[int, ClusterWriter],
                 make_table: Callable[[ClusterWriter], list[int]],
                 open_ledger: Callable[[ClusterWriter], Ledger]) -> None:
        """``make_table(admin)``: the cluster's routing table, read (or made) once every shard's
        writer has started and each is what it should be; ``open_ledger(w)``: a reader of
        ``w``'s follower's ledger."""
        assert cards and admin.shard not in cards
        self.admin = admin
        self.cards = cards
        self.loop = admin.loop
        self.metrics = admin.metrics
        self.journal_signal = admin.journal_signal
        self._make_table = make_table
        self._open_ledger = open_ledger
        self.routes = Routes([])  # (the cluster's routing table once started)
        self.card_ledgers: dict[int, Ledger] = {}
        self.ledger: ShardedLedger | None = None
        self._tasks: set[asyncio.Task] = set()
        # split-tender baskets this front sent payments of, by tag, then card shard: [how many
        # are unanswered, 1 once one was made] (``_basket_state``). Kept while any is unanswered
        # or made; the newest BASKETS_KEPT. And each payment in flight: id -> (tag, the card
        # shard it was sent to), so that its answer counts where it was sent.
        self._baskets: collections.OrderedDict[int, dict[int, list[int]]] = \
            collections.OrderedDict()
        self._basket_sent: dict[int, tuple[int, int]] = {}
        self._outbox_task: asyncio.Task | None = None
        self._outbox_wake = {shard: asyncio.Event() for shard in cards}  # (an opening answered)

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
        """Every shard's writer and follower; then what they are is checked (the admin shard
        the cluster's, each card shard a card shard beside it: FrontSetting otherwise) before
        the routing table is read, or made from ``--card-shards``: a front given wrong shards
        never fixes a wrong table for the others. FrontSetting also if the table routes to
        other card shards than this front's."""
        from .front import FrontSetting

        started: list[ClusterWriter] = []
        try:
            for w in self.every:
                w.start()
                started.append(w)
            admin = self._open_ledger(self.admin)
            deadline = time.monotonic() + CARD_SHARD_WAIT_S  # (one wait for every shard)
            try:
                self._check_place(admin, self.admin.shard, L.RELAY_ROLE_ADMIN, deadline)
            finally:
                admin.close()
            for shard, w in self.cards.items():
                self.card_ledgers[shard] = self._open_ledger(w)
                self._check_place(self.card_ledgers[shard], shard, L.RELAY_ROLE_CARD, deadline)
            table = self._make_table(self.admin)
            self.routes = Routes(table)
            self.routes.learn_all(self.card_ledgers)
            routed = sorted(set(table))
            if routed != sorted(self.cards):
                raise FrontSetting(
                    f"--card-shards {','.join(map(str, sorted(self.cards)))}: the cluster's "
                    f"routing table routes cards to shards {','.join(map(str, routed))} "
                    "(fixed by the first front over several card shards): give those")
        except BaseException:
            self._close_card_ledgers()
            for w in started:
                w.follower.stop()
                w.nt.close()
            raise

    def _check_place(self, ledger: Ledger, shard: int, role: int, deadline: float) -> None:
        """Shard ``shard``'s ledger holds its place in the cluster: the admin shard
        (``role`` RELAY_ROLE_ADMIN) or a card shard beside it. None yet (a new shard's first
        leader takes it at its first lead): waited for until ``deadline``, then
        FrontUnavailable (exit 1: started again later). Another place: FrontSetting (exit 2)."""
        from .front import FrontSetting, FrontUnavailable

        while (relay := ledger.read_admin_relay()) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if relay is None:
            raise FrontUnavailable(f"shard {shard} has taken no place beside an admin shard "
                                   "yet (its replicas run with --admin-shard, a leader first)")
        if relay[:2] != (self.admin.shard, role):
            what = (f"the cluster's admin shard (--shard; its replicas run with --admin-shard "
                    f"{self.admin.shard})" if role == L.RELAY_ROLE_ADMIN else
                    f"a card shard beside admin shard {self.admin.shard} (its replicas run "
                    f"with --admin-shard {self.admin.shard}, and only a new shard takes a place)")
            raise FrontSetting(f"--card-shards: shard {shard} is not {what}; docs/cluster.md, "
                               "\"One front over several card shards\"")

    def attach(self, ledger: Ledger) -> "ShardedLedger":
        """The admin shard's follower's reader (the server's ``ledger``); the card shards' were
        opened at start: the services' ledger is the ShardedLedger returned."""
        self.admin.attach(ledger)
        for shard, w in self.cards.items():
            w.attach(self.card_ledgers[shard])
            w.on_advance = _card_follower(self.card_ledgers[shard], self.routes, shard)
        self.ledger = ShardedLedger(ledger, self.card_ledgers, self.routes)
        self._outbox_task = self.loop.create_task(self._deliver_outboxes())
        self._outbox_task.add_done_callback(_outbox_ended)
        return self.ledger

    def journals(self) -> dict[int, tuple[Ledger, object, ClusterWriter]]:
        """Each shard's journal for the feed (WatchJournalRequest.shard): its follower's ledger,
        the signal its writer gives when that follower advances, and the writer (a watch of one
        shard waits for that shard's follower alone)."""
        assert self.ledger is not None  # (attached)
        return {self.admin.shard: (self.ledger.admin, self.admin.journal_signal, self.admin),
                **{s: (self.card_ledgers[s], w.journal_signal, w) for s, w in self.cards.items()}}

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self._outbox_task is not None:
            self._outbox_task.cancel()
            await asyncio.wait([self._outbox_task], timeout=timeout_s)  # (bounded, whatever)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        await asyncio.gather(*(w.stop(timeout_s) for w in self.every))
        self._close_card_ledgers()

    def _close_card_ledgers(self) -> None:
        for ledger in self.card_ledgers.values():
            ledger.close()
        self.card_ledgers.clear()

    # ---- writes ----------------------------------------------------------------------------

    def _route(self, op: PendingOp) -> tuple[ClusterWriter | None, int]:
        """(the writer an operation goes to, None if refused; the reason). Refused with
        R_CROSS_SHARD, before anything is sent, what one card shard cannot do alone: a gift (its
        stock is the chain's: one counter, which each card shard would spend on its own)."""
        if to_admin_shard(op):
            return self.admin, L.R_OK
        kind = op.packed[0]
        if kind == L.OP_RESEAL:  # (its cards are one shard's: ShardedLedger.read_sealed)
            cards = reseal_cards(op.payload)
            w = self.cards[self.routes.shard_of(cards[0])]
            if any(self.routes.shard_of(c) != w.shard for c in cards):
                return None, L.R_CROSS_SHARD
            return w, L.R_OK
        w = self.cards[self.routes.shard_of(op.card_id)]
        if kind == L.OP_GIFT_REDEEM:
            return None, L.R_CROSS_SHARD
        return w, L.R_OK

    def _referrer_elsewhere(self, op: PendingOp, shard: int) -> bool:
        """Whether ``op``, routed to card shard ``shard``, opens a card on a referral by a
        card of another card shard."""
        if op.packed[0] not in L.OPENINGS:
            return False
        referrer = op.packed[_OP_SECOND_CARD]
        return referrer != _NO_CARD and self.routes.shard_of(referrer) != shard

    def _basket_state(self, tag: int, shard: int, baskets: dict[int, int],
                      looked: bool) -> bool | None:
        """Whether basket ``tag`` has a payment made on another card shard than ``shard``
        (docs/cluster.md, "A basket paid on two card shards"): sent by this front and answered
        made, or made through any front (that shard's follower here holds it). None (refused:
        asked again later) while one there is not settled: earlier in this call (``baskets``:
        this call's, tag -> the card shard of its first payment), or unanswered. False, with no
        look, when ``shard`` holds a payment of it already (its own index counts this one as a
        later payment). _LOOK when none of this is known and the followers have not been
        brought to their streams' ends for this call (``looked``): a payment another front made
        a moment ago, or one answered OUTCOME_UNKNOWN, is seen there then."""
        first = baskets.get(tag)
        if first is not None and first != shard:
            return None
        known = self._baskets.get(tag, {})
        if (shard in known and known[shard][1]) or self.card_ledgers[shard].read_basket(tag):
            return False  # (``shard`` holds a payment of it already: its own index tells)
        made = False
        for s, (unanswered, was_made) in known.items():
            if s != shard:
                if unanswered:
                    return None
                made = made or bool(was_made)
        if made or any(ledger.read_basket(tag) for s, ledger in self.card_ledgers.items()
                       if s != shard):
            return True
        return False if looked else _LOOK

    def _sent(self, sent: list[tuple[PendingOp, int]]) -> None:
        """Split-tender payments sent, each (op, the card shard it went to): counted there as
        unanswered until ``_paid``."""
        for op, shard in sent:
            tag = _basket_of(op)
            if tag:
                self._baskets.setdefault(tag, {}).setdefault(shard, [0, 0])[0] += 1
                self._baskets.move_to_end(tag)
                self._basket_sent[id(op)] = (tag, shard)
        while len(self._baskets) > BASKETS_KEPT:
            self._baskets.popitem(last=False)

    def _paid(self, ops: list[PendingOp], outcomes: list[Outcome]) -> None:
        """Split-tender payments answered (those this front refused were never sent: skipped),
        counted where they were sent: made, or not (OUTCOME_UNKNOWN: the followers tell, at
        the next payment's look). A basket none of whose payments is unanswered or made is
        forgotten (a declined first card: the next may be of any shard, and counts the
        sale)."""
        for op, outcome in zip(ops, outcomes, strict=True):
            sent = self._basket_sent.pop(id(op), None)
            held = self._baskets.get(sent[0]) if sent is not None else None
            at = held.get(sent[1]) if held is not None else None
            if at is None:
                continue
            at[0] -= 1
            if outcome.reason == L.R_OK:
                at[1] = 1
            if not any(unanswered or made for unanswered, made in held.values()):
                del self._baskets[sent[0]]

    def submit(self, ops: list[PendingOp], deadline: float | None = None,
               on_answer: Callable[[list[PendingOp], list[Outcome]], None] | None = None
               ) -> asyncio.Future:
        """As ``_submit``; a call with a split-tender payment whose basket this front knows
        nothing settled of first looks at every card shard's stream end
        (``_look_then_submit``)."""
        try:
            return self._submit(ops, deadline, on_answer, looked=False)
        except _Look:
            fut = self.loop.create_future()
            self._tracked(self._look_then_submit(list(ops), deadline, on_answer, fut))
            return fut

    async def _look_then_submit(self, ops: list[PendingOp], deadline: float | None, on_answer,
                                fut: asyncio.Future) -> None:
        """Every card shard's follower brought to its stream's end (a basket's payment made
        through another front a moment ago, or answered OUTCOME_UNKNOWN, is seen there), then
        the call submitted. A call that cannot be sent is answered OVERLOADED or UNAVAILABLE,
        nothing of it sent, ``on_answer`` run; the answer is set whatever happens."""
        outcomes = None
        try:
            await self._look(deadline)
            outcomes = await self._submit(ops, deadline, on_answer, looked=True)
        except _NOT_SENT as exc:
            outcomes = self._answer(ops, _not_sent_reason(exc), on_answer)
        except Exception:
            log.exception("front: a call with a basket payment failed")
        finally:
            if not fut.done():
                fut.set_result(outcomes if outcomes is not None
                               else _uniform(L.R_OUTCOME_UNKNOWN, ops))

    def _submit(self, ops: list[PendingOp], deadline: float | None, on_answer,
                looked: bool) -> asyncio.Future:
        """As ``Writer.submit``. All on one card shard (a swipe, a till's call): that shard's
        writer's submit itself. Else a submit to each shard at once, the outcomes put back in
        the call's order (``on_answer`` runs with each shard's part as it is answered); Overloaded
        if any shard's queue has no room for its part (nothing sent then). A call with admin
        changes is answered once every card shard's follower holds them (relayed), so what
        the caller does next sees them on every shard."""
        assert ops
        ops = list(ops)  # (an opening on a referral from another card shard: marked in place)
        owing: set[int] = set()  # card shards whose outboxes such openings fill
        parts: dict[ClusterWriter, list[int]] = {}
        refused: dict[int, Outcome] = {}
        baskets: dict[int, int] = {}
        across: list[int] = []  # replacements by a card another shard holds or would hold
        for i, op in enumerate(ops):
            if op.packed[0] == L.OP_CARD_REPLACED and self.routes.shard_of(
                    op.packed[_OP_SECOND_CARD]) != self.routes.shard_of(op.card_id):
                across.append(i)
                continue
            w, reason = self._route(op)
            if w is None:
                refused[i] = _uniform(reason, [op])[0]
                continue
            tag = _basket_of(op)
            if tag:  # a split-tender payment: its basket's sale counted once over the shards
                elsewhere = self._basket_state(tag, w.shard, baskets, looked)
                if elsewhere is _LOOK:
                    raise _Look()  # (nothing sent yet)
                if elsewhere is None:
                    refused[i] = _uniform(L.R_CROSS_SHARD, [op])[0]
                    continue
                baskets.setdefault(tag, w.shard)
                if elsewhere:
                    ops[i] = basket_elsewhere(op)
            if self._referrer_elsewhere(op, w.shard):
                ops[i] = referrer_elsewhere(op)
                owing.add(w.shard)
            parts.setdefault(w, []).append(i)
        if baskets:
            on_answer = _both(self._paid, on_answer)
        if not refused and not across and len(parts) == 1 and self.admin not in parts:
            w = next(iter(parts))
            fut = w.submit(ops, deadline, on_answer)
            if baskets:
                self._sent([(op, w.shard) for op in ops])  # (once taken: no await since checks)
            return self._waking(fut, owing)
        for w, idx in parts.items():  # (ClusterWriter.submit's own refusals, for every part
            if w._stopping:           # before any is sent: a call is sent whole or not at all)
                raise Stopped()
            if w.queued_ops + len(idx) > w.queue_max_ops:
                raise Overloaded()
        futures = [(idx, w.submit([ops[i] for i in idx], deadline, on_answer))
                   for w, idx in parts.items()]
        for i in across:  # (after the others are taken: a refusal above sends none of them)
            futures.append(([i], self._tracked(self._replace_across(ops[i], deadline, on_answer))))
        if baskets:
            self._sent([(ops[i], w.shard) for w, idx in parts.items() for i in idx])
        fut = self.loop.create_future()
        self._tracked(self._gather(ops, refused, futures, fut, on_answer, self.admin in parts))
        return self._waking(fut, owing)

    def _tracked(self, coro) -> asyncio.Task:
        """A task of this front's that ``stop`` waits for."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _replace_across(self, op: PendingOp, deadline: float | None,
                              on_answer) -> list[Outcome]:
        """A replacement whose new card may not be where the old card is (docs/cluster.md, "A
        replacement by a card of another card shard"). First where both are now: every card
        shard's follower at its stream's end, their forwards read (the routes that sent it here
        may be stale). The old card not there: CARD_NOT_FOUND, nothing sent. The new number's
        slot routed to another shard, and not forwarded to the old card's yet: forwarded there
        by that shard (refused, and so the replacement, when it holds the number or forwarded it
        to another: the number is taken). Then the replacement, made on the old card's shard
        as on a single server. Sent again (the same request), the forward is found made and the
        replacement answered as it was. ``on_answer`` runs once, whatever happens."""
        new = op.packed[_OP_SECOND_CARD]
        step = "look"  # what is being sent: nothing yet, the forward, the replacement
        try:
            await self._look(deadline)
            self.routes.learn_all(self.card_ledgers)
            at, home = self.routes.shard_of(op.card_id), self.routes.home_of(new)
            if self.card_ledgers[at].read_card(op.card_id) is None:
                return self._answer([op], L.R_CARD_NOT_FOUND, on_answer)
            if home != at and self.routes.shard_of(new) != at:
                step = "forward"
                (made,) = await self.cards[home].submit([forward(new, at)], deadline)
                if made.reason != L.R_OK:  # (taken; or OUTCOME_UNKNOWN: asked again, made)
                    return self._answer([op], made.reason, on_answer)
                self.routes.forwarded[new] = at
            step = "replacement"  # (the writer runs on_answer once it answers)
            return await self.cards[at].submit([op], deadline, on_answer)
        except _NOT_SENT as exc:  # that step was not sent
            log.warning("front: a replacement across card shards stopped before its %s was "
                        "sent: %s", step, type(exc).__name__)
            return self._answer([op], _not_sent_reason(exc), on_answer)

    async def _look(self, deadline: float | None) -> None:
        """Every card shard's follower brought to its stream's end (within the call's
        deadline): what any front made there is seen, and what this front answered
        OUTCOME_UNKNOWN is settled."""
        async with asyncio.timeout(None if deadline is None
                                   else max(0.0, deadline - time.monotonic())):
            await asyncio.gather(*(w.fresh(everything=True) for w in self.cards.values()))

    @staticmethod
    def _answer(ops: list[PendingOp], reason: int, on_answer) -> list[Outcome]:
        """``ops`` answered ``reason`` by this front (nothing of them made), ``on_answer``
        run."""
        outcomes = _uniform(reason, ops)
        if on_answer is not None:
            try:
                on_answer(ops, outcomes)
            except Exception:  # the caller must get its answer whatever a hook does
                log.exception("answer hook failed")
        return outcomes

    def _waking(self, fut: asyncio.Future, owing: set[int]) -> asyncio.Future:
        """``fut``; once it is answered, the outbox loops of the card shards in ``owing`` look
        at once, not at their next round."""
        if owing:
            fut.add_done_callback(lambda _: [self._outbox_wake[s].set() for s in owing])
        return fut

    async def _gather(self, ops: list[PendingOp], refused: dict[int, Outcome], futures: list,
                      fut: asyncio.Future, on_answer, admin: bool) -> None:
        """Answer the call once every part is answered (``admin``: and its admin changes that
        were made are relayed). The answer is set whatever happens here (``finally``)."""
        outcomes: list[Outcome] = [_uniform(L.R_OUTCOME_UNKNOWN, [op])[0] for op in ops]
        try:
            for i, outcome in refused.items():
                outcomes[i] = outcome
            if refused and on_answer is not None:
                idx = sorted(refused)
                try:
                    on_answer([ops[i] for i in idx], [refused[i] for i in idx])
                except Exception:  # the caller must get its answer whatever a hook does
                    log.exception("answer hook failed")
            for idx, part in futures:
                try:
                    got = await part
                except asyncio.CancelledError:
                    raise
                except Exception:  # (a shard's writer answers every item: never seen)
                    log.exception("front: a shard's part of a submit failed")
                    continue  # (OUTCOME_UNKNOWN)
                for i, outcome in zip(idx, got, strict=True):
                    outcomes[i] = outcome
            made = [op.request_key for op, outcome in zip(ops, outcomes)
                    if to_admin_shard(op) and op.request_key and outcome.reason == L.R_OK]
            if admin and made:
                await self._relayed(made)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("front: a submit over several shards failed")
        finally:
            if not fut.done():
                fut.set_result(outcomes)

    async def _relayed(self, keys: list[bytes]) -> None:
        """Wait (at most RELAY_WAIT_S) until every card shard's follower holds the admin
        changes of these request keys, relayed (their records, in the relayed namespace); then
        each card shard's reader adopts a program among them. Not within the time: answered
        anyway (the change is made; it reaches the card shards when their leaders relay it)."""
        relayed = [L.RELAYED_KEY_PREFIX + key for key in keys]
        limit = time.monotonic() + RELAY_WAIT_S
        waiting = dict(self.card_ledgers)
        while waiting:
            for shard, ledger in list(waiting.items()):
                if all(ledger.read_operation(key) is not None for key in relayed):
                    del waiting[shard]
                    try:  # (its program, if one is among them; else at its next re-read)
                        self.cards[shard].on_advance()
                    except Exception:
                        log.exception("front s%d: admin state could not be re-read", shard)
            if waiting and time.monotonic() > limit:
                log.warning("front: admin changes not relayed to card shards %s within %g s; "
                            "answered (they are made: each card shard takes them when its "
                            "leader relays them)", sorted(waiting), RELAY_WAIT_S)
                return
            if waiting:
                await asyncio.sleep(RELAY_POLL_S)

    # ---- the outboxes: what a card shard owes another -------------------------------------

    async def _deliver_outboxes(self) -> None:
        """Each card shard's outbox (its follower's ledger) delivered, every OUTBOX_POLL_S, by a
        loop a shard: each record's bonus submitted to its referrer's card shard under a
        request key of its own (so every front may deliver it, and a delivery sent again is
        answered as the first was), then, once its outcome is settled, the record taken out
        (OP_OUTBOX_DONE). A front that stops between the two leaves the record for the next
        round or another front. A shard's target shards are delivered to at once: one without
        a leader keeps what is owed to it and slows that shard's rounds, no other's."""
        await asyncio.gather(*(self._outbox_loop(shard) for shard in self.cards))

    async def _outbox_loop(self, shard: int) -> None:
        logged = 0.0  # (a failure or an unsettled outcome logged once a minute)
        wake = self._outbox_wake[shard]
        while True:
            try:  # (an opening this front answered wakes it: its bonus is delivered at once;
                async with asyncio.timeout(OUTBOX_POLL_S):  # not wait_for, which in 3.11 may
                    await wake.wait()  # swallow a cancel that meets a set Event: stop() hung)
            except TimeoutError:
                pass
            woken = wake.is_set()
            wake.clear()
            try:
                unsettled = await self._deliver_outbox(shard, woken)
            except asyncio.CancelledError:
                raise
            except (Overloaded, Stopped, Stale):
                continue  # (the next round)
            except Exception:
                if time.monotonic() - logged > 60:
                    logged = time.monotonic()
                    log.exception("front: shard %d's outbox was not delivered (tried again "
                                  "every %g s; logged once a minute)", shard, OUTBOX_POLL_S)
                continue
            if unsettled and time.monotonic() - logged > 60:
                logged = time.monotonic()
                log.warning("front: shard %d's outbox: %d deliveries not settled, reasons %s "
                            "(tried again every %g s; logged once a minute)", shard,
                            len(unsettled), sorted(set(unsettled)), OUTBOX_POLL_S)

    async def _deliver_outbox(self, shard: int, woken: bool = False) -> list[int]:
        """One round of shard ``shard``'s outbox: read from this front's follower once it holds
        the shard's stream as it ends now (Stale if it cannot: a follower left behind would
        deliver again what other fronts took out long ago), at most OUTBOX_READ_MAX records,
        at most OUTBOX_DONE_MAX of them a target shard (``woken``: an opening was answered,
        which the follower may not show yet). The reasons of the outcomes that did not settle
        their records."""
        ledger = self.card_ledgers[shard]
        self.routes.learn(shard, ledger)  # (and its forwards, made through any front)
        if not woken and not ledger.read_outbox(1):
            return []
        await self.cards[shard].fresh(everything=True)
        by_target: dict[int, list[tuple]] = {}
        for r in ledger.read_outbox(OUTBOX_READ_MAX):
            owed = by_target.setdefault(self.routes.shard_of(r[3]), [])
            if len(owed) < L.OUTBOX_DONE_MAX:
                owed.append(r)
        answers = await asyncio.gather(*(self._deliver_to(shard, target, records)
                                         for target, records in by_target.items()),
                                       return_exceptions=True)
        done = [outbox_done(a[0]) for a in answers if not isinstance(a, BaseException) and a[0]]
        if done:  # (one submit: each record taken out once, whichever front's comes first)
            for outcome in await self.cards[shard].submit(done):
                if outcome.reason != L.R_OK:
                    log.warning("front: shard %d's outbox records not taken out (reason %d): "
                                "delivered again, answered the same, next round", shard,
                                outcome.reason)
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return [reason for _, unsettled in answers for reason in unsettled]

    async def _deliver_to(self, shard: int, target: int,
                          records: list[tuple]) -> tuple[list[int], list[int]]:
        """The bonuses of ``records`` (shard ``shard``'s outbox) delivered to card shard
        ``target``: (the seqs of those whose outcome is settled, the reasons of the others)."""
        outcomes = await self.cards[target].submit([outbox_bonus(shard, r) for r in records])
        settled, unsettled = [], []
        for r, outcome in zip(records, outcomes, strict=True):
            if outcome.reason not in OUTBOX_SETTLED:
                unsettled.append(outcome.reason)  # (an unknown outcome, no leader: next round)
                continue
            if outcome.reason != L.R_OK:
                log.log(logging.INFO if outcome.reason in OUTBOX_DECLINED else logging.ERROR,
                        "front: shard %d's referral bonus of its entry %d: shard %d answered "
                        "reason %d (%s)", shard, r[2], target, outcome.reason,
                        "declined, as a single server declines it"
                        if outcome.reason in OUTBOX_DECLINED else
                        "not paid now: older than the request window (paid if an earlier "
                        "delivery was) or not the same request; see docs/cluster.md")
            settled.append(r[2])
        return settled, unsettled

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
            by_shard.setdefault(self.routes.shard_of(c), []).append(c)
        await asyncio.gather(*(self.cards[s].fresh(tuple(cs)) for s, cs in by_shard.items()))


_NOT_SENT = (Overloaded, Stopped, Stale, TimeoutError)  # a step not sent: answered, not raised


def _not_sent_reason(exc: BaseException) -> int:
    return L.R_OVERLOADED if isinstance(exc, Overloaded) else L.R_UNAVAILABLE


class _Look(Exception):
    """``_submit``: a call to look at the card shards' stream ends first."""


_LOOK = object()  # ``_basket_state``: not known without a look


def _outbox_ended(task: asyncio.Task) -> None:
    """The outboxes' delivery ends only when the front stops (cancelled): said if otherwise."""
    if not task.cancelled():
        log.error("front: the card shards' outboxes are no longer delivered by this front "
                  "(other fronts still deliver them): %r", task.exception())


def _both(first, then):
    """An answer hook that runs ``first``, then ``then`` (if any) whatever ``first`` did."""
    if then is None:
        return first

    def hook(ops, outcomes) -> None:
        try:
            first(ops, outcomes)
        finally:
            then(ops, outcomes)
    return hook


def reseal_cards(payload: bytes) -> list[bytes]:
    """The card ids of an OP_RESEAL's items (``admin.reseal_payload``)."""
    out, at = [], 0
    while at < len(payload):
        card, old, new = RESEAL_ITEM.unpack_from(payload, at)
        out.append(card)
        at += RESEAL_ITEM.size + old + new
    assert out, "a re-seal of no card"
    return out


def _basket_of(op: PendingOp) -> int:
    """A purchase's split-tender basket tag (0: none, or not a purchase)."""
    return _BASKET.unpack_from(op.packed, _OP_BASKET_AT)[0] if op.packed[0] == L.OP_PURCHASE else 0


# Reads that must name a shard: asked of the ShardedLedger itself, a service forgot to route one
# (a card's goes to its shard's ledger, ``of_card``: the admin shard holds no cards; a journal's
# to the shard the feed names, ``ShardedWriter.journals``: each shard has its own seqs).
SHARD_READS = frozenset({"read_card", "read_packages", "read_coupons", "read_lots",
                         "read_holds", "read_replacement", "read_history", "read_entry",
                         "read_lineage", "quote", "read_journal", "next_seq"})


class ShardedLedger:
    """The services' read side of a front over an admin shard and card shards."""

    def __init__(self, admin: Ledger, cards: dict[int, Ledger], routes: Routes) -> None:
        self.admin = admin
        self.cards = cards
        self.routes = routes
        self._sealed_from: dict[bytes, int] = {}  # (read_sealed's cursor)

    def of_card(self, card_id: bytes) -> Ledger:
        """The ledger of the card shard that holds ``card_id``."""
        return self.cards[self.routes.shard_of(card_id)]

    def __getattr__(self, name: str):
        """Admin state: the admin shard's (every card shard holds the same, relayed)."""
        if name in SHARD_READS:
            raise AssertionError(f"{name}: a read of one shard's (a card's: of_card)")
        return getattr(self.admin, name)

    def stats(self) -> dict:
        cards = [ledger.stats() for ledger in self.cards.values()]
        return {"cards": sum(s["cards"] for s in cards),
                "journal": sum(s["journal"] for s in cards) + self.admin.stats()["journal"]}

    def read_terminal(self, terminal_id: int) -> tuple | None:
        """The terminal as the admin shard holds it, with the highest KSN counter any card
        shard applied (its swipes are the card shards'; the admin shard sees none)."""
        found = self.admin.read_terminal(terminal_id)
        if found is None:
            return None
        ksn = max((t[_TERMINAL_KSN] for t in (ledger.read_terminal(terminal_id)
                                               for ledger in self.cards.values())
                   if t is not None), default=0)
        return _with_ksn(found, ksn)

    def read_terminals(self) -> list[tuple]:
        """Every terminal, as ``read_terminal``."""
        ksn: dict[int, int] = {}
        for ledger in self.cards.values():
            for t in ledger.read_terminals():
                ksn[t[_TERMINAL_ID]] = max(ksn.get(t[_TERMINAL_ID], 0), t[_TERMINAL_KSN])
        return [_with_ksn(t, ksn.get(t[_TERMINAL_ID], 0)) for t in self.admin.read_terminals()]

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

    def read_store_known(self, store_id: int) -> bool:
        """In the chain's registry (the admin shard's), or with an entry on any card shard."""
        return any(ledger.read_store_known(store_id)
                   for ledger in (self.admin, *self.cards.values()))

    def read_day(self, store: int, day: int) -> tuple:
        """A store's business day over the card shards, its close as the admin shard made it
        (``daytotals.merge_days``). ShardBehind if the admin shard closed it and a card shard
        has not yet (its leader did not relay the close within the answer's wait): its figures
        would still move, under a close."""
        days = {s: ledger.read_day(store, day) for s, ledger in self.cards.items()}
        close = self.admin.read_day(store, day)[1]
        behind = sorted(s for s, d in days.items() if close is not None and d[1] is None)
        if behind:
            raise ShardBehind(f"card shards {', '.join(map(str, behind))} have not closed the "
                              "day yet (their leaders relay the close): ask again")
        return daytotals.merge_days(list(days.values()), close)

    def read_members(self, first: int, last: int, as_of: int, limit: int,
                     after: bytes = b"") -> tuple[dict, dict] | None:
        """The member figures and a page of the dormant members over the card shards
        (``members.merge_reads``)."""
        reads = [ledger.read_members(first, last, as_of, limit, after)
                 for ledger in self.cards.values()]
        return None if any(r is None for r in reads) else member_metrics.merge_reads(reads, limit)

    def read_sealed(self, after: bytes = b"", limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """The sealed card numbers after ``after`` as the re-seal reads them, a card shard at a
        time (every chunk one shard's, so each re-seal operation goes to one): the rest of
        ``after``'s shard, else the next card shard's from its first."""
        order = sorted(self.cards)
        self.routes.learn_all(self.cards)  # (a re-seal of a chunk that holds a card made by a
        #                                    replacement goes where it is)
        # (the shard a chunk came from, by its last card: a card its shard holds though the
        # table routes it elsewhere, once slots move, must not send the cursor back)
        at = order.index(self._sealed_from.get(after, self.routes.shard_of(after))) if after else 0
        for shard in order[at:]:
            chunk = self.cards[shard].read_sealed(after, limit)
            if chunk:
                self._sealed_from = {chunk[-1][0]: shard}
                return chunk
            after = b""
        return []

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


_TERMINAL_ID, _TERMINAL_KSN = 3, 5  # layout.TERMINAL's terminal_id, last_ksn_counter


def _with_ksn(terminal: tuple, ksn: int) -> tuple:
    return (*terminal[:_TERMINAL_KSN], max(terminal[_TERMINAL_KSN], ksn),
            *terminal[_TERMINAL_KSN + 1:])


def _card_follower(ledger: Ledger, routes: Routes, shard: int) -> Callable[[], None]:
    """As a card shard's follower advances (``ClusterWriter``: at most every RELOAD_EVERY_S):
    its reader adopts the program its shard relayed (quotes run under it), and the routes take
    the card numbers it forwarded since."""
    def follow() -> None:
        if ledger.read_program_version() != ledger.program_version:
            ledger.refresh_program()
        routes.learn(shard, ledger)
    return follow
