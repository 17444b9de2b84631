"""Idempotency: request keys scoped to their caller, payload digests, records, retention.

A mutating request is applied at most once per (caller, request_id): its
record in the ``requests`` sub-database (layout.IDEM) holds the payload
digest, the outcome and the journal entry it made. A retry with the same
payload is answered from the record; another payload is refused
(REASON_DUPLICATE_REQUEST_MISMATCH). Two callers never share an id space: a
terminal cannot block, or learn about, another terminal's request ids.

The digest covers an explicit list of operation fields per operation type
(``DIGEST_FIELDS``); every field of the operation layout is either in the
list or in ``DIGEST_LEFT_OUT`` with the reason, and a test fails if a new
field is in neither.

Retention: every mutating request carries its client's time, which is part
of its payload. The writer refuses a request whose client time is older than
the retention window at the group's time (or at or before
``pruned_through_us``, see ``ledger``), and prunes a record once its client
time is older than the window: group times never go back, so from then on no
re-send of it could pass the age check, and a pruned request_id can never
apply twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from operator import itemgetter
from typing import NamedTuple

from cardcore import layout as L

NO_PIN = bytes(32)
NO_REFERRER = bytes(16)
REQUEST_ID_BYTES_MAX = 64
REQUEST_WINDOW_S_DEFAULT = 7 * 24 * 3600   # see README "Request ids and retention"
REQUEST_WINDOW_S_MIN = 3600
CLIENT_TIME_AHEAD_MAX_US = 3600 * 1_000_000  # a client clock at most an hour ahead
CLOCK_STEP_MAX_US = 3600 * 1_000_000         # a group's time moves at most an hour past the last
PRUNE_STEP_MAX = 256                         # request records pruned per group at most

# Where a request comes from; scope the id to it (layout: request key).
SCOPE_NONE, SCOPE_STORE, SCOPE_SUBJECT_TERMINAL, SCOPE_CHAIN = 0, 1, 2, 3


class InvariantError(RuntimeError):
    """The ledger would write, or has read, something that breaks an invariant.

    Raised inside the write transaction (which is then aborted), never
    caught: the writer stops rather than write a half-truth. Explicit raises,
    not ``assert``: they must hold under ``python -O`` too.
    """


def request_key(caller_kind: int, caller_id: int, request_id: bytes) -> bytes:
    """The LMDB key of a request: its caller's namespace, then the request_id."""
    assert 0 < len(request_id) <= REQUEST_ID_BYTES_MAX and caller_kind != L.CALLER_NONE
    return L.REQUEST_KEY_HEAD.pack(caller_kind, caller_id) + request_id


_LEN_BYTE = [bytes([n]) for n in range(256)]


def pack_request_keys(keys) -> bytes:
    """A group's request keys as one ``request_times`` value: each as u8 length | key."""
    return b"".join([_LEN_BYTE[len(k)] + k for k in keys])


