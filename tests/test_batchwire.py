"""SubmitBatch's C glue (cardcore.ext.batchwire) against the Python path it stands in for, on
any input: the operations it builds are the ones ``Operations.operation`` builds, field for
field, and what it leaves to that path includes every operation that path refuses; the results
it writes are ``result_of``'s bytes; and the whole call through a real server."""
from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cardcore import groups
from cardcore import layout as L
from cardcore.ext import batchwire
from cardcore.idempotency import OP_FIELD_AT, Outcome, PendingOp
from cardcore.keyring import Keyring
from cardcore.ledger import Ledger
from cardcore.server.access import ROLE, Access, Caller, Operator
from cardcore.server.operations import Operations
from cardcore.server import service, writer_proc
from cardcore.server.service import result_of
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb

from conftest import EXAMPLES, Client, examples, new_card_number, rid, sent_at
from test_service_programs import issue, purchase as programs_purchase

R = cpb.Reason
SETTINGS = settings(max_examples=examples(300), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(st.binary(max_size=400), st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_blake2b_is_hashlibs(data, size):
    assert batchwire.blake2b(data, size) == hashlib.blake2b(data, digest_size=size).digest()


def test_constants_are_the_layouts_and_the_contracts():
    fields = {"AT_OP": "op", "AT_PIN_FLAGS": "pin_flags", "AT_CALLER_KIND": "caller_kind",
              "AT_AMOUNT": "amount_minor", "AT_STORE": "store_id", "AT_TERMINAL": "terminal_id",
              "AT_STAFF": "staff_id", "AT_OPERATOR": "operator_id", "AT_TAG": "request_tag",
              "AT_CARD_ID": "card_id", "AT_CLIENT_TIME": "client_time_us",
              "AT_CALLER_ID": "caller_id", "AT_REF_ID": "ref_id", "AT_LINE_COUNT": "line_count",
              "AT_REDEEM_POINTS": "redeem_points"}
    assert {k: v for k, v in batchwire.SIZES.items() if k.startswith("AT_")} == \
        {name: OP_FIELD_AT[field][0] for name, field in fields.items()}
    assert batchwire.SIZES["OP_SIZE"] == L.OP_SIZE
    from cardcore.idempotency import _PURCHASE_EXTRA
    assert batchwire.SIZES["EXTRA_HEAD"] == _PURCHASE_EXTRA.size  # the digest's purchase_extra
    assert batchwire.SIZES["CARD_ID_SIZE"] == L.CARD_ID_SIZE
    assert batchwire.SIZES["REQUEST_TAG_SIZE"] == L.REQUEST_TAG_SIZE
    for name, number in batchwire.FIELDS.items():
        message, field = name.split(".")
        module = cpb if message == "CardRef" else pb
        assert getattr(module, message).DESCRIPTOR.fields_by_name[field].number == number, name
    # the journal fields the results read, against the service's own reads of them
    # (each byte of this entry is its offset, so a field read gives its offset in its low byte)
    entry = bytes(range(224))
    offsets = [v & 0xFF for v in service._REPLY_FIELDS.unpack_from(entry)
               + service._REPLY_PROGRAM.unpack_from(entry)]
    names = ["J_OP", "J_TIER", "J_SEQ", "J_AMOUNT", "J_DISCOUNT", "J_PRINCIPAL_DELTA",
             "J_BONUS_DELTA", "J_POINTS_DELTA", "J_PRINCIPAL_AFTER", "J_BONUS_AFTER",
             "J_POINTS_AFTER", "J_TS", "J_PROGRAM_VERSION", None, None, "J_POINTS_TAKEN",
             "J_REDEEMED", "J_TIER_AFTER", "J_PROMOTION", "J_FLAGS"]
    assert {name: at for name, at in zip(names, offsets, strict=True) if name} == \
        {k: v for k, v in batchwire.JOURNAL_AT.items()
         if k not in ("J_LINK_SEQ", "J_COUPON_SERIAL", "J_COUPON_OFF")}
    hop = batchwire.HOP
    assert (hop["GROUP_HEAD_SIZE"], hop["OP_HEAD_SIZE"], hop["NONE_LEN"]) == (
        groups.GROUP_HEAD.size, groups.OP_HEAD.size, groups.NONE_LEN)
    assert (hop["ANSWER_SIZE"], hop["ENTRY_HEAD"]) == (writer_proc.ANSWER.size,
                                                      writer_proc.ENTRY_HEAD_SIZE)
    assert hop["ENTRY_LINE_COUNT"] & 0xFF == L.JOURNAL_PROGRAM.unpack_from(
        entry, L.JOURNAL_OFF_PROGRAM)[3] & 0xFF
    assert hop["ENTRY_CARD"] == 16 and entry[16:32] == L.JOURNAL.unpack_from(bytes(range(256)))[8][:16]
    assert batchwire.JOURNAL_AT["J_LINK_SEQ"] == L.JOURNAL_TAIL.unpack_from(entry)[3] & 0xFF  # the hold closed
    coupon_serial = L.JOURNAL_TAIL.unpack_from(entry)[4]  # a purchase's coupon used
    assert batchwire.JOURNAL_AT["J_COUPON_SERIAL"] == coupon_serial & 0xFF
    assert batchwire.JOURNAL_AT["J_COUPON_OFF"] == L.JOURNAL_OFF_COUPON
    assert batchwire.RESULT_FIELDS == {"OperationResult.lines": service._RESULT_LINES}


# ---- building operations --------------------------------------------------------------------

@pytest.fixture(scope="module")
def builders(tmp_path_factory):
    """Operations of an --insecure server and of a TLS one, over a real ledger and keyring."""
    folder = str(tmp_path_factory.mktemp("batchwire"))
    ledger = Ledger(os.path.join(folder, "ledger"))
    keyring = Keyring.load_or_create(os.path.join(folder, "keyring.json"), folder)
    out = {}
    for tls in (False, True):
        access = Access(ledger, keyring.bdk, keyring.bdk_id, tls=tls)
        out[tls] = Operations(ledger, keyring, access)
    yield out
    ledger.close()


CHAIN_ADMIN = Operator(7, "admin", ROLE.OPERATOR_ROLE_CHAIN_ADMIN, frozenset())
CASHIER_ANYWHERE = Operator(8, "till", ROLE.OPERATOR_ROLE_CASHIER, frozenset())
STORE_MANAGER = Operator(9, "store 1", ROLE.OPERATOR_ROLE_STORE_MANAGER, frozenset({1}))
CALLERS = {  # (server is TLS, caller)
    "development": (False, Caller(None, False, None, False, "")),
    "chain admin": (False, Caller(None, False, CHAIN_ADMIN, False, "d1")),
    "cashier over TLS": (True, Caller(None, False, CASHIER_ANYWHERE, False, "d2")),
    "store manager": (False, Caller(None, False, STORE_MANAGER, False, "d3")),
    "bad token": (False, Caller(None, False, None, True, "d4")),
    "terminal certificate": (True, Caller(5, True, None, False, "")),
    "no operator over TLS": (True, Caller(None, False, None, False, "")),
}

_rng = random.Random(12)
GOOD_NUMBERS = [new_card_number(_rng) for _ in range(4)]
request_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True),
    st.sampled_from(["", "x" * 64, "x" * 65, "a b", "é", "r/1", "r\n"]),
    st.text(max_size=70))
