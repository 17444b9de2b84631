"""GetMemberReport's input and answer: the member metrics (``cardcore.members``) as protobuf.

Chain admin only: a store manager's members would need the metrics kept per store of opening
(another index on every purchase), and marketing's campaigns are the chain's."""
from __future__ import annotations

import time

from cardcore import daytotals
from cardcore import members as M
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import common_pb2 as cpb

from .errors import Invalid

R = cpb.Reason
PAGE_TOKEN_SIZE = M.LAST_KEY.size


def parsed(request, program) -> tuple[int, int, int, int, bytes]:
    """(from month, to month, as-of day, limit, resume point) of a request; Invalid when one is
    not valid. An empty as_of_day is today's business day on the current program's clock."""
    try:
        first = M.month_of_text(request.from_month, "from_month")
        last = M.month_of_text(request.to_month, "to_month")
    except M.MonthError as exc:
        raise Invalid(R.REASON_MEMBER_RANGE_INVALID, exc.field) from None
    if not 0 <= last - first < M.REPORT_MONTHS_MAX:
        raise Invalid(R.REASON_MEMBER_RANGE_INVALID, "to_month")
    if request.as_of_day:
        try:
            as_of = daytotals.day_of_date(request.as_of_day, "as_of_day")
        except daytotals.DayError as exc:
            raise Invalid(R.REASON_MEMBER_RANGE_INVALID, exc.field) from None
    else:
        as_of = daytotals.business_day(time.time_ns() // 1000, *program.business_day_of(None))
    if request.dormant_limit > M.DORMANT_PAGE_MAX:
        raise Invalid(R.REASON_MEMBER_PAGE_INVALID, "dormant_limit")
    token = bytes(request.page_token)
    if token and len(token) != PAGE_TOKEN_SIZE:
        raise Invalid(R.REASON_MEMBER_PAGE_INVALID, "page_token")
    return first, last, as_of, request.dormant_limit, token


def member_report_pb(figures: dict, dormant: dict, as_of: int) -> apb.GetMemberReportResponse:
    text = daytotals.date_of_day
    return apb.GetMemberReportResponse(
        from_month=M.month_text(figures["from_month"]), to_month=M.month_text(figures["to_month"]),
        previous_from_month=M.month_text(figures["previous_from_month"]),
        previous_to_month=M.month_text(max(figures["previous_to_month"], 0)),
        members=figures["members"], new_members=figures["new"],
        activated_members=figures["activated"], imported_members=figures["imported"],
        active_members=figures["active"],
        repeat_members=figures["repeat"], previous_active_members=figures["previous_active"],
        churned_members=figures["churned"], activation_rate_bp=figures["activation_rate_bp"],
        repeat_rate_bp=figures["repeat_rate_bp"], churn_rate_bp=figures["churn_rate_bp"],
        purchases=figures["purchases"], spend_minor=figures["spend_minor"],
        as_of_day=text(as_of), dormant_members=dormant["count"],
        dormant=[apb.DormantMember(card_id=card, masked_number=masked,
                                   last_purchase_day=text(last_day),
                                   third_last_purchase_day=text(third), purchases=purchases,
                                   opened_day=text(opened))
                 for card, masked, last_day, third, purchases, opened in dormant["rows"]],
        next_page_token=dormant["next"])
