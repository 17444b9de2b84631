"""AdminService: terminals, operators, data keys and card programs, for operators with the right role.

Every change goes through the writer like a card operation (one LMDB
transaction, journaled with the operator's id, idempotent by request_id in
the operator's namespace). The role the change needs and the store its
scope must cover travel with it and are checked again by the writer against
the ledger, when it is applied (a terminal enrolled a moment ago is in
scope, or not, by the ledger's record, not this process's registry). Then
the in-memory registries are reloaded from the ledger.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time

from cardcore import daytotals
from cardcore import layout as L
from cardcore import stores as chain
from cardcore.admin import DATA_KEY_SUBJECT, NO_FINGERPRINT, reseal_payload
from cardcore.idempotency import (SCOPE_CHAIN, SCOPE_STORE, SCOPE_SUBJECT_TERMINAL, PendingOp,
                                  request_key)
from cardcore.keyring import Keyring, SealError
from cardcore.ledger import Ledger
from cardcore.program import ProgramError, parse_program
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc
from cardcore.v1 import common_pb2 as cpb

from .access import ROLE, Access, Operator, new_token, token_digest
from .errors import Invalid, abort, failure, fresh_or_abort
from .feed import JournalFeed
from .member_report import member_report_pb, parsed as member_request
from .reports import close_pb, report_pb
from .operations import client_time_us, request_id_bytes
from .writer import Overloaded, Stopped, Writer

log = logging.getLogger("cardcore.admin")
R = cpb.Reason
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
SCOPE_STORES_MAX = 1000
RESEAL_CHUNK = 500
U32_MAX = 0xFFFFFFFF


def _now_us() -> int:
    return time.time_ns() // 1000


# Refusals after which a rotation may still have been applied: its key is kept (not current).
ROTATION_MAYBE_APPLIED = frozenset((L.R_OUTCOME_UNKNOWN, L.R_INTERNAL, L.R_STORAGE_UNAVAILABLE,
                                    L.R_UNAVAILABLE, L.R_DEADLINE_EXCEEDED))


class AdminRefused(RuntimeError):
    """An admin operation the server made itself (at start-up) was refused: ``reason``."""

    def __init__(self, reason: int) -> None:
        super().__init__(f"admin operation refused: {R.Name(reason)}")
        self.reason = reason


def rotation_subject(keyring: Keyring, version: int) -> bytes:
    """An OP_DATA_KEY_ROTATED's subject: the version and its key's fingerprint."""
    return DATA_KEY_SUBJECT.pack(version, keyring.fingerprint(version))


def keyring_behind(ledger: Ledger, keyring: Keyring) -> str | None:
    """Why this process's keyring is not the ledger's: older than its last data key rotation
    (made through another front, or a keyring restored from before it), or holding that version
    under another key (two rotations at once); its file re-read first (an operator may have
    copied the rotated one here). None: it is the ledger's."""
    rotated, fingerprint = ledger.read_data_key()

    def other_key() -> bool:
        return (fingerprint != NO_FINGERPRINT and rotated in keyring.data_keys
                and keyring.fingerprint(rotated) != fingerprint)

    if rotated <= keyring.data_key_current and not other_key():
        return None
    try:
        if keyring.reload():
            log.warning("keyring %s re-read: data key version %d current (rotated elsewhere)",
                        keyring.path, keyring.data_key_current)
        if rotated > keyring.data_key_current and rotated in keyring.data_keys and not other_key():
            keyring.make_current(rotated)  # saved by a rotation the ledger took, not yet made
            log.warning("keyring %s: data key version %d made current (the ledger's "  # current
                        "rotation)", keyring.path, rotated)
    except Exception as exc:  # (a file damaged or of another chain: said, never adopted)
        return f"the keyring file {keyring.path} cannot be re-read: {exc}"
    if other_key():
        return (f"the keyring {keyring.path} holds data key version {rotated} under another key "
                "than the ledger's (two rotations at once, through two fronts): copy the keyring "
                "file of the front whose rotation the ledger took here")
    if rotated <= keyring.data_key_current:
        return None
    return (f"the keyring {keyring.path} is behind the ledger: its current data key is version "
            f"{keyring.data_key_current}, a rotation made version {rotated} current (through "
            "another front, or the keyring was restored from before it): copy the current "
            "keyring file here")


