"""Server bootstrap: ledger (migrated if it is of format 1), writer, program, gRPC server with
health and reflection, shutdown. With ``cluster_nats``, a cluster's front: the same services over
``cardcore.server.front.ClusterWriter`` (docs/cluster.md)."""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cardcore import layout as L
from cardcore import migrate, swap
from cardcore.admin import window_op
from cardcore.idempotency import REQUEST_WINDOW_S_DEFAULT, PendingOp, request_key
from cardcore.keyring import Keyring
from cardcore.lookup import lookup_key
from cardcore.profiles import profile_key
from cardcore.durable import CHECKPOINT_MS_DEFAULT, CHECKPOINT_OPS_DEFAULT
from cardcore.grouplog import SEGMENT_BYTES_DEFAULT
from cardcore.ledger import MAP_SIZE_INITIAL, Ledger
from cardcore.program import ProgramError, checked_program_file
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb

from .access import FAILURES_PER_MINUTE_DEFAULT, Access, new_token, token_digest
from .admin import AdminRefused, AdminService, keyring_behind
from .metrics import Metrics
from . import reflection
from .service import CardService, add_service
from .writer import (GROUP_MAX_OPS_DEFAULT, GROUP_WAIT_US_DEFAULT, GROUPS_IN_FLIGHT_DEFAULT,
                     QUEUE_MAX_OPS_DEFAULT, READER_CHECK_S_DEFAULT, Writer)

