"""The ``cardcore`` command: run the server, verify the ledger, and a small human client."""
from __future__ import annotations

import argparse
import os
import sys

from . import logs
from cardcore.idempotency import REQUEST_WINDOW_S_DEFAULT

from .cmd_client import (CARD_STATUSES, ROLES, cmd_card, cmd_card_status, cmd_history, cmd_keys,
                         cmd_open_card, cmd_operation, cmd_operators, cmd_program, cmd_purchase,
                         cmd_refund, cmd_reverse, cmd_terminals, cmd_top_up)
from .cmd_server import cmd_backup, cmd_migrate, cmd_restore, cmd_serve, cmd_verify
from .writer import READER_CHECK_S_DEFAULT
from .pos import cmd_pos
from .text import (DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_PORT, UsageError, card_number_arg, env,
                   listen_arg, metrics_listen_arg, parse_amount, target_arg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardcore", description=__doc__)
    parser.add_argument("--log-level", default=env("CARDCORE_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=("text", "json"),
                        default=env("CARDCORE_LOG_FORMAT", "text"),
                        help="json: one object per line for log shippers (env CARDCORE_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p):
        p.add_argument("--data-dir", default=env("CARDCORE_DATA_DIR", DEFAULT_DATA_DIR),
                       help="data folder (env CARDCORE_DATA_DIR; default %(default)s)")

    p = sub.add_parser("serve", help="run the gRPC server")
    data_dir(p)
    p.add_argument("--listen", type=listen_arg, default=env("CARDCORE_LISTEN", DEFAULT_LISTEN),
                   help=f"HOST:PORT (env CARDCORE_LISTEN; default {DEFAULT_LISTEN}); a HOST alone "
                        f"listens on port {DEFAULT_PORT}, port 0 picks a free one")
    p.add_argument("--program", default=os.environ.get("CARDCORE_PROGRAM"),
                   help="card program TOML (tiers, points); default: 3 tiers, 1 point per 1.00")
    p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"),
                   help="keyring file (env CARDCORE_KEYRING; default <data-dir>/keyring.json, "
                        "created on first start: production keeps it elsewhere)")
    p.add_argument("--insecure", action="store_true",
                   help="LOCAL DEVELOPMENT ONLY: plaintext on loopback, no client certificates")
    p.add_argument("--tls-cert", default=os.environ.get("CARDCORE_TLS_CERT"),
                   help="server certificate chain, PEM (env CARDCORE_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("CARDCORE_TLS_KEY"),
                   help="server private key, PEM (env CARDCORE_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=os.environ.get("CARDCORE_TLS_CLIENT_CA"),
                   help="CA that signs terminal and back-office client certificates "
                        "(env CARDCORE_TLS_CLIENT_CA); clients must present one")
    p.add_argument("--failures-per-minute", type=int, default=10,
                   help="wrong PINs and unknown cards per terminal per minute before its swipes "
                        "are refused")
    p.add_argument("--group-max-ops", type=int, default=10_000,
                   help="operations per write transaction at most")
    p.add_argument("--group-wait-us", type=int, default=0,
                   help="wait this long for more operations once one is queued")
    p.add_argument("--queue-max-ops", type=int, default=100_000,
                   help="queued operations at most; beyond, RESOURCE_EXHAUSTED")
    p.add_argument("--groups-in-flight", type=int, choices=(1, 2), default=1,
                   help="groups handed to the writer at once (1: larger groups, fewer fsyncs; "
                        "2: the writer starts the next while this process answers the last)")
    p.add_argument("--metrics-listen", type=metrics_listen_arg,
                   default=os.environ.get("CARDCORE_METRICS_LISTEN"),
                   help="serve Prometheus metrics on HOST:PORT (env CARDCORE_METRICS_LISTEN; off by default)")
    p.add_argument("--map-size-mib", type=int, default=1024,
                   help="initial LMDB map (address space, not disk); doubles when full")
    p.add_argument("--no-sync", action="store_true",
                   help="BENCHMARKS ONLY: do not fsync commits (acknowledged work can be lost)")
    p.add_argument("--request-window-hours", type=int, default=REQUEST_WINDOW_S_DEFAULT // 3600,
                   help="request records are kept, and requests accepted, for this long after "
                        "their client time (default %(default)s: a week, longer than a store "
                        "stays offline); at least 1")
    p.add_argument("--reader-check-s", type=float, default=READER_CHECK_S_DEFAULT,
                   help="clear stale LMDB reader slots (readers killed -9) this often")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="upgrade a ledger of format 1 to format 2 (serve does it "
                                       "at start); verified before and after, the old one kept")
    data_dir(p)
    p.add_argument("--program", default=os.environ.get("CARDCORE_PROGRAM"),
                   help="the card program the server runs (stored as version 1); default: the "
                        "default program")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("verify", help="check every card against its journal")
    data_dir(p)
    p.add_argument("--json", action="store_true")
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

    def client(name, help_text, func, card=True):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--target", type=target_arg, default=env("CARDCORE_LISTEN", DEFAULT_LISTEN),
                       help=f"server HOST:PORT (env CARDCORE_LISTEN; default {DEFAULT_LISTEN}); "
                            f"a HOST alone means port {DEFAULT_PORT}")
        p.add_argument("--timeout-s", type=float, default=10.0)
        p.add_argument("--tls-ca", default=os.environ.get("CARDCORE_TLS_CA"),
                       help="CA of the server certificate, PEM (env CARDCORE_TLS_CA); without it, "
                            "plaintext (a server started with --insecure)")
        p.add_argument("--tls-cert", default=os.environ.get("CARDCORE_TLS_CERT"),
                       help="this client's certificate, PEM: a terminal's or a back-office host's "
                            "(env CARDCORE_TLS_CERT; needed with --tls-ca)")
        p.add_argument("--tls-key", default=os.environ.get("CARDCORE_TLS_KEY"),
                       help="the private key of --tls-cert, PEM, unencrypted (env "
                            "CARDCORE_TLS_KEY)")
        p.add_argument("--token-file", default=None,
                       help="file holding the operator token; default: env CARDCORE_TOKEN (the "
                            "token itself), else env CARDCORE_TOKEN_FILE, else "
                            "<CARDCORE_DATA_DIR>/admin.token if present" +
                            (" (pos: sent only with --operator)" if name == "pos" else ""))
        if card:
            p.add_argument("card", type=card_number_arg,
                           help="card number, or - to read it from standard input (keeps it out "
                                "of shell history and the process list)")
        p.set_defaults(func=func)
        return p

    def request_opts(p):
        p.add_argument("--request-id", default="", help="idempotency key (default: a new UUID)")
        p.add_argument("--client-time-us", type=int, default=0,
                       help="the request's client time, Unix microseconds (default: now); a retry "
                            "of a request_id repeats the original's")

    def mutating(p):
        request_opts(p)
        p.add_argument("--store", type=int, default=0)
        p.add_argument("--terminal", type=int, default=0)
        p.add_argument("--staff", type=int, default=0)

    p = client("open-card", "issue a card", cmd_open_card)
    mutating(p)
    p.add_argument("--tier", type=int, default=0)
    p.add_argument("--name", default="")
    p.add_argument("--phone", default="")
    p.add_argument("--birthday", default="", help="YYYY-MM-DD")
    p = client("top-up", "add prepaid money (amount in yuan, e.g. 500 or 12.50)", cmd_top_up)
    mutating(p)
    p.add_argument("amount", type=parse_amount)
    p = client("purchase", "pay with the card (gross amount in yuan)", cmd_purchase)
    mutating(p)
    p.add_argument("amount", type=parse_amount)
    p = client("card", "balance inquiry", cmd_card)
    p.add_argument("--store", type=int, default=0)
    p.add_argument("--terminal", type=int, default=0)
    p.add_argument("--staff", type=int, default=0)
    p = client("refund", "money back for a sale, by its journal seq (operator token): all that is "
               "left of it, or --amount", cmd_refund)
    mutating(p)
    p.add_argument("seq", type=int, help="the sale's journal seq (on its receipt)")
    p.add_argument("--amount", type=parse_amount, default=0, help="yuan (default: all that is left)")
    p = client("reverse", "undo a request of this caller's that timed out (or refuse it before it "
               "arrives)", cmd_reverse)
    mutating(p)
    p.add_argument("original_request_id")
    p.add_argument("--original-client-time-us", type=int, default=0,
                   help="the request's own client time, when known")
    p = client("card-status", "freeze, unfreeze (active), report lost, find (active) or cancel "
               "(closed) a card (operator token)", cmd_card_status)
    mutating(p)
    p.add_argument("status", choices=tuple(CARD_STATUSES))
    p = client("history", "a card's entries, newest first (operator token)", cmd_history)
    p.add_argument("--limit", type=int, default=20, help="entries a page (1..100)")
    p.add_argument("--before", type=int, default=0, help="entries below this seq (the next page)")
    p.add_argument("--type", action="append", default=[],
                   help="only this type (purchase, top-up, refund, ...); repeatable")
    p.add_argument("--store", type=int, default=0)
    p.add_argument("--terminal", type=int, default=0)
    p.add_argument("--staff", type=int, default=0)
    p = client("operation", "what became of a request_id", cmd_operation, card=False)
    p.add_argument("request_id")
    p.add_argument("--client-time-us", type=int, default=0,
                   help="the request's client time: an id older than the retention window is "
                        "reported as expired")
    p.add_argument("--caller", default="",
                   help="another caller's namespace, KIND:ID (terminal:7, operator:3; chain "
                        "admins)")

    p = client("terminals", "enroll, revoke and list terminals (operator token)", cmd_terminals,
               card=False)
    p.add_argument("action", choices=("enroll", "revoke", "list"))
    p.add_argument("terminal_id", type=int, nargs="?", default=0)
    p.add_argument("--store", type=int, default=0)
    p.add_argument("--out", help="enroll: where to write the terminal's keys "
                                 "(default terminal-<id>.keys.json)")
    request_opts(p)
    p = client("operators", "add, remove and list operators (operator token)", cmd_operators,
               card=False)
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--role", choices=ROLES, default="cashier")
    p.add_argument("--stores", default="", help="comma-separated store ids in scope")
    request_opts(p)
    p = client("keys", "rotate: new card-data key version, re-encrypt online (chain admin); "
               "check: offline, every stored card number opens", cmd_keys, card=False)
    p.add_argument("action", choices=("rotate", "check"))
    data_dir(p)
    p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"))
    request_opts(p)
    p = client("program", "load: store a card program TOML as the next version (chain admin); "
               "show: a stored version", cmd_program, card=False)
    p.add_argument("action", choices=("load", "show"))
    p.add_argument("file", nargs="?", help="load: the program document (TOML)")
    p.add_argument("--version", type=int, default=0, help="show: this version (default: current)")
    request_opts(p)

    p = client("pos", "a terminal: swipe with DUKPT-encrypted card data and PIN blocks", cmd_pos,
               card=False)
    p.add_argument("--keys", required=True, help="the terminal's keys file from 'terminals enroll'")
    p.add_argument("action", choices=("purchase", "top-up", "balance", "open-card", "set-pin",
                                      "reset-pin"))
    p.add_argument("card", nargs="?", default="-", help="card number, or - (default) to read it "
                                                        "from standard input")
    p.add_argument("amount", type=parse_amount, nargs="?", default=0)
    p.add_argument("--pin", help="'-' reads the PIN from standard input (prompted on a tty); "
                                 "a literal PIN only for tests")
    p.add_argument("--old-pin", help="set-pin: the current PIN, as --pin")
    p.add_argument("--tier", type=int, default=0)
    p.add_argument("--staff", type=int, default=0)
    p.add_argument("--operator", action="store_true",
                   help="also send the operator token (reset-pin needs a store manager)")
    request_opts(p)

    from .certs import add_parser as add_certs_parser

    add_certs_parser(sub)
    return parser


_CLIENT_COMMANDS = ("open-card", "top-up", "purchase", "card", "refund", "reverse", "card-status",
                    "history", "operation", "terminals", "operators", "keys", "program", "pos")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _CLIENT_COMMANDS:
        # gRPC's own log lines (a failed handshake) would follow our one line; on request
        # they come back with GRPC_VERBOSITY=debug
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    logs.configure(args.log_level, args.log_format)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"cardcore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
