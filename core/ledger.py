"""The ledger: card records, journal and idempotency records in one LMDB environment.

Sub-databases (all in one environment, so one write transaction covers them)::

    cards     card_id (16 B)        -> card record (128 B, layout.CARD)
    journal   seq (u64 big-endian)  -> journal entry (128 B, layout.JOURNAL)
    requests  request_id (ASCII)    -> idempotency record (48 B, layout.IDEM)
    profiles  card_id               -> member profile (JSON, cold)
    cardnos   card_id               -> the card number sealed under a data key (keyring.seal)
    terminals terminal id (u32 BE)  -> terminal record (64 B, layout.TERMINAL)
    operators name (UTF-8)          -> operator (JSON: id, role, stores, token SHA-256)

Card operations go through the kernel. Admin operations (op >= 16: terminals,
operators, key rotation) are applied here, in request order, and journaled
like the rest. An operation from a terminal carries its DUKPT counter: it is
checked against, and raises, the terminal's last counter in the same
transaction, so a replayed KSN can never be applied, even after a crash.

``apply_group`` is the only writer: it runs a group of queued operations in
one write transaction (one fsync when ``sync`` is on), with the arithmetic
done by the Cython kernel over a contiguous records buffer. The journal is
the truth: the next sequence number is read from its last key at start.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import threading
from array import array
from typing import NamedTuple

import lmdb

from . import layout as L
from .ext import kernel
from .rules import Program

log = logging.getLogger("cardcore.ledger")

MAP_SIZE_INITIAL = 1 << 30      # virtual address space; the file grows only as used
MAP_GROW_FACTOR = 2
MAP_GROW_ATTEMPTS = 8
MAX_READERS = 512
EMPTY_RECORD = bytes(L.CARD_SIZE)
NO_PIN = bytes(32)
OPERATOR_NEXT_ID = b"\x00next_id"   # operators db: the next operator id (u32 LE)
RESEAL_ITEM = struct.Struct("<16sBB")  # card_id, old length, new length; then old, new
# The fields of a kernel output entry the writer needs: op, reason, seq, principal and
# bonus after (layout.JOURNAL offsets 1, 4, 8, 72, 80).
ENTRY_HEAD = struct.Struct("<xBxxHxxQ56xqq")
assert ENTRY_HEAD.size == 88


class InvariantError(RuntimeError):
    """The ledger would write, or has read, something that breaks an invariant.

    Raised inside the write transaction (which is then aborted), never
    caught: the writer stops rather than write a half-truth. Explicit raises,
    not ``assert``: they must hold under ``python -O`` too.
    """


def request_tag(request_key: bytes) -> bytes:
    """The 8-byte tag a journal entry carries to link it to its request."""
    return hashlib.blake2b(request_key, digest_size=L.REQUEST_TAG_SIZE).digest()


@dataclasses.dataclass(slots=True)
class PendingOp:
    """A validated mutation, packed by the request handler before the writer sees it."""
    request_key: bytes        # the request_id, ASCII; empty for internal operations
    card_id: bytes            # 16 bytes (admin operations: their subject)
    packed: bytes             # layout.OP, 128 bytes
    digest: bytes             # BLAKE2b-128 of the payload, PIN fields left out: the idempotency digest
    profile: bytes | None = None  # OPEN only: the JSON profile to store
    ksn_counter: int = 0      # from a terminal: its DUKPT transaction counter (op's terminal_id)
    sealed: bytes | None = None   # OPEN only: the card number sealed under the current data key
    payload: bytes | None = None  # admin and internal operations: what to store

    @classmethod
    def build(cls, request_key: bytes, op: int, card_id: bytes, amount_minor: int = 0,
              store_id: int = 0, terminal_id: int = 0, staff_id: int = 0, tier: int = 0,
              home_store_id: int = 0, profile: bytes | None = None, *, operator_id: int = 0,
              pin_flags: int = 0, pin_check: bytes = NO_PIN, new_pin_check: bytes = NO_PIN,
              ksn_counter: int = 0, sealed: bytes | None = None) -> "PendingOp":
        packed = L.OP.pack(op, tier, pin_flags, 0, home_store_id, amount_minor, store_id,
                           terminal_id, staff_id, operator_id, request_tag(request_key), card_id,
                           bytes(8), pin_check, new_pin_check)
        # Not the PIN check values: a re-send with another PIN must get the original answer,
        # never "another payload", or the answer would tell a right guess from a wrong one.
        h = hashlib.blake2b(packed[:L.OP_DIGEST_SIZE], digest_size=16)
        if profile is not None:
            h.update(profile)
        return cls(request_key, card_id, packed, h.digest(), profile, ksn_counter, sealed)

    @classmethod
    def admin(cls, request_key: bytes, op: int, subject: bytes, payload: bytes, operator_id: int,
              digest_payload: bytes | None = None) -> "PendingOp":
        """An admin operation; ``digest_payload`` (default: payload) is what a retry must repeat."""
        assert L.OP_ADMIN_MIN <= op and len(subject) == L.CARD_ID_SIZE
        packed = L.OP.pack(op, 0, 0, 0, 0, 0, 0, 0, 0, operator_id, request_tag(request_key),
                           subject, bytes(8), NO_PIN, NO_PIN)
        digest = hashlib.blake2b(packed + (payload if digest_payload is None else digest_payload),
                                 digest_size=16).digest()
        return cls(request_key, subject, packed, digest, payload=payload)


class Outcome(NamedTuple):
    """What became of one operation: the reply is built from this."""
    reason: int                 # layout.R_* / cardcore.v1.Reason
    replayed: bool              # answered from an earlier identical request
    op: int                     # layout.OP_*
    entry: bytes | None         # the journal entry (applied), or the kernel's declined entry
    available_minor: int        # for INSUFFICIENT_FUNDS



class Ledger:
    def __init__(self, path: str, program: Program, *, sync: bool = True,
                 map_size: int = MAP_SIZE_INITIAL, readonly: bool = False) -> None:
        self.path = path
        self.program = program
        self._program_packed = program.packed()
        # Explicit options: durability (sync/metasync) is the point of the ledger;
        # writemap off keeps stray pointer writes from touching the file.
        self.env = lmdb.open(path, subdir=True, map_size=map_size, max_dbs=8, sync=sync,
                             metasync=sync, writemap=False, readahead=False,
                             max_readers=MAX_READERS, lock=True, readonly=readonly)
        create = not readonly
        if not readonly:
            # Reader slots of processes that died (kill -9) would pin old pages forever.
            stale = self.env.reader_check()
            if stale:
                log.warning("cleared %d stale LMDB reader slots", stale)
        self.cards = self.env.open_db(b"cards", create=create)
        self.journal = self.env.open_db(b"journal", create=create)
        self.requests = self.env.open_db(b"requests", create=create)
        self.profiles = self.env.open_db(b"profiles", create=create)
        self.cardnos = self.env.open_db(b"cardnos", create=create)
        self.terminals = self.env.open_db(b"terminals", create=create)
        self.operators = self.env.open_db(b"operators", create=create)
        # Readers hold this while a read transaction is open; the writer holds it to
        # grow the map, which LMDB allows only with no transaction active.
        self._resize_gate = threading.Lock()
        with self.env.begin() as txn:
            self._next_seq = self._journal_next_seq(txn)

    def _journal_next_seq(self, txn) -> int:
        """The journal is the truth: one past its last key (read in every write transaction,
        so a writer that starts while an old one finishes its last group stays in sequence)."""
        cur = txn.cursor(db=self.journal)
        return L.SEQ_KEY.unpack(cur.key())[0] + 1 if cur.last() else 1

    def _read(self, fn):
        """Run ``fn(txn)`` in a read transaction; adopt a map another process has grown."""
        for _ in range(MAP_GROW_ATTEMPTS):
            try:
                with self._resize_gate, self.env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                with self._resize_gate:
                    self.env.set_mapsize(0)
        raise RuntimeError("LMDB map keeps being resized")

    def close(self) -> None:
        self.env.close()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # ---- writer -------------------------------------------------------------

    def apply_group(self, ops: list[PendingOp], ts_us: int) -> list[Outcome]:
        """Apply ``ops`` in order in one write transaction; return one outcome each.

        Raises on a broken invariant (the transaction is aborted, nothing is
        written); grows the map and retries when LMDB reports it full.
        """
        for _ in range(MAP_GROW_ATTEMPTS):
            try:
                return self._apply_group_once(ops, ts_us)
            except lmdb.MapFullError:
                self._grow_map()
        raise RuntimeError("LMDB map still full after growing it")

    def _grow_map(self) -> None:
        with self._resize_gate:
            new_size = self.env.info()["map_size"] * MAP_GROW_FACTOR
            self.env.set_mapsize(new_size)
        log.warning("LMDB map grown to %d MiB", new_size >> 20)

    def _apply_group_once(self, ops: list[PendingOp], ts_us: int) -> list[Outcome]:
        n = len(ops)
        outcomes: list[Outcome | None] = [None] * n
        with self.env.begin(write=True) as txn:
            self._next_seq = self._journal_next_seq(txn)
            # 1. Idempotency: earlier requests with the same id, and repeats inside the group.
            known = dict(txn.cursor(db=self.requests).getmulti(
                [op.request_key for op in ops if op.request_key]))
            fresh: list[int] = []
            first_index: dict[bytes, int] = {}
            repeats: list[tuple[int, int]] = []
            terminals: dict[int, list | None] = {}
            dirty_terminals: set[int] = set()
            for i, op in enumerate(ops):
                if op.ksn_counter:
                    # Before idempotency: a used KSN is refused even on an exact re-send (a
                    # terminal retries with a fresh KSN and the same request_id). Not a business
                    # outcome: no request record, so that retry can still pass.
                    reason = self._take_ksn(txn, op, terminals, dirty_terminals)
                    if reason != L.R_OK:
                        outcomes[i] = Outcome(reason, False, op.packed[0], None, 0)
                        continue
                idem = known.get(op.request_key)
                if not op.request_key:  # internal: no idempotency record
                    fresh.append(i)
                elif idem is not None:
                    outcomes[i] = self._replay(txn, idem, op.digest)
                elif op.request_key in first_index:
                    repeats.append((i, first_index[op.request_key]))
                else:
                    first_index[op.request_key] = i
                    fresh.append(i)
            next_seq = self._next_seq
            if fresh:
                next_seq = self._apply_fresh(txn, ops, fresh, outcomes, ts_us, terminals,
                                             dirty_terminals)
            # Terminal records the group changed (KSN counters, enrolments, revocations), once.
            for tid in dirty_terminals:
                txn.put(L.TERMINAL_KEY.pack(tid), L.TERMINAL.pack(*terminals[tid]), db=self.terminals)
            for i, j in repeats:
                outcomes[i] = self._repeat(outcomes[j], ops[i].digest == ops[j].digest)
        self._next_seq = next_seq  # only once the commit (and its fsync) succeeded
        return outcomes  # type: ignore[return-value]

    def _apply_fresh(self, txn, ops, fresh, outcomes, ts_us, terminals, dirty_terminals) -> int:
        seq = self._next_seq
        entries: list[tuple[bytes, bytes]] = []
        idem_items: list[tuple[bytes, bytes]] = []
        seq_key, idem_pack = L.SEQ_KEY.pack, L.IDEM.pack
        # 2. In request order: admin operations (on the group's terminal records, as the KSN
        #    checks left them); card operations to the kernel.
        card_ops: list[int] = []
        for i in fresh:
            op = ops[i]
            kind = op.packed[0]
            if kind >= L.OP_ADMIN_MIN:
                reason, entry = self._apply_admin(txn, op, kind, ts_us, seq, terminals,
                                                  dirty_terminals)
                count = 0
                if kind == L.OP_RESEAL:
                    count, entry = entry, None
                elif reason == L.R_OK:
                    entries.append((seq_key(seq), entry))
                    seq += 1
                if op.request_key:
                    idem_items.append((op.request_key, idem_pack(
                        L.IDEM_VERSION, kind, reason, 0, op.digest,
                        seq - 1 if reason == L.R_OK else 0, 0, ts_us)))
                outcomes[i] = Outcome(reason, False, kind, entry, count)
            else:
                card_ops.append(i)
        next_seq = seq
        if card_ops:
            next_seq = self._apply_cards(txn, ops, card_ops, outcomes, ts_us, seq, entries,
                                         idem_items)
        if entries:
            added, _ = txn.cursor(db=self.journal).putmulti(entries, append=True)
            if added != len(entries):
                raise InvariantError("journal append refused: sequence not increasing")
        if idem_items:
            txn.cursor(db=self.requests).putmulti(idem_items)
        if next_seq != self._next_seq + len(entries):
            raise InvariantError("kernel sequence does not match the journal entries")
        return next_seq

    def _apply_cards(self, txn, ops, fresh, outcomes, ts_us, first_seq, entries, idem_items) -> int:
        # 3. One slot per distinct card, records read in one getmulti.
        slot_of: dict[bytes, int] = {}
        card_ids: list[bytes] = []
        slots = array("I")
        for i in fresh:
            cid = ops[i].card_id
            s = slot_of.get(cid)
            if s is None:
                s = slot_of[cid] = len(card_ids)
                card_ids.append(cid)
            slots.append(s)
        cards = txn.cursor(db=self.cards)
        stored = dict(cards.getmulti(card_ids))
        records = bytearray(b"".join([stored.get(c, EMPTY_RECORD) for c in card_ids]))
        journal_out = bytearray(len(fresh) * L.JOURNAL_SIZE)
        dirty = bytearray(len(card_ids))
        # 4. The kernel: arithmetic and PINs over the records buffer, journal entries out.
        next_seq = kernel.apply_batch(self._program_packed, b"".join([ops[i].packed for i in fresh]),
                                      slots, records, journal_out, dirty, ts_us, first_seq)
        # 5. Write back what the kernel changed.
        rec_view = memoryview(records)
        cards.putmulti([(card_ids[s], bytes(rec_view[s * L.CARD_SIZE:(s + 1) * L.CARD_SIZE]))
                        for s in range(len(card_ids)) if dirty[s]])
        profile_items: list[tuple[bytes, bytes]] = []
        sealed_items: list[tuple[bytes, bytes]] = []
        out = bytes(journal_out)
        seq_key, idem_pack, size = L.SEQ_KEY.pack, L.IDEM.pack, L.JOURNAL_SIZE
        head = ENTRY_HEAD.unpack_from
        for k, i in enumerate(fresh):
            op = ops[i]
            op_type = op.packed[0]
            _, reason, seq, principal_after, bonus_after = head(out, k * size)
            entry = out[k * size:(k + 1) * size]
            available = principal_after + bonus_after if reason == L.R_INSUFFICIENT_FUNDS else 0
            if seq:  # applied, or a wrong PIN counted
                entries.append((seq_key(seq), entry))
            if reason == L.R_OK and op_type == L.OP_OPEN:
                if op.profile is not None:
                    profile_items.append((op.card_id, op.profile))
                if op.sealed is not None:
                    sealed_items.append((op.card_id, op.sealed))
            idem_items.append((op.request_key, idem_pack(
                L.IDEM_VERSION, op_type, reason, 0, op.digest, seq, available, ts_us)))
            outcomes[i] = Outcome(reason, False, op_type, entry, available)
        if profile_items:
            txn.cursor(db=self.profiles).putmulti(profile_items)
        if sealed_items:
            txn.cursor(db=self.cardnos).putmulti(sealed_items)
        return next_seq

    # ---- terminals, operators, keys -------------------------------------------------

    def _terminal(self, txn, tid: int, terminals: dict) -> list | None:
        if tid not in terminals:
            raw = txn.get(L.TERMINAL_KEY.pack(tid), db=self.terminals)
            terminals[tid] = None if raw is None else list(L.TERMINAL.unpack(raw))
        return terminals[tid]

    def _take_ksn(self, txn, op: PendingOp, terminals: dict, dirty: set) -> int:
        """The terminal's DUKPT counter must grow: check and raise it (same transaction)."""
        tid = L.OP_TERMINAL_ID.unpack_from(op.packed)[0]
        t = self._terminal(txn, tid, terminals)
        if t is None:
            return L.R_TERMINAL_UNKNOWN
        if t[1] != L.TERMINAL_ACTIVE:
            return L.R_TERMINAL_REVOKED
        if op.ksn_counter <= t[5]:
            return L.R_KSN_REPLAYED
        t[5] = op.ksn_counter
        dirty.add(tid)
        return L.R_OK

    def _apply_admin(self, txn, op: PendingOp, kind: int, ts_us: int, seq: int, terminals: dict,
                     dirty_terminals: set) -> tuple[int, bytes | int | None]:
        """One admin or internal operation; returns (reason, journal entry or reseal count)."""
        operator_id = L.OP_OPERATOR_ID.unpack_from(op.packed)[0]
        subject = op.card_id
        if kind in (L.OP_TERMINAL_ENROLLED, L.OP_TERMINAL_REVOKED):
            tid = int.from_bytes(subject[:4], "little")
            t = self._terminal(txn, tid, terminals)
            if kind == L.OP_TERMINAL_ENROLLED:
                if t is not None:
                    return L.R_TERMINAL_EXISTS, None
                store_id, ikid = int.from_bytes(subject[4:8], "little"), subject[8:16]
                terminals[tid] = [L.TERMINAL_VERSION, L.TERMINAL_ACTIVE, 0, tid, store_id, 0, ikid,
                                  ts_us, 0, operator_id, 0, bytes(16)]
            else:
                if t is None:
                    return L.R_TERMINAL_NOT_FOUND, None
                if t[1] != L.TERMINAL_ACTIVE:
                    return L.R_TERMINAL_REVOKED, None
                t[1], t[8], t[10] = L.TERMINAL_REVOKED, ts_us, operator_id
                subject = subject[:4] + t[4].to_bytes(4, "little") + t[6]
            dirty_terminals.add(tid)
        elif kind in (L.OP_OPERATOR_ADDED, L.OP_OPERATOR_REMOVED):
            record = json.loads(op.payload)
            name = record["name"].encode()
            old = txn.get(name, db=self.operators)
            if kind == L.OP_OPERATOR_ADDED:
                if old is not None:
                    return L.R_OPERATOR_EXISTS, None
                raw_id = txn.get(OPERATOR_NEXT_ID, db=self.operators)
                oid = int.from_bytes(raw_id, "little") if raw_id else 1
                txn.put(OPERATOR_NEXT_ID, (oid + 1).to_bytes(4, "little"), db=self.operators)
                record.update(id=oid, removed=False, created_us=ts_us, created_by=operator_id)
            else:
                if old is None or json.loads(old)["removed"]:
                    return L.R_OPERATOR_NOT_FOUND, None
                record = json.loads(old)
                record.update(removed=True, removed_us=ts_us, removed_by=operator_id)
            txn.put(name, json.dumps(record, sort_keys=True).encode(), db=self.operators)
            subject = record["id"].to_bytes(4, "little") + bytes([record["role"]]) + bytes(11)
        elif kind == L.OP_DATA_KEY_ROTATED:
            pass  # the keyring changed outside LMDB; the journal records who did it and when
        elif kind == L.OP_RESEAL:
            return L.R_OK, self._reseal(txn, op.payload)
        else:
            raise InvariantError(f"unknown admin operation {kind}")
        entry = L.JOURNAL.pack(L.JOURNAL_VERSION, kind, 0, 0, 0, 0, 0, seq, subject, 0, 0, 0, 0, 0,
                               0, 0, 0, ts_us, 0, 0, 0, operator_id, op.packed[32:40])
        return L.R_OK, entry

    def _reseal(self, txn, payload: bytes) -> int:
        """Swap sealed card numbers that still hold what the caller read (compare and set)."""
        count = pos = 0
        while pos < len(payload):
            card_id, old_len, new_len = RESEAL_ITEM.unpack_from(payload, pos)
            pos += RESEAL_ITEM.size
            old, new = payload[pos:pos + old_len], payload[pos + old_len:pos + old_len + new_len]
            pos += old_len + new_len
            if txn.get(card_id, db=self.cardnos) == old:
                txn.put(card_id, new, db=self.cardnos)
                count += 1
        return count

    @staticmethod
    def reseal_payload(items: list[tuple[bytes, bytes, bytes]]) -> bytes:
        """(card_id, sealed as read, sealed anew) items for an OP_RESEAL operation."""
        return b"".join(RESEAL_ITEM.pack(cid, len(old), len(new)) + old + new
                        for cid, old, new in items)

    def read_terminal(self, terminal_id: int) -> tuple | None:
        raw = self._read(lambda txn: txn.get(L.TERMINAL_KEY.pack(terminal_id), db=self.terminals))
        return None if raw is None else L.TERMINAL.unpack(raw)

    def read_terminals(self) -> list[tuple]:
        return self._read(lambda txn: [L.TERMINAL.unpack(v) for _, v in txn.cursor(db=self.terminals)])

    def read_operators(self) -> list[dict]:
        return self._read(lambda txn: [json.loads(v) for k, v in txn.cursor(db=self.operators)
                                       if k != OPERATOR_NEXT_ID])

    def read_sealed(self, after: bytes = b"", limit: int = 1000) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (card_id, sealed number) pairs with card_id > ``after``, in key order."""
        def read(txn):
            cur = txn.cursor(db=self.cardnos)
            out = []
            if not cur.set_range(after):
                return out
            for key, value in cur:
                if key == after:
                    continue
                out.append((key, value))
                if len(out) >= limit:
                    break
            return out

        return self._read(read)

    def settle(self, ops: list[PendingOp]) -> list[Outcome]:
        """After a write that failed for the storage's sake (disk full, I/O error), what landed?

        A failed LMDB commit normally leaves the previous state, but a failure
        while syncing can leave the new one: so ask the ledger, not the error.
        An operation whose request record is there was applied (its original
        outcome); any other was not (REASON_STORAGE_UNAVAILABLE).
        """
        def read(txn):
            out, seen = [], set()
            for op in ops:
                idem = txn.get(op.request_key, db=self.requests)
                if idem is None:
                    out.append(Outcome(L.R_STORAGE_UNAVAILABLE, False, op.packed[0], None, 0))
                else:
                    landed = self._replay(txn, idem, op.digest)
                    out.append(landed._replace(replayed=op.request_key in seen))
                seen.add(op.request_key)
            return out

        return self._read(read)

    def _replay(self, txn, idem: bytes, digest: bytes) -> Outcome:
        _, op_type, reason, _, stored_digest, seq, available, _ = L.IDEM.unpack(idem)
        if stored_digest != digest:
            return Outcome(L.R_DUPLICATE_REQUEST_MISMATCH, False, op_type, None, 0)
        entry = txn.get(L.SEQ_KEY.pack(seq), db=self.journal) if seq else None
        if reason == L.R_OK and entry is None:
            raise InvariantError("idempotency record points at no journal entry")
        return Outcome(reason, True, op_type, entry, available)

    @staticmethod
    def _repeat(first: Outcome, same_payload: bool) -> Outcome:
        if not same_payload:
            return Outcome(L.R_DUPLICATE_REQUEST_MISMATCH, False, first.op, None, 0)
        return first._replace(replayed=True)

    # ---- readers (never wait for the writer) --------------------------------

    def read_card(self, card_id: bytes) -> tuple[tuple, dict] | None:
        """The card's record fields (layout.CARD order) and its profile, or None."""
        def read(txn):
            raw = txn.get(card_id, db=self.cards)
            return None if raw is None else (raw, txn.get(card_id, db=self.profiles))

        found = self._read(read)
        if found is None:
            return None
        raw, profile = found
        rec = L.CARD.unpack(raw)
        if rec[0] != L.CARD_VERSION:
            raise InvariantError(f"card record version {rec[0]} unknown")
        return rec, (json.loads(profile) if profile else {})

    def read_operation(self, request_key: bytes) -> Outcome | None:
        """The original outcome of a request_id, or None if it was never applied."""
        def read(txn):
            idem = txn.get(request_key, db=self.requests)
            if idem is None:
                return None
            return self._replay(txn, idem, L.IDEM.unpack(idem)[4])

        return self._read(read)

    def backup(self, dest_dir: str) -> None:
        """A consistent, compacted copy of the whole environment into ``dest_dir`` (a new folder).

        LMDB copies from one read transaction, so this runs while the server
        serves: the copy is the ledger as of that snapshot, and a reader never
        blocks the writer.
        """
        os.makedirs(dest_dir, exist_ok=False)
        self.env.copy(dest_dir, compact=True)

    def dump(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """Every key and value of every sub-database (tests compare copies with this)."""
        def read(txn):
            return {name: list(txn.cursor(db=db)) for name, db in
                    (("cards", self.cards), ("journal", self.journal), ("requests", self.requests),
                     ("profiles", self.profiles), ("cardnos", self.cardnos),
                     ("terminals", self.terminals), ("operators", self.operators))}

        return self._read(read)

    def map_usage(self) -> tuple[int, int]:
        """(map size, bytes in use) for monitoring."""
        info = self.env.info()
        return info["map_size"], (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def stats(self) -> dict:
        def read(txn):
            return {"cards": txn.stat(self.cards)["entries"],
                    "journal": txn.stat(self.journal)["entries"],
                    "requests": txn.stat(self.requests)["entries"],
                    "map_size": self.env.info()["map_size"]}

        return self._read(read)

    # ---- verification --------------------------------------------------------

    def verify(self, problems_max: int = 50) -> dict:
        """Check the ledger against its journal; return counts, totals and problems.

        Each entry must mean what its type says (an opening moves nothing, a
        top-up adds its amount to principal, a purchase takes gross - discount
        from principal and bonus and adds points); sequences run 1, 2, 3, ...
        with no gap; each entry's after-balances equal the running sums, which
        never go negative; every card's principal, bonus, points, lifetime paid
        and last sequence equal what its entries add up to; every applied
        request record points at the entry with its request tag, and declined
        ones at none; the totals match.
        """
        problems: list[str] = []

        def problem(msg: str) -> None:
            if len(problems) < problems_max:
                problems.append(msg)

        # card id -> principal, bonus, points, last seq, paid, PIN state (tries | flags << 8)
        sums: dict[bytes, list[int]] = {}
        totals = [0, 0, 0]
        admin = 0
        expect_seq = 1
        with self._resize_gate, self.env.begin() as txn:  # verify runs in its own process
            for key, entry in txn.cursor(db=self.journal):
                (version, op, _, _, reason, pin_tries, pin_flags, seq, cid, amount, discount, dp, db_, dpts, pa, ba,
                 ptsa, *_rest) = L.JOURNAL.unpack(entry)
                if L.SEQ_KEY.unpack(key)[0] != seq or seq != expect_seq:
                    problem(f"journal sequence {seq} where {expect_seq} was expected")
                expect_seq = seq + 1
                if version != L.JOURNAL_VERSION or reason != (
                        L.R_PIN_WRONG if op == L.OP_PIN_FAILED else L.R_OK):
                    problem(f"journal entry {seq}: version {version}, reason {reason}")
                if op >= L.OP_ADMIN_MIN:
                    admin += 1
                    if op > L.OP_DATA_KEY_ROTATED or amount or discount or dp or db_ or dpts:
                        problem(f"journal entry {seq}: an admin entry {op} that moves value")
                    continue
                s = sums.get(cid)
                if op == L.OP_OPEN:
                    if s is not None:
                        problem(f"journal entry {seq}: a second opening of the same card")
                    if amount or discount or dp or db_ or dpts:
                        problem(f"journal entry {seq}: an opening that moves value")
                    s = sums[cid] = [0, 0, 0, 0, 0, 0]
                elif s is None:
                    problem(f"journal entry {seq}: first entry of a card is not an opening")
                    s = sums[cid] = [0, 0, 0, 0, 0, 0]
                elif op == L.OP_TOP_UP:
                    if amount <= 0 or dp != amount or db_ or dpts or discount:
                        problem(f"journal entry {seq}: a top-up that does not add its amount")
                elif op == L.OP_PURCHASE:
                    paid = amount - discount
                    if (amount <= 0 or not 0 <= discount <= amount or dp > 0 or db_ > 0
                            or dp + db_ != -paid or dpts < 0):
                        problem(f"journal entry {seq}: a purchase whose debit is not gross - discount")
                    s[4] += paid
                elif op in (L.OP_SET_PIN, L.OP_RESET_PIN, L.OP_PIN_FAILED):
                    if amount or discount or dp or db_ or dpts:
                        problem(f"journal entry {seq}: a PIN entry that moves value")
                else:
                    problem(f"journal entry {seq}: unknown operation type {op}")
                s[0] += dp
                s[1] += db_
                s[2] += dpts
                s[3] = seq
                s[5] = pin_tries | pin_flags << 8
                totals[0] += dp
                totals[1] += db_
                totals[2] += dpts
                if (s[0], s[1], s[2]) != (pa, ba, ptsa):
                    problem(f"journal entry {seq}: after-balances differ from the running sums")
                if min(s[0], s[1], s[2]) < 0:
                    problem(f"journal entry {seq}: a balance below zero")
            card_totals = [0, 0, 0]
            cards = 0
            for cid, raw in txn.cursor(db=self.cards):
                cards += 1
                rec = L.CARD.unpack(raw)
                principal, bonus, points, held, lifetime, last_seq = rec[5:11]
                card_totals[0] += principal
                card_totals[1] += bonus
                card_totals[2] += points
                s = sums.pop(cid, None)
                if rec[0] != L.CARD_VERSION or min(principal, bonus, points) < 0 or held != 0:
                    problem(f"card ...{cid.hex()[:8]}: invalid record (no holds exist yet)")
                if s is None:
                    problem(f"card ...{cid.hex()[:8]}: no journal entries")
                elif (principal, bonus, points, last_seq, lifetime, rec[3] | (rec[4] & 0xFF) << 8) != tuple(s):
                    problem(f"card ...{cid.hex()[:8]}: record {principal}/{bonus}/{points}/#{last_seq}"
                            f"/paid {lifetime} but journal adds up to {s[0]}/{s[1]}/{s[2]}/#{s[3]}"
                            f"/paid {s[4]}")
            for cid in sums:
                problem(f"journal names card ...{cid.hex()[:8]} that has no record")
            requests = journaled = 0
            for key, idem in txn.cursor(db=self.requests):
                requests += 1
                _, _, reason, _, _, seq, _, _ = L.IDEM.unpack(idem)
                if reason in (L.R_OK, L.R_PIN_WRONG):  # applied, or a wrong PIN counted
                    journaled += 1
                    entry = txn.get(L.SEQ_KEY.pack(seq), db=self.journal)
                    if entry is None or entry[120:128] != request_tag(key):
                        problem(f"request record for seq {seq} does not match its journal entry")
                elif seq != 0:
                    problem(f"a declined request record points at journal entry {seq}")
            if journaled != expect_seq - 1:
                problem(f"{journaled} request records with a journal entry for {expect_seq - 1} "
                        "journal entries")
        if card_totals != totals:
            problem(f"card totals {card_totals} differ from journal totals {totals}")
        return {
            "ok": not problems,
            "cards": cards,
            "journal_entries": expect_seq - 1,
            "admin_entries": admin,
            "card_entries": expect_seq - 1 - admin,
            "requests": requests,
            "principal_minor": card_totals[0],
            "bonus_minor": card_totals[1],
            "points": card_totals[2],
            "problems": problems,
        }
