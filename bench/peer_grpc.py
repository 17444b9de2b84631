"""The fair peer: cardcore's own CardService contract served by a thin grpc.aio servicer over PostgreSQL.

    .venv/bin/python bench/peer_grpc.py --dsn postgresql://postgres@127.0.0.1:55432/postgres
                                        [--listen 127.0.0.1:0] [--pool-size 64]

What a team would put in front of tills if the member ledger lived in PostgreSQL: the same
`cardcore.v1.CardService` proto on the same grpc.aio server options as cardcore, each purchase one
call of the PL/pgSQL ``purchase()`` that bench/peer.py installs (one round trip, one transaction,
committed with ``synchronous_commit = on`` before the answer), each SubmitBatch one call of
``purchase_batch()`` (one round trip and one transaction per batch), through an asyncpg pool of
``--pool-size`` connections opened and warmed before the listen line is printed. Answers are real:
the balance after, the discount and points, replays, and the same declines with the same
machine-readable reasons (server/errors.py: a unary decline is a status with ErrorInfo and Failure,
a batch or stream decline an OperationResult with its failure), so a client cannot tell the two
apart by shape. It prints cardcore's listen line, so bench/e2e.Proc starts it like a server.

What it does not do, by design (this is a yardstick, not a second product): plain purchases by
card number only (PIN, DUKPT card data, lines, points, coupons, partial payment and every other RPC
and operation are refused or unimplemented), no tokens, no request-age window, no metrics. Two
pipelined swipes of one stream run on two pool connections at once, so on the same card they may
commit in either order (each is atomic; replies still come in request order).
"""
from __future__ import annotations

import argparse
import asyncio

import asyncpg
import grpc

from cardcore.cards import number_ok
from cardcore.rules import available_minor
from cardcore.server.app import SERVER_OPTIONS
from cardcore.server.cmd_server import EVENT_LOOP_DEFAULT, EVENT_LOOPS, event_loop_factory
from cardcore.server.errors import CODE_NUMBER, abort, failure
from cardcore.server.operations import REQUEST_ID_RE
from cardcore.server.service import BATCH_OPS_MAX, STREAM_IN_FLIGHT_MAX
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb

R = cpb.Reason
PURCHASE_SQL = "SELECT * FROM purchase($1, $2, $3, $4, $5, $6)"
BATCH_SQL = "SELECT * FROM purchase_batch($1, $2, $3, $4, $5, $6)"
PENDING_OPS_MAX = 16_384  # purchases accepted and not yet answered, over all calls: then OVERLOADED
# PurchaseRequest fields the peer does not implement: a request that sets one is refused, not
# half-served (cardcore applies them; answering as if they were absent would be a wrong answer)
UNSUPPORTED = ("pin_block", "lines", "redeem_points", "coupon_serial", "allow_partial", "basket_id")


class Refused(Exception):
    """A purchase refused before it reached PostgreSQL: nothing was changed."""

    def __init__(self, reason: int, field: str = ""):
        super().__init__(field)
        self.reason, self.field = reason, field


def args_of(req: pb.PurchaseRequest) -> tuple:
    """The SQL arguments of a purchase, or Refused: the checks cardcore's service makes first."""
    if not REQUEST_ID_RE.fullmatch(req.request_id):
        raise Refused(R.REASON_INVALID_REQUEST_ID, "request_id")
    if req.card.WhichOneof("ref") != "card_number":
        raise Refused(R.REASON_INVALID_ARGUMENT, "card")  # no DUKPT, no card ids in the peer
    if not number_ok(req.card.card_number, require_luhn=True):
        raise Refused(R.REASON_INVALID_CARD_NUMBER, "card")
    if req.gross_amount_minor <= 0:
        raise Refused(R.REASON_INVALID_AMOUNT, "gross_amount_minor")
    if req.client_time_us <= 0:
        raise Refused(R.REASON_INVALID_ARGUMENT, "client_time_us")
    for field in UNSUPPORTED:
        if getattr(req, field):
            raise Refused(R.REASON_INVALID_ARGUMENT, field)
    till = req.till
    return (req.request_id, req.card.card_number, req.gross_amount_minor, till.store_id,
            till.terminal_id, till.staff_id)


