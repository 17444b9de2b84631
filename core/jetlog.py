"""Cluster: the group log on a NATS JetStream stream, one per shard (docs/cluster.md).

``JetStreamLog`` is a ``GroupLog``: the writer's ``DurableLedger`` applies, appends and replays
through it exactly as through the local ``SegmentLog``. One message per group: the local log's
64-byte record header (shard, epoch, group number, crc, the journal digest the group ends at) and
the group's input bytes. The stream holds nothing else and never deletes, so message *n* is group
*n* and the ledger's ``log_applied`` is the replica's applied stream sequence, committed in the
same LMDB transaction as the state it describes.

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

log = logging.getLogger("cardcore.jetlog")

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
# Each role's replies come to inboxes of its own, so that the NATS users can keep them apart
# (a submitter must not hear a replica's reads of the log): docs/cluster.md.
REPLICA_INBOX_PREFIX = "_INBOX_replica"
SUBMIT_INBOX_PREFIX = "_INBOX_front"
REFUSALS_PER_URL = 1   # a connect refused this many times per server is a setting, not a moment
CALL_TIMEOUT_S = 5.0              # one request to NATS (stream info, a get, a KV call)
CONNECT_TIMEOUT_S = 10.0
APPEND_TIMEOUT_MS_DEFAULT = 30_000  # re-sends of one group before its outcome is unknown
APPEND_ATTEMPT_S = 2.0            # one publish's wait for its acknowledgement
WRONG_LAST_SEQUENCE = 10071       # JetStream's err_code for a refused expectation
LEADERS_BUCKET = "cardcore-leaders"
SHARDS_BUCKET = "cardcore-shards"
LEASE_MS_DEFAULT = 3000
SETUP_TIMEOUT_S = 30.0            # a new cluster's streams elect their leaders meanwhile
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"


def stream_name(shard: int) -> str:
    return f"CARDS_S{shard}"


def log_subject(shard: int) -> str:
    return f"cardcore.s{shard}.log"


def submit_subject(shard: int) -> str:
    """Where the shard's leader takes groups of operations (a front sends them; docs/cluster.md)."""
    return f"cardcore.s{shard}.submit"


class Deposed(OSError):
    """The stream refused our append because another writer appended first: nothing of this
    group will be read back (an OSError, as the log's contract says of a refused append), and
    this writer must follow."""


class NatsUnavailable(RuntimeError):
    """The NATS client is not installed (the cluster extra) or no server answered."""


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
        self._thread = threading.Thread(target=self.loop.run_forever, name="nats-loop",
                                        daemon=True)
        self._thread.start()
        refused: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            # nats-py tries the servers again and again, forever, on its first connect too: a
            # refused certificate or user would hold start-up until the time limit. A refusal
            # that names the certificate or the user ends it at once; resets and cut handshakes
            # (how a node refuses an unknown user, but also a node restarting) end it after
            # REFUSALS_PER_URL rounds of every server; a node that is down is no refusal
            if isinstance(exc, (ssl.SSLCertVerificationError, nats.errors.AuthorizationError)) \
                    or isinstance(exc, ssl.SSLError) and "ALERT" in str(exc):
                # the node's certificate is not our CA's, or the node refused ours or our user:
                # no later try differs
                refused.extend([exc] * (REFUSALS_PER_URL * len(urls)))
            elif isinstance(exc, (ssl.SSLError, ConnectionResetError)):
                refused.append(exc)  # a reset or a cut handshake: a refusal, or a slow node
            await _nats_error(exc)

        try:
            context = tls.context() if tls is not None else None  # a bad file: NatsUnavailable
            fut = asyncio.run_coroutine_threadsafe(nats.connect(
                servers=urls, name=name, connect_timeout=CONNECT_TIMEOUT_S, tls=context,
                inbox_prefix=inbox_prefix,
                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                error_cb=on_error), self.loop)
            deadline = time.monotonic() + CONNECT_TIMEOUT_S * len(urls) + 1
            while True:
                try:
                    self.nc = fut.result(0.05)
                    break
                except concurrent.futures.TimeoutError:
                    if len(refused) >= REFUSALS_PER_URL * len(urls) or \
                            time.monotonic() > deadline:
                        fut.cancel()
                        concurrent.futures.wait([fut], CALL_TIMEOUT_S)  # let it unwind
                        raise (refused[0] if refused else TimeoutError(
                            "no NATS server answered in time")) from None
        except Exception as exc:
            self._stop_loop()
            setting = (refused and exc is refused[0]) or (  # refused enough, or a file (CA, cert)
                isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)))
            kind = NatsRefused if setting else NatsUnavailable
            raise kind(f"cannot connect to NATS at {','.join(urls)}: "
                       f"{type(exc).__name__}: {exc}") from exc
        self.js = self.nc.jetstream(timeout=CALL_TIMEOUT_S)

    def call(self, coro: Coroutine, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        """Run ``coro`` on the loop; its result, or TimeoutError after ``timeout_s``."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"NATS did not answer within {timeout_s} s") from None

    def spawn(self, coro: Coroutine) -> None:
        """Run ``coro`` on the loop without waiting (a reply)."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        try:
            self.call(self.nc.drain(), CALL_TIMEOUT_S)
        except Exception:  # closing anyway
            pass
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT_S)


