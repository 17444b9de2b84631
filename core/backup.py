"""Restore a backup without rolling back what must never go back: terminal KSN counters,
terminal revocations, operator removals, operator ids.

A backup is the ledger as it was. Restoring it as it is would hand every
terminal its old KSN counter back, and a captured request could then be
replayed with its original bytes; a terminal revoked or an operator removed
since the backup would be trusted again. So ``restore`` carries over, from
the ledger it replaces, the highest KSN counter of every terminal, every
revocation, every operator removal and the next operator id, as journal
entries of the server itself (revocations, removals, terminals enrolled after
the backup) and compare-and-raise floors (counters), before the restored
ledger is swapped in. With no ledger to replace (the disk is gone), the
counters, revocations and removals since the backup are unknown: the restore
then refuses, unless told the ledger is lost, and then trusts nothing that
could have been revoked since: it revokes every terminal of the backup
(enrolled anew under new ids) and removes every operator (a new chain admin
token is written at the next start, as on a first one).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import lmdb

from cardcore import layout as L
from cardcore import swap
from cardcore.admin import FLOOR_OPERATOR_ID, FLOOR_TERMINAL_KSN, OPERATOR_NEXT_ID, floor_op
from cardcore.idempotency import PendingOp
from cardcore.ledger import MAX_DBS, Ledger


class RestoreError(Exception):
    """The restore cannot be done safely; nothing was changed. The message says why."""


def admin_state(path: str) -> tuple[dict[int, tuple], dict[str, dict], int]:
    """(terminals by id, operators by name, next operator id) of a ledger of any format."""
    env = lmdb.open(path, subdir=True, readonly=True, max_dbs=MAX_DBS, lock=True)
    try:
        terminals_db = env.open_db(b"terminals", create=False)
        operators_db = env.open_db(b"operators", create=False)
        with env.begin() as txn:
            terminals = {L.TERMINAL.unpack(v)[3]: L.TERMINAL.unpack(v)
                         for _, v in txn.cursor(db=terminals_db)}
            operators, next_id = {}, 1
            for k, v in txn.cursor(db=operators_db):
                if k == OPERATOR_NEXT_ID:
                    next_id = int.from_bytes(v, "little")
                else:
                    operators[k.decode()] = json.loads(v)
        return terminals, operators, next_id
    except lmdb.NotFoundError:
        return {}, {}, 1
    finally:
        env.close()


def carry_ops(old: tuple | None, restored: tuple) -> list[PendingOp]:
    """The system operations that bring the restored ledger's admin state up to the old one's
    (``old`` None, the ledger is lost: revoke every terminal and remove every operator of the
    backup instead)."""
    r_terminals, r_operators, _ = restored
    ops: list[PendingOp] = []
    if old is None:
        for tid, t in sorted(r_terminals.items()):
            if t[1] == L.TERMINAL_ACTIVE:
                ops.append(_revoke(tid))
        for name, rec in sorted(r_operators.items()):
            if not rec["removed"]:
                ops.append(_remove(name))
        return ops
    o_terminals, o_operators, o_next_id = old
    for tid, t in sorted(o_terminals.items()):
        mine = r_terminals.get(tid)
        if mine is None:  # enrolled after the backup: its id and key exist in the field
            subject = tid.to_bytes(4, "little") + t[4].to_bytes(4, "little") + t[6]
            ops.append(PendingOp.admin(b"", L.OP_TERMINAL_ENROLLED, subject, b"", 0))
        if t[5]:
            ops.append(floor_op(FLOOR_TERMINAL_KSN, tid, t[5]))
        if t[1] != L.TERMINAL_ACTIVE and (mine is None or mine[1] == L.TERMINAL_ACTIVE):
            ops.append(_revoke(tid))
    for name, rec in sorted(o_operators.items()):
        mine = r_operators.get(name)
        if rec["removed"] and mine is not None and not mine["removed"]:
            ops.append(_remove(name))
    ops.append(floor_op(FLOOR_OPERATOR_ID, 0, o_next_id))
    return ops


def _remove(name: str) -> PendingOp:
    return PendingOp.admin(b"", L.OP_OPERATOR_REMOVED, bytes(16), json.dumps({"name": name}).encode(), 0)


def _revoke(tid: int) -> PendingOp:
    return PendingOp.admin(b"", L.OP_TERMINAL_REVOKED, tid.to_bytes(4, "little") + bytes(12), b"", 0)


def restore(backup_ledger: str, dest_ledger: str, *, replace: bool, lost_ledger: bool) -> dict:
    """Put the backup at ``backup_ledger`` in place of ``dest_ledger`` (its server stopped and its
    data folder locked by the caller), carrying over what must never go back. Verified before
    it is swapped in; the replaced ledger is removed only after the swap."""
    from cardcore import migrate  # a v1 backup is upgraded on the way in

    swap.recover(dest_ledger)  # a restore or migration that stopped midway, first
    exists = os.path.exists(os.path.join(dest_ledger, "data.mdb"))
    if exists and not replace:
        raise RestoreError(f"{dest_ledger} exists: pass --force to replace it")
    old = admin_state(dest_ledger) if exists else None
    restored = admin_state(backup_ledger)
    if old is None and (restored[0] or restored[1]) and not lost_ledger:
        raise RestoreError("no ledger to replace, so the terminals' KSN counters, revocations "
                           "and operator removals since the backup are unknown: pass "
                           "--lost-ledger to revoke the backup's terminals (enroll them anew "
                           "under new ids) and remove its operators (a new chain admin token is "
                           "written at the next start)")
    work = dest_ledger.rstrip("/") + ".restoring"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shutil.copyfile(os.path.join(backup_ledger, "data.mdb"), os.path.join(work, "data.mdb"))
    if migrate.ledger_format(work) == 1:
        migrate.migrate(work)
        shutil.rmtree(work + ".v1", ignore_errors=True)
    ops = carry_ops(old, restored)
    ledger = Ledger(work)
    try:
        outcomes = ledger.apply_group(ops, time.time_ns() // 1000) if ops else []
        if any(o.reason != L.R_OK for o in outcomes):
            raise RestoreError(f"carrying the admin state over failed: {[o.reason for o in outcomes]}")
        report = ledger.verify()
    finally:
        ledger.close()
    if not report["ok"]:
        raise RestoreError("the restored ledger does not verify: " + "; ".join(report["problems"]))
    replaced = dest_ledger.rstrip("/") + ".replaced"
    shutil.rmtree(replaced, ignore_errors=True)
    swap.mark_ready(work)
    swap.swap_in(work, dest_ledger, replaced)
    shutil.rmtree(replaced, ignore_errors=True)
    report["carried"] = len(ops)
    return report
