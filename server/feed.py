"""The journal feed (AdminService.WatchJournal): every journal entry from a seq on, then live.

A chain drives SMS or WeChat notices, a data warehouse or a fraud check off it. Each stream
reads the ledger on its own (``Ledger.read_journal``: a page per short read transaction) at
its own pace: it reads the next page only once the client has taken the last (each message
is awaited, so gRPC's flow control holds a slow reader back here, never in the writer). Caught
up, it waits for the writer's ``JournalSignal``, notified at each checkpoint (or FEED_WAIT_S,
whichever comes first) and reads again: a stream starts with every entry answered before it, and
later entries arrive as checkpoints bring them into LMDB (within ``--checkpoint-ms``). The journal's seqs have no gaps and an entry never changes, so the resume point
(the seq after the last entry sent) is all a consumer keeps to miss nothing and repeat
nothing, across a server restart too.

Bounds: FEED_WATCHERS_MAX streams at once, JOURNAL_PAGE_MAX entries a read,
FEED_MESSAGE_ENTRIES_MAX entries a message (a purchase has at most LINES_MAX lines: a message
stays well below gRPC's default 4 MiB a message).
"""
from __future__ import annotations

import logging

from cardcore import daytotals, stores
from cardcore import layout as L
from cardcore.ledger import JOURNAL_PAGE_MAX, Ledger
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import common_pb2 as cpb

from .access import ROLE, Access, Caller
from .journal_signal import JournalSignal
from .errors import CODE_NUMBER, Invalid, abort, failure, fresh_or_abort
from .writer import Writer
from .service import entry_result

log = logging.getLogger("cardcore.feed")
R = cpb.Reason

FEED_WATCHERS_MAX = 16          # streams at once; more: REASON_FEED_WATCHERS_LIMIT
FEED_MESSAGE_ENTRIES_MAX = 100  # entries a message
FEED_WAIT_S = 1.0               # caught up: read again at least this often, notice or not
_CARD_ID = slice(16, 16 + L.CARD_ID_SIZE)  # layout.JOURNAL: card_id (admin entries: a subject)
_REASON = slice(L.JOURNAL_OFF_REASON, L.JOURNAL_OFF_REASON + 2)


def journal_entry(entry: bytes, lines: bytes) -> apb.JournalEntry:
    """A journal entry as the feed sends it: its result as history shows it, the entry's own
    reason (a PIN-failed entry's REASON_PIN_WRONG), and the card's id (never its number)."""
    result = entry_result(entry, lines)
    reason = int.from_bytes(entry[_REASON], "little")
    if reason:
        result.reason, result.status_code = reason, CODE_NUMBER[reason]
    out = apb.JournalEntry(result=result,
                           card_id=entry[_CARD_ID] if entry[1] in L.CARD_ENTRY_OPS else b"")
    subject = entry[_CARD_ID]
    if entry[1] == L.OP_CLOSE_DAY:  # what an admin entry is about (its subject, decoded)
        out.subject_store_id, day = daytotals.closed_day(subject)
        out.business_day = daytotals.date_of_day(day)
    elif entry[1] == L.OP_STORE_PUT:
        out.subject_store_id, out.subject_region_id, _ = stores.subject_store(subject)
    elif entry[1] == L.OP_REGION_PUT:
        (out.subject_region_id,) = L.REGION_SUBJECT.unpack(subject)
    return out


