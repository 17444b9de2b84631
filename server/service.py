"""The gRPC servicer: validate, translate protobuf <-> ledger operations, hand to the writer.

Thin on purpose: limits are checked here, where data enters; the arithmetic
is the kernel's and the storage the ledger's.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import struct
import time

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from cardcore import cards
from cardcore import layout as L
from cardcore.ext import cardno
from cardcore.ledger import Ledger, Outcome, PendingOp
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb

from .reasons import CODE_NUMBER, TABLE

log = logging.getLogger("cardcore.service")
from .writer import Overloaded, Stopped, Writer

R = cpb.Reason
DOMAIN = "cardcore.v1"
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
PHONE_RE = re.compile(r"[0-9+\- ]{0,20}")
BIRTHDAY_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
NAME_LEN_MAX = 64
BATCH_OPS_MAX = 10_000
STREAM_IN_FLIGHT_MAX = 256  # pipelined requests per SwipeStream before reading pauses


class Invalid(Exception):
    """Bad input: answered with INVALID_ARGUMENT (or its reason's code), nothing changed."""

    def __init__(self, reason: int, field: str):
        super().__init__(field)
        self.reason = reason
        self.field = field


def failure(reason: int, field: str = "", available_minor: int = 0) -> cpb.Failure:
    return cpb.Failure(reason=reason, message=TABLE[reason][1], field=field,
                       available_minor=available_minor)


def _status_details(fail: cpb.Failure) -> tuple[tuple[str, bytes]]:
    """Trailing metadata carrying google.rpc.Status with ErrorInfo and Failure details."""
    info = error_details_pb2.ErrorInfo(reason=R.Name(fail.reason), domain=DOMAIN)
    if fail.field:
        info.metadata["field"] = fail.field
    if fail.reason == R.REASON_INSUFFICIENT_FUNDS:
        info.metadata["available_minor"] = str(fail.available_minor)
    status = status_pb2.Status(code=CODE_NUMBER[fail.reason], message=fail.message)
    for detail in (info, fail):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, fail: cpb.Failure):
    await context.abort(TABLE[fail.reason][0], fail.message, _status_details(fail))


# The journal entry fields a reply shows: op, seq, amount, discount, the three deltas, the
# three after-balances, ts_us (see layout.JOURNAL).
_REPLY_FIELDS = struct.Struct("<xBxxxxxxQ16xqqqqqqqqq")
assert _REPLY_FIELDS.size == 104


def result_of(request_id: str, outcome: Outcome) -> pb.OperationResult:
    """The OperationResult for an outcome: the same shape for unary, batch and stream."""
    reason = outcome.reason
    if reason == L.R_OK:  # a plain int: protobuf's enum wrapper attribute costs ~0.3 µs
        op, seq, amount, discount, dp, db_, dpts, pa, ba, ptsa, ts_us = _REPLY_FIELDS.unpack_from(
            outcome.entry)
        result = pb.OperationResult(
            request_id=request_id, replayed=outcome.replayed, seq=seq, type=op,
            amount_minor=amount, discount_minor=discount,
            paid_minor=-(dp + db_) if op == L.OP_PURCHASE else 0,
            points_earned=dpts, applied_at_us=ts_us)
        balance = result.balance_after  # set in place: building a Balance and copying it costs 2x
        balance.principal_minor = pa
        balance.bonus_minor = ba
        balance.available_minor = pa + ba
        balance.points = ptsa
        return result
    return pb.OperationResult(
        request_id=request_id, reason=reason, status_code=CODE_NUMBER[reason],
        replayed=outcome.replayed, type=outcome.op,
        failure=failure(reason, available_minor=outcome.available_minor))


def _failed_result(request_id: str, op_type: int, exc: Invalid) -> pb.OperationResult:
    return pb.OperationResult(request_id=request_id, reason=exc.reason,
                              status_code=CODE_NUMBER[exc.reason], type=op_type,
                              failure=failure(exc.reason, exc.field))