good_request_ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,64}", fullmatch=True)
numbers = st.one_of(
    st.sampled_from(GOOD_NUMBERS),
    st.sampled_from(["", "1234567", "12345678", "4" * 19, "4" * 20, "6225 8800", "٦٢٢٥٨٨٠٠٠٠٠",
                     GOOD_NUMBERS[0][:-1] + str((int(GOOD_NUMBERS[0][-1]) + 1) % 10)]),
    st.text("0123456789", min_size=6, max_size=21))
amounts = st.one_of(st.integers(1, 10**7), st.sampled_from([0, -1, L.INT64_MAX, -L.INT64_MAX - 1]))
times = st.one_of(st.integers(1, 2**62), st.sampled_from([0, -1, L.INT64_MAX]))
u32 = st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))


skus = st.one_of(st.from_regex(r"[ -~]{0,24}", fullmatch=True),
                st.sampled_from(["", "x" * 24, "x" * 25, "é", "é" * 24, "a\x00b", "a\tb"]),
                st.text(max_size=26))
line_amounts = st.one_of(st.integers(1, 10**6), st.sampled_from([0, -1, L.INT64_MAX]))
purchase_lines = st.builds(
    lambda c, a, q, s: pb.PurchaseLine(category_code=c, amount_minor=a, quantity=q, sku=s),
    st.one_of(st.integers(0, 63), st.sampled_from([64, 2**32 - 1])), line_amounts, u32, skus)
good_lines = st.builds(
    lambda c, a, q, s: pb.PurchaseLine(category_code=c, amount_minor=a, quantity=q, sku=s),
    st.integers(0, 63), st.integers(1, 10**6), u32, st.from_regex(r"[ -~]{0,24}", fullmatch=True))
GOOD_LINE = pb.PurchaseLine(category_code=3, amount_minor=250, quantity=2, sku="SKU-1")


