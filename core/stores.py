"""The chain's shape: headquarters -> regions -> stores -> terminals.

Head office is store 0 and is implicit. Regions (id 1.., a name) and stores (id 1.., a name, a
region or 0 for none, and optionally a business day of their own: a UTC offset and a cutoff
hour) are kept in ``chain_regions`` and ``chain_stores`` (layout.REGION, layout.STORE), with
``chain_region_stores`` naming each region's stores. Terminals carry their store id (layout.
TERMINAL) and are counted per store from the terminals' records.

Every put goes through the writer as an admin operation (OP_REGION_PUT, OP_STORE_PUT) and is
journaled; the entry's subject holds what the day totals need (store, region, offset, cutoff),
so the journal alone rebuilds each store's business day at every entry (``cardcore.daytotals``).
Names are in the registry only.

**Business day of a store**: its own offset and cutoff when it has them (OWN_DAY), else the card
program's ``business_day_utc_offset_minutes`` and ``business_day_cutoff_hour`` of the entry's
program version, as before stores had any.
"""
from __future__ import annotations

from cardcore import layout as L

UTC_OFFSET_MIN, UTC_OFFSET_MAX = -720, 840  # -12:00 .. +14:00, minutes
CUTOFF_HOUR_MAX = 23
REGIONS_MAX = 1_000      # regions a chain holds at most
STORES_MAX = 20_000      # stores a chain holds at most: ListStores answers them all in one
# message of at most ~2.3 MB (113 bytes a store at most), under a gRPC client's default 4 MiB
U32_MAX = 0xFFFFFFFF
# The ledger's sub-databases of the chain's shape (created empty in a ledger made before them).
DB_NAMES = ("chain_regions", "chain_stores", "chain_region_stores")


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a region's or store's name (None: it is one): 1..64 bytes of UTF-8,
    no control characters, not only spaces."""
    raw = name.encode("utf-8", "surrogatepass")
    if not name.strip():
        return "empty"
    if len(raw) > L.NAME_BYTES_MAX:
        return f"more than {L.NAME_BYTES_MAX} bytes of UTF-8"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in name):
        return "a control character"
    return None


def day_problem(utc_offset_minutes: int, cutoff_hour: int) -> tuple[int, str] | None:
    """(reason, field) when a store's own business day is out of range, else None."""
    if not UTC_OFFSET_MIN <= utc_offset_minutes <= UTC_OFFSET_MAX:
        return L.R_UTC_OFFSET_INVALID, "utc_offset_minutes"
    if not 0 <= cutoff_hour <= CUTOFF_HOUR_MAX:
        return L.R_CUTOFF_HOUR_INVALID, "business_day_cutoff_hour"
    return None


# ---- journal subjects ------------------------------------------------------------------------

def region_subject(region_id: int) -> bytes:
    return L.REGION_SUBJECT.pack(region_id)


def store_subject(store_id: int, region_id: int, day: tuple[int, int] | None) -> bytes:
    """A store put's subject; ``day``: its own (utc offset minutes, cutoff hour), or None."""
    offset, cutoff = day if day is not None else (0, 0)
    return L.STORE_SUBJECT.pack(store_id, region_id, offset, cutoff,
                                L.STORE_OWN_DAY if day is not None else 0)


def subject_store(subject: bytes) -> tuple[int, int, tuple[int, int] | None]:
    """(store id, region id, own business day or None) of a store put's subject."""
    store_id, region_id, offset, cutoff, flags = L.STORE_SUBJECT.unpack(subject)
    return store_id, region_id, (offset, cutoff) if flags & L.STORE_OWN_DAY else None


# ---- records ---------------------------------------------------------------------------------

def _name_field(name: str) -> tuple[int, bytes]:
    raw = name.encode()
    assert 0 < len(raw) <= L.NAME_BYTES_MAX, "a name checked before it is stored"
    return len(raw), raw


def region_record(region_id: int, name: str, ts_us: int, operator_id: int) -> bytes:
    n, raw = _name_field(name)
    return L.REGION.pack(L.REGION_VERSION, n, 0, region_id, ts_us, operator_id, 0, raw)


def store_record(store_id: int, name: str, region_id: int, day: tuple[int, int] | None,
                 ts_us: int, operator_id: int) -> bytes:
    n, raw = _name_field(name)
    offset, cutoff = day if day is not None else (0, 0)
    return L.STORE.pack(L.STORE_VERSION, n, L.STORE_OWN_DAY if day is not None else 0, cutoff,
                        store_id, region_id, offset, ts_us, operator_id, 0, raw)


