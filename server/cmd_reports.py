"""Client commands of the daily close and reports: ``cardcore close-day`` and ``cardcore
report`` (tables for people, ``--csv`` in fen for spreadsheets)."""
from __future__ import annotations

import csv
import sys

from .cmd_client import admin_stub_of, call, request_fields
from .text import UsageError, fen, table

GRANULARITIES = {"day": 1, "month": 2, "year": 3}  # cardcore.v1.ReportGranularity
# DayFigures' scalar fields, in the proto's order: the CSV's columns (fen and counts as sent)
_SCALARS = ("entries", "principal_in_minor", "principal_out_minor", "bonus_in_minor",
            "bonus_out_minor", "points_in", "points_out", "sales_gross_minor", "discount_minor",
            "coupon_off_minor", "tender_principal_minor", "tender_bonus_minor",
            "tender_points_minor", "tender_till_minor", "points_issued", "points_redeemed",
            "points_expired", "coupons_issued", "coupons_used", "packages_sold", "packages_used",
            "refunds", "reversals", "clearing_owes_minor", "clearing_owed_minor")
_TOP_UP = 2  # OperationType TOP_UP: its amount is the top-ups' total


def date_arg(text: str) -> str:
    """A YYYY-MM-DD business day, checked here (nothing sent when wrong)."""
    from cardcore import daytotals  # (imported on use: the command line's start does not pay it)

    try:
        daytotals.day_of_date(text, "day")
    except daytotals.DayError as exc:
        raise UsageError(str(exc)) from None
    return text


def _top_ups_minor(figures) -> int:
    return next((o.amount_minor for o in figures.operations if o.operation_type == _TOP_UP), 0)


def _figure_rows(f) -> list[tuple[str, str]]:
    return [("entries", str(f.entries)),
            ("sales (gross)", fen(f.sales_gross_minor)),
            ("discounts", f"{fen(f.discount_minor)} (coupons {fen(f.coupon_off_minor)})"),
            ("tender", f"principal {fen(f.tender_principal_minor)}, bonus "
                       f"{fen(f.tender_bonus_minor)}, points {fen(f.tender_points_minor)}, till "
                       f"{fen(f.tender_till_minor)}"),
            ("top-ups", fen(_top_ups_minor(f))),
            ("principal", f"in {fen(f.principal_in_minor)}, out {fen(f.principal_out_minor)}"),
            ("bonus", f"in {fen(f.bonus_in_minor)}, out {fen(f.bonus_out_minor)}"),
            ("points", f"issued {f.points_issued}, redeemed {f.points_redeemed}, expired "
                       f"{f.points_expired}"),
            ("coupons", f"issued {f.coupons_issued}, used {f.coupons_used}"),
            ("packages", f"sold {f.packages_sold}, used {f.packages_used}"),
            ("refunds, reversals", f"{f.refunds}, {f.reversals}"),
            ("clearing", f"owes {fen(f.clearing_owes_minor)}, owed {fen(f.clearing_owed_minor)}")]


def cmd_close_day(args) -> int:
    """Close a store's business day (store manager of the store, or chain admin) and print its
    figures; a day closed before prints the same figures."""
    from cardcore.v1 import admin_service_pb2 as apb
    from cardcore.v1 import common_pb2 as cpb

    r = call(admin_stub_of(args).CloseDay, apb.CloseDayRequest(
        store_id=args.store, business_day=args.day, **request_fields(args)), args)
    rows = [("store", str(r.store_id)), ("business day", r.business_day),
            ("closed", f"journal seq {r.closed_seq} by operator {r.closed_by}"
                       f"{' (closed before)' if r.closed_before else ''}")]
    rows += _figure_rows(r.figures)
    rows += [("holds outstanding", fen(r.holds_outstanding_minor))]
    rows += [(f"  {cpb.OperationType.Name(o.operation_type)[15:].lower()}",
              f"{o.count} x, {fen(o.amount_minor)}") for o in r.figures.operations]
    rows += [(f"owes store {c.counterparty_store_id}", fen(c.owes_minor)) for c in r.clearing]
    print(table(rows))
    return 0


def print_columns(lines: list[tuple[str, ...]], left: int = 1) -> None:
    """Rows of cells in aligned columns: the first ``left`` to the left, the rest (figures) to
    the right."""
    widths = [max(len(line[k]) for line in lines) for k in range(len(lines[0]))]
    for line in lines:
        print("  ".join(c.ljust(w) if k < left else c.rjust(w)
                        for k, (c, w) in enumerate(zip(line, widths))).rstrip())