@st.composite
def purchases(draw):
    """A purchase request, any value valid or not (half of them valid but for what a draw
    changes): plain; a basket (lines, points offered, a coupon, its gross 0, its lines' total or
    another); or either with what the C path leaves to the Python path (a PIN block, partial
    payment, a basket id, another kind of card)."""
    valid = draw(st.booleans())
    req = pb.PurchaseRequest()
    if not valid or draw(st.integers(0, 9)):
        req.request_id = draw(good_request_ids if valid else request_ids)
    card = "number" if valid else draw(
        st.sampled_from(["number", "number", "number", "none", "empty", "secure", "id"]))
    if card == "number":
        req.card.card_number = draw(st.sampled_from(GOOD_NUMBERS) if valid else numbers)
    elif card == "empty":
        req.card.SetInParent()
    elif card == "secure":
        req.card.secure.ksn = draw(st.binary(max_size=12))
    elif card == "id":
        req.card.card_id = draw(st.binary(min_size=16, max_size=16))
    if not valid or draw(st.integers(0, 9)):
        req.gross_amount_minor = draw(st.integers(1, 10**7) if valid else amounts)
    if draw(st.booleans()):
        req.till.store_id, req.till.terminal_id, req.till.staff_id = draw(u32), draw(u32), draw(u32)
    if not valid or draw(st.integers(0, 9)):
        req.client_time_us = draw(st.integers(1, 2**62) if valid else times)
    if draw(st.booleans()):  # a basket
        many = draw(st.sampled_from([None] * 12 + [99, 100, 101]))
        if many:
            lines = [GOOD_LINE] * many
        else:
            lines = draw(st.lists(good_lines if valid and draw(st.integers(0, 3))
                                  else purchase_lines, max_size=6))
        req.lines.extend(lines)
        total = sum(line.amount_minor for line in lines)
        gross = draw(st.sampled_from(["zero", "zero", "total", "as drawn"]))
        if gross == "zero":
            req.gross_amount_minor = 0
        elif gross == "total" and -2**63 <= total < 2**63:
            req.gross_amount_minor = total
        if draw(st.booleans()):
            req.redeem_points = draw(st.integers(0, 10**4) if valid else st.one_of(
                st.integers(-5, 10**4), st.sampled_from([L.INT64_MAX, -L.INT64_MAX - 1])))
        if draw(st.booleans()):
            req.coupon_serial = draw(st.one_of(st.integers(1, 100), st.integers(1, 2**64 - 1)))
    extra = draw(st.sampled_from(["none"] * 9 + ["pin", "partial", "basket"]))
    if extra == "pin":
        req.pin_block = draw(st.binary(min_size=1, max_size=16))
    elif extra == "partial":
        req.allow_partial = True
    elif extra == "basket":
        req.basket_id = draw(request_ids)
    return req


operations = st.one_of(
    purchases().map(lambda req: pb.Operation(purchase=req)),
    purchases().map(lambda req: pb.Operation(top_up=pb.TopUpRequest(
        request_id=req.request_id, card=req.card, amount_minor=req.gross_amount_minor,
        till=req.till, client_time_us=req.client_time_us, pin_block=req.pin_block))),
    st.just(pb.Operation()))


def c_path_fields_only(op: pb.Operation) -> bool:
    """A purchase or top-up setting nothing but what the C path takes (a plain one's fields; a
    purchase's lines, points offered and coupon too), its card by number."""
    kind = op.WhichOneof("op")
    if kind == "top_up":
        return op.top_up.card.WhichOneof("ref") == "card_number" and not op.top_up.pin_block
    if kind != "purchase":
        return False
    req = op.purchase
    return (req.card.WhichOneof("ref") == "card_number" and not req.pin_block
            and not req.allow_partial and not req.basket_id)


@SETTINGS
@given(st.lists(operations, max_size=12), st.sampled_from(sorted(CALLERS)))
@example([pb.Operation(purchase=pb.PurchaseRequest(
    request_id="r-1", card=cpb.CardRef(card_number=GOOD_NUMBERS[0]), gross_amount_minor=100,
    till=cpb.Till(store_id=1, terminal_id=2, staff_id=3), client_time_us=1))], "development")
@example([pb.Operation(purchase=pb.PurchaseRequest(  # bench/programs.py's basket
    request_id="r-2", card=cpb.CardRef(card_number=GOOD_NUMBERS[1]),
    lines=[pb.PurchaseLine(category_code=c, amount_minor=100 * c + 7, quantity=1,
                           sku=f"SKU-{c}") for c in (1, 2, 1, 2, 3)],
    redeem_points=500, coupon_serial=77, till=cpb.Till(store_id=4, terminal_id=5),
    client_time_us=1))], "chain admin")
