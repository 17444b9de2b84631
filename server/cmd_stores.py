"""Client commands of the chain's shape: ``cardcore region put`` and ``cardcore store put/list``
(chain admin to put; store manager or above to list what is in scope)."""
from __future__ import annotations

from cardcore import layout as L
from cardcore import stores as chain

from .cmd_client import admin_stub_of, call, request_fields
from .text import UsageError


def _name(text: str) -> str:
    """A region's or store's name, checked here as the server checks it (nothing sent)."""
    problem = chain.name_problem(text)
    if problem is not None:
        raise UsageError(f"--name: {problem} (1 to {L.NAME_BYTES_MAX} bytes of UTF-8)")
    return text


def _clock(minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _print_store(s, indent: str = "") -> None:
    day = (f"{_clock(s.utc_offset_minutes)}, day from {s.business_day_cutoff_hour:02d}:00"
           + ("" if s.own_business_day else " (the program's)"))
    print(f"{indent}store {s.store_id}  {s.name}  region {s.region_id}  {day}  "
          f"terminals {s.terminals}")


def cmd_region(args) -> int:
    from cardcore.v1 import admin_service_pb2 as apb

    r = call(admin_stub_of(args).PutRegion, apb.PutRegionRequest(
        region_id=args.region_id, name=_name(args.name), **request_fields(args)), args).region
    print(f"region {r.region_id}  {r.name}")
    return 0


def cmd_store(args) -> int:
    from cardcore.v1 import admin_service_pb2 as apb

    stub = admin_stub_of(args)
    if args.action == "list":
        if args.store_id or args.name is not None or args.region or args.utc_offset_minutes \
                is not None or args.cutoff_hour is not None:
            raise UsageError("store list takes no store id, --name, --region or business day")
        tree = call(stub.ListStores, apb.ListStoresRequest(), args)
        for r in tree.regions:
            print(f"region {r.region.region_id}  {r.region.name}")
            for s in r.stores:
                _print_store(s, "  ")
        if tree.head_office_stores:
            print("head office (no region)")
            for s in tree.head_office_stores:
                _print_store(s, "  ")
        return 0
    if not args.store_id:
        raise UsageError("store put needs the store's id (1..4294967295)")
    if args.name is None:
        raise UsageError("store put needs --name")
    if (args.utc_offset_minutes is None) != (args.cutoff_hour is None):
        raise UsageError("give --utc-offset-minutes and --cutoff-hour together (or neither: the "
                         "card program's business day)")
    day = {}
    if args.utc_offset_minutes is not None:
        day = {"utc_offset_minutes": args.utc_offset_minutes,
               "business_day_cutoff_hour": args.cutoff_hour}
    _print_store(call(stub.PutStore, apb.PutStoreRequest(
        store_id=args.store_id, name=_name(args.name), region_id=args.region, **day,
        **request_fields(args)), args).store)
    return 0
