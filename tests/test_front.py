"""A cluster's front (``cardcore serve --cluster``; docs/cluster.md): the real gRPC services over
three real replicas on three real NATS nodes, through the generated stubs, as a till and an
operator use them. Skipped, saying why, without the cluster extra (``make cluster-deps``)."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import pytest

from cardcore.cards import card_id
from cardcore.keyring import Keyring
from cardcore.ledger import Ledger
from cardcore.server.devcluster import leader_of
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from cluster_fixtures import nats_monitor
from conftest import (Admin, Client, ServerProcess, bearer, failure_of, new_card_number, now_us,
                      rid)
from test_cluster import LEASE, SHARD, converge_and_stop, identical, stream_leader_node, three
from test_security import PIN

R = cpb.Reason


@pytest.fixture
def keyring(tmp_path) -> str:
    """The chain's keyring, one file for every front and replica (the replicas use its index
    key)."""
    path = str(tmp_path / "keyring.json")
    Keyring.load_or_create(path, str(tmp_path))
    return path


@pytest.fixture
def start_front(tmp_path, nats_cluster, keyring, start_server):
    """Start fronts of SHARD on the test's NATS cluster (conftest's start_server: every one is
    stopped at the end, before the NATS nodes)."""
    def start(name: str, *extra: str) -> ServerProcess:
        return start_server("--cluster", "--shard", str(SHARD), "--nats", nats_cluster.urls,
                            "--keyring", keyring, *extra, data_dir=str(tmp_path / name))

    return start


def until(check, timeout_s: float = 10.0, what: str = ""):
    """``check()``'s first true value within the time, polled."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def test_two_fronts_serve_one_shard_each_reading_what_the_other_wrote(
        nats_cluster, start_replica, start_front, keyring):
    """Through front A: the bootstrap admin, a terminal enrolled, a card opened with a PIN,
    topped up and paid from with the PIN. Through front B (its own follower): the same card,
    the operation by its request id (a read that waits for the stream's end), the terminal
    swiping there too (admin state reached B), an operator added on B usable on A. Both fronts'
    followers and the three replicas end identical."""
    replicas = three(start_replica, "--keyring", keyring)
    a = start_front("a")
    admin = Admin(a.channel, a.admin_token)
    till = admin.enroll(7, 3)
    number = new_card_number()
    a.stub.OpenCard(till.open_card(rid(), number, PIN))
    a.stub.TopUp(till.top_up(rid(), number, 10_000))
    paid_id = rid()
    paid = a.stub.Purchase(till.purchase(paid_id, number, PIN, 2_500))
    assert paid.reason == R.REASON_OK and paid.balance_after.available_minor == 7_500
    assert Client(a.stub).card(number).balance.available_minor == 7_500  # read your write

    b = start_front("b", "--no-sync")  # (a writer's setting: a front says it has no use for it)
    assert "--no-sync not used by a front" in b.log()
    assert not os.path.exists(os.path.join(b.data_dir, "admin.token"))  # A's admin is the shard's
    asked = b.stub.GetOperation(pb.GetOperationRequest(
        request_id=paid_id, caller=cpb.Caller(kind=cpb.CALLER_KIND_TERMINAL, id=7)))
    assert asked.found and asked.result.seq == paid.seq
    assert Client(b.stub).card(number).balance.available_minor == 7_500
    again = b.stub.Purchase(till.purchase(rid(), number, PIN, 500))  # the terminal on B
    assert again.reason == R.REASON_OK and again.balance_after.available_minor == 7_000
    # an exact re-send on the other front: the KSN was applied on the shard
    replay = till.purchase(rid(), number, PIN, 100)
    assert a.stub.Purchase(replay).reason == R.REASON_OK
    with pytest.raises(grpc.RpcError) as err:
        b.stub.Purchase(replay)
    assert failure_of(err.value).reason == R.REASON_KSN_REPLAYED

    admin_b = Admin(b.channel, a.admin_token)
    token = admin_b.add_operator("store-3", cpb.OPERATOR_ROLE_STORE_MANAGER, (3,))

    def a_knows_it():  # (a store manager may not see a card: known, but not allowed)
        try:
            a.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=number)),
                           metadata=bearer(token))
        except grpc.RpcError as exc:
            return exc.code() != grpc.StatusCode.UNAUTHENTICATED
        return True

    with pytest.raises(grpc.RpcError) as err:  # a token nobody was given: not known anywhere
        a.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=number)),
                       metadata=bearer("x" * 43))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    until(a_knows_it, what="an operator added through B known to A")
    # a data key rotated through A: B (its file holds the rotation, as a copied one would)
    # re-reads it once its follower holds the rotation, and seals what it opens under it (a
    # server started on a keyring from before a rotation: test_security's rotation test)
    rotated = admin.stub.RotateDataKey(apb.RotateDataKeyRequest(
        client_time_us=now_us(), request_id=rid()), metadata=admin.metadata)
    assert rotated.key_version == 2
    # (B re-reads the file A made the key current in, or, its follower holding the rotation
    # before A made it current, makes the saved key current itself: either says so)
    until(lambda: re.search(r"data key version 2 (made )?current", b.log()), 10,
          "B re-read its keyring")
    later = new_card_number()
    assert b.stub.OpenCard(till.open_card(rid(), later, PIN)).reason == R.REASON_OK
    # idle, the replicas and both followers wait for the leader's ticks and ask NATS a few
    # times a second (before ticks, each asked for the stream's end 50 or 200 times a second:
    # over a thousand requests in these two seconds)
    before = replica_requests(nats_cluster)
    time.sleep(2.0)
    asked = replica_requests(nats_cluster) - before
    assert 0 < asked < 300, asked
    assert Client(b.stub).card(number).balance.available_minor == 6_900  # (B's follower woke)
    a.stop()
    b.stop()
    converge_and_stop(replicas, nats_cluster.urls)
    followers = [type(replicas[0]).__new__(type(replicas[0])) for _ in (a, b)]
    for follower, front in zip(followers, (a, b)):
        follower.data_dir = os.path.join(front.data_dir, f"shard-{SHARD}")
    identical(replicas + followers)
    ledger = Ledger(os.path.join(replicas[0].data_dir, "ledger"), readonly=True)
    try:
        index_key = Keyring.load(keyring).index_key
        sealed = dict(ledger.read_sealed(b"", 1000))
        assert Keyring.sealed_version(sealed[card_id(index_key, later)]) == 2  # sealed by B
        assert Keyring.sealed_version(sealed[card_id(index_key, number)]) == 2  # re-sealed
        assert ledger.read_data_key()[0] == 2
    finally:
        ledger.close()


