"""The daily close's and reports' answers: day totals (``cardcore.daytotals``) as protobuf."""
from __future__ import annotations

from cardcore import daytotals as D
from cardcore import layout as L
from cardcore.v1 import admin_service_pb2 as apb


def figures_pb(v: list[int]) -> apb.DayFigures:
    """A day's or a period's figures (a day totals record's values) as DayFigures."""
    counts, amounts = v[D._NF:D._NF + L.DAY_OPS], v[D._NF + L.DAY_OPS:]
    return apb.DayFigures(
        entries=v[D.F_ENTRIES],
        operations=[apb.OperationFigures(operation_type=op, count=counts[op],
                                         amount_minor=amounts[op])
                    for op in range(L.DAY_OPS) if counts[op]],
        principal_in_minor=v[D.F_P_IN], principal_out_minor=v[D.F_P_OUT],
        bonus_in_minor=v[D.F_B_IN], bonus_out_minor=v[D.F_B_OUT],
        points_in=v[D.F_PTS_IN], points_out=v[D.F_PTS_OUT],
        sales_gross_minor=v[D.F_GROSS], discount_minor=v[D.F_DISCOUNT],
        coupon_off_minor=v[D.F_COUPON_OFF],
        tender_principal_minor=v[D.F_T_PRINCIPAL], tender_bonus_minor=v[D.F_T_BONUS],
        tender_points_minor=v[D.F_T_POINTS], tender_till_minor=v[D.F_T_TILL],
        points_issued=v[D.F_ISSUED], points_redeemed=v[D.F_REDEEMED],
        points_expired=v[D.F_EXPIRED],
        coupons_issued=counts[L.OP_COUPON_ISSUE], coupons_used=v[D.F_COUPONS_USED],
        packages_sold=counts[L.OP_PACKAGE_SELL], packages_used=counts[L.OP_PACKAGE_USE],
        refunds=counts[L.OP_REFUND], reversals=counts[L.OP_REVERSAL],
        clearing_owes_minor=v[D.F_OWES], clearing_owed_minor=v[D.F_OWED])


def close_pb(store_id: int, day: int, entry: bytes,
             read: tuple[list[int], tuple | None, list, int]) -> apb.CloseDayResponse:
    """CloseDay's answer: the day's figures and clearing as stored once it is closed;
    ``closed_before`` when the close that closed it is not this request's entry."""
    values, close, rows, held = read
    operator, seq, closed_us = close if close is not None else (0, 0, 0)
    return apb.CloseDayResponse(
        store_id=store_id, business_day=D.date_of_day(day), closed_seq=seq,
        closed_at_us=closed_us, closed_by=operator,
        closed_before=seq != int.from_bytes(entry[L.JOURNAL_OFF_SEQ:L.JOURNAL_OFF_SEQ + 8],
                                            "little"),
        figures=figures_pb(values),
        clearing=[apb.ClearingLine(counterparty_store_id=other, owes_minor=amount)
                  for other, amount in rows],
        holds_outstanding_minor=held)


def report_pb(result: dict, from_day: int, to_day: int) -> apb.GetReportResponse:
    return apb.GetReportResponse(
        from_day=D.date_of_day(from_day), to_day=D.date_of_day(to_day),
        stores=[apb.StoreRangeFigures(store_id=store, name=name, figures=figures_pb(values))
                for store, name, values in result.get("stores", ())],
        stores_truncated=result.get("stores_truncated", False),
        rows=[apb.ReportRow(period=label, first_day=D.date_of_day(first),
                            last_day=D.date_of_day(last), figures=figures_pb(values),
                            liability_principal_minor=principal, liability_bonus_minor=bonus,
                            days_closed=closed, holds_outstanding_minor=held)
              for label, first, last, values, principal, bonus, closed, held in result["rows"]],
        total=figures_pb(result["total"]),
        staff=[apb.StaffFigures(staff_id=sid, sales=s[0], sales_minor=s[1], top_ups=s[2],
                                top_up_minor=s[3]) for sid, s in sorted(result["staff"].items())])