def unpack_region(raw: bytes) -> dict:
    version, n, _, region_id, updated_us, updated_by, _, name = L.REGION.unpack(raw)
    if version != L.REGION_VERSION:
        raise ValueError(f"region record version {version} unknown")
    return {"region_id": region_id, "name": name[:n].decode(), "updated_us": updated_us,
            "updated_by": updated_by}


def unpack_store(raw: bytes) -> dict:
    (version, n, flags, cutoff, store_id, region_id, offset, updated_us, updated_by, _,
     name) = L.STORE.unpack(raw)
    if version != L.STORE_VERSION:
        raise ValueError(f"store record version {version} unknown")
    return {"store_id": store_id, "name": name[:n].decode(), "region_id": region_id,
            "day": (offset, cutoff) if flags & L.STORE_OWN_DAY else None,
            "updated_us": updated_us, "updated_by": updated_by}


def store_day(raw: bytes | None) -> tuple[int, int] | None:
    """A stored store record's own business day (offset, cutoff), or None (the program's)."""
    if raw is None:
        return None
    _, _, flags, cutoff, _, _, offset = L.STORE.unpack_from(raw)[:7]
    return (offset, cutoff) if flags & L.STORE_OWN_DAY else None


# ---- reads -----------------------------------------------------------------------------------

def read_tree(txn, ledger) -> tuple[list[dict], list[dict]]:
    """(every region, every store), in id order (none in a ledger made before them)."""
    if ledger.chain_stores is None:
        return [], []
    regions = [unpack_region(v) for _, v in txn.cursor(db=ledger.chain_regions)]
    stores = [unpack_store(v) for _, v in txn.cursor(db=ledger.chain_stores)]
    return regions, stores


def read_one(txn, ledger, kind: str, ident: int) -> dict | None:
    """A region's (``kind`` "region") or a store's record, unpacked, or None."""
    db = ledger.chain_regions if kind == "region" else ledger.chain_stores
    if db is None:
        return None
    raw = txn.get(L.TERMINAL_KEY.pack(ident), db=db)
    if raw is None:
        return None
    return unpack_region(raw) if kind == "region" else unpack_store(raw)


def region_stores(txn, ledger, region_id: int) -> list[int]:
    """The stores of a region now, in id order: one range read of ``chain_region_stores``."""
    if ledger.chain_region_stores is None:
        return []
    prefix = L.TERMINAL_KEY.pack(region_id)
    out = []
    cur = txn.cursor(db=ledger.chain_region_stores)
    if cur.set_range(prefix):
        for key in cur.iternext(values=False):
            if not key.startswith(prefix):
                break
            out.append(L.REGION_STORE_KEY.unpack(key)[1])
    return out


def store_regions(txn, ledger) -> dict[int, int]:
    """store -> region, for every store in a region (the scopes' map), from the index alone."""
    if ledger.chain_region_stores is None:
        return {}
    out = {}
    for key in txn.cursor(db=ledger.chain_region_stores).iternext(values=False):
        region, store = L.REGION_STORE_KEY.unpack(key)
        out[store] = region
    return out


def check(txn, ledger) -> list[str]:
    """The registry against the journal (``cardcore verify``): the regions are the ones the
    region entries put, each store's region and business day are its last store entry's, and
    the region index names exactly the stores' regions. What is wrong, in words."""
    if ledger.chain_stores is None:
        return []
    regions: set[int] = set()
    last: dict[int, tuple[int, tuple[int, int] | None]] = {}
    for _, entry in txn.cursor(db=ledger.journal):
        if entry[1] == L.OP_REGION_PUT:
            regions.add(L.REGION_SUBJECT.unpack_from(entry, 16)[0])
        elif entry[1] == L.OP_STORE_PUT:
            store, region, day = subject_store(entry[16:32])
            last[store] = (region, day)
    problems = []
    if {L.TERMINAL_KEY.unpack(k)[0] for k in txn.cursor(db=ledger.chain_regions).iternext(
            values=False)} != regions:
        problems.append("the regions are not the ones the journal's region entries put")
    stored = {}
    for _, raw in txn.cursor(db=ledger.chain_stores):
        s = unpack_store(raw)
        stored[s["store_id"]] = (s["region_id"], s["day"])
    if stored != last:
        problems.append("the stores' regions and business days are not what the journal's "
                        "store entries set")
    index = {L.REGION_STORE_KEY.unpack(k) for k in txn.cursor(
        db=ledger.chain_region_stores).iternext(values=False)}
    if index != {(region, store) for store, (region, _) in stored.items() if region}:
        problems.append("the region index does not name exactly the stores' regions")
    return problems