def replica_requests(cluster) -> int:
    """Messages the replicas' and followers' NATS connections have sent (requests: a stream's
    end, a get, a lease, a report), from every node's monitoring page."""
    return sum(c.get("in_msgs", 0) for port in cluster.http_ports
               for c in nats_monitor(port, "connz?limit=4096").get("connections", [])
               if c.get("name", "").startswith("cardcore-replica-"))


PIPELINED = 8  # a streaming terminal's swipes in flight (its budget's room: 10 unanswered)


class Swipes:
    """Terminals swiping 1.00 PIN purchases through a front until stopped: ``count`` one at a
    time each (unary Purchase), then ``streams`` more that pipeline theirs on a SwipeStream
    (PIPELINED in flight, each swipe's KSN the next: one applied before an earlier one would
    make that one KSN_REPLAYED). Every answer kept (request id -> (terminal index, reason,
    journal seq))."""

    def __init__(self, front: ServerProcess, count: int = 3, streams: int = 0) -> None:
        admin = Admin(front.channel, front.admin_token)
        self.front = front
        self.terminals = [admin.enroll(tid, 3) for tid in range(1, count + streams + 1)]
        self.numbers = []
        for till in self.terminals:
            number = new_card_number()
            front.stub.OpenCard(till.open_card(rid(), number, PIN))
            front.stub.TopUp(till.top_up(rid(), number, 1_000_000))
            self.numbers.append(number)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: dict[str, tuple[int, int, int]] = {}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._swipe if k < count else self._stream,
                                         args=(k,)) for k in range(count + streams)]

    def _swipe(self, k: int) -> None:
        till, number = self.terminals[k], self.numbers[k]
        while not self.stop.is_set():
            request_id = rid()
            try:  # each swipe has 30 s: more than a failover (the lease's 2 s and a catch-up)
                got = self.front.stub.Purchase(till.purchase(request_id, number, PIN, 100),
                                               timeout=30)
                reason, seq = got.reason, got.seq
            except grpc.RpcError as exc:  # (its own deadline, a transport error: no detail)
                try:
                    reason = failure_of(exc).reason
                except AssertionError:
                    reason = -1
                seq = 0
                with self.lock:
                    self.failures.append(f"{exc.code()} {reason}")
            with self.lock:
                self.answers[request_id] = (k, reason, seq)

    def _stream(self, k: int) -> None:
        till, number = self.terminals[k], self.numbers[k]
        room = threading.Semaphore(PIPELINED)

        def swipes():
            while not self.stop.is_set():
                if room.acquire(timeout=0.1):
                    yield pb.Operation(purchase=till.purchase(rid(), number, PIN, 100))

        try:
            for reply in self.front.stub.SwipeStream(swipes()):
                room.release()
                with self.lock:
                    self.answers[reply.request_id] = (k, reply.reason, reply.seq)
        except grpc.RpcError as exc:
            with self.lock:
                self.failures.append(f"stream {exc.code()}")

    def __enter__(self) -> "Swipes":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        alive = [t.is_alive() for t in self.threads]  # (a terminal that died stopped swiping)
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert all(alive), alive

    def answered_by(self, n: int, what: str) -> None:
        until(lambda: len(self.answers) >= n, 60, what)

    def check(self) -> None:
        """Every swipe answered OK, no journal entry named twice, each card's balance its
        funds less exactly the answered purchases."""
        assert not self.failures, self.failures
        ok = {k: a for k, a in self.answers.items() if a[1] == R.REASON_OK}
        assert len(ok) == len(self.answers), [a for a in self.answers.values()
                                              if a[1] != R.REASON_OK]
        seqs = [a[2] for a in ok.values()]
        assert len(set(seqs)) == len(seqs)
        client = Client(self.front.stub)
        for k, number in enumerate(self.numbers):
            paid = sum(1 for a in ok.values() if a[0] == k)
            assert client.card(number).balance.available_minor == 1_000_000 - 100 * paid, k