class JournalFeed:
    def __init__(self, ledger: Ledger, access: Access, writer: Writer):
        self.access = access
        self.watchers = 0
        self._closing = False
        # the journals a request may name (WatchJournalRequest.shard): shard -> (its ledger,
        # its signal, its writer); a single server's is shard 0's, a front's its shard's, a
        # front over several card shards' every shard's (``ShardedWriter.journals``: a watch
        # waits for its shard's follower alone)
        self.journals: dict[int, tuple[Ledger, JournalSignal, Writer]] = {
            0: (ledger, writer.journal_signal, writer)}

    def close(self) -> None:
        """The server is stopping: every stream ends now with REASON_UNAVAILABLE (a live one
        would otherwise hold the shutdown for its whole grace period)."""
        self._closing = True
        for _, signal, _ in self.journals.values():
            signal.notify()

    def _journal(self, request: apb.WatchJournalRequest
                 ) -> tuple[int, Ledger, JournalSignal, Writer]:
        """(the shard, its ledger, its signal, its writer) the request names, or the only one
        served if it names none; Invalid otherwise."""
        if request.HasField("shard"):
            named = request.shard
        elif len(self.journals) == 1:
            (named,) = self.journals
        else:
            named = None
        if named not in self.journals:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "shard",
                          detail=f"this serves the journals of shards "
                                 f"{', '.join(map(str, sorted(self.journals)))}: name one")
        return (named, *self.journals[named])

    def _check(self, caller: Caller) -> None:
        """A chain admin's token, or a development server's caller without one; never a till."""
        if caller.bad_token:
            raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        if caller.cert_terminal_id is not None:
            raise Invalid(R.REASON_PERMISSION_DENIED, "authorization")
        if caller.operator is None:
            if self.access.tls:
                raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        elif not caller.operator.may(ROLE.OPERATOR_ROLE_CHAIN_ADMIN):
            raise Invalid(R.REASON_PERMISSION_DENIED, "authorization")

    async def watch(self, request: apb.WatchJournalRequest, context):
        """The stream's responses (an async generator: gRPC awaits each one's write)."""
        caller = self.access.caller(context)
        next_seq = max(request.from_seq, 1)
        try:
            self._check(caller)
            shard, ledger, signal, writer = self._journal(request)
        except Invalid as exc:
            log.info("refused WatchJournal: %s", R.Name(exc.reason),
                     extra={"reason": R.Name(exc.reason)})
            await abort(context, failure(exc.reason, exc.field, detail=exc.detail))
        # Everything answered before the call is in what it reads (cardcore.durable); what is
        # answered later arrives as the writer's checkpoints bring it into LMDB.
        await fresh_or_abort(writer, context, everything=True)
        try:
            head = ledger.next_seq
            if next_seq > head:
                raise Invalid(R.REASON_FEED_SEQ_AHEAD, "from_seq",
                              detail=f"the journal's next seq is {head}")
            if self.watchers >= FEED_WATCHERS_MAX:
                raise Invalid(R.REASON_FEED_WATCHERS_LIMIT, "")
        except Invalid as exc:
            log.info("refused WatchJournal: %s", R.Name(exc.reason),
                     extra={"reason": R.Name(exc.reason)})
            await abort(context, failure(exc.reason, exc.field, detail=exc.detail))
        self.watchers += 1  # no await between the check and here: the bound holds
        log.info("journal feed from seq %d for %s (%d streams)", next_seq,
                 f"operator {caller.operator.operator_id}" if caller.operator
                 else "a development caller", self.watchers)
        try:
            said_caught_up = False
            while True:
                if self._closing:
                    await abort(context, failure(R.REASON_UNAVAILABLE))
                now = self.access.current(caller)
                if now.bad_token:  # the operator was removed while it watched
                    await abort(context, failure(R.REASON_UNAUTHENTICATED, "authorization"))
                seen = signal.count  # before the read: a notice during it is not lost
                page = ledger.read_journal(next_seq, JOURNAL_PAGE_MAX)
                log.debug("journal feed: %d entries read from seq %d", len(page), next_seq)
                caught_up = len(page) < JOURNAL_PAGE_MAX
                for start in range(0, len(page), FEED_MESSAGE_ENTRIES_MAX):
                    part = page[start:start + FEED_MESSAGE_ENTRIES_MAX]
                    answer = apb.WatchJournalResponse(
                        entries=[journal_entry(entry, lines) for entry, lines in part],
                        shard=shard)
                    next_seq = answer.entries[-1].result.seq + 1
                    answer.next_seq = next_seq
                    answer.caught_up = caught_up and start + len(part) == len(page)
                    said_caught_up = answer.caught_up
                    yield answer
                if not caught_up:
                    continue
                if not said_caught_up:  # nothing new since a full page: say so once
                    said_caught_up = True
                    yield apb.WatchJournalResponse(next_seq=next_seq, caught_up=True,
                                                   shard=shard)
                if request.stop_when_caught_up:
                    return
                await signal.wait(FEED_WAIT_S, seen)
        finally:
            self.watchers -= 1
            log.info("journal feed ended at seq %d (%d streams)", next_seq, self.watchers)