def cmd_report(args) -> int:
    """A store's or the chain's figures by day, month or year, from the server's day totals."""
    from cardcore.v1 import admin_service_pb2 as apb

    if args.by_store and args.store is not None:
        raise UsageError("--by-store lists the stores of --chain, of --region R, or alone of "
                         "your scope: not with --store")
    if sum((args.chain, args.store is not None, args.region is not None)) != 1 and not (
            args.by_store and not args.chain and args.region is None):
        raise UsageError("report needs --store S or --chain, or --region R (one of them), or "
                         "--by-store alone (every store in your scope)")
    if bool(args.last_days) == bool(args.from_day or args.to_day) or (
            not args.last_days and not (args.from_day and args.to_day)):
        raise UsageError("report needs --from and --to, or --last-days N")
    r = call(admin_stub_of(args).GetReport, apb.GetReportRequest(
        store_id=args.store or 0, chain=args.chain, region_id=args.region or 0,
        from_day=args.from_day or "", to_day=args.to_day or "",
        granularity=GRANULARITIES[args.by], staff=args.staff, by_store=args.by_store, last_days=args.last_days), args)
    if args.csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(("period", "first_day", "last_day", *_SCALARS, "top_up_minor",
                      "liability_principal_minor", "liability_bonus_minor", "days_closed",
                      "holds_outstanding_minor"))
        for row in r.rows:
            f = row.figures
            out.writerow((row.period, row.first_day, row.last_day,
                          *(getattr(f, name) for name in _SCALARS), _top_ups_minor(f),
                          row.liability_principal_minor, row.liability_bonus_minor,
                          row.days_closed, row.holds_outstanding_minor))
        if args.staff:
            out.writerow(())
            out.writerow(("staff_id", "sales", "sales_minor", "top_ups", "top_up_minor"))
            for s in r.staff:
                out.writerow((s.staff_id, s.sales, s.sales_minor, s.top_ups, s.top_up_minor))
        if args.by_store:
            out.writerow(())
            out.writerow(("store_id", "name", *_SCALARS, "top_up_minor"))
            for s in r.stores:
                out.writerow((s.store_id, s.name, *(getattr(s.figures, name) for name in _SCALARS),
                              _top_ups_minor(s.figures)))
        return 0
    head = ("period", "entries", "gross sales", "discount", "top-ups", "refunds", "pts issued",
            "pts redeemed", "pts expired", "owes", "owed")
    head += ("liability principal", "liability bonus", "holds") if args.chain else (
        "closed", "holds")
    lines = [head]
    for row in list(r.rows) + [None]:
        f = r.total if row is None else row.figures
        cells = ("total" if row is None else row.period, str(f.entries), fen(f.sales_gross_minor),
                 fen(f.discount_minor), fen(_top_ups_minor(f)), str(f.refunds),
                 str(f.points_issued), str(f.points_redeemed), str(f.points_expired),
                 fen(f.clearing_owes_minor), fen(f.clearing_owed_minor))
        if args.chain:
            cells += ("", "") if row is None else (fen(row.liability_principal_minor),
                                                   fen(row.liability_bonus_minor))
        else:
            cells += ("" if row is None else str(row.days_closed),)
        cells += ("" if row is None else fen(row.holds_outstanding_minor),)
        lines.append(cells)
    print_columns(lines)
    if args.by_store:
        print(f"\nby store, {r.from_day} to {r.to_day}"
              + (" (the first 1,000 stores only)" if r.stores_truncated else ""))
        print_columns([("store", "name", "entries", "gross sales", "discount", "top-ups",
                        "refunds")] + [
            (str(s.store_id), s.name or ("head office" if s.store_id == 0 else "-"),
             str(s.figures.entries), fen(s.figures.sales_gross_minor),
             fen(s.figures.discount_minor), fen(_top_ups_minor(s.figures)),
             str(s.figures.refunds)) for s in r.stores], left=2)
    if args.staff and not r.staff:
        print("\nno sale or top-up credited to a staff member (--staff at the till) in this period")
    elif args.staff:
        print()
        print(table([("staff", "sales; top-ups")] + [
            (str(s.staff_id), f"{s.sales} x {fen(s.sales_minor)}; {s.top_ups} x "
                              f"{fen(s.top_up_minor)}") for s in r.staff]))
    return 0