def test_kill_9_the_leader_under_pin_swipes_through_a_front_every_answer_applied_once(
        nats_cluster, start_replica, start_front, keyring):
    """Three terminals swipe PIN purchases through one front while the shard's leader is killed
    -9. The front carries each request through the failover (sent again to the next leader,
    a swipe that had been applied answered with its original outcome): every swipe gets an
    answer, every OK is applied exactly once, and the cards' balances are the initial funds
    less exactly the answered purchases."""
    replicas = three(start_replica, "--keyring", keyring)
    front = start_front("front")
    with Swipes(front, streams=1) as load:
        load.answered_by(30, "swipes answered before the kill")
        old = leader_of(replicas)
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(10)
        others = [r for r in replicas if r is not old]
        before = len(load.answers)
        until(lambda: any(r.roles()[-1:] == ["leading"] for r in others), 30, "a new leader")
        load.answered_by(before + 30, "swipes answered by the new leader")
    load.check()
    front.stop()
    sent_again = re.search(r"(\d+) requests sent again", front.log())
    assert sent_again and int(sent_again.group(1)) > 0, front.log()[-2000:]  # the failover's
    converge_and_stop(others, nats_cluster.urls)
    follower = type(old).__new__(type(old))
    follower.data_dir = os.path.join(front.data_dir, f"shard-{SHARD}")
    identical(others + [follower])


