"""The cluster's first slice (docs/cluster.md): three replicas of one shard over three NATS nodes
on loopback, every process started and stopped by its pid.

- Random groups applied by three replicas leave identical ledgers (`verify` clean, a digest of
  every record equal).
- A leader paused past its lease (SIGSTOP), another takes over, SIGCONT: its append is refused by
  the stream (deposed), it follows, and nothing it acknowledged is missing.
- kill -9 the leader under load: another takes over; the killed one, restarted, catches up from
  its checkpoint; every acknowledged request is applied exactly once on every replica.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from cardcore import layout as L
from cardcore.groups import encode_group
from cardcore.idempotency import PendingOp
from cardcore.keyring import write_index_key
from cardcore.ledger import Ledger
from cardcore.server.replica import SubmitClient
from cardcore.server.devcluster import ReplicaProcess, cluster_available, leader_of
from cluster_fixtures import ledger_digest, nats_monitor
from conftest import Client, ServerProcess, new_card_number, rid, verify
from test_determinism import run_groups
from test_ledger import KEY, NOW, add_operator, cid, enroll, key, op, open_op

pytestmark = pytest.mark.skipif(cluster_available() is not None,
                                reason=cluster_available() or "")

LEASE = ("--lease-ms", "2000", "--idle-maintenance-ms", "0")
SHARD = 0
CAFE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                    "programs", "cafe.toml")


def three(start_replica, *extra: str) -> list[ReplicaProcess]:
    """Three replicas of SHARD (``extra``: their other arguments), once one of them leads."""
    replicas = [start_replica(f"r{k}", SHARD, *LEASE, *extra) for k in range(3)]
    deadline = time.monotonic() + 30
    while not all(r.roles() for r in replicas) or not any("leading" in r.roles()
                                                          for r in replicas):
        assert time.monotonic() < deadline, [r.log()[-2000:] for r in replicas]
        for r in replicas:
            assert r.proc.poll() is None, r.log()[-3000:]
        time.sleep(0.05)
    return replicas


def lease_holder(urls: str, shard: int = SHARD, tls=None) -> int:
    """The pid of the replica that holds ``shard``'s lease now."""
    import json

    from cardcore.jetlog import LEADERS_BUCKET, NatsThread, replica_inbox_prefix

    nt = NatsThread(urls.split(","), "cardcore-test", tls, replica_inbox_prefix(shard))
    try:
        kv = nt.call(nt.js.key_value(LEADERS_BUCKET))
        return json.loads(nt.call(kv.get(f"s{shard}")).value)["pid"]
    finally:
        nt.close()


def stream_end(urls: str, shard: int = SHARD, tls=None) -> int:
    from cardcore.jetlog import NatsThread, replica_inbox_prefix, stream_name

    nt = NatsThread(urls.split(","), "cardcore-test", tls, replica_inbox_prefix(shard))
    try:
        return nt.call(nt.js.stream_info(stream_name(shard))).state.last_seq
    finally:
        nt.close()


def publish_raw(nt, record: bytes, msg_id: str, expected_last: int) -> int:
    """A record put on the shard's stream by hand (a writer this test plays), sent again while
    the stream, just made, has no leader yet; its stream sequence."""
    import nats.errors

    from cardcore.jetlog import log_subject

    deadline = time.monotonic() + 20
    while True:
        try:
            return nt.call(nt.js.publish(log_subject(SHARD), record, headers={
                "Nats-Msg-Id": msg_id, "Nats-Expected-Last-Sequence": str(expected_last)})).seq
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError,
                nats.js.errors.NoStreamResponseError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def stream_leader_node(urls: str, shard: int = SHARD) -> int:
    """The index of the NATS node that leads the shard's stream (nodes are named n0, n1, ...)."""
    from cardcore.jetlog import NatsThread, stream_name

    nt = NatsThread(urls.split(","), "cardcore-test")
    try:
        return int(nt.call(nt.js.stream_info(stream_name(shard))).cluster.leader[1:])
    finally:
        nt.close()


def applied(replica: ReplicaProcess) -> int:
    """The last group a running replica's LMDB holds (its last checkpoint)."""
    ledger = Ledger(os.path.join(replica.data_dir, "ledger"), readonly=True)
    try:
        return ledger.log_applied()
    finally:
        ledger.close()


def converge_and_stop(replicas: list[ReplicaProcess], urls: str, shard: int = SHARD,
                      tls=None) -> int:
    """Wait until every replica's checkpoint holds the whole stream of their shard (nothing
    appends: no load, no idle maintenance), then stop the followers, then the leader; the
    stream's end."""
    end = stream_end(urls, shard, tls)
    deadline = time.monotonic() + 30
    live = replicas
    for r in live:
        assert r.proc.poll() is None, r.log()[-3000:]
    while any(applied(r) != end for r in live):
        assert time.monotonic() < deadline, [(applied(r), end, r.log()[-1500:]) for r in live]
        time.sleep(0.05)
    assert stream_end(urls, shard, tls) == end
    leader = leader_of(live, wait_s=15)
    for r in live:
        if r is not leader:
            assert r.stop() == 0, r.log()[-3000:]
    assert leader.stop() == 0, leader.log()[-3000:]
    return end


def submit(client: SubmitClient, ops: list, shard: int = SHARD) -> list:
    """The outcomes of ``ops``, sent again, the same bytes, while no leader answers (a new
    leader's subscription reaches the other NATS nodes a moment after it says it leads) or the
    outcome is unknown: applied once at most where each has a request key (not a swipe: its
    KSN is spent by a first send that landed; see ``swipe_until_answered``)."""
    deadline = time.monotonic() + 10
    while not isinstance(got := client.submit(shard, ops), list) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(got, list) and len(got) == len(ops), got
    return got


def open_cards(client: SubmitClient, n: int, rng: random.Random, shard: int = SHARD) -> list[str]:
    numbers = [new_card_number(rng) for _ in range(n)]
    got = submit(client, [open_op(rid(), number) for number in numbers], shard)
    assert all(o.reason == L.R_OK for o in got), got
    return numbers


def opened_cards(nats_cluster, n: int, seed: int) -> list[str]:
    """``open_cards`` through a client of its own, closed after."""
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        return open_cards(client, n, random.Random(seed))
    finally:
        client.close()


def identical(replicas: list[ReplicaProcess]) -> str:
    """Every replica's ledger verifies clean and has the same digest of all its records."""
    digests = set()
    for r in replicas:
        digest, report = ledger_digest(r.data_dir)
        assert report["ok"], (r.data_dir, report["problems"])
        digests.add(digest)
    assert len(digests) == 1, digests
    return digests.pop()


def test_three_replicas_applying_the_same_random_groups_end_identical(nats_cluster,
                                                                      start_replica):
    replicas = three(start_replica)
    rng = random.Random(1301)
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        numbers = open_cards(client, 12, rng)
        sent: list = []
        declined = 0
        for _ in range(40):
            ops = []
            for _ in range(rng.randint(1, 40)):
                number = rng.choice(numbers)
                roll = rng.random()
                if roll < 0.45:
                    ops.append(op(rid(), L.OP_TOP_UP, number, rng.randint(1, 50_000)))
                elif roll < 0.9:  # some decline: more than the card holds
                    ops.append(op(rid(), L.OP_PURCHASE, number, rng.randint(1, 80_000)))
                elif sent:        # a retry of an earlier request: replayed
                    ops.append(rng.choice(sent))
            if not ops:
                continue
            got = submit(client, ops)
            declined += sum(o.reason == L.R_INSUFFICIENT_FUNDS for o in got)
            sent += ops
        assert declined > 0  # the groups were not all alike
    finally:
        client.close()
    end = converge_and_stop(replicas, nats_cluster.urls)
    assert end >= 42  # the barrier, the openings, the 40 groups
    identical(replicas)


