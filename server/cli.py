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

    cfg = ServerConfig(log_level=args.log_level, log_format=args.log_format, data_dir=args.data_dir,
                       listen=args.listen, program_path=args.program, keyring_path=args.keyring,
                       insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_client_ca=args.tls_client_ca,
                       failures_per_minute=args.failures_per_minute, sync=not args.no_sync,
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

def _channel(args):
    """Mutual TLS when a CA is given (the client certificate names a terminal or a back-office
    host), plaintext otherwise (a server started with --insecure)."""
    import grpc

    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    with open(args.tls_ca, "rb") as f:
        root = f.read()
    key = cert = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            cert, key = c.read(), k.read()
    return grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root, key, cert))


def _stub(args):
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    return pb_grpc.CardServiceStub(_channel(args))


def _admin_stub(args):
    from cardcore.v1 import admin_service_pb2_grpc as apb_grpc

    return apb_grpc.AdminServiceStub(_channel(args))


def _token(args) -> str | None:
    """The operator token: env CARDCORE_TOKEN or --token-file; for admin commands (and pos
    --operator) also the bootstrap admin's file in the data folder, a development convenience
    card commands never use: a till's call does not carry a chain admin's token unasked."""
    if os.environ.get("CARDCORE_TOKEN"):
        return os.environ["CARDCORE_TOKEN"].strip()
    if not args.token_file and not getattr(args, "admin_command", False):
        return None
    path = args.token_file or os.path.join(_env("CARDCORE_DATA_DIR", DEFAULT_DATA_DIR), "admin.token")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        if args.token_file:
            raise SystemExit(f"cardcore: no token file at {path}") from None
        return None


def _call(fn, request, args):
    import grpc

    token = _token(args) if getattr(args, "as_operator", True) else None
    try:
        return fn(request, timeout=args.timeout_s,
                  metadata=(("authorization", f"Bearer {token}"),) if token else None)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}{_failure_detail(err)}", file=sys.stderr)
        if err.code() == grpc.StatusCode.UNAVAILABLE and not args.tls_ca:
            print("hint: a server started without --insecure speaks TLS only: pass --tls-ca "
                  "(and --tls-cert/--tls-key), or the CARDCORE_TLS_* variables", file=sys.stderr)
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
            if fail.reason == cpb.REASON_PIN_WRONG:
                text += f" tries_left={fail.pin_tries_left}"
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

    card = _call(_stub(args).GetCard, pb.GetCardRequest(card=cpb.CardRef(card_number=args.card),
                                                       till=_till(args)), args)
    _print_card(card)
    return 0


def _print_card(card) -> None:
    from cardcore.v1 import common_pb2 as cpb

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
        ("PIN", "locked" if card.pin_locked else "set" if card.pin_set else "not set"),
        ("last journal seq", str(card.last_seq)),
    ]))


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


# ---- administration (operator token) -----------------------------------------------------

ROLES = ("cashier", "store_manager", "region_manager", "chain_admin")


def _print_terminal(t) -> None:
    state = "revoked" if t.revoked else "active"
    print(f"terminal {t.terminal_id}  store {t.store_id}  {state}  key id {t.initial_key_id.hex()}"
          f"  last KSN counter {t.last_ksn_counter}")


def cmd_terminals(args) -> int:
    from cardcore.terminal import TerminalKeys
    from cardcore.v1 import admin_service_pb2 as apb

    stub = _admin_stub(args)
    if args.action == "enroll":
        out = args.out or f"terminal-{args.terminal_id}.keys.json"
        if os.path.exists(out):
            raise SystemExit(f"cardcore: {out} exists: a terminal's keys are handed out once")
        resp = _call(stub.EnrollTerminal, apb.EnrollTerminalRequest(
            request_id=args.request_id or str(uuid.uuid4()), terminal_id=args.terminal_id,
            store_id=args.store), args)
        if not resp.initial_key:
            raise SystemExit("cardcore: this request_id enrolled the terminal before; its key "
                             "was handed out then")
        TerminalKeys(resp.terminal.terminal_id, resp.terminal.store_id, resp.initial_key,
                     resp.terminal.initial_key_id).save(out)
        _print_terminal(resp.terminal)
        print(f"initial key written to {out} (0600): load it into the terminal, keep no copy")
    elif args.action == "revoke":
        _print_terminal(_call(stub.RevokeTerminal, apb.RevokeTerminalRequest(
            request_id=args.request_id or str(uuid.uuid4()), terminal_id=args.terminal_id), args))
    else:
        for t in _call(stub.ListTerminals, apb.ListTerminalsRequest(store_id=args.store), args).terminals:
            _print_terminal(t)
    return 0


