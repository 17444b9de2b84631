"""The ``cardcore`` command: run the server, verify the ledger, and a small human client."""
from __future__ import annotations

import argparse
import os
import re
import sys

from . import logs
from cardcore.layout import HOLD_MINUTES_MAX, LINES_MAX
from cardcore.shards import SHARD_NUMBER_MAX

from .cmd_client import (CARD_STATUSES, ROLES, cmd_authorize, cmd_capture, cmd_card,
                         cmd_card_status, cmd_find_card, cmd_history, cmd_keys, cmd_replace_card,
                         cmd_open_card, cmd_operation, cmd_operators, cmd_program, cmd_purchase,
                         cmd_refund, cmd_reverse, cmd_terminals, cmd_top_up, cmd_void_hold,
                         cmd_watch)
from .cmd_import import CHUNK_ROWS_DEFAULT, CHUNK_ROWS_MAX, cmd_import
from .cmd_members import cmd_members, month_arg
from .cmd_reports import GRANULARITIES, cmd_close_day, cmd_report, date_arg
from .cmd_stores import cmd_region, cmd_store
from .pos import ACTIONS as POS_ACTIONS, StdinOrder, cmd_pos
from .text import (DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_PORT, U32_MAX, U64_MAX, UsageError,
                   amount_arg, card_id_arg, card_number_arg, client_time_arg, env, int_arg, listen_arg,
                   metrics_listen_arg, seconds_arg, shards_arg, target_arg, uint32_arg)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CALLER_KINDS = ("terminal", "operator", "development", "system", "legacy")  # cardcore.v1.CallerKind
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141  # 128 + SIGINT, 128 + SIGPIPE