def test_built_operations_are_the_python_paths(builders, ops, caller_name):
    tls, caller = CALLERS[caller_name]
    builder = builders[tls]
    batch = pb.SubmitBatchRequest(operations=ops)
    plain = builder.money_ops(batch.SerializeToString(), caller)
    if plain is None:  # a caller the C path does not build for: all through the Python path
        assert (caller.bad_token or caller.cert_terminal_id is not None
                or (caller.operator is None and tls) or caller.operator is STORE_MANAGER)
        return
    built, rids, count = plain
    assert len(built) == len(rids) == len(ops)
    assert count == sum(op is not None for op in built)
    for k, op in enumerate(ops):
        request_id, op_type, reference = builder.operation(op, caller)
        if built[k] is None:
            # left to the Python path: never one it would accept with only the C path's fields
            assert not (isinstance(reference, PendingOp) and c_path_fields_only(op)), k
            continue
        assert isinstance(reference, PendingOp), (k, reference)  # not refused by the reference
        assert built[k] == reference, k
        assert rids[k] == request_id and op_type == built[k].packed[0] in (L.OP_PURCHASE,
                                                                          L.OP_TOP_UP)


def test_unknown_fields_of_the_batch_are_stepped_over(builders):
    """Fields the batch does not know (a newer contract's, or a known one sent with another wire
    type) are kept by protobuf and passed over here; one it cannot step over (a group) sends
    the whole batch to the Python path."""
    caller = CALLERS["development"][1]
    op = pb.Operation(purchase=pb.PurchaseRequest(
        request_id="u-1", card=cpb.CardRef(card_number=GOOD_NUMBERS[1]), gross_amount_minor=5,
        client_time_us=7))
    one = pb.SubmitBatchRequest(operations=[op]).SerializeToString()
    reference = builders[False].operation(op, caller)[2]
    for unknown in (b"\x08\x01", b"\x11" + bytes(8), b"\x15" + bytes(4), b"\x9a\x01\x02ab"):
        batch = pb.SubmitBatchRequest.FromString(unknown + one + unknown).SerializeToString()
        built, _, count = builders[False].money_ops(batch, caller)
        assert count == 1 and built == [reference], unknown
    with_group = pb.SubmitBatchRequest.FromString(one + b"\x1b\x08\x01\x1c").SerializeToString()
    assert builders[False].money_ops(with_group, caller) is None


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


unknown_batch_fields = st.lists(st.one_of(  # after the operations, as protobuf writes them
    st.tuples(st.integers(2, 40), st.integers(0, 2**64 - 1)).map(
        lambda t: _varint(t[0] << 3) + _varint(t[1])),
    st.tuples(st.integers(2, 40), st.binary(min_size=8, max_size=8)).map(
        lambda t: _varint(t[0] << 3 | 1) + t[1]),
    st.tuples(st.integers(2, 40), st.binary(max_size=20)).map(
        lambda t: _varint(t[0] << 3 | 2) + _varint(len(t[1])) + t[1]),
    st.tuples(st.integers(2, 40), st.binary(min_size=4, max_size=4)).map(
        lambda t: _varint(t[0] << 3 | 5) + t[1])), max_size=3).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(unknown_batch_fields)
def test_unknown_batch_fields_of_any_wire_type_change_nothing(builders, unknown):
    """(found by a review) whatever unknown fields follow, the C loop reads the operations
    protobuf read, no more: none is made of an unknown field's bytes."""
    caller = CALLERS["development"][1]
    plain = pb.Operation(purchase=pb.PurchaseRequest(
        request_id="u-1", card=cpb.CardRef(card_number=GOOD_NUMBERS[0]), gross_amount_minor=5,
        client_time_us=7))
    ops = [plain, pb.Operation(purchase=pb.PurchaseRequest(request_id="x y"))]
    parsed = pb.SubmitBatchRequest.FromString(
        pb.SubmitBatchRequest(operations=ops).SerializeToString() + unknown)
    built, _, count = builders[False].money_ops(parsed.SerializeToString(), caller)
    assert len(built) == len(parsed.operations) == 2 and count == 1
    assert built[0] == builders[False].operation(plain, caller)[2] and built[1] is None


def test_an_operation_hidden_in_an_unknown_field_is_not_applied(server):
    """A varint field then a bytes field whose content is a serialized purchase: protobuf sees
    one operation, and so does the server: its one refusal, nothing else applied."""
    number, hidden_id = new_card_number(), rid()
    inner = pb.Operation(purchase=pb.PurchaseRequest(
        request_id=hidden_id, card=cpb.CardRef(card_number=number), gross_amount_minor=777,
        till=cpb.Till(store_id=1, terminal_id=1), client_time_us=sent_at(hidden_id)))
    payload = b"\x0a" + _varint(len(inner.SerializeToString())) + inner.SerializeToString()
    data = pb.SubmitBatchRequest(operations=[pb.Operation(purchase=pb.PurchaseRequest(
        request_id="bad id!"))]).SerializeToString()
    data += b"\x10\x02" + b"\x1a" + _varint(len(payload)) + payload
    call = server.channel.unary_unary("/cardcore.v1.CardService/SubmitBatch",
                                      request_serializer=lambda b: b,
                                      response_deserializer=pb.SubmitBatchResponse.FromString)
    results = call(data, timeout=30).results
    assert [(r.request_id, r.reason) for r in results] == [
        ("bad id!", R.REASON_INVALID_REQUEST_ID)]


