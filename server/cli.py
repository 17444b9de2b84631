"""The ``cardcore`` command: run the server, verify the ledger, and a small human client."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import uuid

from . import logs

DEFAULT_DATA_DIR = "./var/cardcore"
DEFAULT_LISTEN = "127.0.0.1:50051"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _fen(amount_minor: int) -> str:
    """Minor units as a readable amount: 123456 -> '1,234.56'."""
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 100)
    return f"{sign}{whole:,}.{frac:02d}"


def parse_amount(text: str) -> int:
    """'12.34' or '12' (yuan) -> 1234 fen; refuses more than two decimals."""
    text = text.strip()
    whole, _, frac = text.partition(".")
    if not whole.lstrip("-").isdigit() or (frac and (not frac.isdigit() or len(frac) > 2)):
        raise argparse.ArgumentTypeError(f"not an amount with at most two decimals: {text!r}")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 100 + int((frac + "00")[:2]))


def _card_number(text: str) -> str:
    if text != "-":
        return text
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("card number: ").strip()
    return sys.stdin.readline().strip()


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ---- server-side commands --------------------------------------------------------

def cmd_serve(args) -> int:
    from .app import ServerConfig, StartupError, WriterFailed, serve

    cfg = ServerConfig(log_level=args.log_level, log_format=args.log_format, data_dir=args.data_dir, listen=args.listen, program_path=args.program,
                       keyring_path=args.keyring, sync=not args.no_sync,
                       group_max_ops=args.group_max_ops, group_wait_us=args.group_wait_us,
                       queue_max_ops=args.queue_max_ops, groups_in_flight=args.groups_in_flight,
                       map_size_mib=args.map_size_mib, metrics_listen=args.metrics_listen)
    try:
        asyncio.run(serve(cfg))
    except StartupError as exc:
        print(f"cardcore: {exc}", file=sys.stderr)
        return 2
    except WriterFailed as exc:
        print(f"cardcore: stopped because the writer failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _open_ledger(path: str):
    """A ledger folder opened read-only (verify, backup and restore run beside a live server)."""
    from cardcore.ledger import Ledger
    from cardcore.rules import load_program

    return Ledger(path, load_program(None), sync=False, readonly=True)


def _ledger_in(folder: str, missing: str) -> str | None:
    """The ledger path inside a data or backup folder, or None (after saying so) if there is none."""
    path = os.path.join(folder, "ledger")
    if os.path.exists(os.path.join(path, "data.mdb")):
        return path
    print(f"{missing} at {folder}", file=sys.stderr)
    return None


def _verify_at(path: str) -> dict:
    ledger = _open_ledger(path)
    try:
        return ledger.verify()
    finally:
        ledger.close()


def cmd_verify(args) -> int:
    path = _ledger_in(args.data_dir, "no ledger")
    if path is None:
        return 2
    report = _verify_at(path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table([
            ("ledger", path),
            ("result", "clean" if report["ok"] else "PROBLEMS FOUND"),
            ("cards", f"{report['cards']:,}"),
            ("journal entries", f"{report['journal_entries']:,}"),
            ("request records", f"{report['requests']:,}"),
            ("principal total", _fen(report["principal_minor"])),
            ("bonus total", _fen(report["bonus_minor"])),
            ("points total", f"{report['points']:,}"),
        ]))
        for p in report["problems"]:
            print(f"  - {p}")
    return 0 if report["ok"] else 1


def cmd_backup(args) -> int:
    """Hot backup: a consistent, compacted copy of the ledger, verified, with a manifest."""
    src = _ledger_in(args.data_dir, "no ledger")
    if src is None:
        return 2
    if os.path.exists(args.to):
        print(f"{args.to} exists: a backup goes to a new folder", file=sys.stderr)
        return 2
    ledger = _open_ledger(src)
    try:
        ledger.backup(os.path.join(args.to, "ledger"))
    finally:
        ledger.close()
    report = _verify_at(os.path.join(args.to, "ledger"))
    manifest = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "source": os.path.abspath(src), "verify": report}
    with open(os.path.join(args.to, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(_table([("backup", args.to), ("result", "clean" if report["ok"] else "PROBLEMS FOUND"),
                  ("cards", f"{report['cards']:,}"),
                  ("journal entries", f"{report['journal_entries']:,}"),
                  ("note", "keys are not in the backup: keep the keyring's own copy")]))
    return 0 if report["ok"] else 1


def cmd_restore(args) -> int:
    """Put a backup in place of a data folder's ledger (server stopped; verified first)."""
    import shutil

    from .app import StartupError, lock_data_dir

    src = _ledger_in(args.source, "no backup")
    if src is None:
        return 2
    report = _verify_at(src)
    if not report["ok"]:
        print("the backup does not verify; nothing restored", file=sys.stderr)
        return 1
    os.makedirs(args.data_dir, exist_ok=True)
    try:
        lock = lock_data_dir(args.data_dir)
    except StartupError as exc:
        print(f"{exc}: stop it first", file=sys.stderr)
        return 2
    with lock:
        dest = os.path.join(args.data_dir, "ledger")
        if os.path.exists(dest):
            if not args.force:
                print(f"{dest} exists: pass --force to replace it", file=sys.stderr)
                return 2
            shutil.rmtree(dest)
        os.makedirs(dest)
        tmp = os.path.join(dest, "data.mdb.restoring")
        shutil.copyfile(os.path.join(src, "data.mdb"), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(dest, "data.mdb"))
    print(_table([("restored", dest), ("cards", f"{report['cards']:,}"),
                  ("journal entries", f"{report['journal_entries']:,}")]))
    return 0