def test_every_kind_of_operation_through_a_running_shard_leaves_identical_replicas(
        nats_cluster, start_replica, tmp_path):
    """test_determinism's run, group by group through a shard of three replicas holding the
    tests' index key: openings and an import with sealed profiles, a purchase with lines, a
    refund, a reversal, holds captured and voided, two replacements (one re-sealed by the
    writer), operators, terminals, a region and a store, a program load, the request window, a
    close of day, a data key rotation and its re-seal, a floor. Every operation applies, and the
    three ledgers verify clean with one digest of every record. (The hold's expiry by the
    writer's sweep is the in-process run's alone: here group times are the leader's clock.)"""
    index_key = str(tmp_path / "index-key.json")
    write_index_key(index_key, KEY)
    replicas = three(start_replica, "--program", CAFE, "--keyring", index_key)
    client = SubmitClient(nats_cluster.urls.split(","))
    reasons: list[list[int]] = []

    def apply(ops: list, step_us: int) -> list:
        got = submit(client, ops)
        reasons.append([o.reason for o in got])
        return got

    try:
        run_groups(apply, lambda: time.time_ns() // 1000)
    finally:
        client.close()
    assert reasons and all(r == L.R_OK for group in reasons for r in group), reasons
    converge_and_stop(replicas, nats_cluster.urls)
    identical(replicas)
    ledger = Ledger(os.path.join(replicas[0].data_dir, "ledger"), readonly=True)
    try:
        kinds = {L.JOURNAL.unpack(v)[1] for _, v in ledger.dump()["journal"]}
    finally:
        ledger.close()
    assert {L.OP_OPEN, L.OP_IMPORT_CARD, L.OP_REFUND, L.OP_REVERSAL, L.OP_HOLD,
            L.OP_HOLD_VOID, L.OP_CARD_REPLACED, L.OP_REPLACEMENT_OPENED, L.OP_PROGRAM_LOADED,
            L.OP_CLOSE_DAY, L.OP_DATA_KEY_ROTATED, L.OP_STORE_PUT, L.OP_TERMINAL_REVOKED} <= kinds


PIN = bytes(range(100, 132))  # the swipes' cards' PIN check value (as the gRPC process makes it)


def pin_swipe(request_id: str, number: str, amount: int, tid: int, ksn: int,
              at: int | None = None) -> PendingOp:
    """A terminal's purchase with the card's PIN: its namespace, its KSN counter; ``at`` its
    client time (None: now)."""
    return PendingOp.build(key(request_id, (L.CALLER_TERMINAL, tid)), L.OP_PURCHASE, cid(number),
                           amount, store_id=3, terminal_id=tid, ksn_counter=ksn,
                           pin_flags=L.PIN_PRESENTED | L.PIN_REQUIRED, pin_check=PIN,
                           client_time_us=time.time_ns() // 1000 if at is None else at)


def swipe_until_answered(client: SubmitClient, load: "Load", tid: int, request_id: str,
                         number: str, amount: int, at: int):
    """A PIN swipe's outcome, sent again while no leader answers or its outcome is unknown,
    each send with the terminal's next KSN counter (``load.ksn_sent`` kept)."""
    deadline = time.monotonic() + 10
    while True:
        load.ksn_sent[tid] += 1
        got = client.submit(SHARD, [pin_swipe(request_id, number, amount, tid,
                                              load.ksn_sent[tid], at)])
        if isinstance(got, list):
            return got[0]
        assert time.monotonic() < deadline, got
        time.sleep(0.05)


class Load:
    """Top-ups from ``threads`` threads until stopped (``terminals``: PIN purchases instead, each
    thread one terminal's); a request whose outcome is unknown or that no leader took is sent
    again with the same request id and client time (a top-up byte for byte; a swipe with its
    terminal's next KSN counter, as terminals retry): applied once at most."""

    def __init__(self, urls: str, numbers: list[str], seed: int, threads: int = 2,
                 terminals: list[int] | None = None) -> None:
        self.urls = urls.split(",")
        self.numbers = numbers
        self.rng = random.Random(seed)
        self.terminals = terminals
        # request key -> (card, amount: what it adds to the card's principal)
        self.acked: dict[bytes, tuple[str, int]] = {}
        self.sent: dict[bytes, tuple[str, int]] = {}
        self.ksn_acked: dict[int, int] = {}  # terminal -> its last acknowledged KSN counter
        self.ksn_sent: dict[int, int] = {}   # terminal -> the last KSN counter it sent
        self.swipes: dict[bytes, tuple[int, str, str, int, int]] = {}  # request key -> (terminal,
        # request id, card, amount, client time): what a retry of it sends again
        self.not_applied = 0
        self.unknown = 0
        self.errors: list[BaseException] = []   # a thread's failure fails the test in stop()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(
            terminals[k] if terminals else 0,)) for k in range(len(terminals or ()) or threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors

    def _run(self, tid: int) -> None:
        try:
            self._submit_until_stopped(tid)
        except BaseException as exc:  # noticed by stop()
            self.errors.append(exc)

    def _submit_until_stopped(self, tid: int) -> None:
        client = SubmitClient(self.urls)
        with self._lock:
            rng = random.Random(self.rng.random())
        pending = None
        ksn = 0

        def swipe_again(request_id: str, number: str, amount: int, at: int) -> PendingOp:
            """The swipe, each send with the terminal's next KSN counter (as a terminal retries:
            an exact re-send of a KSN that applied is refused, the same request with a new one
            gets the original answer)."""
            nonlocal ksn
            ksn += 1
            with self._lock:
                self.ksn_sent[tid] = ksn
            return pin_swipe(request_id, number, amount, tid, ksn, at)

        try:
            while not self._stop.is_set():
                if pending is None:
                    number, amount, request_id = rng.choice(self.numbers), rng.randint(1, 9999), rid()
                    if tid:
                        at = time.time_ns() // 1000
                        pending = (lambda r=request_id, n=number, a=amount, t=at:
                                   swipe_again(r, n, a, t), number, -amount,
                                   key(request_id, (L.CALLER_TERMINAL, tid)))
                        with self._lock:
                            self.swipes[pending[3]] = (tid, request_id, number, amount, at)
                    else:
                        same = op(request_id, L.OP_TOP_UP, number, amount)
                        pending = (lambda same=same: same, number, amount, key(request_id))
                    with self._lock:
                        self.sent[pending[3]] = pending[1:3]
                got = client.submit(SHARD, [pending[0]()], timeout_s=1.0)
                if isinstance(got, list):
                    if got[0].reason != L.R_OK:
                        self.errors.append(AssertionError(f"{pending[1:]} answered {got[0]}"))
                        return
                    with self._lock:
                        self.acked[pending[3]] = pending[1:3]
                        if tid:
                            self.ksn_acked[tid] = ksn
                    pending = None
                else:
                    with self._lock:
                        if got == b"U":
                            self.unknown += 1
                        else:
                            self.not_applied += 1
                    time.sleep(0.05)
        finally:
            client.close()


def exactly_once(replicas: list[ReplicaProcess], load: Load, numbers: list[str],
                 initial_minor: int = 0) -> None:
    """On every replica: every acknowledged request is recorded, and each card's principal is
    ``initial_minor`` plus what the requests recorded for it moved (none applied twice)."""
    for r in replicas:
        ledger = Ledger(os.path.join(r.data_dir, "ledger"), readonly=True)
        try:
            for request_key in load.acked:
                found = ledger.read_operation(request_key)
                assert found is not None and found.reason == L.R_OK, (r.data_dir, request_key)
            expected = {number: initial_minor for number in numbers}
            for request_key, (number, amount) in load.sent.items():
                if ledger.read_operation(request_key) is not None:
                    expected[number] += amount
            for number in numbers:
                assert ledger.read_card(cid(number))[0][5] == expected[number], r.data_dir
        finally:
            ledger.close()


def another_leads(replicas: list[ReplicaProcess], old: ReplicaProcess) -> list[ReplicaProcess]:
    """The replicas but ``old``, once one of them leads (within 20 s)."""
    others = [r for r in replicas if r is not old]
    deadline = time.monotonic() + 20
    while not any("leading" in r.roles() for r in others):
        assert time.monotonic() < deadline, [r.log()[-1500:] for r in others]
        time.sleep(0.05)
    return others


def kill_the_leader_under(load: Load, replicas: list[ReplicaProcess],
                          old: ReplicaProcess) -> list[ReplicaProcess]:
    """``load`` started, the leader ``old`` killed -9 a second in, another taking over and a
    second more of load on it, then ``load`` stopped: the replicas left. Requests were
    acknowledged before the takeover and after it."""
    load.start()
    try:
        acked_by(load, 20)
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(10)
        others = another_leads(replicas, old)
        acked_by(load, len(load.acked) + 20)  # the new leader takes load
    finally:
        load.stop()
    return others


def acked_by(load: Load, count: int, timeout_s: float = 30) -> None:
    """Wait until ``load`` has ``count`` acknowledged requests (a loaded machine's second may
    hold none)."""
    deadline = time.monotonic() + timeout_s
    while len(load.acked) < count:
        assert time.monotonic() < deadline, (len(load.acked), count, load.errors)
        time.sleep(0.05)


def restart_and_converge(old: ReplicaProcess, others: list[ReplicaProcess],
                         urls: str) -> list[ReplicaProcess]:
    """The killed replica again, on its folder (from its checkpoint, through the stream), and
    every replica caught up and stopped: all of them."""
    restarted = ReplicaProcess(old.data_dir, SHARD, urls, *LEASE)
    try:
        restarted.wait_role("following", after=restarted.first_role)
        everyone = others + [restarted]
        converge_and_stop(everyone, urls)
    finally:
        if restarted.proc.poll() is None:
            restarted.stop()
    return everyone


def test_a_leader_paused_past_its_lease_is_refused_follows_and_loses_nothing_it_acknowledged(
        nats_cluster, start_replica):
    replicas = three(start_replica)
    old = leader_of(replicas)
    numbers = opened_cards(nats_cluster, 6, 7)
    # enough callers that the leader's queue is rarely empty: paused, it holds work, and its
    # first act on SIGCONT is that work's append (the lease's renewal comes after a group)
    load = Load(nats_cluster.urls, numbers, seed=13, threads=8)
    load.start()
    try:
        acked_by(load, 20)
        os.kill(old.pid, signal.SIGSTOP)
        another_leads(replicas, old)
        acked_by(load, len(load.acked) + 20)  # the new leader takes load
        seen = len(old.roles())
        os.kill(old.pid, signal.SIGCONT)
        old.wait_role("following", timeout_s=20, after=seen)
        time.sleep(0.5)
    finally:
        load.stop()
    assert "deposed" in old.roles()[seen:], old.log()[-3000:]  # its append was refused
    assert "append refused" in old.log()
    new = leader_of(replicas)
    assert new is not old
    converge_and_stop(replicas, nats_cluster.urls)
    exactly_once(replicas, load, numbers)
    identical(replicas)


def test_a_stale_writer_is_refused_and_its_own_resent_group_is_not(nats_cluster):
    """The fencing itself, at the log: writer A appends group 1; B (another epoch) appends
    group 2; A, still believing the stream ends at 1, is refused (Deposed, nothing stored);
    a writer whose group landed but whose ack was lost is answered with its own group."""
    from cardcore.grouplog import pack_record
    from cardcore.jetlog import Deposed, JetStreamLog, NatsThread, prepare_shard, stream_name

    nt = NatsThread(nats_cluster.urls.split(","), "cardcore-test")
    try:
        prepare_shard(nt, SHARD, 3, 2000, None, 1)
        a, b = JetStreamLog(nt, SHARD), JetStreamLog(nt, SHARD)
        a.epoch, b.epoch = 1, 2
        group = encode_group([], 1_000)
        assert a.append(group, 0, bytes(16)) == 1
        assert list(b.read_from(2)) == []  # b's view of the stream: it ends at group 1
        assert b.append(group, 0, bytes(16)) == 2
        with pytest.raises(Deposed):
            a.append(group, 0, bytes(16))
        assert a.deposed == 1
        assert nt.call(nt.js.stream_info(stream_name(SHARD))).state.last_seq == 2
        # b's group 3 lands but b never hears the ack: its re-send finds its own id there
        assert publish_raw(nt, pack_record(3, group, shard=SHARD, epoch=2), f"s{SHARD}-e2-g3",
                           2) == 3
        assert b.append(group, 0, bytes(16)) == 3
        assert nt.call(nt.js.stream_info(stream_name(SHARD))).state.last_seq == 3
        assert [r.group_no for r in a.read_from(1)] == [1, 2, 3]
    finally:
        nt.close()


def test_kill_9_the_leader_under_load_every_acknowledged_group_lands_once(nats_cluster,
                                                                          start_replica):
    replicas = three(start_replica)
    old = leader_of(replicas)
    numbers = opened_cards(nats_cluster, 6, 9)
    load = Load(nats_cluster.urls, numbers, seed=17)
    others = kill_the_leader_under(load, replicas, old)
    everyone = restart_and_converge(old, others, nats_cluster.urls)
    exactly_once(everyone, load, numbers)
    identical(everyone)


def test_kill_9_the_leader_under_pin_swipes_from_several_terminals_accepts_no_ksn_twice(
        nats_cluster, start_replica):
    """Three terminals swipe PIN purchases, each with its own rising KSN counter, while the
    shard's leader is killed -9. On the new leader a swipe that reuses a terminal's last
    acknowledged counter, or an earlier one, under a new request id is refused
    (REASON_KSN_REPLAYED: the high-water marks came with the log), and the counter after the
    last one sent applies. After catch-up, on every replica (the killed one restarted): every
    acknowledged swipe exactly once (each card's principal), each terminal's high-water its
    last counter applied, and the ledgers identical."""
    replicas = three(start_replica)
    old = leader_of(replicas)
    rng = random.Random(31)
    terminals, initial_minor = [1, 2, 3], 10_000_000
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        got = submit(client, [add_operator("op-1", "manager", 2, (3,)),  # operator 1: the PINs
                              *(enroll(f"t-{tid}", tid, 3) for tid in terminals)])
        assert [o.reason for o in got] == [L.R_OK] * len(got)
        numbers = open_cards(client, 6, rng)
        now = time.time_ns() // 1000
        got = submit(client, [op(rid(), L.OP_TOP_UP, n, initial_minor, now) for n in numbers]
                     + [PendingOp.build(key(rid()), L.OP_SET_PIN, cid(n), pin_flags=L.NEW_PIN,
                                        new_pin_check=PIN, operator_id=1, store_id=3,
                                        client_time_us=now)
                        for n in numbers])
        assert [o.reason for o in got] == [L.R_OK] * len(got)
    finally:
        client.close()
    load = Load(nats_cluster.urls, numbers, seed=37, terminals=terminals)
    others = kill_the_leader_under(load, replicas, old)
    assert all(load.ksn_acked.get(tid, 0) > 1 for tid in terminals), load.ksn_acked
    assert load.unknown + load.not_applied > 0  # the failover made the terminals swipe again
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        for tid in terminals:
            number = numbers[tid]
            for stale in (load.ksn_acked[tid], 1):
                (got,) = submit(client, [pin_swipe(rid(), number, 1, tid, stale)])
                assert got.reason == L.R_KSN_REPLAYED, (tid, stale, got)
            # an acknowledged swipe sent again as its terminal retries: the original answer
            again = next(s for k, s in load.swipes.items() if s[0] == tid and k in load.acked)
            got = swipe_until_answered(client, load, *again)
            assert got.reason == L.R_OK and got.replayed, (tid, got)
            fresh = (tid, rid(), number, 1, time.time_ns() // 1000)
            got = swipe_until_answered(client, load, *fresh)
            assert got.reason == L.R_OK and not got.replayed, (tid, got)
            request_key = key(fresh[1], (L.CALLER_TERMINAL, tid))
            load.sent[request_key] = load.acked[request_key] = (number, -1)
    finally:
        client.close()
    everyone = restart_and_converge(old, others, nats_cluster.urls)
    exactly_once(everyone, load, numbers, initial_minor)
    for r in everyone:
        ledger = Ledger(os.path.join(r.data_dir, "ledger"), readonly=True)
        try:
            for tid in terminals:
                assert ledger.read_terminal(tid)[5] == load.ksn_sent[tid], (r.data_dir, tid)
        finally:
            ledger.close()
    identical(everyone)


def test_a_new_replica_seeded_from_a_peers_backup_follows_from_its_checkpoint(
        nats_cluster, start_replica, tmp_path):
    """`cardcore backup` of a running follower, then more groups; a new replica started with
    --seed-from that backup replays only the groups after the backup's checkpoint and ends
    identical to the others; --seed-from into a folder that holds a ledger is refused (exit 2)."""
    import subprocess
    import sys

    replicas = three(start_replica)
    opened_cards(nats_cluster, 6, 21)
    peer = next(r for r in replicas if r is not leader_of(replicas))

    def backup_of(replica: ReplicaProcess, shard: int, to: str) -> str:
        """`cardcore backup` of a running replica once its checkpoint holds its stream."""
        deadline = time.monotonic() + 20
        while applied(replica) != stream_end(nats_cluster.urls, shard):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        made = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "backup",
                               "--data-dir", replica.data_dir, "--to", to],
                              capture_output=True, text=True)
        assert made.returncode == 0, made.stdout + made.stderr
        return to

    backup = backup_of(peer, SHARD, str(tmp_path / "backup"))
    at_backup = Ledger(os.path.join(backup, "ledger"), readonly=True)
    try:
        seeded_at = at_backup.log_applied()
    finally:
        at_backup.close()
    opened_cards(nats_cluster, 4, 22)
    end = stream_end(nats_cluster.urls)
    assert end > seeded_at > 0
    new = start_replica("r3", SHARD, *LEASE, "--seed-from", backup)
    new.wait_role("following")
    assert "ledger seeded from the backup" in new.log()
    assert f"replayed {end - seeded_at} groups of the log" in new.log(), new.log()[-2000:]
    everyone = replicas + [new]
    converge_and_stop(everyone, nats_cluster.urls)
    identical(everyone)
    # --seed-from left in place (a unit's) is ignored once the folder holds a ledger
    again = start_replica("r3", SHARD, *LEASE, "--seed-from", backup)
    again.wait_role("following", after=len(new.roles()))
    assert "--seed-from" in again.log() and "ignored" in again.log()
    assert again.stop() == 0
    # a backup of another shard: refused before it can follow or lead, the folder left empty
    other = start_replica("s1-r0", 1, *LEASE)
    other.wait_role("following")
    request = SubmitClient(nats_cluster.urls.split(","))
    try:
        open_cards(request, 2, random.Random(23), 1)
    finally:
        request.close()
    other_backup = backup_of(other, 1, str(tmp_path / "backup-s1"))
    wrong = start_replica("r4", SHARD, *LEASE, "--seed-from", other_backup)
    assert wrong.proc.wait(30) == 2, wrong.log()[-2000:]
    assert any(why in wrong.log() for why in ("not where shard 0's stream has it",
                                              "past this shard's", "take a newer backup"))
    assert not os.path.exists(os.path.join(wrong.data_dir, "ledger", "data.mdb"))