def declined(request_id: str, reason: int, field: str = "", available: int = 0,
             replayed: bool = False) -> pb.OperationResult:
    return pb.OperationResult(request_id=request_id, reason=reason, status_code=CODE_NUMBER[reason],
                              replayed=replayed, type=cpb.OPERATION_TYPE_PURCHASE,
                              failure=failure(reason, field, available_minor=available))


def result_of(request_id: str, row) -> pb.OperationResult:
    """The OperationResult of one row of purchase() or purchase_batch(), as cardcore shapes it."""
    reason = row["reason"]
    if reason != R.REASON_OK:
        available = (available_minor(row["principal_after"], row["bonus_after"], 0)
                     if reason == R.REASON_INSUFFICIENT_FUNDS else 0)
        return declined(request_id, reason, available=available, replayed=row["replayed"])
    dp, db = row["principal_delta_minor"], row["bonus_delta_minor"]
    result = pb.OperationResult(
        request_id=request_id, replayed=row["replayed"], seq=row["seq"],
        type=cpb.OPERATION_TYPE_PURCHASE, amount_minor=row["amount_minor"],
        discount_minor=row["discount_minor"], paid_minor=-(dp + db), points_earned=row["points_earned"],
        applied_at_us=row["applied_at_us"], principal_delta_minor=dp, bonus_delta_minor=db,
        tier=row["tier"], tier_after=row["tier"])
    balance = result.balance_after
    balance.principal_minor = row["principal_after"]
    balance.bonus_minor = row["bonus_after"]
    balance.available_minor = available_minor(row["principal_after"], row["bonus_after"], 0)
    balance.points = row["points_after"]
    return result


def not_a_purchase(op: pb.Operation) -> pb.OperationResult:
    """A batch or stream operation other than a purchase: the peer implements only that one."""
    kind = op.WhichOneof("op")
    return declined(getattr(op, kind).request_id if kind else "", R.REASON_INVALID_ARGUMENT, "op")


def failed_call(request_id: str, exc: Exception) -> pb.OperationResult:
    """A purchase whose call to PostgreSQL failed: an error raised inside the function rolled its
    transaction back (not applied); a connection lost on the way leaves it unknown."""
    if isinstance(exc, asyncpg.PostgresError):
        return declined(request_id, R.REASON_INTERNAL)
    return declined(request_id, R.REASON_OUTCOME_UNKNOWN)