# ---- client commands ---------------------------------------------------------------

def _stub(args):
    import grpc

    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(args.target)
    return pb_grpc.CardServiceStub(channel)


def _call(fn, request, args):
    import grpc

    try:
        return fn(request, timeout=args.timeout_s)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}{_failure_detail(err)}", file=sys.stderr)
        raise SystemExit(1) from None


def _failure_detail(err) -> str:
    """The machine-readable part of a refusal, for people: reason, field, available balance."""
    from grpc_status import rpc_status

    from cardcore.v1 import common_pb2 as cpb

    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        fail = cpb.Failure()
        if detail.Unpack(fail):
            text = f" [{cpb.Reason.Name(fail.reason)}"
            if fail.field:
                text += f" field={fail.field}"
            if fail.reason == cpb.REASON_INSUFFICIENT_FUNDS:
                text += f" available={_fen(fail.available_minor)}"
            return text + "]"
    return ""


def _till(args):
    from cardcore.v1 import common_pb2 as cpb

    return cpb.Till(store_id=args.store, terminal_id=args.terminal, staff_id=args.staff)


def _print_result(result, looked_up: bool = False) -> None:
    from cardcore.v1 import common_pb2 as cpb

    rows = [("request", result.request_id), ("operation", cpb.OperationType.Name(result.type)),
            ("journal seq", str(result.seq))]
    if result.type == cpb.OPERATION_TYPE_PURCHASE:
        rows += [("gross", _fen(result.amount_minor)), ("discount", _fen(result.discount_minor)),
                 ("paid", _fen(result.paid_minor)), ("points earned", f"{result.points_earned:,}")]
    elif result.type == cpb.OPERATION_TYPE_TOP_UP:
        rows.append(("topped up", _fen(result.amount_minor)))
    b = result.balance_after
    rows += [("balance", _fen(b.available_minor)), ("  principal", _fen(b.principal_minor)),
             ("  bonus", _fen(b.bonus_minor)), ("points", f"{b.points:,}")]
    if looked_up:
        rows.append(("note", "looked up: this request_id was applied"))
    elif result.replayed:
        rows.append(("note", "replayed: this request_id was already applied"))
    print(_table(rows))