def test_a_follower_whose_replay_ends_at_another_digest_halts(nats_cluster, start_replica):
    """A group whose recorded journal digest is not where this replica's apply ends (a
    diverged writer, a rewritten stream) halts the follower; its ledger keeps only what
    matched, and it never leads."""
    from cardcore.grouplog import pack_record
    from cardcore.idempotency import PendingOp
    from cardcore.jetlog import NatsThread

    leader = start_replica("r0", SHARD, *LEASE)
    leader.wait_role("leading")
    nt = NatsThread(nats_cluster.urls.split(","), "cardcore-test")
    try:
        group = encode_group([PendingOp.internal(L.OP_MAINTENANCE)], time.time_ns() // 1000)
        assert publish_raw(nt, pack_record(2, group, digest_seq=999, out_digest=bytes(16),
                                           shard=SHARD, epoch=99), f"s{SHARD}-e99-g2", 1) == 2
    finally:
        nt.close()
    follower = start_replica("r1", SHARD, *LEASE)
    assert follower.proc.wait(30) == 1, follower.log()[-3000:]
    assert "halted: InvariantError" in follower.log()
    assert "not where it first did" in follower.log()
    assert "leading" not in follower.roles()
    assert applied(follower) <= 1


def change_principal(data_dir: str, number: str, was: int, by: int) -> None:
    """A stopped replica's card record changed on disk, outside the writer: its principal
    (``was``, checked) ``by`` fen up."""
    import struct

    import lmdb

    env = lmdb.open(os.path.join(data_dir, "ledger"), max_dbs=64)
    try:
        cards = env.open_db(b"cards")
        with env.begin(write=True) as txn:
            record = bytearray(txn.get(cid(number), db=cards))
            assert struct.unpack_from("<q", record, 8)[0] == was  # (layout.CARD's offset)
            struct.pack_into("<q", record, 8, was + by)
            txn.put(cid(number), bytes(record), db=cards)
    finally:
        env.close()


def principal_after(outcome) -> int:
    """An applied operation's journal entry: the card's principal after it (layout's offset)."""
    import struct

    return struct.unpack_from("<q", outcome.entry, 72)[0]


def principal_of(replica: ReplicaProcess, number: str) -> int:
    ledger = Ledger(os.path.join(replica.data_dir, "ledger"), readonly=True)
    try:
        return ledger.read_card(cid(number))[0][5]  # (layout.CARD: principal_minor)
    finally:
        ledger.close()


def test_a_corrupted_follower_record_is_found_at_its_cards_next_operation_and_halts_it(
        nats_cluster, start_replica):
    """A card record changed on a stopped follower's disk (its principal one fen up: a bit
    flip, a hand edit) is found by ``verify`` at once; running, the follower applies the next
    top-up of that card to a balance the leader does not hold, so its journal entry's balance
    after, and the group's digest, are not the stream's: it halts (exit 1) and keeps only the
    groups before. The other two go on and end identical."""
    replicas = three(start_replica)
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        numbers = open_cards(client, 2, random.Random(23))
        got = submit(client, [op(rid(), L.OP_TOP_UP, n, 10_000) for n in numbers])
        assert all(o.reason == L.R_OK for o in got), got
        end = stream_end(nats_cluster.urls)
        deadline = time.monotonic() + 30
        while any(applied(r) != end for r in replicas):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        leader = leader_of(replicas)
        bad = next(r for r in replicas if r is not leader)
        assert bad.stop() == 0, bad.log()[-3000:]
        change_principal(bad.data_dir, numbers[0], 10_000, 1)
        report = verify(bad.data_dir)
        assert not report["ok"] and any("record 10001/" in p for p in report["problems"]), report
        # (it follows only: a lease lapsing on a busy machine must not make it the leader, the
        # case docs/cluster.md tells apart)
        restarted = start_replica(os.path.basename(bad.data_dir), SHARD, *LEASE, "--follow-only")
        restarted.wait_role("following", after=restarted.first_role)
        others = [r for r in replicas if r is not bad]
        # the other card first: applied alike everywhere; then the corrupted one's
        for number in (numbers[1], numbers[0]):
            got = submit(client, [op(rid(), L.OP_TOP_UP, number, 500)])
            assert got[0].reason == L.R_OK, got
        diverged = stream_end(nats_cluster.urls)  # (the changed card's group: the last)
        assert restarted.proc.wait(30) == 1, restarted.log()[-3000:]
    finally:
        client.close()
    assert "halted: InvariantError" in restarted.log()
    assert "as it first did, but its entries differ" in restarted.log()
    # (its last checkpoint: the other card's top-up at most, never the group that diverged)
    assert end <= applied(restarted) < diverged
    converge_and_stop(others, nats_cluster.urls)
    identical(others)
    assert principal_of(others[0], numbers[0]) == 10_500


def test_a_changed_record_on_the_leader_halts_its_followers_until_unchecked_through_passes_it(
        nats_cluster, start_replica):
    """A card record changed on the leader's disk: the leader applies the card's next top-up
    to it and logs the digest it got, so both healthy followers halt on that group. The leader
    stopped, the followers started with --unchecked-through that group (a group the stream does
    not hold yet: refused, exit 2) apply it to the right balance, one leads, and the shard goes
    on, later groups checked: the two end identical, the card at what its operations add up
    to, not the changed leader's."""
    urls = nats_cluster.urls
    r0 = start_replica("r0", SHARD, *LEASE)
    r0.wait_role("leading")
    client = SubmitClient(urls.split(","))
    try:
        numbers = open_cards(client, 2, random.Random(29))
        got = submit(client, [op(rid(), L.OP_TOP_UP, n, 10_000) for n in numbers])
        assert all(o.reason == L.R_OK for o in got), got
        assert r0.stop() == 0, r0.log()[-3000:]
        change_principal(r0.data_dir, numbers[0], 10_000, 7)
        r0 = start_replica("r0", SHARD, *LEASE)  # (alone: it leads again, its record changed)
        r0.wait_role("leading", after=r0.first_role)
        # (following only: a lease lapsing on a busy machine must not hand the top-up below to
        # a healthy replica)
        followers = [start_replica(f"r{k}", SHARD, *LEASE, "--follow-only") for k in (1, 2)]
        for r in followers:
            r.wait_role("following", after=r.first_role)
        got = submit(client, [op(rid(), L.OP_TOP_UP, numbers[0], 500)])
        assert got[0].reason == L.R_OK and principal_after(got[0]) == 10_507, got
        for r in followers:
            assert r.proc.wait(30) == 1, r.log()[-3000:]
            assert "as it first did, but its entries differ" in r.log()
        assert r0.stop() == 0, r0.log()[-3000:]
        end = stream_end(urls)
        early = start_replica("r1", SHARD, *LEASE, "--unchecked-through", str(end + 1))
        assert early.proc.wait(30) == 2, early.log()[-3000:]
        assert "only groups it holds may go unchecked" in early.log()
        seeded = start_replica("r3", SHARD, *LEASE, "--unchecked-through", str(end),
                               "--seed-from", os.path.join(r0.data_dir, "no-backup"))
        assert seeded.proc.wait(30) == 2, seeded.log()[-3000:]  # (a seed's digests: checked)
        assert "a seed is checked by the digests it follows" in seeded.log()
        followers = [start_replica(f"r{k}", SHARD, *LEASE, "--unchecked-through", str(end))
                     for k in (1, 2)]
        deadline = time.monotonic() + 60  # (two starts, each a replay, then a lease and a barrier)
        while not any(r.roles()[-1:] == ["leading"] for r in followers):
            assert time.monotonic() < deadline and all(r.proc.poll() is None for r in followers), \
                [r.log()[-2000:] for r in followers]
            time.sleep(0.05)
        got = submit(client, [op(rid(), L.OP_TOP_UP, numbers[0], 1)])
        assert got[0].reason == L.R_OK and principal_after(got[0]) == 10_501, got
    finally:
        client.close()
    converge_and_stop(followers, urls)  # (both caught up: each has replayed that group)
    for r in followers:
        assert "applied unchecked" in r.log(), r.log()[-3000:]
    identical(followers)
    assert [principal_of(r, numbers[0]) for r in followers] == [10_501, 10_501]


def test_kill_9_the_streams_leader_node_under_load_then_restart_it_loses_nothing(
        nats_cluster, start_replica):
    """The NATS node that leads the shard's stream dies under load: the stream elects another,
    appends pause and resume (re-sent with the same id and expectation), the node comes back
    and catches up; every acknowledged top-up is on every replica exactly once."""
    replicas = three(start_replica)
    numbers = opened_cards(nats_cluster, 6, 11)
    node = stream_leader_node(nats_cluster.urls)
    load = Load(nats_cluster.urls, numbers, seed=19)
    load.start()
    try:
        time.sleep(1.0)
        nats_cluster.kill_node(node)
        time.sleep(2.0)
        nats_cluster.start_node(node)
        nats_cluster.wait_ready()
        resumed = len(load.acked)
        deadline = time.monotonic() + 30
        while len(load.acked) < resumed + 20:
            assert time.monotonic() < deadline, [r.log()[-1500:] for r in replicas]
            time.sleep(0.1)
    finally:
        load.stop()
    converge_and_stop(replicas, nats_cluster.urls)
    exactly_once(replicas, load, numbers)
    identical(replicas)


def test_kill_9_a_follower_node_then_every_node_and_replica_loses_nothing_acknowledged(
        nats_cluster, start_replica):
    """Under load, a NATS node that follows the shard's stream dies and comes back; then every
    NATS node and every replica are killed -9 at once, and all restarted on their folders: the
    shard elects a leader again and every acknowledged top-up is on every replica exactly once
    (an acknowledgement meant fsynced on a quorum: ``sync_interval: always``)."""
    replicas = three(start_replica)
    numbers = opened_cards(nats_cluster, 6, 23)
    follower_node = (stream_leader_node(nats_cluster.urls) + 1) % 3
    load = Load(nats_cluster.urls, numbers, seed=29)
    load.start()
    restarted: list[ReplicaProcess] = []
    try:
        time.sleep(1.0)
        nats_cluster.kill_node(follower_node)
        before = len(load.acked)
        deadline = time.monotonic() + 20
        while len(load.acked) < before + 20:  # two nodes of three carry on
            assert time.monotonic() < deadline, [r.log()[-1500:] for r in replicas]
            time.sleep(0.05)
        nats_cluster.start_node(follower_node)
        nats_cluster.wait_ready()
        time.sleep(0.5)
        for k in range(3):
            nats_cluster.kill_node(k)
        for r in replicas:
            r.kill()
    finally:
        load.stop()
    assert len(load.acked) > before + 20
    for k in range(3):
        nats_cluster.start_node(k)
    nats_cluster.wait_ready()
    for r in replicas:  # (the same log files go on: first_role, the killed run's roles)
        restarted.append(ReplicaProcess(r.data_dir, SHARD, nats_cluster.urls, *LEASE))
    try:
        deadline = time.monotonic() + 30
        # each has said its new role (a log's last role may still be its killed run's
        # "leading", which leader_of would count), and one of them leads
        while not (all(len(r.roles()) > r.first_role for r in restarted)
                   and any("leading" in r.roles()[r.first_role:] for r in restarted)):
            assert time.monotonic() < deadline, [r.log()[-1500:] for r in restarted]
            time.sleep(0.05)
        converge_and_stop(restarted, nats_cluster.urls)
    finally:
        for r in restarted:
            if r.proc.poll() is None:
                r.stop()
    exactly_once(restarted, load, numbers)
    identical(restarted)


def test_two_shards_keep_apart_and_each_keeps_its_genesis_program(nats_cluster, start_replica):
    """Two shards on the same NATS: each its own stream, lease and leader; a card opened on one
    is on no replica of the other; a shard's program is its genesis record's (the first
    replica's --program), whatever its other replicas are given."""
    cafe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "programs", "cafe.toml")
    first = start_replica("s1-r0", 1, *LEASE, "--program", cafe)
    first.wait_role("following")
    shards = {0: [start_replica(f"s0-r{k}", 0, *LEASE) for k in range(2)],
              1: [first, start_replica("s1-r1", 1, *LEASE)]}
    for replicas in shards.values():
        deadline = time.monotonic() + 30
        while not all(r.roles() for r in replicas) or not any("leading" in r.roles()
                                                              for r in replicas):
            assert time.monotonic() < deadline, [r.log()[-1500:] for r in replicas]
            time.sleep(0.05)
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        numbers = {shard: open_cards(client, 3, random.Random(shard), shard) for shard in shards}
    finally:
        client.close()
    for shard, replicas in shards.items():
        converge_and_stop(replicas, nats_cluster.urls, shard)
    with open(cafe) as f:
        cafe_source = f.read()
    for shard, replicas in shards.items():
        for r in replicas:
            ledger = Ledger(os.path.join(r.data_dir, "ledger"), readonly=True)
            try:
                for number in numbers[shard]:
                    assert ledger.read_card(cid(number)) is not None
                for number in numbers[1 - shard]:
                    assert ledger.read_card(cid(number)) is None
                source = ledger.read_programs()[1]["source"]
                assert (source == cafe_source) == (shard == 1), r.data_dir
            finally:
                ledger.close()
        identical(replicas)


