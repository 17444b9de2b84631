"""A full disk: clean refusals, reads go on, nothing half-applied, and recovery once space returns.

The writer process gets a file-size limit (RLIMIT_FSIZE, set from outside with prlimit) just
above the ledger's current size: LMDB's page writes then fail as they would on a full disk (at a
checkpoint: the group log has taken every group answered, cardcore.durable).
"""
import os
import resource

import grpc
import pytest

from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, checkpointed, failure_of, new_card_number, verify, sent_at
from test_service import writer_pid

R = cpb.Reason


def opens(prefix: str, n: int) -> pb.SubmitBatchRequest:
    return pb.SubmitBatchRequest(operations=[
        pb.Operation(open_card=pb.OpenCardRequest(client_time_us=sent_at(f"{prefix}-{i}"), 
            request_id=f"{prefix}-{i}", card=cpb.CardRef(card_number=new_card_number()),
            profile=pb.MemberProfile(name="n" * 60)))
        for i in range(n)])


def test_a_full_disk_refuses_cleanly_and_recovers_when_space_returns(start_server):
    server = start_server()
    c = Client(server.stub)
    number = c.funded_card(1_000)
    checkpointed(server.data_dir)  # in LMDB before the disk fills: read from it throughout
    data_file = os.path.join(server.data_dir, "ledger", "data.mdb")
    writer = writer_pid(server)
    limit = os.path.getsize(data_file) + 64 * 1024
    hard = resource.prlimit(writer, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(writer, resource.RLIMIT_FSIZE, (limit, hard))  # soft only: it can be raised again

    refused = last_acknowledged = None
    acknowledged = []
    for k in range(40):  # grow the ledger until the "disk" is full
        batch = opens(f"fill-{k}", 200)
        results = server.stub.SubmitBatch(batch).results
        if results[0].reason == R.REASON_STORAGE_UNAVAILABLE:
            refused = batch
            assert all(r.reason == R.REASON_STORAGE_UNAVAILABLE for r in results)  # nothing half-applied
            assert results[0].status_code == 14  # UNAVAILABLE
            break
        assert all(r.reason == R.REASON_OK for r in results)
        acknowledged += [r.request_id for r in results]
        last_acknowledged = batch
    assert refused is not None, "the limit was never reached"
    assert "could not be written" in server.log()

    # Reads and health go on; the server did not stop.
    assert c.card(number).balance.available_minor == 1_000
    assert server.proc.poll() is None
    # The batch answered just before: in the log, not yet in LMDB (its checkpoint is what
    # failed): a read of it is refused, never answered from the older state.
    opened = last_acknowledged.operations[0].open_card.card.card_number
    with pytest.raises(grpc.RpcError) as err:
        c.card(opened)
    assert failure_of(err.value).reason == R.REASON_STORAGE_UNAVAILABLE
    for request in refused.operations[:5]:
        assert not server.stub.GetOperation(pb.GetOperationRequest(
            request_id=request.open_card.request_id)).found

    # Space returns: the same requests, retried with the same ids, are applied.
    resource.prlimit(writer, resource.RLIMIT_FSIZE, (hard, hard))
    results = server.stub.SubmitBatch(refused).results
    assert all(r.reason == R.REASON_OK and not r.replayed for r in results)
    assert c.top_up(number, 1).balance_after.principal_minor == 1_001
    assert c.card(opened).status == cpb.CARD_STATUS_ACTIVE
    for request_id in acknowledged[::97]:
        assert server.stub.GetOperation(pb.GetOperationRequest(request_id=request_id)).found
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]
    assert report["cards"] == 1 + len(acknowledged) + len(refused.operations)
