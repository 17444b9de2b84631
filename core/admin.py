"""Admin state inside a write transaction: terminals and their DUKPT counters, operators, keys.

One ``AdminState`` per group: it reads terminal records once, lets the
group's operations change them in arrival order, and writes each changed
record once at the end (``flush``). Admin operations (op >= 16) move no
money and are journaled like card operations, with their operator's id.
"""
from __future__ import annotations

import json
import struct

from cardcore import layout as L
from cardcore.idempotency import InvariantError, PendingOp

OPERATOR_NEXT_ID = b"\x00next_id"   # operators db: the next operator id (u32 LE)
RESEAL_ITEM = struct.Struct("<16sBB")  # card_id, old length, new length; then old, new


class AdminState:
    def __init__(self, ledger, txn):
        self.ledger = ledger
        self.txn = txn
        self.terminals: dict[int, list | None] = {}
        self.dirty: set[int] = set()

    def flush(self) -> None:
        """Write the terminal records the group changed (KSN counters, enrolments, revocations)."""
        for tid in self.dirty:
            self.txn.put(L.TERMINAL_KEY.pack(tid), L.TERMINAL.pack(*self.terminals[tid]),
                         db=self.ledger.terminals)

    def terminal(self, tid: int) -> list | None:
        """The terminal record's fields (a list: the group changes them), or None."""
        terminals = self.terminals
        if tid not in terminals:
            raw = self.txn.get(L.TERMINAL_KEY.pack(tid), db=self.ledger.terminals)
            terminals[tid] = None if raw is None else list(L.TERMINAL.unpack(raw))
        return terminals[tid]

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

    def apply(self, op: PendingOp, kind: int, ts_us: int, seq: int) -> tuple[int, bytes | int | None]:
        """One admin or internal operation; returns (reason, journal entry or reseal count)."""
        operator_id = L.OP_OPERATOR_ID.unpack_from(op.packed)[0]
        subject = op.card_id
        if kind in (L.OP_TERMINAL_ENROLLED, L.OP_TERMINAL_REVOKED):
            tid = int.from_bytes(subject[:4], "little")
            t = self.terminal(tid)
            if kind == L.OP_TERMINAL_ENROLLED:
                if t is not None:
                    return L.R_TERMINAL_EXISTS, None
                store_id, ikid = int.from_bytes(subject[4:8], "little"), subject[8:16]
                self.terminals[tid] = [L.TERMINAL_VERSION, L.TERMINAL_ACTIVE, 0, tid, store_id, 0, ikid,
                                  ts_us, 0, operator_id, 0, bytes(16)]
            else:
                if t is None:
                    return L.R_TERMINAL_NOT_FOUND, None
                if t[1] != L.TERMINAL_ACTIVE:
                    return L.R_TERMINAL_REVOKED, None
                t[1], t[8], t[10] = L.TERMINAL_REVOKED, ts_us, operator_id
                subject = subject[:4] + t[4].to_bytes(4, "little") + t[6]
            self.dirty.add(tid)
        elif kind in (L.OP_OPERATOR_ADDED, L.OP_OPERATOR_REMOVED):
            record = json.loads(op.payload)
            name = record["name"].encode()
            old = self.txn.get(name, db=self.ledger.operators)
            if kind == L.OP_OPERATOR_ADDED:
                if old is not None:
                    return L.R_OPERATOR_EXISTS, None
                raw_id = self.txn.get(OPERATOR_NEXT_ID, db=self.ledger.operators)
                oid = int.from_bytes(raw_id, "little") if raw_id else 1
                self.txn.put(OPERATOR_NEXT_ID, (oid + 1).to_bytes(4, "little"), db=self.ledger.operators)
                record.update(id=oid, removed=False, created_us=ts_us, created_by=operator_id)
            else:
                if old is None or json.loads(old)["removed"]:
                    return L.R_OPERATOR_NOT_FOUND, None
                record = json.loads(old)
                record.update(removed=True, removed_us=ts_us, removed_by=operator_id)
            self.txn.put(name, json.dumps(record, sort_keys=True).encode(), db=self.ledger.operators)
            subject = record["id"].to_bytes(4, "little") + bytes([record["role"]]) + bytes(11)
        elif kind == L.OP_DATA_KEY_ROTATED:
            pass  # the keyring changed outside LMDB; the journal records who did it and when
        elif kind == L.OP_RESEAL:
            return L.R_OK, self.reseal(op.payload)
        else:
            raise InvariantError(f"unknown admin operation {kind}")
        entry = L.JOURNAL.pack(L.JOURNAL_VERSION, kind, 0, 0, 0, 0, 0, seq, subject, 0, 0, 0, 0, 0,
                               0, 0, 0, ts_us, 0, 0, 0, operator_id, op.packed[32:40])
        return L.R_OK, entry

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


def reseal_payload(items: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """(card_id, sealed as read, sealed anew) items for an OP_RESEAL operation."""
    return b"".join(RESEAL_ITEM.pack(cid, len(old), len(new)) + old + new
                    for cid, old, new in items)