def test_over_mutual_tls_only_a_replicas_certificate_reaches_the_log(tmp_path, tls_cluster):
    """The NATS nodes with mutual TLS and the roles' users (make cluster's setting): three
    replicas with their shard's replica certificate lead, follow and end identical, and another
    shard's replica certificate reaches nothing of theirs; a front's certificate
    submits and may ask a stream's info (where its follower must be), and can neither append to
    the log nor read the stream's records; no certificate, another
    CA's or an unknown name is refused at connect, quickly."""
    import asyncio
    import subprocess

    import nats.errors
    import nats.js.errors
    from nats.js import api as js_api

    from cardcore.jetlog import (CHECKPOINTS_BUCKET, LEADERS_BUCKET, SHARDS_BUCKET,
                                 SUBMIT_INBOX_PREFIX, NatsRefused, NatsThread, NatsTLS,
                                 log_subject, replica_inbox_prefix, stream_name, submit_subject)
    from cardcore.server import certs
    from cardcore.server.clusterconf import shard_replica_role
    from cardcore.server.devcluster import NATS_SERVER, free_ports

    cluster, start, started = tls_cluster
    replicas = three(start)
    urls = cluster.urls.split(",")
    front = SubmitClient(urls, cluster.tls_for("front"))
    try:
        numbers = open_cards(front, 4, random.Random(7))
    finally:
        front.close()
    as_front = NatsThread(urls, "cardcore-test-front", cluster.tls_for("front"),
                          SUBMIT_INBOX_PREFIX)  # (its own inboxes: answers can reach it)
    try:
        before = stream_end(cluster.urls, SHARD, cluster.tls_for("replica"))
        assert as_front.call(as_front.js.stream_info(stream_name(SHARD))).state.last_seq \
            == before  # a stream's info: allowed (a front's read of everything waits on it)
        with pytest.raises((nats.errors.Error, TimeoutError)):
            as_front.call(as_front.js.publish(log_subject(SHARD), b"forged", timeout=1), 3)
        for api in (f"STREAM.MSG.GET.{stream_name(SHARD)}",
                    f"DIRECT.GET.{stream_name(SHARD)}", f"STREAM.PURGE.{stream_name(SHARD)}"):
            with pytest.raises((nats.errors.Error, TimeoutError)):  # records: not a front's
                as_front.call(as_front.nc.request(f"$JS.API.{api}", b'{"seq": 1}',
                                                  timeout=1), 3)
        # nor hear the replicas' reads of the log (their inboxes are theirs: the followers
        # look at the stream's end every tenth of the lease meanwhile) nor the ticks
        heard: list = []

        async def listen(msg):
            heard.append(msg.subject)

        for subject in ("_INBOX_replica.>", "_INBOX.>", ">"):
            as_front.call(as_front.nc.subscribe(subject, cb=listen))
        time.sleep(1.0)
        assert heard == []
        # a submission whose reply subject is a log is dropped: answering it would let a
        # submitter write a forged record there (the shard would halt on it)
        as_front.call(as_front.nc.publish(submit_subject(SHARD), b"junk",
                                          reply=log_subject(SHARD)))
        as_front.call(as_front.nc.flush())
        deadline = time.monotonic() + 10
        while not any("reply subject outside" in r.log() for r in replicas):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stream_end(cluster.urls, SHARD, cluster.tls_for("replica")) == before
    finally:
        as_front.close()
    # The replicas above ran with shard 0's certificate alone (nats:replica-s0). Another shard's
    # replica certificate reaches nothing of shard 0: no append, no lease, genesis or
    # checkpoint key, no read, purge or info of its stream, no submission, none of its
    # replicas' reads; on its own shard the same calls are allowed (an info: "no stream").
    theirs = SHARD + 1
    as_other = NatsThread(urls, "cardcore-test-other-shard",
                          cluster.tls_for(shard_replica_role(theirs)),
                          replica_inbox_prefix(theirs))
    try:
        heard.clear()
        for subject in (submit_subject(SHARD), f"{replica_inbox_prefix(SHARD)}.>",
                        "_INBOX_replica.>"):
            as_other.call(as_other.nc.subscribe(subject, cb=listen))
        mine = stream_name(SHARD)

        async def refused() -> list:
            return await asyncio.gather(
                as_other.js.publish(log_subject(SHARD), b"forged", timeout=1),
                *(as_other.nc.request(subject, b'{"seq": 1}', timeout=1) for subject in (
                    f"$KV.{LEADERS_BUCKET}.s{SHARD}", f"$KV.{SHARDS_BUCKET}.s{SHARD}-genesis",
                    f"$KV.{CHECKPOINTS_BUCKET}.s{SHARD}", f"$JS.API.STREAM.MSG.GET.{mine}",
                    f"$JS.API.DIRECT.GET.{mine}", f"$JS.API.STREAM.PURGE.{mine}",
                    f"$JS.API.STREAM.INFO.{mine}", "$JS.API.STREAM.INFO.KV_other")),
                return_exceptions=True)

        answers = as_other.call(refused(), 10)
        assert all(isinstance(a, (nats.errors.Error, TimeoutError)) for a in answers), answers
        with pytest.raises(nats.js.errors.NotFoundError):  # its own shard's: allowed
            as_other.call(as_other.js.stream_info(stream_name(theirs)))
        # a put of its own key with a rollup of the whole bucket: refused (the buckets allow
        # none), so every shard's genesis is still there
        with pytest.raises(nats.errors.Error):
            as_other.call(as_other.js.publish(f"$KV.{SHARDS_BUCKET}.s{theirs}-genesis", b"{}",
                                              headers={"Nats-Rollup": "all"}))
        shards_kv = as_other.call(as_other.js.key_value(SHARDS_BUCKET))
        assert as_other.call(shards_kv.get(f"s{SHARD}-genesis")).value
        # its own shard's stream it may make, but one sourced from shard 0's (which would copy
        # shard 0's records where this user reads) no replica of its shard starts on
        as_other.call(as_other.js.add_stream(js_api.StreamConfig(
            name=stream_name(theirs), subjects=[log_subject(theirs)],
            sources=[js_api.StreamSource(name=mine)])))
        front = SubmitClient(urls, cluster.tls_for("front"))
        try:  # submissions, appends and the followers' reads go on meanwhile
            numbers += open_cards(front, 2, random.Random(8))
        finally:
            front.close()
        time.sleep(0.5)
        assert heard == []
    finally:
        as_other.close()
    sourced = start("r-sourced", theirs)
    assert sourced.proc.wait(30) == 2, sourced.log()[-2000:]
    assert "not made by a replica" in sourced.log()
    # a replica of shard 0 given shard 1's certificate: a setting (exit 2, naming what NATS
    # refused), not a wait of the set-up's 30 s and a restart by its unit, again and again
    wrong_tls = cluster.tls_for(shard_replica_role(theirs))
    started.append(ReplicaProcess(str(tmp_path / "r-wrong"), SHARD, cluster.urls, *LEASE,
                                  "--nats-ca", wrong_tls.ca_file, "--nats-cert",
                                  wrong_tls.cert_file, "--nats-key", wrong_tls.key_file))
    assert started[-1].proc.wait(20) == 2, started[-1].log()[-2000:]
    assert "refused this certificate's user" in started[-1].log()
    before = stream_end(cluster.urls, SHARD, cluster.tls_for("replica"))
    end = converge_and_stop(replicas, cluster.urls, SHARD, cluster.tls_for("replica"))
    assert end == before
    for r in replicas:
        ledger = Ledger(os.path.join(r.data_dir, "ledger"), readonly=True)
        try:
            assert all(ledger.read_card(cid(n)) is not None for n in numbers)
        finally:
            ledger.close()
    identical(replicas)
    other = str(tmp_path / "other-ca")
    certs.make_ca(other)
    certs.make_nats_role_cert(other, "replica")
    certs.make_client_cert(cluster.certs, "nats:nobody")
    ca = os.path.join(cluster.certs, "ca.pem")
    for tls in (None, NatsTLS(ca, os.path.join(other, "nats-replica.pem"),
                              os.path.join(other, "nats-replica.key")),
                NatsTLS(ca, os.path.join(cluster.certs, "nats-nobody.pem"),
                        os.path.join(cluster.certs, "nats-nobody.key"))):
        t0 = time.monotonic()
        with pytest.raises(NatsRefused):
            NatsThread(urls, "cardcore-test-refused", tls)
        assert time.monotonic() - t0 < 25  # refused, not waited out (31 s)
    # a route: only another node's certificate; a rogue server joining with a role's is not
    rogue = tmp_path / "rogue.conf"
    rogue.write_text(
        f'listen: 127.0.0.1:{free_ports(1)[0]}\n'
        f'cluster {{\n  name: cardcore\n  listen: 127.0.0.1:{free_ports(1)[0]}\n'
        f'  routes: [nats-route://127.0.0.1:{cluster.nodes[0].route_port}]\n'
        f'  tls {{\n    cert_file: "{cluster.certs}/nats-front.pem"\n'
        f'    key_file: "{cluster.certs}/nats-front.key"\n'
        f'    ca_file: "{cluster.certs}/ca.pem"\n  }}\n}}\n')
    routes_before = routes_of(cluster.http_ports[0])
    with open(tmp_path / "rogue.log", "ab") as rogue_log:
        proc = subprocess.Popen([NATS_SERVER, "-c", str(rogue)], stdout=rogue_log,
                                stderr=rogue_log)
        try:
            deadline = time.monotonic() + 10
            while "authentication error" not in cluster.node_log(0):
                assert time.monotonic() < deadline, cluster.node_log(0)[-2000:]
                time.sleep(0.1)
            assert routes_of(cluster.http_ports[0]) == routes_before
        finally:
            proc.kill()
            proc.wait(10)
    # a replica whose certificate is refused exits 2 (a setting: its unit does not restart)
    refused = ReplicaProcess(str(tmp_path / "refused"), SHARD, cluster.urls, "--nats-ca", ca,
                             "--nats-cert", os.path.join(other, "nats-replica.pem"),
                             "--nats-key", os.path.join(other, "nats-replica.key"))
    started.append(refused)
    assert refused.proc.wait(20) == 2, refused.log()[-2000:]