class CardService(pb_grpc.CardServiceServicer):
    def __init__(self, ledger: Ledger, writer: Writer, index_key: bytes):
        self.ledger = ledger
        self.writer = writer
        self.metrics = writer.metrics
        self._call_seconds = {rpc: self.metrics.call_seconds.labels(rpc) for rpc in (
            "OpenCard", "TopUp", "Purchase", "GetCard", "GetOperation", "SubmitBatch", "SwipeStream")}
        self._index = cards.CardIndex(index_key)
        self._tier_count = len(ledger.program.tiers)
        self._require_luhn = ledger.program.require_luhn
        self._builders = {"open_card": (L.OP_OPEN, self._open_op),
                          "top_up": (L.OP_TOP_UP, self._top_up_op),
                          "purchase": (L.OP_PURCHASE, self._purchase_op)}

    # ---- validation: request -> PendingOp ------------------------------------

    def _request_key(self, request_id: str) -> bytes:
        if not REQUEST_ID_RE.fullmatch(request_id):
            raise Invalid(R.REASON_INVALID_REQUEST_ID, "request_id")
        return request_id.encode("ascii")

    def _card_id(self, ref: cpb.CardRef) -> bytes:
        number = ref.card_number
        if not cardno.number_ok(number, self._require_luhn):
            raise Invalid(R.REASON_INVALID_CARD_NUMBER, "card.card_number")
        return self._index.card_id(number)

    @staticmethod
    def _amount(value: int, field: str) -> int:
        if value <= 0:
            raise Invalid(R.REASON_INVALID_AMOUNT, field)
        return value

    def _open_op(self, req: pb.OpenCardRequest) -> PendingOp:
        key = self._request_key(req.request_id)
        card_id = self._card_id(req.card)
        if req.tier >= self._tier_count:
            raise Invalid(R.REASON_INVALID_TIER, "tier")
        p = req.profile
        if len(p.name) > NAME_LEN_MAX:
            raise Invalid(R.REASON_FIELD_TOO_LONG, "profile.name")
        if not p.name.isprintable():
            raise Invalid(R.REASON_INVALID_ARGUMENT, "profile.name")
        if len(p.phone) > 20:
            raise Invalid(R.REASON_FIELD_TOO_LONG, "profile.phone")
        if not PHONE_RE.fullmatch(p.phone):
            raise Invalid(R.REASON_INVALID_ARGUMENT, "profile.phone")
        if p.birthday:
            try:
                if not BIRTHDAY_RE.fullmatch(p.birthday):
                    raise ValueError
                datetime.date.fromisoformat(p.birthday)
            except ValueError:
                raise Invalid(R.REASON_INVALID_ARGUMENT, "profile.birthday") from None
        profile = json.dumps({"masked": cards.mask(req.card.card_number), "name": p.name,
                              "phone": p.phone, "birthday": p.birthday,
                              "home_store_id": p.home_store_id},
                             sort_keys=True, separators=(",", ":")).encode()
        t = req.till
        return PendingOp.build(key, L.OP_OPEN, card_id, 0, t.store_id, t.terminal_id,
                               t.staff_id, tier=req.tier, home_store_id=p.home_store_id,
                               profile=profile)

    def _money_op(self, req, op_type: int, amount_field: str) -> PendingOp:
        key = self._request_key(req.request_id)
        card_id = self._card_id(req.card)
        amount = self._amount(getattr(req, amount_field), amount_field)
        t = req.till
        return PendingOp.build(key, op_type, card_id, amount, t.store_id, t.terminal_id,
                               t.staff_id)

    def _top_up_op(self, req: pb.TopUpRequest) -> PendingOp:
        return self._money_op(req, L.OP_TOP_UP, "amount_minor")

    def _purchase_op(self, req: pb.PurchaseRequest) -> PendingOp:
        return self._money_op(req, L.OP_PURCHASE, "gross_amount_minor")

    def _operation(self, op: pb.Operation) -> tuple[str, int, PendingOp | Invalid]:
        """(request_id, op type, PendingOp or the Invalid that refused it) of a batch/stream item."""
        kind = op.WhichOneof("op")
        if kind is None:
            return "", 0, Invalid(R.REASON_INVALID_ARGUMENT, "op")
        op_type, build = self._builders[kind]
        request = getattr(op, kind)
        try:
            return request.request_id, op_type, build(request)
        except Invalid as exc:
            return request.request_id, op_type, exc

    # ---- submitting ------------------------------------------------------------

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _submit(self, ops: list[PendingOp], context) -> asyncio.Future:
        """Queue ops for the writer, or end the call with OVERLOADED / UNAVAILABLE."""
        try:
            return self.writer.submit(ops, self._deadline(context))
        except Overloaded:
            await abort(context, failure(R.REASON_OVERLOADED))
        except Stopped:
            await abort(context, failure(R.REASON_UNAVAILABLE))

    @staticmethod
    async def _parse(fn, arg, context):
        """``fn(arg)``, or end the call with the status of the Invalid it raised."""
        try:
            return fn(arg)
        except Invalid as exc:
            request_id = getattr(arg, "request_id", "")
            log.debug("refused %s", exc.field, extra={"request_id": request_id[:64],
                                                      "reason": R.Name(exc.reason)})
            await abort(context, failure(exc.reason, exc.field))

    async def _unary(self, rpc: str, build, request, context) -> pb.OperationResult:
        started = time.perf_counter()
        op = await self._parse(build, request, context)
        outcome = (await (await self._submit([op], context)))[0]
        self.metrics.count(outcome.op, outcome.reason)
        self._call_seconds[rpc].observe(time.perf_counter() - started)
        if outcome.reason != L.R_OK:
            await abort(context, failure(outcome.reason, available_minor=outcome.available_minor))
        return result_of(request.request_id, outcome)

    # ---- RPCs ------------------------------------------------------------------

    async def OpenCard(self, request, context):
        return await self._unary("OpenCard", self._open_op, request, context)

    async def TopUp(self, request, context):
        return await self._unary("TopUp", self._top_up_op, request, context)

    async def Purchase(self, request, context):
        return await self._unary("Purchase", self._purchase_op, request, context)

    async def GetCard(self, request, context):
        started = time.perf_counter()
        card_id = await self._parse(self._card_id, request.card, context)
        found = self.ledger.read_card(card_id)
        self._call_seconds["GetCard"].observe(time.perf_counter() - started)
        if found is None:
            await abort(context, failure(R.REASON_CARD_NOT_FOUND))
        rec, profile = found
        (_, status, tier, _, _, principal, bonus, points, held, lifetime, last_seq, opened_us,
         home_store, *_rest) = rec
        program_tier = self.ledger.program.tiers[tier] if tier < self._tier_count else None
        return pb.Card(
            masked_number=profile.get("masked", ""), tier=tier,
            tier_name=program_tier.name if program_tier else "",
            discount_rate_bp=program_tier.rate_bp if program_tier else 0,
            status=status,
            balance=cpb.Balance(principal_minor=principal, bonus_minor=bonus,
                                available_minor=principal + bonus - held, points=points),
            lifetime_paid_minor=lifetime, last_seq=last_seq, opened_at_us=opened_us,
            profile=pb.MemberProfile(name=profile.get("name", ""), phone=profile.get("phone", ""),
                                     birthday=profile.get("birthday", ""),
                                     home_store_id=home_store))

    async def GetOperation(self, request, context):
        started = time.perf_counter()
        key = await self._parse(self._request_key, request.request_id, context)
        outcome = self.ledger.read_operation(key)
        self._call_seconds["GetOperation"].observe(time.perf_counter() - started)
        if outcome is None:
            return pb.GetOperationResponse(found=False)
        return pb.GetOperationResponse(found=True, result=result_of(request.request_id, outcome))

    async def SubmitBatch(self, request, context):
        started = time.perf_counter()
        n = len(request.operations)
        if n > BATCH_OPS_MAX:
            await abort(context, failure(R.REASON_BATCH_TOO_LARGE, "operations"))
        results: list[pb.OperationResult | None] = [None] * n
        valid: list[PendingOp] = []
        where: list[tuple[int, str]] = []
        for i, op in enumerate(request.operations):
            request_id, op_type, parsed = self._operation(op)
            if isinstance(parsed, Invalid):
                results[i] = _failed_result(request_id, op_type, parsed)
            else:
                valid.append(parsed)
                where.append((i, request_id))
        if valid:
            fut = await self._submit(valid, context)
            for (i, request_id), outcome in zip(where, await fut, strict=True):
                results[i] = result_of(request_id, outcome)
        self.metrics.count_many((r.type, r.reason) for r in results)
        self._call_seconds["SubmitBatch"].observe(time.perf_counter() - started)
        return pb.SubmitBatchResponse(results=results)

    async def SwipeStream(self, request_iterator, context):
        """One reply per request, in order; requests are pipelined up to STREAM_IN_FLIGHT_MAX."""
        # Unbounded queue, bounded by the semaphore: the reader can always post its end
        # marker without waiting, so a cancelled stream leaves no task behind.
        in_flight: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT_MAX)
        done = object()

        async def read() -> None:
            try:
                async for op in request_iterator:
                    await slots.acquire()
                    request_id, op_type, parsed = self._operation(op)
                    if isinstance(parsed, Invalid):
                        in_flight.put_nowait(_failed_result(request_id, op_type, parsed))
                        continue
                    try:
                        fut = self.writer.submit([parsed], self._deadline(context))
                    except (Overloaded, Stopped) as exc:
                        reason = R.REASON_OVERLOADED if isinstance(exc, Overloaded) else R.REASON_UNAVAILABLE
                        in_flight.put_nowait(result_of(request_id, Outcome(reason, False, op_type, None, 0)))
                        continue
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
                    item = result_of(request_id, (await fut)[0])
                slots.release()
                self.metrics.count(item.type, item.reason)
                yield item
            await reader  # surfaces a reading error, if any
        finally:
            reader.cancel()