def test_kill_9_the_nats_node_leading_the_stream_under_swipes_through_a_front(
        nats_cluster, start_replica, start_front, keyring):
    """The NATS node that leads the shard's stream killed -9 under PIN swipes through a front,
    then started again: the stream elects another leader, the leader replica re-sends its
    append, the front its submits (its connection moves to a live node); every swipe answered
    OK and applied once; the replicas and the front's follower identical after."""
    replicas = three(start_replica, "--keyring", keyring)
    front = start_front("front")
    with Swipes(front) as load:
        load.answered_by(30, "swipes answered before the kill")
        node = stream_leader_node(nats_cluster.urls)
        nats_cluster.kill_node(node)
        before = len(load.answers)
        load.answered_by(before + 30, "swipes answered without the node")
        nats_cluster.start_node(node)
        load.answered_by(len(load.answers) + 30, "swipes answered with the node back")
    load.check()
    front.stop()
    converge_and_stop(replicas, nats_cluster.urls)
    follower = type(replicas[0]).__new__(type(replicas[0]))
    follower.data_dir = os.path.join(front.data_dir, f"shard-{SHARD}")
    identical(replicas + [follower])


def test_a_front_refuses_to_start_without_a_keyring_or_with_a_program(
        tmp_path, nats_cluster):
    """The settings a front cannot run with: exit 2, saying which."""
    import subprocess
    import sys

    for extra, said in ((("--keyring", str(tmp_path / "none.json")), "--keyring"),
                        (("--program", "x.toml"), "--program")):
        out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure",
                              "--cluster", "--nats", nats_cluster.urls, "--data-dir",
                              str(tmp_path / "front"), "--listen", "127.0.0.1:0", *extra],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and said in out.stderr, out.stderr