def routes_of(http_port: int) -> int:
    return nats_monitor(http_port, "routez")["num_routes"]


def test_the_hosts_files_of_cluster_config_run_a_cluster(tmp_path):
    """`cardcore cluster-config` for three hosts (here 127.0.0.1-3, each with its folders): each
    host's nats.conf starts its node, its replica.env (what the systemd unit reads) starts its
    replica, the fronts' certificate submits, and the front's files (front.env, what its unit
    reads) run a front that opens and tops up a card; the replicas and the front's follower end
    identical. A second run into the same folder, an even number of nodes or a bad name are
    refused."""
    import subprocess
    import sys
    import urllib.request

    from cardcore.jetlog import NatsTLS
    from cardcore.server.devcluster import NATS_SERVER, free_ports

    out = tmp_path / "out"
    ports = free_ports(3)
    nodes = [f"h{k}=127.0.0.{k}" for k in (1, 2, 3)]
    cafe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "programs", "cafe.toml")
    from cardcore.keyring import Keyring

    keyring = Keyring.load_or_create(str(tmp_path / "chain-keyring.json"))
    args = [sys.executable, "-m", "cardcore.server.cli", "cluster-config", "--out", str(out),
            "--program", cafe, "--keyring", keyring.path,
            "--etc-dir", str(tmp_path / "{node}" / "etc"),
            "--host-data-dir", str(tmp_path / "{node}" / "data"),
            "--client-port", str(ports[0]), "--route-port", str(ports[1]),
            "--http-port", str(ports[2])]
    def config(*given: str) -> subprocess.CompletedProcess:
        return subprocess.run(args + [a for n in given for a in ("--node", n)],
                              capture_output=True, text=True)

    for refused in ((), nodes[:2], ("H1=127.0.0.1", *nodes[1:]), (nodes[0], nodes[0], nodes[2])):
        assert config(*refused).returncode == 2, refused
    made = config(*nodes)
    assert made.returncode == 0, made.stderr
    again = config(*nodes)
    assert again.returncode == 2 and "holds a cluster" in again.stderr
    for shard in (0, 1):  # (--shards 2) a certificate per shard, no every-shard one on hosts
        assert oct(os.stat(out / "h1" / "nats" / f"nats-replica-s{shard}.key").st_mode
                   & 0o777) == "0o600"
    assert not (out / "h1" / "nats" / "nats-replica.key").exists()
    for shard in (0, 1):  # the front's: a follower certificate per shard, as the replicas'
        assert oct(os.stat(out / "front" / f"nats-follower-s{shard}.key").st_mode
                   & 0o777) == "0o600"
    assert not (out / "front" / "nats-follower.key").exists()
    assert oct(os.stat(out / "h1" / "index-key.json").st_mode & 0o777) == "0o600"
    host_file = (out / "h1" / "index-key.json").read_text()  # the index key alone goes there
    assert keyring.index_key.hex() in host_file and keyring.pin_key.hex() not in host_file
    assert keyring.bdk.hex() not in host_file
    assert not (out / "h1" / "nats" / "ca.key").exists()
    procs, replicas, logs = [], [], []
    try:
        for k in (1, 2, 3):
            etc = tmp_path / f"h{k}" / "etc"
            os.makedirs(etc)
            for item in (out / f"h{k}").iterdir():
                os.rename(item, etc / item.name)
            logs.append(open(tmp_path / f"h{k}.log", "ab"))
            procs.append(subprocess.Popen([NATS_SERVER, "-c", str(etc / "nats.conf")],
                                          stdout=logs[-1], stderr=logs[-1],
                                          start_new_session=True))
        deadline = time.monotonic() + 30
        for k in (1, 2, 3):
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.{k}:{ports[2]}/healthz",
                                                timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert procs[k - 1].poll() is None and time.monotonic() < deadline, \
                    open(tmp_path / f"h{k}.log").read()[-2000:]
                time.sleep(0.1)
        envs = []
        for k in (1, 2, 3):
            with open(tmp_path / f"h{k}" / "etc" / "replica.env") as f:
                envs.append(dict(line.strip().split("=", 1) for line in f
                                 if line.strip() and not line.startswith("#")))
        urls = envs[0]["CARDCORE_NATS_URLS"]
        assert urls == ",".join(f"nats://127.0.0.{k}:{ports[0]}" for k in (1, 2, 3))

        def start(name: str, shard: int, *extra: str) -> ReplicaProcess:
            k = int(name[1:]) + 1  # r0 on h1, ...
            replicas.append(ReplicaProcess(str(tmp_path / f"h{k}" / "data" / f"shard-{shard}"),
                                           shard, urls, *extra, env=envs[k - 1]))
            return replicas[-1]

        three_replicas = three(start)
        front = SubmitClient(urls.split(","), NatsTLS(
            str(out / "front" / "ca.pem"), str(out / "front" / "nats-front.pem"),
            str(out / "front" / "nats-front.key")))
        try:
            open_cards(front, 3, random.Random(3))
        finally:
            front.close()
        front_etc = tmp_path / "front" / "etc"
        os.makedirs(front_etc)
        for item in (out / "front").iterdir():
            os.rename(item, front_etc / item.name)
        assert oct(os.stat(front_etc / "keyring.json").st_mode & 0o777) == "0o600"
        with open(front_etc / "front.env") as f:
            front_env = dict(line.strip().split("=", 1) for line in f
                             if line.strip() and not line.startswith("#"))
        saved = {k: os.environ.get(k) for k in front_env}
        os.environ.update(front_env)  # (ServerProcess passes its environment on)
        try:
            served = ServerProcess(str(tmp_path / "front" / "data"), "--cluster")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        try:
            till = Client(served.stub)
            number = till.funded_card(4_200)
            assert till.card(number).balance.available_minor == 4_200
        finally:
            served.stop()
        follower = ReplicaProcess.__new__(ReplicaProcess)
        follower.data_dir = os.path.join(served.data_dir, f"shard-{SHARD}")
        host_tls = NatsTLS(*(envs[0][f"CARDCORE_NATS_{what}"].replace("{shard}", str(SHARD))
                             for what in ("CA", "CERT", "KEY")))  # (as the replica reads them)
        converge_and_stop(three_replicas, urls, SHARD, host_tls)
        identical(three_replicas + [follower])
        ledger = Ledger(os.path.join(three_replicas[0].data_dir, "ledger"), readonly=True)
        try:  # the genesis program is the one cluster-config put on every host
            with open(cafe) as f:
                assert ledger.read_programs()[1]["source"] == f.read()
        finally:
            ledger.close()
        import json

        from cardcore.jetlog import SHARDS_BUCKET, NatsThread, replica_inbox_prefix
        nt = NatsThread(urls.split(","), "cardcore-test", host_tls, replica_inbox_prefix(SHARD))
        try:  # the replicas ran with the keyring cluster-config put on every host
            genesis = nt.call(nt.call(nt.js.key_value(SHARDS_BUCKET)).get(f"s{SHARD}-genesis"))
            assert json.loads(genesis.value)["keyring"] == keyring.index_fingerprint()
        finally:
            nt.close()
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        for f in logs:
            f.close()


