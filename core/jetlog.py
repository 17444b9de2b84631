"""Cluster: the group log on a NATS JetStream stream, one per shard (docs/cluster.md).

``JetStreamLog`` is a ``GroupLog``: the writer's ``DurableLedger`` applies, appends and replays
through it exactly as through the local ``SegmentLog``. One message per group: the local log's
64-byte record header (shard, epoch, group number, crc, the journal digest the group ends at) and
the group's input bytes. The stream holds nothing else and deletes nothing one by one, so message
*n* is group *n* and the ledger's ``log_applied`` is the replica's applied stream sequence,
committed in the same LMDB transaction as the state it describes. Its only removal is retention
(``Retention``): the leader purges the groups before the oldest checkpoint of the shard's
replicas, which each report theirs; a purge keeps the numbering.

Every append carries ``Nats-Msg-Id`` (``s<shard>-e<epoch>-g<no>``) and
``Nats-Expected-Last-Sequence`` (``no - 1``): a timeout re-sends the same bytes, id and expectation
(a stored group is acknowledged again as a duplicate), and a writer whose view is stale is refused
(err_code 10071). Then the message at ``no`` tells: ours (an earlier send landed) or another
writer's (``Deposed``). Safety is that check, never the lease's timing.

nats-py is asyncio only and the writer's loop is synchronous (it holds an LMDB write transaction
and burns CPU in the kernel; an event loop beside such work starves, which is why the writer is a
process of its own). So one daemon thread runs an event loop that owns the connection
(``NatsThread``), and the synchronous side calls into it with a time limit on every call.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Coroutine, Iterator

from cardcore.grouplog import (HEADER, MAGIC, VERSION, GroupLog, LogError, LogSyncError, Record,
                               pack_record, record_ok)
from cardcore.groups import group_ts_us
from cardcore.natsnames import (CHECKPOINTS_BUCKET as CHECKPOINTS_BUCKET,  # (re-exported)
                                 FOLLOWER_INBOX_PREFIX as FOLLOWER_INBOX_PREFIX,
                                 LEADERS_BUCKET as LEADERS_BUCKET,
                                 REPLICA_INBOX_PREFIX as REPLICA_INBOX_PREFIX,
                                 ROUTES_KEY as ROUTES_KEY, SHARDS_BUCKET as SHARDS_BUCKET,
                                 SUBMIT_INBOX_PREFIX as SUBMIT_INBOX_PREFIX, TICK as TICK,
                                 TICK_SUFFIX as TICK_SUFFIX,
                                 follower_inbox_prefix as follower_inbox_prefix,
                                 log_subject as log_subject,
                                 replica_inbox_prefix as replica_inbox_prefix,
                                 stream_name as stream_name, submit_subject as submit_subject,
                                 tick_subject as tick_subject)

log = logging.getLogger("cardcore.jetlog")


class _SslEofNoise(logging.Filter):
    """asyncio's warning at every close of a TLS connection to NATS (nats-py's protocol returns
    True from eof_received, which SSL transports ignore): said at each stop of every replica
    and submitter, meaning nothing to an operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_SslEofNoise())

try:  # the cluster extra: pip install -e .[cluster]
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api as js_api
except ImportError:  # pragma: no cover - only the cluster needs it
    nats = None

STREAM_REPLICAS_DEFAULT = 3
DUPLICATE_WINDOW_S = 120          # a re-sent group within this is recognised by its id
RECORD_BYTES_MAX = 8 << 20        # one group's message (the stream's max_msg_size, max_payload)
READ_AHEAD = 64                   # direct gets in flight while a replica reads the stream
REFUSALS_PER_URL = 2   # a connect refused this many times by every server is a setting
RETRY_PAUSE_S = 0.25   # between connects after a refusal
CALL_TIMEOUT_S = 5.0              # one request to NATS (stream info, a get, a KV call)
CONNECT_TIMEOUT_S = 10.0
APPEND_TIMEOUT_MS_DEFAULT = 30_000  # re-sends of one group before its outcome is unknown
APPEND_ATTEMPT_S = 2.0            # one publish's wait for its acknowledgement
WRONG_LAST_SEQUENCE = 10071       # JetStream's err_code for a refused expectation
REPORT_EVERY_S = 1.0              # a replica reports its checkpoint at most this often
RETENTION_CHECK_MS_DEFAULT = 60_000  # a leader looks whether it can purge this often (0: never)
REPLICA_STALE_S_DEFAULT = 86_400  # a replica silent this long no longer holds groups back
REPORT_TRIES = 5                  # compare-and-set rounds of one report (replicas race)
FORGET_STALE_TIMES = 7            # a replica's entry is dropped this many stale times after
RETAIN_GROUPS_DEFAULT = 10_000    # kept below every replica's checkpoint: a backup's margin
LEASE_MS_DEFAULT = 3000
SETUP_TIMEOUT_S = 30.0            # a new cluster's streams elect their leaders meanwhile
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"


