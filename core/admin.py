"""Admin state inside a write transaction: terminals, operators, programs, keys.

One ``AdminState`` per group. It reads terminal and operator records once,
lets the group's operations change them in arrival order, and writes each
changed record once at the end (``flush``). Every check that depends on
admin state (a terminal's status and KSN counter, an operator's existence,
role and store scope) is made here, against the ledger as the group has
changed it so far: a swipe from a terminal revoked earlier in the same group
is refused. Admin operations (op >= 16) move no money and are journaled like
card operations, with their operator's id.
"""
from __future__ import annotations

import hashlib
import json
import struct

from cardcore import layout as L
from cardcore import stores
from cardcore.idempotency import (REQUEST_WINDOW_S_MIN, SCOPE_CHAIN, SCOPE_NONE, SCOPE_STORE,
                                  SCOPE_SUBJECT_TERMINAL, InvariantError, PendingOp)
from cardcore.daytotals import business_day, closed_day
from cardcore.program import ProgramError, parse_program
from cardcore.rules import Program

OPERATOR_NEXT_ID = b"\x00next_id"   # operators db: the next operator id (u32 LE)
RESEAL_ITEM = struct.Struct("<16sBB")  # card_id, old length, new length; then old, new
FLOOR = struct.Struct("<BII7x")        # OP_FLOOR subject: what, id, value
FLOOR_TERMINAL_KSN, FLOOR_OPERATOR_ID = 1, 2
TIER_CARDS = struct.Struct(f"<{L.MAX_TIERS}Q")
META_FORMAT, META_PROGRAM = b"format", b"program_current"
META_TIER_CARDS, META_PRUNED_THROUGH = b"tier_cards", b"pruned_through_us"
META_WINDOW, META_CLOCK = b"request_window_s", b"clock_us"
# The data key version the last rotation made current and its key's fingerprint (u32 | 8 bytes,
# zeros: not named; absent: no rotation recorded): a server or front whose keyring's current
# version is older, or holds that version under another key, is behind (``Keyring`` is outside
# LMDB, and a front's copy of it is the operator's to copy).
META_DATA_KEY = b"data_key_current"
# A card shard's admin shard and the last of its groups relayed here (layout.ADMIN_RELAY_SUBJECT;
# absent: the ledger takes admin changes itself, as a single server or a lone shard does).
META_ADMIN_RELAY = b"admin_relay"
DATA_KEY_SUBJECT = struct.Struct("<I8s4x")  # OP_DATA_KEY_ROTATED: version, its fingerprint
NO_FINGERPRINT = bytes(8)
U32 = struct.Struct("<I")
I64 = struct.Struct("<q")


def recorded_data_key(raw: bytes | None) -> tuple[int, bytes]:
    """META_DATA_KEY's (version, fingerprint): (0, zeros) when none is recorded."""
    if not raw:
        return 0, NO_FINGERPRINT
    return U32.unpack_from(raw)[0], (raw[4:12] or NO_FINGERPRINT)


def program_record(source: str, version: int, ts_us: int, operator_id: int) -> bytes:
    """What ``programs`` stores for a version: the document as loaded, and who loaded it when."""
    return json.dumps({"version": version, "source": source, "loaded_us": ts_us,
                       "loaded_by": operator_id,
                       "sha256": hashlib.sha256(source.encode()).hexdigest()},
                      sort_keys=True).encode()