log = logging.getLogger("cardcore.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CardService"].full_name
ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdminService"].full_name
ADMIN_TOKEN_FILE = "admin.token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
MESSAGE_BYTES_MAX = 16 << 20     # a 10,000-operation batch is ~1.5 MiB
SHUTDOWN_GRACE_S = 10.0
SERVER_OPTIONS = [  # grpc.aio's: message limits, one process per port, keepalive
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


@dataclasses.dataclass
class ServerConfig:
    log_level: str = "INFO"
    log_format: str = "text"                      # or "json"
    data_dir: str = "./var/cardcore"
    listen: str = "127.0.0.1:50051"
    program_path: str | None = None
    keyring_path: str | None = None  # default: <data_dir>/keyring.json
    insecure: bool = False           # plaintext on loopback, for local development only
    tls_cert: str | None = None      # server certificate chain (PEM)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # CA of the client certificates (mutual TLS, required)
    failures_per_minute: int = FAILURES_PER_MINUTE_DEFAULT
    sync: bool = True
    group_max_ops: int = GROUP_MAX_OPS_DEFAULT
    group_wait_us: int = GROUP_WAIT_US_DEFAULT
    queue_max_ops: int = QUEUE_MAX_OPS_DEFAULT
    groups_in_flight: int = GROUPS_IN_FLIGHT_DEFAULT
    map_size_mib: int = MAP_SIZE_INITIAL >> 20   # grows by doubling when full
    metrics_listen: str | None = None             # HOST:PORT for Prometheus; None: not served
    request_window_s: int = REQUEST_WINDOW_S_DEFAULT  # request records kept, and requests accepted
    reader_check_s: float = READER_CHECK_S_DEFAULT    # stale LMDB reader slots cleared this often
    checkpoint_ms: int = CHECKPOINT_MS_DEFAULT        # LMDB brought up to date from the log this
    checkpoint_ops: int = CHECKPOINT_OPS_DEFAULT      # often, or after this many operations
    log_segment_mib: int = SEGMENT_BYTES_DEFAULT >> 20  # the group log's segment files
    day_totals: bool = True          # False: no day totals (a benchmark's, --no-day-totals)
    member_metrics: bool = True      # False: no member metrics (a benchmark's, --no-member-metrics)
    # A cluster's front (docs/cluster.md): the NATS servers; None: the single server
    cluster_nats: list[str] | None = None
    cluster_shard: int = 0
    # a front over several card shards: them (cluster_shard is then the cluster's admin shard;
    # docs/cluster.md, "Several shards"); empty: a front of cluster_shard alone
    cluster_card_shards: tuple[int, ...] = ()
    nats_tls: tuple[str, str, str] | None = None  # CA, the front role's certificate and key
    follower_tls: tuple[str, str] | None = None   # the follower role's (the front's followers:
    #                                               "{shard}" in a path stands for each's shard)
    follower_seed_from: str | None = None         # a backup its follower starts from (a new
    # front on a shard whose stream was purged)
    submit_timeout_ms: int = 2000                 # a submit's first wait for the leader
    request_window_given: bool = True             # a front sets the shard's only when asked


# The single server's writer settings, with their defaults: a front has no writer (its shard's
# replicas apply, with their own settings), so it says it does not use them.
SINGLE_SERVER_ONLY = (("sync", True), ("group_max_ops", GROUP_MAX_OPS_DEFAULT),
                      ("group_wait_us", GROUP_WAIT_US_DEFAULT),
                      ("groups_in_flight", GROUPS_IN_FLIGHT_DEFAULT),
                      ("checkpoint_ms", CHECKPOINT_MS_DEFAULT),
                      ("checkpoint_ops", CHECKPOINT_OPS_DEFAULT),
                      ("log_segment_mib", SEGMENT_BYTES_DEFAULT >> 20), ("day_totals", True),
                      ("member_metrics", True))


class StartupError(Exception):
    """The server cannot start; the message says why, for people."""


class WriterFailed(Exception):
    """The writer stopped while serving: the process exits non-zero so a supervisor restarts it."""


def _server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """Mutual TLS from the configured files, or None for --insecure (loopback only)."""
    if cfg.insecure:
        if cfg.listen.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
            raise StartupError("--insecure serves plaintext on a loopback address only "
                               f"(127.0.0.1, localhost, [::1]), not {cfg.listen}")
        log.warning("*** --insecure: plaintext, no client certificates; clear card numbers "
                    "and cards without a PIN are accepted. Local development only. ***")
        return None
    if not (cfg.tls_cert and cfg.tls_key and cfg.tls_client_ca):
        raise StartupError("give --tls-cert, --tls-key and --tls-client-ca (cardcore certs makes a "
                           "local CA), or --insecure for local development on loopback")
    from .tlsfiles import TlsFileError, read_ca, read_pair

    try:
        cert, key = read_pair(cfg.tls_cert, cfg.tls_key, "--tls-cert", "--tls-key")
        root = read_ca(cfg.tls_client_ca, "--tls-client-ca")
    except TlsFileError as exc:
        raise StartupError(f"cannot use a TLS file: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=root,
                                       require_client_auth=True)


async def _bootstrap_admin(admin: AdminService, access: Access, data_dir: str) -> None:
    """No active operator (a first start, or a restore of a lost ledger): a chain admin whose
    token goes to a 0600 file (never to the log)."""
    if access.operators_by_digest:
        return
    name, n = "admin", 1
    while name in access.operators_by_name:  # an earlier one, removed
        n += 1
        name = f"admin-{n}"
    # The file first: a crash before the commit leaves a token nobody holds, and the next
    # start makes a new one; the other order could leave an admin nobody can use.
    token = new_token()
    path = os.path.join(data_dir, ADMIN_TOKEN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        await admin.add_operator(None, request_key(L.CALLER_SYSTEM, 0,
                                                   f"bootstrap-{name}".encode()),
                                 name, cpb.OPERATOR_ROLE_CHAIN_ADMIN, [], 0, token=token)
    except AdminRefused as exc:
        if exc.reason != L.R_DUPLICATE_REQUEST_MISMATCH:
            os.unlink(path)  # refused: the token names nobody
            raise
    access.reload()
    if token_digest(token) not in access.operators_by_digest:
        # a cluster's fronts started together on an empty shard: another front's request (the
        # same request key, another token) made the admin first; ours names nobody
        os.unlink(path)
        log.warning("the chain admin %r was made by another front of the shard at the same "
                    "time: its token is in that front's data folder", name)
        return
    log.warning("created the chain admin %r (no operator was active); its token is in %s (0600). "
                "Use it to add named operators, then remove %r and delete the file", name, path,
                name)


def _program_source(path: str | None) -> str | None:
    """The --program document, checked before anything starts (None: no file given)."""
    if path is None:
        return None
    try:
        return checked_program_file(path)
    except ProgramError as exc:
        raise StartupError(f"the program {path} is not valid: {exc}") from None


async def _load_program_file(ledger: Ledger, writer: Writer, source: str, path: str) -> None:
    """--program on a ledger that runs another document: stored as the next version, journaled
    as the server's own (a new ledger stored it as version 1 already)."""
    current = ledger.read_programs()[ledger.program_version]["source"]
    if current == source:
        return
    op = PendingOp.admin(b"", L.OP_PROGRAM_LOADED, bytes(16), source.encode(), 0)
    outcome = (await writer.submit([op]))[0]
    if outcome.reason != L.R_OK:
        raise StartupError(f"the program {path} was refused: "
                           f"{cpb.Reason.Name(outcome.reason)} (the running program is unchanged)")
    ledger.refresh_program()
    log.warning("program %s stored as version %d", path, ledger.program_version)


def _cluster_writer(cfg: ServerConfig, loop, metrics: Metrics, on_fatal, keyring: Keyring):
    """A front's writer (docs/cluster.md): the shard's leader over NATS, its own follower; over
    several card shards, one of those per shard behind a ``ShardedWriter``."""
    from cardcore.jetlog import NatsTLS

    from .front import ClusterWriter

    def one(shard: int) -> ClusterWriter:
        follower_args = ["--keyring", cfg.keyring_path]
        if cfg.follower_seed_from:
            follower_args += ["--seed-from", cfg.follower_seed_from]
        if cfg.nats_tls is not None:
            assert cfg.follower_tls is not None
            cert, key = (p.replace("{shard}", str(shard)) for p in cfg.follower_tls)
            follower_args += ["--nats-ca", cfg.nats_tls[0], "--nats-cert", cert,
                              "--nats-key", key]
        return ClusterWriter(os.path.join(cfg.data_dir, f"shard-{shard}"), shard,
                             cfg.cluster_nats, loop,
                             nats_tls=NatsTLS(*cfg.nats_tls) if cfg.nats_tls else None,
                             follower_args=tuple(follower_args), metrics=metrics,
                             queue_max_ops=cfg.queue_max_ops,
                             submit_timeout_s=cfg.submit_timeout_ms / 1000, on_fatal=on_fatal)

    if not cfg.cluster_card_shards:
        return one(cfg.cluster_shard)
    from .sharded import ShardedWriter, routing_table

    return ShardedWriter(one(cfg.cluster_shard), {s: one(s) for s in cfg.cluster_card_shards},
                         lambda admin: routing_table(admin, list(cfg.cluster_card_shards)),
                         lambda w: Ledger(os.path.join(w.data_dir, "ledger"), readonly=True,
                                          map_size=cfg.map_size_mib << 20,
                                          profile_key=profile_key(keyring.index_key)))


def _admin_reloader(ledger: Ledger, access: Access, card_service: CardService,
                    keyring: Keyring):
    """A front's re-read of admin state after its follower applied more groups: terminals and
    operators added or revoked, a program loaded, and a data key rotated (the keyring file
    re-read), through another front."""
    said: set[str] = set()

    def reload() -> None:
        access.reload()
        if ledger.read_program_version() != ledger.program_version:
            card_service.adopt_program()
        behind = keyring_behind(ledger, keyring)
        if behind and behind not in said:  # said once a rotation (the text names its version)
            said.add(behind)
            log.error("%s; meanwhile new card numbers are sealed under the old version "
                      "(re-sealed under the current one at this front's next start)", behind)
    return reload


def lock_data_dir(data_dir: str):
    """One server per data folder: an exclusive lock held for the life of the process."""
    lock = open(os.path.join(data_dir, "cardcore.lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StartupError(f"another cardcore server is using {data_dir}") from None
    return lock


async def serve(cfg: ServerConfig) -> None:
    loop = asyncio.get_running_loop()
    if not cfg.sync:
        for _ in range(3):
            log.warning("*** --no-sync: commits are NOT durable; a crash loses acknowledged "
                        "operations. For benchmarks only. ***")
    if not cfg.day_totals:
        log.warning("*** --no-day-totals: no daily close figures are kept (refilled from the "
                    "journal at the next start without it). For benchmarks only. ***")
    if not cfg.member_metrics:
        log.warning("*** --no-member-metrics: no member metrics are kept (refilled from the "
                    "journal at the next start without it). For benchmarks only. ***")
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot make the data folder {cfg.data_dir}: {exc.strerror}") from None
    lock = lock_data_dir(cfg.data_dir)
    if cfg.failures_per_minute < 1:
        raise StartupError("--failures-per-minute must be at least 1")
    credentials = _server_credentials(cfg)
    cluster = cfg.cluster_nats is not None
    ledger_path = os.path.join(cfg.data_dir, "ledger")
    if cluster:  # the front's follower's ledger, a folder of its own
        ledger_path = os.path.join(cfg.data_dir, f"shard-{cfg.cluster_shard}", "ledger")
        if cfg.program_path:
            raise StartupError("a cluster's program is its shards' (cardcore replica --program "
                               "at a shard's start, then LoadProgram): --program is not taken "
                               "with --cluster")
        if not cfg.keyring_path or not os.path.exists(cfg.keyring_path):
            raise StartupError("--cluster needs --keyring FILE: the chain's keyring, the same "
                               "file every front holds (its index key the replicas' too)")
        single = [("--no-" if default is True else "--") + name.replace("_", "-")
                  for name, default in SINGLE_SERVER_ONLY if getattr(cfg, name) != default]
        if single:  # the writer's settings: a cluster's are its replicas' (cardcore replica)
            log.warning("--cluster: %s not used by a front (the shard's replicas have their "
                        "own: cardcore replica --help)", ", ".join(single))
    program_source = _program_source(cfg.program_path)
    swap.recover(ledger_path)  # a migration or restore that stopped between its renames
    beside = swap.missing(ledger_path)
    if beside:
        raise StartupError(f"{ledger_path} holds no ledger but {', '.join(beside)} do: put the "
                           f"one to serve back at {ledger_path} (or restore a backup) first")
    if not cluster and migrate.ledger_format(ledger_path) == 1:
        try:
            migrate.migrate(ledger_path, program_source)
        except migrate.MigrationError as exc:
            raise StartupError(f"the ledger could not be migrated to format 2: {exc}") from None
    server = grpc.aio.server(options=SERVER_OPTIONS)
    try:  # bind before anything else starts, so a busy port fails fast and leaves nothing running
        if credentials is None:
            port = server.add_insecure_port(cfg.listen)
        else:
            port = server.add_secure_port(cfg.listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {cfg.listen} (in use, or not an address of this host)")
    keyring_path = cfg.keyring_path or os.path.join(cfg.data_dir, "keyring.json")
    try:
        keyring = Keyring.load_or_create(keyring_path, cfg.data_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # the messages name the file, never a key (KeyError: a field the file lacks)
        why = exc.strerror if isinstance(exc, OSError) else "not a cardcore keyring, or damaged"
        raise StartupError(f"cannot use the keyring {keyring_path}: {why}") from None
    stop = asyncio.Event()
    failed: list[str] = []

    def fatal(why: str) -> None:
        log.critical("stopping the server: %s", why)
        failed.append(why)
        stop.set()

    # The writer process creates the environment; this process only reads it.
    metrics = Metrics()
    if cluster:
        writer = _cluster_writer(cfg, loop, metrics, fatal, keyring)
    else:
        writer = Writer(ledger_path, program_source, loop, sync=cfg.sync, metrics=metrics,
                        log_level=cfg.log_level, log_format=cfg.log_format,
                        group_max_ops=cfg.group_max_ops, group_wait_us=cfg.group_wait_us,
                        queue_max_ops=cfg.queue_max_ops, groups_in_flight=cfg.groups_in_flight,
                        map_size=cfg.map_size_mib << 20, request_window_s=cfg.request_window_s,
                        reader_check_s=cfg.reader_check_s, on_fatal=fatal, day_totals=cfg.day_totals,
                        member_metrics=cfg.member_metrics,
                        checkpoint_ms=cfg.checkpoint_ms, checkpoint_ops=cfg.checkpoint_ops,
                        log_segment_bytes=cfg.log_segment_mib << 20,
                        lookup_key=lookup_key(keyring.index_key),
                        profile_key=profile_key(keyring.index_key))
    try:
        writer.start()
    except Exception as exc:
        if not cluster:
            raise
        from .front import FrontSetting

        if isinstance(exc, FrontSetting):
            raise StartupError(f"the front cannot start: {exc}") from None
        raise WriterFailed(f"the front could not start (started again, it tries again): "
                           f"{type(exc).__name__}: {exc}") from None
    ledger = admin = None
    health_servicer = health.aio.HealthServicer()
    try:
        ledger = Ledger(ledger_path, readonly=True, map_size=cfg.map_size_mib << 20,
                        profile_key=profile_key(keyring.index_key))
        admin_ledger = ledger  # (closed last: a front over several card shards reads through
        #                        a ShardedLedger over it and the card shards' followers')
        if cfg.cluster_card_shards:
            ledger = writer.attach(ledger)
        elif cluster:
            writer.attach(ledger)
        behind = keyring_behind(ledger, keyring)  # (before anything is written)
        if behind:
            raise StartupError(behind)
        if program_source is not None:
            await _load_program_file(ledger, writer, program_source, cfg.program_path)
        # a card shard of a cluster with an admin shard takes admin changes from that shard
        # alone (docs/cluster.md, "The admin shard"): its fronts make none at start
        relayed = cluster and (ledger.read_admin_relay() or (0, 0))[1] == L.RELAY_ROLE_CARD
        if relayed and cfg.request_window_given:
            raise StartupError("--request-window-hours: this card shard takes the request "
                               "window from the cluster's admin shard: set it through a front "
                               "of that shard")
        if (ledger.read_horizons()[1] != cfg.request_window_s * 1_000_000
                and (not cluster or cfg.request_window_given)):  # (a shard's: set when asked)
            outcome = (await writer.submit([window_op(cfg.request_window_s)]))[0]
            if outcome.reason != L.R_OK:
                if cluster:
                    raise WriterFailed(f"the shard did not take the request window "
                                       f"({outcome.reason}): is a replica leading?")
                raise StartupError(f"the request window was refused: {outcome.reason}")
            log.warning("request retention window set to %d hours", cfg.request_window_s // 3600)
        metrics.watch(lambda: writer.queued_ops, ledger.map_usage)
        if cfg.metrics_listen:
            log.info("metrics on http://%s/metrics", metrics.serve(cfg.metrics_listen))
        access = Access(ledger, keyring.bdk, keyring.bdk_id, tls=credentials is not None,
                        failures_per_minute=cfg.failures_per_minute)
        card_service = CardService(ledger, writer, keyring, access)
        admin = AdminService(ledger, writer, keyring, access,
                             on_program=card_service.adopt_program)
        try:
            if not relayed:  # (a card shard's chain admin and rotations: the admin shard's)
                await _bootstrap_admin(admin, access, cfg.data_dir)
                await admin.record_rotation()  # (and the reseal: a rotation a stop interrupted)
            resealed = await admin.reseal(None)
        except RuntimeError as exc:  # (an admin operation refused at start-up)
            if not cluster:
                raise
            # the shard's leader did not answer in time (none yet, NATS down): exit 1, so a
            # supervisor starts the front again
            raise WriterFailed(f"the shard did not take a start-up operation ({exc}): is a "
                               "replica leading?") from None
        if resealed:
            log.info("re-sealed %d card numbers under data key version %d", resealed,
                     keyring.data_key_current)
        if cluster:
            writer.on_advance = _admin_reloader(ledger, access, card_service, keyring)
        if cfg.cluster_card_shards:
            admin.feed.journals = writer.journals()
        elif cluster:  # (its shard's journal)
            admin.feed.journals = {cfg.cluster_shard: admin.feed.journals[0]}
        add_service(server, card_service, pb.DESCRIPTOR.services_by_name["CardService"])
        add_service(server, admin, apb.DESCRIPTOR.services_by_name["AdminService"])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable(
            (SERVICE_NAME, ADMIN_SERVICE_NAME,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        stats = ledger.stats()
        log.info("ledger %s: %d cards, %d journal entries", ledger.path, stats["cards"],
                 stats["journal"])
        log.info("event loop: %s", type(loop).__module__.split(".")[0])  # uvloop or asyncio
        host = cfg.listen.rsplit(":", 1)[0]
        # The one line tests and scripts wait for; it carries the bound port (for --listen HOST:0).
        line = f"cardcore listening on {host}:{port}"
        if cfg.log_format == "json":
            line = json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": "INFO",
                               "logger": "cardcore.server", "msg": line,
                               "listen": f"{host}:{port}"})
        print(line, flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        log.info("shutting down: refusing new calls, finishing those in flight")
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if admin is not None:
            admin.feed.close()  # live journal feeds end now, not at the grace period's end
        await server.stop(SHUTDOWN_GRACE_S)
        await writer.stop()
        log.info("writer: %d groups, %d operations", writer.groups, writer.ops_applied)
        if ledger is not None:
            admin_ledger.close()
        lock.close()
        log.info("stopped: ledger closed")
    if failed:
        raise WriterFailed(failed[0])