class Deposed(OSError):
    """The stream refused our append because another writer appended first: nothing of this
    group will be read back (an OSError, as the log's contract says of a refused append), and
    this writer must follow."""


class NatsUnavailable(RuntimeError):
    """The NATS client is not installed (the cluster extra) or no server answered."""


class BehindRetention(LogError):
    """The groups this replica needs next were purged (it was away past the stream's retention):
    it starts again from a peer's backup (``--seed-from``), a setting, not a moment."""


class NatsRefused(NatsUnavailable):
    """A setting to fix, not a moment to wait out: a NATS server answered and refused who we
    are (TLS, certificate, user), a certificate file that does not load, or no NATS client (the
    cluster extra)."""


@dataclass(frozen=True)
class NatsTLS:
    """Mutual TLS to the NATS nodes: the cluster's CA (the nodes' certificates must chain to it)
    and this process's role certificate and key (``cardcore certs nats-client``): the nodes map
    the certificate to the role's user and permissions (docs/cluster.md)."""
    ca_file: str
    cert_file: str
    key_file: str

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class NatsThread:
    """One asyncio event loop in a daemon thread, owning one NATS connection; the synchronous
    caller runs coroutines on it with ``call`` (always with a time limit)."""

    def __init__(self, urls: list[str], name: str, tls: NatsTLS | None = None,
                 inbox_prefix: str = REPLICA_INBOX_PREFIX) -> None:
        if nats is None:
            raise NatsRefused("nats-py is not installed: pip install -e .[cluster]")
        self.loop = asyncio.new_event_loop()
        self.ticks_refused = False  # the user may not publish or hear ticks (an old configuration)
        self.refused_subject = ""   # a permissions violation NATS reported (not the ticks')
        self._thread = threading.Thread(target=self.loop.run_forever, name="nats-loop",
                                        daemon=True)
        self._thread.start()
        refused: list[BaseException] = []
        refused_by: dict[str, int] = {}  # server -> its refusals
        connected = False
        client = None

        async def on_error(exc: Exception) -> None:
            # nats-py tries the servers again and again, forever, on its first connect too: a
            # refused certificate or user would hold start-up until the time limit. Refusals
            # (a certificate or user refused, a reset or a cut handshake: how a node refuses an
            # unknown user, but also a node restarting) end it once every server has refused
            # REFUSALS_PER_URL times; a node that is down is no refusal (the time limit ends
            # that wait). So one node with a bad certificate among good ones is tried, refused,
            # and another connects: after a refusal, the connect is started again with a new
            # client (nats-py's own next try after a refused handshake was seen to hang), which
            # picks its first server at random. Once connected, nothing is counted.
            if not connected and isinstance(exc, (ssl.SSLError, ConnectionResetError,
                                                  nats.errors.AuthorizationError)):
                refused.append(exc)
                server = getattr(client, "_current_server", None)  # (nats-py's: the one tried)
                where = getattr(getattr(server, "uri", None), "netloc", "?")  # host:port
                refused_by[where] = refused_by.get(where, 0) + 1
            text = str(exc)  # (nats-py's, lower case)
            if "permissions violation" in text and TICK_SUFFIX in text:
                if not self.ticks_refused:  # said once; a leader then stops ticking
                    self.ticks_refused = True
                    log.warning("nats: %s: this user may not use the ticks (a configuration "
                                "made before them): followers ask the stream for its end "
                                "instead; make it again with cardcore cluster-config", text)
                return
            if "permissions violation" in text and not self.refused_subject:
                self.refused_subject = text  # (prepare_shard: a setting, not a moment)
            await _nats_error(exc)

        def refused_enough() -> bool:
            return len(refused_by) >= len(urls) and min(refused_by.values()) >= REFUSALS_PER_URL

        try:
            context = tls.context() if tls is not None else None  # a bad file: NatsUnavailable
        except Exception as exc:
            self._stop_loop()
            setting = isinstance(exc, OSError) and not isinstance(exc, ConnectionError)
            raise (NatsRefused if setting else NatsUnavailable)(
                f"NATS TLS files: {type(exc).__name__}: {exc}") from exc
        deadline = time.monotonic() + CONNECT_TIMEOUT_S * len(urls) + 1
        fut = None
        seen = 0  # the refusals when this connect started
        while True:
            if fut is None:
                seen = len(refused)
                client = nats.NATS()
                fut = asyncio.run_coroutine_threadsafe(client.connect(
                    servers=urls, name=name, connect_timeout=CONNECT_TIMEOUT_S, tls=context,
                    inbox_prefix=inbox_prefix, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=on_error),
                    self.loop)
            failed: BaseException | None = None
            try:
                fut.result(0.05)
                break  # connected
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                pass
            except Exception as exc:  # nats-py gave this connect up
                failed = exc
            over = time.monotonic() > deadline
            if failed is None and len(refused) == seen and not over:
                continue  # still trying
            # this connect is over: refused (see on_error), given up, or out of time
            if not fut.done():
                fut.cancel()
                concurrent.futures.wait([fut], CALL_TIMEOUT_S)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                break  # it connected just as it was cancelled
            fut = None
            refusal = failed is None or (refused and failed is refused[-1])
            if not refusal or over or refused_enough():
                self._stop_loop()
                where = ", ".join(f"{u} x{n}" for u, n in sorted(refused_by.items())) or "none"
                why = (failed if not refusal else refused[-1] if refused
                       else TimeoutError("no NATS server answered in time"))
                setting = refused_enough() or (  # every node refused, or a setting (a file)
                    not refusal and isinstance(why, OSError)
                    and not isinstance(why, (ConnectionError, TimeoutError)))
                raise (NatsRefused if setting else NatsUnavailable)(
                    f"cannot connect to NATS at {','.join(urls)}: {type(why).__name__}: {why} "
                    f"(refusals: {where})") from why
            time.sleep(RETRY_PAUSE_S)  # a new client: nats-py's own pause went with the old one
        self.nc = client
        connected = True
        refused.clear()
        self.js = self.nc.jetstream(timeout=CALL_TIMEOUT_S)

    def call(self, coro: Coroutine, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        """Run ``coro`` on the loop; its result, or TimeoutError after ``timeout_s`` (at once
        once closed)."""
        fut = self._submit(coro)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"NATS did not answer within {timeout_s} s") from None

    def spawn(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run ``coro`` on the loop without waiting (a reply); what it raises is logged."""
        done = self._submit(coro)
        done.add_done_callback(_log_failure)
        return done

    def _submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """``coro`` scheduled on the loop; TimeoutError once the loop is closed (the coroutine
        closed unrun: no "never awaited" warning)."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise TimeoutError("the NATS connection is closed") from None

    def close(self) -> None:
        """Drain the connection (or close it), stop and close the loop; again: nothing."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.nc.drain(), CALL_TIMEOUT_S)
        except Exception:  # no node answers (a drain needs one): closed without it
            try:
                self.call(self.nc.close(), CALL_TIMEOUT_S)
            except Exception:  # closing anyway
                pass
        self._stop_loop()

    def _stop_loop(self) -> None:
        """The loop's tasks left (nats-py's reconnect and subscription tasks, when no node
        answered the close) cancelled and awaited, then the loop stopped and closed: a task
        left pending would be destroyed later, on a closed loop, with a traceback."""
        if self.loop.is_closed():
            return
        try:
            self.call(_cancel_tasks())
        except Exception:  # stopping anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_tasks() -> None:
    """(On the loop.) Every task but this one, cancelled and finished."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _log_failure(done: concurrent.futures.Future) -> None:
    """A spawned coroutine's exception, said (nobody waits for its result)."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("nats: a background call failed: %s: %s", type(exc).__name__, exc)


NATS_ERROR_LOG_S = 5.0  # nats-py's errors said at most once in this long (with a count between)
_nats_errors = {"said_at": 0.0, "unsaid": 0}


async def _nats_error(exc: Exception) -> None:
    """One line, not nats-py's traceback (a node that went away is an operating event), and at
    most one every NATS_ERROR_LOG_S: with every node down nats-py reports each reconnect try
    (five a second), which a supervisor's restarts would multiply into a flood."""
    now = time.monotonic()
    if now - _nats_errors["said_at"] < NATS_ERROR_LOG_S:
        _nats_errors["unsaid"] += 1
        return
    unsaid, _nats_errors["unsaid"], _nats_errors["said_at"] = _nats_errors["unsaid"], 0, now
    more = f" ({unsaid} more since the last said)" if unsaid else ""
    log.warning("nats: %s: %s%s", type(exc).__name__, exc, more)