class _Version(argparse.Action):
    """--version: the installed package's version, looked up only when asked (importlib.metadata
    is 25 ms of every command's start)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        try:
            version = metadata.version("cardcore")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        print(f"cardcore {version}")  # (to standard output, as argparse's own version action)
        parser.exit()


_DIGITS = re.compile(r"\d{4,}")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line, and never a card number or a PIN in it: the
    tokens it echoes (an unknown argument, a bad choice) may be one of them."""

    def error(self, message: str):
        if "unrecognized arguments" in message or "invalid choice" in message:
            head, sep, rest = message.partition(":")
            message = head + sep + _DIGITS.sub("****", rest)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def log_level_arg(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def caller_arg(text: str) -> tuple[str, int]:
    kind, sep, ident = text.partition(":")
    if kind not in CALLER_KINDS or not sep:
        raise argparse.ArgumentTypeError(f"not KIND:ID with KIND one of {', '.join(CALLER_KINDS)}: "
                                         f"{text!r}")
    return kind, int_arg(0, U32_MAX)(ident)


def stores_arg(text: str) -> list[int]:
    try:
        return [uint32_arg(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"not comma-separated store ids: {exc}") from None


def operation_type_arg(text: str) -> int:
    from cardcore.v1 import common_pb2 as cpb

    names = [n.removeprefix("OPERATION_TYPE_").lower().replace("_", "-")
             for n in cpb.OperationType.keys() if not n.endswith("UNSPECIFIED")]
    name = text.strip().lower().replace("_", "-")
    if name not in names:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
    return cpb.OperationType.Value("OPERATION_TYPE_" + name.upper().replace("-", "_"))


def build_parser(command: str = "") -> argparse.ArgumentParser:
    """The whole command line; for ``command``, a client command, without the server's commands
    (whose defaults would import the server: a client command's start would pay for it)."""
    parser = Parser(prog="cardcore", description=__doc__,
                    epilog="A bad argument is one line on stderr and exit status 2; a refusal "
                           "or an unreachable server, one line and exit status 1.")
    parser.add_argument("--version", action=_Version,
                        help="print the version of cardcore and exit")
    parser.add_argument("--log-level", type=log_level_arg,
                        default=env("CARDCORE_LOG_LEVEL", "INFO"),
                        help=f"one of {', '.join(LOG_LEVELS)} (env CARDCORE_LOG_LEVEL; default "
                             "INFO)")
    parser.add_argument("--log-format", choices=("text", "json"),
                        default=env("CARDCORE_LOG_FORMAT", "text"),
                        help="json: one object per line for log shippers (env CARDCORE_LOG_FORMAT; "
                             "default text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir(p):
        p.add_argument("--data-dir", default=env("CARDCORE_DATA_DIR", DEFAULT_DATA_DIR),
                       help=f"data folder (env CARDCORE_DATA_DIR; default {DEFAULT_DATA_DIR})")

    def server_commands():
        """The commands that run the server and tend its data folder: their defaults come from
        the modules that use them, which a client command's start does not import."""
        from cardcore.durable import CHECKPOINT_MS_DEFAULT, CHECKPOINT_OPS_DEFAULT
        from cardcore.grouplog import SEGMENT_BYTES_DEFAULT
        from cardcore.idempotency import REQUEST_WINDOW_S_DEFAULT
        from cardcore.shards import CARD_SHARDS_MAX

        from .cmd_server import (EVENT_LOOP_DEFAULT, EVENT_LOOPS, cmd_backup, cmd_migrate,
                                 cmd_replica, cmd_restore, cmd_serve, cmd_verify)
        from .writer import (GROUP_MAX_OPS_DEFAULT, GROUP_WAIT_US_DEFAULT,
                             GROUPS_IN_FLIGHT_DEFAULT, QUEUE_MAX_OPS_DEFAULT,
                             READER_CHECK_S_DEFAULT)

        p = sub.add_parser("serve", help="run the gRPC server")
        data_dir(p)
        p.add_argument("--listen", type=listen_arg, default=env("CARDCORE_LISTEN", DEFAULT_LISTEN),
                       help=f"HOST:PORT (env CARDCORE_LISTEN; default {DEFAULT_LISTEN}); a HOST alone "
                            f"listens on port {DEFAULT_PORT}, port 0 picks a free one")
        p.add_argument("--program", default=os.environ.get("CARDCORE_PROGRAM"),
                       help="card program TOML (tiers, points; env CARDCORE_PROGRAM); default: 3 "
                            "tiers, 1 point per 1.00")
        p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"),
                       help="keyring file (env CARDCORE_KEYRING; default <data-dir>/keyring.json, "
                            "created on first start: production keeps it elsewhere)")
        p.add_argument("--insecure", action="store_true",
                       help="LOCAL DEVELOPMENT ONLY: plaintext on loopback, no client certificates")
        p.add_argument("--tls-cert", default=os.environ.get("CARDCORE_TLS_CERT"),
                       help="server certificate chain, PEM (env CARDCORE_TLS_CERT)")
        p.add_argument("--tls-key", default=os.environ.get("CARDCORE_TLS_KEY"),
                       help="server private key, PEM, unencrypted (env CARDCORE_TLS_KEY)")
        p.add_argument("--tls-client-ca", default=os.environ.get("CARDCORE_TLS_CLIENT_CA"),
                       help="CA that signs terminal and back-office client certificates "
                            "(env CARDCORE_TLS_CLIENT_CA); clients must present one")
        p.add_argument("--failures-per-minute", type=int_arg(1, 1 << 30), default=10,
                       help="wrong PINs, unknown cards and inquiries per terminal per sliding minute "
                            "before its swipes are refused (default %(default)s)")
        p.add_argument("--group-max-ops", type=int_arg(1, 1 << 30), default=GROUP_MAX_OPS_DEFAULT,
                       help="operations per write transaction at most (default %(default)s)")
        p.add_argument("--group-wait-us", type=int_arg(0, 10_000_000), default=GROUP_WAIT_US_DEFAULT,
                       help="microseconds to wait for more operations once one is queued "
                            "(default %(default)s)")
        p.add_argument("--queue-max-ops", type=int_arg(1, 1 << 30), default=QUEUE_MAX_OPS_DEFAULT,
                       help="queued operations at most; beyond, RESOURCE_EXHAUSTED (default "
                            "%(default)s)")
        p.add_argument("--groups-in-flight", type=int, choices=(1, 2), default=GROUPS_IN_FLIGHT_DEFAULT,
                       help="groups handed to the writer at once (1: larger groups, fewer fsyncs; "
                            "2: the writer starts the next while this process answers the last; "
                            "default %(default)s)")
        p.add_argument("--metrics-listen", type=metrics_listen_arg,
                       default=os.environ.get("CARDCORE_METRICS_LISTEN"),
                       help="serve Prometheus metrics on HOST:PORT (env CARDCORE_METRICS_LISTEN; "
                            "off by default)")
        p.add_argument("--map-size-mib", type=int_arg(1, 1 << 30), default=1024,
                       help="initial LMDB map in MiB (address space, not disk); doubles when full "
                            "(default %(default)s)")
        p.add_argument("--no-sync", action="store_true",
                       help="BENCHMARKS ONLY: do not fsync commits (acknowledged work can be lost)")
        p.add_argument("--no-day-totals", action="store_true",
                       help="BENCHMARKS ONLY: keep no daily close figures (their cost's benchmark; the "
                            "next start without it fills them again from the journal)")
        p.add_argument("--no-member-metrics", action="store_true",
                       help="BENCHMARKS ONLY: keep no member metrics (their cost's benchmark; the "
                            "next start without it fills them again from the journal)")
        p.add_argument("--request-window-hours", type=int_arg(1, 100 * 365 * 24), default=None,
                       help="request records are kept, and requests accepted, for this many hours "
                            f"after their client time (default {REQUEST_WINDOW_S_DEFAULT // 3600}: a "
                            "week, longer than a store stays offline); at least 1. A front sets its "
                            "shard's only when given"),
        p.add_argument("--reader-check-s", type=seconds_arg, default=READER_CHECK_S_DEFAULT,
                       help="clear stale LMDB reader slots (readers killed -9) this often, in "
                            "seconds (default %(default)g)")
        g = p.add_argument_group("a cluster's front (docs/cluster.md)")
        g.add_argument("--cluster", action="store_true",
                       help="serve as a front of a cluster: writes go to the shard's leader over NATS, "
                            "reads come from the front's own follower (under --data-dir); needs "
                            "--nats and --keyring")
        g.add_argument("--shard", type=int_arg(0, SHARD_NUMBER_MAX), default=0,
                       help="the shard this front serves (default %(default)s); with --card-shards, "
                            "the cluster's admin shard")
        g.add_argument("--card-shards", metavar="N,N...",
                       type=shards_arg(SHARD_NUMBER_MAX, CARD_SHARDS_MAX),
                       default=os.environ.get("CARDCORE_CARD_SHARDS") or None,
                       help="serve the cluster's card shards too, each card's operations routed to "
                            "the shard its slot is (docs/cluster.md, \"Several shards\"; env "
                            "CARDCORE_CARD_SHARDS); --shard is then the admin shard. The first such "
                            "front fixes the routing table; later ones give the same shards")
        g.add_argument("--nats", default=os.environ.get("CARDCORE_NATS_URLS"),
                       help="the NATS servers, comma-separated URLs (env CARDCORE_NATS_URLS)")
        g.add_argument("--nats-ca", default=os.environ.get("CARDCORE_NATS_CA"),
                       help="mutual TLS to NATS: the CA (env CARDCORE_NATS_CA); with --nats-cert, "
                            "--nats-key (the front role's) and --follower-cert, --follower-key")
        g.add_argument("--nats-cert", default=os.environ.get("CARDCORE_NATS_CERT"),
                       help="the front role's certificate, PEM (nats-front.pem)")
        g.add_argument("--nats-key", default=os.environ.get("CARDCORE_NATS_KEY"),
                       help="its private key, PEM (nats-front.key)")
        g.add_argument("--follower-cert", default=os.environ.get("CARDCORE_FOLLOWER_CERT"),
                       help="the follower role's certificate, PEM, for the front's follower "
                            "(nats-follower-sN.pem: reads shard N's stream alone, never writes "
                            "it; env CARDCORE_FOLLOWER_CERT); {shard} in this and the other NATS "
                            "paths stands for --shard")
        g.add_argument("--follower-key", default=os.environ.get("CARDCORE_FOLLOWER_KEY"),
                       help="its private key, PEM (nats-follower-sN.key; env "
                            "CARDCORE_FOLLOWER_KEY)")
        g.add_argument("--follower-seed-from", metavar="BACKUP", default=None,
                       help="a new front's follower starts from this backup of a replica (cardcore "
                            "backup), as cardcore replica --seed-from: needed once the shard's "
                            "stream no longer starts at its first group (retention)")
        g.add_argument("--submit-timeout-ms", type=int_arg(1, 60_000), default=2000,
                       help="a submit's first wait for the shard leader's answer, doubled at each "
                            "unanswered try up to 8 s; unanswered: sent again (default %(default)s)")
        p.add_argument("--checkpoint-ms", type=int_arg(0, 3_600_000), default=CHECKPOINT_MS_DEFAULT,
                       help="bring LMDB up to date from the group log (a synced commit) at least this "
                            "often while operations arrive, in milliseconds (default %(default)s)")
        p.add_argument("--checkpoint-ops", type=int_arg(1, 1 << 30), default=CHECKPOINT_OPS_DEFAULT,
                       help="and after this many operations (default %(default)s)")
        p.add_argument("--log-segment-mib", type=int_arg(1, 4096),
                       default=SEGMENT_BYTES_DEFAULT >> 20,
                       help="the group log's preallocated segment files, in MiB (default %(default)s)")
        p.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOP_DEFAULT,
                       help="the gRPC process's asyncio event loop: uvloop (libuv) or Python's own "
                            "(default %(default)s)")
        p.set_defaults(func=cmd_serve)

        p = sub.add_parser("migrate", help="upgrade a ledger of format 1 to format 2 (serve does it "
                                           "at start); verified before and after, the old one kept")
        data_dir(p)
        p.add_argument("--program", default=os.environ.get("CARDCORE_PROGRAM"),
                       help="the card program the server runs (stored as version 1; env "
                            "CARDCORE_PROGRAM); default: the default program")
        p.set_defaults(func=cmd_migrate)

        # Cluster (docs/cluster.md)
        p = sub.add_parser("replica", help="a replica of one shard over NATS JetStream (cluster)")
        data_dir(p)
        p.add_argument("--shard", type=int_arg(0, SHARD_NUMBER_MAX), required=True,
                       help="the shard's number")
        p.add_argument("--nats", default=os.environ.get("CARDCORE_NATS_URLS"),
                       help="the NATS servers, comma-separated URLs (nats://HOST:PORT,...; env "
                            "CARDCORE_NATS_URLS)")
        p.add_argument("--program", default=os.environ.get("CARDCORE_PROGRAM"),
                       help="card program TOML for a new shard (its genesis; ignored once the shard "
                            "exists; env CARDCORE_PROGRAM); default: the default program")
        p.add_argument("--stream-replicas", type=int_arg(1, 5), default=3,
                       help="copies of the shard's stream and buckets, made if absent (default 3)")
        p.add_argument("--lease-ms", type=int_arg(1000, 600_000), default=3000,
                       help="the leader lease's TTL, renewed every third of it; the same for every "
                            "replica of the cluster (default %(default)s)")
        p.add_argument("--append-timeout-ms", type=int_arg(100, 600_000), default=30_000,
                       help="re-sends of one group before its outcome is unknown and the replica "
                            "stops (default %(default)s)")
        p.add_argument("--group-max-ops", type=int_arg(1, 20_000), default=2000,
                       help="operations per group at most (default %(default)s)")
        p.add_argument("--checkpoint-ms", type=int_arg(0, 3_600_000), default=CHECKPOINT_MS_DEFAULT,
                       help="LMDB checkpoint at least this often (default %(default)s)")
        p.add_argument("--idle-maintenance-ms", type=int_arg(0, 3_600_000), default=60_000,
                       help="an idle leader appends a prune step of expired request records this "
                            "often (each is a group the stream keeps); 0: never (default "
                            "%(default)s)")
        p.add_argument("--retention-check-ms", type=int_arg(0, 86_400_000),
                       default=60_000,  # (jetlog.RETENTION_CHECK_MS_DEFAULT: not imported here)
                       help="a leader purges, this often, the groups every replica's checkpoint holds "
                            "(docs/cluster.md, retention); 0: never (default %(default)s)")
        p.add_argument("--replica-stale-hours", type=int_arg(1, 24 * 365),
                       default=24,  # (jetlog.REPLICA_STALE_S_DEFAULT, in hours)
                       help="a replica that has not reported its checkpoint for this long no longer "
                            "holds groups back: back later, it starts from a peer's backup (default "
                            "%(default)s)")
        p.add_argument("--retain-groups", type=int_arg(0, 1 << 40), default=10_000,
                       help="groups kept below every replica's checkpoint, so that a backup stays "
                            "good to seed from for that many groups (default %(default)s: ~5 MB idle, "
                            "up to ~6 GB at full groups; jetlog.RETAIN_GROUPS_DEFAULT)")
        p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"),
                       help="the chain's keyring file (env CARDCORE_KEYRING): the member index and "
                            "profiles are kept with its index key; every replica of a shard holds the "
                            "same one, or none (checked against the shard's genesis)")
        p.add_argument("--seed-from", metavar="BACKUP", default=None,
                       help="a new replica (no ledger yet): start from a peer's backup (cardcore "
                            "backup --data-dir PEER --to BACKUP) and follow the stream from its "
                            "checkpoint, instead of replaying the stream from its start")
        p.add_argument("--admin-shard", metavar="N", type=int_arg(0, SHARD_NUMBER_MAX),
                       default=int(os.environ["CARDCORE_ADMIN_SHARD"])
                       if os.environ.get("CARDCORE_ADMIN_SHARD") else None,
                       help="the cluster's admin shard (env CARDCORE_ADMIN_SHARD; docs/cluster.md, The "
                            "admin shard): terminals, operators, the program, stores and the daily "
                            "close are made there, and each card shard's leader relays its groups "
                            "into its own stream; N this replica's --shard: it is the admin shard, "
                            "whose stream keeps every group. Every replica of a cluster gives the "
                            "same N, or none (a single-shard cluster)")
        p.add_argument("--unchecked-through", metavar="GROUP", type=int_arg(0, 1 << 62), default=0,
                       help="apply the stream's groups up to GROUP (one it holds already) without "
                            "checking their journal digests, each that differs logged: the way past "
                            "groups a leader applied to a record changed on its disk, which halt "
                            "every healthy replica (docs/cluster.md, A follower); later groups are "
                            "checked. Remove it once the replica has caught up")
        p.add_argument("--follow-only", action="store_true",
                       help="never lead (a front's own follower, whose ledger it reads; "
                            "docs/cluster.md, the front)")
        p.add_argument("--nats-ca", default=os.environ.get("CARDCORE_NATS_CA"),
                       help="mutual TLS to NATS: the CA the nodes' certificates chain to (env "
                            "CARDCORE_NATS_CA); with --nats-cert and --nats-key")
        p.add_argument("--nats-cert", default=os.environ.get("CARDCORE_NATS_CERT"),
                       help="this replica's certificate, PEM (cardcore certs nats-client "
                            "replica-sN: shard N's alone, or replica: every shard's; env "
                            "CARDCORE_NATS_CERT); {shard} in the path stands for --shard")
        p.add_argument("--nats-key", default=os.environ.get("CARDCORE_NATS_KEY"),
                       help="its private key, PEM (env CARDCORE_NATS_KEY; {shard} as above)")
        p.set_defaults(func=cmd_replica)

        p = sub.add_parser("verify", help="check every card against its journal")
        data_dir(p)
        p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"),
                       help="the keyring, to check the member lookup index too (env "
                            "CARDCORE_KEYRING; default <data-dir>/keyring.json when it exists)")
        p.add_argument("--json", action="store_true", help="the report as JSON on standard output")
        p.set_defaults(func=cmd_verify)

        p = sub.add_parser("backup", help="hot, consistent, compacted copy of the ledger (while serving)")
        data_dir(p)
        p.add_argument("--to", required=True, help="a new folder for the backup")
        p.set_defaults(func=cmd_backup)

        p = sub.add_parser("restore", help="replace a stopped server's ledger with a verified backup")
        data_dir(p)
        p.add_argument("--from", dest="source", required=True, help="a folder made by backup")
        p.add_argument("--force", action="store_true", help="replace an existing ledger")
        p.add_argument("--lost-ledger", action="store_true",
                       help="there is no ledger to replace (its terminal counters, revocations and "
                            "operator removals are lost): revoke every terminal of the backup (enroll "
                            "them anew under new ids) and remove its operators (a new chain admin "
                            "token is written at the next start)")
        p.set_defaults(func=cmd_restore)

    if command not in _CLIENT_COMMANDS:
        server_commands()

    def client(name, help_text, func, card=True, token=True):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--target", type=target_arg, default=env("CARDCORE_LISTEN", DEFAULT_LISTEN),
                       help=f"server HOST:PORT (env CARDCORE_LISTEN; default {DEFAULT_LISTEN}); "
                            f"a HOST alone means port {DEFAULT_PORT}")
        p.add_argument("--timeout-s", type=seconds_arg, default=10.0,
                       help="seconds to wait for the answer (default %(default)g)")
        p.add_argument("--tls-ca", default=os.environ.get("CARDCORE_TLS_CA"),
                       help="CA of the server certificate, PEM (env CARDCORE_TLS_CA); without it, "
                            "plaintext (a server started with --insecure)")
        p.add_argument("--tls-cert", default=os.environ.get("CARDCORE_TLS_CERT"),
                       help="this client's certificate, PEM: a terminal's or a back-office host's "
                            "(env CARDCORE_TLS_CERT; needed with --tls-ca)")
        p.add_argument("--tls-key", default=os.environ.get("CARDCORE_TLS_KEY"),
                       help="the private key of --tls-cert, PEM, unencrypted (env "
                            "CARDCORE_TLS_KEY)")
        if token:  # the console takes its token from the person at its sign-in page
            p.add_argument("--token-file", default=None,
                           help="file holding the operator token; default: env CARDCORE_TOKEN "
                                "(the token itself), else env CARDCORE_TOKEN_FILE, else "
                                "<CARDCORE_DATA_DIR>/admin.token if present" +
                                (" (pos: sent only with --operator)" if name == "pos" else ""))
        if card:
            p.add_argument("card", type=card_number_arg,
                           help="card number, or - to read it from standard input (keeps it out "
                                "of shell history and the process list)")
        p.set_defaults(func=func)
        return p

    def request_opts(p):
        p.add_argument("--request-id", default="",
                       help="idempotency key, 1-64 of A-Z a-z 0-9 . _ : - (default: a new UUID)")
        p.add_argument("--client-time-us", type=client_time_arg, default=0,
                       help="the request's client time, Unix microseconds (default: now); a retry "
                            "of a request_id repeats the original's")

    def till(p, store_help="the till's store id (default 0: head office)"):
        p.add_argument("--store", type=uint32_arg, default=0, help=store_help)
        p.add_argument("--terminal", type=uint32_arg, default=0,
                       help="the till's terminal id (default 0: back office)")
        p.add_argument("--staff", type=uint32_arg, default=0,
                       help="the staff member to credit (default 0: none)")

    def mutating(p, store_help="the till's store id (default 0: head office)"):
        request_opts(p)
        till(p, store_help)

    p = client("open-card", "issue a card", cmd_open_card)
    mutating(p, "the issuing store (the till's, and the member's home store; default 0)")
    p.add_argument("--tier", type=uint32_arg, default=0,
                   help="index into the card program's tiers (default 0: the base tier)")
    p.add_argument("--name", default="", help="the member's name (default: none)")
    p.add_argument("--phone", default="", help="the member's phone (default: none)")
    p.add_argument("--birthday", default="", help="the member's birthday, YYYY-MM-DD (default: none)")
    p.add_argument("--issue-only", action="store_true",
                   help="issued, not active: a stock or gift card an operator activates when it "
                        "is sold (card-status active); default: active now")
    p = client("top-up", "add prepaid money (amount in yuan, e.g. 500 or 12.50)", cmd_top_up)
    mutating(p)
    p.add_argument("amount", type=amount_arg, help="yuan, above 0, at most two decimals")
    p = client("purchase", "pay with the card (gross amount in yuan)", cmd_purchase)
    mutating(p)
    p.add_argument("amount", type=amount_arg,
                   help="the gross amount in yuan, before the member's discount")
    p = client("authorize", "hold money on the card for a sale to come (a car wash, a fuel pump): "
               "captured, voided or released at its expiry", cmd_authorize)
    mutating(p)
    p.add_argument("amount", type=amount_arg, help="yuan to hold, at most what the card has")
    p.add_argument("--minutes", type=int_arg(0, HOLD_MINUTES_MAX), default=0,
                   help=f"how long the hold lasts, 1..{HOLD_MINUTES_MAX} (default 0: a day)")
    p = client("capture", "the sale a hold was for, paid from the hold (gross amount in yuan, at "
               "most what it holds); the rest is released", cmd_capture)
    mutating(p, "the till's store id: the hold's store (default 0: head office)")
    p.add_argument("serial", type=int_arg(1, U64_MAX), help="the hold's serial (authorize's "
                   "journal seq, or cardcore card's hold rows)")
    p.add_argument("amount", type=amount_arg,
                   help="the gross amount in yuan, before the member's discount")
    p = client("void-hold", "release a hold without a sale", cmd_void_hold)
    mutating(p, "the till's store id: the hold's store (default 0: head office)")
    p.add_argument("serial", type=int_arg(1, U64_MAX), help="the hold's serial")
    p = client("card", "balance inquiry", cmd_card)
    till(p)
    p = client("refund", "money back for a sale, by its journal seq (operator token): all that is "
               "left of it, or --amount", cmd_refund)
    mutating(p)
    p.add_argument("seq", type=int_arg(1, U64_MAX), help="the sale's journal seq (on its receipt)")
    p.add_argument("--amount", type=amount_arg, default=0,
                   help="yuan to give back (default: all that is left of the sale)")
    p.add_argument("--line", type=int_arg(1, LINES_MAX), action="append", default=[],
                   dest="lines", help="a line of the sale to give back, by its number on the "
                   "receipt (from 1); repeatable; not with --amount")
    p = client("reverse", "undo a request of this caller's that timed out (or refuse it before it "
               "arrives)", cmd_reverse)
    mutating(p)
    p.add_argument("original_request_id", help="the request to undo, as this caller sent it")
    p.add_argument("--original-client-time-us", type=client_time_arg, default=0,
                   help="the request's own client time, Unix microseconds, when known "
                        "(default 0: not known)")
    def card_or_id(p) -> None:
        p.add_argument("card", type=card_number_arg, nargs="?", default=None,
                       help="card number, or - to read it from standard input; or leave it out "
                            "and give --card-id")
        p.add_argument("--card-id", type=card_id_arg, default=None,
                       help="the card as find-card names it (32 hex digits), when the card is not "
                            "at hand")

    p = client("card-status", "activate an issued card (active), freeze, unfreeze (active), report "
               "lost, find (active) or cancel (closed) a card (operator token)", cmd_card_status,
               card=False)
    card_or_id(p)
    mutating(p)
    p.add_argument("status", choices=tuple(CARD_STATUSES), help="the card's new status")
    p = client("replace-card", "a new card for a lost, damaged or expired one: it inherits money, "
               "points, tier, coupons and packages; the old number dies (a store manager's token)",
               cmd_replace_card, card=False)
    card_or_id(p)
    mutating(p)
    p.add_argument("new_card", type=card_number_arg, help="the new card's number")
    p = client("import", "bring in a legacy member base from a CSV file (a chain admin's token): "
               "resumable, each row imported once", cmd_import, card=False)
    p.add_argument("file", help="the CSV file, UTF-8, a header row first: number, principal, "
                   "bonus, points, tier[, name, phone, birthday, home_store] (README: Legacy "
                   "import)")
    p.add_argument("--yuan", action="store_true",
                   help="principal and bonus are yuan with at most two decimals (default: whole "
                        "fen)")
    p.add_argument("--chunk-rows", type=int_arg(1, CHUNK_ROWS_MAX), default=CHUNK_ROWS_DEFAULT,
                   help="rows per SubmitBatch (default %(default)s, at most "
                        f"{CHUNK_ROWS_MAX:,})")
    p.add_argument("--store", type=uint32_arg, default=0,
                   help="the store the import is journaled at (default 0: head office)")
    p.add_argument("--client-time-us", type=client_time_arg, default=0,
                   help="the import's client time, Unix microseconds (default: the one an "
                        "earlier run of the same file kept in FILE.import.json, else now)")
    p = client("find-card", "a member's cards by phone or name, for an operator without the card "
               "(operator token)", cmd_find_card, card=False)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--phone", help="the member's phone as given at opening (+86 optional)")
    query.add_argument("--name", help="the member's name as given at opening (case and spaces "
                                      "do not matter)")
    till(p)
    p = client("history", "a card's entries, newest first (operator token)", cmd_history)
    p.add_argument("--limit", type=int_arg(1, 100), default=20,
                   help="entries a page, 1..100 (default %(default)s)")
    p.add_argument("--before", type=int_arg(0, U64_MAX), default=0,
                   help="entries below this seq: the next page (default 0: the newest)")
    p.add_argument("--type", action="append", default=[], type=operation_type_arg,
                   help="only this type (purchase, top-up, refund, ...); repeatable "
                        "(default: all)")
    till(p)
    p = client("operation", "what became of a request_id", cmd_operation, card=False)
    p.add_argument("request_id", help="the request's id")
    p.add_argument("--client-time-us", type=client_time_arg, default=0,
                   help="the request's client time, Unix microseconds: an id older than the "
                        "retention window is reported as expired (default 0: not known)")
    p.add_argument("--caller", type=caller_arg, default=None,
                   help="another caller's namespace, KIND:ID (terminal:7, operator:3; chain "
                        "admins; default: this caller's)")

    p = client("watch", "the journal from a seq on, one JSON object per line, live: what a "
               "chain's notices, warehouse or fraud check consume (chain admin)", cmd_watch,
               card=False)
    p.add_argument("--from-seq", type=int_arg(1, U64_MAX), default=1,
                   help="the first entry to print: 1 (the default) from the start, or the resume "
                        "seq an earlier watch printed to stderr")
    p.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                   help="stay and print new entries as they are written (the default); "
                        "--no-follow: stop once every entry written so far is printed. Either "
                        "way the seq to resume from goes to stderr at the end (--timeout-s "
                        "does not apply)")
    p.add_argument("--shard", type=int_arg(0, SHARD_NUMBER_MAX), default=None,
                   help="a cluster's: whose journal (each shard has its own seqs); a front over "
                        "several card shards needs it (docs/cluster.md)")
    p = client("terminals", "enroll, revoke and list terminals (operator token)", cmd_terminals,
               card=False)
    p.add_argument("action", choices=("enroll", "revoke", "list"),
                   help="enroll ID --store S, revoke ID, or list")
    p.add_argument("terminal_id", type=int_arg(1, U32_MAX), nargs="?", default=0,
                   help="the terminal's id, 1..4294967295 (enroll, revoke)")
    p.add_argument("--store", type=uint32_arg, default=None,
                   help="enroll (required): the store the terminal belongs to, for ever; list: "
                        "only this store (default: every store in scope)")
    p.add_argument("--out", help="enroll: where to write the terminal's keys "
                                 "(default terminal-<id>.keys.json)")
    request_opts(p)
    p = client("operators", "add, remove and list operators (operator token)", cmd_operators,
               card=False)
    p.add_argument("action", choices=("add", "remove", "list"), help="add NAME, remove NAME, or list")
    p.add_argument("name", nargs="?", default="", help="the operator's name (add, remove)")
    p.add_argument("--role", choices=ROLES, default="cashier",
                   help="add: the operator's role (default %(default)s)")
    p.add_argument("--stores", type=stores_arg, default=[],
                   help="add: comma-separated store ids in scope (default: the whole chain, "
                        "chain admins only)")
    p.add_argument("--regions", type=stores_arg, default=[],
                   help="add: comma-separated region ids in scope: every store each region holds "
                        "now (default: none)")
    request_opts(p)
    p = client("keys", "rotate: new card-data key version, re-encrypt online (chain admin); "
               "check: offline, every stored card number opens", cmd_keys, card=False)
    p.add_argument("action", choices=("rotate", "check"), help="rotate (online) or check (offline)")
    data_dir(p)
    p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"),
                   help="check: the keyring file (env CARDCORE_KEYRING; default "
                        "<data-dir>/keyring.json)")
    request_opts(p)
    p = client("program", "load: store a card program TOML as the next version (chain admin); "
               "show: a stored version", cmd_program, card=False)
    p.add_argument("action", choices=("load", "show"), help="load FILE, or show")
    p.add_argument("file", nargs="?", help="load: the program document (TOML)")
    p.add_argument("--version", type=uint32_arg, default=0,
                   help="show: this program version (default 0: the current one)")
    request_opts(p)

    p = client("close-day", "close a store's business day and print its figures (store "
               "manager of the store, or chain admin); again: the same figures", cmd_close_day,
               card=False)
    p.add_argument("store", type=uint32_arg, help="the store id (0: head office's own entries)")
    p.add_argument("day", type=date_arg, help="the business day, YYYY-MM-DD on the chain's clock")
    request_opts(p)
    p = client("region", "put ID --name NAME: create or rename a region (chain admin)",
               cmd_region, card=False)
    p.add_argument("action", choices=("put",), help="put")
    p.add_argument("region_id", type=int_arg(1, U32_MAX), help="the region's id, 1..4294967295")
    p.add_argument("--name", required=True, help="its name, 1 to 64 bytes of UTF-8")
    request_opts(p)
    p = client("store", "put ID --name NAME [--region R] [--utc-offset-minutes M --cutoff-hour H]: "
               "create or change a store (chain admin); list: the chain's tree in scope",
               cmd_store, card=False)
    p.add_argument("action", choices=("put", "list"), help="put ID, or list")
    p.add_argument("store_id", type=int_arg(1, U32_MAX), nargs="?", default=0,
                   help="put: the store's id, 1..4294967295 (the tills' store id)")
    p.add_argument("--name", default=None, help="put: its name, 1 to 64 bytes of UTF-8")
    p.add_argument("--region", type=uint32_arg, default=0,
                   help="put: its region (default 0: directly under head office)")
    p.add_argument("--utc-offset-minutes", type=int_arg(-720, 840), default=None,
                   help="put: the store's own clock, minutes east of UTC, -720..840 (with "
                        "--cutoff-hour; default: the card program's business day)")
    p.add_argument("--cutoff-hour", type=int_arg(0, 23), default=None,
                   help="put: the local hour its business day starts, 0..23 (with "
                        "--utc-offset-minutes)")
    request_opts(p)
    p = client("report", "figures by day, month or year over business days, for a store or the "
               "chain (table, or --csv in fen)", cmd_report, card=False)
    p.add_argument("--store", type=uint32_arg, default=None,
                   help="the store (store manager or above, in scope)")
    p.add_argument("--region", type=int_arg(1, U32_MAX), default=None,
                   help="a region: the sum of the stores it holds now (the region in scope)")
    p.add_argument("--chain", action="store_true",
                   help="the whole chain, with the stored-value liability (chain admin)")
    p.add_argument("--from", dest="from_day", type=date_arg, default=None,
                   help="the first business day, YYYY-MM-DD")
    p.add_argument("--to", dest="to_day", type=date_arg, default=None,
                   help="the last business day, YYYY-MM-DD, inclusive (at most 3660 days on)")
    p.add_argument("--last-days", type=int_arg(1, 3660), default=0,
                   help="instead of --from/--to: the last N business days up to today's "
                        "(1: today)")
    p.add_argument("--by-store", action="store_true",
                   help="also each store's figures over the range; alone (no --store, --region "
                        "or --chain): every store in your scope, and their sum")
    p.add_argument("--by", choices=tuple(GRANULARITIES), default="day",
                   help="one row a day, month or year (default %(default)s)")
    p.add_argument("--staff", action="store_true",
                   help="also sales and top-ups by staff id over the range")
    p.add_argument("--csv", action="store_true",
                   help="CSV on standard output: amounts in fen, one column per figure")
    p = client("members", "the chain's member figures over months (new, activated, active, "
               "repeat, churned) and the members dormant as of a day (chain admin)", cmd_members,
               card=False)
    p.add_argument("--from", dest="from_month", type=month_arg, required=True,
                   help="the first calendar month of business days, YYYY-MM")
    p.add_argument("--to", dest="to_month", type=month_arg, required=True,
                   help="the last month, YYYY-MM, inclusive (at most 24 months on); churn is "
                        "against as many months before --from")
    p.add_argument("--as-of", type=date_arg, default=None,
                   help="the dormant members' day, YYYY-MM-DD (default: today's business day)")
    p.add_argument("--csv", action="store_true",
                   help="CSV on standard output: the figures, rates in basis points, fen")
    p.add_argument("--dormant-list", metavar="FILE.csv", default=None,
                   help="also write every dormant member to this CSV file (card id, masked "
                        "number, last and third-last purchase days, purchases, opened day), "
                        f"at most {1_000_000:,}")

    p = client("console", "a read-only back-office web page (operator token typed at sign-in): "
               "cards, history, totals per store, terminals, health", None, card=False,
               token=False)
    p.set_defaults(func=_cmd_console)
    p.add_argument("--listen", type=listen_arg, default="127.0.0.1:8080",
                   help="HOST:PORT of the web page (default %(default)s); off loopback only with "
                        "--http-cert and --http-key; port 0 picks a free one")
    p.add_argument("--http-cert", default=os.environ.get("CARDCORE_CONSOLE_CERT"),
                   help="the web page's certificate chain, PEM, for HTTPS (env "
                        "CARDCORE_CONSOLE_CERT)")
    p.add_argument("--http-key", default=os.environ.get("CARDCORE_CONSOLE_KEY"),
                   help="its private key, PEM, unencrypted (env CARDCORE_CONSOLE_KEY)")
    p.add_argument("--data-dir", default=None,
                   help="no longer used: the totals per store come from the server's reports "
                        "(accepted so that older start scripts keep working)")
    p.add_argument("--metrics-url", default=None,
                   help="the server's Prometheus endpoint (http://HOST:PORT/metrics), shown on "
                        "the health page (default: none)")

    p = client("pos", "a terminal: swipe with DUKPT-encrypted card data and PIN blocks", cmd_pos,
               card=False)
    p.description = ("A terminal on the command line. The card number and the PINs given as '-' "
                     "are read from standard input, one line each, in the order they stand on "
                     "the command line (a terminal prompts without echo); purchase and set-pin "
                     "read a PIN even without --pin, after the others. Each is checked before "
                     "the swipe, and no message shows one.")
    p.add_argument("--keys", required=True,
                   help="the terminal's keys file from 'terminals enroll' (its transaction "
                        "counter is saved there before every swipe)")
    p.add_argument("action", choices=tuple(POS_ACTIONS),
                   help="what the till does (purchase and top-up take an amount)")
    p.add_argument("card", nargs="?", default="-", action=StdinOrder,
                   help="card number, or - (default) to read it from standard input")
    p.add_argument("amount", type=amount_arg, nargs="?", default=0,
                   help="purchase, top-up: yuan, above 0, at most two decimals")
    p.add_argument("--pin", action=StdinOrder,
                   help="'-' reads the PIN from standard input (prompted on a tty); a literal "
                        "PIN only for tests. purchase always reads one; open-card, reset-pin, "
                        "set-pin: the new PIN")
    p.add_argument("--old-pin", action=StdinOrder,
                   help="set-pin: the current PIN, as --pin (an empty line: none). Standard "
                        "input gives one line per '-', in the order they stand on the command "
                        "line: 'set-pin - --pin - --old-pin -' reads the card number, the new "
                        "PIN, then the current one")
    p.add_argument("--tier", type=uint32_arg, default=0,
                   help="open-card: index into the program's tiers (default 0)")
    p.add_argument("--staff", type=uint32_arg, default=0,
                   help="the staff member to credit (default 0: none)")
    p.add_argument("--operator", action="store_true",
                   help="also send the operator token (reset-pin needs a store manager's; a "
                        "first PIN by set-pin, a cashier's)")
    request_opts(p)

    if command not in _CLIENT_COMMANDS:
        from .certs import add_parser as add_certs_parser
        from .clusterconf import add_parser as add_cluster_config_parser

        add_certs_parser(sub)
        add_cluster_config_parser(sub)
    return parser


