"""Upgrade a ledger of format 1 (release 1) to format 2, verified before and after.

The v1 ledger is never changed: format 2 is written into a new folder beside
it (``<ledger>.v2-migrating``), checked, made durable, and only then swapped
in (``swap``: a stop between the renames is finished or undone at the next
start); the v1 folder stays as ``<ledger>.v1`` until the operator removes it.
A migration that stops before the swap leaves the v1 ledger in place and is
simply run again.

What changes:
- journal entries grow to 256 bytes: the v1 bytes stay as they were (with
  version 2), program version 0 (unknown: release 1 read its program from a
  file, so ``verify`` does not recompute those discounts), caller kind
  "legacy", and a digest chain over the whole journal;
- request records move to the legacy namespace (release 1 had one namespace
  for every caller) and into the pruning index by the time they were applied;
  while any remain, a request is also looked up by its request_id alone, so a
  retry that crosses the upgrade is answered as before, never applied twice;
- operators get their id index, the tiers their card counts;
- the program the server runs (``--program``, or the default) is stored as
  version 1, journaled after the migrated entries.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import lmdb

from cardcore import layout as L
from cardcore import swap
from cardcore.admin import (META_CLOCK, META_FORMAT, META_PRUNED_THROUGH, META_TIER_CARDS,
                            META_WINDOW, OPERATOR_NEXT_ID, TIER_CARDS, U32, I64)
from cardcore.chain import GENESIS, chain
from cardcore.idempotency import REQUEST_WINDOW_S_DEFAULT, pack_request_keys, record
from cardcore.ledger import ADDED_DB_NAMES, DB_NAMES, MAX_DBS, Ledger, LedgerFormatError

log = logging.getLogger("cardcore.migrate")

CHUNK = 10_000            # records per write transaction while copying
V1_DBS = ("cards", "journal", "requests", "profiles", "cardnos", "terminals", "operators")


class MigrationError(Exception):
    """The v1 ledger does not verify, or the result does not: nothing was swapped."""


def ledger_format(path: str) -> int:
    """1 or 2 for a ledger folder; 0 when there is none."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return 0
    try:
        Ledger(path, readonly=True).close()
    except LedgerFormatError as exc:
        if "format 1" in str(exc):
            return 1
        raise
    return 2


def migrate(path: str, program_source: str | None = None) -> dict:
    """Upgrade the v1 ledger at ``path`` in place (see the module docstring); return a report."""
    started = time.monotonic()
    src = lmdb.open(path, subdir=True, readonly=True, max_dbs=MAX_DBS, lock=True)
    try:
        before = check_v1(src)
        if before["problems"]:
            raise MigrationError("the v1 ledger does not verify: " + "; ".join(before["problems"]))
        work = path.rstrip("/") + ".v2-migrating"
        shutil.rmtree(work, ignore_errors=True)
        _copy(src, work)
    finally:
        src.close()
    ledger = Ledger(work, initial_program=program_source)  # stores and journals the program
    try:
        after = ledger.verify()
    finally:
        ledger.close()
    if not after["ok"]:
        raise MigrationError("the migrated ledger does not verify: " + "; ".join(after["problems"]))
    if (after["cards"], after["principal_minor"], after["bonus_minor"], after["points"],
            after["journal_entries"] - 1, after["requests"]) != (
            before["cards"], before["principal_minor"], before["bonus_minor"], before["points"],
            before["journal_entries"], before["requests"]):
        raise MigrationError(f"the migrated ledger does not hold what the v1 ledger held: "
                             f"{before} -> {after}")
    kept = path.rstrip("/") + ".v1"
    if os.path.exists(kept):
        kept += time.strftime("-%Y%m%d-%H%M%S")
    swap.mark_ready(work)
    swap.swap_in(work, path, kept)
    report = {"from_format": 1, "to_format": 2, "v1_kept_at": kept, "before": before,
              "after": after, "seconds": round(time.monotonic() - started, 3)}
    log.warning("ledger %s migrated from format 1 to 2 (%d journal entries, %d request records, "
                "%.1f s); the v1 ledger is kept at %s", path, before["journal_entries"],
                before["requests"], report["seconds"], kept)
    return report