def cmd_open_card(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.OpenCardRequest(
        request_id=args.request_id or str(uuid.uuid4()),
        card=cpb.CardRef(card_number=args.card), tier=args.tier, till=_till(args),
        profile=pb.MemberProfile(name=args.name, phone=args.phone, birthday=args.birthday,
                                 home_store_id=args.store))
    _print_result(_call(_stub(args).OpenCard, req, args))
    return 0


def cmd_top_up(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.TopUpRequest(request_id=args.request_id or str(uuid.uuid4()),
                          card=cpb.CardRef(card_number=args.card), amount_minor=args.amount,
                          till=_till(args))
    _print_result(_call(_stub(args).TopUp, req, args))
    return 0


def cmd_purchase(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.PurchaseRequest(request_id=args.request_id or str(uuid.uuid4()),
                             card=cpb.CardRef(card_number=args.card),
                             gross_amount_minor=args.amount, till=_till(args))
    _print_result(_call(_stub(args).Purchase, req, args))
    return 0


def cmd_card(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    card = _call(_stub(args).GetCard, pb.GetCardRequest(card=cpb.CardRef(card_number=args.card)),
                 args)
    opened = datetime.datetime.fromtimestamp(card.opened_at_us / 1e6, datetime.timezone.utc)
    print(_table([
        ("card", card.masked_number),
        ("status", cpb.CardStatus.Name(card.status).removeprefix("CARD_STATUS_").lower()),
        ("tier", f"{card.tier} {card.tier_name} (pays {card.discount_rate_bp / 100:g}%)"),
        ("balance", _fen(card.balance.available_minor)),
        ("  principal", _fen(card.balance.principal_minor)),
        ("  bonus", _fen(card.balance.bonus_minor)),
        ("points", f"{card.balance.points:,}"),
        ("lifetime paid", _fen(card.lifetime_paid_minor)),
        ("member", card.profile.name or "-"),
        ("opened", opened.strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("last journal seq", str(card.last_seq)),
    ]))
    return 0


def cmd_operation(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    resp = _call(_stub(args).GetOperation, pb.GetOperationRequest(request_id=args.request_id),
                 args)
    if not resp.found:
        print(f"{args.request_id}: not applied (retry the original request with this id)")
        return 1
    if resp.result.reason != cpb.REASON_OK:
        print(f"{args.request_id}: declined: {cpb.Reason.Name(resp.result.reason)}")
        return 0
    _print_result(resp.result, looked_up=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardcore", description=__doc__)
    parser.add_argument("--log-level", default=_env("CARDCORE_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=("text", "json"),
                        default=_env("CARDCORE_LOG_FORMAT", "text"),
                        help="json: one object per line for log shippers (env CARDCORE_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p):
        p.add_argument("--data-dir", default=_env("CARDCORE_DATA_DIR", DEFAULT_DATA_DIR),
                       help="data folder (env CARDCORE_DATA_DIR; default %(default)s)")

    p = sub.add_parser("serve", help="run the gRPC server")
    data_dir(p)
    p.add_argument("--listen", default=_env("CARDCORE_LISTEN", DEFAULT_LISTEN),
                   help="HOST:PORT (env CARDCORE_LISTEN; port 0 picks a free one)")
    p.add_argument("--program", default=os.environ.get("CARDCORE_PROGRAM"),
                   help="card program TOML (tiers, points); default: 3 tiers, 1 point per 1.00")
    p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"),
                   help="card index key file (env CARDCORE_KEYRING; default <data-dir>/card-index.key)")
    p.add_argument("--group-max-ops", type=int, default=10_000,
                   help="operations per write transaction at most")
    p.add_argument("--group-wait-us", type=int, default=0,
                   help="wait this long for more operations once one is queued")
    p.add_argument("--queue-max-ops", type=int, default=100_000,
                   help="queued operations at most; beyond, RESOURCE_EXHAUSTED")
    p.add_argument("--groups-in-flight", type=int, choices=(1, 2), default=1,
                   help="groups handed to the writer at once (1: larger groups, fewer fsyncs; "
                        "2: the writer starts the next while this process answers the last)")
    p.add_argument("--metrics-listen", default=os.environ.get("CARDCORE_METRICS_LISTEN"),
                   help="serve Prometheus metrics on HOST:PORT (env CARDCORE_METRICS_LISTEN; off by default)")
    p.add_argument("--map-size-mib", type=int, default=1024,
                   help="initial LMDB map (address space, not disk); doubles when full")
    p.add_argument("--no-sync", action="store_true",
                   help="BENCHMARKS ONLY: do not fsync commits (acknowledged work can be lost)")
    p.set_defaults(func=cmd_serve)

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
    p.set_defaults(func=cmd_restore)

    def client(name, help_text, func, card=True):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--target", default=_env("CARDCORE_LISTEN", DEFAULT_LISTEN),
                       help="server HOST:PORT")
        p.add_argument("--timeout-s", type=float, default=10.0)
        if card:
            p.add_argument("card", type=_card_number,
                           help="card number, or - to read it from standard input (keeps it out "
                                "of shell history and the process list)")
        p.set_defaults(func=func)
        return p

    def mutating(p):
        p.add_argument("--request-id", default="", help="idempotency key (default: a new UUID)")
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
    client("card", "balance inquiry", cmd_card)
    p = client("operation", "what became of a request_id", cmd_operation, card=False)
    p.add_argument("request_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
