"""Client commands: a small human client of CardService and AdminService (plaintext or mutual
TLS, an operator token when one is given)."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import sys
import uuid

from .cmd_server import keys_check
from .text import DEFAULT_DATA_DIR, UsageError, env, fen, table


LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def _host_of(target: str) -> str:
    """The host of a HOST:PORT or [IPv6]:PORT target (cardcore.server.text.target_arg)."""
    host = target.rpartition(":")[0] if not target.startswith("unix") else "localhost"
    return host[1:-1] if host.startswith("[") else host


def _loopback(target: str) -> bool:
    host = _host_of(target)
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _channel(args):
    """Mutual TLS when a CA is given (the client certificate names a terminal or a back-office
    host), plaintext otherwise (a server started with --insecure). The files are checked here:
    gRPC would say only "Socket closed"."""
    import grpc

    from .tlsfiles import TlsFileError, read_ca, read_pair

    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise UsageError("--tls-cert and --tls-key go with --tls-ca, the CA of the server's "
                             "certificate (env CARDCORE_TLS_CA): without it this is plaintext")
        return grpc.insecure_channel(args.target)
    if not (args.tls_cert and args.tls_key):
        missing = "--tls-key" if args.tls_cert else "--tls-cert" if args.tls_key else \
            "--tls-cert and --tls-key"
        raise UsageError(f"no client certificate: {missing} missing (env CARDCORE_TLS_CERT, "
                         "CARDCORE_TLS_KEY): a cardcore server over TLS talks only to clients "
                         "that present one, a terminal's or a back-office host's "
                         "(cardcore certs client NAME)")
    try:
        root = read_ca(args.tls_ca, "--tls-ca")
        cert, key = read_pair(args.tls_cert, args.tls_key, "--tls-cert", "--tls-key")
    except TlsFileError as exc:
        raise UsageError(str(exc)) from None
    return grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root, key, cert))


def stub_of(args):
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    return pb_grpc.CardServiceStub(_channel(args))


def admin_stub_of(args):
    from cardcore.v1 import admin_service_pb2_grpc as apb_grpc

    return apb_grpc.AdminServiceStub(_channel(args))


def token_of(args) -> tuple[str | None, str]:
    """The operator token every client command sends, and where it came from (for messages;
    never the token itself). In this order: --token-file, env CARDCORE_TOKEN, env
    CARDCORE_TOKEN_FILE, else the bootstrap chain admin's <CARDCORE_DATA_DIR>/admin.token if
    there is one. ``cardcore pos`` is a till: it sends one only with --operator."""
    if not getattr(args, "send_token", True):
        return None, "none sent (a till's call: --operator sends one)"
    explicit = True
    if args.token_file:
        path, source = args.token_file, f"--token-file {args.token_file}"
    elif os.environ.get("CARDCORE_TOKEN", "").strip():
        return os.environ["CARDCORE_TOKEN"].strip(), "env CARDCORE_TOKEN"
    elif os.environ.get("CARDCORE_TOKEN_FILE"):
        path = os.environ["CARDCORE_TOKEN_FILE"]
        source = f"env CARDCORE_TOKEN_FILE {path}"
    else:
        path = os.path.join(env("CARDCORE_DATA_DIR", DEFAULT_DATA_DIR), "admin.token")
        source, explicit = f"{path} (the default: <CARDCORE_DATA_DIR>/admin.token)", False
    try:
        with open(path) as f:
            token = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        if explicit:
            raise UsageError(f"{source}: no such file") from None
        return None, f"none sent (no --token-file, no CARDCORE_TOKEN, no {path})"
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        return None, f"none sent ({source} is empty)"
    return token, source


def _metadata(args) -> tuple[tuple | None, str]:
    """The call's metadata (the operator token, if any) and where the token came from; a token
    goes in plaintext to a loopback address only."""
    token, source = token_of(args)
    if token and not args.tls_ca and not _loopback(args.target):
        raise UsageError(f"an operator token goes to {args.target} only over TLS: give --tls-ca, "
                         "--tls-cert and --tls-key (a plaintext server listens on loopback only)")
    return ((("authorization", f"Bearer {token}"),) if token else None), source


def call(fn, request, args):
    """One unary call; a refusal or a transport failure becomes one line on stderr and exit 1."""
    import grpc

    metadata, source = _metadata(args)
    try:
        return fn(request, timeout=args.timeout_s, metadata=metadata)
    except grpc.RpcError as err:
        print(_error_line(err, request, args, source), file=sys.stderr)
        raise SystemExit(1) from None


def _error_line(err, request, args, token_source: str) -> str:
    """One line for people: the status, the refusal's reason, and what to do when it is clear."""
    import grpc

    code, details = err.code(), err.details() or ""
    line = f"error: {code.name}: {details}{_failure_detail(err)}"
    if code == grpc.StatusCode.UNAVAILABLE and "REASON_" not in line:
        line = f"error: UNAVAILABLE: {_unavailable(details, args)}"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        line += f"; operator token: {token_source}"
    retry = ""
    if getattr(request, "request_id", "") and getattr(request, "client_time_us", 0):
        retry = (f"repeat it with --request-id {request.request_id} --client-time-us "
                 f"{request.client_time_us}: it applies once")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        line = f"error: DEADLINE_EXCEEDED: no answer within {args.timeout_s:g} s (--timeout-s)"
        if retry:
            line += f"; the outcome is unknown: {retry}"
    elif "REASON_OUTCOME_UNKNOWN" in line and retry:
        line += f"; {retry}"
    return " ".join(line.split())  # one line, whatever the server's text holds


