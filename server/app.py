"""Server bootstrap: ledger, writer, gRPC server with health and reflection, shutdown."""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cardcore import keyring
from cardcore.ledger import MAP_SIZE_INITIAL, Ledger
from cardcore.rules import load_program
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc

from .metrics import Metrics
from .service import CardService
from .writer import (GROUP_MAX_OPS_DEFAULT, GROUP_WAIT_US_DEFAULT, GROUPS_IN_FLIGHT_DEFAULT,
                     QUEUE_MAX_OPS_DEFAULT, Writer)

log = logging.getLogger("cardcore.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CardService"].full_name
MESSAGE_BYTES_MAX = 16 << 20     # a 10,000-operation batch is ~1.5 MiB
SHUTDOWN_GRACE_S = 10.0


@dataclasses.dataclass
class ServerConfig:
    log_level: str = "INFO"
    log_format: str = "text"                      # or "json"
    data_dir: str = "./var/cardcore"
    listen: str = "127.0.0.1:50051"
    program_path: str | None = None
    keyring_path: str | None = None  # default: <data_dir>/card-index.key
    sync: bool = True
    group_max_ops: int = GROUP_MAX_OPS_DEFAULT
    group_wait_us: int = GROUP_WAIT_US_DEFAULT
    queue_max_ops: int = QUEUE_MAX_OPS_DEFAULT
    groups_in_flight: int = GROUPS_IN_FLIGHT_DEFAULT
    map_size_mib: int = MAP_SIZE_INITIAL >> 20   # grows by doubling when full
    metrics_listen: str | None = None             # HOST:PORT for Prometheus; None: not served


class StartupError(Exception):
    """The server cannot start; the message says why, for people."""


class WriterFailed(Exception):
    """The writer stopped while serving: the process exits non-zero so a supervisor restarts it."""


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
    os.makedirs(cfg.data_dir, exist_ok=True)
    lock = lock_data_dir(cfg.data_dir)
    index_key = keyring.load_or_create_index_key(
        cfg.keyring_path or os.path.join(cfg.data_dir, "card-index.key"))
    ledger_path = os.path.join(cfg.data_dir, "ledger")
    program = load_program(cfg.program_path)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ])
    try:  # bind before anything else starts, so a busy port fails fast and leaves nothing running
        port = server.add_insecure_port(cfg.listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {cfg.listen} (in use, or not an address of this host)")
    stop = asyncio.Event()
    failed: list[str] = []

    def fatal(why: str) -> None:
        log.critical("stopping the server: %s", why)
        failed.append(why)
        stop.set()

    # The writer process creates the environment; this process only reads it.
    metrics = Metrics()
    writer = Writer(ledger_path, cfg.program_path, loop, sync=cfg.sync, metrics=metrics,
                    log_level=cfg.log_level, log_format=cfg.log_format,
                    group_max_ops=cfg.group_max_ops, group_wait_us=cfg.group_wait_us,
                    queue_max_ops=cfg.queue_max_ops, groups_in_flight=cfg.groups_in_flight,
                    map_size=cfg.map_size_mib << 20, on_fatal=fatal)
    writer.start()
    ledger = None
    health_servicer = health.aio.HealthServicer()
    try:
        ledger = Ledger(ledger_path, program, readonly=True, map_size=cfg.map_size_mib << 20)
        metrics.watch(lambda: writer.queued_ops, ledger.map_usage)
        if cfg.metrics_listen:
            log.info("metrics on http://%s/metrics", metrics.serve(cfg.metrics_listen))
        pb_grpc.add_CardServiceServicer_to_server(CardService(ledger, writer, index_key), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        stats = ledger.stats()
        log.info("ledger %s: %d cards, %d journal entries", ledger.path, stats["cards"],
                 stats["journal"])
        host = cfg.listen.rsplit(":", 1)[0]
        # The one line tests and scripts wait for; it carries the bound port (for --listen HOST:0).
        print(f"cardcore listening on {host}:{port}", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        log.info("shutting down: refusing new calls, finishing those in flight")
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(SHUTDOWN_GRACE_S)
        await writer.stop()
        log.info("writer: %d groups, %d operations", writer.groups, writer.ops_applied)
        if ledger is not None:
            ledger.close()
        lock.close()
        log.info("stopped: ledger closed")
    if failed:
        raise WriterFailed(failed[0])