def unpack_request_keys(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        n = blob[pos]
        out.append(blob[pos + 1:pos + 1 + n])
        pos += 1 + n
    return out


def caller_of(key: bytes) -> tuple[int, int]:
    """(caller_kind, caller_id) of a request key."""
    return L.REQUEST_KEY_HEAD.unpack_from(key)


def request_tag(key: bytes) -> bytes:
    """The 8-byte tag a journal entry carries to link it to its request (key, namespace and all)."""
    return hashlib.blake2b(key, digest_size=L.REQUEST_TAG_SIZE).digest()


# ---- the digest ---------------------------------------------------------------------------------

# The operation layout's fields in order, with their sizes (layout.OP).
OP_FIELDS: tuple[str, ...] = (
    "op", "tier", "pin_flags", "caller_kind", "home_store_id", "amount_minor", "store_id",
    "terminal_id", "staff_id", "operator_id", "request_tag", "card_id", "client_time_us",
    "pin_check", "new_pin_check", "caller_id", "birth_month", "link_seq", "ref_id", "basket_tag",
    "line_count", "op_flags", "redeem_points", "referrer_id")


def _offsets() -> dict[str, tuple[int, int]]:
    """(offset, size) of each field of layout.OP, read off its struct format."""
    out, pos, count = {}, 0, ""
    names = iter(OP_FIELDS)
    for ch in L.OP.format.lstrip("<"):
        if ch.isdigit():
            count += ch
            continue
        size = int(count) if ch == "s" else struct.calcsize("<" + ch)
        count = ""
        out[next(names)] = (pos, size)
        pos += size
    assert pos == L.OP_SIZE and len(out) == len(OP_FIELDS)
    return out


OP_FIELD_AT: dict[str, tuple[int, int]] = _offsets()

# Fields no digest covers, and why.
DIGEST_LEFT_OUT: dict[str, str] = {
    "request_tag": "derived from the request key",
    "caller_kind": "the request key's namespace",
    "caller_id": "the request key's namespace",
    "pin_check": "the PIN entered: a re-send with another PIN must get the original answer, or "
                 "the answer would tell a right guess from a wrong one",
    "op_flags": "in a purchase's or an open's extra payload when set (see purchase_extra, "
                "open_extra); its route_flags byte is a front's, never a caller's (the same "
                "request through any front)",
    "birth_month": "derived from the profile's birthday, which an open's digest covers",
    "referrer_id": "in an open's extra payload when set (see open_extra), so an open without "
                   "one has the digest the release before card programs gave it",
    "line_count": "with the lines, in the extra payload when a purchase has any "
                  "(see purchase_extra); a refund by line: the writer's (its line numbers are "
                  "in the extra payload, see refund_extra)",
    "redeem_points": "in the extra payload when set (see purchase_extra; an import's always: "
                     "import_extra)",
}
_AT_THE_TILL = ("store_id", "terminal_id", "staff_id", "operator_id", "client_time_us")
_MONEY = ("op", "pin_flags", "amount_minor", "card_id", *_AT_THE_TILL, "link_seq", "ref_id",
          "basket_tag")
_PIN = ("op", "pin_flags", "card_id", *_AT_THE_TILL, "new_pin_check")
# What a retry must repeat, per operation type; extras (profile, admin payload) are added after.
DIGEST_FIELDS: dict[int, tuple[str, ...]] = {
    L.OP_OPEN: ("op", "tier", "pin_flags", "home_store_id", "card_id", *_AT_THE_TILL,
                "new_pin_check"),
    L.OP_TOP_UP: _MONEY,
    L.OP_PURCHASE: _MONEY,
    L.OP_SET_PIN: _PIN,     # the new PIN too: a retry with another new PIN is another request
    L.OP_RESET_PIN: _PIN,
    # ref_id: the coupon definition; the points it is bought with go in the extra payload
    L.OP_COUPON_ISSUE: ("op", "pin_flags", "card_id", *_AT_THE_TILL, "ref_id"),
    L.OP_PACKAGE_SELL: _MONEY,   # ref_id: the package definition
    L.OP_PACKAGE_USE: ("op", "pin_flags", "card_id", *_AT_THE_TILL, "ref_id"),  # ref_id: its serial
    L.OP_POINTS_EXCHANGE: ("op", "pin_flags", "card_id", *_AT_THE_TILL),  # + points, in the extra
    L.OP_GIFT_REDEEM: ("op", "pin_flags", "card_id", *_AT_THE_TILL, "ref_id"),  # ref_id: the gift
    L.OP_REFUND: _MONEY,    # link_seq: the sale refunded; amount 0: all that is left of it
    # the request reversed: its key, in the extra payload; ref_id: its client time (0: not
    # given); link_seq and basket_tag are the writer's to fill
    L.OP_REVERSAL: ("op", "card_id", *_AT_THE_TILL, "ref_id"),
    L.OP_CARD_STATUS: ("op", "tier", "card_id", *_AT_THE_TILL),  # tier: the status wanted
    L.OP_HOLD: _MONEY,      # ref_id: the hold's minutes
    L.OP_HOLD_VOID: ("op", "card_id", *_AT_THE_TILL, "link_seq"),  # link_seq: the hold
    # the new card (referrer_id) and its masked number (the profile) in the extra payload
    L.OP_CARD_REPLACED: ("op", "pin_flags", "card_id", *_AT_THE_TILL, "new_pin_check"),
    # a front's delivery of a referral bonus owed by another card shard's outbox (its opening's
    # seq in link_seq, that shard + 1 in ref_id, the opening's time as client time: every
    # delivery of it the same bytes; docs/cluster.md, "Two cards on two card shards")
    L.OP_REFERRAL_BONUS: ("op", "amount_minor", "card_id", "link_seq", "ref_id",
                          "client_time_us"),
    # rule 18: amount_minor the principal, ref_id the bonus; the points and the profile in the
    # extra payload (import_extra)
    L.OP_IMPORT_CARD: ("op", "tier", "home_store_id", "amount_minor", "card_id", *_AT_THE_TILL,
                       "ref_id"),
    # admin operations: card_id holds their subject
    **{op: ("op", "card_id", "operator_id", "client_time_us")
       for op in L.ADMIN_OPS},
}
def digest_spans(fields: tuple[str, ...]) -> list[tuple[int, int]]:
    """(offset, size) of the digest fields in layout.OP, adjacent fields merged into one span (a
    purchase's 12 fields are 5 spans), in offset order: what the digest hashes, in this order
    (also for cardcore.ext.batchwire, which hashes the same spans in C)."""
    spans: list[list[int]] = []
    for off, size in sorted(OP_FIELD_AT[f] for f in fields):
        if spans and spans[-1][0] + spans[-1][1] == off:
            spans[-1][1] += size
        else:
            spans.append([off, size])
    return [(off, size) for off, size in spans]


def _getter(fields: tuple[str, ...]):
    """The digest fields' bytes in one call, read with one itemgetter over their spans (3x
    faster than a slice per field)."""
    spans = digest_spans(fields)
    get = itemgetter(*[slice(off, off + size) for off, size in spans])
    return get if len(spans) > 1 else (lambda packed: (get(packed),))


_DIGEST_GETTERS = {op: _getter(fields) for op, fields in DIGEST_FIELDS.items()}


def unused_fields(op: int) -> frozenset[str]:
    """Fields operation type ``op`` never sets: zero in every operation of that type."""
    return frozenset(OP_FIELDS) - set(DIGEST_FIELDS[op]) - set(DIGEST_LEFT_OUT)


_PURCHASE_EXTRA = struct.Struct("<Hq")  # line count, points offered


def purchase_extra(lines: bytes, redeem_points: int, op_flags: int = 0) -> bytes | None:
    """What a purchase adds to its digest: its lines, the points it offers and its flags. None
    for a purchase with none, so that its digest is the one the release before card programs
    gave it, and a retry that crosses the upgrade is still recognised."""
    if not lines and not redeem_points and not op_flags:
        return None
    extra = _PURCHASE_EXTRA.pack(len(lines) // L.LINE_SIZE, redeem_points) + lines
    return extra + (b"\x00flags:" + bytes([op_flags]) if op_flags else b"")


def refund_extra(line_numbers: bytes) -> bytes | None:
    """What a refund by line adds to its digest: its line numbers (u8 each, as asked). None for
    a refund by amount, so its digest is the one it had before refunds by line."""
    return b"\x00lines:" + line_numbers if line_numbers else None


def open_extra(profile: bytes | None, referrer_id: bytes, op_flags: int = 0) -> bytes | None:
    """What an open adds to its digest: its profile, the referrer when there is one and its
    flags when set (issued, not active: rule 14), each after a NUL, which a JSON profile never
    holds; an open without either has the digest the releases before them gave it."""
    if referrer_id == NO_REFERRER and not op_flags:
        return profile
    return b"".join((profile or b"", b"\x00referrer:" + referrer_id
                     if referrer_id != NO_REFERRER else b"",
                     b"\x00flags:" + bytes([op_flags]) if op_flags else b""))


def import_extra(profile: bytes | None, points: int) -> bytes:
    """What an import adds to its digest (rule 18): its points, then its profile."""
    return _I64.pack(points) + (profile or b"")


_I64 = struct.Struct("<q")


def basket_tag(caller_kind: int, caller_id: int, basket_id: bytes) -> int:
    """The u64 a payment's journal entry carries for its basket (split tender): a basket id is
    scoped to its caller like a request id, so two tills' baskets never meet."""
    digest = hashlib.blake2b(L.REQUEST_KEY_HEAD.pack(caller_kind, caller_id) + basket_id,
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 means no basket


def referrer_tag(referrer_id: bytes) -> int:
    """The u64 an opening's journal entry carries in ref_id for its referrer (the card id is 16
    bytes): the first 8 bytes of its BLAKE2b, so verify can tell whose the bonus is."""
    return int.from_bytes(hashlib.blake2b(referrer_id, digest_size=8).digest(), "little")


def payload_digest(packed: bytes, extra: bytes | None = None) -> bytes:
    """BLAKE2b-128 over the digest fields of operation ``packed`` and ``extra`` (length-prefixed)."""
    h = hashlib.blake2b(b"".join(_DIGEST_GETTERS[packed[0]](packed)), digest_size=16)
    if extra is not None:
        h.update(len(extra).to_bytes(4, "little"))
        h.update(extra)
    return h.digest()


# ---- operations -----------------------------------------------------------------------------------

@dataclasses.dataclass(slots=True)
class PendingOp:
    """A validated mutation, packed by the request handler before the writer sees it."""
    request_key: bytes        # caller namespace + request_id (``request_key``); b"" internal
    card_id: bytes            # 16 bytes (admin operations: their subject)
    packed: bytes             # layout.OP, 192 bytes
    digest: bytes             # BLAKE2b-128 over DIGEST_FIELDS: the idempotency digest
    profile: bytes | None = None  # OPEN only: the JSON profile to store
    ksn_counter: int = 0      # from a terminal: its DUKPT transaction counter (op's terminal_id)
    sealed: bytes | None = None   # OPEN only: the card number sealed under the current data key
    payload: bytes | None = None  # admin and internal operations: what to store; a
    #                               reversal: the request key of the request it reverses; a
    #                               refund by line: its line numbers (u8 each, 1-based)
    need_role: int = 0        # the operator role the operation needs when it is applied
    scope: int = SCOPE_NONE   # which store the operator's scope must cover then
    scope_store_id: int = 0   # SCOPE_STORE: this store
    lines: bytes = b""        # PURCHASE: its layout.LINE records (output fields zero), in order

    @classmethod
    def build(cls, key: bytes, op: int, card_id: bytes, amount_minor: int = 0,
              store_id: int = 0, terminal_id: int = 0, staff_id: int = 0, tier: int = 0,
              home_store_id: int = 0, profile: bytes | None = None, *, operator_id: int = 0,
              pin_flags: int = 0, pin_check: bytes = NO_PIN, new_pin_check: bytes = NO_PIN,
              ksn_counter: int = 0, sealed: bytes | None = None, client_time_us: int = 0,
              caller: tuple[int, int] | None = None, link_seq: int = 0, ref_id: int = 0,
              basket_tag: int = 0, need_role: int = 0, scope: int = SCOPE_NONE,
              scope_store_id: int = 0, lines: bytes = b"", redeem_points: int = 0,
              referrer_id: bytes = bytes(16), birth_month: int = 0,
              op_flags: int = 0, original_key: bytes | None = None,
              refund_lines: bytes = b"") -> "PendingOp":
        """A card operation. ``key`` from ``request_key``; ``caller`` its namespace when the
        caller has it at hand (else read off the key), or an inquiry's (with no key)."""
        kind, caller_id = caller or (caller_of(key) if key else (L.CALLER_NONE, 0))
        if op == L.OP_OPEN and referrer_id != NO_REFERRER:
            ref_id = referrer_tag(referrer_id)  # the opening's entry says whose referral it was
        packed = L.OP.pack(op, tier, pin_flags, kind, home_store_id, amount_minor, store_id,
                           terminal_id, staff_id, operator_id,
                           request_tag(key) if key else bytes(8), card_id, client_time_us,
                           pin_check, new_pin_check, caller_id, birth_month, link_seq, ref_id,
                           basket_tag, len(lines) // L.LINE_SIZE, bytes((op_flags, 0, 0, 0, 0, 0)),
                           redeem_points, referrer_id)
        if op == L.OP_OPEN or op == L.OP_CARD_REPLACED:  # a replacement: the new card, as referrer
            extra = open_extra(profile, referrer_id, op_flags) or original_key
        elif op == L.OP_IMPORT_CARD:
            extra = import_extra(profile, redeem_points)
        else:
            extra = (purchase_extra(lines, redeem_points, op_flags) or original_key
                     or refund_extra(refund_lines))
        digest = payload_digest(packed, extra) if key else bytes(16)
        return cls(key, card_id, packed, digest, profile, ksn_counter, sealed,
                   original_key or refund_lines or None, need_role, scope, scope_store_id, lines)

    @classmethod
    def admin(cls, key: bytes, op: int, subject: bytes, payload: bytes, operator_id: int,
              digest_payload: bytes | None = None, *, client_time_us: int = 0,
              need_role: int = 0, scope: int = SCOPE_NONE, scope_store_id: int = 0,
              caller: tuple[int, int] | None = None) -> "PendingOp":
        """An admin operation; ``digest_payload`` (default: payload) is what a retry must repeat.
        The system's own (``key`` b""): ``caller`` says whose it is in the journal."""
        assert op in L.ADMIN_OPS and len(subject) == L.CARD_ID_SIZE
        kind, caller_id = caller_of(key) if key else (caller or (L.CALLER_SYSTEM, 0))
        packed = L.OP.pack(op, 0, 0, kind, 0, 0, 0, 0, 0, operator_id,
                           request_tag(key) if key else bytes(8), subject, client_time_us,
                           NO_PIN, NO_PIN, caller_id, 0, 0, 0, 0, 0, bytes(6), 0, bytes(16))
        digest = payload_digest(packed, payload if digest_payload is None else digest_payload)
        return cls(key, subject, packed, digest, payload=payload, need_role=need_role,
                   scope=scope, scope_store_id=scope_store_id)

    @classmethod
    def internal(cls, op: int, payload: bytes = b"", subject: bytes = bytes(16)) -> "PendingOp":
        """The server's own housekeeping (re-seal, floors, maintenance): no request, no entry."""
        assert op >= L.OP_RESEAL
        packed = L.OP.pack(op, 0, 0, L.CALLER_SYSTEM, 0, 0, 0, 0, 0, 0, bytes(8), subject, 0,
                           NO_PIN, NO_PIN, 0, 0, 0, 0, 0, 0, bytes(6), 0, bytes(16))
        return cls(b"", subject, packed, bytes(16), payload=payload)

    @property
    def op_type(self) -> int:
        return self.packed[0]

    @property
    def client_time_us(self) -> int:
        return L.OP_CLIENT_TIME.unpack_from(self.packed)[0]


class Outcome(NamedTuple):
    """What became of one operation: the reply is built from this."""
    reason: int                 # layout.R_* / cardcore.v1.Reason
    replayed: bool              # answered from an earlier identical request
    op: int                     # layout.OP_*
    entry: bytes | None         # the journal entry (applied), or the kernel's declined entry;
                                # through the writer's answer, its first 224 bytes
    available_minor: int = 0    # for INSUFFICIENT_FUNDS
    count: int = 0              # internal operations: items changed (card numbers re-sealed)
    lines: bytes = b""          # an applied purchase with lines: them, as the kernel filled them
    held_minor: int = 0         # applied: the card's held_minor after it (rule 15; the journal
                                # does not carry it, the request record does)


def record(op_type: int, reason: int, digest: bytes, seq: int, available_minor: int, ts_us: int,
           client_time_us: int) -> bytes:
    """An idempotency record (layout.IDEM)."""
    return L.IDEM.pack(L.IDEM_VERSION, op_type, reason, 0, digest, seq, available_minor, ts_us,
                       client_time_us, bytes(8))


def replay(txn, journal_db, idem: bytes, digest: bytes | None, lines_db=None) -> Outcome:
    """The original outcome of a request, from its record; another payload is a mismatch
    (``digest`` None: no comparison, a look-up). A purchase's lines come from ``lines_db``."""
    version, op_type, reason, _, stored_digest, seq, available, *_ = L.IDEM.unpack(idem)
    if version != L.IDEM_VERSION:
        raise InvariantError(f"request record version {version} unknown")
    if reason == L.R_REVERSED:  # a tombstone: reversed before it arrived (rule 13), whatever it is
        return Outcome(L.R_REVERSED, False, op_type, None)
    if digest is not None and stored_digest != digest:
        return Outcome(L.R_DUPLICATE_REQUEST_MISMATCH, False, op_type, None)
    entry = txn.get(L.SEQ_KEY.pack(seq), db=journal_db) if seq else None
    if reason == L.R_OK and entry is None:
        raise InvariantError("idempotency record points at no journal entry")
    lines = b""
    if reason == L.R_OK and lines_db is not None and entry_line_count(entry):
        lines = txn.get(L.SEQ_KEY.pack(seq), db=lines_db)
        if lines is None:
            raise InvariantError("a purchase with lines has none stored")
    if reason == L.R_OK:  # an applied request's record keeps the card's held after it there
        return Outcome(reason, True, op_type, entry, 0, 0, lines, available)
    return Outcome(reason, True, op_type, entry, available, 0, lines)


def entry_line_count(entry: bytes) -> int:
    """How many lines the purchase of journal entry ``entry`` stored (layout.JOURNAL)."""
    return L.JOURNAL_PROGRAM.unpack_from(entry, L.JOURNAL_OFF_PROGRAM)[3]


def repeat(first: Outcome, same_payload: bool) -> Outcome:
    """A request_id repeated inside one group: the first one's outcome, or a mismatch."""
    if not same_payload:
        return Outcome(L.R_DUPLICATE_REQUEST_MISMATCH, False, first.op, None)
    return first._replace(replayed=True)


# ---- request ids of a migrated v1 ledger ----------------------------------------------------

def legacy_key(key: bytes) -> bytes:
    """Where a v1 record of the same request_id lives after migration (one namespace)."""
    return L.REQUEST_KEY_HEAD.pack(L.CALLER_LEGACY, 0) + key[L.REQUEST_KEY_HEAD.size:]


_V1_OP_HEAD = struct.Struct("<BBBBIqIIII8s16s8s")  # the first 64 bytes of a v1 operation


def legacy_digest(op: PendingOp) -> bytes:
    """The digest release 1 gave the same card operation (its first 64 operation bytes, then the
    profile): a retry that crosses the upgrade with the very same payload is answered as before.
    Only card operations are looked up this way: an admin retry is judged afresh (its old record
    says nothing about who may do what now), and so is any other payload (a new request, not a
    collision with an old id of another caller)."""
    assert op.op_type <= L.OP_RESET_PIN
    (kind, tier, pin_flags, _, home, amount, store, terminal, staff, operator, _, card_id,
     *_rest) = L.OP.unpack(op.packed)
    request_id = op.request_key[L.REQUEST_KEY_HEAD.size:]
    head = _V1_OP_HEAD.pack(kind, tier, pin_flags, 0, home, amount, store, terminal, staff,
                            operator, hashlib.blake2b(request_id, digest_size=8).digest(),
                            card_id, bytes(8))
    h = hashlib.blake2b(head, digest_size=16)
    if op.profile is not None:
        h.update(op.profile)
    return h.digest()


def lines_digest(lines: bytes) -> bytes:
    """What a journal entry carries of its purchase's stored lines (layout.JOURNAL offset 200),
    so that the digest chain covers the lines too."""
    return hashlib.blake2b(lines, digest_size=L.LINES_DIGEST_SIZE).digest()