def first_group(urls: str, shard: int = SHARD) -> int:
    """The first group the shard's stream still holds (retention purges before it)."""
    from cardcore.jetlog import NatsThread, stream_name

    nt = NatsThread(urls.split(","), "cardcore-test")
    try:
        return nt.call(nt.js.stream_info(stream_name(shard))).state.first_seq
    finally:
        nt.close()


def test_retention_purges_only_what_every_replica_holds_and_one_past_it_needs_a_backup(
        nats_cluster, start_replica, tmp_path):
    """Three replicas report their checkpoints; the leader purges the groups all of them hold,
    never one a replica still needs: a stopped follower holds the stream back and, restarted,
    catches up. A new empty replica after a purge exits 2 saying to seed it from a backup; one
    seeded from a peer's backup follows, and all end identical."""
    import subprocess
    import sys

    retention = ("--retention-check-ms", "200", "--retain-groups", "0")
    replicas = [start_replica(f"r{k}", SHARD, *LEASE, *retention) for k in range(3)]
    deadline = time.monotonic() + 30
    while not any("leading" in r.roles() for r in replicas):
        assert time.monotonic() < deadline, [r.log()[-2000:] for r in replicas]
        time.sleep(0.05)
    for k in range(4):
        opened_cards(nats_cluster, 3, 40 + k)
    deadline = time.monotonic() + 30
    while first_group(nats_cluster.urls) == 1:  # every replica checkpoints, reports, purge
        assert time.monotonic() < deadline, [r.log()[-1500:] for r in replicas]
        time.sleep(0.1)
    assert first_group(nats_cluster.urls) <= min(applied(r) for r in replicas) + 1

    # a stopped follower's checkpoint holds the stream back
    stopped = next(r for r in replicas if r is not leader_of(replicas))
    assert stopped.stop() == 0
    held = applied(stopped)
    for k in range(3):
        opened_cards(nats_cluster, 3, 50 + k)
    time.sleep(1.0)  # several purge checks
    assert first_group(nats_cluster.urls) <= held + 1 < stream_end(nats_cluster.urls)
    back = start_replica(stopped.data_dir.rsplit("/", 1)[1], SHARD, *LEASE, *retention)
    back.wait_role("following")
    live = [r for r in replicas if r is not stopped] + [back]
    deadline = time.monotonic() + 30
    while first_group(nats_cluster.urls) <= held + 1:  # back and reporting: purged past it
        assert time.monotonic() < deadline, (held, first_group(nats_cluster.urls),
                                             [r.log()[-1000:] for r in live])
        time.sleep(0.1)

    # an empty replica cannot start from a purged stream: exit 2, a backup named
    empty = start_replica("r-empty", SHARD, *LEASE, *retention)
    assert empty.proc.wait(30) == 2, empty.log()[-2000:]
    assert "retention" in empty.log() and "--seed-from" in empty.log()
    # ... one seeded from a peer's backup follows
    peer = next(r for r in live if r is not leader_of(live))
    made = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "backup", "--data-dir",
                           peer.data_dir, "--to", str(tmp_path / "backup")],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    seeded = start_replica("r-seeded", SHARD, *LEASE, *retention,
                           "--seed-from", str(tmp_path / "backup"))
    seeded.wait_role("following")
    before = first_group(nats_cluster.urls)
    opened_cards(nats_cluster, 2, 60)
    deadline = time.monotonic() + 30
    while first_group(nats_cluster.urls) <= before:  # the refused one holds nothing back
        assert time.monotonic() < deadline, (before, [r.log()[-800:] for r in live + [seeded]])
        time.sleep(0.1)
    everyone = live + [seeded]
    converge_and_stop(everyone, nats_cluster.urls)
    identical(everyone)