def test_frame_refuses_what_is_not_bytes():
    """(found by a review) a hole in the results would frame as an empty result: reason OK."""
    for results in ([b"", None], ["abc"], [bytearray(b"\x08\x01")]):
        with pytest.raises(TypeError):
            batchwire.frame(results, 1)


def test_encode_group_never_writes_past_its_buffer():
    """(found by a review) a part whose len() is not its size in bytes (a memoryview of int64s)
    is refused, never copied past the group's buffer (run apart: a heap overrun aborts)."""
    import subprocess
    import sys
    code = ("from array import array\n"
            "from cardcore.idempotency import PendingOp\n"
            "from cardcore.ext import batchwire\n"
            "op = PendingOp(b'k', bytes(16), memoryview(array('q', [7] * 24)), bytes(16))\n"
            "try:\n    batchwire.encode_group([op] * 50, 1)\nexcept ValueError:\n    pass\n"
            "else:\n    raise SystemExit('encoded')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert run.returncode == 0, run.stderr[-300:]


def test_not_a_batch_is_refused_not_misread(builders):
    caller = CALLERS["development"][1]
    with pytest.raises(ValueError):
        builders[False].money_ops(b"\x0a\x05ab", caller)  # a length past the end
    assert builders[False].money_ops(b"", caller) == ([], [], 0)


# ---- building results -----------------------------------------------------------------------

int64s = st.one_of(st.sampled_from([0, 1, -1, 100, -100]), st.integers(-2**40, 2**40))


kernel_lines = st.builds(  # line records as the kernel fills them (layout.LINE)
    L.LINE.pack, st.integers(0, 63), st.sampled_from([0, 0, 1, 100]), u32, int64s, int64s,
    int64s, int64s, st.from_regex(rb"[ -~]{0,24}", fullmatch=True))


@st.composite
def outcomes(draw):
    """An outcome as the writer answers one: applied (a purchase, a top-up, anything else) or
    refused, with any figures in the entry; a purchase's lines, points, coupon, capture and
    partial payment each there or not."""
    entry = bytearray(draw(st.binary(min_size=224, max_size=224))) if draw(st.booleans()) \
        else bytearray(224)
    entry[1] = draw(st.sampled_from([L.OP_PURCHASE, L.OP_PURCHASE, L.OP_TOP_UP, L.OP_REFUND,
                                     L.OP_HOLD, L.OP_COUPON_ISSUE]))
    for at in (8, 32, 40, 48, 56, 64, 72, 80, 88, 96, 176, 184, 216):
        struct.pack_into("<q", entry, at, draw(int64s))
    struct.pack_into("<QQ", entry, 144, draw(st.sampled_from([0, 0, 0, 5])),  # a capture's hold
                     draw(st.sampled_from([0, 3, 2**64 - 1])))  # a coupon used (or a package)
    struct.pack_into("<HH", entry, 196, draw(st.sampled_from([0, 0, 1, 7, 0xFFFF])),  # its id
                     draw(st.sampled_from([0, 0, L.PARTIAL_PAYMENT, 2, 0xFFFF])))  # flags
    reason = draw(st.sampled_from([L.R_OK] * 4 + [R.REASON_INSUFFICIENT_FUNDS,
                                                  R.REASON_CARD_NOT_FOUND, R.REASON_PIN_WRONG,
                                                  L.R_STORAGE_UNAVAILABLE]))
    lines = b"".join(draw(st.one_of(st.just([]), st.lists(kernel_lines, min_size=1, max_size=5),
                                    st.just([L.LINE.pack(1, 0, 1, 100, 5, 0, 0, b"x")] * 100))))
    return Outcome(reason, draw(st.booleans()), entry[1], bytes(entry),
                   draw(st.integers(0, 10**6)), 0, lines if reason == L.R_OK else b"",
                   draw(st.sampled_from([0, 0, 7])))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["", "r-1", "x" * 64, "a:b.c-d_e"]), outcomes()),
                max_size=10))