def test_a_front_with_mutual_tls_to_nats_serves_and_reads_everything(tmp_path, keyring):
    """On NATS with the roles' certificates: the front's submits (the front role), its follower
    (the follower role) and a read of everything (the stream's info, the front role's) work.
    The follower role reads the stream and reports its checkpoint, but may not append to a log,
    take a lease, make or purge a stream, take submissions or report another shard's
    checkpoint: a front host's keys cannot write a shard. The follower runs with its shard's
    certificate (nats:follower-s0); another shard's reaches nothing of shard 0."""
    from cardcore.server.devcluster import NatsCluster, ReplicaProcess, cluster_available

    why = cluster_available()
    if why:  # (before nats-py is imported: without the cluster extra it is not installed)
        pytest.skip(why)
    import nats.errors

    import nats.js.errors

    from cardcore.jetlog import (CHECKPOINTS_BUCKET, LEADERS_BUCKET, TICK, NatsThread,
                                 follower_inbox_prefix, log_subject, stream_name, submit_subject,
                                 tick_subject)
    from cardcore.server.clusterconf import shard_follower_role
    nodes = NatsCluster(str(tmp_path / "nats"), tls=True)
    replicas, front = [], None
    try:
        replicas = [ReplicaProcess(str(tmp_path / f"r{k}"), SHARD, nodes.urls, *LEASE,
                                   "--keyring", keyring, *nodes.replica_args())
                    for k in range(3)]
        until(lambda: any(r.roles()[-1:] == ["leading"] for r in replicas), 30, "a leader")
        # the follower runs with its shard's follower certificate (nats:follower-s0), named
        # with {shard} as front.env names it
        mine, theirs = nodes.tls_for("front"), nodes.tls_for(shard_follower_role(SHARD))
        template = nodes.tls_for("follower-s{shard}")
        front = ServerProcess(str(tmp_path / "front"), "--cluster", "--nats", nodes.urls,
                              "--keyring", keyring, "--nats-ca", mine.ca_file, "--nats-cert",
                              mine.cert_file, "--nats-key", mine.key_file, "--follower-cert",
                              template.cert_file, "--follower-key", template.key_file)
        client = Client(front.stub)
        number = client.funded_card(5_000)
        admin = Admin(front.channel, front.admin_token)
        listed = admin.stub.ListTerminals(apb.ListTerminalsRequest(), metadata=admin.metadata)
        assert list(listed.terminals) == []  # a read of everything: the stream's info asked
        assert client.card(number).balance.available_minor == 5_000
        nt = NatsThread(nodes.urls.split(","), "cardcore-test-follower", theirs,
                        follower_inbox_prefix(SHARD))
        try:
            end = nt.call(nt.js.stream_info(stream_name(SHARD))).state.last_seq
            assert nt.call(nt.js.get_msg(stream_name(SHARD), end)).seq == end  # reads: yes
            refused = [
                lambda: nt.js.publish(log_subject(SHARD), b"forged", timeout=1),
                lambda: nt.nc.request(f"$KV.{LEADERS_BUCKET}.s{SHARD}", b"x", timeout=1),
                lambda: nt.nc.request(f"$JS.API.STREAM.PURGE.{stream_name(SHARD)}", b"{}",
                                      timeout=1),
                lambda: nt.nc.request("$JS.API.STREAM.CREATE.CARDS_S9",
                                      b'{"name": "CARDS_S9", "subjects": ["x.9"]}', timeout=1),
                # another shard's retention report (a forged one could purge that stream)
                lambda: nt.js.publish(f"$KV.{CHECKPOINTS_BUCKET}.s{SHARD + 1}", b"{}",
                                      timeout=1)]
            for attempt in refused:
                with pytest.raises((nats.errors.Error, TimeoutError)):
                    nt.call(attempt(), 3)
            heard: list = []

            async def listen(msg):
                heard.append(msg.subject)

            ticks: list = []

            async def tick(msg):
                ticks.append(TICK.unpack(msg.data)[0])

            nt.call(nt.nc.subscribe(submit_subject(SHARD), cb=listen))
            nt.call(nt.nc.subscribe(tick_subject(SHARD), cb=tick))  # the follower role's: yes
            nt.call(nt.nc.flush())
            client.top_up(number, 1)  # a submission the follower's certificate must not hear
            time.sleep(0.5)
            assert heard == []
            assert nt.call(nt.js.stream_info(stream_name(SHARD))).state.last_seq == end + 1
            assert ticks == [end + 1]  # the leader's tick (the replica role's), heard
            # another shard's follower certificate reads nothing of shard 0, reports no
            # checkpoint for it and hears none of its ticks; its own shard's info it may ask
            # (no stream there yet: not found)
            other = NatsThread(nodes.urls.split(","), "cardcore-test-other-follower",
                               nodes.tls_for(shard_follower_role(SHARD + 1)),
                               follower_inbox_prefix(SHARD + 1))
            try:
                heard.clear()
                other.call(other.nc.subscribe(tick_subject(SHARD), cb=listen))
                other.call(other.nc.subscribe(f"{follower_inbox_prefix(SHARD)}.>", cb=listen))
                for subject in (f"$JS.API.STREAM.MSG.GET.{stream_name(SHARD)}",
                                f"$JS.API.DIRECT.GET.{stream_name(SHARD)}",
                                f"$JS.API.STREAM.INFO.{stream_name(SHARD)}",
                                f"$KV.{CHECKPOINTS_BUCKET}.s{SHARD}"):
                    with pytest.raises((nats.errors.Error, TimeoutError)):
                        other.call(other.nc.request(subject, b'{"seq": 1}', timeout=1), 3)
                with pytest.raises(nats.js.errors.NotFoundError):
                    other.call(other.js.stream_info(stream_name(SHARD + 1)))
                client.top_up(number, 1)  # a tick and the front's follower's reads meanwhile
                time.sleep(0.5)
                assert heard == []
            finally:
                other.close()
            logs = [r.log() for r in replicas] + [front.log(), open(os.path.join(
                front.data_dir, f"shard-{SHARD}", "replica.log")).read()]
            assert not any("permissions violation" in text.lower() for text in logs)
        finally:
            nt.close()
    finally:
        if front is not None:
            front.stop()
        for r in replicas:
            r.stop()
        nodes.stop()


