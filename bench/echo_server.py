"""The bare-gRPC yardstick: CardService answered without a ledger.

Same proto, same grpc.aio server options, same event loop (``--event-loop``,
cardcore serve's default unless told), replies of the same shape; the
end-to-end benchmark measures it in the same run as cardcore so the ledger's
cost over bare gRPC shows as a ratio.
"""
from __future__ import annotations

import argparse
import asyncio

import grpc

from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb


def _reply(request_id: str, amount: int) -> pb.OperationResult:
    return pb.OperationResult(request_id=request_id, reason=0, seq=1, type=3, amount_minor=amount,
                              paid_minor=amount, points_earned=amount // 100, applied_at_us=1,
                              balance_after=cpb.Balance(principal_minor=10**9, available_minor=10**9,
                                                        points=5))


class Echo(pb_grpc.CardServiceServicer):
    async def Purchase(self, request, context):
        return _reply(request.request_id, request.gross_amount_minor)

    async def SubmitBatch(self, request, context):
        return pb.SubmitBatchResponse(results=[
            _reply(op.purchase.request_id, op.purchase.gross_amount_minor) for op in request.operations])

    async def SwipeStream(self, request_iterator, context):
        async for op in request_iterator:
            yield _reply(op.purchase.request_id, op.purchase.gross_amount_minor)


async def main(listen: str) -> None:
    from cardcore.server.app import MESSAGE_BYTES_MAX

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                                      ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_CardServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"cardcore listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    from cardcore.server.cmd_server import EVENT_LOOP_DEFAULT, EVENT_LOOPS, event_loop_factory

    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOP_DEFAULT)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
        runner.run(main(args.listen))