def check_v1(env) -> dict:
    """Release 1's own checks on its layouts: sequences without gaps, after-balances equal to
    the running sums, cards equal to their entries, request records pointing at their
    entries."""
    problems: list[str] = []
    sums: dict[bytes, list[int]] = {}
    dbs = {name: env.open_db(name.encode(), create=False) for name in V1_DBS}
    with env.begin() as txn:
        entries = 0
        for key, raw in txn.cursor(db=dbs["journal"]):
            f = L.JOURNAL_V1.unpack(raw)
            seq, op, cid = f[7], f[1], f[8]
            entries += 1
            if f[0] != 1 or seq != entries or L.SEQ_KEY.unpack(key)[0] != seq:
                problems.append(f"journal entry {seq}: version {f[0]} or sequence out of order")
            if op >= L.OP_ADMIN_MIN:
                continue
            s = sums.setdefault(cid, [0, 0, 0, 0])
            s[0] += f[11]
            s[1] += f[12]
            s[2] += f[13]
            s[3] = seq
            if (s[0], s[1], s[2]) != (f[14], f[15], f[16]):
                problems.append(f"journal entry {seq}: after-balances differ from the running sums")
        totals = [0, 0, 0]
        cards = 0
        for cid, raw in txn.cursor(db=dbs["cards"]):
            rec = L.CARD.unpack(raw)
            cards += 1
            totals[0] += rec[5]
            totals[1] += rec[6]
            totals[2] += rec[7]
            if [rec[5], rec[6], rec[7], rec[10]] != sums.pop(cid, None):
                problems.append(f"card ...{cid.hex()[:8]}: record differs from its journal")
        if sums:
            problems.append(f"{len(sums)} cards in the journal have no record")
        requests = 0
        for key, raw in txn.cursor(db=dbs["requests"]):
            requests += 1
            _, _, reason, _, _, seq, _, _ = L.IDEM_V1.unpack(raw)
            if reason in (L.R_OK, L.R_PIN_WRONG):
                entry = txn.get(L.SEQ_KEY.pack(seq), db=dbs["journal"])
                if entry is None or entry[120:128] != hashlib.blake2b(key, digest_size=8).digest():
                    problems.append(f"request record for seq {seq} does not match its entry")
    return {"problems": problems[:50], "cards": cards, "journal_entries": entries,
            "requests": requests, "principal_minor": totals[0], "bonus_minor": totals[1],
            "points": totals[2]}


def _copy(src, work: str) -> None:
    """Write format 2 into ``work``: copied records, converted journal and requests, indexes.
    Without sync while it copies; one sync at the end, before anything is swapped."""
    dst = lmdb.open(work, subdir=True, map_size=max(1 << 30, 4 * src.info()["map_size"]),
                    max_dbs=MAX_DBS, sync=False, metasync=False, writemap=False, lock=True)
    try:
        sdb = {name: src.open_db(name.encode(), create=False) for name in V1_DBS}
        # the card programs' sub-databases are left to the first open, which fills them
        ddb = {name: dst.open_db(name.encode(), create=True) for name in DB_NAMES
               if name not in ADDED_DB_NAMES}
        with dst.begin(write=True) as txn:
            txn.put(META_FORMAT, U32.pack(L.LEDGER_FORMAT), db=ddb["meta"])
            txn.put(META_PRUNED_THROUGH, I64.pack(0), db=ddb["meta"])
        for name in ("cards", "profiles", "cardnos", "terminals", "operators"):
            _copy_db(src, sdb[name], dst, ddb[name])
        with src.begin() as rtxn, dst.begin(write=True) as txn:
            tiers = [0] * L.MAX_TIERS
            for _, raw in rtxn.cursor(db=sdb["cards"]):
                tiers[raw[2]] += 1
            txn.put(META_TIER_CARDS, TIER_CARDS.pack(*tiers), db=ddb["meta"])
            for name, raw in rtxn.cursor(db=sdb["operators"]):
                if name != OPERATOR_NEXT_ID:
                    txn.put(L.TERMINAL_KEY.pack(json.loads(raw)["id"]), name, db=ddb["operator_ids"])
        now_us = time.time_ns() // 1000
        _convert_journal(src, sdb["journal"], dst, ddb["journal"])
        clock_us = _convert_requests(src, sdb["requests"], dst, ddb["requests"],
                                     ddb["request_times"], now_us)
        with dst.begin(write=True) as txn:
            txn.put(META_CLOCK, I64.pack(clock_us), db=ddb["meta"])
            txn.put(META_WINDOW, U32.pack(REQUEST_WINDOW_S_DEFAULT), db=ddb["meta"])
        dst.sync(True)
    finally:
        dst.close()