def test_the_first_group_kept_waits_for_every_live_replica():
    """Retention's rule (jetlog.first_kept): the oldest checkpoint of the replicas heard from
    within the stale time, once there are as many of them as the stream has copies."""
    from cardcore.jetlog import first_kept

    now = 1_000_000.0
    held = {"a": [500, now - 1], "b": [300, now - 5], "c": [900, now - 2]}
    assert first_kept(held, now, 3, 3600, 0) == 301
    assert first_kept(held, now, 3, 3600, 100) == 201
    assert first_kept(held, now, 3, 3600, 10_000) == 0
    assert first_kept(held, now, 4, 3600, 0) == 0           # a copy never heard from: keep all
    held["b"][1] = now - 7200                               # b silent past the stale time ...
    assert first_kept(held, now, 3, 3600, 0) == 0           # ... and too few live: keep all
    held["d"] = [700, now]                                  # its replacement reports
    assert first_kept(held, now, 3, 3600, 0) == 501


def test_a_servers_backup_is_refused_as_a_seed_and_the_folder_left_empty(
        nats_cluster, start_replica, tmp_path):
    """A backup whose ledger followed no stream (a single server's: log_applied 0, a journal of
    its own) is no replica's start: exit 2, nothing left in the new replica's folder."""
    import subprocess
    import sys

    server = tmp_path / "server"
    (server / "ledger").mkdir(parents=True)
    ledger = Ledger(str(server / "ledger"))
    try:
        ledger.apply_group([open_op(rid(), new_card_number())], NOW)
    finally:
        ledger.close()
    made = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "backup", "--data-dir",
                           str(server), "--to", str(tmp_path / "backup")],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    seeded = start_replica("r-from-server", SHARD, *LEASE, "--seed-from",
                           str(tmp_path / "backup"))
    assert seeded.proc.wait(30) == 2, seeded.log()[-2000:]
    assert "followed no stream" in seeded.log()
    assert not os.path.exists(os.path.join(seeded.data_dir, "ledger", "data.mdb"))


@pytest.fixture
def permissions_before_ticks(monkeypatch):
    """The roles' NATS permissions as cluster-config made them before the ticks (a shard's
    replica user's too, which came later: the same without its ticks)."""
    from cardcore.server import clusterconf

    def untick(perms: dict) -> dict:
        return {k: [s for s in v if not s.endswith(".tick")] if isinstance(v, list) else v
                for k, v in perms.items()}

    old = {role: untick(perms) for role, perms in clusterconf.ROLE_PERMISSIONS.items()}
    assert old != clusterconf.ROLE_PERMISSIONS
    monkeypatch.setattr(clusterconf, "ROLE_PERMISSIONS", old)
    one_shard = clusterconf.shard_replica_permissions
    monkeypatch.setattr(clusterconf, "shard_replica_permissions",
                        lambda shard, admin_shard=None: untick(one_shard(shard, admin_shard)))


def test_users_made_before_the_ticks_cost_one_warning_and_followers_still_follow(
        permissions_before_ticks, tls_cluster):
    """NATS users from a configuration made before the ticks (the replica role may neither say
    nor hear ``cardcore.*.tick``): the leader's first tick is refused, it says so once and
    ticks no more; the followers, hearing none, follow by asking the stream: every replica ends
    with every group."""
    cluster, start, _ = tls_cluster
    replicas = three(start)
    front = SubmitClient(cluster.urls.split(","), cluster.tls_for("front"))
    try:
        for k in range(4):  # groups one after another: a tick refused after each, before
            open_cards(front, 2, random.Random(k))
    finally:
        front.close()
    leader = leader_of(replicas)
    said = leader.log().count("may not use the ticks")
    converge_and_stop(replicas, cluster.urls, SHARD, cluster.tls_for("replica"))
    assert said == 1, leader.log()[-3000:]
    identical(replicas)


def test_one_node_with_a_foreign_certificate_does_not_stop_a_start(tmp_path):
    """A node whose certificate is not the cluster CA's (renewed from another CA, a stray host)
    among good ones: every start still connects (a refusal costs a retry from a random node);
    only every node refusing is a setting (NatsRefused). Also: once connected, the connection's
    later errors are not counted (found by a review: they piled up for its whole life)."""
    import socket
    import ssl

    from cardcore.jetlog import NatsRefused, NatsThread
    from cardcore.server import certs
    from cardcore.server.devcluster import NatsCluster, free_ports

    other = str(tmp_path / "other-ca")
    certs.make_ca(other, "some other CA")
    certs.make_nats_node_cert(other, "stray", ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(other, "nats-node-stray.pem"),
                        os.path.join(other, "nats-node-stray.key"))
    port, = free_ports(1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)

    def stray() -> None:  # says INFO as a TLS node does, then a handshake with its certificate
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.sendall(b'INFO {"server_id":"stray","tls_required":true,'
                             b'"max_payload":1048576,"proto":1}\r\n')
                ctx.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    threading.Thread(target=stray, daemon=True).start()
    cluster = NatsCluster(str(tmp_path / "nats"), tls=True)
    try:
        urls = [f"nats://127.0.0.1:{port}"] + cluster.urls.split(",")[:1]
        for k in range(6):
            nt = NatsThread(urls, f"cardcore-test-{k}", cluster.tls_for("replica"))
            nt.close()
        with pytest.raises(NatsRefused, match="refusals"):
            NatsThread(urls[:1], "cardcore-test-stray-only", cluster.tls_for("replica"))
    finally:
        listener.close()
        cluster.stop()


def test_every_replica_of_a_shard_holds_the_shards_keyring_or_none(
        nats_cluster, start_replica, tmp_path):
    """The first replica's keyring is named in the shard's genesis (its index key's
    fingerprint); a replica with another keyring, or none, exits 2 saying so; one with the same
    keyring follows and ends identical."""
    from cardcore.keyring import Keyring

    ours, other = (Keyring.load_or_create(str(tmp_path / f"{name}.json")) for name in ("a", "b"))
    assert ours.index_fingerprint() != other.index_fingerprint()
    assert ours.index_key.hex() not in ours.index_fingerprint()
    first = start_replica("r0", SHARD, *LEASE, "--keyring", ours.path)
    first.wait_role("leading")
    for name, extra in (("r-other", ("--keyring", other.path)), ("r-none", ())):
        wrong = start_replica(name, SHARD, *LEASE, *extra)
        assert wrong.proc.wait(30) == 2, wrong.log()[-2000:]
        assert "same keyring" in wrong.log() and ours.index_fingerprint() in wrong.log()
        assert other.index_key.hex() not in wrong.log()
    garbage = tmp_path / "garbage.json"
    garbage.write_text('["not", "a keyring"]')
    broken = start_replica("r-garbage", SHARD, *LEASE, "--keyring", str(garbage))
    assert broken.proc.wait(30) == 2, broken.log()[-2000:]  # a setting: not restarted
    assert "neither a cardcore keyring" in broken.log()
    second = start_replica("r1", SHARD, *LEASE, "--keyring", ours.path)
    second.wait_role("following")
    opened_cards(nats_cluster, 5, 70)
    both = [first, second]
    converge_and_stop(both, nats_cluster.urls)
    identical(both)


def test_a_nats_connection_closes_cleanly_with_every_node_down_and_closes_once(nats_cluster):
    """NatsThread.close with no node answering (nats-py reconnecting, a subscription waiting):
    the connection closed without a drain, every task of its loop finished and the loop closed
    (a task left pending was destroyed later on a closed loop, with a traceback); a second close
    does nothing, and a call after it is a TimeoutError, not the loop's RuntimeError."""
    import asyncio

    from cardcore.jetlog import NatsThread

    nt = NatsThread(nats_cluster.urls.split(","), "cardcore-test")

    async def ignore(msg) -> None:
        pass

    nt.call(nt.nc.subscribe("cardcore.test.close", cb=ignore))
    nats_cluster.stop()
    deadline = time.monotonic() + 10
    while not nt.nc.is_reconnecting:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    nt.close()
    assert nt.loop.is_closed()
    assert not [t for t in asyncio.all_tasks(nt.loop) if not t.done()]
    nt.close()
    with pytest.raises(TimeoutError):
        nt.call(asyncio.sleep(0))


def test_the_docs_example_submits_to_a_running_shard(nats_cluster, start_replica):
    """docs/cluster.md's "Trying it" block, as written but for its URLs and certificates (this
    cluster's, plain): the card opened and topped up on shard 0, the answers printed."""
    import re
    import subprocess
    import sys

    three(start_replica)
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "cluster.md")
    with open(docs) as f:
        text = f.read()
    block = re.search(r"\*\*Trying it\.\*\*.*?```python\n(.*?)```", text, re.S).group(1)
    code = re.sub(r'^URLS = .*$', f"URLS = {nats_cluster.urls!r}", block, count=1, flags=re.M)
    code = re.sub(r'^CERTS = .*$', "CERTS = None", code, count=1, flags=re.M)
    assert code.count("URLS = ") == 1 and "CERTS = None" in code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"op {L.OP_OPEN} reason 0 principal after 0",
        f"op {L.OP_TOP_UP} reason 0 principal after 10000"], done.stdout
    # a submit's epoch (the front's fence): -1 any leader, which says its own; another epoch
    # than the leader's refused (N and its epoch), not applied; 0 (the docs' client) as before
    from cardcore.groups import encode_group
    from cardcore.jetlog import submit_subject
    from cardcore.server.replica import (ANY_EPOCH, APPLIED_EPOCH, APPLIED_IN, NOT_LEADER,
                                         decode_reply, reply_epoch)

    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        def raw(ops: list, epoch: int) -> bytes:
            return client.nt.call(client.nt.nc.request(submit_subject(SHARD),
                                                       encode_group(ops, epoch), timeout=5)).data

        first, second = new_card_number(), new_card_number()
        said = raw([open_op(rid(), first)], ANY_EPOCH)
        epoch = reply_epoch(said)
        assert said[:1] == APPLIED_EPOCH and epoch > 0
        refused = raw([open_op(rid(), second)], epoch + 1)
        assert refused[:1] == NOT_LEADER and reply_epoch(refused) == epoch
        got = raw([open_op(rid(), second)], epoch)  # (not "exists": the refused one was not)
        assert got[:1] == APPLIED_EPOCH and decode_reply(got)[0].reason == L.R_OK
        assert raw([op(rid(), L.OP_TOP_UP, second, 5)], 0)[:1] == APPLIED_IN
    finally:
        client.close()


