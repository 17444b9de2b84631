"""Cluster: a replica of one shard (``cardcore replica``; docs/cluster.md).

A follower applies the shard's stream in order through the writer's own code path
(``DurableLedger`` over a ``JetStreamLog``: each group's journal digest checked, ``log_applied``
committed with the state it describes, so every group is applied exactly once across restarts).
It takes the shard's lease when it is free; then, caught up, it appends an epoch barrier (a
maintenance group) and leads: it takes groups of packed operations on ``cardcore.s<n>.submit``,
forms groups as the writer does, applies, publishes (expected last sequence), and answers after
the stream's acknowledgement. A refused append (another writer appended first) makes it follow.
A lease it could not renew makes it append a probe: the stream's answer decides (``_lease_lost``).
Safety is the stream's expected-last-sequence, never the lease.

The submit protocol (the front's, ``cardcore.server.front``; also the tests')::

    request = cardcore.groups.encode_group(ops, epoch)   (at most SUBMIT_OPS_MAX operations)
              epoch (the group head's time field): 0, any leader (and the b"G" reply); -1, any
              leader, which says its epoch (b"H"); > 0, only the leader of that epoch: another
              answers b"N" and its own, not applied (a front's fence: a swipe sent after a
              failover must not reach the new leader before the swipes sent earlier that the
              old one never answered, or their KSNs would be refused as replayed)
    reply   = b"G" | u64 group | server.writer_proc.encode_answer(outcomes)
              applied (or replayed, or declined) in the shard's group ``group`` (a front's
              reads wait until its follower holds that group; before the fronts: b"A" and no
              group, still read, as group 0)
            | b"H" | u64 group | u64 epoch | encode_answer(outcomes)   the same, and the
              leader's epoch (a request that named one, or -1)
            | b"N" [| u64 epoch]   not the leader, or deposed before it was stored, or (with
              the epoch of the leader that says so) not the leader of the epoch asked for: not
              applied (send it again)
            | b"O"   the leader's queue is full: not applied
            | b"U"   outcome unknown (the stream did not answer, or the replica stopped on it)
            | b"E"   not a group of operations: not applied

The replica's main thread is synchronous (the ledger and the kernel); NATS runs on an event-loop
thread (``cardcore.jetlog.NatsThread``), whose subscription puts requests on a bounded queue.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import struct
import time
from dataclasses import dataclass

from cardcore import layout as L
from cardcore.durable import CHECKPOINT_MS_DEFAULT, CHECKPOINT_OPS_DEFAULT, DurableLedger
from cardcore.groups import decode_group, encode_group, group_ts_us, relay_mark, relay_ops
from cardcore.idempotency import InvariantError, PendingOp
from cardcore.jetlog import (APPEND_TIMEOUT_MS_DEFAULT, LEASE_MS_DEFAULT,
                             REPLICA_STALE_S_DEFAULT, RETAIN_GROUPS_DEFAULT,
                             RETENTION_CHECK_MS_DEFAULT, STREAM_REPLICAS_DEFAULT,
                             SUBMIT_INBOX_PREFIX, BehindRetention, Deposed, JetStreamLog, Lease,
                             NatsThread, NatsTLS, NatsUnavailable, Retention,
                             ShardMisconfigured, ShardMissing, Ticks,
                             follower_inbox_prefix, prepare_shard, read_genesis,
                             replica_inbox_prefix, submit_subject)
from cardcore.grouplog import LogError
from cardcore.keyring import index_fingerprint, load_index_key
from cardcore.ledger import MAP_SIZE_INITIAL, Ledger, Outcome
from cardcore.lookup import lookup_key
from cardcore.program import DEFAULT_PROGRAM_TOML
from cardcore.profiles import profile_key

from .writer_proc import decode_answer, encode_answer, writer_gc

log = logging.getLogger("cardcore.replica")

SUBMIT_OPS_MAX = 1000           # operations in one submit request
GROUP_MAX_OPS_DEFAULT = 2000    # ~600 KB a group: well under the stream's 8 MiB message limit
QUEUE_MAX_REQUESTS = 10_000     # submit requests waiting for the leader's next group
FOLLOW_IDLE_S = 1.0             # a caught-up follower waits this long for the leader's tick
FOLLOW_ONLY_IDLE_S = 0.25       # ... a front's follower (its reads wait for a tick it missed)
FOLLOW_RETRY_S = 0.005          # a tick named a group the stream did not show yet: asked again
FOLLOW_GAP_S = 0.02             # ... but a follower looks at most this often (ticks under load
FOLLOW_ONLY_GAP_S = 0.005       # come per group: each look reads every group since the last)
TRANSIENT_PAUSE_S = 0.5         # after NATS did not answer, before trying again
IDLE_WAIT_S = 1.0               # a leader with nothing to do looks at its lease this often
RELAY_POLL_S = 0.2              # a card shard's leader looks at the admin shard's stream
RELAY_RETRY_S = 1.0             # ... after that stream did not answer
RELAY_CALL_TIMEOUT_S = 0.5      # its reads' calls: the lease is renewed between them
RELAY_GROUPS_MAX = 64           # admin groups relayed before the leader takes submissions again
RELAY_MARK_EVERY = 10_000       # admin groups passed over (nothing to relay) before a mark says so
ADMIN_WAIT_S = 5.0              # a new card shard waiting for its admin shard's genesis
GENESIS_NEXT_SEQ = 2            # a new ledger's journal holds its genesis program's entry alone

APPLIED, NOT_LEADER, OVERLOADED, UNKNOWN, MALFORMED = b"A", b"N", b"O", b"U", b"E"
APPLIED_IN = b"G"  # applied, and the group it was applied in follows
APPLIED_EPOCH = b"H"  # applied, then the group and the leader's epoch follow
ANY_EPOCH = -1  # a request's epoch: any leader, which says its own
GROUP_NO = struct.Struct("<Q")  # an applied reply's group number, after its code


@dataclass
class ReplicaConfig:
    shard: int
    data_dir: str
    nats_urls: list[str]
    program: str | None = None          # a new shard's program (TOML source); None: default
    stream_replicas: int = STREAM_REPLICAS_DEFAULT
    lease_ms: int = LEASE_MS_DEFAULT
    append_timeout_ms: int = APPEND_TIMEOUT_MS_DEFAULT
    group_max_ops: int = GROUP_MAX_OPS_DEFAULT
    checkpoint_ms: int = CHECKPOINT_MS_DEFAULT
    checkpoint_ops: int = CHECKPOINT_OPS_DEFAULT
    map_size: int = MAP_SIZE_INITIAL
    idle_maintenance_ms: int = 60_000   # an idle leader's prune step this often (0: never): each
    # is a group the stream keeps (~450 bytes; every second, 39 MB a shard a node a day)
    nats_tls: NatsTLS | None = None     # mutual TLS to NATS (the replica role's certificate)
    seed_from: str | None = None        # a peer's backup folder, copied in when there is no ledger
    retention_check_ms: int = RETENTION_CHECK_MS_DEFAULT  # a leader's purge check (0: never)
    replica_stale_s: float = REPLICA_STALE_S_DEFAULT  # a replica silent this long holds nothing
    retain_groups: int = RETAIN_GROUPS_DEFAULT  # kept below every replica's checkpoint
    keyring_path: str | None = None     # the chain's keyring (every replica of a shard, or none)
    follow_only: bool = False           # never takes the lease (a front's follower: its reads)
    unchecked_through: int = 0          # groups up to this one applied without the digest check
    admin_shard: int | None = None      # the cluster's admin shard (docs/cluster.md, "The admin
    # shard"): a card shard's leader relays its groups; this shard's own number: it is that one


REPLICA_ID_FILE = "replica.id"  # in the data folder, not the ledger's: a seed does not copy it


def replica_id(data_dir: str) -> str:
    """This replica's name in its shard's retention: made once, kept in the data folder (a new
    folder, or one seeded from a peer's backup, is a new replica)."""
    import secrets

    path = os.path.join(data_dir, REPLICA_ID_FILE)
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        rid = secrets.token_hex(8)
        with open(path + ".tmp", "w") as f:
            f.write(rid + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        return rid


class Replica:
    """One shard's replica: its ledger, its place in the shard's stream, the lease when it
    leads (see the module's docstring)."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self.shard = cfg.shard
        self.stopping = False
        self.nt = NatsThread(cfg.nats_urls, f"cardcore-replica-s{cfg.shard}-{os.getpid()}",
                             cfg.nats_tls, follower_inbox_prefix(cfg.shard) if cfg.follow_only
                             else replica_inbox_prefix(cfg.shard))
        try:
            index_key = load_index_key(cfg.keyring_path) if cfg.keyring_path else None
        except (OSError, ValueError) as exc:
            raise KeyringMismatch(f"--keyring {cfg.keyring_path}: {exc}") from None
        fingerprint = index_fingerprint(index_key) if index_key else None
        # (a new shard's genesis names its program's text, the default one's too: replicas of
        # another release, and an admin shard's card shards, compare and apply the same one)
        genesis = prepare_shard(self.nt, cfg.shard, cfg.stream_replicas, cfg.lease_ms,
                                DEFAULT_PROGRAM_TOML if cfg.program is None else cfg.program,
                                time.time_ns() // 1000, fingerprint,
                                create=not cfg.follow_only)
        if "keyring" not in genesis:  # a shard made before the check: nothing to compare with
            log.warning("replica s%d: the shard's genesis names no keyring: not checked",
                        cfg.shard)
        elif genesis["keyring"] != fingerprint:
            def named(fp: str | None) -> str:
                return f"keyring {fp}" if fp else "no keyring"

            raise KeyringMismatch(
                f"shard {cfg.shard} is kept with {named(genesis['keyring'])}, this replica has "
                f"{named(fingerprint)}: every replica of a shard holds the same keyring "
                "(--keyring), or none")
        path = os.path.join(cfg.data_dir, "ledger")
        seeded = False  # this start copied a peer's backup in
        os.makedirs(path, exist_ok=True)
        self.log = JetStreamLog(self.nt, cfg.shard, cfg.append_timeout_ms)
        if cfg.unchecked_through > self.log.next_group_no - 1:  # (only groups already stored)
            raise UncheckedPastEnd(
                f"--unchecked-through {cfg.unchecked_through}: shard {cfg.shard}'s stream ends "
                f"at group {self.log.next_group_no - 1}; only groups it holds may go unchecked")
        if cfg.unchecked_through and cfg.seed_from is not None:  # (a seed's first group's
            # digest is its only check that the backup is this shard's: never skipped)
            raise UncheckedPastEnd("--unchecked-through and --seed-from: a seed is checked by "
                                   "the digests it follows; seed from a backup past the "
                                   "unchecked groups, without the option")
        self.ticks = Ticks(self.nt, cfg.shard)  # (heard from before the catch-up on)
        self.log.retention = Retention(self.nt, cfg.shard, replica_id(cfg.data_dir),
                                       cfg.stream_replicas, cfg.replica_stale_s,
                                       cfg.retain_groups)
        self.purge_at = 0.0  # a leader's next look at what it can purge
        if cfg.seed_from is not None and os.path.exists(os.path.join(path, "data.mdb")):
            log.warning("replica s%d: a ledger is here already: --seed-from %s ignored",
                        cfg.shard, cfg.seed_from)  # (a restart of a seeded replica: its unit)
        elif cfg.seed_from is not None:
            seed_ledger(cfg.seed_from, path)
            seeded = True
            try:
                self._check_seed(path)
            except BaseException:
                _unseed(path)
                raise

        keys = ({"lookup_key": lookup_key(index_key), "profile_key": profile_key(index_key)}
                if index_key else {})

        def open_ledger() -> Ledger:
            return Ledger(path, initial_program=genesis["program"], map_size=cfg.map_size,
                          initial_time_us=genesis["time_us"], **keys)

        self._register(path)
        try:  # (its catch-up: every group after the checkpoint, each one's digest checked)
            self.durable = DurableLedger(open_ledger, self.log, checkpoint_ms=cfg.checkpoint_ms,
                                         checkpoint_ops=cfg.checkpoint_ops,
                                         unchecked_through=cfg.unchecked_through)
        except BehindRetention:
            self.log.retention.forget()  # refused: its place must not hold the stream back
            raise
        except (InvariantError, LogError) as exc:
            if not seeded:
                raise
            _unseed(path)
            raise SeedError(f"the backup's ledger does not continue into shard {cfg.shard}'s "
                            f"stream ({exc}): another shard's, cluster's or server's") from exc
        self.relays = cfg.admin_shard is not None and cfg.admin_shard != cfg.shard  # a card
        # shard of a cluster with an admin shard: its leader relays that shard's groups
        self.admin_log: JetStreamLog | None = None  # a card shard's leader's: the admin shard's
        self.admin_scanned = 0  # the admin shard's last group its leader relayed or passed over
        self.admin_marked = 0   # ... and the last its ledger names (relayed, or a mark alone)
        self.relay_at = 0.0
        if not cfg.follow_only:
            self._check_place(self.durable.ledger.read_admin_relay(),
                              self.durable.ledger.next_seq == GENESIS_NEXT_SEQ)
        if cfg.admin_shard == cfg.shard:
            log.warning("replica s%d: the admin shard: its stream keeps every group (the card "
                        "shards' leaders relay them)", cfg.shard)
        self.genesis_program = genesis["program"]
        self.lease = Lease(self.nt, cfg.shard, {"pid": os.getpid(), "data_dir": cfg.data_dir})
        self.requests: queue.Queue = queue.Queue(QUEUE_MAX_REQUESTS)
        self._sub = None
        self.dropped = 0  # submissions with a reply subject that is not a submitter's inbox
        self.dropped_logged_at = 0.0
        self.leading = False
        self.take_at = 0.0  # a follower asks for the lease at most every tenth of its TTL
        self.stream_looked_at = 0.0  # when a follower last asked the stream for what is new
        self.said = 0  # a group a tick named that the stream did not show yet

    def _place(self) -> tuple[int, int] | None:
        """(admin shard, layout.RELAY_ROLE_*) as --admin-shard makes this shard; None: none."""
        admin = self.cfg.admin_shard
        if admin is None:
            return None
        return admin, L.RELAY_ROLE_ADMIN if admin == self.shard else L.RELAY_ROLE_CARD

    def _check_place(self, have: tuple[int, int, int] | None, new: bool) -> None:
        """The shard's ledger says the place --admin-shard gives it, or none yet on a new shard
        (AdminShardMismatch: replicas of one cluster started with different settings, or a
        shard with entries of its own, whose admin state or cards would not agree with its
        place: a shard takes a place in a cluster with an admin shard only when new)."""
        want = self._place()
        if have is None:
            if want is not None and not new:
                raise AdminShardMismatch(
                    f"shard {self.shard} holds entries beyond its genesis: only a new shard "
                    f"takes a place in a cluster with an admin shard (--admin-shard {want[0]}); "
                    "start it without the option, or make a new shard")
            return
        if want != have[:2]:
            def said(place) -> str:
                return ("no --admin-shard" if place is None else f"admin shard {place[0]}"
                        + (" (this one)" if place[1] == L.RELAY_ROLE_ADMIN else ""))

            raise AdminShardMismatch(f"shard {self.shard}'s ledger names {said(have[:2])}, this "
                                     f"replica was started with {said(want)}: every replica of "
                                     "a cluster has the same --admin-shard")

    def _register(self, path: str) -> None:
        """This replica's place in the shard's retention before it catches up: its ledger's
        last checkpoint (0: none yet), so no purge takes what it is about to read."""
        applied = 0
        if os.path.exists(os.path.join(path, "data.mdb")):
            ledger = Ledger(path, readonly=True)
            try:
                applied = ledger.log_applied()
            finally:
                ledger.close()
        self.log.retention.register(applied)

    def _check_seed(self, path: str) -> None:
        """A seeded ledger is this shard's: the stream's record of the backup's last applied
        group ends where the backup's journal does (else it is another shard's, another
        cluster's, or a single server's backup, which would lead the shard astray)."""
        ledger = Ledger(path, readonly=True)
        try:
            applied = ledger.log_applied()
            head_seq, head = ledger._read(ledger.journal_head)
        finally:
            ledger.close()
        if applied == 0:  # a single server's backup (its own log), or a replica's before any
            raise SeedError("the backup has followed no stream (a server's backup, or a new "
                            "replica's): start this replica without --seed-from")
        first = self.log.first_group_no()
        if first == applied + 1:
            return  # its own group purged: the next one's digest is checked as it is followed
            # (in __init__: a seed whose first group does not follow is refused, folder emptied)
        if first > applied + 1:
            raise SeedError(f"the backup holds groups up to {applied}, but shard {self.shard}'s "
                            f"stream starts at group {first} (retention): take a newer backup")
        rec = next(self.log.read_from(applied), None)
        if rec is None:
            raise SeedError(f"the backup has applied group {applied}, past this shard's stream: "
                            "not this shard's")
        if rec.digest_seq and (rec.digest_seq, rec.out_digest) != (head_seq,
                                                                   head[:len(rec.out_digest)]):
            raise SeedError(f"the backup's journal is not where shard {self.shard}'s stream has "
                            f"it at group {applied}: another shard's, cluster's or server's")

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Follow or lead until stopped. NATS not answering (a node failing over, a timeout) is
        waited out: a leader steps down first (its callers hear N), since what it holds in hand
        is answered or refused already; anything else (a digest that differs, an append whose
        outcome is unknown) ends the run: the replica halts."""
        import nats.errors  # the cluster extra: only where it is used

        self._role("following")
        while not self.stopping:
            try:
                if self.leading:
                    self._lead_once()
                else:
                    self._follow_once()
            except (TimeoutError, nats.errors.Error, InvariantError) as exc:
                if isinstance(exc, InvariantError) and not self.durable.broken_for_now:
                    raise  # a ledger that does not fit its stream: halt
                # NATS did not answer (also while the span was rebuilt after a refused append:
                # following rebuilds it again from the checkpoint)
                why = f"NATS: {type(exc).__name__}: {exc}"
                if self.leading:
                    self._step_down(why)
                else:
                    log.warning("replica s%d: %s; trying again", self.shard, why)
                time.sleep(TRANSIENT_PAUSE_S)

    def _role(self, role: str, why: str = "") -> None:
        log.warning("replica s%d %s (applied %d, epoch %d)%s", self.shard, role,
                    self.durable.applied, self.log.epoch, f": {why}" if why else "")

    def _follow_once(self) -> None:
        # the highest group a tick named since the last look, or one that look did not find yet
        # (a direct get may lag: it is looked for once more, then left to the idle look)
        heard = self.ticks.take()
        said = max(heard, self.said)
        looked_at = time.monotonic()
        idle_s = FOLLOW_ONLY_IDLE_S if self.cfg.follow_only else FOLLOW_IDLE_S
        if (said > self.durable.applied or looked_at - self.stream_looked_at >= idle_s
                or self.durable.broken):
            self.said = said  # (kept if the look fails, and the look's time not set: the
            n = self.durable.follow()  # next wake looks again)
            self.stream_looked_at = looked_at
        else:  # woken for the lease or a checkpoint, nothing said since a recent look: the
            n = 0  # stream is not asked (a tick lost on the way costs at most idle_s)
        self.said = heard if heard > self.durable.applied else 0
        if self.durable.due():
            self.durable.checkpoint()
        self.log.retention.report(self.durable.checkpointed)
        if (not self.stopping and not self.cfg.follow_only
                and time.monotonic() >= self.take_at):
            self.take_at = time.monotonic() + self.cfg.lease_ms / 10_000
            if self.lease.try_take():
                self._take_over()
                return
        if not n and max(self.ticks.highest, self.said) > self.durable.applied:
            time.sleep(FOLLOW_RETRY_S)
        elif not n:  # caught up: until the leader's next tick, a checkpoint or a look at the lease
            limit_s = min(self.stream_looked_at + idle_s, self.take_at if not
                          self.cfg.follow_only else float("inf")) - time.monotonic()
            due_s = self.durable.seconds_to_due()  # (a front's reads wait for the checkpoint)
            if due_s is not None:
                limit_s = min(limit_s, due_s)
            self.ticks.wait(max(FOLLOW_RETRY_S, limit_s))
            gap_s = FOLLOW_ONLY_GAP_S if self.cfg.follow_only else FOLLOW_GAP_S
            time.sleep(max(0.0, looked_at + gap_s - time.monotonic()))

    def _take_over(self) -> None:
        """Caught up to the stream's end, append the barrier, then take submissions."""
        self.log.epoch = self.lease.epoch
        self.durable.follow()
        if not self._may_take_place():
            return
        self.leading = True
        self.renew_at = time.monotonic() + self.cfg.lease_ms / 3000
        self.purge_at = time.monotonic() + self.cfg.retention_check_ms / 1000  # a check's time
        if not self._apply([PendingOp.internal(L.OP_MAINTENANCE)], []):
            return
        if not self._take_place():
            return
        self._sub = self.nt.call(self.nt.nc.subscribe(submit_subject(self.shard),
                                                      cb=self._on_submit))
        self.nt.call(self.nt.nc.flush())  # its node has the subscription (others, soon after)
        self.idle_since = time.monotonic()
        self._role("leading")

    def _may_take_place(self) -> bool:
        """(Holding the lease, caught up, before its barrier.) May this replica lead: the shard's
        place is the one --admin-shard gives it (AdminShardMismatch, the lease given up: a
        setting to fix), and a new card shard's program is the admin shard's genesis program (as
        every program the admin shard loads is judged against the one before). An admin shard
        that has no genesis yet: the lease given up, tried again in a while (no group appended
        meanwhile)."""
        have = self.durable.read_admin_relay()
        try:
            self._check_place(have, self.durable.journal_last_seq() == GENESIS_NEXT_SEQ - 1)
            if have is None and self.relays:
                try:
                    genesis = self.nt.call(read_genesis(self.nt.js, self.cfg.admin_shard))
                except ShardMissing as exc:
                    log.warning("replica s%d: %s; the lease given up until it has", self.shard,
                                exc)
                    self.lease.release()
                    self.take_at = time.monotonic() + ADMIN_WAIT_S
                    return False
                if genesis["program"] != self.genesis_program:
                    raise AdminShardMismatch(
                        f"shard {self.shard}'s genesis program is not admin shard "
                        f"{self.cfg.admin_shard}'s: a card shard starts with the admin shard's "
                        "program (--program, the same file on both, or none on both)")
        except AdminShardMismatch:
            self.lease.release()
            raise
        return True

    def _take_place(self) -> bool:
        """(A new leader, after its barrier.) The shard's place said in its log once (its first
        leader's), and a card shard's relay picked up where its ledger stands. False if
        deposed."""
        place = self._place()
        if place is None:
            return True
        have = self.durable.read_admin_relay()
        if have is None and not self._apply([relay_mark(*place)], []):
            return False
        if self.relays:
            self.admin_scanned = self.admin_marked = have[2] if have else 0
            self.relay_at = 0.0
        return True

    def _relay(self) -> None:
        """(A card shard's leader.) The admin shard's groups past the last relayed, each with
        admin entries appended here as a group of its own (``groups.relay_ops``), in order; the
        admin stream not answering is only a later look (the card shard serves on)."""
        assert self.cfg.admin_shard is not None
        self.relay_at = time.monotonic() + RELAY_POLL_S
        try:
            if self.admin_log is None:  # (its stream's info: it may not answer yet)
                self.admin_log = JetStreamLog(self.nt, self.cfg.admin_shard,
                                              self.cfg.append_timeout_ms, RELAY_CALL_TIMEOUT_S)
            for n, rec in enumerate(self.admin_log.read_from(self.admin_scanned + 1), 1):
                ops = relay_ops(self.cfg.admin_shard, rec.group_no, rec.payload)
                if ops and not self._apply(ops, []):
                    return  # deposed: the next leader relays from what the stream holds
                self.admin_scanned = rec.group_no
                if ops:
                    self.admin_marked = rec.group_no
                    log.info("replica s%d: admin group %d relayed (%d changes)", self.shard,
                             rec.group_no, len(ops) - 1)
                elif self.admin_scanned - self.admin_marked >= RELAY_MARK_EVERY:
                    # a mark alone, so that the next leader does not read these again
                    if not self._apply([relay_mark(self.cfg.admin_shard, L.RELAY_ROLE_CARD,
                                                   rec.group_no, group_ts_us(rec.payload))], []):
                        return
                    self.admin_marked = rec.group_no
                if n >= RELAY_GROUPS_MAX:
                    self.relay_at = 0.0  # more after the submissions waiting
                    return
        except (*JetStreamLog.TRANSIENT_ERRORS, LogError) as exc:
            self.relay_at = time.monotonic() + RELAY_RETRY_S
            log.warning("replica s%d: admin shard %d's stream: %s: %s; looking again", self.shard,
                        self.cfg.admin_shard, type(exc).__name__, exc)

    async def _on_submit(self, msg) -> None:
        """(The loop thread.) Queue the request for the main thread, or refuse it at once. A
        request whose reply subject is not a submitter's inbox is dropped unanswered: a replica
        may publish to the logs and the buckets, so an answer sent where a request says would
        let any submitter write there (a forged record on a log halts the shard)."""
        if not msg.reply.startswith(SUBMIT_INBOX_PREFIX + "."):
            self.dropped += 1
            now = time.monotonic()
            if self.dropped & (self.dropped - 1) == 0 or now - self.dropped_logged_at >= 60:
                self.dropped_logged_at = now  # the 1st, 2nd, 4th, 8th..., and once a minute
                log.warning("replica s%d: a submission with a reply subject outside %s.> "
                            "dropped (%d so far)", self.shard, SUBMIT_INBOX_PREFIX, self.dropped)
            return
        try:
            self.requests.put_nowait((msg.data, msg.reply))
        except queue.Full:
            await self.nt.nc.publish(msg.reply, OVERLOADED)

    def _lead_once(self) -> None:
        wait_s = max(0.0, min(self.renew_at - time.monotonic(), IDLE_WAIT_S,
                              self.durable.seconds_to_due() or IDLE_WAIT_S,
                              self.relay_at - time.monotonic() if self.relays
                              else IDLE_WAIT_S))
        batch = self._take(wait_s)
        if batch:
            ops, asks = batch
            self._apply(ops, asks)
            self.idle_since = time.monotonic()
        elif (self.cfg.idle_maintenance_ms
              and time.monotonic() - self.idle_since >= self.cfg.idle_maintenance_ms / 1000):
            self._apply([PendingOp.internal(L.OP_MAINTENANCE)], [])
            self.idle_since = time.monotonic()
        if not self.leading or not self._renew_if_due():
            return
        if self.relays and time.monotonic() >= self.relay_at:
            self._relay()  # (after the renewal: its reads of another stream may take a while)
            if not self.leading:
                return
        if self.durable.due():
            self.durable.checkpoint()
        self.log.retention.report(self.durable.checkpointed)
        if (self.cfg.retention_check_ms and self.cfg.admin_shard != self.shard
                and time.monotonic() >= self.purge_at):
            self.purge_at = time.monotonic() + self.cfg.retention_check_ms / 1000
            self.nt.spawn(self._purge())
        self._renew_if_due()

    def _renew_if_due(self) -> bool:
        """The lease renewed when due (a third of its TTL on); False if this replica no longer
        leads."""
        if time.monotonic() >= self.renew_at:
            if self.lease.renew():
                self.renew_at = time.monotonic() + self.cfg.lease_ms / 3000
            else:
                self._lease_lost()
        return self.leading

    async def _purge(self) -> None:
        """(The loop thread.) The retention's purge; a failure is only a later purge (a stream
        made before retention existed refuses every purge: it was made with deny_purge)."""
        import nats.errors

        try:
            await self.log.retention.purge(self.log.stream, self.durable.checkpointed)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("replica s%d: retention: %s: %s", self.shard, type(exc).__name__, exc)

    def _lease_lost(self) -> None:
        """The lease could not be renewed (expired while this process was paused, taken, or
        NATS did not answer). The stream, not the lease, says whether this replica may still
        write: it appends a probe (a maintenance group). Refused: another writer appended,
        this one is deposed and follows. Stored: nobody else wrote; it leads on under a new
        lease if the key is free, else it lets the key's holder lead."""
        if not self._apply([PendingOp.internal(L.OP_MAINTENANCE)], []):
            return  # deposed: following now
        if self.lease.renew():  # NATS was only slow: the lease is still ours
            self.renew_at = time.monotonic() + self.cfg.lease_ms / 3000
        elif self.lease.try_take():
            self.log.epoch = self.lease.epoch
            self.renew_at = time.monotonic() + self.cfg.lease_ms / 3000
            self._role("leading", "the lease was lost and taken again")
        else:
            self._step_down("the lease is another replica's")

    def _take(self, wait_s: float):
        """(operations, [(reply, how many)]) of the queued requests, whole, up to
        group_max_ops operations; None if none came within ``wait_s``."""
        try:
            first = self.requests.get(timeout=wait_s) if wait_s else self.requests.get_nowait()
        except queue.Empty:
            return None
        ops: list[PendingOp] = []
        asks: list[tuple[str, int, bool]] = []  # (reply, operations, says its epoch)
        item = first
        while item is not None:
            data, reply = item
            try:
                got, epoch = decode_group(data)
                if not got or len(got) > SUBMIT_OPS_MAX:
                    raise ValueError("0 or too many operations")
                if any(op.packed[0] == L.OP_ADMIN_RELAY or op.request_key.startswith(
                        L.RELAYED_KEY_PREFIX) for op in got):
                    raise ValueError("a relay's operations are a leader's alone")
            except Exception:
                self._reply(reply, MALFORMED)
            else:
                if epoch > 0 and epoch != self.log.epoch:  # another leader's: not applied
                    self._reply(reply, NOT_LEADER + GROUP_NO.pack(self.log.epoch))
                else:
                    ops += got
                    asks.append((reply, len(got), epoch != 0))
            if len(ops) >= self.cfg.group_max_ops:
                break
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                item = None
        return (ops, asks) if ops else None

    def _apply(self, ops: list[PendingOp], asks: list[tuple[str, int, bool]]) -> bool:
        """One group: apply, publish, answer. False if this replica no longer leads."""
        try:
            ts_us = max(time.time_ns() // 1000, self.log.last_group_ts_us() + 1)
            outcomes, _ = self.durable.apply(encode_group(ops, ts_us))
        except Deposed as exc:
            self._answer_all(asks, NOT_LEADER)
            self._step_down(f"append refused: {exc}", deposed=True)
            return False
        except BaseException:  # LogSyncError among them: stored or not is unknown
            self._answer_all(asks, UNKNOWN)
            raise
        k = 0
        group = GROUP_NO.pack(self.durable.applied)  # (the stream's sequence of this group)
        epoch = GROUP_NO.pack(self.log.epoch)
        for reply, n, says_epoch in asks:
            self._reply(reply, (APPLIED_EPOCH + group + epoch if says_epoch else
                                APPLIED_IN + group) + encode_answer(outcomes[k:k + n]))
            k += n
        return True

    def _step_down(self, why: str, deposed: bool = False) -> None:
        self.leading = False
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                self.nt.call(sub.unsubscribe())
            except Exception:  # the connection's trouble: it stops delivering anyway
                pass
        while True:
            try:
                _, reply = self.requests.get_nowait()
            except queue.Empty:
                break
            self._reply(reply, NOT_LEADER)
        self.lease.release()  # if it is still ours: the next leader need not wait for its TTL
        self._role("deposed" if deposed else "following", why)
        if deposed:
            self._role("following")

    def _reply(self, reply: str, data: bytes) -> None:
        if reply:
            self.nt.spawn(self.nt.nc.publish(reply, data))

    def _answer_all(self, asks: list[tuple[str, int, bool]], code: bytes) -> None:
        for reply, *_ in asks:
            self._reply(reply, code)

    def close(self) -> None:
        """A clean stop: checkpoint, give the lease up (another replica takes it at once)."""
        if self.leading:
            self._step_down("stopping")
        self.durable.close()
        self.log.retention.report(self.durable.checkpointed)
        self.log.retention.settle()
        self.nt.close()


def replica_main(cfg: ReplicaConfig) -> int:
    """Run a replica until SIGTERM or SIGINT; 1 if it halted (a diverged ledger, an append whose
    outcome is unknown, NATS gone): its supervisor restarts it, and it follows from its
    checkpoint."""
    try:
        replica = Replica(cfg)  # its catch-up from the checkpoint checks digests too
    except (NatsUnavailable, *SETTING_ERRORS):  # a setting to fix
        raise
    except Exception as exc:
        log.critical("replica s%d halted: %s: %s", cfg.shard, type(exc).__name__, exc)
        return 1

    def stop(signum, frame):
        replica.stopping = True
        replica.ticks.wake()  # (a follower waiting for a tick stops now)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    writer_gc()  # the writer's apply loop and GC setting (a follower's lease tries: README)
    try:
        replica.run()
    except SETTING_ERRORS:
        try:
            replica.durable.close(checkpoint=False)
        finally:
            replica.nt.close()
        raise
    except Exception as exc:
        log.critical("replica s%d halted: %s: %s", cfg.shard, type(exc).__name__, exc)
        try:
            replica.durable.close(checkpoint=False)
        finally:
            replica.nt.close()
        return 1
    replica.close()
    return 0


class SeedError(ValueError):
    """A --seed-from that cannot be used (a setting to fix: exit 2)."""


class KeyringMismatch(ValueError):
    """This replica's keyring is not its shard's (a setting to fix: exit 2)."""


class UncheckedPastEnd(ValueError):
    """--unchecked-through names a group the stream does not hold yet (a setting: exit 2)."""


class AdminShardMismatch(ValueError):
    """--admin-shard is not the place the shard's ledger has (a setting to fix: exit 2)."""


# What stops a start for a setting to fix, not a moment to wait out: exit 2, not restarted (and
# NatsRefused, a NatsUnavailable)
SETTING_ERRORS = (SeedError, BehindRetention, KeyringMismatch, ShardMisconfigured,
                  UncheckedPastEnd, AdminShardMismatch)


def _unseed(path: str) -> None:
    """A seeded ledger that is not one to start from, gone, so that a corrected --seed-from can
    run (and a restart does not follow from it)."""
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass


def seed_ledger(backup_dir: str, path: str) -> None:
    """A new replica's ledger from a peer's backup (``cardcore backup`` of a replica's data
    folder: its checkpoint, ``log_applied`` in it), so it follows the stream from there instead
    of replaying it from the genesis. Only into an empty folder, only a backup that verified
    clean. A backup of another shard or another cluster is caught at the first group it follows:
    the journal digest differs and the replica halts (never serves it)."""
    import json
    import shutil

    if os.path.exists(os.path.join(path, "data.mdb")):
        raise SeedError(f"{path} holds a ledger already: --seed-from fills an empty folder only")
    try:
        with open(os.path.join(backup_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise SeedError(f"{backup_dir} is not a backup (manifest.json: {exc})") from None
    if not manifest.get("verify", {}).get("ok"):
        raise SeedError(f"{backup_dir} did not verify clean when it was made")
    work = os.path.join(path, "data.mdb.seeding")
    shutil.copyfile(os.path.join(backup_dir, "ledger", "data.mdb"), work)
    with open(work, "rb") as f:
        os.fsync(f.fileno())
    os.replace(work, os.path.join(path, "data.mdb"))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("ledger seeded from the backup %s (%s)", backup_dir, manifest.get("created_at"))


def decode_reply(data: bytes) -> list[Outcome] | bytes:
    """The outcomes of an applied request, or the one-byte code of one that was not."""
    got = decode_reply_group(data)
    return got if isinstance(got, bytes) else got[0]


def decode_reply_group(data: bytes) -> tuple[list[Outcome], int] | bytes:
    """(outcomes, the group they were applied in) of an applied request, or the one-byte code
    of one that was not."""
    if data[:1] == APPLIED_IN:
        return decode_answer(data[1 + GROUP_NO.size:]), GROUP_NO.unpack_from(data, 1)[0]
    if data[:1] == APPLIED_EPOCH:
        return decode_answer(data[1 + 2 * GROUP_NO.size:]), GROUP_NO.unpack_from(data, 1)[0]
    if data[:1] == APPLIED:  # a leader from before the fronts: no group (reads do not wait)
        return decode_answer(data[1:]), 0
    return data[:1]


class SubmitClient:
    """The submit protocol's client side (the front's, later; the tests' and benchmarks' now):
    synchronous calls over a NatsThread."""

    def __init__(self, urls: list[str], tls: NatsTLS | None = None) -> None:
        self.nt = NatsThread(urls, f"cardcore-submit-{os.getpid()}", tls, SUBMIT_INBOX_PREFIX)

    def submit(self, shard: int, ops: list[PendingOp], timeout_s: float = 5.0
               ) -> list[Outcome] | bytes:
        """The outcomes, or the code of a request not applied (``N``, ``O``, ``E``) or whose
        outcome is unknown (``U``; also a timeout). No leader subscribed: ``N``."""
        import nats.errors  # the cluster extra: only where it is used

        assert 0 < len(ops) <= SUBMIT_OPS_MAX
        try:
            msg = self.nt.call(self.nt.nc.request(submit_subject(shard), encode_group(ops, 0),
                                                  timeout=timeout_s), timeout_s + 1)
        except nats.errors.NoRespondersError:
            return NOT_LEADER
        except (TimeoutError, nats.errors.Error):
            return UNKNOWN
        return decode_reply(msg.data)

    def close(self) -> None:
        self.nt.close()


def reply_epoch(data: bytes) -> int:
    """The epoch of the leader a reply says it came from (b"H", or b"N" of a request that named
    another epoch); 0: it says none."""
    if data[:1] == APPLIED_EPOCH:
        return GROUP_NO.unpack_from(data, 1 + GROUP_NO.size)[0]
    if data[:1] == NOT_LEADER and len(data) == 1 + GROUP_NO.size:
        return GROUP_NO.unpack_from(data, 1)[0]
    return 0