def test_results_are_result_ofs_bytes(answered):
    writer = batchwire.Results(L.OP_PURCHASE, L.OP_TOP_UP, L.PARTIAL_PAYMENT)
    reference = []
    for request_id, outcome in answered:
        try:
            reference.append(result_of(request_id, outcome, 3))
        except ValueError:  # figures protobuf cannot hold (the ledger never has them)
            return
    n = len(answered)
    places = list(range(n))[::-1]  # written at their places, not in order
    results, counts, declined = [None] * n, {}, []
    writer.fill(results, places, [r for r, _ in answered], [o for _, o in answered],
                lambda request_id, outcome: result_of(request_id, outcome, 3).SerializeToString(),
                counts, declined)
    assert results == [r.SerializeToString() for r in reference][::-1]
    expected: dict = {}
    for r in reference:
        expected[r.type, r.reason] = expected.get((r.type, r.reason), 0) + 1
    assert counts == expected
    assert declined == [(r.request_id, r.reason) for r in reference if r.reason]
    assert batchwire.frame(results, 1) == pb.SubmitBatchResponse(
        results=reference[::-1]).SerializeToString()


# ---- through the server ---------------------------------------------------------------------

def test_a_mixed_batch_through_the_server(server, admin):
    """Plain purchases (built in C) among refused ones and others (the Python path): one result
    each, in order, the refusals the Python path's, the plain ones applied."""
    number = new_card_number()
    ids = [rid() for _ in range(9)]
    card = cpb.CardRef(card_number=number)
    till = cpb.Till(store_id=1, terminal_id=1)
    opened = server.stub.OpenCard(pb.OpenCardRequest(request_id=ids[0], card=card, till=till,
                                                     client_time_us=sent_at(ids[0])))
    assert opened.reason == R.REASON_OK
    server.stub.TopUp(pb.TopUpRequest(request_id=ids[1], card=card, amount_minor=100_000,
                                      till=till, client_time_us=sent_at(ids[1])))

    def purchase(request_id, **kw):
        fields = dict(request_id=request_id, card=card, gross_amount_minor=1_000, till=till,
                      client_time_us=sent_at(request_id) if request_id else 1)
        fields.update(kw)
        return pb.Operation(purchase=pb.PurchaseRequest(**fields))

    batch = [purchase(ids[2]),
             purchase("bad id!"),
             purchase(ids[3], card=cpb.CardRef(card_number="1234")),
             purchase(ids[4], gross_amount_minor=0),
             purchase(ids[5], client_time_us=0),
             purchase(ids[6], pin_block=b"\x01" * 16),
             purchase(ids[7]),
             pb.Operation(top_up=pb.TopUpRequest(request_id=ids[8], card=card, amount_minor=5,
                                                 till=till, client_time_us=sent_at(ids[8]))),
             pb.Operation()]
    results = server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=batch)).results
    got = [(r.request_id, r.reason, r.failure.field, r.type) for r in results]
    purchase_type = cpb.OPERATION_TYPE_PURCHASE
    assert got == [
        (ids[2], R.REASON_OK, "", purchase_type),
        ("bad id!", R.REASON_INVALID_REQUEST_ID, "request_id", purchase_type),
        (ids[3], R.REASON_INVALID_CARD_NUMBER, "card.card_number", purchase_type),
        (ids[4], R.REASON_INVALID_AMOUNT, "gross_amount_minor", purchase_type),
        (ids[5], R.REASON_INVALID_ARGUMENT, "client_time_us", purchase_type),
        (ids[6], R.REASON_PIN_BLOCK_INVALID, "pin_block", purchase_type),
        (ids[7], R.REASON_OK, "", purchase_type),
        (ids[8], R.REASON_OK, "", cpb.OPERATION_TYPE_TOP_UP),
        ("", R.REASON_INVALID_ARGUMENT, "op", 0)]
    first, second = results[0], results[6]
    assert first.seq and second.seq == first.seq + 1
    assert first.paid_minor == 1_000 - first.discount_minor
    assert second.balance_after.principal_minor == 100_000 - first.paid_minor - second.paid_minor
    # a retry of the whole batch: the applied ones replayed with their original answers
    again = server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=batch)).results
    assert [r.replayed for r in again] == [True, False, False, False, False, False, True, True,
                                           False]
    assert again[0].seq == first.seq and again[0].balance_after == first.balance_after