def test_two_fronts_starting_at_once_on_an_empty_shard_make_one_admin(
        nats_cluster, start_replica, start_front, keyring):
    """Both see no operator and ask for the chain admin with the same request key (the
    replicas are paused until both have asked, so neither can see the other's first): one is
    made, its token in one front's folder (the other's file, naming nobody, removed: the front
    says so), and that token is an operator on both fronts."""
    replicas = three(start_replica, "--keyring", keyring)
    fronts: dict[str, ServerProcess] = {}

    def start(name: str) -> None:
        fronts[name] = start_front(name)

    for r in replicas:
        os.kill(r.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=start, args=(name,)) for name in ("a", "b")]
        for t in threads:
            t.start()

        def asked(name: str) -> bool:  # its follower caught up: it reads no operator, asks
            path = os.path.join(nats_cluster.folder, name, f"shard-{SHARD}", "replica.log")
            return os.path.exists(path) and "following" in open(path).read()

        until(lambda: asked("a") and asked("b"), 60, "both fronts' followers")
        time.sleep(1.0)
    finally:
        for r in replicas:
            os.kill(r.pid, signal.SIGCONT)
    for t in threads:
        t.join(180)
    assert set(fronts) == {"a", "b"}
    tokens = [f.admin_token for f in fronts.values()
              if os.path.exists(os.path.join(f.data_dir, "admin.token"))]
    assert len(tokens) == 1, [f.log()[-1500:] for f in fronts.values()]
    assert sum("made by another front" in f.log() for f in fronts.values()) == 1
    for front in fronts.values():
        admin = Admin(front.channel, tokens[0])
        listed = admin.stub.ListOperators(apb.ListOperatorsRequest(), metadata=admin.metadata)
        assert [o.name for o in listed.operators] == ["admin"]


def test_a_front_whose_follower_is_killed_starts_it_again_and_reads_on(
        nats_cluster, start_replica, start_front, keyring):
    """kill -9 of the front's follower: the front says so, starts it again on its folder, and
    a write then a read of it through the front are answered as before."""
    import subprocess

    three(start_replica, "--keyring", keyring)
    front = start_front("front")
    client = Client(front.stub)
    number = client.funded_card(1_000)
    folder = os.path.join(front.data_dir, f"shard-{SHARD}")
    pids = subprocess.run(["pgrep", "-f", f"replica --shard {SHARD} --data-dir {folder} "],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGKILL)
    until(lambda: "the follower exited" in front.log(), 30, "the front seeing its follower go")
    client.top_up(number, 234)
    assert client.card(number).balance.available_minor == 1_234
    again = subprocess.run(["pgrep", "-f", f"replica --shard {SHARD} --data-dir {folder} "],
                           capture_output=True, text=True).stdout.split()
    assert len(again) == 1 and again != pids, (pids, again)