def _unavailable(details: str, args) -> str:
    """What "failed to connect" means here."""
    target = args.target
    if "Connection refused" in details:
        return f"nothing listens at {target} (connection refused): is the server running there?"
    if "resolv" in details or "DNS" in details:
        return f"cannot find the host of {target} (name resolution failed)"
    if "WRONG_VERSION_NUMBER" in details or "wrong version number" in details.lower():
        return (f"{target} does not speak TLS: a server started with --insecure: leave out "
                "--tls-ca (and CARDCORE_TLS_CA)")
    if "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details.lower():
        return (f"the certificate of {target} is not signed by --tls-ca {args.tls_ca}, or has "
                "expired")
    if "peer certificate" in details.lower() or "Peer name" in details:
        return (f"the server's certificate does not name {_host_of(target)}: connect by a name "
                "it holds (cardcore certs init --host)")
    if "Socket closed" in details or "handshake" in details.lower():
        if not args.tls_ca:
            return (f"{target} closed the connection: a server started without --insecure "
                    "speaks mutual TLS only: give --tls-ca, --tls-cert and --tls-key (env "
                    "CARDCORE_TLS_CA, CARDCORE_TLS_CERT, CARDCORE_TLS_KEY)")
        return (f"{target} closed the connection in the TLS handshake: it did not accept the "
                f"client certificate --tls-cert {args.tls_cert} (not signed by the server's "
                "--tls-client-ca?)")
    return details


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
                text += f" available={fen(fail.available_minor)}"
            if fail.reason == cpb.REASON_PIN_WRONG:
                text += f" tries_left={fail.pin_tries_left}"
            if fail.detail:
                text += f" {fail.detail}"
            return text + "]"
    return ""


def _till(args):
    from cardcore.v1 import common_pb2 as cpb

    return cpb.Till(store_id=args.store, terminal_id=args.terminal, staff_id=args.staff)


def client_time(args) -> int:
    """--client-time-us (a retry repeats the original's), or now."""
    from cardcore.terminal import now_us

    return args.client_time_us or now_us()


def request_fields(args) -> dict:
    """What every mutating request carries: --request-id (default a new UUID) and the client
    time (a retry repeats both)."""
    return {"request_id": args.request_id or str(uuid.uuid4()), "client_time_us": client_time(args)}


def request_rows(request_id: str, client_time_us: int = 0) -> list[tuple[str, str]]:
    """An answer's first rows: the request id and (when this command sent it) the client time,
    the two a retry repeats."""
    rows = [("request", request_id)]
    if client_time_us:
        rows.append(("client time", f"{client_time_us}  (a retry repeats it: --client-time-us)"))
    return rows


