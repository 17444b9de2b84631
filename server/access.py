"""Who is calling and what they may do: terminals, operators, roles, the swipe's keys.

- A terminal proves itself twice: its TLS client certificate (CN
  ``terminal:<id>``, see ``certs``) and its DUKPT keys (the KSN's initial key
  ID is the chain's BDK ID followed by the terminal id; only the terminal holds
  the initial key that makes PIN blocks and card data the server can open).
- An operator sends ``authorization: Bearer <token>``; the server keeps only
  the token's SHA-256. Roles are ordered (OperatorRole): each can do what the
  roles below it can, at the stores in its scope: the stores listed and the
  stores of the regions listed, as the registry has them now (none listed =
  the chain, chain admins only).
- Each terminal has a budget per sliding minute: its failed guesses and probes
  (a wrong PIN, an unknown card, a card number that is already issued, a PIN
  block or card data that does not open) and every card inquiry stay counted
  for a minute, and its swipes not yet answered count too, so a batch or a pipelined stream can never
  have more guesses in flight than the budget has left. When failures fill the
  budget the terminal is refused; when unanswered swipes do, the service waits
  for them (a batch goes on in chunks, a stream reads on once a reply is out).

Registries are loaded from the ledger at start and reloaded after every admin
change (this process is the only one that makes them).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import secrets
import time

from cardcore import layout as L
from cardcore.dukpt import IKID_SIZE, KeyPath, initial_key
from cardcore.ledger import Ledger
from cardcore.v1 import common_pb2 as cpb

from .certs import parse_terminal_cn

log = logging.getLogger("cardcore.access")

ROLE = cpb.OperatorRole
TOKEN_PREFIX = "cc_"
TOKEN_BYTES = 32
FAILURE_WINDOW_S = 60.0
FAILURES_PER_MINUTE_DEFAULT = 10
KEY_PATHS_MAX = 100_000      # cached DUKPT paths (one per active terminal)
# What counts against a terminal's failure budget: guesses and probes (an opening of a card
# that exists tells as much as an inquiry of one that does not).
PROBE_REASONS = frozenset({L.R_PIN_WRONG, L.R_CARD_NOT_FOUND, L.R_CARD_ALREADY_EXISTS,
                           cpb.REASON_PIN_BLOCK_INVALID, cpb.REASON_CARD_DATA_INVALID})
ADMIT, LIMITED, BUSY = 0, 1, 2  # Access.admission


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Operator:
    operator_id: int
    name: str
    role: int
    store_ids: frozenset[int]
    region_ids: frozenset[int] = frozenset()
    # store -> region, the registry's when the operators were loaded (every admin change
    # reloads them: a store moved to another region leaves the old one's scope at once)
    store_regions: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def chain_wide(self) -> bool:
        return not self.store_ids and not self.region_ids

    def covers(self, store_id: int) -> bool:
        return (self.chain_wide or store_id in self.store_ids
                or (store_id != 0 and self.store_regions.get(store_id, 0) in self.region_ids))

    def covers_region(self, region_id: int) -> bool:
        return self.chain_wide or region_id in self.region_ids

    def may(self, role: int, store_id: int | None = None) -> bool:
        """At least ``role``, and (when given) ``store_id`` in scope."""
        return self.role >= role and (store_id is None or self.covers(store_id))


@dataclasses.dataclass(frozen=True)
class Terminal:
    terminal_id: int
    store_id: int
    ikid: bytes
    revoked: bool


@dataclasses.dataclass(frozen=True)
class Caller:
    cert_terminal_id: int | None   # from the client certificate (TLS only)
    has_cert: bool                 # any client certificate (TLS): a terminal or a back-office host
    operator: Operator | None
    bad_token: bool                # a token was sent but is not valid
    token_digest: str = ""         # of the token sent, to look the operator up again

    def namespace(self, ksn_terminal_id: int = 0) -> tuple[int, int]:
        """Whose request ids these are (layout: request key): the terminal whose KSN opened the
        swipe (or whose certificate calls), else the operator of the token, else the one
        development caller of an --insecure server."""
        if ksn_terminal_id:
            return L.CALLER_TERMINAL, ksn_terminal_id
        if self.cert_terminal_id is not None:
            return L.CALLER_TERMINAL, self.cert_terminal_id
        if self.operator is not None:
            return L.CALLER_OPERATOR, self.operator.operator_id
        return L.CALLER_DEVELOPMENT, 0


class Access:
    def __init__(self, ledger: Ledger, bdk: bytes, bdk_id: bytes, *, tls: bool,
                 failures_per_minute: int = FAILURES_PER_MINUTE_DEFAULT):
        self.ledger = ledger
        self.tls = tls
        self._bdk = bdk
        self.bdk_id = bdk_id
        self.failures_per_minute = failures_per_minute
        self.operators_by_digest: dict[str, Operator] = {}
        self.operators_by_name: dict[str, dict] = {}
        self.terminals: dict[int, Terminal] = {}
        self._key_paths: collections.OrderedDict[bytes, KeyPath] = collections.OrderedDict()
        self._ksn_seen: dict[int, int] = {}
        self._failures: dict[int, collections.deque] = {}  # per terminal: failure times
        self._unanswered: collections.Counter = collections.Counter()  # per terminal
        self._room: dict[int, asyncio.Event] = {}  # per terminal: set when a swipe is answered
        self.reload()

    def reload(self) -> None:
        by_digest, by_name = {}, {}
        store_regions = self.ledger.read_store_regions()
        for rec in self.ledger.read_operators():
            by_name[rec["name"]] = rec
            if not rec["removed"]:
                by_digest[rec["token_sha256"]] = Operator(
                    rec["id"], rec["name"], rec["role"], frozenset(rec["store_ids"]),
                    frozenset(rec.get("region_ids", ())), store_regions)
        self.operators_by_digest, self.operators_by_name = by_digest, by_name
        terminals = {}
        for t in self.ledger.read_terminals():
            terminals[t[3]] = Terminal(t[3], t[4], t[6], t[1] != L.TERMINAL_ACTIVE)
            self._ksn_seen[t[3]] = max(self._ksn_seen.get(t[3], 0), t[5])  # the ledger's counter
        self.terminals = terminals

    # ---- callers ----------------------------------------------------------------------

    def caller(self, context) -> Caller:
        operator, bad_token, digest = None, False, ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = value[7:] if value.startswith("Bearer ") else ""
                digest = token_digest(token) if token else ""
                operator = self.operators_by_digest.get(digest)
                bad_token = operator is None
        cert_tid, has_cert = None, False
        if self.tls:
            names = context.auth_context().get("x509_common_name")
            if names:
                has_cert = True
                cert_tid = parse_terminal_cn(names[0].decode("utf-8", "replace"))
        return Caller(cert_tid, has_cert, operator, bad_token, digest)

    def current(self, caller: Caller) -> Caller:
        """The caller with its operator looked up again: a stream lives longer than a token may
        (an operator removed meanwhile is refused from the next operation on)."""
        if not caller.token_digest:
            return caller
        operator = self.operators_by_digest.get(caller.token_digest)
        if operator is caller.operator:  # the same load (equal is not enough: the registry's
            return caller                # store -> region map is not compared)
        return dataclasses.replace(caller, operator=operator, bad_token=operator is None)

    # ---- terminals and their keys -------------------------------------------------------

    def ikid_of(self, terminal_id: int) -> bytes:
        return self.bdk_id + terminal_id.to_bytes(4, "big")

    def terminal_of_ikid(self, ikid: bytes) -> Terminal | None:
        if len(ikid) != IKID_SIZE or ikid[:4] != self.bdk_id:
            return None
        return self.terminals.get(int.from_bytes(ikid[4:], "big"))

    def initial_key(self, terminal_id: int) -> bytes:
        return initial_key(self._bdk, self.ikid_of(terminal_id))

    def key_path(self, ikid: bytes) -> KeyPath:
        path = self._key_paths.get(ikid)
        if path is None:
            path = self._key_paths[ikid] = KeyPath(initial_key(self._bdk, ikid), ikid)
            if len(self._key_paths) > KEY_PATHS_MAX:
                self._key_paths.popitem(last=False)
        return path

    def ksn_fresh(self, terminal_id: int, counter: int) -> bool:
        """Early replay refusal in memory; the writer's check against the ledger is the one that
        counts (it survives restarts and is atomic with the operation)."""
        if counter <= self._ksn_seen.get(terminal_id, 0):
            return False
        self._ksn_seen[terminal_id] = counter
        return True

    # ---- the budget per terminal ----------------------------------------------------------------

    def admission(self, terminal_id: int, now: float | None = None) -> int:
        """ADMIT; LIMITED (failures fill the budget: refuse); BUSY (unanswered swipes fill it:
        wait for one). Checked before anything of the swipe is used, taken by ``take``."""
        now = time.monotonic() if now is None else now
        window = self._failures.get(terminal_id)
        failures = 0
        if window:
            while window and now - window[0] >= FAILURE_WINDOW_S:
                window.popleft()
            failures = len(window)
        if failures >= self.failures_per_minute:
            return LIMITED
        if failures + self._unanswered[terminal_id] >= self.failures_per_minute:
            return BUSY
        return ADMIT

    def take(self, terminal_id: int) -> None:
        self._unanswered[terminal_id] += 1

    def answered(self, terminal_id: int, reason: int, now: float | None = None,
                 inquiry: bool = False) -> None:
        """A taken swipe was answered: it counts for a minute if it failed as a guess or probe,
        and so does every inquiry (a till reading cards one after another is harvesting)."""
        if self._unanswered[terminal_id] > 0:
            self._unanswered[terminal_id] -= 1
        else:
            log.error("terminal %d: a swipe answered that was not taken", terminal_id)
        room = self._room.get(terminal_id)
        if room is not None:
            room.set()
        if inquiry or reason in PROBE_REASONS:
            window = self._failures.get(terminal_id)
            if window is None:
                window = self._failures[terminal_id] = collections.deque()
            window.append(time.monotonic() if now is None else now)

    async def room(self, terminal_id: int, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until one of the terminal's swipes is answered."""
        event = self._room.get(terminal_id)
        if event is None:
            event = self._room[terminal_id] = asyncio.Event()
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