def test_an_operator_outside_its_scope_is_refused_per_purchase(server, admin):
    """A store manager of store 1 (its purchases by the Python path): a purchase at store 2 is
    refused, the one at store 1 applied; a bad token refuses every purchase."""
    token = admin.add_operator("mgr-" + rid()[:8], ROLE.OPERATOR_ROLE_STORE_MANAGER, [1])
    number = new_card_number()
    ids = [rid() for _ in range(4)]
    card = cpb.CardRef(card_number=number)
    server.stub.OpenCard(pb.OpenCardRequest(request_id=ids[0], card=card,
                                            till=cpb.Till(store_id=1),
                                            client_time_us=sent_at(ids[0])))
    server.stub.TopUp(pb.TopUpRequest(request_id=ids[1], card=card, amount_minor=10_000,
                                      till=cpb.Till(store_id=1), client_time_us=sent_at(ids[1])))
    batch = pb.SubmitBatchRequest(operations=[
        pb.Operation(purchase=pb.PurchaseRequest(
            request_id=ids[k], card=card, gross_amount_minor=100, till=cpb.Till(store_id=store),
            client_time_us=sent_at(ids[k]))) for k, store in ((2, 1), (3, 2))])
    results = server.stub.SubmitBatch(batch, metadata=(("authorization", f"Bearer {token}"),)).results
    assert [(r.reason, r.failure.field) for r in results] == [
        (R.REASON_OK, ""), (R.REASON_PERMISSION_DENIED, "till.store_id")]
    refused = server.stub.SubmitBatch(
        batch, metadata=(("authorization", "Bearer not-a-token"),)).results
    assert {r.reason for r in refused} == {R.REASON_UNAUTHENTICATED}


@pytest.mark.parametrize("caller_name", ["development", "chain admin", "cashier over TLS"])
def test_every_plain_purchase_and_basket_is_built_in_c(builders, caller_name):
    """Not only refused or left over: a batch of valid plain purchases, top-ups and baskets
    (lines, points offered, a coupon, each or all, their gross 0 or their total: 100 lines at
    most) is built in C, whole."""
    tls, caller = CALLERS[caller_name]
    ops = [pb.Operation(purchase=pb.PurchaseRequest(
        request_id=f"p-{k}", card=cpb.CardRef(card_number=GOOD_NUMBERS[k % 4]),
        gross_amount_minor=100 + k, till=cpb.Till(store_id=k, terminal_id=1, staff_id=k % 3),
        client_time_us=1_796_000_000_000_000 + k)) for k in range(40)]
    ops += [pb.Operation(top_up=pb.TopUpRequest(
        request_id=f"p-{k}", card=cpb.CardRef(card_number=GOOD_NUMBERS[k % 4]),
        amount_minor=100 + k, till=cpb.Till(store_id=k), client_time_us=1_796_000_000_000_000 + k))
        for k in range(40, 50)]
    for k in range(50, 60):
        count = 99 if k == 59 else k % 5 + 1
        lines = [pb.PurchaseLine(category_code=j % 64, amount_minor=100 + j, quantity=j % 3,
                                 sku=f"SKU-{j}" * (j % 2)) for j in range(count)]
        ops.append(pb.Operation(purchase=pb.PurchaseRequest(
            request_id=f"p-{k}", card=cpb.CardRef(card_number=GOOD_NUMBERS[k % 4]), lines=lines,
            gross_amount_minor=0 if k % 3 else sum(x.amount_minor for x in lines),
            redeem_points=500 * (k % 2), coupon_serial=k * (k % 4 != 1),
            till=cpb.Till(store_id=k, terminal_id=2), client_time_us=1_796_000_000_000_000 + k)))
    built, rids, count = builders[tls].money_ops(
        pb.SubmitBatchRequest(operations=ops).SerializeToString(), caller)
    assert count == 60
    assert built == [builders[tls].operation(op, caller)[2] for op in ops]
    assert rids == [f"p-{k}" for k in range(60)]
    assert len(built[59].lines) == 99 * L.LINE_SIZE


def test_baskets_through_the_server_answer_as_result_of(start_server):
    """bench/programs.py's basket (5 lines, a coupon, points offered; built and answered in C)
    beside a basket whose coupon is used by then (the writer's refusal), one with partial
    payment allowed (built by the Python path) and one whose gross is not its lines' total
    (refused there): each answer is GetOperation's (result_of), and a retry replays them."""
    market = start_server("--program", os.path.join(EXAMPLES, "supermarket.toml"))
    client = Client(market.stub)
    number = client.funded_card(500_000)
    client.purchase(number, 100_000)  # 1,000 points to redeem
    serial = issue(market, number, 2).coupon_serial  # "fresh 10 % off", given
    lines = [(c, 1000 * c + 7, 1, f"SKU-{k}") for k, c in enumerate((1, 2, 1, 2, 3))]
    batch = [programs_purchase(number, *lines, redeem=500, coupon=serial),
             programs_purchase(number, *lines, coupon=serial),
             programs_purchase(number, *lines, partial=True),
             programs_purchase(number, *lines, gross=1)]
    results = market.stub.SubmitBatch(pb.SubmitBatchRequest(
        operations=[pb.Operation(purchase=req) for req in batch])).results
    assert [(r.reason, r.failure.field) for r in results] == [
        (R.REASON_OK, ""), (R.REASON_COUPON_USED, ""), (R.REASON_OK, ""),
        (R.REASON_INVALID_AMOUNT, "gross_amount_minor")]
    full = results[0]
    assert (full.coupon_serial, full.coupon_id, full.points_redeemed) == (serial, 2, 500)
    assert full.coupon_off_minor == 201  # 10 % of the fresh lines: 1,007 + 1,007 (tier rate 100 %)
    assert [(x.category_code, x.sku) for x in full.lines] == [(c, s) for c, _, _, s in lines]
    assert full.paid_minor == full.amount_minor - full.discount_minor - full.redeemed_minor
    for req, result in zip(batch[:3], results):
        asked = market.stub.GetOperation(pb.GetOperationRequest(request_id=req.request_id)).result
        assert asked.replayed  # answered from its record, and with the caller: the rest alike
        asked.replayed = False
        asked.ClearField("caller")
        assert asked == result, req.request_id
    again = market.stub.SubmitBatch(pb.SubmitBatchRequest(
        operations=[pb.Operation(purchase=req) for req in batch])).results
    assert [r.replayed for r in again] == [True, True, True, False]
    for first, replayed in zip(results, again):
        replayed.replayed = first.replayed
        assert replayed == first