class AdminService(apb_grpc.AdminServiceServicer):
    def __init__(self, ledger: Ledger, writer: Writer, keyring: Keyring, access: Access,
                 on_program=lambda: None):
        self.ledger = ledger
        self.writer = writer
        self.keyring = keyring
        self.access = access
        self._on_program = on_program   # the card service adopts a newly loaded program
        self._rotating = asyncio.Lock()
        self.feed = JournalFeed(ledger, access, writer)

    async def _operator(self, context, role: int, store_id: int | None = None) -> Operator:
        """The calling operator, if it holds ``role`` (and ``store_id`` is in its scope)."""
        caller = self.access.caller(context)
        if caller.operator is None:
            await abort(context, failure(R.REASON_UNAUTHENTICATED, "authorization"))
        if caller.cert_terminal_id is not None:  # back office is not done from a till
            await abort(context, failure(R.REASON_PERMISSION_DENIED, "authorization"))
        if not caller.operator.may(role, store_id):
            await abort(context, failure(R.REASON_PERMISSION_DENIED, "authorization"))
        return caller.operator

    async def _apply(self, context, op: PendingOp):
        """Through the writer; a refusal ends the call (or raises, at start-up: ``context`` None)."""
        try:
            outcome = (await self.writer.submit([op]))[0]
        except (Overloaded, Stopped) as exc:
            outcome = None
            reason = R.REASON_OVERLOADED if isinstance(exc, Overloaded) else R.REASON_UNAVAILABLE
        else:
            reason = outcome.reason
            self.access.reload()
        if reason != L.R_OK:
            if context is None:
                raise AdminRefused(reason)
            log.info("refused %s", R.Name(reason), extra={"reason": R.Name(reason)})
            await abort(context, failure(reason))
        if op.request_key:
            log.info("admin %s by operator %d", cpb.OperationType.Name(op.packed[0]),
                     L.OP_OPERATOR_ID.unpack_from(op.packed)[0])
        return outcome

    async def _request(self, context, request, op_by: Operator) -> tuple[bytes, int]:
        """(request key in the operator's namespace, client time), or the call ends."""
        try:
            rid = request_id_bytes(request.request_id)
            return request_key(L.CALLER_OPERATOR, op_by.operator_id, rid), client_time_us(request)
        except Invalid as exc:
            await abort(context, failure(exc.reason, exc.field))

    @staticmethod
    def _terminal_pb(t: tuple) -> apb.Terminal:
        return apb.Terminal(terminal_id=t[3], store_id=t[4], initial_key_id=t[6],
                            revoked=t[1] != L.TERMINAL_ACTIVE, enrolled_at_us=t[7],
                            revoked_at_us=t[8], last_ksn_counter=t[5])

    # ---- terminals ---------------------------------------------------------------------

    async def EnrollTerminal(self, request, context):
        """A retry of the same request gets the initial key again while the terminal has made no
        transaction (its last KSN counter is 0), so a lost answer costs no terminal id."""
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_REGION_MANAGER, request.store_id)
        key, client_us = await self._request(context, request, op_by)
        if not 1 <= request.terminal_id <= U32_MAX:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "terminal_id"))
        tid = request.terminal_id
        ikid = self.access.ikid_of(tid)
        subject = tid.to_bytes(4, "little") + request.store_id.to_bytes(4, "little") + ikid
        outcome = await self._apply(context, PendingOp.admin(
            key, L.OP_TERMINAL_ENROLLED, subject, b"", op_by.operator_id, client_time_us=client_us,
            need_role=ROLE.OPERATOR_ROLE_REGION_MANAGER, scope=SCOPE_STORE,
            scope_store_id=request.store_id))
        terminal = self.ledger.read_terminal(tid)
        unused = terminal[1] == L.TERMINAL_ACTIVE and terminal[5] == 0
        return apb.EnrollTerminalResponse(
            terminal=self._terminal_pb(terminal),
            initial_key=self.access.initial_key(tid) if not outcome.replayed or unused else b"")

    async def RevokeTerminal(self, request, context):
        """The store in scope is the terminal's, as the ledger has it when the writer applies it."""
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER)
        key, client_us = await self._request(context, request, op_by)
        subject = request.terminal_id.to_bytes(4, "little") + bytes(12)
        await self._apply(context, PendingOp.admin(
            key, L.OP_TERMINAL_REVOKED, subject, b"", op_by.operator_id, client_time_us=client_us,
            need_role=ROLE.OPERATOR_ROLE_STORE_MANAGER, scope=SCOPE_SUBJECT_TERMINAL))
        return self._terminal_pb(self.ledger.read_terminal(request.terminal_id))

    async def ListTerminals(self, request, context):
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER,
                                     request.store_id or None)
        await fresh_or_abort(self.writer, context, everything=True)  # their KSN counters, as of the last swipe
        return apb.ListTerminalsResponse(terminals=[
            self._terminal_pb(t) for t in sorted(self.ledger.read_terminals(), key=lambda t: t[3])
            if op_by.covers(t[4]) and request.store_id in (0, t[4])])

    # ---- operators -----------------------------------------------------------------------

    async def _check_grant(self, context, op_by: Operator, role: int, store_ids,
                           region_ids=()) -> None:
        """A chain admin grants anything; others only roles below their own, inside their scope:
        stores it covers, regions of its own (an operator's role, stores and regions never
        change, so this holds when the writer applies it)."""
        if op_by.role == ROLE.OPERATOR_ROLE_CHAIN_ADMIN:
            return
        if (op_by.role < ROLE.OPERATOR_ROLE_REGION_MANAGER or role >= op_by.role
                or not (store_ids or region_ids)
                or not all(op_by.covers(s) for s in store_ids)
                or not all(op_by.covers_region(r) for r in region_ids)):
            await abort(context, failure(R.REASON_PERMISSION_DENIED, "role"))

    async def AddOperator(self, request, context):
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_REGION_MANAGER)
        key, client_us = await self._request(context, request, op_by)
        stores = sorted(set(request.store_ids))
        regions = sorted(set(request.region_ids))
        if not NAME_RE.fullmatch(request.name):
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "name"))
        if request.role not in ROLE.values() or request.role == ROLE.OPERATOR_ROLE_UNSPECIFIED:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "role"))
        if len(stores) > SCOPE_STORES_MAX:
            await abort(context, failure(R.REASON_FIELD_TOO_LONG, "store_ids"))
        if len(regions) > SCOPE_STORES_MAX:
            await abort(context, failure(R.REASON_FIELD_TOO_LONG, "region_ids"))
        if bool(stores or regions) == (request.role == ROLE.OPERATOR_ROLE_CHAIN_ADMIN):
            # chain admins are chain-wide; every other role is scoped to stores or regions
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "store_ids"))
        if any(self.ledger.read_region(r) is None for r in regions):
            await abort(context, failure(R.REASON_REGION_NOT_FOUND, "region_ids"))
        await self._check_grant(context, op_by, request.role, stores, regions)
        token, operator = await self.add_operator(context, key, request.name, request.role, stores,
                                                  op_by.operator_id, client_us=client_us,
                                                  regions=regions)
        return apb.AddOperatorResponse(operator=operator, token=token)

    async def add_operator(self, context, key: bytes, name: str, role: int, stores: list[int],
                           by_id: int, token: str | None = None, client_us: int = 0,
                           regions: list[int] = ()) -> tuple[str, apb.Operator]:
        """Create an operator (also the bootstrap chain admin, with ``context`` None). A retry of
        the same request gets a fresh token, and the one its lost answer carried stops working.
        ``regions``: stored only when given (a request without them digests as before)."""
        token = token or new_token()
        fields = {"name": name, "role": role, "store_ids": stores}
        if regions:
            fields["region_ids"] = list(regions)
        op = PendingOp.admin(key, L.OP_OPERATOR_ADDED, bytes(16),
                             json.dumps({**fields, "token_sha256": token_digest(token)}).encode(),
                             by_id, digest_payload=json.dumps(fields, sort_keys=True).encode(),
                             client_time_us=client_us or _now_us(),
                             need_role=ROLE.OPERATOR_ROLE_REGION_MANAGER if by_id else 0)
        outcome = await self._apply(context, op)
        if outcome.replayed and context is not None:
            token = new_token()
            await self._apply(context, PendingOp.admin(
                b"", L.OP_OPERATOR_TOKEN_REISSUED, bytes(16),
                json.dumps({"name": name, "token_sha256": token_digest(token)}).encode(), by_id,
                need_role=ROLE.OPERATOR_ROLE_REGION_MANAGER,
                caller=(L.CALLER_OPERATOR, by_id)))
        return token, self._operator_pb(name)

    def _operator_pb(self, name: str) -> apb.Operator:
        rec = self.access.operators_by_name[name]
        return apb.Operator(operator_id=rec["id"], name=rec["name"], role=rec["role"],
                            store_ids=rec["store_ids"], region_ids=rec.get("region_ids", []),
                            removed=rec["removed"],
                            created_at_us=rec["created_us"])

    async def RemoveOperator(self, request, context):
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_REGION_MANAGER)
        key, client_us = await self._request(context, request, op_by)
        target = self.access.operators_by_name.get(request.name)
        if target is None:
            await abort(context, failure(R.REASON_OPERATOR_NOT_FOUND, "name"))
        await self._check_grant(context, op_by, target["role"], target["store_ids"],
                                target.get("region_ids", ()))
        await self._apply(context, PendingOp.admin(
            key, L.OP_OPERATOR_REMOVED, bytes(16), json.dumps({"name": request.name}).encode(),
            op_by.operator_id, client_time_us=client_us,
            need_role=ROLE.OPERATOR_ROLE_REGION_MANAGER))
        return self._operator_pb(request.name)

    async def ListOperators(self, request, context):
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_REGION_MANAGER)
        out = [self._operator_pb(name) for name, rec in sorted(self.access.operators_by_name.items())
               if op_by.role == ROLE.OPERATOR_ROLE_CHAIN_ADMIN
               or ((rec["store_ids"] or rec.get("region_ids"))
                   and all(op_by.covers(s) for s in rec["store_ids"])
                   and all(op_by.covers_region(r) for r in rec.get("region_ids", ())))]
        return apb.ListOperatorsResponse(operators=out)

    # ---- programs -------------------------------------------------------------------------

    async def LoadProgram(self, request, context):
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
        key, client_us = await self._request(context, request, op_by)
        try:
            parse_program(request.document)
        except ProgramError as exc:
            log.info("refused REASON_PROGRAM_INVALID: %s", exc)
            await abort(context, failure(R.REASON_PROGRAM_INVALID, "document", detail=str(exc)))
        await self._apply(context, PendingOp.admin(
            key, L.OP_PROGRAM_LOADED, bytes(16), request.document.encode(), op_by.operator_id,
            client_time_us=client_us, need_role=ROLE.OPERATOR_ROLE_CHAIN_ADMIN, scope=SCOPE_CHAIN))
        self._on_program()
        return self._program_pb(0)

    async def GetProgram(self, request, context):
        await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER)
        found = self._program_pb(request.version)
        if found is None:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "version"))
        return found

    def _program_pb(self, version: int) -> apb.ProgramVersion | None:
        programs = self.ledger.read_programs()
        current = max(programs)
        rec = programs.get(version or current)
        if rec is None:
            return None
        return apb.ProgramVersion(version=rec["version"], document=rec["source"],
                                  sha256=rec["sha256"], loaded_at_us=rec["loaded_us"],
                                  loaded_by=rec["loaded_by"], current=rec["version"] == current)

    # ---- keys -----------------------------------------------------------------------------

    async def RotateDataKey(self, request, context):
        """New key version first (new cards use it at once), then re-seal the stored numbers in
        chunks through the writer, each a compare-and-set, while serving goes on."""
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
        key, client_us = await self._request(context, request, op_by)
        async with self._rotating:  # one rotation at a time: a concurrent retry sees the first
            # (the ledger as the shard has it now: a retry sent through another front finds
            # the first try's record, and a rotation made there is seen below)
            await fresh_or_abort(self.writer, context, everything=True)
            known = self.ledger.read_operation(key)
            if known is not None and known.op != L.OP_DATA_KEY_ROTATED:
                await abort(context, failure(R.REASON_DUPLICATE_REQUEST_MISMATCH, "request_id"))
            if known is None:
                await self._rotate(context, lambda version: PendingOp.admin(
                    key, L.OP_DATA_KEY_ROTATED, rotation_subject(self.keyring, version), b"",
                    op_by.operator_id, digest_payload=b"", client_time_us=client_us,
                    need_role=ROLE.OPERATOR_ROLE_CHAIN_ADMIN, scope=SCOPE_CHAIN))
        resealed = await self.reseal(context)
        log.info("data key version %d current; %d card numbers re-sealed",
                 self.keyring.data_key_current, resealed)
        return apb.RotateDataKeyResponse(key_version=self.keyring.data_key_current,
                                         cards_resealed=resealed)

    async def _rotate(self, context, rotation) -> None:
        """The new key saved (not current), the rotation journaled, then the key made current:
        never from a keyring behind the shard (another front rotated: its version would be made
        again with another key) or whose file changed since it was read; a rotation the ledger
        refuses (the request too old, the operator gone) drops its key, so no number is sealed
        under a version the ledger does not name. An outcome not known keeps the key saved but
        not current (the next start adopts it if the ledger names it)."""
        try:
            behind = keyring_behind(self.ledger, self.keyring)
            if behind:
                raise ValueError(behind)
            version = self.keyring.add_data_key()
        except (OSError, ValueError, KeyError) as exc:
            log.error("data key rotation refused: %s", exc)
            await abort(context, failure(R.REASON_ILLEGAL_TRANSITION, detail=str(exc)))
        try:
            await self._apply(None, rotation(version))  # (``rotation``: its op, of the version)
        except AdminRefused as exc:
            if exc.reason not in ROTATION_MAYBE_APPLIED:
                self.keyring.drop_data_key(version)
            await abort(context, failure(exc.reason))
        self.keyring.make_current(version)

    async def record_rotation(self) -> int:
        """At start: a rotation the ledger does not name (the keyring file was saved, and a
        stop came before the rotation was journaled), journaled now by the system, so that the
        ledger names the version new numbers are sealed under (other fronts re-read their
        keyring, an older keyring is refused). The version, or 0 (nothing to record)."""
        version = self.keyring.data_key_current
        if version <= max(self.ledger.read_data_key()[0], 1):
            return 0
        try:
            await self._apply(None, PendingOp.admin(
                request_key(L.CALLER_SYSTEM, 0, f"data-key-v{version}".encode()),
                L.OP_DATA_KEY_ROTATED, rotation_subject(self.keyring, version), b"", 0,
                digest_payload=b"", client_time_us=time.time_ns() // 1000, scope=SCOPE_CHAIN))
        except AdminRefused as exc:  # another front starting at once recorded it first
            if exc.reason != L.R_DUPLICATE_REQUEST_MISMATCH:
                raise
        log.warning("data key version %d recorded in the ledger (its rotation's record was cut "
                    "off by a stop)", version)
        return version

    async def reseal(self, context) -> int:
        """Re-encrypt every stored card number not under the current key version."""
        current = self.keyring.data_key_current
        total, unreadable, after = 0, 0, b""
        while True:
            chunk = self.ledger.read_sealed(after, RESEAL_CHUNK)
            if not chunk:
                if unreadable:
                    log.error("%d stored card numbers do not open under the keyring: run "
                              "cardcore keys check", unreadable)
                return total
            after = chunk[-1][0]
            items = []
            for cid, old in chunk:
                if Keyring.sealed_version(old) == current:
                    continue
                try:
                    items.append((cid, old, self.keyring.seal(cid, self.keyring.unseal(cid, old))))
                except SealError:  # left as it is; cardcore keys check lists it
                    unreadable += 1
            if items:
                op = PendingOp.internal(L.OP_RESEAL, reseal_payload(items))
                total += (await self._apply(context, op)).count

    # ---- the journal feed -----------------------------------------------------------------

    def WatchJournal(self, request, context):
        """Every journal entry from request.from_seq on, then live: the stream (``feed``)."""
        return self.feed.watch(request, context)

    # ---- the daily close and reports ------------------------------------------------------

    async def _day(self, context, text: str, field: str) -> int:
        try:
            return daytotals.day_of_date(text, field)
        except daytotals.DayError as exc:
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, exc.field))

    async def CloseDay(self, request, context):
        """Through the writer (journaled; the day totals see the close where its entry
        stands), then the day's figures as stored: a closed day's never change."""
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER, request.store_id)
        key, client_us = await self._request(context, request, op_by)
        day = await self._day(context, request.business_day, "business_day")
        if request.store_id:  # head office (0) always is
            await fresh_or_abort(self.writer, context, everything=True)  # its first entries too
            if not self.ledger.read_store_known(request.store_id):
                await abort(context, failure(R.REASON_STORE_NOT_FOUND, "store_id"))
        op = PendingOp.admin(
            key, L.OP_CLOSE_DAY, daytotals.close_subject(request.store_id, day), b"",
            op_by.operator_id, client_time_us=client_us,
            need_role=ROLE.OPERATOR_ROLE_STORE_MANAGER, scope=SCOPE_STORE,
            scope_store_id=request.store_id)
        outcome = await self._apply(context, op)
        await fresh_or_abort(self.writer, context, everything=True)  # the figures, as closed
        return close_pb(request.store_id, day, outcome.entry,
                        self.ledger.read_day(request.store_id, day))

    async def GetReport(self, request, context):
        """From range reads of the day totals only; the chain's for chain admins."""
        scope_of_caller = request.by_store and not request.chain and not request.region_id
        if request.chain:
            op_by = await self._operator(context, ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
        elif request.region_id:
            op_by = await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER)
            if not op_by.covers_region(request.region_id):
                await abort(context, failure(R.REASON_PERMISSION_DENIED, "region_id"))
            if self.ledger.read_region(request.region_id) is None:
                await abort(context, failure(R.REASON_REGION_NOT_FOUND, "region_id"))
        else:
            op_by = await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER,
                                         None if scope_of_caller else request.store_id)
            if scope_of_caller and request.store_id:  # not a store's report: say so, not sum
                await abort(context, failure(R.REASON_INVALID_ARGUMENT, "store_id",
                                             detail="by_store alone is every store of your "
                                                    "scope: leave store_id 0"))
        granularity = request.granularity or apb.REPORT_GRANULARITY_DAY
        if granularity not in apb.ReportGranularity.values():
            await abort(context, failure(R.REASON_INVALID_ARGUMENT, "granularity"))
        await fresh_or_abort(self.writer, context, everything=True)  # all that was answered
        from_day, to_day = await self._report_days(  # (after: a store's new clock counts)
            context, request, None if request.chain or request.region_id or scope_of_caller
            else request.store_id)
        if request.by_store:
            result = self.ledger.read_by_store(
                from_day, to_day, op_by.covers,
                "chain" if request.chain else "region" if request.region_id else "scope",
                granularity, request.staff, request.region_id)
        elif request.region_id and not request.chain:
            result = self.ledger.read_region_report(request.region_id, from_day, to_day,
                                                    granularity, request.staff)
        else:
            result = self.ledger.read_report(None if request.chain else request.store_id,
                                             from_day, to_day, granularity, request.staff)
        return report_pb(result, from_day, to_day)

    async def _report_days(self, context, request, store: int | None) -> tuple[int, int]:
        """A report's (first, last) business day: the request's, or with last_days the last N
        up to the current one (``store``'s own business day, else the program's)."""
        if request.last_days:
            if request.from_day or request.to_day:
                await abort(context, failure(R.REASON_INVALID_ARGUMENT, "last_days",
                                             detail="last_days or from_day and to_day, not both"))
            if request.last_days > daytotals.REPORT_DAYS_MAX:
                await abort(context, failure(R.REASON_REPORT_RANGE_INVALID, "last_days"))
            program = self.ledger.program
            own = None
            if store:
                found = self.ledger.read_store(store)
                own = found["day"] if found else None
            today = daytotals.business_day(time.time_ns() // 1000,
                                           *program.business_day_of(own))
            return today - request.last_days + 1, today
        from_day = await self._day(context, request.from_day, "from_day")
        to_day = await self._day(context, request.to_day, "to_day")
        if not 0 <= to_day - from_day < daytotals.REPORT_DAYS_MAX:
            await abort(context, failure(R.REASON_REPORT_RANGE_INVALID, "to_day"))
        return from_day, to_day

    # ---- member metrics -------------------------------------------------------------------

    async def GetMemberReport(self, request, context):
        """From range reads of the member metrics only (``cardcore.members``); chain admins."""
        await self._operator(context, ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
        try:
            first, last, as_of, limit, after = member_request(request, self.ledger.program)
        except Invalid as exc:
            await abort(context, failure(exc.reason, exc.field))
        await fresh_or_abort(self.writer, context, everything=True)  # all that was answered
        # in a thread: a dormant list over many members must not hold up the other calls
        read = await asyncio.to_thread(self.ledger.read_members, first, last, as_of, limit, after)
        if read is None:  # (the server's writer fills them at its start: never seen)
            await abort(context, failure(R.REASON_STORAGE_UNAVAILABLE))
        return member_report_pb(*read, as_of)
    # ---- the chain's shape ----------------------------------------------------------------

    async def _tree_put(self, context, request, id_field: str):
        """A region's or store's put, checked as both are: a chain admin, a request id, an id
        other than 0 (``id_field``), a name. (operator, request key, client time)"""
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
        key, client_us = await self._request(context, request, op_by)
        if getattr(request, id_field) == 0:
            await abort(context, failure(R.REASON_CHAIN_ID_INVALID, id_field))
        problem = chain.name_problem(request.name)
        if problem is not None:
            await abort(context, failure(R.REASON_NAME_INVALID, "name", detail=problem))
        return op_by, key, client_us

    async def PutRegion(self, request, context):
        """Create or rename a region, through the writer (journaled; the name in the registry)."""
        op_by, key, client_us = await self._tree_put(context, request, "region_id")
        await self._apply(context, PendingOp.admin(
            key, L.OP_REGION_PUT, chain.region_subject(request.region_id), request.name.encode(),
            op_by.operator_id, client_time_us=client_us,
            need_role=ROLE.OPERATOR_ROLE_CHAIN_ADMIN, scope=SCOPE_CHAIN))
        return apb.PutRegionResponse(region=_region_pb(self.ledger.read_region(request.region_id)))

    async def PutStore(self, request, context):
        """Create or change a store, through the writer: its subject carries the region and the
        business day (the day totals read them from the journal), its payload the name."""
        op_by, key, client_us = await self._tree_put(context, request, "store_id")
        has_offset = request.HasField("utc_offset_minutes")
        if has_offset != request.HasField("business_day_cutoff_hour"):
            await abort(context, failure(R.REASON_CUTOFF_HOUR_INVALID, "business_day_cutoff_hour"))
        day = None
        if has_offset:
            day = (request.utc_offset_minutes, request.business_day_cutoff_hour)
            bad = chain.day_problem(*day)
            if bad is not None:
                await abort(context, failure(bad[0], bad[1]))
        await self._apply(context, PendingOp.admin(
            key, L.OP_STORE_PUT, chain.store_subject(request.store_id, request.region_id, day),
            request.name.encode(), op_by.operator_id, client_time_us=client_us,
            need_role=ROLE.OPERATOR_ROLE_CHAIN_ADMIN, scope=SCOPE_CHAIN))
        return apb.PutStoreResponse(store=self._store_pb(self.ledger.read_store(request.store_id),
                                                         self._terminal_counts()))

    def _terminal_counts(self) -> dict[int, int]:
        """Active terminals per store, from the registry in memory (no ledger read)."""
        counts: dict[int, int] = {}
        for t in self.access.terminals.values():
            if not t.revoked:
                counts[t.store_id] = counts.get(t.store_id, 0) + 1
        return counts

    def _store_pb(self, s: dict, counts: dict[int, int]) -> apb.Store:
        program = self.ledger.program
        offset, cutoff = program.business_day_of(s["day"])
        return apb.Store(store_id=s["store_id"], name=s["name"], region_id=s["region_id"],
                         own_business_day=s["day"] is not None, utc_offset_minutes=offset,
                         business_day_cutoff_hour=cutoff, terminals=counts.get(s["store_id"], 0),
                         updated_at_us=s["updated_us"], updated_by=s["updated_by"])

    async def ListStores(self, request, context):
        """The tree as far as the caller's scope reaches: a region whole when it is in scope,
        else only its stores in scope."""
        op_by = await self._operator(context, ROLE.OPERATOR_ROLE_STORE_MANAGER)
        regions, store_list = self.ledger.read_tree()
        counts = self._terminal_counts()
        by_region: dict[int, list] = {}
        for s in store_list:
            if op_by.covers(s["store_id"]):
                by_region.setdefault(s["region_id"], []).append(self._store_pb(s, counts))
        return apb.ListStoresResponse(
            regions=[apb.RegionStores(region=_region_pb(r), stores=by_region.get(r["region_id"], []))
                     for r in regions
                     if op_by.covers_region(r["region_id"]) or r["region_id"] in by_region],
            head_office_stores=by_region.get(0, []))


def _region_pb(r: dict) -> apb.Region:
    return apb.Region(region_id=r["region_id"], name=r["name"], updated_at_us=r["updated_us"],
                      updated_by=r["updated_by"])