def cmd_operators(args) -> int:
    from cardcore.v1 import admin_service_pb2 as apb
    from cardcore.v1 import common_pb2 as cpb

    stub = _admin_stub(args)

    def show(o):
        role = cpb.OperatorRole.Name(o.role).removeprefix("OPERATOR_ROLE_").lower()
        scope = ",".join(map(str, o.store_ids)) or "whole chain"
        print(f"operator {o.operator_id}  {o.name}  {role}  stores {scope}"
              f"{'  removed' if o.removed else ''}")

    if args.action == "add":
        role = cpb.OperatorRole.Value("OPERATOR_ROLE_" + args.role.upper())
        stores = [int(x) for x in args.stores.split(",") if x] if args.stores else []
        resp = _call(stub.AddOperator, apb.AddOperatorRequest(
            request_id=args.request_id or str(uuid.uuid4()), name=args.name, role=role,
            store_ids=stores), args)
        show(resp.operator)
        if resp.token:
            print(f"token (shown once; the server keeps only its hash): {resp.token}")
    elif args.action == "remove":
        show(_call(stub.RemoveOperator, apb.RemoveOperatorRequest(
            request_id=args.request_id or str(uuid.uuid4()), name=args.name), args))
    else:
        for o in _call(stub.ListOperators, apb.ListOperatorsRequest(), args).operators:
            show(o)
    return 0


def cmd_keys(args) -> int:
    if args.action == "rotate":
        from cardcore.v1 import admin_service_pb2 as apb

        args.timeout_s = max(args.timeout_s, 3600.0)
        resp = _call(_admin_stub(args).RotateDataKey, apb.RotateDataKeyRequest(
            request_id=args.request_id or str(uuid.uuid4())), args)
        print(f"data key version {resp.key_version} is current; {resp.cards_resealed:,} stored "
              "card numbers re-encrypted under it")
        return 0
    return _keys_check(args)


def _keys_check(args) -> int:
    """Offline check: every stored card number opens under the keyring and hashes to its card id."""
    import collections

    from cardcore import cards
    from cardcore.keyring import Keyring, SealError

    path = _ledger_in(args.data_dir, "no ledger")
    if path is None:
        return 2
    ring = Keyring.load(args.keyring or os.path.join(args.data_dir, "keyring.json"))
    ledger = _open_ledger(path)
    versions: collections.Counter = collections.Counter()
    bad = 0
    try:
        after = b""
        while chunk := ledger.read_sealed(after, 1000):
            after = chunk[-1][0]
            for card_id, sealed in chunk:
                versions[Keyring.sealed_version(sealed)] += 1
                try:
                    ok = cards.card_id(ring.index_key, ring.unseal(card_id, sealed)) == card_id
                except SealError:
                    ok = False
                bad += not ok
    finally:
        ledger.close()
    by_version = ", ".join(f"v{v}: {n:,}" for v, n in sorted(versions.items())) or "none"
    print(_table([("card numbers", f"{sum(versions.values()):,}"), ("by key version", by_version),
                  ("current version", str(ring.data_key_current)),
                  ("result", "clean" if not bad else f"{bad:,} DO NOT OPEN")]))
    return 0 if not bad else 1


# ---- cardcore pos: a terminal on the command line ------------------------------------------

def _secret(prompt: str, given: str | None) -> str:
    """A card number or PIN: '-' reads a line from standard input, never from the command line
    in clear unless given (tests); a terminal prompts without echo."""
    if given and given != "-":
        return given
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt).strip()
    return sys.stdin.readline().strip()