# ---- the hop ---------------------------------------------------------------------------------

def _pending(draw) -> PendingOp:
    maybe = st.one_of(st.none(), st.binary(max_size=40))
    return PendingOp(draw(st.binary(max_size=69)), draw(st.binary(min_size=16, max_size=16)),
                     draw(st.binary(min_size=192, max_size=192)),
                     draw(st.binary(min_size=16, max_size=16)), draw(maybe),
                     draw(st.integers(0, 2**32 - 1)), draw(maybe), draw(maybe),
                     draw(st.integers(0, 255)), draw(st.integers(0, 255)),
                     draw(st.integers(0, 2**32 - 1)),
                     draw(st.sampled_from([b"", bytes(64), bytes(range(128))])))


pending_ops = st.composite(lambda draw: _pending(draw))()


@SETTINGS
@given(st.lists(pending_ops, max_size=8), st.integers(-2**63, 2**63 - 1))
def test_group_bytes_are_encode_groups(ops, ts_us):
    assert batchwire.encode_group(ops, ts_us) == groups.encode_group(ops, ts_us)


@SETTINGS
@given(st.lists(outcomes(), max_size=8), st.integers(0, 5).map(bool))
def test_answers_decode_as_decode_answer_does(answered, draw_consistent):
    with_counts = [o._replace(count=k, available_minor=o.available_minor if o.reason else 0,
                              held_minor=o.held_minor if not o.reason else 0)
                   for k, o in enumerate(answered)]
    for k, o in enumerate(with_counts):  # an entry says how many lines follow (or, drawn so,
        if o.entry is not None and draw_consistent:  # does not: then both refuse the answer)
            entry = bytearray(o.entry)
            struct.pack_into("<H", entry, L.JOURNAL_OFF_PROGRAM + 18, len(o.lines) // L.LINE_SIZE)
            with_counts[k] = o._replace(entry=bytes(entry))
    data = writer_proc.encode_answer(with_counts)
    try:
        reference = writer_proc.decode_answer(data)
    except ValueError:
        with pytest.raises(ValueError):
            batchwire.decode_answer(data, Outcome, L.R_OK)
        return
    decoded = batchwire.decode_answer(data, Outcome, L.R_OK)
    assert decoded == reference
    assert all(type(o) is Outcome for o in decoded)
    if data[4:]:
        with pytest.raises(ValueError):
            batchwire.decode_answer(data + b"x", Outcome, L.R_OK)


@SETTINGS
@given(st.lists(st.lists(st.tuples(pending_ops, outcomes()), min_size=1, max_size=3), max_size=4))
def test_dirty_marks_are_each_cards_and_keys(items):
    """What the writer must treat as not yet checkpointed: each operation's card and request key
    unless the storage refused it, and the card of every entry."""
    class Item:
        def __init__(self, ops):
            self.ops = ops

    ops = [[op for op, _ in item] for item in items]
    answered = [o for item in items for _, o in item]
    cards, keys = {b"old": 1}, {}
    batchwire.mark_dirty(cards, keys, [Item(o) for o in ops], answered, 5,
                         L.R_STORAGE_UNAVAILABLE)
    want_cards, want_keys = {b"old": 1}, {}
    for op, o in zip([op for group in ops for op in group], answered, strict=True):
        if o.reason != L.R_STORAGE_UNAVAILABLE:
            want_cards[op.card_id] = 5
            if op.request_key:
                want_keys[op.request_key] = 5
    for o in answered:
        if o.entry is not None:
            want_cards[o.entry[16:32]] = 5
    assert (cards, keys) == (want_cards, want_keys)