def test_answers_a_front_did_not_hear_are_found_again_and_applied_once(
        nats_cluster, start_replica, start_front, keyring):
    """A front that waits 1 ms for the leader's answer (``--submit-timeout-ms 1``: every first
    try goes unanswered, the wait doubling at each try) sends every request again while the
    leader applies it: a top-up's request record answers the re-send (applied once), a PIN
    swipe's re-send is refused for its own KSN and answered with its original outcome from the
    follower, and an operator added answers with a token that works (the re-send is a replay:
    its token is issued again). The front's log counts what it found so."""
    three(start_replica, "--keyring", keyring)
    front = start_front("front", "--submit-timeout-ms", "1", "--metrics-listen", "127.0.0.1:0")
    admin = Admin(front.channel, front.admin_token)
    till = admin.enroll(5, 3)
    number = new_card_number()
    front.stub.OpenCard(till.open_card(rid(), number, PIN))
    top_up = front.stub.TopUp(till.top_up(rid(), number, 10_000))
    assert top_up.reason == R.REASON_OK and top_up.balance_after.available_minor == 10_000
    paid = [front.stub.Purchase(till.purchase(rid(), number, PIN, 1_000)) for _ in range(3)]
    assert [p.reason for p in paid] == [R.REASON_OK] * 3
    assert [p.balance_after.available_minor for p in paid] == [9_000, 8_000, 7_000]
    assert Client(front.stub).card(number).balance.available_minor == 7_000  # each once
    token = admin.add_operator("later", cpb.OPERATOR_ROLE_CHAIN_ADMIN)
    listed = Admin(front.channel, token).stub.ListOperators(apb.ListOperatorsRequest(),
                                                           metadata=bearer(token))
    assert {o.name for o in listed.operators} == {"admin", "later"}
    import urllib.request

    where = re.search(r"metrics on (http://\S+)", front.log()).group(1)
    with urllib.request.urlopen(where, timeout=10) as got:
        scraped = got.read().decode()
    unknown = re.search(r'^cardcore_front_resent_total\{why="unknown"\} (\S+)$', scraped, re.M)
    recovered = re.search(r"^cardcore_front_recovered_total (\S+)$", scraped, re.M)
    assert unknown and float(unknown.group(1)) > 0, scraped[-2000:]
    assert recovered and float(recovered.group(1)) >= 3, scraped[-2000:]
    assert "cardcore_front_follower_lag_groups" in scraped
    front.stop()
    counted = re.search(r"(\d+) requests sent again \((\d+) after an unknown outcome\), (\d+) "
                        r"swipes answered from the follower", front.log())
    assert counted and int(counted.group(2)) > 0 and int(counted.group(3)) >= 3, front.log()[-3000:]


def test_a_terminal_enrolled_through_the_admin_shards_front_swipes_through_a_card_shards(
        nats_cluster, start_replica, start_server, keyring, tmp_path):
    """A cluster with an admin shard (docs/cluster.md, "The admin shard"), a front on each
    shard: the admin shard's front makes the chain admin and enrolls a terminal; the card
    shard's front makes no admin of its own, knows that operator once its shard has relayed it,
    refuses an admin change (FAILED_PRECONDITION, REASON_ADMIN_ELSEWHERE), and serves the
    terminal's opening, top-up and PIN purchase on its shard's card."""
    admin_shard, card_shard = 1, 0
    for shard in (admin_shard, card_shard):
        start_replica(f"s{shard}", shard, *LEASE, "--keyring", keyring, "--admin-shard",
                      str(admin_shard)).wait_role("leading")

    def front(name: str, shard: int, *extra: str) -> ServerProcess:
        return start_server("--cluster", "--shard", str(shard), "--nats", nats_cluster.urls,
                            "--keyring", keyring, *extra, data_dir=str(tmp_path / name))

    a = front("a", admin_shard)
    till = Admin(a.channel, a.admin_token).enroll(7, 3)
    b = front("b", card_shard)
    assert not os.path.exists(os.path.join(b.data_dir, "admin.token"))
    on_b = Admin(b.channel, a.admin_token)

    def refused_there() -> int:  # UNAUTHENTICATED until the chain admin is relayed
        try:
            on_b.enroll(8, 3)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return 0
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            return failure_of(exc).reason
        raise AssertionError("an enrolment made on a card shard")

    assert until(refused_there, 15, "the chain admin relayed") == R.REASON_ADMIN_ELSEWHERE
    number = new_card_number()

    def opened() -> bool:  # the terminal, relayed with the admin, known to b's Access
        try:
            return b.stub.OpenCard(till.open_card(rid(), number, PIN)).reason == R.REASON_OK
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED), exc
            return False

    until(opened, 15, "the terminal relayed")
    b.stub.TopUp(till.top_up(rid(), number, 4_000))
    paid = b.stub.Purchase(till.purchase(rid(), number, PIN, 1_500))
    assert paid.reason == R.REASON_OK and paid.balance_after.available_minor == 2_500
    with pytest.raises(RuntimeError, match="set it through a front of that shard"):
        front("c", card_shard, "--request-window-hours", "48")  # the admin shard's to set