_CLIENT_COMMANDS = ("open-card", "top-up", "purchase", "authorize", "capture", "void-hold", "card",
                    "refund", "reverse", "card-status",
                    "replace-card", "find-card", "import",
                    "history", "operation", "watch", "terminals", "operators", "keys", "program",
                    "pos", "console", "close-day", "report", "members", "region", "store")


def _cmd_console(args) -> int:
    from .console import cmd_console  # imported on use: http.server is not every command's cost

    return cmd_console(args)


def _command_in(argv: list[str]) -> str:
    """The command ``argv`` names, read as the parser will read it: the first word after the
    options that come before it ("" if none)."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)  # (its value)
        elif not word.startswith("-"):
            return word
    return ""


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's error never ends in a traceback: a bad argument is one line and
    exit 2, a refusal one line and exit 1, ^C exit 130; output cut short (| head) ends quietly."""
    command = None
    try:
        try:
            argv = sys.argv[1:] if argv is None else argv
            args = build_parser(_command_in(argv)).parse_args(argv)
            command = args.command
            if command in _CLIENT_COMMANDS:
                # gRPC's own log lines (a failed handshake) would follow our one line; on
                # request they come back with GRPC_VERBOSITY=debug
                os.environ.setdefault("GRPC_VERBOSITY", "NONE")
            logs.configure(args.log_level, args.log_format)
            return args.func(args)
        finally:  # here, not at exit, where a broken pipe is "Exception ignored" and exit 120
            sys.stdout.flush()
    except UsageError as exc:
        if command is None:  # an argument's own check (a date, a month) refused it in parsing
            command = _command_in(argv)
        print(f"cardcore {command}: error: {exc}" if command else f"cardcore: error: {exc}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ncardcore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (| head): say nothing more, and let the exit's flush succeed
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a file or folder the command needs: its name and the reason
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cardcore: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
