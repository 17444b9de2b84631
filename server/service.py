"""The gRPC servicer: validate, translate protobuf <-> ledger operations, hand to the writer.

Thin on purpose: limits are checked here, where data enters; the arithmetic
is the kernel's and the storage the ledger's.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import struct
import time

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from cardcore import cards
from cardcore import layout as L
from cardcore.ext import batchwire, wire
from cardcore.keyring import Keyring
from cardcore.ledger import HISTORY_PAGE_MAX, Ledger, Outcome, PendingOp
from cardcore.lookup import MemberIndex, lookup_key
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb

from cardcore.idempotency import basket_tag, request_key
from cardcore.rules import available_minor

from .access import ROLE, Access, Caller
from .errors import CODE_NUMBER, Invalid, ShardBehind, abort, failure, fresh_or_abort
from .operations import (MALFORMED, NAME_LEN_MAX, PHONE_QUERY_LEN_MAX, REQUEST_ID_RE, Operations,
                         basket, request_id_bytes)
from .writer import Overloaded, Stopped, Writer

log = logging.getLogger("cardcore.service")

R = cpb.Reason
BUSY_WAIT_S = 5.0  # at most this long for room in a terminal's budget (within the deadline)
UNARY_OP_TYPES = {"OpenCard": L.OP_OPEN, "TopUp": L.OP_TOP_UP, "Purchase": L.OP_PURCHASE,
                  "SetPin": L.OP_SET_PIN, "ResetPin": L.OP_RESET_PIN,
                  "IssueCoupon": L.OP_COUPON_ISSUE, "SellPackage": L.OP_PACKAGE_SELL,
                  "UseEntitlement": L.OP_PACKAGE_USE, "ExchangePoints": L.OP_POINTS_EXCHANGE,
                  "RedeemGift": L.OP_GIFT_REDEEM, "Refund": L.OP_REFUND, "Reverse": L.OP_REVERSAL,
                  "SetCardStatus": L.OP_CARD_STATUS, "Authorize": L.OP_HOLD,
                  "Capture": L.OP_PURCHASE, "VoidHold": L.OP_HOLD_VOID,
                  "ReplaceCard": L.OP_CARD_REPLACED}
BATCH_OPS_MAX = 10_000
QUOTE_COUPONS_MAX = 16  # a quote tries at most this many of the card's coupons (oldest first)
STREAM_IN_FLIGHT_MAX = 256  # pipelined requests per SwipeStream before reading pauses


def add_service(server, servicer, service) -> None:
    """Register ``servicer`` for ``service`` (a ServiceDescriptor) like the generated
    add_*_to_server, but with a request decoder that turns undecodable bytes into MALFORMED:
    unary calls answer INVALID_ARGUMENT with a reason, stream items one result each."""
    handlers = {}
    for method in service.methods:
        in_cls = message_factory.GetMessageClass(method.input_type)
        out_cls = message_factory.GetMessageClass(method.output_type)

        def decode(data: bytes, in_cls=in_cls):
            try:
                return in_cls.FromString(data)
            except DecodeError:
                return MALFORMED

        fn = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif not method.client_streaming and not method.server_streaming:
            make, fn = grpc.unary_unary_rpc_method_handler, _refuse_malformed(fn)
        elif method.server_streaming:
            make, fn = grpc.unary_stream_rpc_method_handler, _refuse_malformed_stream(fn)
        else:
            raise NotImplementedError(f"{method.full_name}: no such call shape in the contract")
        serialize = out_cls.SerializeToString
        if method.name in PRESERIALIZED:
            serialize = _as_bytes(serialize)
        handlers[method.name] = make(fn, request_deserializer=decode,
                                     response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


PRESERIALIZED = frozenset({"SubmitBatch"})  # answers its response as protobuf's bytes


def _as_bytes(serialize):
    """The response serializer of a call that answers bytes already serialized (the response
    message's own wire format), and messages elsewhere (an abort's path)."""
    def call(response):
        return response if type(response) is bytes else serialize(response)

    return call


def _refuse_malformed(fn):
    """A unary call: undecodable bytes INVALID_ARGUMENT; a read over several card shards that
    one of them cannot answer yet UNAVAILABLE (``ShardBehind``)."""
    async def call(request, context):
        if request is MALFORMED:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "(message)"))
        try:
            return await fn(request, context)
        except ShardBehind as exc:
            await abort(context, failure(R.REASON_UNAVAILABLE, detail=str(exc)))

    return call


def _refuse_malformed_stream(fn):
    """_refuse_malformed for a server-streaming call (an async generator)."""
    async def call(request, context):
        if request is MALFORMED:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "(message)"))
        async for answer in fn(request, context):
            yield answer

    return call


# The journal entry fields a reply shows: op, seq, amount, discount, the three deltas, the
# three after-balances, ts_us, program version, caller kind and id (see layout.JOURNAL).
_REPLY_FIELDS = struct.Struct("<xBBxxxxxQ16xqqqqqqqqq24xIB3xI")
_OP_REF_AT = 144  # layout.OP offset of ref_id
# The card programs' reply fields in one read: points redeemed, fen redeemed, tier after, item id,
# purchase flags (layout.JOURNAL offsets 176, 184, 192, 196, 198).
_REPLY_PROGRAM = struct.Struct("<176xqqB3xHH")
assert _REPLY_PROGRAM.size == 200
EPOCH = datetime.date(1970, 1, 1)
assert _REPLY_FIELDS.size == 140


_RESULT_LINES = pb.OperationResult.DESCRIPTOR.fields_by_name["lines"].number
_BATCH_RESULTS = pb.SubmitBatchResponse.DESCRIPTOR.fields_by_name["results"].number
_QUOTE_LINES = pb.QuoteResponse.DESCRIPTOR.fields_by_name["lines"].number


def add_line_results(message, field_number: int, lines: bytes) -> None:
    """Each line's figures as the kernel filled them (layout.LINE), added to the repeated
    LineResult field ``field_number`` of ``message``: written as protobuf's bytes in one C loop
    (cardcore.ext.wire) and merged, a tenth of the cost of setting the fields one by one."""
    message.MergeFromString(wire.line_results(lines, field_number))


def outcome_failure(outcome: Outcome, pin_tries_max: int) -> cpb.Failure:
    tries_left = 0
    if outcome.reason == L.R_PIN_WRONG and outcome.entry is not None:
        tries_left = max(0, pin_tries_max - outcome.entry[L.JOURNAL_OFF_PIN_TRIES])
    detail = ""
    if outcome.reason == L.R_ILLEGAL_TRANSITION and outcome.entry is not None:
        detail = f"the card is {cpb.CardStatus.Name(outcome.entry[3])[12:].lower()}"  # its status
    return failure(outcome.reason, available_minor=outcome.available_minor, pin_tries_left=tries_left,
                   detail=detail)


def result_of(request_id: str, outcome: Outcome, pin_tries_max: int = 0,
              with_caller: bool = False) -> pb.OperationResult:
    """The OperationResult for an outcome: the same shape for unary, batch and stream (the
    caller's namespace only for GetOperation: elsewhere it is the caller itself, and each nested
    field costs every result)."""
    reason = outcome.reason
    if reason == L.R_OK:  # a plain int: protobuf's enum wrapper attribute costs ~0.3 µs
        entry = outcome.entry
        (op, tier, seq, amount, discount, dp, db_, dpts, pa, ba, ptsa, ts_us, program_version,
         caller_kind, caller_id) = _REPLY_FIELDS.unpack_from(entry)
        taken, redeemed, tier_after, promotion_id, flags = _REPLY_PROGRAM.unpack_from(entry)
        result = pb.OperationResult(
            request_id=request_id, replayed=outcome.replayed, seq=seq, type=op,
            amount_minor=amount, discount_minor=discount,
            paid_minor=-(dp + db_) if op == L.OP_PURCHASE or op == L.OP_PACKAGE_SELL else 0,
            points_earned=dpts + taken, applied_at_us=ts_us, program_version=program_version,
            principal_delta_minor=dp, bonus_delta_minor=db_, tier=tier, tier_after=tier_after)
        if taken or redeemed:
            result.points_redeemed = taken
            result.redeemed_minor = redeemed
        if op == L.OP_REFUND or op == L.OP_REVERSAL:
            result.original_seq = L.JOURNAL_TAIL.unpack_from(entry)[3]
            result.refund_complete = bool(flags & L.UNDO_COMPLETE)
        elif op == L.OP_CARD_STATUS or op == L.OP_CARD_REPLACED:
            result.status_after = entry[3]
        elif op == L.OP_REPLACEMENT_OPENED:  # rule 16: the new card's side
            result.status_after = entry[3]
            result.original_seq = L.JOURNAL_TAIL.unpack_from(entry)[3]  # the old card's entry
        elif op == L.OP_HOLD:
            result.hold_serial = seq
            result.hold_expires_at_us = L.JOURNAL_TAIL.unpack_from(entry)[4]
        elif op == L.OP_HOLD_VOID or op == L.OP_HOLD_EXPIRED or (
                op == L.OP_PURCHASE and entry[144:152] != _NO_LINK):  # a capture
            result.hold_serial = L.JOURNAL_TAIL.unpack_from(entry)[3]  # the hold it closed
        if promotion_id:
            if op == L.OP_TOP_UP:
                result.promotion_id = promotion_id
            elif op == L.OP_GIFT_REDEEM:
                result.gift_id = promotion_id
            elif op == L.OP_PACKAGE_SELL or op == L.OP_PACKAGE_USE:
                result.package_id = promotion_id
                result.package_serial = L.JOURNAL_TAIL.unpack_from(entry)[4]
            else:  # a coupon issued, or used by a purchase
                result.coupon_id = promotion_id
                result.coupon_serial = L.JOURNAL_TAIL.unpack_from(entry)[4]
                result.coupon_off_minor = L.JOURNAL_COUPON_OFF.unpack_from(
                    entry, L.JOURNAL_OFF_COUPON)[0]
        if outcome.lines:
            add_line_results(result, _RESULT_LINES, outcome.lines)
        if flags & L.PARTIAL_PAYMENT:
            result.remainder_due_minor = amount - discount - redeemed + dp + db_
        balance = result.balance_after  # set in place: building a Balance and copying it costs 2x
        balance.principal_minor = pa
        balance.bonus_minor = ba
        held = outcome.held_minor  # rule 15: the card's held after it, the writer's (0 in
        balance.available_minor = available_minor(pa, ba, held)  # history: see entry_result)
        if held:
            balance.held_minor = held
        balance.points = ptsa
        if with_caller:
            caller = result.caller
            caller.kind = caller_kind
            caller.id = caller_id
        return result
    return pb.OperationResult(
        request_id=request_id, reason=reason, status_code=CODE_NUMBER[reason],
        replayed=outcome.replayed, type=outcome.op, failure=outcome_failure(outcome, pin_tries_max))


_ENTRY_TILL = struct.Struct("<104xIIII")  # layout.JOURNAL: store, terminal, staff, operator
_NO_LINK = bytes(8)  # a journal entry's link_seq (offset 144) when it names none


def entry_result(entry: bytes, lines: bytes) -> pb.OperationResult:
    """A journal entry as history and receipts show it: its result, with its till and operator
    (a PIN-failed entry shows its type and no money)."""
    result = result_of("", Outcome(L.R_OK, True, entry[1], entry, 0, 0, lines))
    store, terminal, staff, operator = _ENTRY_TILL.unpack_from(entry)
    result.till.store_id, result.till.terminal_id, result.till.staff_id = store, terminal, staff
    result.operator_id = operator
    return result


def quote_response(entry: bytes, lines: bytes, rec: bytes, reason: int, show_balance: bool,
                   pin_tries_max: int) -> pb.QuoteResponse:
    """A Quote's answer from the kernel's dry run: the entry it would have journaled (or the
    decline), the lines as filled, and the card record (its balances now: the run's copy is
    the state after, so they are read off the entry's deltas)."""
    (op, tier, seq, amount, discount, dp, db_, dpts, pa, ba, ptsa, *_rest) = \
        _REPLY_FIELDS.unpack_from(entry)
    taken, redeemed, tier_after, _, _ = L.JOURNAL_PROGRAM.unpack_from(entry, L.JOURNAL_OFF_PROGRAM)
    card = L.CARD.unpack(rec)
    answer = pb.QuoteResponse(reason=reason, tier=card[2] if reason else tier,
                              tier_after=card[2] if reason else tier_after,
                              program_version=L.JOURNAL_TAIL.unpack_from(entry)[0])
    if reason != L.R_OK:
        answer.failure.CopyFrom(outcome_failure(
            Outcome(reason, False, op, entry,
                    available_minor(card[5], card[6], card[8]) if show_balance else 0),
            pin_tries_max))
    add_line_results(answer, _QUOTE_LINES, lines)
    answer.amount_minor = sum(x.amount_minor for x in answer.lines)
    answer.discount_minor = sum(x.discount_minor for x in answer.lines)
    if reason == L.R_OK:
        answer.coupon_off_minor = L.JOURNAL_COUPON_OFF.unpack_from(entry, L.JOURNAL_OFF_COUPON)[0]
        answer.points_redeemed = taken
        answer.redeemed_minor = redeemed
        answer.paid_minor = -(dp + db_)
        if show_balance:  # which bucket pays tells the balance: not without the PIN
            answer.principal_paid_minor = -dp
            answer.bonus_paid_minor = -db_
        answer.points_earned = dpts + taken
    if show_balance and card[0]:
        principal, bonus, points = (pa - dp, ba - db_, ptsa - dpts) if reason == L.R_OK else \
            (card[5], card[6], card[7])
        answer.balance.principal_minor = principal
        answer.balance.bonus_minor = bonus
        answer.balance.available_minor = available_minor(principal, bonus, card[8])
        answer.balance.points = points
    return answer


def add_card_coupons(out, coupons: list[tuple], program, now_us: int) -> None:
    """A card's coupons (layout.COUPON fields each) into the repeated CardCoupon ``out``."""
    for (_, state, coupon_id, _, valid_from, valid_until, serial, used_seq, off, _) in coupons:
        if state == L.COUPON_USED:
            shown = pb.COUPON_STATE_USED
        elif now_us >= valid_until:
            shown = pb.COUPON_STATE_EXPIRED
        else:
            shown = pb.COUPON_STATE_ISSUED
        definition = program.coupon(coupon_id)
        out.add(serial=serial, coupon_id=coupon_id, name=definition.name if definition else "",
                state=shown, valid_from_us=valid_from, valid_until_us=valid_until,
                used_seq=used_seq, off_minor=off)


def add_card_packages(out, packages: list[tuple], program, now_us: int,
                      category: int | None = None) -> int:
    """A card's packages (layout.PACKAGE fields each) into the repeated CardPackage ``out``;
    the serial of the usable one that expires first (0: none), for ``category`` when given."""
    best, best_until = 0, 0
    for (_, kind, package_id, uses_left, valid_from, valid_until, serial, _, uses, *_rest) \
            in packages:
        definition = program.package(package_id)
        covers = (category is None or definition is None or definition.category < 0
                  or definition.category == category)
        usable = (valid_from <= now_us < valid_until and covers
                  and (kind != L.PACKAGE_COUNT or uses_left > 0))
        out.add(serial=serial, package_id=package_id, name=definition.name if definition else "",
                kind=kind, uses_left=uses_left, uses=uses, valid_from_us=valid_from,
                valid_until_us=valid_until, usable=usable)
        if usable and (not best or valid_until < best_until):
            best, best_until = serial, valid_until
    return best


def _failed_result(request_id: str, op_type: int, exc: Invalid) -> pb.OperationResult:
    return pb.OperationResult(request_id=request_id, reason=exc.reason,
                              status_code=CODE_NUMBER[exc.reason], type=op_type,
                              failure=failure(exc.reason, exc.field))


def log_refusal(request_id: str, reason: int, field: str = "") -> None:
    """Every refusal, declines included, at INFO with its request_id and reason (never a card
    number, PIN or key: neither is passed here)."""
    name = R.Name(reason)
    log.info("refused %s%s", name, f": {field}" if field else "",
             extra={"request_id": request_id[:64], "reason": name})


class CardService(pb_grpc.CardServiceServicer):
    def __init__(self, ledger: Ledger, writer: Writer, keyring: Keyring, access: Access):
        self.ledger = ledger
        self.writer = writer
        self.keyring = keyring
        self.access = access
        self.metrics = writer.metrics
        self._call_seconds = {rpc: self.metrics.call_seconds.labels(rpc) for rpc in (
            "OpenCard", "TopUp", "Purchase", "GetCard", "GetOperation", "SubmitBatch", "SwipeStream",
            "SetPin", "ResetPin", "Quote", "IssueCoupon", "SellPackage", "UseEntitlement",
            "CheckEntitlement", "ExchangePoints", "RedeemGift", "Refund", "Reverse",
            "ListTransactions", "SetCardStatus", "Authorize", "Capture", "VoidHold",
            "ReplaceCard", "FindCards")}
        self._members = MemberIndex(lookup_key(keyring.index_key))
        self.operations = ops = Operations(ledger, keyring, access)
        self._builders = ops.builders
        self._pin_tries_max = ledger.program.pin_tries_max
        self._results = batchwire.Results(L.OP_PURCHASE, L.OP_TOP_UP, L.PARTIAL_PAYMENT)

    def adopt_program(self) -> None:
        """After a program load: the new limits for requests built from now on."""
        self.ledger.refresh_program()
        self.operations.adopt_program()
        self._pin_tries_max = self.ledger.program.pin_tries_max

    async def _room(self, exc: Invalid, deadline: float | None) -> bool:
        """For a swipe refused only because its terminal's unanswered swipes fill the budget:
        wait for one to be answered (within the deadline, at most BUSY_WAIT_S); True to retry."""
        if not exc.busy_terminal:
            return False
        now = time.monotonic()
        timeout_s = BUSY_WAIT_S if deadline is None else min(BUSY_WAIT_S, deadline - now)
        if timeout_s <= 0:
            return False
        await self.access.room(exc.busy_terminal, timeout_s)
        return True

    def _release(self, ops: list[PendingOp], outcomes) -> None:
        """Mark the terminal swipes among ``ops`` answered in their terminals' budgets. Called by
        the writer with the answer, even if the caller has gone: a cancelled call neither keeps
        nor frees its place early (the writer still applies it)."""
        access = self.access
        for op, outcome in zip(ops, outcomes, strict=True):
            if op.ksn_counter:
                access.answered(L.OP_TERMINAL_ID.unpack_from(op.packed)[0], outcome.reason,
                                inquiry=op.packed[0] == L.OP_BALANCE_INQUIRY)

    def _submit_now(self, ops: list[PendingOp], deadline: float | None) -> asyncio.Future:
        """writer.submit, the swipes' budget freed by the answer; raises Overloaded or
        Stopped (the swipes freed at once)."""
        swipes = any(op.ksn_counter for op in ops)
        try:
            return self.writer.submit(ops, deadline, self._release if swipes else None)
        except (Overloaded, Stopped) as exc:
            reason = R.REASON_OVERLOADED if isinstance(exc, Overloaded) else R.REASON_UNAVAILABLE
            if swipes:
                self._release(ops, [Outcome(reason, False, 0, None, 0)] * len(ops))
            raise

    # ---- submitting ------------------------------------------------------------

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _submit(self, ops: list[PendingOp], context) -> asyncio.Future:
        """Queue ops for the writer, or end the call with OVERLOADED / UNAVAILABLE."""
        try:
            return self._submit_now(ops, self._deadline(context))
        except (Overloaded, Stopped) as exc:
            reason = R.REASON_OVERLOADED if isinstance(exc, Overloaded) else R.REASON_UNAVAILABLE
            await abort(context, failure(reason))

    async def _parse(self, build, request, context, caller: Caller | None = None, op_type: int = 0):
        """``build(request, caller)``, or end the call with the status of the Invalid it raised
        (counted in the operations metric; access refusals logged for the security team). A
        terminal swipe that only has to wait for room in its budget waits, then retries."""
        caller = caller or self.access.caller(context)
        deadline = self._deadline(context)
        try:
            while True:
                try:
                    return self.operations.build(build, request, caller)
                except Invalid as exc:
                    if not await self._room(exc, deadline):
                        raise
        except Invalid as exc:
            self.metrics.count(op_type, exc.reason)
            log_refusal(getattr(request, "request_id", ""), exc.reason, exc.field)
            await abort(context, failure(exc.reason, exc.field, detail=exc.detail))

    async def _unary(self, rpc: str, build, request, context) -> pb.OperationResult:
        started = time.perf_counter()
        op = await self._parse(build, request, context, op_type=UNARY_OP_TYPES[rpc])
        outcome = (await (await self._submit([op], context)))[0]
        self.metrics.count(outcome.op, outcome.reason)
        self._call_seconds[rpc].observe(time.perf_counter() - started)
        if outcome.reason != L.R_OK:
            log_refusal(request.request_id, outcome.reason)
            await abort(context, outcome_failure(outcome, self._pin_tries_max))
        return result_of(request.request_id, outcome)

    # ---- RPCs ------------------------------------------------------------------

    async def OpenCard(self, request, context):
        return await self._unary("OpenCard", self.operations.open_op, request, context)

    async def TopUp(self, request, context):
        return await self._unary("TopUp", self.operations.top_up_op, request, context)

    async def Purchase(self, request, context):
        return await self._unary("Purchase", self.operations.purchase_op, request, context)

    async def SetPin(self, request, context):
        return await self._unary("SetPin", self.operations.set_pin_op, request, context)

    async def ResetPin(self, request, context):
        return await self._unary("ResetPin", self.operations.reset_pin_op, request, context)

    async def IssueCoupon(self, request, context):
        return await self._unary("IssueCoupon", self.operations.issue_coupon_op, request, context)

    async def GetBasket(self, request, context):
        caller = self.access.caller(context)
        if caller.bad_token or (caller.operator is None and self.access.tls
                                and caller.cert_terminal_id is None):
            await abort(context, failure(R.REASON_UNAUTHENTICATED, "authorization"))
        if not REQUEST_ID_RE.fullmatch(request.basket_id):
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "basket_id"))
        namespace = caller.namespace(caller.cert_terminal_id or 0)
        tag = basket_tag(*namespace, request.basket_id.encode("ascii"))
        answer = pb.Basket(basket_id=request.basket_id)
        await fresh_or_abort(self.writer, context, everything=True)  # a basket's payments name several cards
        for entry in self.ledger.read_basket(tag):
            payment = result_of("", Outcome(L.R_OK, True, entry[1], entry))
            answer.payments.append(payment)
            answer.remainder_due_minor = payment.remainder_due_minor
        return answer

    async def ExchangePoints(self, request, context):
        return await self._unary("ExchangePoints", self.operations.exchange_points_op, request,
                                 context)

    async def RedeemGift(self, request, context):
        return await self._unary("RedeemGift", self.operations.redeem_gift_op, request, context)

    # ---- history ----------------------------------------------------------------

    def _history_card(self, request, caller: Caller):
        """The card a history read names: by its number or its id (FindCards), an operator in
        scope (or development mode); a terminal's swipe is refused (history is the back
        office's)."""
        card = self.operations.swipes.card(
            request.card, request.till if request.HasField("till") else None, caller,
            by_id=True)
        if card.ksn_counter:
            raise Invalid(R.REASON_PERMISSION_DENIED, "card")
        return card

    async def ListTransactions(self, request, context):
        started = time.perf_counter()
        card = await self._parse(self._history_card, request, context)
        if request.page_size > HISTORY_PAGE_MAX:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "page_size"))
        for field in ("from_us", "to_us"):
            if getattr(request, field) < 0:
                await abort(context, failure(R.REASON_INVALID_ARGUMENT, field))
        await fresh_or_abort(self.writer, context, (card.card_id,))
        page, next_seq = self.ledger.of_card(card.card_id).read_history(
            card.card_id, request.before_seq, request.page_size or 20, request.from_us,
            request.to_us, frozenset(request.types))
        answer = pb.ListTransactionsResponse(next_before_seq=next_seq)
        answer.entries.extend(entry_result(entry, lines) for entry, lines in page)
        self._call_seconds["ListTransactions"].observe(time.perf_counter() - started)
        return answer

    async def GetReceipt(self, request, context):
        card = await self._parse(self._history_card, request, context)
        await fresh_or_abort(self.writer, context, (card.card_id,))
        ledger = self.ledger.of_card(card.card_id)  # (a card and what it replaced: one shard)
        found = ledger.read_entry(request.seq) if request.seq else None
        owner = found[0][16:32] if found is not None else None
        if owner is None or found[0][1] not in L.CARD_ENTRY_OPS or (
                owner != card.card_id and owner not in ledger.read_lineage(card.card_id)):
            await abort(context, failure(R.REASON_ORIGINAL_NOT_FOUND, "seq"))
        masked = (cards.mask(card.number) if owner == card.card_id and card.number  # by id, or a
                  else ledger.read_card(owner)[1].get("masked", ""))  # card it replaced
        return pb.Receipt(result=entry_result(*found), masked_number=masked)

    async def Refund(self, request, context):
        return await self._unary("Refund", self.operations.refund_op, request, context)

    async def Authorize(self, request, context):
        return await self._unary("Authorize", self.operations.authorize_op, request, context)

    async def Capture(self, request, context):
        return await self._unary("Capture", self.operations.capture_op, request, context)

    async def VoidHold(self, request, context):
        return await self._unary("VoidHold", self.operations.void_hold_op, request, context)

    # ---- member lookup (rule 17) ---------------------------------------------------

    def _member_query(self, request: pb.FindCardsRequest, caller: Caller) -> bytes:
        """The index prefix a FindCards asks for, once the caller may ask: an operator, cashier
        or above, of the till's store, or development mode; never a terminal (a member's cards
        are the back office's to find). The phone or name goes no further than this."""
        if caller.bad_token:
            raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        if caller.cert_terminal_id is not None:
            raise Invalid(R.REASON_PERMISSION_DENIED, "authorization")
        operator = caller.operator
        if operator is None:
            if self.access.tls:
                raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        elif not operator.may(ROLE.OPERATOR_ROLE_CASHIER, request.till.store_id):
            raise Invalid(R.REASON_PERMISSION_DENIED, "till.store_id")
        kind = request.WhichOneof("query")
        prefix = None
        if kind == "phone" and len(request.phone) <= PHONE_QUERY_LEN_MAX:
            prefix = self._members.phone_prefix(request.phone)
        elif kind == "name" and len(request.name) <= NAME_LEN_MAX:
            prefix = self._members.name_prefix(request.name)
        if prefix is None:
            raise Invalid(R.REASON_LOOKUP_QUERY_INVALID, kind or "query")
        return prefix

    async def FindCards(self, request, context):
        started = time.perf_counter()
        caller = self.access.caller(context)
        prefix = await self._parse(self._member_query, request, context, caller)
        await fresh_or_abort(self.writer, context, everything=True)  # statuses, tiers of any card
        found, more = self.ledger.find_members(prefix)
        program = self.ledger.program
        answer = pb.FindCardsResponse(more=more)
        for card_id, rec, profile in found:
            tier = rec[2]
            answer.cards.add(card_id=card_id, masked_number=profile.get("masked", ""),
                             status=rec[1], tier=tier,
                             tier_name=program.tiers[tier].name if tier < len(program.tiers) else "",
                             opened_at_us=rec[11], home_store_id=rec[12])
        # Who looked members up, and how much they found: never what they asked.
        log.info("member lookup by %s: %d cards%s", "operator %d" % caller.operator.operator_id
                 if caller.operator is not None else "a development caller", len(found),
                 " and more" if more else "")
        self._call_seconds["FindCards"].observe(time.perf_counter() - started)
        return answer

    async def SetCardStatus(self, request, context):
        return await self._unary("SetCardStatus", self.operations.set_card_status_op, request,
                                 context)

    async def ReplaceCard(self, request, context):
        return await self._unary("ReplaceCard", self.operations.replace_card_op, request, context)

    async def Reverse(self, request, context):
        return await self._unary("Reverse", self.operations.reverse_op, request, context)

    async def SellPackage(self, request, context):
        return await self._unary("SellPackage", self.operations.sell_package_op, request, context)

    async def UseEntitlement(self, request, context):
        return await self._unary("UseEntitlement", self.operations.use_entitlement_op, request,
                                 context)

    async def CheckEntitlement(self, request, context):
        started = time.perf_counter()
        card = await self._parse(self._entitlement_card, request, context)
        reason = L.R_INTERNAL
        await fresh_or_abort(self.writer, context, (card.card_id,))
        try:
            ledger = self.ledger.of_card(card.card_id)
            found = ledger.read_card(card.card_id)
            reason = L.R_OK if found else L.R_CARD_NOT_FOUND
            packages = ledger.read_packages(card.card_id) if found else []
        finally:
            if card.ksn_counter:  # a terminal's check is answered here, like its GetCard
                self.access.answered(card.terminal_id, reason, inquiry=True)
        self._call_seconds["CheckEntitlement"].observe(time.perf_counter() - started)
        if reason != L.R_OK:
            log_refusal("", reason)
            await abort(context, failure(reason))
        answer = pb.CheckEntitlementResponse()
        category = request.category_code if request.has_category else None
        best = add_card_packages(answer.packages, packages, self.ledger.program,
                                 time.time_ns() // 1000, category)
        answer.entitled, answer.serial = best != 0, best
        return answer

    def _entitlement_card(self, request: pb.CheckEntitlementRequest, caller: Caller):
        return self.operations.swipes.card(
            request.card, request.till if request.HasField("till") else None, caller)

    # ---- inquiries --------------------------------------------------------------

    def _inquiry(self, request: pb.GetCardRequest, caller: Caller) -> tuple:
        """(card, view, PIN inquiry or None): who asks decides what the answer shows. An
        operator may name the card by its id (FindCards, rule 17)."""
        card = self.operations.swipes.card(
            request.card, request.till if request.HasField("till") else None, caller,
            by_id=True)
        if not card.ksn_counter:   # a clear number: an operator in scope, or development mode
            return card, pb.CARD_VIEW_FULL, None
        operator = caller.operator
        terminal = self.access.terminals.get(card.terminal_id)
        if operator is not None and terminal is not None and operator.may(
                ROLE.OPERATOR_ROLE_CASHIER, terminal.store_id):
            return card, pb.CARD_VIEW_FULL, None  # an operator at the till, in scope
        if not request.pin_block:
            return card, pb.CARD_VIEW_STATUS, None
        check = self.operations.swipes.pin_check(card, request.pin_block, "pin_block")
        op = PendingOp.build(b"", L.OP_BALANCE_INQUIRY, card.card_id,
                             store_id=terminal.store_id if terminal else 0,
                             terminal_id=card.terminal_id,
                             pin_flags=L.PIN_PRESENTED | self.operations.dev_pin, pin_check=check,
                             ksn_counter=card.ksn_counter,
                             caller=(L.CALLER_TERMINAL, card.terminal_id))
        return card, pb.CARD_VIEW_BALANCE, op

    async def GetCard(self, request, context):
        started = time.perf_counter()
        card, view, op = await self._parse(self._inquiry, request, context)
        if op is not None:  # the PIN is checked, and a wrong one counted, by the writer
            outcome = (await (await self._submit([op], context)))[0]
            if outcome.reason == L.R_CARD_NOT_ACTIVE or outcome.reason == L.R_CARD_REPLACED:
                view = pb.CARD_VIEW_STATUS
            elif outcome.reason != L.R_OK:
                self._call_seconds["GetCard"].observe(time.perf_counter() - started)
                log_refusal("", outcome.reason)
                await abort(context, outcome_failure(outcome, self._pin_tries_max))
            await fresh_or_abort(self.writer, context, (card.card_id,))
            found = self.ledger.of_card(card.card_id).read_card(card.card_id)
        else:
            found = reason = L.R_INTERNAL  # unless the read answers
            try:
                await fresh_or_abort(self.writer, context, (card.card_id,))
                found = self.ledger.of_card(card.card_id).read_card(card.card_id)
                reason = L.R_OK if found else L.R_CARD_NOT_FOUND
            finally:
                if card.ksn_counter:  # a terminal's inquiry without a PIN is answered here
                    self.access.answered(card.terminal_id, reason, inquiry=True)
        self._call_seconds["GetCard"].observe(time.perf_counter() - started)
        if found is None:
            log_refusal("", L.R_CARD_NOT_FOUND)
            await abort(context, failure(R.REASON_CARD_NOT_FOUND))
        return self._card_view(found, view, card.card_id)

    def _quote_op(self, request: pb.QuoteRequest, caller: Caller) -> tuple:
        """(card, the purchase to dry-run, whether the answer may show balances)."""
        swipes = self.operations.swipes
        lines, amount, redeem = basket(request, explicit=True)
        till = request.till
        card = swipes.card(request.card, till if request.HasField("till") else None, caller)
        op = PendingOp.build(b"", L.OP_PURCHASE, card.card_id, amount, till.store_id,
                             till.terminal_id, till.staff_id, lines=lines, redeem_points=redeem,
                             ref_id=request.coupon_serial, caller=(L.CALLER_NONE, 0))
        # what a GetCard without a PIN shows: balances to an operator or in development only
        return card, op, not card.ksn_counter

    async def Quote(self, request, context):
        started = time.perf_counter()
        card, op, show_balance = await self._parse(self._quote_op, request, context)
        reason = L.R_INTERNAL
        try:
            await fresh_or_abort(self.writer, context, (card.card_id,))
            now_us = time.time_ns() // 1000
            entry, lines, rec = self.ledger.of_card(op.card_id).quote(op, now_us,
                                                                      blind=not show_balance)
            reason = L.JOURNAL.unpack_from(entry)[4]
            answer = quote_response(entry, lines, rec, reason, show_balance,
                                    self.ledger.program.pin_tries_max)
            self._coupon_options(answer, op, now_us)
        finally:
            if card.ksn_counter:  # a terminal's quote is answered here, like its GetCard
                self.access.answered(card.terminal_id, reason, inquiry=True)
        self._call_seconds["Quote"].observe(time.perf_counter() - started)
        return answer

    def _coupon_options(self, answer: pb.QuoteResponse, op: PendingOp, now_us: int) -> None:
        """Each unused coupon of the card valid now, tried on the basket through the kernel (one
        dry run each, with no points offered: the coupon alone); the best takes most off."""
        program = self.ledger.program
        ledger = self.ledger.of_card(op.card_id)
        best = (0, 0)
        for (_, state, coupon_id, _, valid_from, valid_until, serial, *_rest) in \
                ledger.read_coupons(op.card_id):
            if state != L.COUPON_ISSUED or not valid_from <= now_us < valid_until:
                continue
            if len(answer.coupons) == QUOTE_COUPONS_MAX:  # a bound on the dry runs of one call
                break
            trial = dataclasses.replace(op, packed=b"".join((
                op.packed[:_OP_REF_AT], serial.to_bytes(8, "little"),
                op.packed[_OP_REF_AT + 8:L.OP_OFF_PROGRAM + 8], bytes(8),  # no points offered
                op.packed[L.OP_OFF_PROGRAM + 16:])))
            entry, _, _ = ledger.quote(trial, now_us, blind=True)
            reason = L.JOURNAL.unpack_from(entry)[4]
            off = L.JOURNAL_COUPON_OFF.unpack_from(entry, L.JOURNAL_OFF_COUPON)[0] if not reason else 0
            definition = program.coupon(coupon_id)
            answer.coupons.add(serial=serial, coupon_id=coupon_id, reason=reason, off_minor=off,
                               name=definition.name if definition else "")
            if off > best[1]:
                best = (serial, off)
        answer.best_coupon_serial = best[0]

    def _card_view(self, found: tuple, view: int, card_id: bytes) -> pb.Card:
        rec, profile = found
        (_, status, tier, pin_tries, flags, principal, bonus, points, held, lifetime, last_seq,
         opened_us, home_store, *_rest) = rec
        program = self.ledger.program
        ledger = self.ledger.of_card(card_id)
        program_tier = program.tiers[tier] if tier < len(program.tiers) else None
        card = pb.Card(masked_number=profile.get("masked", ""), tier=tier,
                       tier_name=program_tier.name if program_tier else "",
                       discount_rate_bp=program_tier.rate_bp if program_tier else 0,
                       status=status, view=view,
                       expires_at_us=L.CARD_EXPIRES.unpack_from(_rest[-1])[0])  # rule 14
        if status == L.STATUS_REPLACED and view == pb.CARD_VIEW_FULL:  # not to a found card
            card.replaced_by = ledger.read_replacement(card_id)
        if view >= pb.CARD_VIEW_BALANCE:
            card.balance.principal_minor = principal
            card.balance.bonus_minor = bonus
            card.balance.available_minor = available_minor(principal, bonus, held)
            card.balance.held_minor = held
            card.balance.points = points
            card.lifetime_paid_minor = lifetime
            card.last_seq = last_seq
            card.opened_at_us = opened_us
            card.pin_set = bool(flags & L.CARD_PIN_SET)
            card.pin_locked = bool(flags & L.CARD_PIN_LOCKED)
            card.pin_tries = pin_tries
            now_us = time.time_ns() // 1000
            add_card_coupons(card.coupons, ledger.read_coupons(card_id), program, now_us)
            add_card_packages(card.packages, ledger.read_packages(card_id), program, now_us)
            expire_days = program.points_expire_days
            for day, left, _ in ledger.read_lots(card_id):
                card.points_lots.add(
                    earned_on=(EPOCH + datetime.timedelta(days=day)).isoformat(), points=left,
                    expires_at_us=(day + expire_days) * L.DAY_US if expire_days else 0)
            for f in ledger.read_holds(card_id):
                card.holds.add(serial=f[7], amount_minor=f[4], authorized_at_us=f[5],
                               expires_at_us=f[6], store_id=f[3])
        if view == pb.CARD_VIEW_FULL:
            card.profile.name = profile.get("name", "")
            card.profile.phone = profile.get("phone", "")
            card.profile.birthday = profile.get("birthday", "")
            card.profile.home_store_id = home_store
        return card

    def _operation_key(self, request: pb.GetOperationRequest, caller: Caller) -> bytes:
        """The request key asked about: the caller's own namespace, or one it may name (a chain
        admin any; a store manager or above a terminal of a store in scope; development mode
        any). Checked before anything is looked up."""
        if caller.bad_token or (self.access.tls and caller.operator is None
                                and caller.cert_terminal_id is None):
            raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        rid = request_id_bytes(request.request_id)
        own = caller.namespace()
        if not request.HasField("caller"):
            return request_key(*own, rid)
        named = (request.caller.kind, request.caller.id)
        if named[0] not in cpb.CallerKind.values() or named[0] == cpb.CALLER_KIND_UNSPECIFIED:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "caller.kind")
        operator = caller.operator
        terminal = self.access.terminals.get(named[1]) if named[0] == L.CALLER_TERMINAL else None
        if not (named == own or not self.access.tls
                or (operator is not None and operator.role == ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
                or (operator is not None and terminal is not None
                    and operator.may(ROLE.OPERATOR_ROLE_STORE_MANAGER, terminal.store_id))):
            raise Invalid(R.REASON_PERMISSION_DENIED, "caller")
        return request_key(*named, rid)

    async def GetOperation(self, request, context):
        started = time.perf_counter()
        key = await self._parse(self._operation_key, request, context)
        await fresh_or_abort(self.writer, context, keys=(key,))
        outcome = self.ledger.read_operation(key)
        self._call_seconds["GetOperation"].observe(time.perf_counter() - started)
        if outcome is None:
            # Judged like the writer judges it: on the ledger's time (which may lag the wall
            # clock for a moment after a long stop), never earlier than it would.
            pruned_through_us, window_us, ledger_us = self.ledger.read_horizons()
            asked_us = request.client_time_us
            expired = 0 < asked_us and (asked_us <= pruned_through_us
                                        or asked_us < ledger_us - window_us)
            return pb.GetOperationResponse(found=False, state=pb.OPERATION_STATE_EXPIRED if expired
                                           else pb.OPERATION_STATE_NOT_FOUND)
        return pb.GetOperationResponse(
            found=True, result=result_of(request.request_id, outcome, self._pin_tries_max, True),
            state=pb.OPERATION_STATE_APPLIED if outcome.reason == L.R_OK
            else pb.OPERATION_STATE_DECLINED)

    async def SubmitBatch(self, request, context):
        """Applied in order, one result each. A terminal's swipes go to the writer in chunks its
        budget has room for, each answered before the next is admitted. If the writer refuses a
        later chunk (overloaded, stopping), that chunk and the rest are answered with the reason,
        unbuilt (their KSNs unused), beside the results of the chunks applied. Answered as the
        serialized SubmitBatchResponse (add_service passes bytes through): each result written
        once, by batchwire.Results or as result_of's bytes, never parsed again."""
        started = time.perf_counter()
        n = len(request.operations)
        if n > BATCH_OPS_MAX:
            await abort(context, failure(R.REASON_BATCH_TOO_LARGE, "operations"))
        caller = self.access.caller(context)
        deadline = self._deadline(context)
        results: list[bytes | None] = [None] * n
        valid: list[PendingOp] = []
        # per operation in ``valid``: its place in the batch and its request id
        places: list[int] = []
        rids: list[str] = []
        tries_max = self._pin_tries_max
        refused = 0  # the writer's reason once it refused a chunk
        chunks = 0   # chunks the writer took
        counts: dict[tuple[int, int], int] = {}  # (type, reason): operations, for the metrics
        declined: list[tuple[str, int]] = []     # the writer's refusals, for the log

        def reference(request_id: str, outcome: Outcome) -> bytes:
            return result_of(request_id, outcome, tries_max).SerializeToString()

        def answer(i: int, result: pb.OperationResult) -> None:
            """An operation answered here (the writer never saw it): counted, refusals logged."""
            results[i] = result.SerializeToString()
            counts[result.type, result.reason] = counts.get((result.type, result.reason), 0) + 1
            if result.reason:
                log_refusal(result.request_id, result.reason, result.failure.field)

        async def flush() -> None:
            nonlocal refused, chunks
            if not valid:
                return
            ops, at, ids = list(valid), list(places), list(rids)
            valid.clear()  # from here on the writer, or _submit_now's refusal, frees them
            places.clear()
            rids.clear()
            try:
                fut = self._submit_now(ops, deadline)
            except (Overloaded, Stopped) as exc:
                reason = R.REASON_OVERLOADED if isinstance(exc, Overloaded) else R.REASON_UNAVAILABLE
                if not chunks:  # nothing applied yet: refuse the call as a whole
                    await abort(context, failure(reason))
                refused = reason
                outcomes = [Outcome(reason, False, op.packed[0], None, 0) for op in ops]
            else:
                chunks += 1
                outcomes = await fut
            self._results.fill(results, at, ids, outcomes, reference, counts, declined)

        # the plain purchases and top-ups, and the baskets (lines, points, a coupon), built in
        # one C loop; None at the others' places (and no lists at all for a caller they cannot
        # be built for): those go through operations.operation
        in_c = self.operations.money_ops(request.SerializeToString(), caller) if n else None
        if in_c is not None and len(in_c[0]) != n:
            # a safety net, never seen (the C loop reads the records protobuf parses into
            # operations, and steps over the rest): if it read others, none is taken
            log.error("SubmitBatch: the C path read %d operations of %d; not used",
                      len(in_c[0]), n)
            in_c = None
        c_ops, c_rids, built = in_c or ((None,) * n, (), 0)
        operations = request.operations
        try:
            if built == n:  # all built in C: no loop here either
                valid.extend(c_ops)
                places.extend(range(n))
                rids.extend(c_rids)
                n = 0
            for i in range(n):
                op = c_ops[i]
                if op is not None and not refused:
                    valid.append(op)
                    places.append(i)
                    rids.append(c_rids[i])
                    continue
                op = operations[i]
                if refused:
                    kind = op.WhichOneof("op")
                    request_id = getattr(op, kind).request_id if kind else ""
                    op_type = self._builders[kind][0] if kind else 0
                    answer(i, result_of(request_id, Outcome(refused, False, op_type, None, 0)))
                    continue
                request_id, op_type, parsed = self.operations.operation(op, caller)
                while isinstance(parsed, Invalid) and parsed.busy_terminal:
                    if valid:
                        await flush()
                    elif not await self._room(parsed, deadline):
                        break
                    if refused:
                        break
                    request_id, op_type, parsed = self.operations.operation(op, caller)
                if refused and not isinstance(parsed, PendingOp):
                    answer(i, result_of(request_id, Outcome(refused, False, op_type, None, 0)))
                elif isinstance(parsed, Invalid):
                    answer(i, _failed_result(request_id, op_type, parsed))
                else:
                    valid.append(parsed)
                    places.append(i)
                    rids.append(request_id)
            await flush()
        except BaseException:
            self._release(valid, [Outcome(L.R_INTERNAL, False, 0, None, 0)] * len(valid))
            raise
        for (op_type, reason), count in counts.items():
            self.metrics.count(op_type, reason, count)
        for request_id, reason in declined:
            log_refusal(request_id, reason)
        self._call_seconds["SubmitBatch"].observe(time.perf_counter() - started)
        return batchwire.frame(results, _BATCH_RESULTS)

    async def SwipeStream(self, request_iterator, context):
        """One reply per request, in order; requests are pipelined up to STREAM_IN_FLIGHT_MAX
        (and, for a terminal, up to its budget's room for unanswered swipes: beyond it the
        stream reads on once a reply is out)."""
        # Unbounded queue, bounded by the semaphore: the reader can always post its end
        # marker without waiting, so a cancelled stream leaves no task behind.
        in_flight: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT_MAX)
        answered = asyncio.Event()
        waiting = 0  # submitted, reply not yet out
        done = object()
        caller = self.access.caller(context)  # the operator is looked up again per operation
        tries_max = self._pin_tries_max

        async def read() -> None:
            nonlocal waiting
            try:
                async for op in request_iterator:
                    await slots.acquire()
                    request_id, op_type, parsed = self.operations.operation(op, self.access.current(caller))
                    while isinstance(parsed, Invalid) and parsed.busy_terminal:
                        if waiting:  # room comes as this stream's replies go out
                            answered.clear()
                            await answered.wait()
                        elif not await self._room(parsed, self._deadline(context)):
                            break
                        request_id, op_type, parsed = self.operations.operation(op, self.access.current(caller))
                    if isinstance(parsed, Invalid):
                        in_flight.put_nowait(_failed_result(request_id, op_type, parsed))
                        continue
                    try:
                        fut = self._submit_now([parsed], self._deadline(context))
                    except (Overloaded, Stopped) as exc:
                        reason = R.REASON_OVERLOADED if isinstance(exc, Overloaded) else R.REASON_UNAVAILABLE
                        in_flight.put_nowait(result_of(request_id, Outcome(reason, False, op_type, None, 0)))
                        continue
                    waiting += 1
                    in_flight.put_nowait((request_id, fut))
            finally:
                in_flight.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await in_flight.get()
                if item is done:
                    break
                if isinstance(item, tuple):
                    request_id, fut = item
                    item = result_of(request_id, (await fut)[0], tries_max)
                    waiting -= 1
                    answered.set()
                slots.release()
                self.metrics.count(item.type, item.reason)
                if item.reason:
                    log_refusal(item.request_id, item.reason, item.failure.field)
                yield item
            await reader  # surfaces a reading error, if any
        finally:
            reader.cancel()