def test_a_replica_refuses_a_single_servers_data_folder(tmp_path):
    """`cardcore replica` pointed at a single server's data folder (its ledger keeps a local
    group log) exits 2 saying so, before it touches NATS or writes anything there."""
    import subprocess
    import sys

    from cardcore.durable import DurableLedger, log_folder

    path = str(tmp_path / "ledger")
    DurableLedger(lambda: Ledger(path, sync=False), log_folder=log_folder(path),
                  sync=False).close()
    before = sorted(os.listdir(tmp_path))
    done = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "replica", "--shard", "0",
                           "--data-dir", str(tmp_path), "--nats", "nats://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "single server's data folder" in done.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no replica.id


def test_make_cluster_starts_prints_where_and_stops_on_ctrl_c_twice_on_one_folder(tmp_path):
    """`make cluster` (devcluster's main) on a new folder and again on the same one: each time
    it prints the NATS URLs with their monitoring ports, each shard's leader, the "Trying it"
    pointer and shard 0's front, whose printed command opens a card (first run) that the
    second run's front still shows; SIGINT stops everything (exit 0). The second start goes
    on from the first's stores and ledgers (its replicas' logs hold the first run's roles too)."""
    import re
    import subprocess
    import sys

    for run in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "cardcore.server.devcluster", "--data-dir",
                                 str(tmp_path / "cluster"), "--no-tls", "--front-listen",
                                 "127.0.0.1:0"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if "Ctrl-C stops everything" in line or "Traceback" in line:
                    break
            text = "".join(lines)
            assert "Ctrl-C stops everything" in text, (run, text)
            assert "/healthz" in text and "Trying it" in text, text
            assert text.count(" leader ") == 2, text  # shards 0 and 1
            exports = re.search(r"try it +export (CARDCORE_LISTEN=\S+) (CARDCORE_TOKEN_FILE=\S+)",
                                text)
            assert exports, text
            env = dict(os.environ, **dict(e.split("=", 1) for e in exports.groups()))
            cli = [sys.executable, "-m", "cardcore.server.cli"]
            number = "6225880000001231"

            def run_cli(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run(cli + list(args), capture_output=True, text=True,
                                      timeout=60, env=env)

            if run == 0:  # the README's first steps, as the printed lines say
                out = run_cli("open-card", number, "--tier", "1", "--name", "Li Wei")
                assert out.returncode == 0 and "OPERATION_TYPE_OPEN_CARD" in out.stdout, out
                out = run_cli("top-up", number, "12.50")
                assert out.returncode == 0 and "12.50" in out.stdout, out
            out = run_cli("card", number)
            assert out.returncode == 0 and re.search(r"balance +12\.50", out.stdout), out
            verify = re.search(r"verify +\.venv/bin/cardcore (verify .*?)  \(", text)
            assert verify, text
            out = run_cli(*verify.group(1).split())
            assert out.returncode == 0 and "clean" in out.stdout, out
            proc.send_signal(signal.SIGINT)
            rest = proc.communicate(timeout=60)[0]
            assert proc.returncode == 0 and "stopped" in rest, (run, rest)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_card_shards_take_the_admin_shards_changes_through_a_leaders_kill_9_and_refuse_their_own(
        tmp_path):
    """A cluster with an admin shard (docs/cluster.md, "The admin shard"), over mutual TLS with
    the roles' users: a terminal enrolled on the admin shard swipes on a card shard once the card
    shard's leader has relayed it; an enrolment sent to the card shard itself is refused
    (ADMIN_ELSEWHERE); the card shard's leader killed -9, the next one relays the revocation made
    meanwhile, once; both card replicas end identical; a replica started without --admin-shard
    on the card shard refuses to start (exit 2)."""
    from cardcore.server.clusterconf import shard_replica_role
    from cardcore.server.devcluster import NatsCluster
    from test_ledger import revoke, swipe

    admin, card = 1, 0
    cluster = NatsCluster(str(tmp_path / "nats"), tls=True, admin_shard=admin)
    started: list[ReplicaProcess] = []

    def start(name: str, shard: int, *extra: str) -> ReplicaProcess:
        started.append(ReplicaProcess(str(tmp_path / name), shard, cluster.urls, *LEASE, *extra,
                                      *cluster.replica_args(shard)))
        return started[-1]

    client = SubmitClient(cluster.urls.split(","), cluster.tls_for("front"))
    try:
        start("admin", admin, "--admin-shard", str(admin)).wait_role("leading")
        cards = [start(f"c{k}", card, "--admin-shard", str(admin)) for k in range(2)]
        deadline = time.monotonic() + 30
        while not any("leading" in r.roles() for r in cards):
            assert time.monotonic() < deadline, [r.log()[-2000:] for r in cards]
            time.sleep(0.05)
        got = submit(client, [enroll("e5", 5, 3, at=time.time_ns() // 1000),
                              add_operator("alice", "alice", 2, at=time.time_ns() // 1000)], admin)
        assert [o.reason for o in got] == [L.R_OK, L.R_OK]
        number = new_card_number(random.Random(5))
        now = time.time_ns() // 1000
        got = submit(client, [open_op("o", number, at=now), op("t", L.OP_TOP_UP, number, 500, at=now),
                              enroll("e6", 6, 3, at=now)], card)
        assert [o.reason for o in got] == [L.R_OK, L.R_OK, L.R_ADMIN_ELSEWHERE]
        # a submitter may not send a leader's own operations: a relay's mark, a key in the
        # relayed namespace (it would answer a relayed change from a planted record)
        from cardcore.groups import relay_ops
        forged = enroll("e7", 7, 3, at=now)
        forged.request_key = L.RELAYED_KEY_PREFIX + forged.request_key
        for ops in (relay_ops(admin, 99, encode_group([enroll("e8", 8, 3, at=now)], now)),
                    [forged]):
            assert client.submit(card, ops) == b"E"
        ksn = 0

        def swipe_until(reason: int) -> None:
            """Top-ups at terminal 5 (each with its next KSN) until one is answered ``reason``
            (the relay is a moment behind the admin shard); those before it were refused."""
            nonlocal ksn
            deadline = time.monotonic() + 20
            while True:
                ksn += 1
                got = submit(client, [swipe(f"s{ksn}", L.OP_TOP_UP, number, 1, 5, ksn)], card)[0]
                if got.reason == reason:
                    return
                assert got.reason in (L.R_TERMINAL_UNKNOWN, L.R_OK), got
                assert time.monotonic() < deadline, got
                time.sleep(0.05)

        swipe_until(L.R_OK)
        # the lease's holder (on a loaded machine a leader whose lease lapsed says so only at
        # its next renewal: the lease, not the log, says who leads)
        holder = lease_holder(cluster.urls, card, cluster.tls_for(shard_replica_role(card)))
        (leader,) = [r for r in cards if r.pid == holder]
        leader.kill()
        got = submit(client, [revoke("r5", 5, at=time.time_ns() // 1000)], admin)
        assert got[0].reason == L.R_OK
        swipe_until(L.R_TERMINAL_REVOKED)
        restarted = start(os.path.basename(leader.data_dir), card, "--admin-shard", str(admin))
        cards = [r for r in cards if r is not leader] + [restarted]
        converge_and_stop(cards, cluster.urls, card, cluster.tls_for(shard_replica_role(card)))
        identical(cards)
        ledger = Ledger(os.path.join(cards[0].data_dir, "ledger"), readonly=True)
        try:
            assert [(t[3], t[1]) for t in ledger.read_terminals()] == [(5, L.TERMINAL_REVOKED)]
            assert [o["name"] for o in ledger.read_operators()] == ["alice"]
            enrolled = sum(1 for _, v in ledger.dump()["journal"]
                           if L.JOURNAL.unpack(v)[1] == L.OP_TERMINAL_ENROLLED)
            assert enrolled == 1  # relayed once, through the kill
            assert ledger.read_admin_relay()[:2] == (admin, L.RELAY_ROLE_CARD)
        finally:
            ledger.close()
        stray = start("stray", card)  # its catch-up reads the place the shard's log says
        assert stray.proc.wait(60) == 2, stray.log()[-2000:]
        assert "every replica of a cluster has the same --admin-shard" in stray.log()
    finally:
        client.close()
        for r in started:
            if r.proc.poll() is None:
                r.stop()
        cluster.stop()


def test_only_a_new_shard_with_the_admin_shards_program_takes_a_place_beside_it(
        nats_cluster, start_replica):
    """A replica that would take its shard's place beside the admin shard exits 2 (a setting to
    fix) when its shard has entries of its own (its admin state or cards would not agree with
    the admin shard's), or, as its leader, when the shard was made with another program (every
    program the admin shard loads is judged against the one before)."""
    admin, card, other = 1, 0, 2
    start_replica("admin", admin, *LEASE, "--admin-shard", str(admin)).wait_role("leading")
    old = start_replica("old", card, *LEASE)
    old.wait_role("leading")
    client = SubmitClient(nats_cluster.urls.split(","))
    try:
        open_cards(client, 1, random.Random(3), card)
    finally:
        client.close()
    assert old.stop() == 0
    again = start_replica("old", card, *LEASE, "--admin-shard", str(admin))
    assert again.proc.wait(60) == 2, again.log()[-2000:]
    assert "entries beyond its genesis" in again.log()
    cafe = start_replica("cafe", other, *LEASE, "--program", CAFE, "--admin-shard", str(admin))
    assert cafe.proc.wait(60) == 2, cafe.log()[-2000:]
    assert "genesis program is not admin shard 1's" in cafe.log()