def print_result(result, looked_up: bool = False, client_time_us: int = 0) -> None:
    from cardcore.v1 import common_pb2 as cpb

    rows = request_rows(result.request_id, client_time_us)
    rows += [("operation", cpb.OperationType.Name(result.type)), ("journal seq", str(result.seq))]
    if result.type == cpb.OPERATION_TYPE_PURCHASE:
        rows += [("gross", fen(result.amount_minor)), ("discount", fen(result.discount_minor)),
                 ("paid", fen(result.paid_minor)), ("points earned", f"{result.points_earned:,}")]
    elif result.type == cpb.OPERATION_TYPE_TOP_UP:
        rows.append(("topped up", fen(result.amount_minor)))
    elif result.type == cpb.OPERATION_TYPE_HOLD_AUTHORIZED:  # rule 15: seq is the hold's serial
        rows += [("amount held", fen(result.amount_minor)),
                 ("hold serial", str(result.hold_serial)),
                 ("until", _utc(result.hold_expires_at_us))]
    elif result.type == cpb.OPERATION_TYPE_HOLD_VOIDED:
        rows += [("released", fen(result.amount_minor)), ("hold serial", str(result.hold_serial))]
    if result.type == cpb.OPERATION_TYPE_PURCHASE and result.hold_serial:
        rows.append(("from hold", str(result.hold_serial)))
    b = result.balance_after
    rows += [("balance", fen(b.available_minor)), ("  principal", fen(b.principal_minor)),
             ("  bonus", fen(b.bonus_minor))]
    if b.held_minor:
        rows.append(("  held", fen(b.held_minor)))
    rows.append(("points", f"{b.points:,}"))
    if looked_up:
        rows.append(("note", "looked up: this request_id was applied"))
    elif result.replayed:
        rows.append(("note", "replayed: this request_id was already applied"))
    print(table(rows))


def _card_call(args, rpc: str, message, **fields) -> int:
    """One card operation of the command line: ``message`` for ``--card`` at ``--store`` (the
    till) with ``fields`` and the request id and client time, sent as ``rpc``, its answer
    printed."""
    from cardcore.v1 import common_pb2 as cpb

    req = message(card=cpb.CardRef(card_number=args.card), till=_till(args), **fields,
                  **request_fields(args))
    print_result(call(getattr(stub_of(args), rpc), req, args), client_time_us=req.client_time_us)
    return 0


