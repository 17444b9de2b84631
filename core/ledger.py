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

import json
import logging
import os
import struct
import threading
from array import array

import lmdb

from cardcore import layout as L
from cardcore.admin import OPERATOR_NEXT_ID, AdminState
from cardcore.ext import kernel
from cardcore.idempotency import InvariantError, Outcome, PendingOp, repeat, replay
from cardcore.rules import Program

log = logging.getLogger("cardcore.ledger")

MAP_SIZE_INITIAL = 1 << 30      # virtual address space; the file grows only as used
MAP_GROW_FACTOR = 2
MAP_GROW_ATTEMPTS = 8
MAX_READERS = 512
EMPTY_RECORD = bytes(L.CARD_SIZE)
# The fields of a kernel output entry the writer needs: op, reason, seq, principal and
# bonus after (layout.JOURNAL offsets 1, 4, 8, 72, 80).
ENTRY_HEAD = struct.Struct("<xBxxHxxQ56xqq")
assert ENTRY_HEAD.size == 88


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
            admin = AdminState(self, txn)
            for i, op in enumerate(ops):
                if op.ksn_counter:
                    # Before idempotency: a used KSN is refused even on an exact re-send (a
                    # terminal retries with a fresh KSN and the same request_id). Not a business
                    # outcome: no request record, so that retry can still pass.
                    reason = admin.take_ksn(op)
                    if reason != L.R_OK:
                        outcomes[i] = Outcome(reason, False, op.packed[0], None, 0)
                        continue
                idem = known.get(op.request_key)
                if not op.request_key:  # internal: no idempotency record
                    fresh.append(i)
                elif idem is not None:
                    outcomes[i] = replay(txn, self.journal, idem, op.digest)
                elif op.request_key in first_index:
                    repeats.append((i, first_index[op.request_key]))
                else:
                    first_index[op.request_key] = i
                    fresh.append(i)
            next_seq = self._next_seq
            if fresh:
                next_seq = self._apply_fresh(txn, ops, fresh, outcomes, ts_us, admin)
            admin.flush()
            for i, j in repeats:
                outcomes[i] = repeat(outcomes[j], ops[i].digest == ops[j].digest)
        self._next_seq = next_seq  # only once the commit (and its fsync) succeeded
        return outcomes  # type: ignore[return-value]

    def _apply_fresh(self, txn, ops, fresh, outcomes, ts_us, admin: AdminState) -> int:
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
                reason, entry = admin.apply(op, kind, ts_us, seq)
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
                outcomes[i] = Outcome(reason, False, kind, entry, 0, count)
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

    def landed(self, ops: list[PendingOp]) -> list[Outcome]:
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
                    landed = replay(txn, self.journal, idem, op.digest)
                    out.append(landed._replace(replayed=op.request_key in seen))
                seen.add(op.request_key)
            return out

        return self._read(read)

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
            return replay(txn, self.journal, idem, L.IDEM.unpack(idem)[4])

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
        """Check the ledger against its journal (``cardcore.verify``)."""
        from cardcore.verify import verify  # only verify's callers load it

        return verify(self, problems_max)

