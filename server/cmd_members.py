"""Client command of the member metrics: ``cardcore members`` (a table for people, ``--csv`` for
spreadsheets, ``--dormant-list FILE.csv``: the dormant members for a campaign, every page)."""
from __future__ import annotations

import csv
import sys

from .cmd_client import admin_stub_of, call
from .text import UsageError, fen, table

DORMANT_LIST_MAX = 1_000_000  # members one --dormant-list file holds at most
# GetMemberReportResponse's figures, in the proto's order: the CSV's columns
_FIGURES = ("members", "new_members", "activated_members", "imported_members", "active_members",
            "repeat_members", "previous_active_members", "churned_members", "activation_rate_bp",
            "repeat_rate_bp", "churn_rate_bp", "purchases", "spend_minor", "dormant_members")
_LIST_HEAD = ("card_id", "masked_number", "last_purchase_day", "third_last_purchase_day",
              "purchases", "opened_day")


def month_arg(text: str) -> str:
    """A YYYY-MM month, checked here (nothing sent when wrong)."""
    from cardcore import members  # (imported on use: the command line's start does not pay it)

    try:
        members.month_of_text(text, "month")
    except members.MonthError as exc:
        raise UsageError(str(exc)) from None
    return text


def _percent(bp: int) -> str:
    return f"{bp / 100:.2f} %"


def cmd_members(args) -> int:
    """The chain's member figures over months and the members dormant as of a day (chain
    admin); with --dormant-list, every dormant member into a CSV file, page by page."""
    from cardcore import members
    from cardcore.v1 import admin_service_pb2 as apb

    stub = admin_stub_of(args).GetMemberReport
    limit = members.DORMANT_PAGE_MAX if args.dormant_list else 0
    request = apb.GetMemberReportRequest(from_month=args.from_month, to_month=args.to_month,
                                         as_of_day=args.as_of or "", dormant_limit=limit)
    r = call(stub, request, args)
    listed = 0
    if args.dormant_list:
        try:
            f = open(args.dormant_list, "w", newline="", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {args.dormant_list}: {exc.strerror}") from None
        with f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(_LIST_HEAD)
            page = r
            while True:
                for m in page.dormant:
                    out.writerow((m.card_id.hex(), m.masked_number, m.last_purchase_day,
                                  m.third_last_purchase_day, m.purchases, m.opened_day))
                listed += len(page.dormant)
                if not page.next_page_token or listed >= DORMANT_LIST_MAX:
                    break
                request.page_token = page.next_page_token
                request.as_of_day = r.as_of_day  # every page as of the first's day
                page = call(stub, request, args)
    if args.csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(("from_month", "to_month", "previous_from_month", "previous_to_month",
                      "as_of_day", *_FIGURES))
        out.writerow((r.from_month, r.to_month, r.previous_from_month, r.previous_to_month,
                      r.as_of_day, *(getattr(r, name) for name in _FIGURES)))
        return 0
    rows = [("period", f"{r.from_month} .. {r.to_month}"),
            ("members", f"{r.members:,} (opened by the period's end)"),
            ("new", f"{r.new_members:,} (activation rate {_percent(r.activation_rate_bp)})"),
            ("activated", f"{r.activated_members:,} (a new member's first purchase, in the "
                          "period)"),
            ("imported", f"{r.imported_members:,} (from a legacy system: not new)"),
            ("active", f"{r.active_members:,} ({r.purchases:,} purchases, "
                       f"{fen(r.spend_minor)} spent)"),
            ("repeat", f"{r.repeat_members:,} (repeat rate {_percent(r.repeat_rate_bp)})"),
            ("churned", f"{r.churned_members:,} of {r.previous_active_members:,} active in "
                        f"{r.previous_from_month} .. {r.previous_to_month} (churn rate "
                        f"{_percent(r.churn_rate_bp)})"),
            ("dormant", f"{r.dormant_members:,} as of {r.as_of_day} (3+ purchases in 182 days, "
                        "none in the last 60)")]
    if args.dormant_list:
        rows.append(("dormant list", f"{listed:,} members in {args.dormant_list}"))
    print(table(rows))
    return 0