class ShardMisconfigured(ValueError):
    """A shard's stream exists with another configuration than its replicas make (other
    subjects, a mirror or sources: another shard's records copied in): never used (exit 2)."""


def check_stream(config, shard: int) -> None:
    """The shard's stream as its replicas make it, or ShardMisconfigured. (Whoever may make a
    stream chooses its configuration, and one shard's replica user may make its own shard's: a
    stream sourced from another shard's would copy that shard's records where this user reads.)"""
    if list(config.subjects or ()) != [log_subject(shard)] or config.mirror or config.sources:
        raise ShardMisconfigured(
            f"stream {stream_name(shard)} takes {config.subjects}"
            f"{' with a mirror or sources' if config.mirror or config.sources else ''}, not only "
            f"{log_subject(shard)}: not made by a replica of shard {shard}; delete it (and ask "
            "who made it) before its replicas start")


class ShardMissing(Exception):
    """A shard a follower (``replica --follow-only``: a front's) asked for has no stream or
    genesis yet: its replicas make them, never a follower."""


async def ensure_shard(js, shard: int, replicas: int, lease_ms: int, program: str | None,
                       now_us: int, keyring: str | None = None, create: bool = True) -> dict:
    """The shard's stream and the cluster's KV buckets, made if absent (the same configuration
    every time: the first replica to start makes them); the shard's genesis record, made only if
    absent and never changed: {"time_us", "program", "keyring"} (program None: the default one;
    keyring: the index key's fingerprint its replicas hold, None: keyless). ``create`` False (a
    follower, whose certificate may not make them): only read, ShardMissing if absent."""
    if not create:
        try:
            check_stream((await js.stream_info(stream_name(shard))).config, shard)
            shards = await js.key_value(SHARDS_BUCKET)
            return json.loads((await shards.get(f"s{shard}-genesis")).value)
        except (nats.js.errors.NotFoundError, nats.js.errors.KeyNotFoundError):
            raise ShardMissing(f"shard {shard} has no stream or genesis yet: its replicas make "
                               "them (start them first)") from None
    cfg = js_api.StreamConfig(
        name=stream_name(shard), subjects=[log_subject(shard)],
        storage=js_api.StorageType.FILE, num_replicas=replicas,
        retention=js_api.RetentionPolicy.LIMITS, discard=js_api.DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW_S, max_msg_size=RECORD_BYTES_MAX,
        deny_delete=True, deny_purge=False, allow_direct=True)  # purges: Retention's only
    try:
        check_stream((await js.stream_info(cfg.name)).config, shard)
    except nats.js.errors.NotFoundError:
        await js.add_stream(cfg)
    await _bucket(js, LEADERS_BUCKET, replicas, lease_ms / 1000)
    await _bucket(js, CHECKPOINTS_BUCKET, replicas, None)
    shards = await _bucket(js, SHARDS_BUCKET, replicas, None)
    key = f"s{shard}-genesis"
    try:
        await shards.create(key, json.dumps({"time_us": now_us, "program": program,
                                             "keyring": keyring}, sort_keys=True).encode())
    except nats.js.errors.KeyWrongLastSequenceError:
        pass  # another replica made it first: it is the shard's
    return json.loads((await shards.get(key)).value)