def cmd_pos(args) -> int:
    from cardcore.terminal import Terminal, TerminalKeys

    terminal = Terminal(TerminalKeys.load(args.keys), keys_path=args.keys)
    args.as_operator = args.admin_command = bool(args.operator)
    number = _secret("card number: ", args.card)
    request_id = args.request_id or str(uuid.uuid4())
    stub = _stub(args)
    if args.action == "balance":
        _print_card(_call(stub.GetCard, terminal.get_card(number), args))
        return 0
    if args.action == "purchase":
        pin = _secret("PIN: ", args.pin)
        result = _call(stub.Purchase, terminal.purchase(request_id, number, pin, args.amount,
                                                        args.staff), args)
    elif args.action == "top-up":
        pin = _secret("PIN: ", args.pin) if args.pin else None
        result = _call(stub.TopUp, terminal.top_up(request_id, number, args.amount, pin, args.staff),
                       args)
    elif args.action == "open-card":
        pin = _secret("new PIN: ", args.pin) if args.pin else None
        result = _call(stub.OpenCard, terminal.open_card(request_id, number, pin, args.tier,
                                                         staff_id=args.staff), args)
    elif args.action == "set-pin":
        old = _secret("current PIN (empty if none): ", args.old_pin) if args.old_pin else None
        result = _call(stub.SetPin, terminal.set_pin(request_id, number, _secret("new PIN: ", args.pin),
                                                     old or None, args.staff), args)
    else:  # reset-pin, by a store manager at this till
        pin = _secret("new PIN: ", args.pin) if args.pin else None
        result = _call(stub.ResetPin, terminal.reset_pin(request_id, number, pin, args.staff), args)
    _print_result(result)
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
        p.add_argument("--tls-ca", default=os.environ.get("CARDCORE_TLS_CA"),
                       help="CA of the server certificate (env CARDCORE_TLS_CA); without it, plaintext")
        p.add_argument("--tls-cert", default=os.environ.get("CARDCORE_TLS_CERT"),
                       help="this client's certificate (a terminal's, or a back-office host's)")
        p.add_argument("--tls-key", default=os.environ.get("CARDCORE_TLS_KEY"))
        p.add_argument("--token-file", default=os.environ.get("CARDCORE_TOKEN_FILE"),
                       help="operator token file (env CARDCORE_TOKEN_FILE, or CARDCORE_TOKEN "
                            "itself; default: <CARDCORE_DATA_DIR>/admin.token if present)")
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
    p = client("card", "balance inquiry", cmd_card)
    p.add_argument("--store", type=int, default=0)
    p.add_argument("--terminal", type=int, default=0)
    p.add_argument("--staff", type=int, default=0)
    p = client("operation", "what became of a request_id", cmd_operation, card=False)
    p.add_argument("request_id")

    p = client("terminals", "enroll, revoke and list terminals (operator token)", cmd_terminals,
               card=False)
    p.set_defaults(admin_command=True)
    p.add_argument("action", choices=("enroll", "revoke", "list"))
    p.add_argument("terminal_id", type=int, nargs="?", default=0)
    p.add_argument("--store", type=int, default=0)
    p.add_argument("--out", help="enroll: where to write the terminal's keys "
                                 "(default terminal-<id>.keys.json)")
    p.add_argument("--request-id", default="")
    p = client("operators", "add, remove and list operators (operator token)", cmd_operators,
               card=False)
    p.set_defaults(admin_command=True)
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--role", choices=ROLES, default="cashier")
    p.add_argument("--stores", default="", help="comma-separated store ids in scope")
    p.add_argument("--request-id", default="")
    p = client("keys", "rotate: new card-data key version, re-encrypt online (chain admin); "
               "check: offline, every stored card number opens", cmd_keys, card=False)
    p.set_defaults(admin_command=True)
    p.add_argument("action", choices=("rotate", "check"))
    data_dir(p)
    p.add_argument("--keyring", default=os.environ.get("CARDCORE_KEYRING"))
    p.add_argument("--request-id", default="")

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
    p.add_argument("--request-id", default="")

    from .certs import add_parser as add_certs_parser

    add_certs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
