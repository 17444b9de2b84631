"""The group log (cardcore.grouplog) and the ledger made durable by it (cardcore.durable).

Unit level: segments, their end after a torn write, recycling, gaps; a span of groups replayed
after a crash to the same state as the first apply, a log that does not belong to the ledger
refused, a group the log refused leaving nothing. Server level (a long checkpoint interval, so
everything answered lives only in the log): reads see every answer, kill -9 loses nothing, and
`cardcore verify` on a stopped server's folder replays the log first.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cardcore import layout as L
from cardcore.durable import DurableLedger, behind, log_folder
from cardcore.grouplog import (HEADER, LogError, SegmentLog, last_group_no, live_segments,
                               pack_record)
from cardcore.groups import decode_group, encode_group
from cardcore.ledger import InvariantError, Ledger
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, new_card_number, rid, verify
from test_ledger import NOW, op, open_op
from test_service import writer_pid

MIB = 1 << 20
LONG = ("--checkpoint-ms", "3600000", "--checkpoint-ops", "1000000")  # only the log holds them


def kill_both(server) -> None:
    """kill -9 the writer process, then the server (a writer left alone would checkpoint on its
    way out when the server's end of the socket closes)."""
    os.kill(writer_pid(server), signal.SIGKILL)
    server.kill()


def payloads(n: int, size: int, tag: bytes = b"") -> list[bytes]:
    return [tag + bytes([k % 251]) * size for k in range(n)]


def test_records_come_back_in_order_across_segments_and_after_a_reopen(tmp_path):
    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    data = payloads(30, 100_000)  # ~10 per segment
    for k, p in enumerate(data):
        assert log.append(p, k, bytes(16)) == k + 1
    assert [r.payload for r in log.read_from(1)] == data
    assert [r.group_no for r in log.read_from(17)] == list(range(17, 31))
    assert len(live_segments(folder)) >= 3
    log.close()
    assert last_group_no(folder) == 30
    again = SegmentLog(folder, 1, segment_bytes=MIB)
    assert again.next_group_no == 31
    assert [r.payload for r in again.read_from(1)] == data
    assert again.append(b"next", 30, bytes(16)) == 31
    again.close()


def test_a_torn_last_record_ends_the_log_and_is_written_over(tmp_path):
    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    for p in payloads(5, 1000):
        log.append(p, 0, bytes(16))
    log.close()
    path, _, _ = live_segments(folder)[-1]
    last_at = 4 * (HEADER.size + 1001)
    with open(path, "r+b") as f:  # the last record's payload half written
        f.seek(last_at + HEADER.size + 500)
        f.write(b"\xff" * 10)
    reopened = SegmentLog(folder, 1, segment_bytes=MIB)
    assert reopened.next_group_no == 5
    assert [r.group_no for r in reopened.read_from(1)] == [1, 2, 3, 4]
    assert reopened.append(b"fresh", 0, bytes(16)) == 5
    assert [r.payload for r in reopened.read_from(5)] == [b"fresh"]
    reopened.close()


def test_checkpointed_segments_are_recycled_and_reused(tmp_path):
    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    for k, p in enumerate(payloads(100, 200_000)):  # ~5 per segment: ~20 segments written
        log.append(p, k, bytes(16))
        log.truncate_before(k + 2)  # each checkpointed at once
    log.close()
    files = os.listdir(folder)
    assert len(files) <= 2 + 4 + 1, files  # live, spares kept (SPARES_MAX), one in the making
    assert [r.group_no for r in SegmentLog(folder, 100, segment_bytes=MIB).read_from(100)] == [100]


def test_a_log_that_starts_after_the_ledger_needs_is_refused(tmp_path):
    folder = str(tmp_path / "log")
    os.makedirs(folder)
    salt = os.urandom(8)
    with open(os.path.join(folder, f"seg-{5:020d}-{salt.hex()}.log"), "wb") as f:
        f.write(pack_record(5, b"x", salt=salt).ljust(MIB, b"\0"))
    with pytest.raises(LogError, match="groups are missing"):
        SegmentLog(folder, 2, segment_bytes=MIB)


def test_a_damaged_record_with_groups_after_it_is_an_error_not_an_end(tmp_path):
    """Each append is synced before the next: only the very last record can be torn. A damaged
    one before others (in its segment, or with later segments) must not cut the log short."""
    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    for k in range(30):
        log.append(bytes([k]) * 100_000, 0, bytes(16))
    log.close()
    path, _, _ = live_segments(folder)[0]
    with open(path, "r+b") as f:  # one flipped byte in the third record of the first segment
        f.seek(2 * (HEADER.size + 100_000) + HEADER.size + 10)
        f.write(b"\xee")
    with pytest.raises(LogError, match="damaged"):
        SegmentLog(folder, 1, segment_bytes=MIB)
    assert len(live_segments(folder)) >= 3  # nothing was recycled


def test_a_later_segment_after_a_gap_is_an_error(tmp_path):
    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    for k in range(30):
        log.append(bytes([k]) * 100_000, 0, bytes(16))
    log.close()
    os.unlink(live_segments(folder)[1][0])  # the middle segment lost
    with pytest.raises(LogError, match="past the end of the log"):
        SegmentLog(folder, 1, segment_bytes=MIB)


def test_a_segment_whose_first_append_failed_is_replaced_not_kept_twice(tmp_path, monkeypatch):
    """The append that opens a segment fails (nothing of it lands); the group's retry, too
    big for a segment, opens another: one live segment for that number, and a checkpoint
    before it recycles neither."""
    from cardcore import grouplog

    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    for _ in range(9):
        log.append(bytes(100_000), 0, bytes(16))     # groups 1-9 fill the first segment
    real = os.pwrite
    monkeypatch.setattr(grouplog.os, "pwrite", lambda fd, data, off: (_ for _ in ()).throw(
        OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        log.append(bytes(200_000), 0, bytes(16))     # opens segment 10, then the write fails
    monkeypatch.setattr(grouplog.os, "pwrite", real)
    assert log.append(bytes(2 * MIB), 0, bytes(16)) == 10   # too big: a segment of its own
    for _ in range(3):
        log.append(b"x", 0, bytes(16))
    assert [s[1] for s in live_segments(folder)] == [1, 10]  # one live segment for 10
    log.truncate_before(10)
    log.append(b"y", 0, bytes(16))
    log.close()
    assert last_group_no(folder) == 14
    assert [r.group_no for r in SegmentLog(folder, 10, segment_bytes=MIB).read_from(10)] \
        == [10, 11, 12, 13, 14]


def test_stale_bytes_that_look_like_the_next_record_are_not_taken(tmp_path):
    """A recycled segment keeps its old records; one written as if it were the next group (a
    payload crafted to look like a record) lacks the new segment's salt."""
    folder = str(tmp_path / "log")
    log = SegmentLog(folder, 1, segment_bytes=MIB)
    log.append(b"a", 0, bytes(16))
    log.close()
    path, first, _salt = live_segments(folder)[0]
    end = HEADER.size + 1
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(pack_record(2, b"forged", salt=bytes(8)))
    assert SegmentLog(folder, 1, segment_bytes=MIB).next_group_no == 2


def _groups(numbers: list[str]) -> list[bytes]:
    """Groups of card operations: opens, then top-ups and purchases in a few groups."""
    out = [encode_group([open_op(f"o{k}", n, at=NOW) for k, n in enumerate(numbers)], NOW)]
    for g in range(6):
        ops = []
        for k, n in enumerate(numbers):
            ops.append(op(f"t{g}-{k}", L.OP_TOP_UP, n, 1000 + g, at=NOW))
            ops.append(op(f"p{g}-{k}", L.OP_PURCHASE, n, 700 + k, at=NOW))
        out.append(encode_group(ops, NOW + g + 1))
    return out


def test_a_crash_between_checkpoints_replays_the_log_to_the_same_state(tmp_path):
    numbers = [new_card_number() for _ in range(20)]
    groups = _groups(numbers)
    path = str(tmp_path / "ledger")
    Ledger(path).close()
    shutil.copytree(path, str(tmp_path / "reference"))  # one start, two histories to compare
    reference = Ledger(str(tmp_path / "reference"))
    for data in groups:  # committed group by group, no log
        reference.apply_group(*decode_group(data))
    durable = DurableLedger(lambda: Ledger(path), log_folder=log_folder(path),
                            checkpoint_ms=3_600_000, checkpoint_ops=1_000_000)
    for data in groups[:3]:
        outcomes, wants = durable.apply(data)
        assert all(o.reason == L.R_OK for o in outcomes)
    assert durable.checkpoint()  # LMDB holds groups 1-3, the log 4-7 only
    for data in groups[3:]:
        durable.apply(data)
    # the span is open: a reader sees the checkpoint, the log holds the rest
    assert (durable.ledger.log_applied(), last_group_no(log_folder(path))) == (3, len(groups))
    durable.close(checkpoint=False)   # the crash: the span is lost, the log is not
    assert behind(path) == len(groups) - 3
    replayed = DurableLedger(lambda: Ledger(path), log_folder=log_folder(path))
    replayed.close()
    assert behind(path) == 0
    ours, theirs = Ledger(path, readonly=True), reference
    try:
        for name in ("cards", "journal", "requests", "points_lots"):
            assert ours.dump()[name] == theirs.dump()[name], name
    finally:
        ours.close()
        theirs.close()


def test_a_log_replayed_onto_another_ledger_stops_at_the_first_group(tmp_path):
    numbers = [new_card_number() for _ in range(3)]
    path = str(tmp_path / "ledger")
    Ledger(path).close()
    durable = DurableLedger(lambda: Ledger(path), log_folder=log_folder(path),
                            checkpoint_ms=3_600_000)
    for data in _groups(numbers)[:2]:
        durable.apply(data)
    durable.close(checkpoint=False)
    other = str(tmp_path / "other")
    different = Ledger(other)
    different.apply_group([open_op("x", new_card_number(), at=NOW)], NOW)  # a different past
    different.close()
    os.rename(log_folder(path), log_folder(other))
    with pytest.raises(InvariantError, match="do not belong together"):
        DurableLedger(lambda: Ledger(other), log_folder=log_folder(other))


class _RefusingLog(SegmentLog):
    refuse = False
    unreadable = 0  # reads that fail (a replica's stream not answering) before they pass again
    TRANSIENT_ERRORS = (TimeoutError,)  # as a stream's: its reads may time out for a moment

    def append(self, payload, digest_seq, out_digest):
        if self.refuse:
            raise OSError(28, "No space left on device")
        return super().append(payload, digest_seq, out_digest)

    def read_from(self, group_no):
        if self.unreadable:
            self.unreadable -= 1
            raise TimeoutError("the log did not answer")
        return super().read_from(group_no)


def _over_refusing_log(tmp_path) -> tuple[str, "_RefusingLog", DurableLedger]:
    """(the ledger's path, its _RefusingLog, a DurableLedger over both: checkpoints only when
    asked)"""
    path = str(tmp_path / "ledger")
    Ledger(path).close()
    log = _RefusingLog(log_folder(path), 1)
    return path, log, DurableLedger(lambda: Ledger(path), log, checkpoint_ms=3_600_000)


def _top_up_amounts(path: str) -> list[int]:
    """The amounts of the ledger's top-up entries, in journal order."""
    ledger = Ledger(path, readonly=True)
    try:
        return [e[9] for _, v in ledger.dump()["journal"]
                if (e := L.JOURNAL.unpack(v))[1] == L.OP_TOP_UP]
    finally:
        ledger.close()


def test_a_rebuild_the_log_could_not_be_read_for_is_tried_again_by_follow(tmp_path):
    """A refused append, then the log unreadable while the span is rebuilt (a deposed leader's
    stream not answering): the writer stops taking groups (InvariantError), but a follower's
    next follow() rebuilds from the checkpoint and goes on; a rebuild that found a ledger not
    fitting its log is never retried."""
    numbers = [new_card_number() for _ in range(3)]
    groups = _groups(numbers)
    path, log, durable = _over_refusing_log(tmp_path)
    durable.apply(groups[0])
    durable.apply(groups[1])
    log.refuse, log.unreadable = True, 1
    with pytest.raises(InvariantError, match="could not be rebuilt"):
        durable.apply(groups[2])
    assert durable.broken and durable.broken_for_now
    log.refuse = False
    with pytest.raises(InvariantError):
        durable.apply(groups[2])  # the writer's own path does not retry
    assert durable.follow() == 2  # rebuilt: groups 1 and 2 again, from the checkpoint
    assert not durable.broken
    durable.apply(groups[3])
    assert durable.checkpoint()
    durable.close()
    assert sorted(set(_top_up_amounts(path))) == [1000, 1002]  # the refused one (1001) absent

    durable.broken, durable.broken_for_now = "replay ended at another digest", False
    with pytest.raises(InvariantError, match="another digest"):
        durable.follow()


def test_a_rebuild_that_failed_for_anything_but_a_moment_of_the_log_is_not_retried(tmp_path):
    """(found by a review) Only what the log calls transient is tried again: a record that does
    not decode, LMDB trouble or a bug met during a rebuild leaves the span broken for good."""
    numbers = [new_card_number() for _ in range(2)]
    groups = _groups(numbers)
    path, log, durable = _over_refusing_log(tmp_path)
    durable.apply(groups[0])
    log.refuse = True
    log.read_from = lambda group_no: (_ for _ in ()).throw(ValueError("group message cut short"))
    with pytest.raises(InvariantError, match="could not be rebuilt"):
        durable.apply(groups[1])
    assert durable.broken and not durable.broken_for_now
    with pytest.raises(InvariantError, match="cut short"):
        durable.follow()


def test_a_group_the_log_refuses_leaves_nothing_and_the_next_one_goes_on(tmp_path):
    numbers = [new_card_number() for _ in range(4)]
    groups = _groups(numbers)
    path, log, durable = _over_refusing_log(tmp_path)
    durable.apply(groups[0])
    durable.apply(groups[1])
    log.refuse = True
    with pytest.raises(OSError):
        durable.apply(groups[2])
    log.refuse = False
    durable.apply(groups[3])   # in the group's place: as if the refused one never came
    assert durable.checkpoint()
    durable.close()
    amounts = _top_up_amounts(path)
    assert len(amounts) == 2 * len(numbers)  # groups 1 and 3, not 2
    assert sorted(set(amounts)) == [1000, 1002]


# ---- with the server -------------------------------------------------------------------------

def test_every_read_sees_what_was_answered_while_only_the_log_holds_it(start_server):
    server = start_server(*LONG)
    c = Client(server.stub)
    number = c.funded_card(10_000)
    ledger_path = os.path.join(server.data_dir, "ledger")
    request_id = rid()
    c.purchase(number, 1_234, request_id=request_id)
    assert behind(ledger_path) > 0  # answered, and only in the log so far
    card = c.card(number)           # asks for a checkpoint first
    assert card.balance.principal_minor == 10_000 - 1_234
    assert behind(ledger_path) == 0
    c.purchase(number, 66)
    found = server.stub.GetOperation(pb.GetOperationRequest(request_id=rid()))
    assert not found.found  # an unknown request: nothing to wait for
    assert behind(ledger_path) > 0
    page = server.stub.ListTransactions(pb.ListTransactionsRequest(
        card=cpb.CardRef(card_number=number)))
    assert [e.amount_minor for e in page.entries if e.type == cpb.OPERATION_TYPE_PURCHASE] \
        == [66, 1_234]
    c.top_up(number, 5)
    got = server.stub.GetOperation(pb.GetOperationRequest(request_id=request_id))
    assert got.found and got.result.balance_after.principal_minor == 10_000 - 1_234


def test_kill_9_between_checkpoints_loses_nothing_answered(start_server):
    server = start_server(*LONG)
    c = Client(server.stub)
    numbers = [c.funded_card(100_000) for _ in range(5)]
    spent = {n: 0 for n in numbers}
    for k in range(60):
        n = numbers[k % 5]
        c.purchase(n, 10 + k)
        spent[n] += 10 + k
    assert behind(os.path.join(server.data_dir, "ledger")) > 0
    kill_both(server)
    report = verify(server.data_dir)   # replays the log itself: no server on the folder
    assert report["ok"], report["problems"]
    assert report["principal_minor"] == 5 * 100_000 - sum(spent.values())
    again = start_server(*LONG, data_dir=server.data_dir)
    c = Client(again.stub)
    for n in numbers:
        assert c.card(n).balance.principal_minor == 100_000 - spent[n]


def test_a_restart_replays_what_a_kill_left_in_the_log(start_server):
    server = start_server(*LONG)
    c = Client(server.stub)
    number = c.funded_card(1_000)
    for _ in range(7):
        c.purchase(number, 10)
    kill_both(server)
    again = start_server(*LONG, data_dir=server.data_dir)
    assert "replayed" in again.log()
    assert Client(again.stub).card(number).balance.principal_minor == 930


def test_verify_beside_a_running_server_reads_the_last_checkpoint(start_server):
    server = start_server(*LONG)
    c = Client(server.stub)
    c.funded_card(1_000)
    out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "verify", "--data-dir",
                          server.data_dir], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "as of its last checkpoint" in out.stderr


def test_a_barrier_read_during_a_stream_of_purchases_never_shows_an_older_balance(start_server):
    """Purchases streaming on one card while another caller reads it after each answer: every
    read shows at least what the answer before it said."""
    server = start_server(*LONG)
    c = Client(server.stub)
    number = c.funded_card(1_000_000)
    last = 1_000_000
    for k in range(40):
        r = c.purchase(number, 100 + k)
        assert r.balance_after.principal_minor == last - 100 - k
        last = r.balance_after.principal_minor
        assert c.card(number).balance.principal_minor == last


# ---- the server process's half (server.writer.Writer) ------------------------------------------

def _writer_story(tmp_path, story, **kw):
    """Run ``story(writer, card_id)`` against a Writer and its process, with checkpoints an hour
    apart, on a card opened and topped up (answered, in the log only)."""
    import asyncio

    from cardcore.server.writer import Writer
    from test_ledger import cid

    async def main():
        writer = Writer(str(tmp_path / "ledger"), None, asyncio.get_running_loop(),
                        checkpoint_ms=3_600_000, checkpoint_ops=1_000_000, **kw)
        writer.start()
        number = new_card_number()
        await writer.submit([open_op("o1", number)])
        await writer.submit([op("t1", L.OP_TOP_UP, number, 5_000)])
        try:
            return await story(writer, cid(number), number)
        finally:
            if writer._dead is None:
                await writer.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_read_waiting_for_a_checkpoint_is_not_refused_for_a_later_group(tmp_path, in_flight):
    """Another terminal's top-up of the same card answered while a read waits for its
    checkpoint: the read is served (that later group is a later read's concern)."""
    import asyncio

    async def story(writer, card_id, number):
        read = asyncio.ensure_future(writer.fresh((card_id,)))
        await asyncio.sleep(0)
        later = writer.submit([op("t2", L.OP_TOP_UP, number, 100)])
        time.sleep(0.3)  # a busy loop: both answers wait in the socket
        await read
        await later
        return writer.checkpoint_requests

    assert _writer_story(tmp_path, story, groups_in_flight=in_flight) >= 1


def test_a_read_after_the_writer_died_is_refused_not_served_old(tmp_path):
    import asyncio

    from cardcore.server.writer import Stale

    async def story(writer, card_id, number):
        os.kill(writer._proc.pid, signal.SIGKILL)
        for _ in range(100):  # until the loop has seen the socket close
            if writer._dead is not None:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(Stale):
            await writer.fresh((card_id,))
        await writer.fresh((bytes(16),))  # a card nobody touched: nothing to wait for
        return True

    assert _writer_story(tmp_path, story, on_fatal=lambda why: None)