class Peer(pb_grpc.CardServiceServicer):
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        self.pending_ops = 0

    def _admit(self, n: int) -> bool:
        if self.pending_ops + n > PENDING_OPS_MAX:
            return False
        self.pending_ops += n
        return True

    async def _purchase(self, req: pb.PurchaseRequest) -> pb.OperationResult:
        """One purchase: refused here, or one call of purchase() on a pooled connection."""
        try:
            args = args_of(req)
        except Refused as exc:
            return declined(req.request_id, exc.reason, exc.field)
        if not self._admit(1):
            return declined(req.request_id, R.REASON_OVERLOADED)
        try:
            row = await self.pool.fetchrow(PURCHASE_SQL, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            return failed_call(req.request_id, exc)
        finally:
            self.pending_ops -= 1
        return result_of(req.request_id, row)

    async def Purchase(self, request, context):
        result = await self._purchase(request)
        if result.reason != R.REASON_OK:
            await abort(context, result.failure)
        return result

    async def SubmitBatch(self, request, context):
        """Applied in order, one result each; the purchases that pass the checks go to PostgreSQL in
        one call of purchase_batch(), one transaction."""
        n = len(request.operations)
        if n > BATCH_OPS_MAX:
            await abort(context, failure(R.REASON_BATCH_TOO_LARGE, "operations"))
        results: list[pb.OperationResult | None] = [None] * n
        places, columns = [], ([], [], [], [], [], [])
        for i, op in enumerate(request.operations):
            if op.WhichOneof("op") != "purchase":
                results[i] = not_a_purchase(op)
                continue
            try:
                args = args_of(op.purchase)
            except Refused as exc:
                results[i] = declined(op.purchase.request_id, exc.reason, exc.field)
                continue
            places.append(i)
            for column, value in zip(columns, args):
                column.append(value)
        if places:
            if not self._admit(len(places)):
                await abort(context, failure(R.REASON_OVERLOADED))
            try:
                rows = await self.pool.fetch(BATCH_SQL, *columns)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                rows = [failed_call(request_id, exc) for request_id in columns[0]]
            finally:
                self.pending_ops -= len(places)
            assert len(rows) == len(places), "purchase_batch answers each purchase once"
            for i, request_id, row in zip(places, columns[0], rows):
                results[i] = row if isinstance(row, pb.OperationResult) else result_of(request_id, row)
        return pb.SubmitBatchResponse(results=results)

    async def SwipeStream(self, request_iterator, context):
        """One reply per request, in order; up to STREAM_IN_FLIGHT_MAX purchases of a stream in flight
        at once (each on its own pooled connection), as cardcore pipelines a stream."""
        in_flight: asyncio.Queue = asyncio.Queue()  # bounded by the semaphore
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT_MAX)
        done = object()

        async def read() -> None:
            try:
                async for op in request_iterator:
                    await slots.acquire()
                    if op.WhichOneof("op") != "purchase":
                        in_flight.put_nowait(not_a_purchase(op))
                    else:
                        in_flight.put_nowait(asyncio.ensure_future(self._purchase(op.purchase)))
            finally:
                in_flight.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while (item := await in_flight.get()) is not done:
                if isinstance(item, asyncio.Future):
                    item = await item
                slots.release()
                yield item
            await reader  # surfaces a reading error, if any
        finally:
            reader.cancel()
            while not in_flight.empty():  # a cancelled stream: its purchases still finish, unread
                in_flight.get_nowait()


async def warm(conn: asyncpg.Connection) -> None:
    """Prepare both statements on every pooled connection before serving (cardcore's start-up is
    not measured either): a zero amount and an empty batch change nothing."""
    await conn.fetchrow(PURCHASE_SQL, "warm-up", "0", 0, 0, 0, 0)
    await conn.fetch(BATCH_SQL, [], [], [], [], [], [])


async def keep(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to undo, as the servicer sets no session state (no SET,
    LISTEN, advisory lock or open transaction: purchase() commits on its own). asyncpg's default
    would send its reset query, a second round trip per purchase, on the answer's path."""


async def serve(dsn: str, listen: str, pool_size: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size, init=warm, reset=keep,
                                     max_queries=2**62, max_inactive_connection_lifetime=0,
                                     command_timeout=60)  # one pool for the process's life, no churn
    server = grpc.aio.server(options=SERVER_OPTIONS)  # cardcore's own
    pb_grpc.add_CardServiceServicer_to_server(Peer(pool), server)
    port = server.add_insecure_port(listen)
    await server.start()
    # cardcore's listen line, so that bench/e2e.Proc starts the peer as it starts a server
    print(f"cardcore listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="the PostgreSQL database bench/peer.py set up")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: a free one)")
    parser.add_argument("--pool-size", type=int, default=64,
                        help="PostgreSQL connections, opened at start (default 64: the most unary "
                             "calls the bench has in flight)")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOP_DEFAULT,
                        help="as cardcore serve's (default %(default)s: the same loop as it)")
    args = parser.parse_args()
    if not 1 <= args.pool_size <= 180:  # the bench's cluster runs max_connections = 200
        parser.error("--pool-size must be 1 to 180")
    with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
        runner.run(serve(args.dsn, args.listen, args.pool_size))


if __name__ == "__main__":
    main()