class AdminState:
    def __init__(self, ledger, txn):
        self.ledger = ledger
        self.txn = txn
        self.terminals: dict[int, list | None] = {}
        self.dirty: set[int] = set()
        self.operators: dict[int, dict | None] = {}   # by id, as the group leaves them
        self.program: Program = ledger.program
        self.program_version: int = ledger.program_version
        self.program_packed: bytes = ledger.program_packed
        self.request_window_us: int = ledger.request_window_us
        # card numbers forwarded to the card shards that hold them (card id -> shard), as the
        # group leaves them: the ledger's own dict until the group forwards one (then a copy)
        self.forwards: dict[bytes, int] = ledger.forwards
        self._tier_cards: list[int] | None = None
        # the chain's shape, as the group leaves it (raw records; None: none), written at the end
        # (``flush``, after the day totals read the registry as the group found it)
        self.regions: dict[int, bytes | None] = {}
        self.stores: dict[int, bytes | None] = {}
        self.tree_dirty: set[tuple[str, int]] = set()
        self.region_index: dict[tuple[int, int], bool] = {}  # (region, store) -> put / delete
        self.closed_days: set[tuple[int, int]] = set()  # (store, day) closed by this group
        self.relaying = False  # the group is an admin shard's, relayed: its admin entries apply
        self.relay_ts_us = 0   # ... judged at that group's time
        self.given_ts_us = 0   # the time this group came with (an admin shard judges at it)
        self._relayed_from: tuple[int, int, int] | None | bool = False  # META_ADMIN_RELAY
        # (False: unread)

    def flush(self) -> None:
        """Write the terminal records the group changed (KSN counters, enrolments, revocations)
        and the tier counts."""
        for tid in self.dirty:
            self.txn.put(L.TERMINAL_KEY.pack(tid), L.TERMINAL.pack(*self.terminals[tid]),
                         db=self.ledger.terminals)
        if self._tier_cards is not None:
            self.txn.put(META_TIER_CARDS, TIER_CARDS.pack(*self._tier_cards), db=self.ledger.meta)
        for kind, ident in sorted(self.tree_dirty):
            db, records = ((self.ledger.chain_regions, self.regions) if kind == "region"
                           else (self.ledger.chain_stores, self.stores))
            self.txn.put(L.TERMINAL_KEY.pack(ident), records[ident], db=db)
        for (region, store), present in sorted(self.region_index.items()):
            key = L.REGION_STORE_KEY.pack(region, store)
            if present:
                self.txn.put(key, b"", db=self.ledger.chain_region_stores)
            else:
                self.txn.delete(key, db=self.ledger.chain_region_stores)

    # ---- reads, through the group's own changes ---------------------------------------------

    def terminal(self, tid: int) -> list | None:
        """The terminal record's fields (a list: the group changes them), or None."""
        terminals = self.terminals
        if tid not in terminals:
            raw = self.txn.get(L.TERMINAL_KEY.pack(tid), db=self.ledger.terminals)
            terminals[tid] = None if raw is None else list(L.TERMINAL.unpack(raw))
        return terminals[tid]

    def operator(self, oid: int) -> dict | None:
        if oid not in self.operators:
            name = self.txn.get(L.TERMINAL_KEY.pack(oid), db=self.ledger.operator_ids)
            raw = None if name is None else self.txn.get(name, db=self.ledger.operators)
            self.operators[oid] = None if raw is None else json.loads(raw)
        return self.operators[oid]

    def relayed_from(self) -> tuple[int, int, int] | None:
        """(admin shard, role, last group relayed) if this ledger is a shard of a cluster with an
        admin shard (layout.RELAY_ROLE_*), else None."""
        if self._relayed_from is False:
            raw = self.txn.get(META_ADMIN_RELAY, db=self.ledger.meta)
            self._relayed_from = None if raw is None else L.ADMIN_RELAY_SUBJECT.unpack(raw)
        return self._relayed_from  # type: ignore[return-value]

    def role(self) -> int:
        """layout.RELAY_ROLE_CARD or _ADMIN in a cluster with an admin shard; 0 otherwise."""
        return (self.relayed_from() or (0, 0))[1]

    def judged_us(self, ts_us: int) -> int:
        """The time a request's age and a day's start are judged at, the group's ``ts_us``
        otherwise: a relayed group's, its admin group's time (carried by the mark); an admin
        shard's, the time its group came with (which its card shards read in the group, where
        its ledger's clock may lag: its idle groups do not move it)."""
        if self.relay_ts_us:
            return self.relay_ts_us
        return self.given_ts_us if self.role() == L.RELAY_ROLE_ADMIN else ts_us

    def region(self, region_id: int) -> bytes | None:
        if region_id not in self.regions:
            self.regions[region_id] = self.txn.get(L.TERMINAL_KEY.pack(region_id),
                                                   db=self.ledger.chain_regions)
        return self.regions[region_id]

    def store(self, store_id: int) -> bytes | None:
        if store_id not in self.stores:
            self.stores[store_id] = self.txn.get(L.TERMINAL_KEY.pack(store_id),
                                                 db=self.ledger.chain_stores)
        return self.stores[store_id]

    def region_of(self, store_id: int) -> int:
        """The store's region as the group leaves it (0: none, or not registered)."""
        raw = self.store(store_id) if store_id else None
        return 0 if raw is None else L.STORE.unpack(raw)[5]

    def tier_cards(self) -> list[int]:
        if self._tier_cards is None:
            raw = self.txn.get(META_TIER_CARDS, db=self.ledger.meta)
            self._tier_cards = list(TIER_CARDS.unpack(raw)) if raw else [0] * L.MAX_TIERS
        return self._tier_cards

    # ---- checks made when each operation is applied ---------------------------------------------

    def take_ksn(self, op: PendingOp) -> int:
        """The terminal's DUKPT counter must grow: check and raise it (same transaction)."""
        tid = L.OP_TERMINAL_ID.unpack_from(op.packed)[0]
        t = self.terminal(tid)
        if t is None:
            return L.R_TERMINAL_UNKNOWN
        if t[1] != L.TERMINAL_ACTIVE:
            return L.R_TERMINAL_REVOKED
        if op.ksn_counter <= t[5]:
            return L.R_KSN_REPLAYED
        t[5] = op.ksn_counter
        self.dirty.add(tid)
        return L.R_OK

    def authorize(self, op: PendingOp) -> int:
        """The operation's operator exists now, holds the role it needs and covers its store."""
        oid = L.OP_OPERATOR_ID.unpack_from(op.packed)[0]
        if oid == 0:
            return L.R_OK if op.need_role == 0 else L.R_UNAUTHENTICATED
        rec = self.operator(oid)
        if rec is None or rec["removed"]:
            return L.R_UNAUTHENTICATED
        if rec["role"] < op.need_role:
            return L.R_PERMISSION_DENIED
        stores, regions = rec["store_ids"], rec.get("region_ids", ())
        if op.scope == SCOPE_NONE or not (stores or regions):  # none listed: the whole chain
            return L.R_OK
        if op.scope == SCOPE_STORE:
            return L.R_OK if self._covers(rec, op.scope_store_id) else L.R_PERMISSION_DENIED
        if op.scope == SCOPE_SUBJECT_TERMINAL:
            t = self.terminal(int.from_bytes(op.card_id[:4], "little"))
            return L.R_OK if t is None or self._covers(rec, t[4]) else L.R_PERMISSION_DENIED
        if op.scope == SCOPE_CHAIN:
            return L.R_PERMISSION_DENIED
        raise InvariantError(f"unknown scope {op.scope}")

    def _covers(self, rec: dict, store_id: int) -> bool:
        """A store in the operator's scope: listed, or in a region listed (the region it is in
        as the group leaves the registry: a store moved away leaves that scope)."""
        if store_id in rec["store_ids"]:
            return True
        regions = rec.get("region_ids")
        return bool(regions) and store_id != 0 and self.region_of(store_id) in regions

    # ---- admin and internal operations ---------------------------------------------------------

    def apply(self, op: PendingOp, kind: int, ts_us: int, seq: int) -> tuple[int, bytes | int | None]:
        """One admin or internal operation; returns (reason, journal entry or a count)."""
        operator_id = L.OP_OPERATOR_ID.unpack_from(op.packed)[0]
        subject = op.card_id
        if kind in L.ADMIN_OPS and not self.relaying and self.role() == L.RELAY_ROLE_CARD:
            return L.R_ADMIN_ELSEWHERE, None  # (the request window's own change among them)
        if kind in (L.OP_TERMINAL_ENROLLED, L.OP_TERMINAL_REVOKED):
            tid = int.from_bytes(subject[:4], "little")
            t = self.terminal(tid)
            if kind == L.OP_TERMINAL_ENROLLED:
                if t is not None:
                    return L.R_TERMINAL_EXISTS, None
                store_id, ikid = int.from_bytes(subject[4:8], "little"), subject[8:16]
                self.terminals[tid] = [L.TERMINAL_VERSION, L.TERMINAL_ACTIVE, 0, tid, store_id, 0,
                                       ikid, ts_us, 0, operator_id, 0, bytes(16)]
            else:
                if t is None:
                    return L.R_TERMINAL_NOT_FOUND, None
                if t[1] != L.TERMINAL_ACTIVE:
                    return L.R_TERMINAL_REVOKED, None
                t[1], t[8], t[10] = L.TERMINAL_REVOKED, ts_us, operator_id
                subject = subject[:4] + t[4].to_bytes(4, "little") + t[6]
            self.dirty.add(tid)
        elif kind in (L.OP_OPERATOR_ADDED, L.OP_OPERATOR_REMOVED, L.OP_OPERATOR_TOKEN_REISSUED):
            reason, record = self._operator_change(kind, json.loads(op.payload), ts_us, operator_id)
            if reason != L.R_OK:
                return reason, None
            subject = record["id"].to_bytes(4, "little") + bytes([record["role"]]) + bytes(11)
        elif kind == L.OP_DATA_KEY_ROTATED:
            # the keyring changed outside LMDB; the journal records who did it and when, and
            # the meta which version is current now, and its key's fingerprint. A rotation that
            # names a fingerprint (every one since 2026-12-01) must name a version above the
            # recorded one: two fronts rotating at once make one version under two keys, and the
            # second is refused (its front drops its key). Older ones: the highest wins.
            version, fingerprint = DATA_KEY_SUBJECT.unpack_from(subject)
            known, _ = recorded_data_key(self.txn.get(META_DATA_KEY, db=self.ledger.meta))
            if fingerprint != NO_FINGERPRINT and version <= known:
                return L.R_ILLEGAL_TRANSITION, None
            if version > known:
                self.txn.put(META_DATA_KEY, U32.pack(version) + fingerprint,
                             db=self.ledger.meta)
        elif kind == L.OP_PROGRAM_LOADED:
            reason, subject = self._load_program(op.payload.decode(), ts_us, operator_id)
            if reason != L.R_OK:
                return reason, None
        elif kind == L.OP_REQUEST_WINDOW_SET:
            window_s = U32.unpack_from(subject)[0]
            if window_s < REQUEST_WINDOW_S_MIN:
                return L.R_INVALID_ARGUMENT, None
            self.txn.put(META_WINDOW, U32.pack(window_s), db=self.ledger.meta)
            self.request_window_us = window_s * 1_000_000
        elif kind == L.OP_CLOSE_DAY:
            reason = self._close_day(subject, ts_us)
            if reason != L.R_OK:
                return reason, None
        elif kind == L.OP_REGION_PUT:
            reason = self._put_region(subject, op.payload, ts_us, operator_id)
            if reason != L.R_OK:
                return reason, None
        elif kind == L.OP_STORE_PUT:
            reason = self._put_store(subject, op.payload, ts_us, operator_id)
            if reason != L.R_OK:
                return reason, None
        elif kind == L.OP_RESEAL:
            return L.R_OK, self.reseal(op.payload)
        elif kind == L.OP_FLOOR:
            return L.R_OK, self._floor(*FLOOR.unpack(subject))
        elif kind == L.OP_MAINTENANCE:
            return L.R_OK, 0  # the group's prune step does the work
        elif kind == L.OP_ADMIN_RELAY:
            return L.R_OK, self._relay(*L.ADMIN_RELAY_SUBJECT.unpack(subject), op.payload)
        elif kind == L.OP_OUTBOX_DONE:
            return self._outbox_done(op.payload or b"")
        elif kind == L.OP_CARD_FORWARDED:
            return self._forward(op.card_id, op.payload or b"")
        else:
            raise InvariantError(f"unknown admin operation {kind}")
        entry = L.JOURNAL.pack(
            L.JOURNAL_VERSION, kind, 0, 0, 0, 0, 0, seq, subject, 0, 0, 0, 0, 0, 0, 0, 0, ts_us,
            0, 0, 0, operator_id, op.packed[32:40], self.program_version, op.packed[3], bytes(3),
            L.OP.unpack_from(op.packed)[15], 0, 0, 0, 0, L.OP_CLIENT_TIME.unpack_from(op.packed)[0],
            bytes(48), bytes(L.DIGEST_SIZE))
        return L.R_OK, entry

    def _operator_change(self, kind: int, record: dict, ts_us: int,
                         operator_id: int) -> tuple[int, dict | None]:
        txn, db = self.txn, self.ledger.operators
        name = record["name"].encode()
        raw = txn.get(name, db=db)
        old = None if raw is None else json.loads(raw)
        if kind == L.OP_OPERATOR_ADDED:
            if old is not None:
                return L.R_OPERATOR_EXISTS, None
            raw_id = txn.get(OPERATOR_NEXT_ID, db=db)
            oid = int.from_bytes(raw_id, "little") if raw_id else 1
            txn.put(OPERATOR_NEXT_ID, (oid + 1).to_bytes(4, "little"), db=db)
            txn.put(L.TERMINAL_KEY.pack(oid), name, db=self.ledger.operator_ids)
            record.update(id=oid, removed=False, created_us=ts_us, created_by=operator_id)
        else:
            if old is None or old["removed"]:
                return L.R_OPERATOR_NOT_FOUND, None
            if kind == L.OP_OPERATOR_REMOVED:
                record = {**old, "removed": True, "removed_us": ts_us, "removed_by": operator_id}
            else:  # a fresh token in place of one whose answer was lost
                record = {**old, "token_sha256": record["token_sha256"], "token_reissued_us": ts_us}
        txn.put(name, json.dumps(record, sort_keys=True).encode(), db=db)
        self.operators[record["id"]] = record
        return L.R_OK, record

    def _load_program(self, source: str, ts_us: int, operator_id: int) -> tuple[int, bytes]:
        """A new program version: valid, and keeping every tier that holds cards."""
        try:
            program = parse_program(source)
        except ProgramError:
            return L.R_PROGRAM_INVALID, b""
        if self.role():  # an admin shard sees no cards, so it refuses any tier dropped, and
            # a card shard judges what it relays by that rule alone (the two must agree)
            if len(program.tiers) < len(self.program.tiers):
                return L.R_PROGRAM_STRANDS_CARDS, b""
        elif any(self.tier_cards()[len(program.tiers):]):
            return L.R_PROGRAM_STRANDS_CARDS, b""
        version = self.program_version + 1
        self.txn.put(L.VERSION_KEY.pack(version), program_record(source, version, ts_us, operator_id),
                     db=self.ledger.programs)
        self.txn.put(META_PROGRAM, U32.pack(version), db=self.ledger.meta)
        self.program, self.program_version = program, version
        self.program_packed = program.packed(version)
        return L.R_OK, version.to_bytes(4, "little") + hashlib.sha256(source.encode()).digest()[:12]

    def _close_day(self, subject: bytes, ts_us: int) -> int:
        """CloseDay (``cardcore.daytotals``): only a day that has begun. Every close is
        journaled (who asked, when); the first of a store's day closes it, where its entry
        stands (the day totals read the entries), and the later ones change nothing."""
        store, day = closed_day(subject)
        if (store, day) in self.closed_days or (
                self.ledger.store_days is not None and self.txn.get(
                    L.DAY_KEY.pack(store, day), db=self.ledger.store_days) is not None):
            return L.R_OK  # closed before (in this group too): its answer again, even if the
            # store's clock moved back since
        program = self.program
        own = stores.store_day(self.store(store)) if store else None
        if day > business_day(self.judged_us(ts_us), *program.business_day_of(own)):
            return L.R_DAY_NOT_STARTED
        self.closed_days.add((store, day))
        return L.R_OK

    def _tree_full(self, kind: str, db, limit: int) -> bool:
        """Whether one more region (or store) would pass its limit."""
        stored = self.txn.stat(db)["entries"]
        added = sum(1 for k, i in self.tree_dirty if k == kind
                    and self.txn.get(L.TERMINAL_KEY.pack(i), db=db) is None)
        return stored + added >= limit

    def _put_region(self, subject: bytes, payload: bytes, ts_us: int, operator_id: int) -> int:
        """PutRegion: create or rename (checked again here: the ledger's own limits)."""
        region_id = L.REGION_SUBJECT.unpack(subject)[0]
        name = payload.decode("utf-8", "replace")
        if region_id == 0:
            return L.R_CHAIN_ID_INVALID
        if stores.name_problem(name) is not None:
            return L.R_NAME_INVALID
        if self.region(region_id) is None and self._tree_full(
                "region", self.ledger.chain_regions, stores.REGIONS_MAX):
            return L.R_CHAIN_TREE_FULL
        self.regions[region_id] = stores.region_record(region_id, name, ts_us, operator_id)
        self.tree_dirty.add(("region", region_id))
        return L.R_OK

    def _put_store(self, subject: bytes, payload: bytes, ts_us: int, operator_id: int) -> int:
        """PutStore: create or change a store (its name, region, business day); a store moved
        to another region leaves the old one's index."""
        store_id, region_id, day = stores.subject_store(subject)
        name = payload.decode("utf-8", "replace")
        if store_id == 0:
            return L.R_CHAIN_ID_INVALID
        if stores.name_problem(name) is not None:
            return L.R_NAME_INVALID
        bad = None if day is None else stores.day_problem(*day)
        if bad is not None:
            return bad[0]
        if region_id and self.region(region_id) is None:
            return L.R_REGION_NOT_FOUND
        old = self.store(store_id)
        if old is None and self._tree_full("store", self.ledger.chain_stores,
                                           stores.STORES_MAX):
            return L.R_CHAIN_TREE_FULL
        old_region = None if old is None else L.STORE.unpack(old)[5]
        if old_region != region_id:
            if old_region:
                self.region_index[(old_region, store_id)] = False
            if region_id:
                self.region_index[(region_id, store_id)] = True
        self.stores[store_id] = stores.store_record(store_id, name, region_id, day, ts_us,
                                                    operator_id)
        self.tree_dirty.add(("store", store_id))
        return L.R_OK

    def _floor(self, what: int, ident: int, value: int) -> int:
        """Restore: never lower a terminal's KSN counter or reuse an operator id."""
        if what == FLOOR_TERMINAL_KSN:
            t = self.terminal(ident)
            if t is None or t[5] >= value:
                return 0
            t[5] = value
            self.dirty.add(ident)
            return 1
        if what == FLOOR_OPERATOR_ID:
            if self.role() == L.RELAY_ROLE_CARD and not self.relaying:
                return 0  # the admin shard's, relayed: operator ids are assigned alike
            raw = self.txn.get(OPERATOR_NEXT_ID, db=self.ledger.operators)
            if raw is not None and int.from_bytes(raw, "little") >= value:
                return 0
            self.txn.put(OPERATOR_NEXT_ID, value.to_bytes(4, "little"), db=self.ledger.operators)
            return 1
        raise InvariantError(f"unknown floor {what}")

    def _relay(self, shard: int, role: int, group_no: int, payload: bytes | None) -> int:
        """The shard's place in a cluster with an admin shard, said once by its first leader
        (group 0), then on a card shard each relayed admin group's mark: its admin entries
        apply, judged at ``payload``'s time (as the admin shard judged them). The admin shard's
        groups come in their order, once: its leader relays only past what this ledger holds,
        so anything else is a bug (and its group is never appended)."""
        was = self.relayed_from()
        if role not in (L.RELAY_ROLE_CARD, L.RELAY_ROLE_ADMIN) or (
                was is not None and (was[:2] != (shard, role) or group_no <= was[2])) or (
                group_no and role != L.RELAY_ROLE_CARD):
            raise InvariantError(f"admin relay mark {(shard, role, group_no)} after {was}")
        self._relayed_from = (shard, role, group_no)
        self.txn.put(META_ADMIN_RELAY, L.ADMIN_RELAY_SUBJECT.pack(shard, role, group_no),
                     db=self.ledger.meta)
        if group_no:
            self.relaying = True
            self.relay_ts_us = I64.unpack(payload or b"")[0]
        return 1

    def _outbox_done(self, payload: bytes) -> tuple[int, int]:
        """(reason, how many were taken out): the outbox records of the seqs in ``payload``
        (u64 little-endian, at most OUTBOX_DONE_MAX), delivered; one already gone is skipped
        (another front's delivery took it out)."""
        if not payload or len(payload) % 8 or len(payload) > 8 * L.OUTBOX_DONE_MAX:
            return L.R_INVALID_ARGUMENT, 0
        count = 0
        for (seq,) in struct.iter_unpack("<Q", payload):
            count += self.txn.delete(L.OUTBOX_KEY_PREFIX + L.OUTBOX_KEY.pack(seq),
                                     db=self.ledger.meta)
        return L.R_OK, count

    def _forward(self, card_id: bytes, payload: bytes) -> tuple[int, int]:
        """(reason, 1 if made, 0 if it was already): card ``card_id``'s number forwarded to the
        card shard in ``payload`` (layout.FORWARD). Refused R_CARD_ALREADY_EXISTS when this
        shard holds the card, or forwarded it to another shard: the number is taken."""
        if len(payload) != L.FORWARD_PAYLOAD.size:
            return L.R_INVALID_ARGUMENT, 0
        (shard,) = L.FORWARD_PAYLOAD.unpack(payload)
        known = self.forwards.get(card_id)
        if known is not None:
            return (L.R_OK if known == shard else L.R_CARD_ALREADY_EXISTS), 0
        txn, meta = self.txn, self.ledger.meta
        if txn.get(card_id, db=self.ledger.cards) is not None:
            return L.R_CARD_ALREADY_EXISTS, 0
        n = len(self.forwards) + 1
        txn.put(L.FORWARD_KEY_PREFIX + card_id, L.FORWARD.pack(L.FORWARD_VERSION, shard, n),
                db=meta)
        txn.put(L.FORWARDS_KEY_PREFIX + L.FORWARDS_KEY.pack(n), card_id, db=meta)
        if self.forwards is self.ledger.forwards:  # (the ledger's stays as committed)
            self.forwards = dict(self.forwards)
        self.forwards[card_id] = shard
        return L.R_OK, 1

    def reseal(self, payload: bytes) -> int:
        """Swap sealed card numbers that still hold what the caller read (compare and set)."""
        count = pos = 0
        while pos < len(payload):
            card_id, old_len, new_len = RESEAL_ITEM.unpack_from(payload, pos)
            pos += RESEAL_ITEM.size
            old, new = payload[pos:pos + old_len], payload[pos + old_len:pos + old_len + new_len]
            pos += old_len + new_len
            if self.txn.get(card_id, db=self.ledger.cardnos) == old:
                self.txn.put(card_id, new, db=self.ledger.cardnos)
                count += 1
        return count


def relayed(op: PendingOp) -> bool:
    """Whether an admin shard's operation goes to its card shards (``groups.relay_ops``): an
    admin entry, or a floor of the operator ids (which every shard assigns alike)."""
    kind = op.packed[0]
    return kind in L.ADMIN_OPS or (kind == L.OP_FLOOR
                                   and FLOOR.unpack(op.card_id)[0] == FLOOR_OPERATOR_ID)


def reseal_payload(items: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """(card_id, sealed as read, sealed anew) items for an OP_RESEAL operation."""
    return b"".join(RESEAL_ITEM.pack(cid, len(old), len(new)) + old + new
                    for cid, old, new in items)


def window_op(window_s: int) -> PendingOp:
    """The server's own change of the request retention window (journaled: whose, when)."""
    return PendingOp.admin(b"", L.OP_REQUEST_WINDOW_SET, U32.pack(window_s) + bytes(12), b"", 0)


def floor_op(what: int, ident: int, value: int) -> PendingOp:
    return PendingOp.internal(L.OP_FLOOR, subject=FLOOR.pack(what, ident, value))