async def ensure_routes(js, proposed: bytes) -> bytes:
    """The cluster's routing table as stored: made from ``proposed`` only if absent (the first
    front over several card shards makes it), never changed here. ShardMissing before any
    replica made the buckets."""
    try:
        shards = await js.key_value(SHARDS_BUCKET)
    except nats.js.errors.NotFoundError:
        raise ShardMissing("the cluster has no shards yet: start the replicas first") from None
    try:
        await shards.create(ROUTES_KEY, proposed)
    except nats.js.errors.KeyWrongLastSequenceError:
        pass  # another front made it first: it is the cluster's
    return (await shards.get(ROUTES_KEY)).value


async def read_genesis(js, shard: int) -> dict:
    """Another shard's genesis record (the buckets' records are readable to every user);
    ShardMissing if it has none yet."""
    try:
        shards = await js.key_value(SHARDS_BUCKET)
        return json.loads((await shards.get(f"s{shard}-genesis")).value)
    except (nats.js.errors.NotFoundError, nats.js.errors.KeyNotFoundError):
        raise ShardMissing(f"shard {shard} has no genesis yet: its replicas make it (start "
                           "them first)") from None


def prepare_shard(nt: "NatsThread", shard: int, replicas: int, lease_ms: int,
                  program: str | None, now_us: int, keyring: str | None = None,
                  create: bool = True) -> dict:
    """``ensure_shard`` from the synchronous side, tried again while a new cluster, or a stream
    another replica just made, has no leader yet ("no responders", a timeout)."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while True:
        nt.refused_subject = ""  # (a violation reported during this try alone counts)
        try:
            return nt.call(ensure_shard(nt.js, shard, replicas, lease_ms, program, now_us,
                                        keyring, create))
        except (nats.errors.Error, TimeoutError) as exc:
            if nt.refused_subject:  # another shard's or role's certificate: no wait mends it
                raise NatsRefused(f"shard {shard}: NATS refused this certificate's user: "
                                  f"{nt.refused_subject} (a certificate of another shard or "
                                  "role? docs/cluster.md, who may do what)") from exc
            if time.monotonic() > deadline:
                raise
            log.info("shard %d not ready yet (%s); trying again", shard, type(exc).__name__)
            time.sleep(0.2)


async def _bucket(js, bucket: str, replicas: int, ttl_s: float | None):
    """A KV bucket, made if absent as nats-py's ``create_key_value`` makes one, but without
    rollup headers and purges: one shard's replica user may put its shard's keys of a shared
    bucket, and a put with ``Nats-Rollup: all`` would otherwise wipe every shard's (leases,
    genesis, checkpoints). A bucket made before (rollups allowed) is used as it is, with a
    warning: edit it (``nats stream edit KV_<bucket> --no-allow-rollup``)."""
    stream = f"KV_{bucket}"
    try:
        config = (await js.stream_info(stream)).config
    except nats.js.errors.NotFoundError:
        await js.add_stream(js_api.StreamConfig(
            name=stream, subjects=[f"$KV.{bucket}.>"], allow_rollup_hdrs=False,
            deny_delete=True, deny_purge=True, discard=js_api.DiscardPolicy.NEW,
            duplicate_window=min(120.0, ttl_s or 120.0), max_age=ttl_s, max_consumers=-1,
            max_msgs=-1, max_msgs_per_subject=1, num_replicas=replicas,
            storage=js_api.StorageType.FILE))
    else:
        if config.allow_rollup_hdrs:
            log.warning("bucket %s allows rollup headers: a shard's replica user could wipe "
                        "every shard's keys with one put (made before 2026-12-01); edit it: "
                        "nats stream edit %s --no-allow-rollup", bucket, stream)
    return await js.key_value(bucket)


class Lease:
    """Who writes a shard: key ``s<shard>`` of the leaders bucket, created only if absent and
    renewed with update(last=revision); an unrenewed one expires with the bucket's TTL. The
    epoch is the revision it was created at. Liveness only: safety is the stream's check."""

    def __init__(self, nt: NatsThread, shard: int, holder: dict) -> None:
        self.nt = nt
        self.key = f"s{shard}"
        self.value = json.dumps(holder, sort_keys=True).encode()
        self.kv = nt.call(nt.js.key_value(LEADERS_BUCKET))
        self.revision = 0
        self.epoch = 0

    def try_take(self) -> bool:
        try:
            self.revision = self.epoch = self.nt.call(self.kv.create(self.key, self.value))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError,
                nats.errors.Error, TimeoutError):
            return False
        return True

    def renew(self) -> bool:
        """False: the lease is lost (expired and taken, or NATS unreachable): stop writing."""
        try:
            self.revision = self.nt.call(self.kv.update(self.key, self.value,
                                                        last=self.revision))
        except (nats.js.errors.APIError, nats.errors.Error, TimeoutError) as exc:
            log.warning("lease %s not renewed: %s", self.key, type(exc).__name__)
            return False
        return True

    def release(self) -> None:
        """Give it up at once (a clean stop), only if it is still ours."""
        try:
            self.nt.call(self.kv.delete(self.key, last=self.revision))
        except Exception:  # expired or taken already: nothing to give up
            pass