def cmd_open_card(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb

    profile = pb.MemberProfile(name=args.name, phone=args.phone, birthday=args.birthday,
                               home_store_id=args.store)
    return _card_call(args, "OpenCard", pb.OpenCardRequest, tier=args.tier, profile=profile,
                      issue_only=args.issue_only)


def cmd_top_up(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb

    return _card_call(args, "TopUp", pb.TopUpRequest, amount_minor=args.amount)


def cmd_purchase(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb

    return _card_call(args, "Purchase", pb.PurchaseRequest, gross_amount_minor=args.amount)


def cmd_authorize(args) -> int:
    """Rule 15: money held for a sale to come; the answer's seq is the hold's serial."""
    from cardcore.v1 import card_service_pb2 as pb

    return _card_call(args, "Authorize", pb.AuthorizeRequest, amount_minor=args.amount,
                      hold_minutes=args.minutes)


def cmd_capture(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb

    return _card_call(args, "Capture", pb.CaptureRequest, hold_serial=args.serial,
                      gross_amount_minor=args.amount)


def cmd_void_hold(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb

    return _card_call(args, "VoidHold", pb.VoidHoldRequest, hold_serial=args.serial)


def cmd_card(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    card = call(stub_of(args).GetCard, pb.GetCardRequest(card=cpb.CardRef(card_number=args.card),
                                                       till=_till(args)), args)
    print_card(card)
    return 0


def _utc(at_us: int) -> str:
    """A time on the wire (Unix microseconds) as the CLI prints it."""
    at = datetime.datetime.fromtimestamp(at_us / 1e6, datetime.timezone.utc)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def print_card(card) -> None:
    """What the answer shows (Card.view): a terminal without the PIN sees status and tier only."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    rows = [("card", card.masked_number),
            ("status", cpb.CardStatus.Name(card.status).removeprefix("CARD_STATUS_").lower()),
            ("tier", f"{card.tier} {card.tier_name} (pays {card.discount_rate_bp / 100:g}%)")]
    if card.replaced_by:  # a replaced card, to an operator: the card that replaced it (masked)
        rows.append(("replaced by", card.replaced_by))
    if card.expires_at_us:  # rule 14: fixed at its opening
        rows.append(("expires", _utc(card.expires_at_us)))
    if card.view >= pb.CARD_VIEW_BALANCE:
        rows += [("balance", fen(card.balance.available_minor)),
                 ("  principal", fen(card.balance.principal_minor)),
                 ("  bonus", fen(card.balance.bonus_minor))]
        if card.balance.held_minor:  # rule 15: why the balance is less than principal + bonus
            rows.append(("  held", fen(card.balance.held_minor)))
        rows += [(f"  hold {h.serial}", f"{fen(h.amount_minor)} by store {h.store_id}, until "
                  f"{_utc(h.expires_at_us)}") for h in card.holds]
        rows += [("points", f"{card.balance.points:,}"),
                 ("lifetime paid", fen(card.lifetime_paid_minor))]
        if card.view == pb.CARD_VIEW_FULL:
            rows.append(("member", card.profile.name or "-"))
        rows += [("opened", _utc(card.opened_at_us)),
                 ("PIN", "locked" if card.pin_locked else "set" if card.pin_set else "not set"),
                 ("last journal seq", str(card.last_seq))]
    else:
        rows.append(("balance", "shown with the card's PIN (--pin)"))
    print(table(rows))


def cmd_operation(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.GetOperationRequest(request_id=args.request_id, client_time_us=args.client_time_us)
    if args.caller:
        kind, ident = args.caller  # checked by cli.caller_arg
        req.caller.kind = cpb.CallerKind.Value("CALLER_KIND_" + kind.upper())
        req.caller.id = ident
    resp = call(stub_of(args).GetOperation, req, args)
    if resp.state == pb.OPERATION_STATE_EXPIRED:
        print(f"{args.request_id}: older than the retention window: it can no longer apply")
        return 1
    if resp.state == pb.OPERATION_STATE_NOT_FOUND:
        print(f"{args.request_id}: not applied (retry the original request: same request_id "
              "and client time)")
        return 1
    if resp.state == pb.OPERATION_STATE_DECLINED:
        print(f"{args.request_id}: declined: {cpb.Reason.Name(resp.result.reason)}")
        return 0
    print_result(resp.result, looked_up=True)
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

    if args.action in ("enroll", "revoke") and not args.terminal_id:
        raise UsageError(f"terminals {args.action} needs the terminal's id (1..4294967295)")
    if args.action == "revoke" and args.store is not None:
        raise UsageError("--store is for terminals enroll and list, not revoke")
    if args.action == "enroll":
        if args.store is None:
            raise UsageError("terminals enroll needs --store: the store the terminal belongs to "
                             "(it cannot move later)")
        out = args.out or f"terminal-{args.terminal_id}.keys.json"
        folder = os.path.dirname(os.path.abspath(out))
        if os.path.lexists(out):
            raise UsageError(f"{out} exists: a terminal's keys are handed out once")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"--out {out}: cannot write there (no folder {folder}, or not "
                             "writable): nothing was enrolled")
        fields = request_fields(args)
        resp = call(admin_stub_of(args).EnrollTerminal, apb.EnrollTerminalRequest(
            terminal_id=args.terminal_id, store_id=args.store, **fields), args)
        if not resp.initial_key:
            raise SystemExit("cardcore: this request_id enrolled the terminal before and the "
                             "terminal has transacted since: its key was handed out then")
        try:
            TerminalKeys(resp.terminal.terminal_id, resp.terminal.store_id, resp.initial_key,
                         resp.terminal.initial_key_id).save(out)
        except OSError as exc:
            raise SystemExit(
                f"cardcore: terminal {args.terminal_id} is enrolled but its keys could not be "
                f"written to {out} ({exc.strerror or exc}): get them again, before the terminal "
                f"transacts, with the same request: cardcore terminals enroll {args.terminal_id} "
                f"--store {args.store} --request-id {fields['request_id']} --client-time-us "
                f"{fields['client_time_us']} --out ANOTHER_FILE") from None
        _print_terminal(resp.terminal)
        print(f"initial key written to {out} (0600): load it into the terminal, keep no copy")
        return 0
    stub = admin_stub_of(args)
    if args.action == "revoke":
        _print_terminal(call(stub.RevokeTerminal, apb.RevokeTerminalRequest(
            terminal_id=args.terminal_id, **request_fields(args)), args))
    else:
        for t in call(stub.ListTerminals, apb.ListTerminalsRequest(store_id=args.store or 0),
                      args).terminals:
            _print_terminal(t)
    return 0


def cmd_operators(args) -> int:
    from cardcore.v1 import admin_service_pb2 as apb
    from cardcore.v1 import common_pb2 as cpb

    stub = admin_stub_of(args)

    def show(o):
        role = cpb.OperatorRole.Name(o.role).removeprefix("OPERATOR_ROLE_").lower()
        scope = ",".join(map(str, o.store_ids)) or ("none" if o.region_ids else "whole chain")
        regions = f"  regions {','.join(map(str, o.region_ids))}" if o.region_ids else ""
        print(f"operator {o.operator_id}  {o.name}  {role}  stores {scope}{regions}"
              f"{'  removed' if o.removed else ''}")

    if args.action in ("add", "remove") and not args.name:
        raise UsageError(f"operators {args.action} needs the operator's name")
    if args.action == "add":
        role = cpb.OperatorRole.Value("OPERATOR_ROLE_" + args.role.upper())
        resp = call(stub.AddOperator, apb.AddOperatorRequest(
            name=args.name, role=role, store_ids=args.stores, region_ids=args.regions,
            **request_fields(args)), args)
        show(resp.operator)
        if resp.token:
            print(f"token (shown once; the server keeps only its hash): {resp.token}")
    elif args.action == "remove":
        show(call(stub.RemoveOperator, apb.RemoveOperatorRequest(
            name=args.name, **request_fields(args)), args))
    else:
        for o in call(stub.ListOperators, apb.ListOperatorsRequest(), args).operators:
            show(o)
    return 0


def cmd_keys(args) -> int:
    if args.action == "rotate":
        from cardcore.v1 import admin_service_pb2 as apb

        args.timeout_s = max(args.timeout_s, 3600.0)
        resp = call(admin_stub_of(args).RotateDataKey, apb.RotateDataKeyRequest(
            **request_fields(args)), args)
        print(f"data key version {resp.key_version} is current; {resp.cards_resealed:,} stored "
              "card numbers re-encrypted under it")
        return 0
    return keys_check(args)


def cmd_program(args) -> int:
    """load: the document is checked here first (line and problem, nothing sent), then by the
    server; show: a stored version, its document on standard output."""
    from cardcore.program import ProgramError, checked_program_file
    from cardcore.v1 import admin_service_pb2 as apb

    stub = admin_stub_of(args)
    if args.action == "show":
        version = call(stub.GetProgram, apb.GetProgramRequest(version=args.version), args)
        print(f"# program version {version.version}{' (current)' if version.current else ''}, "
              f"sha256 {version.sha256}, loaded by operator {version.loaded_by}")
        print(version.document, end="" if version.document.endswith("\n") else "\n")
        return 0
    if not args.file:
        raise UsageError("program load needs the program file (TOML)")
    try:
        document = checked_program_file(args.file)
    except ProgramError as exc:
        print(f"cardcore: {args.file}: {exc}", file=sys.stderr)
        return 2
    version = call(stub.LoadProgram, apb.LoadProgramRequest(
        **request_fields(args),
        document=document), args)
    print(f"program version {version.version} is current (sha256 {version.sha256})")
    return 0


def cmd_refund(args) -> int:
    """Money back for a sale (an operator's: the token), all that is left of it, --amount, or
    the lines --line names."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.RefundRequest(card=cpb.CardRef(card_number=args.card), original_seq=args.seq,
                           amount_minor=args.amount, line_numbers=args.lines, till=_till(args),
                           **request_fields(args))
    result = call(stub_of(args).Refund, req, args)
    print_undo(result, req.client_time_us)
    if result.lines:
        print(table([(f"line {x.line_number}", f"{fen(x.amount_minor - x.discount_minor)}"
                      f"{'  ' + x.sku if x.sku else ''}") for x in result.lines]))
    return 0


def cmd_reverse(args) -> int:
    """A request of this caller's undone, or refused before it arrives."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.ReverseRequest(card=cpb.CardRef(card_number=args.card),
                            original_request_id=args.original_request_id,
                            original_client_time_us=args.original_client_time_us,
                            till=_till(args), **request_fields(args))
    print_undo(call(stub_of(args).Reverse, req, args), req.client_time_us)
    return 0


def print_undo(result, client_time_us: int = 0) -> None:
    from cardcore.v1 import common_pb2 as cpb

    b = result.balance_after
    print(table([
        *request_rows(result.request_id, client_time_us),
        ("operation", cpb.OperationType.Name(result.type)),
        ("journal seq", str(result.seq)),
        ("of entry", str(result.original_seq) if result.original_seq else "- (nothing applied)"),
        ("given back", fen(result.amount_minor)),
        ("  principal", fen(result.principal_delta_minor)),
        ("  bonus", fen(result.bonus_delta_minor)),
        ("points back", f"{result.points_earned:,}"),
        ("points taken", f"{result.points_redeemed:,}"),
        ("nothing left", "yes" if result.refund_complete else "no"),
        ("balance", fen(b.available_minor)), ("points", f"{b.points:,}")]))


CARD_STATUSES = {"active": 1, "frozen": 2, "lost": 3, "closed": 4}  # cardcore.v1.CardStatus


def card_or_id(args):
    """The CardRef of a command that takes a card number or --card-id (find-card), one of them."""
    from cardcore.v1 import common_pb2 as cpb

    if (args.card is None) == (args.card_id is None):
        raise UsageError("name the card by its number or by --card-id (find-card), not both")
    return (cpb.CardRef(card_id=args.card_id) if args.card_id is not None
            else cpb.CardRef(card_number=args.card))


def cmd_card_status(args) -> int:
    """Card life (an operator's): activate, freeze, unfreeze, lost, found, cancel."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.SetCardStatusRequest(card=card_or_id(args), status=CARD_STATUSES[args.status], till=_till(args),
                                  **request_fields(args))
    result = call(stub_of(args).SetCardStatus, req, args)
    rows = [*request_rows(result.request_id, req.client_time_us), ("journal seq", str(result.seq)),
            ("status", cpb.CardStatus.Name(result.status_after).removeprefix("CARD_STATUS_").lower())]
    if result.status_after == cpb.CARD_STATUS_CLOSED:
        rows += [("pay back", fen(result.amount_minor)),
                 ("bonus forfeited", fen(-result.bonus_delta_minor))]
    print(table(rows))
    return 0


def cmd_replace_card(args) -> int:
    """Replacement (an operator's): the new card holds everything; the old number dies."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    req = pb.ReplaceCardRequest(card=card_or_id(args),
                                new_card=cpb.CardRef(card_number=args.new_card), till=_till(args),
                                **request_fields(args))
    result = call(stub_of(args).ReplaceCard, req, args)
    b = result.balance_after
    print(table([*request_rows(result.request_id, req.client_time_us),
                 ("journal seq", str(result.seq)), ("principal", fen(b.principal_minor)), ("bonus", fen(b.bonus_minor)),
                 ("points", f"{b.points:,}"),
                 ("PIN", "none yet: the member sets one with an operator at a till")]))
    return 0


def cmd_find_card(args) -> int:
    """A member's cards by phone or name (rule 17): each one's id, for card-status --card-id."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    query = {"phone": args.phone} if args.phone is not None else {"name": args.name}
    answer = call(stub_of(args).FindCards, pb.FindCardsRequest(till=_till(args), **query), args)
    if not answer.cards:
        print("no card matches")
        return 0
    rows = [("card id", "card", "status", "tier", "opened (UTC)", "home store")]
    for c in answer.cards:
        opened = datetime.datetime.fromtimestamp(c.opened_at_us / 1e6, datetime.timezone.utc)
        rows.append((c.card_id.hex(), c.masked_number,
                     cpb.CardStatus.Name(c.status).removeprefix("CARD_STATUS_").lower(),
                     f"{c.tier} {c.tier_name}", opened.strftime("%Y-%m-%d"),
                     str(c.home_store_id or "-")))
    print("\n".join("  ".join(f"{v:<{w}}" for v, w in zip(r, (32, 19, 7, 12, 12, 10))).rstrip()
                    for r in rows))
    if answer.more:
        print(f"more: over {len(answer.cards)} cards match; only the first are shown")
    return 0


def cmd_history(args) -> int:
    """A card's entries, newest first, a page at a time."""
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    types = args.type  # OperationType values, checked by cli.operation_type_arg
    answer = call(stub_of(args).ListTransactions, pb.ListTransactionsRequest(
        card=cpb.CardRef(card_number=args.card), page_size=args.limit,
        before_seq=args.before, types=types, till=_till(args)), args)
    rows = [("seq", "when (UTC)", "operation", "amount", "principal", "bonus", "points", "store")]
    for e in answer.entries:
        when = datetime.datetime.fromtimestamp(e.applied_at_us / 1e6, datetime.timezone.utc)
        rows.append((str(e.seq), when.strftime("%Y-%m-%d %H:%M:%S"),
                     cpb.OperationType.Name(e.type).removeprefix("OPERATION_TYPE_").lower(),
                     fen(e.amount_minor), fen(e.principal_delta_minor), fen(e.bonus_delta_minor),
                     f"{e.points_earned - e.points_redeemed:+,}", str(e.till.store_id)))
    print("\n".join("  ".join(f"{c:>{w}}" for c, w in zip(r, (8, 19, 22, 12, 12, 10, 8, 6)))
                    for r in rows))
    if answer.next_before_seq:
        print(f"more: --before {answer.next_before_seq}")
    return 0


# ---- the journal feed ----------------------------------------------------------------------


def journal_json(entry) -> dict:
    """One journal entry (cardcore.v1.JournalEntry) as a JSON object: money in fen (``_minor``),
    points in points, never a card number (the card's id, hex)."""
    from cardcore.v1 import common_pb2 as cpb

    r = entry.result
    when = datetime.datetime.fromtimestamp(r.applied_at_us / 1e6, datetime.timezone.utc)
    b = r.balance_after
    out = {"seq": r.seq, "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
           "ts_us": r.applied_at_us,
           "type": cpb.OperationType.Name(r.type).removeprefix("OPERATION_TYPE_").lower(),
           "card_id": entry.card_id.hex() or None, "store": r.till.store_id,
           "terminal": r.till.terminal_id, "staff": r.till.staff_id, "operator": r.operator_id,
           "amount_minor": r.amount_minor, "discount_minor": r.discount_minor,
           "paid_minor": r.paid_minor, "principal_delta_minor": r.principal_delta_minor,
           "bonus_delta_minor": r.bonus_delta_minor,
           "points_delta": r.points_earned - r.points_redeemed,
           "principal_after_minor": b.principal_minor, "bonus_after_minor": b.bonus_minor,
           "points_after": b.points, "reason": cpb.Reason.Name(r.reason)}
    if r.original_seq:
        out["original_seq"] = r.original_seq
    if r.lines:
        out["lines"] = len(r.lines)
    if entry.subject_store_id:  # an admin entry about a store (a close, a registry change)
        out["subject_store"] = entry.subject_store_id
    if entry.business_day:
        out["business_day"] = entry.business_day
    if entry.subject_region_id:
        out["subject_region"] = entry.subject_region_id
    return out


def cmd_watch(args) -> int:
    """The journal from --from-seq on as JSON lines (chain admin), live unless --no-follow; the
    seq to resume from goes to stderr at the end, whatever ends it (^C, an error, a closed
    pipe): the seq after the last part flushed to stdout, so a line may come again after a
    resume (the part cut short), never go missing."""
    import grpc

    from cardcore.v1 import admin_service_pb2 as apb

    metadata, source = _metadata(args)
    request = apb.WatchJournalRequest(from_seq=args.from_seq, stop_when_caught_up=not args.follow)
    if args.shard is not None:  # (a cluster's: each shard's journal is its own)
        request.shard = args.shard
    stream = admin_stub_of(args).WatchJournal(request, metadata=metadata)  # no deadline: live
    next_seq = args.from_seq
    interrupted = []

    def on_interrupt(signum, frame) -> None:
        # ^C ends the stream, not the part being printed: the resume seq then says whether it
        # is out (a KeyboardInterrupt between the flush and the seq would repeat it)
        interrupted.append(signum)
        stream.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for answer in stream:
            for entry in answer.entries:
                print(json.dumps(journal_json(entry), separators=(",", ":")))
            sys.stdout.flush()  # a part at a time, so a pipe's reader sees entries live
            next_seq = answer.next_seq
            if interrupted:
                break
        if interrupted:
            raise KeyboardInterrupt
        return 0
    except grpc.RpcError as err:
        if interrupted:
            raise KeyboardInterrupt from None
        print(_error_line(err, request, args, source), file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        stream.cancel()
        print(f"resume: --from-seq {next_seq}"
              + (f" --shard {args.shard}" if args.shard is not None else ""), file=sys.stderr)
