"""The C codec of purchase lines (cardcore.ext.wire) against protobuf's own parser and the
service's rules for lines, written out plainly here, on any input."""
from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cardcore import layout as L
from cardcore.ext import wire
from cardcore.server.errors import Invalid
from cardcore.server.operations import basket
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import examples

R = cpb.Reason
INT64_MAX = L.INT64_MAX


def plainly(req) -> tuple[bytes, int, int] | tuple[int, str]:
    """The rules for a request's lines, one field at a time: (records, total, points offered),
    or (reason, field) of the first problem."""
    if not req.lines:
        if req.gross_amount_minor <= 0:
            return R.REASON_INVALID_AMOUNT, "gross_amount_minor"
        return b"", req.gross_amount_minor, req.redeem_points
    if len(req.lines) > L.LINES_MAX:
        return R.REASON_INVALID_ARGUMENT, "lines"
    parts, total = [], 0
    for k, line in enumerate(req.lines):
        if line.amount_minor <= 0:
            return R.REASON_INVALID_AMOUNT, f"lines[{k}].amount_minor"
        if line.category_code >= L.MAX_CATEGORIES:
            return R.REASON_UNKNOWN_CATEGORY, f"lines[{k}].category_code"
        if len(line.sku) > L.SKU_LEN_MAX:
            return R.REASON_FIELD_TOO_LONG, f"lines[{k}].sku"
        if not (line.sku.isascii() and line.sku.isprintable()):
            return R.REASON_INVALID_ARGUMENT, f"lines[{k}].sku"
        total += line.amount_minor
        parts.append(L.LINE.pack(line.category_code, 0, line.quantity, line.amount_minor, 0, 0,
                                 0, line.sku.encode("ascii")))
    if total > INT64_MAX:
        return R.REASON_INVALID_AMOUNT, "lines"
    if req.gross_amount_minor not in (0, total):
        return R.REASON_INVALID_AMOUNT, "gross_amount_minor"
    return b"".join(parts), total, req.redeem_points


def through_basket(req):
    try:
        return basket(req)
    except Invalid as exc:
        return exc.reason, exc.field


skus = st.one_of(st.just(""), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                                      max_size=26),
                 st.text(max_size=26), st.sampled_from(["SKU-1", "x" * 24, "x" * 25, "é" * 13,
                                                        "a\tb", "\x7f", "日本"]))
purchase_lines = st.builds(
    pb.PurchaseLine, category_code=st.one_of(st.integers(0, 70), st.just(2**32 - 1)),
    amount_minor=st.one_of(st.integers(1, 10**6), st.integers(-5, 0),
                           st.sampled_from([INT64_MAX, INT64_MAX // 2 + 1, -(2**63)])),
    quantity=st.one_of(st.integers(0, 5), st.just(2**32 - 1)), sku=skus)


@settings(max_examples=examples(800), deadline=None)
@given(lines=st.one_of(st.lists(purchase_lines, max_size=8),
                       st.lists(purchase_lines, min_size=99, max_size=102)),
       quote=st.booleans(), gross=st.sampled_from([0, 0, 1, 5000]),
       redeem=st.sampled_from([0, 500]))
@example(lines=[pb.PurchaseLine(amount_minor=INT64_MAX), pb.PurchaseLine(amount_minor=1)],
         quote=False, gross=0, redeem=0)
def test_lines_are_read_as_the_rules_say(lines, quote, gross, redeem):
    if quote:
        req = pb.QuoteRequest(card=cpb.CardRef(card_number="6225880000000013"), lines=lines,
                              gross_amount_minor=gross, redeem_points=redeem)
    else:
        req = pb.PurchaseRequest(request_id="r-1", card=cpb.CardRef(card_number="6225880000000013"),
                                 till=cpb.Till(store_id=3, terminal_id=4, staff_id=5), lines=lines,
                                 gross_amount_minor=gross, redeem_points=redeem, coupon_serial=7)
    assert through_basket(req) == plainly(req)


def test_unknown_fields_inside_and_around_lines_are_skipped():
    line = pb.PurchaseLine(category_code=2, amount_minor=700, quantity=3, sku="A-1").SerializeToString()
    # an unknown varint (field 9), fixed64 (10), fixed32 (11) and bytes (12) in the line, and an
    # unknown bytes field (99) in the request
    extra = b"\x48\x05" + b"\x51" + bytes(8) + b"\x5d" + bytes(4) + b"\x62\x02zz"
    raw = (b"\x3a" + bytes([len(line + extra)]) + line + extra + b"\x9a\x06\x01q")
    assert wire.lines_of(raw, 7) == (L.LINE.pack(2, 0, 3, 700, 0, 0, 0, b"A-1"), 700, wire.OK, 0)
    assert wire.lines_of(raw[:-1], 7)[2] == wire.BAD_WIRE  # cut short


def plain_results(lines: bytes) -> pb.OperationResult:
    """LineResults set field by field from the records."""
    out = pb.OperationResult()
    for code, _, quantity, amount, discount, points, redeemed, sku in L.LINE.iter_unpack(lines):
        out.lines.add(category_code=code, amount_minor=amount, discount_minor=discount,
                      redeemed_minor=redeemed, paid_minor=amount - discount - redeemed,
                      points_earned=points, quantity=quantity,
                      sku=sku.rstrip(b"\0").decode("ascii"))
    return out


records = st.builds(
    L.LINE.pack, st.integers(0, 63), st.just(0), st.one_of(st.integers(0, 9), st.just(2**32 - 1)),
    st.one_of(st.integers(1, 10**6), st.just(INT64_MAX)), st.integers(0, 10**6),
    st.one_of(st.integers(0, 10**4), st.just(INT64_MAX), st.just(-1)), st.integers(0, 10**6),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=24).map(
        lambda s: s.encode("ascii")))


@settings(max_examples=examples(500), deadline=None)
@given(lines=st.lists(records, max_size=L.LINES_MAX))
def test_line_results_parse_as_protobuf_builds_them(lines):
    packed = b"".join(lines)
    merged = pb.OperationResult()
    merged.MergeFromString(wire.line_results(packed, 23))
    assert merged == plain_results(packed)
    quote = pb.QuoteResponse()
    quote.MergeFromString(wire.line_results(packed, 13))
    assert list(quote.lines) == list(plain_results(packed).lines)


def test_a_records_buffer_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError):
        wire.line_results(bytes(L.LINE_SIZE + 1), 23)
    with pytest.raises(ValueError):
        wire.line_results(bytes(L.LINE_SIZE * (L.LINES_MAX + 1)), 23)


def test_the_codec_and_the_layout_agree_on_sizes():
    assert wire.SIZES == {"LINE_SIZE": L.LINE_SIZE, "LINES_MAX": L.LINES_MAX,
                          "MAX_CATEGORIES": L.MAX_CATEGORIES, "SKU_LEN_MAX": L.SKU_LEN_MAX}
    assert pb.PurchaseRequest.DESCRIPTOR.fields_by_name["lines"].number == 7
    assert pb.OperationResult.DESCRIPTOR.fields_by_name["lines"].number == 23