class JetStreamLog(GroupLog):
    """The shard's stream as a GroupLog (see the module's docstring)."""

    TRANSIENT_ERRORS = (TimeoutError, nats.errors.Error) if nats is not None else (TimeoutError,)

    def __init__(self, nt: NatsThread, shard: int,
                 append_timeout_ms: int = APPEND_TIMEOUT_MS_DEFAULT,
                 call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.nt = nt
        self.call_timeout_s = call_timeout_s  # a read's calls (a leader reading another
        # shard's stream keeps them short: its lease is renewed between them)
        self.shard = shard
        self.stream = stream_name(shard)
        self.subject = log_subject(shard)
        self.append_timeout_s = append_timeout_ms / 1000
        self.epoch = 0           # this writer's (the lease's), in each record it appends
        self.last_ts_us = 0      # the time of the last group read or appended
        self.resends = 0
        self.deposed = 0
        self.retention: Retention | None = None  # set by a replica that reports checkpoints
        self._end = self._last_seq()

    @property
    def next_group_no(self) -> int:
        return self._end + 1

    def _last_seq(self) -> int:
        info = self.nt.call(self.nt.js.stream_info(self.stream))
        return info.state.last_seq

    def append(self, payload: bytes, digest_seq: int, out_digest: bytes) -> int:
        """Publish the group at ``next_group_no`` (the writer has applied every group before it);
        re-send on a timeout until acknowledged; Deposed if another writer's group is there;
        LogSyncError if NATS does not answer within ``append_timeout_ms`` (stored or not:
        unknown)."""
        no = self._end + 1
        rec = pack_record(no, payload, digest_seq, out_digest, shard=self.shard, epoch=self.epoch)
        if len(rec) > RECORD_BYTES_MAX:
            raise OSError(f"a group of {len(rec)} bytes is over the stream's message limit")
        msg_id = f"s{self.shard}-e{self.epoch}-g{no}"
        deadline = time.monotonic() + self.append_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                ack = self.nt.call(self.nt.js.publish(
                    self.subject, rec, timeout=APPEND_ATTEMPT_S, stream=self.stream,
                    headers={MSG_ID: msg_id, EXPECTED_LAST_SEQ: str(no - 1)}),
                    APPEND_ATTEMPT_S + 1)
            except nats.js.errors.APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    return self._refused(no, msg_id, payload)
                why = f"{type(exc).__name__} {exc.err_code}: {exc.description}"
            except (TimeoutError, nats.errors.Error) as exc:
                why = type(exc).__name__
            else:
                if ack.seq != no:  # the expectation makes any other number impossible
                    raise LogError(f"group {no} was stored at stream seq {ack.seq}")
                self._acknowledged(no, payload)
                return no
            if time.monotonic() >= deadline:
                raise LogSyncError(f"group {no} not acknowledged by the stream within "
                                   f"{self.append_timeout_s:.0f} s ({attempt} sends; {why}): "
                                   "stored or not is unknown")
            self.resends += 1
            log.warning("group %d: %s; sending it again (same id and expectation)", no, why)
            time.sleep(min(0.05 * attempt, 0.5))

    def _acknowledged(self, no: int, payload: bytes) -> None:
        """Group ``no`` is the stream's: note it and tick the followers (not waited for)."""
        self._end = no
        self.last_ts_us = group_ts_us(payload)
        if not self.nt.ticks_refused:
            self.nt.spawn(self.nt.nc.publish(tick_subject(self.shard), TICK.pack(no)))

    def _refused(self, no: int, msg_id: str, payload: bytes) -> int:
        """The stream is not at ``no - 1``: our own earlier send landed at ``no``, or another
        writer's group did (Deposed)."""
        try:  # from the stream's leader: a direct get may lag it
            got = self.nt.call(self.nt.js.get_msg(self.stream, seq=no))
        except nats.js.errors.NotFoundError:
            raise LogError(f"the stream refused group {no} but holds no message there: it is "
                           "behind this writer (groups lost?)") from None
        if (got.headers or {}).get(MSG_ID) == msg_id:
            self._acknowledged(no, payload)
            return no
        self.deposed += 1
        raise Deposed(f"group {no} of shard {self.shard} was appended by another writer "
                      f"({(got.headers or {}).get(MSG_ID)}): this one (epoch {self.epoch}) is "
                      "deposed")

    def read_from(self, group_no: int) -> Iterator[Record]:
        """Every group from ``group_no`` to the stream's end as of this call, checked (shard,
        number, crc), fetched ``READ_AHEAD`` at a time; BehindRetention if the stream no longer
        holds ``group_no``."""
        state = self.nt.call(self.nt.js.stream_info(self.stream), self.call_timeout_s).state
        end = state.last_seq
        if group_no <= end and state.first_seq > group_no:
            raise BehindRetention(
                f"shard {self.shard}'s stream starts at group {state.first_seq} (retention), "
                f"after group {group_no} this replica needs next: move its ledger folder away "
                "(a replica with a ledger ignores --seed-from), then start it with --seed-from "
                "a peer's backup")
        if end < self._end:
            raise LogError(f"the stream ends at {end}, before group {self._end} it held")
        self._end = end
        seq = group_no
        while seq <= end:
            last = min(end, seq + READ_AHEAD - 1)
            msgs = self.nt.call(self._get_many(seq, last), self.call_timeout_s * 2)
            for no, msg in zip(range(seq, last + 1), msgs):
                yield self._record(no, msg.data or b"")
            seq = last + 1

    async def _get_many(self, first: int, last: int) -> list:
        return await asyncio.gather(*[self._get(k) for k in range(first, last + 1)])

    async def _get(self, seq: int):
        """Message ``seq``, known to be stored: a direct get (any of the stream's replicas
        answers, so reads spread), and where that replica has not stored it yet (direct gets
        may lag the stream's leader: seen in the tests), from the stream's leader."""
        try:
            return await self.nt.js.get_msg(self.stream, seq=seq, direct=True)
        except nats.js.errors.NotFoundError:
            return await self.nt.js.get_msg(self.stream, seq=seq)

    def _record(self, no: int, data: bytes) -> Record:
        """The stream's message ``no`` as a Record; LogError if it is not group ``no`` of this
        shard, whole (a stream that is not ours, or damaged)."""
        head = data[:HEADER.size]
        if len(head) != HEADER.size:
            raise LogError(f"stream message {no} is not a group record")
        magic, version, shard, _epoch, group_no, n, crc, digest_seq, digest, _ = HEADER.unpack(head)
        payload = data[HEADER.size:]
        if (magic != MAGIC or version != VERSION or shard != self.shard or group_no != no
                or n != len(payload) or not record_ok(head, payload, crc)):
            raise LogError(f"stream message {no} is not group {no} of shard {self.shard}, whole")
        self.last_ts_us = group_ts_us(payload)
        return Record(no, digest_seq, digest, payload)

    def last_group_ts_us(self) -> int:
        """The time of the stream's last group (0: none): a leader's next group comes after."""
        if not self.last_ts_us and self._end:
            got = self.nt.call(self._get(self._end))
            self._record(self._end, got.data or b"")
        return self.last_ts_us

    def truncate_before(self, group_no: int) -> None:
        """The ledger holds every group before ``group_no`` (a checkpoint): reported to the
        shard's retention, which purges a group once every replica holds it."""
        if self.retention is not None:
            self.retention.report(group_no - 1)

    def first_group_no(self) -> int:
        """The stream's first group (1 until a purge; past its end when it is empty)."""
        return self.nt.call(self.nt.js.stream_info(self.stream)).state.first_seq

    def close(self) -> None:
        """The connection is its owner's (NatsThread) to close."""


class Ticks:
    """The ticks of a shard's leader (``tick_subject``), heard by a follower. Plain NATS may
    lose one (a node failing over), and a replica whose NATS user may not hear them (a
    configuration from before them) hears none: so a follower also asks the stream after
    ``wait``'s limit, as it did before ticks, only less often."""

    def __init__(self, nt: NatsThread, shard: int) -> None:
        self.nt = nt
        self.heard = threading.Event()
        self.highest = 0  # the highest group number a tick named since ``take``
        self._lock = threading.Lock()  # (ticks land on the loop thread, ``take`` on another)
        nt.call(nt.nc.subscribe(tick_subject(shard), cb=self._on_tick))
        nt.call(nt.nc.flush())  # (its node has the subscription: heard from the catch-up on)

    async def _on_tick(self, msg) -> None:
        """(The loop thread.)"""
        if len(msg.data) == TICK.size:
            with self._lock:
                self.highest = max(self.highest, TICK.unpack(msg.data)[0])
        self.heard.set()

    def take(self) -> int:
        """Before a look at the stream: the highest group a tick named since the last take (none
        lost between), and a tick from then on ends the next ``wait`` at once. ``highest``
        starts again: a tick naming a group the stream never shows (a stream made again) is not
        waited for past the next look."""
        self.heard.clear()
        with self._lock:
            highest, self.highest = self.highest, 0
        return highest

    def wake(self) -> None:
        """End a ``wait`` now (from a signal handler: through the loop, never the Event's lock
        taken in a handler); nothing once the connection is closed (nothing waits then)."""
        try:
            self.nt.loop.call_soon_threadsafe(self.heard.set)
        except RuntimeError:  # the loop is closed
            pass

    def wait(self, limit_s: float) -> None:
        self.heard.wait(limit_s)


def first_kept(held: dict, now_s: float, replicas: int, stale_s: float,
               retain_groups: int) -> int:
    """The first group a shard's stream must keep, from ``held`` (the checkpoints bucket's map:
    replica id -> [its checkpoint's last group, reported at s]): after the oldest checkpoint of
    the replicas that reported within ``stale_s``, less ``retain_groups``; 0 (keep all) with
    fewer of them than the stream has copies."""
    live = [group for group, at in held.values() if now_s - at < stale_s]
    if len(live) < replicas:
        return 0
    return max(0, min(live) + 1 - retain_groups)


class Retention:
    """The shard stream's retention: each replica reports the last group its checkpoint holds
    (key ``s<n>`` of the checkpoints bucket, one map for the shard's replicas, updated by
    compare-and-set), and the leader purges the groups before the oldest of them, once as many
    replicas as the stream has copies have reported within ``stale_s`` (so a replica that never
    reported, or one starting, holds everything back). A replica silent past ``stale_s`` no
    longer does: back, it finds its next group purged and starts from a peer's backup.
    ``retain_groups`` more are kept below that point (for backups a little older). Wall-clock
    times here are only liveness: a purge never removes a group a live replica still needs."""

    def __init__(self, nt: NatsThread, shard: int, replica_id: str, replicas: int,
                 stale_s: float = REPLICA_STALE_S_DEFAULT,
                 retain_groups: int = RETAIN_GROUPS_DEFAULT) -> None:
        assert replicas >= 1 and stale_s > 0 and retain_groups >= 0
        self.nt, self.shard, self.replica_id = nt, shard, replica_id
        self.replicas, self.stale_s, self.retain_groups = replicas, stale_s, retain_groups
        self.key = f"s{shard}"
        self.kv = nt.call(nt.js.key_value(CHECKPOINTS_BUCKET))
        self.reported = -1
        self.reported_at = 0.0
        self.reporting: concurrent.futures.Future | None = None
        self.purged_before = 0  # the first group the last purge kept (0: none yet)

    def report(self, checkpointed: int) -> None:
        """This replica's ledger holds every group up to ``checkpointed``: said at most every
        REPORT_EVERY_S, without waiting (a report that fails is only late). The replica calls
        it on every turn of its loop too, so the last checkpoint of a burst is said as well."""
        now = time.monotonic()
        if checkpointed == self.reported or now - self.reported_at < REPORT_EVERY_S:
            return
        self.reported, self.reported_at = checkpointed, now
        self.reporting = self.nt.spawn(self._report(checkpointed))

    def settle(self, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Wait for a report in flight (before the connection closes: a clean stop)."""
        if self.reporting is not None:
            try:
                self.reporting.result(timeout_s)
            except Exception:  # logged by spawn's callback
                pass

    async def _report(self, checkpointed: int | None) -> None:
        """Set (None: drop) this replica's entry in the shard's map, by compare-and-set."""
        for _ in range(REPORT_TRIES):
            try:
                try:
                    entry = await self.kv.get(self.key)
                    held, revision = json.loads(entry.value), entry.revision
                except nats.js.errors.KeyNotFoundError:
                    held, revision = {}, 0
                now = time.time()  # (entries long gone go: well past the stale time, so that
                # a reporter's clock running ahead drops none the leader still counts)
                held = {rid: v for rid, v in held.items() if now - v[1] < FORGET_STALE_TIMES
                        * self.stale_s}
                if checkpointed is None:
                    held.pop(self.replica_id, None)
                else:
                    held[self.replica_id] = [checkpointed, now]
                value = json.dumps(held, sort_keys=True).encode()
                if revision:
                    await self.kv.update(self.key, value, last=revision)
                else:
                    await self.kv.create(self.key, value)
                return
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
                continue  # another replica's report came between: read it again
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("shard %d: checkpoint not reported (%s)", self.shard,
                            type(exc).__name__)
                return
        log.warning("shard %d: checkpoint not reported (%d replicas' reports in between)",
                    self.shard, REPORT_TRIES)

    def forget(self) -> None:
        """This replica will not follow (it cannot start): its entry no longer holds groups."""
        self.nt.call(self._report(None), CALL_TIMEOUT_S * REPORT_TRIES)

    def register(self, checkpointed: int) -> None:
        """(At start, before catching up.) Say at once where this replica's ledger is, so that
        no purge takes a group it is about to read (a new replica, one seeded from a backup)."""
        self.reported, self.reported_at = checkpointed, time.monotonic()
        self.nt.call(self._report(checkpointed), CALL_TIMEOUT_S * REPORT_TRIES)

    async def purge(self, stream: str, own_checkpoint: int) -> int:
        """(The leader.) Purge what every replica holds, never past the leader's own checkpoint
        (a map that says more, forged or wrong, purges no group this replica's LMDB lacks); the
        first group kept (0: nothing purged)."""
        try:
            held = json.loads((await self.kv.get(self.key)).value)
        except nats.js.errors.KeyNotFoundError:
            return 0
        info = await self.nt.js.stream_info(stream)
        copies = max(self.replicas, info.config.num_replicas or 1)  # the stream's own, too
        keep = first_kept(held, time.time(), copies, self.stale_s, self.retain_groups)
        # the last group stays (the next append's check), and this replica's checkpoint holds
        keep = min(keep, info.state.last_seq, own_checkpoint + 1)
        if keep <= info.state.first_seq:
            return 0  # nothing new to purge
        await self.nt.js.purge_stream(stream, seq=keep)
        self.purged_before = keep
        log.info("shard %d: groups before %d purged (every replica's checkpoint holds them)",
                 self.shard, keep)
        return keep