def _copy_db(src, sdb, dst, ddb) -> None:
    with src.begin() as rtxn:
        batch = []
        for item in rtxn.cursor(db=sdb):
            batch.append(item)
            if len(batch) >= CHUNK:
                _put(dst, ddb, batch)
                batch = []
        _put(dst, ddb, batch)


def _put(dst, ddb, items, append: bool = False) -> None:
    if items:
        with dst.begin(write=True) as txn:
            added, _ = txn.cursor(db=ddb).putmulti(items, append=append)
            assert added == len(items)


def _convert_journal(src, sdb, dst, ddb) -> None:
    prev = GENESIS
    with src.begin() as rtxn:
        batch: list[tuple[bytes, bytes]] = []
        for key, raw in rtxn.cursor(db=sdb):
            batch.append((key, raw))
            if len(batch) >= CHUNK:
                prev = _journal_chunk(dst, ddb, batch, prev)
                batch = []
        _journal_chunk(dst, ddb, batch, prev)


def _journal_chunk(dst, ddb, batch, prev: bytes) -> bytes:
    if not batch:
        return prev
    tail = L.JOURNAL_TAIL.pack(0, L.CALLER_LEGACY, 0, 0, 0, 0, 0)[L.JOURNAL_V1.size:]
    pad = bytes(L.JOURNAL_SIZE - L.JOURNAL_V1.size - len(tail))
    buf = bytearray(b"".join(b"\x02" + raw[1:] + tail + pad for _, raw in batch))
    prev = chain(buf, prev, L.JOURNAL_SIZE, L.JOURNAL_DIGEST_OFFSET)
    size = L.JOURNAL_SIZE
    _put(dst, ddb, [(key, bytes(buf[k * size:(k + 1) * size])) for k, (key, _) in enumerate(batch)],
         append=True)
    return prev


def _convert_requests(src, sdb, dst, ddb, dtimes, now_us: int) -> int:
    """Each v1 record under the legacy namespace. Release 1 kept no client time and a retry that
    crosses the upgrade carries a new one: the records are kept a whole window from the upgrade
    (their client time is the upgrade's), so every request in flight then is recognised."""
    head = L.REQUEST_KEY_HEAD.pack(L.CALLER_LEGACY, 0)
    with src.begin() as rtxn:
        items = []
        for key, raw in rtxn.cursor(db=sdb):
            _, op, reason, _, digest, seq, available, ts_us = L.IDEM_V1.unpack(raw)
            items.append((head + key, record(op, reason, digest, seq, available, ts_us, now_us)))
    for k, start in enumerate(range(0, len(items), CHUNK)):  # one index value per chunk
        chunk = items[start:start + CHUNK]
        _put(dst, ddb, chunk)
        _put(dst, dtimes, [(L.REQUEST_TIME_KEY.pack(now_us + k),
                            pack_request_keys([key for key, _ in chunk]))], append=True)
    return now_us + len(items) // CHUNK + 1