async def _nats_error(exc: Exception) -> None:
    """One line, not nats-py's traceback (a node that went away is an operating event)."""
    log.warning("nats: %s: %s", type(exc).__name__, exc)


async def ensure_shard(js, shard: int, replicas: int, lease_ms: int, program: str | None,
                       now_us: int) -> dict:
    """The shard's stream and the cluster's KV buckets, made if absent (the same configuration
    every time: the first replica to start makes them); the shard's genesis record, made only if
    absent and never changed: {"time_us", "program"} (None: the default program)."""
    cfg = js_api.StreamConfig(
        name=stream_name(shard), subjects=[log_subject(shard)],
        storage=js_api.StorageType.FILE, num_replicas=replicas,
        retention=js_api.RetentionPolicy.LIMITS, discard=js_api.DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW_S, max_msg_size=RECORD_BYTES_MAX,
        deny_delete=True, deny_purge=True, allow_direct=True)
    try:
        await js.stream_info(cfg.name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(cfg)
    await _bucket(js, LEADERS_BUCKET, replicas, lease_ms / 1000)
    shards = await _bucket(js, SHARDS_BUCKET, replicas, None)
    key = f"s{shard}-genesis"
    try:
        await shards.create(key, json.dumps({"time_us": now_us, "program": program},
                                            sort_keys=True).encode())
    except nats.js.errors.KeyWrongLastSequenceError:
        pass  # another replica made it first: it is the shard's
    return json.loads((await shards.get(key)).value)


def prepare_shard(nt: "NatsThread", shard: int, replicas: int, lease_ms: int,
                  program: str | None, now_us: int) -> dict:
    """``ensure_shard`` from the synchronous side, tried again while a new cluster, or a stream
    another replica just made, has no leader yet ("no responders", a timeout)."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while True:
        try:
            return nt.call(ensure_shard(nt.js, shard, replicas, lease_ms, program, now_us))
        except (nats.errors.Error, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.info("shard %d not ready yet (%s); trying again", shard, type(exc).__name__)
            time.sleep(0.2)


async def _bucket(js, bucket: str, replicas: int, ttl_s: float | None):
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(js_api.KeyValueConfig(
            bucket=bucket, history=1, ttl=ttl_s, replicas=replicas,
            storage=js_api.StorageType.FILE))


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

    def __init__(self, nt: NatsThread, shard: int,
                 append_timeout_ms: int = APPEND_TIMEOUT_MS_DEFAULT) -> None:
        self.nt = nt
        self.shard = shard
        self.stream = stream_name(shard)
        self.subject = log_subject(shard)
        self.append_timeout_s = append_timeout_ms / 1000
        self.epoch = 0           # this writer's (the lease's), in each record it appends
        self.last_ts_us = 0      # the time of the last group read or appended
        self.resends = 0
        self.deposed = 0
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
                self._end = no
                self.last_ts_us = group_ts_us(payload)
                return no
            if time.monotonic() >= deadline:
                raise LogSyncError(f"group {no} not acknowledged by the stream within "
                                   f"{self.append_timeout_s:.0f} s ({attempt} sends; {why}): "
                                   "stored or not is unknown")
            self.resends += 1
            log.warning("group %d: %s; sending it again (same id and expectation)", no, why)
            time.sleep(min(0.05 * attempt, 0.5))

    def _refused(self, no: int, msg_id: str, payload: bytes) -> int:
        """The stream is not at ``no - 1``: our own earlier send landed at ``no``, or another
        writer's group did (Deposed)."""
        try:  # from the stream's leader: a direct get may lag it
            got = self.nt.call(self.nt.js.get_msg(self.stream, seq=no))
        except nats.js.errors.NotFoundError:
            raise LogError(f"the stream refused group {no} but holds no message there: it is "
                           "behind this writer (groups lost?)") from None
        if (got.headers or {}).get(MSG_ID) == msg_id:
            self._end = no
            self.last_ts_us = group_ts_us(payload)
            return no
        self.deposed += 1
        raise Deposed(f"group {no} of shard {self.shard} was appended by another writer "
                      f"({(got.headers or {}).get(MSG_ID)}): this one (epoch {self.epoch}) is "
                      "deposed")

    def read_from(self, group_no: int) -> Iterator[Record]:
        """Every group from ``group_no`` to the stream's end as of this call, checked (shard,
        number, crc), fetched ``READ_AHEAD`` at a time."""
        end = self._last_seq()
        if end < self._end:
            raise LogError(f"the stream ends at {end}, before group {self._end} it held")
        self._end = end
        seq = group_no
        while seq <= end:
            last = min(end, seq + READ_AHEAD - 1)
            msgs = self.nt.call(self._get_many(seq, last), CALL_TIMEOUT_S * 2)
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
        """The stream keeps every group (its retention, not a checkpoint, will bound it; a
        replica behind the stream's first group rebuilds from a peer's backup: not built)."""

    def close(self) -> None:
        """The connection is its owner's (NatsThread) to close."""
