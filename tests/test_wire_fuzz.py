"""Malformed protobuf payloads and extreme field values through the real gRPC port.

One real server for the module (real LMDB in a temp folder). Three kinds of input:

1. Raw bytes sent on each method path with no serializers: truncated varints and tags,
   length prefixes past the end, invalid UTF-8 in string fields, unknown groups nested past
   the parser's depth limit, fields with the wrong wire type; and with hypothesis, random
   bytes, damaged valid requests, and well-formed requests with extreme values and stray
   fields. What happens, exactly:
   - bytes protobuf cannot decode are answered INVALID_ARGUMENT with REASON_INVALID_ARGUMENT
     and field "(message)" (the server's own decoder; grpc's would answer UNKNOWN, name a
     Python exception and log a traceback per call);
   - a known field with the wrong wire type is kept as an unknown field, so the request
     simply lacks that field and our validation refuses it with its documented reason;
   - on SwipeStream an undecodable message gets its own result like any bad operation, and
     the stream goes on.
   Every call gets a status within DEADLINE_S, the server keeps serving, and nothing is
   applied that was not answered as applied.
2. Extreme values through the generated stubs: each bad one gets its documented reason
   (common.proto's Reason comments) and changes nothing; the edge values that are allowed
   are kept exactly.
3. A SwipeStream mixing valid and invalid operations: one result per operation, in order.
"""
from __future__ import annotations

import dataclasses
import datetime
import random
import re
import struct
import uuid

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardcore.terminal import now_us
from cardcore import cards
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, ServerProcess, checkpointed, failure_of, new_card_number, purchase_request, rid, verify, sent_at

R = cpb.Reason
C = grpc.StatusCode
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
UINT32_MAX = (1 << 32) - 1
SERVICE = "/cardcore.v1.CardService"
DEADLINE_S = 5.0
TIERS = 3                                          # the default program: standard, silver, gold
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")  # card_service.proto: OpenCardRequest.request_id
BATCH_OPS_MAX = 10_000

# Extra `cardcore serve` flags for the module's server: the one line to change if serving
# plaintext needs asking for here (conftest's ServerProcess now adds --insecure itself).
SERVE_FLAGS: tuple[str, ...] = ()

UNARY = {"OpenCard": pb.OpenCardRequest, "TopUp": pb.TopUpRequest, "Purchase": pb.PurchaseRequest,
         "GetCard": pb.GetCardRequest, "GetOperation": pb.GetOperationRequest,
         "SubmitBatch": pb.SubmitBatchRequest}
MUTATING = ("OpenCard", "TopUp", "Purchase")
AMOUNT_FIELD = {"TopUp": "amount_minor", "Purchase": "gross_amount_minor"}
OP_METHOD = {"open_card": "OpenCard", "top_up": "TopUp", "purchase": "Purchase"}
TILL = cpb.Till(store_id=1, terminal_id=1)
INVALID = {R.REASON_INVALID_ARGUMENT, R.REASON_INVALID_AMOUNT, R.REASON_INVALID_CARD_NUMBER,
           R.REASON_INVALID_REQUEST_ID, R.REASON_INVALID_TIER, R.REASON_FIELD_TOO_LONG}
# The gRPC code of each reason, as common.proto's Reason comments document it.
CODE = {R.REASON_OK: C.OK, R.REASON_INVALID_ARGUMENT: C.INVALID_ARGUMENT,
        R.REASON_INVALID_AMOUNT: C.INVALID_ARGUMENT, R.REASON_INVALID_CARD_NUMBER: C.INVALID_ARGUMENT,
        R.REASON_INVALID_REQUEST_ID: C.INVALID_ARGUMENT, R.REASON_INVALID_TIER: C.INVALID_ARGUMENT,
        R.REASON_FIELD_TOO_LONG: C.INVALID_ARGUMENT, R.REASON_BATCH_TOO_LARGE: C.INVALID_ARGUMENT,
        R.REASON_CARD_NOT_FOUND: C.NOT_FOUND, R.REASON_CARD_ALREADY_EXISTS: C.ALREADY_EXISTS,
        R.REASON_INSUFFICIENT_FUNDS: C.FAILED_PRECONDITION, R.REASON_AMOUNT_OVERFLOW: C.OUT_OF_RANGE,
        R.REASON_DUPLICATE_REQUEST_MISMATCH: C.ALREADY_EXISTS}


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> ServerProcess:
    server = ServerProcess(str(tmp_path_factory.mktemp("wire")), *SERVE_FLAGS)
    yield server
    alive = server.proc.poll() is None
    server.stop()
    assert alive, "the server died during the module"


@pytest.fixture
def client(live) -> Client:
    return Client(live.stub)


# ---- wire-format building blocks ----------------------------------------------------------

def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int, of any size (protobuf's own stop at 64 bits)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages)."""
    return tag(number, 2) + varint(len(payload)) + payload


def groups(number: int, depth: int) -> bytes:
    """``depth`` start-group tags of an unknown field, then as many end-group tags."""
    return tag(number, 3) * depth + tag(number, 4) * depth


# ---- calls with raw bytes -------------------------------------------------------------------

@dataclasses.dataclass
class Answer:
    code: grpc.StatusCode
    details: str = ""
    reply: bytes | None = None            # the serialized reply of an OK unary call
    failure: cpb.Failure | None = None    # the cardcore.v1.Failure status detail, if any


def _answer_of(err: grpc.RpcError) -> Answer:
    status = rpc_status.from_call(err)  # also checks the detail's code equals the call's
    fail = None
    for detail in status.details if status is not None else ():
        candidate = cpb.Failure()
        if detail.Unpack(candidate):
            fail = candidate
    return Answer(err.code(), err.details() or "", failure=fail)


def call_raw(server: ServerProcess, method: str, payload: bytes) -> Answer:
    """One unary call with ``payload`` as the request bytes, exactly as given."""
    call = server.channel.unary_unary(f"{SERVICE}/{method}")
    try:
        return Answer(C.OK, reply=call(payload, timeout=DEADLINE_S))
    except grpc.RpcError as err:
        return _answer_of(err)


def stream_raw(server: ServerProcess, messages: list[bytes]) -> tuple[list[pb.OperationResult], Answer]:
    """A SwipeStream of raw messages: the replies, then how the stream ended."""
    call = server.channel.stream_stream(f"{SERVICE}/SwipeStream")(iter(messages), timeout=DEADLINE_S)
    replies: list[pb.OperationResult] = []
    try:
        for raw in call:
            replies.append(pb.OperationResult.FromString(raw))
    except grpc.RpcError as err:
        return replies, _answer_of(err)
    return replies, Answer(call.code(), call.details() or "")


def decodes(cls, payload: bytes) -> bool:
    try:
        cls.FromString(payload)
    except DecodeError:
        return False
    return True


def assert_undecodable(answer: Answer) -> None:
    """What the server answers when protobuf cannot decode the request."""
    assert_refused(answer, R.REASON_INVALID_ARGUMENT, "(message)")
    assert "Error" not in answer.details, answer


def assert_undecodable_result(result: pb.OperationResult) -> None:
    assert (result.reason, result.failure.field) == (R.REASON_INVALID_ARGUMENT, "(message)"), result
    assert result.status_code == C.INVALID_ARGUMENT.value[0]


def assert_refused(answer: Answer, reason: int, field: str | None = None,
                   code: grpc.StatusCode = C.INVALID_ARGUMENT) -> None:
    assert answer.code == code, answer
    assert answer.failure is not None and answer.failure.reason == reason, answer
    if field is not None:
        assert answer.failure.field == field, answer


def ledger_counts(server: ServerProcess) -> tuple[int, int]:
    """(journal entries, request records) of a clean ledger."""
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]
    return report["journal_entries"], report["requests"]


def not_applied(server: ServerProcess, request_id: str) -> bool:
    return not server.stub.GetOperation(pb.GetOperationRequest(request_id=request_id),
                                        timeout=DEADLINE_S).found


def still_serving(server: ServerProcess, number: str) -> None:
    """The server is alive and a normal purchase goes through."""
    assert server.proc.poll() is None, server.log()[-3000:]
    before = Client(server.stub).card(number).balance.available_minor
    paid = Client(server.stub).purchase(number, 1)
    assert paid.reason == R.REASON_OK and paid.balance_after.available_minor == before - 1


# ---- 1. raw malformed bytes -------------------------------------------------------------------

def valid_request(method: str, number: str, request_id: str) -> bytes:
    """A request that would be applied (or answered) as is: each corruption below starts from one."""
    card = cpb.CardRef(card_number=number)
    return {
        "OpenCard": lambda: pb.OpenCardRequest(client_time_us=sent_at(request_id), request_id=request_id, till=TILL,
                                               card=cpb.CardRef(card_number=new_card_number())),
        "TopUp": lambda: pb.TopUpRequest(client_time_us=sent_at(request_id), request_id=request_id, card=card, amount_minor=100, till=TILL),
        "Purchase": lambda: purchase_request(number, 100, request_id),
        "GetCard": lambda: pb.GetCardRequest(card=card),
        "GetOperation": lambda: pb.GetOperationRequest(request_id=request_id),
        "SubmitBatch": lambda: pb.SubmitBatchRequest(operations=[
            pb.Operation(purchase=purchase_request(number, 100, request_id))]),
    }[method]().SerializeToString()


def request_id_field(method: str, raw: bytes) -> bytes:
    """``raw`` as the request_id of a method's request (GetCard has none: its card number)."""
    return {"GetCard": ld(1, ld(1, raw)), "SubmitBatch": ld(1, ld(3, ld(1, raw))),
            "SwipeStream": ld(3, ld(1, raw))}.get(method, ld(1, raw))


def card_number_field(method: str, raw: bytes) -> bytes:
    """``raw`` as the card number of a method's request (GetOperation has none: its request_id)."""
    return {"GetCard": ld(1, ld(1, raw)), "GetOperation": ld(1, raw),
            "SubmitBatch": ld(1, ld(3, ld(2, ld(1, raw)))),
            "SwipeStream": ld(3, ld(2, ld(1, raw)))}.get(method, ld(2, ld(1, raw)))


# Each appended to (or cut from) a valid request: protobuf refuses all of them, so the
# request is not applied even though what precedes the damage is a good request.
UNDECODABLE = {
    "truncated varint": lambda m, base: base + b"\x18\x80\x80",
    "truncated tag": lambda m, base: base + b"\x80",
    "varint of 11 bytes": lambda m, base: base + b"\x18" + b"\xff" * 10 + b"\x01",
    "length prefix past the end": lambda m, base: base + b"\x0a\x7fabc",
    "cut in its last field": lambda m, base: base[:-1],
    "invalid UTF-8 in request_id": lambda m, base: base + request_id_field(m, b"req-\xc3\x28"),
    "invalid UTF-8 (lone 0xff) in the card number": lambda m, base: base + card_number_field(m, b"\xff"),
    "overlong UTF-8 in the card number": lambda m, base: base + card_number_field(m, b"4\xc0\xaf1"),
    "UTF-16 surrogate in the card number": lambda m, base: base + card_number_field(m, b"\xed\xa0\x80"),
    "code point past U+10FFFF": lambda m, base: base + card_number_field(m, b"\xf4\x90\x80\x80"),
    "unknown groups nested 10,000 deep": lambda m, base: base + groups(15, 10_000),
    "unknown groups nested 101 deep": lambda m, base: base + groups(15, 101),
    "unterminated group": lambda m, base: base + tag(15, 3) * 3,
    "end group without a start": lambda m, base: base + tag(15, 4),
    "field number 0": lambda m, base: base + b"\x00\x01",
    "wire type 6": lambda m, base: base + b"\x0e",
    "wire type 7": lambda m, base: base + b"\x0f",
}

def wrong_wire_type(method: str, number: str, request_id: str) -> bytes:
    """A request whose key field has another wire type: protobuf keeps it as an unknown field."""
    card = cpb.CardRef(card_number=number)
    if method in AMOUNT_FIELD:  # everything right but the amount, sent as fixed64
        head = UNARY[method](request_id=request_id, card=card, till=TILL,
                             client_time_us=sent_at(request_id)).SerializeToString()
        return head + tag(3, 1) + struct.pack("<q", 100)
    return {
        "OpenCard": pb.OpenCardRequest(client_time_us=now_us(), card=cpb.CardRef(card_number=new_card_number()), till=TILL)
        .SerializeToString() + tag(1, 0) + varint(7),                     # request_id as a varint
        "GetCard": tag(1, 0) + varint(1),                                 # card as a varint
        "GetOperation": tag(1, 5) + b"abcd",                              # request_id as fixed32
        "SubmitBatch": ld(1, tag(3, 0) + varint(1)),                      # an op whose purchase is a varint
    }[method]


# What our validation answers those and the empty message: (reason, field).
EXPECTED_WRONG_WIRE_TYPE = {
    "OpenCard": (R.REASON_INVALID_REQUEST_ID, "request_id"),
    "TopUp": (R.REASON_INVALID_AMOUNT, "amount_minor"),
    "Purchase": (R.REASON_INVALID_AMOUNT, "gross_amount_minor"),
    "GetCard": (R.REASON_INVALID_CARD_NUMBER, "card.card_number"),
    "GetOperation": (R.REASON_INVALID_REQUEST_ID, "request_id"),
    "SubmitBatch": (R.REASON_INVALID_ARGUMENT, "op"),                     # in its one result
}
EXPECTED_EMPTY = {
    "OpenCard": (R.REASON_INVALID_REQUEST_ID, "request_id"),
    "TopUp": (R.REASON_INVALID_REQUEST_ID, "request_id"),
    "Purchase": (R.REASON_INVALID_REQUEST_ID, "request_id"),
    "GetCard": (R.REASON_INVALID_CARD_NUMBER, "card.card_number"),
    "GetOperation": (R.REASON_INVALID_REQUEST_ID, "request_id"),
    # proto says "1..10,000" operations, but an empty batch is answered OK with no results.
    "SubmitBatch": None,
}


@pytest.fixture(scope="module")
def funded(live) -> str:
    return Client(live.stub).funded_card(1_000_000)


@pytest.mark.parametrize("method", list(UNARY))
def test_malformed_bytes_get_a_status_and_apply_nothing(live, funded, method):
    before = ledger_counts(live)
    used: list[str] = []
    for i, (name, corrupt) in enumerate(UNDECODABLE.items()):
        request_id = f"wire-{method}-{i}"
        used.append(request_id)
        payload = corrupt(method, valid_request(method, funded, request_id))
        assert not decodes(UNARY[method], payload), name  # the premise: protobuf refuses it
        answer = call_raw(live, method, payload)
        assert_undecodable(answer)

    # A field with the wrong wire type is an unknown field: the request lacks the field.
    request_id = f"wire-{method}-wrong-wire-type"
    used.append(request_id)
    reason, field = EXPECTED_WRONG_WIRE_TYPE[method]
    answer = call_raw(live, method, wrong_wire_type(method, funded, request_id))
    if method == "SubmitBatch":
        assert answer.code == C.OK, answer
        (result,) = pb.SubmitBatchResponse.FromString(answer.reply).results
        assert (result.reason, result.failure.field) == (reason, field)
        assert result.status_code == C.INVALID_ARGUMENT.value[0]
    else:
        assert_refused(answer, reason, field)

    # The empty message: every field at its default.
    answer = call_raw(live, method, b"")
    if EXPECTED_EMPTY[method] is None:
        assert answer.code == C.OK and pb.SubmitBatchResponse.FromString(answer.reply).results == []
    else:
        assert_refused(answer, *EXPECTED_EMPTY[method])

    assert ledger_counts(live) == before
    assert all(not_applied(live, request_id) for request_id in used)
    still_serving(live, funded)


def test_oversized_and_unknown_method_get_grpc_statuses(live, funded):
    before = ledger_counts(live)
    # A batch of 17 MiB of empty operations: past the server's 16 MiB receive limit.
    answer = call_raw(live, "SubmitBatch", ld(1, b"") * (17 << 19))
    assert answer.code == C.RESOURCE_EXHAUSTED and "larger than max" in answer.details, answer
    answer = call_raw(live, "NoSuchMethod", valid_request("Purchase", funded, "wire-unknown-method"))
    assert answer.code == C.UNIMPLEMENTED, answer
    assert ledger_counts(live) == before
    still_serving(live, funded)


def test_malformed_bytes_on_the_stream_get_one_result_each(live, funded):
    before = ledger_counts(live)
    for i, (name, corrupt) in enumerate(UNDECODABLE.items()):
        base = pb.Operation(purchase=purchase_request(funded, 100, f"wire-stream-{i}")).SerializeToString()
        payload = corrupt("SwipeStream", base)
        assert not decodes(pb.Operation, payload), name
        replies, end = stream_raw(live, [payload])
        assert end.code == C.OK and len(replies) == 1, name
        assert_undecodable_result(replies[0])
        assert not_applied(live, f"wire-stream-{i}")
    # Decodable garbage is an operation of no known kind: a result, and the stream goes on.
    replies, end = stream_raw(live, [b"", tag(15, 0) + varint(1), tag(3, 0) + varint(1)])
    assert end.code == C.OK, end
    assert [(r.reason, r.failure.field) for r in replies] == [(R.REASON_INVALID_ARGUMENT, "op")] * 3
    assert ledger_counts(live) == before

    # Good, undecodable, good: one bad message never fails the others.
    first, last = f"wire-stream-first-{uuid.uuid4().hex[:8]}", f"wire-stream-last-{uuid.uuid4().hex[:8]}"
    replies, end = stream_raw(live, [
        pb.Operation(purchase=purchase_request(funded, 10, first)).SerializeToString(),
        b"\x0a\x7fabc",
        pb.Operation(purchase=purchase_request(funded, 10, last)).SerializeToString()])
    assert end.code == C.OK, end
    assert [(r.request_id, r.reason) for r in (replies[0], replies[2])] == [
        (first, R.REASON_OK), (last, R.REASON_OK)]
    assert_undecodable_result(replies[1])
    assert not not_applied(live, first) and not not_applied(live, last)
    assert ledger_counts(live) == (before[0] + 2, before[1] + 2)
    still_serving(live, funded)


# ---- random and mutated bytes (hypothesis) ------------------------------------------------------

MODELLED_FIELDS = {"request_id", "card", "tier", "profile", "till", "amount_minor", "gross_amount_minor",
                   "client_time_us"}
PHONE_RE = re.compile(r"[0-9+\- ]*")          # card_service.proto: MemberProfile.phone
BIRTHDAY_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _birthday_ok(text: str) -> bool:
    if not text:
        return True
    try:
        return bool(BIRTHDAY_RE.fullmatch(text)) and bool(datetime.date.fromisoformat(text))
    except ValueError:
        return False


def problems(method: str, msg) -> set[int] | None:
    """Every refusal reason a decoded request has, by the documented field rules.

    The server must refuse a request with problems for one of them (which one depends on the
    order it checks in: not part of the contract). Empty: the request passes validation and the
    ledger decides. None: the request sets fields not modelled here (e.g. a card reference
    other than a clear number), so nothing is pinned.
    """
    if any(field.name not in MODELLED_FIELDS for field, _ in msg.ListFields()):
        return None
    found: set[int] = set()
    if method != "GetOperation":
        if msg.card.WhichOneof("ref") not in (None, "card_number"):
            return None
        if not cards.number_ok(msg.card.card_number, True):
            found.add(R.REASON_INVALID_CARD_NUMBER)
    if method != "GetCard" and not REQUEST_ID_RE.fullmatch(msg.request_id):
        found.add(R.REASON_INVALID_REQUEST_ID)
    if method in AMOUNT_FIELD and getattr(msg, AMOUNT_FIELD[method]) <= 0:
        found.add(R.REASON_INVALID_AMOUNT)
    if method in MUTATING and msg.client_time_us <= 0:  # every mutating request carries it
        found.add(R.REASON_INVALID_ARGUMENT)
    if method == "OpenCard":
        p = msg.profile
        if msg.tier >= TIERS:
            found.add(R.REASON_INVALID_TIER)
        if len(p.name) > 64 or len(p.phone) > 20:
            found.add(R.REASON_FIELD_TOO_LONG)
        if not p.name.isprintable() or not PHONE_RE.fullmatch(p.phone) or not _birthday_ok(p.birthday):
            found.add(R.REASON_INVALID_ARGUMENT)
    return found


def result_applied(op: pb.Operation, result: pb.OperationResult) -> int:
    """Check one batch or stream result against its operation; 1 if it says "applied now"."""
    kind = op.WhichOneof("op")
    if kind is None:
        want = {R.REASON_INVALID_ARGUMENT}
    else:  # operation kinds not modelled here (none yet) are only counted
        want = problems(OP_METHOD[kind], getattr(op, kind)) if kind in OP_METHOD else None
    if want:
        assert result.reason in want, (op, result)
        assert result.status_code == C.INVALID_ARGUMENT.value[0]
    elif want is not None:
        assert result.reason not in INVALID, (op, result)
    return int(result.reason == R.REASON_OK and not result.replayed)


def check_payload(server: ServerProcess, method: str, payload: bytes) -> int:
    """Send one payload; check the answer against what protobuf makes of it; count applications."""
    if method == "SwipeStream":
        replies, end = stream_raw(server, [payload])
        assert end.code == C.OK and len(replies) == 1, (end, replies)
        if not decodes(pb.Operation, payload):
            assert_undecodable_result(replies[0])
            return 0
        assert end.code == C.OK and len(replies) == 1, (end, replies)
        return result_applied(pb.Operation.FromString(payload), replies[0])

    answer = call_raw(server, method, payload)
    cls = UNARY[method]
    if not decodes(cls, payload):
        assert_undecodable(answer)
        return 0
    msg = cls.FromString(payload)
    if method == "SubmitBatch":  # at most 256 operations fit in a fuzzed payload: never too large
        assert answer.code == C.OK, answer
        results = pb.SubmitBatchResponse.FromString(answer.reply).results
        return sum(result_applied(op, r) for op, r in zip(msg.operations, results, strict=True))
    want = problems(method, msg)
    if want:
        assert answer.code == C.INVALID_ARGUMENT and answer.failure.reason in want, (answer, want)
        return 0
    if want is not None:
        assert answer.failure is None or answer.failure.reason not in INVALID, answer
    if answer.code == C.OK:
        return int(method in MUTATING and not pb.OperationResult.FromString(answer.reply).replayed)
    assert answer.failure is not None and answer.failure.reason != R.REASON_OK, answer
    return 0


ALL_METHODS = [*UNARY, "SwipeStream"]


def journal_growth_and_applied(server: ServerProcess, cases, **settings_kw) -> tuple[int, int]:
    """Send every (method, payload) of every list ``cases`` draws, checking each answer; return
    how many journal entries appeared and how many operations were answered as applied."""
    before = ledger_counts(server)[0]
    applied = [0]

    @settings(deadline=None, database=None, **settings_kw)
    @given(case=cases)
    def fuzz(case):
        for method, payload in case:
            applied[0] += check_payload(server, method, payload)

    fuzz()
    return ledger_counts(server)[0] - before, applied[0]


def test_random_bytes_on_every_method(live, funded):
    grown, applied = journal_growth_and_applied(
        live, st.binary(max_size=512).map(lambda p: [(m, p) for m in ALL_METHODS]), max_examples=150)
    assert grown == applied == 0  # nothing random is a valid request
    still_serving(live, funded)


def requests_with_odd_values(card_number: str):
    """(method, payload): a request of the right shape with extreme or odd values (money ones
    aimed at ``card_number`` half of the time), then now and then a few extra fields: unknown
    numbers, or known numbers with another wire type (and, for strings, a new value: last wins)."""
    u32 = st.one_of(st.integers(0, 3), st.integers(0, UINT32_MAX), st.sampled_from([255, 256, UINT32_MAX]))
    amounts = st.one_of(st.integers(-3, 3), st.integers(INT64_MIN, INT64_MAX),
                        st.sampled_from([INT64_MIN, INT64_MAX, 1 << 32]))
    ids = st.one_of(st.uuids().map(str), st.from_regex(REQUEST_ID_RE, fullmatch=True), st.text(max_size=70))
    numbers = st.one_of(
        st.just(card_number),
        st.text("0123456789", min_size=6, max_size=20).map(lambda p: p + cards.luhn_check_digit(p)),
        st.text(max_size=24))
    card = st.builds(cpb.CardRef, card_number=numbers)
    till = st.builds(cpb.Till, store_id=u32, terminal_id=u32, staff_id=u32)
    profile = st.builds(pb.MemberProfile, name=st.text(max_size=70), phone=st.text("0123456789+- ", max_size=24),
                        birthday=st.one_of(st.dates().map(str), st.text(max_size=12)), home_store_id=u32)
    requests = {
        "OpenCard": st.builds(pb.OpenCardRequest, request_id=ids, card=card, tier=u32, profile=profile, till=till),
        "TopUp": st.builds(pb.TopUpRequest, request_id=ids, card=card, amount_minor=amounts, till=till),
        "Purchase": st.builds(pb.PurchaseRequest, request_id=ids, card=card, gross_amount_minor=amounts, till=till),
        "GetCard": st.builds(pb.GetCardRequest, card=card),
        "GetOperation": st.builds(pb.GetOperationRequest, request_id=ids),
    }
    operations = st.one_of(st.just(pb.Operation()), *(
        requests[method].map(lambda r, kind=kind: pb.Operation(**{kind: r})) for kind, method in OP_METHOD.items()))
    requests["SubmitBatch"] = st.lists(operations, max_size=8).map(
        lambda ops: pb.SubmitBatchRequest(operations=ops))
    requests["SwipeStream"] = operations

    numbers_ = st.sampled_from([1, 2, 3, 4, 5, 15, 99])
    extra_field = st.one_of(
        st.tuples(numbers_, st.integers(0, (1 << 64) - 1)).map(lambda f: tag(f[0], 0) + varint(f[1])),
        st.tuples(numbers_, st.binary(min_size=8, max_size=8)).map(lambda f: tag(f[0], 1) + f[1]),
        st.tuples(numbers_, st.binary(min_size=4, max_size=4)).map(lambda f: tag(f[0], 5) + f[1]),
        st.tuples(numbers_, st.text(max_size=20)).map(lambda f: ld(f[0], f[1].encode())))
    extras = st.one_of(st.just(b""), st.lists(extra_field, min_size=1, max_size=3).map(b"".join))

    method = st.sampled_from(sorted(requests))
    return method.flatmap(lambda m: st.tuples(
        st.just(m), st.tuples(requests[m], extras).map(lambda t: t[0].SerializeToString() + t[1])))


def test_requests_with_odd_values_on_every_method(live, funded):
    """Well-formed requests with extreme values reach validation and the ledger: every answer
    fits what protobuf decoded, and the ledger applied exactly what was answered as applied."""
    target = Client(live.stub).funded_card(1_000_000)
    grown, applied = journal_growth_and_applied(
        live, requests_with_odd_values(target).map(lambda case: [case]), max_examples=200,
        suppress_health_check=[HealthCheck.too_slow])
    assert grown == applied
    still_serving(live, funded)


@st.composite
def mutations(draw, bases: dict[str, bytes]) -> tuple[str, bytes]:
    """A valid request of some method with a few bytes flipped, cut, inserted or deleted."""
    method = draw(st.sampled_from(sorted(bases)))
    data = bytearray(bases[method])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if how == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at]
    return method, bytes(data)


def test_mutated_valid_requests_apply_only_what_they_acknowledge(live, funded):
    """Damaged good requests: any operation the ledger applied was answered as applied."""
    unopened = new_card_number()  # money operations can reach no card: at best CARD_NOT_FOUND
    bases = {method: valid_request(method, unopened, f"mut-{method}") for method in UNARY}
    bases["OpenCard"] = pb.OpenCardRequest(client_time_us=now_us(),   # this one may open cards; each is counted
        request_id="mut-open", card=cpb.CardRef(card_number=unopened), tier=2, till=TILL,
        profile=pb.MemberProfile(name="Li Lei", phone="+86 138", birthday="1990-05-17")).SerializeToString()
    bases["SwipeStream"] = pb.Operation(purchase=purchase_request(unopened, 100, "mut-swipe")).SerializeToString()
    grown, applied = journal_growth_and_applied(live, mutations(bases).map(lambda case: [case]),
                                                max_examples=150)
    assert grown == applied
    still_serving(live, funded)


# ---- 2. extreme field values through the generated stubs ----------------------------------------

def refusal(call) -> tuple[grpc.StatusCode, cpb.Failure]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), failure_of(err.value)


@pytest.mark.parametrize("amount", [0, -1, INT64_MIN])
@pytest.mark.parametrize("kind", ["top_up", "purchase"])
def test_non_positive_amounts_are_refused_and_change_nothing(live, client, funded, kind, amount):
    card = client.card(funded)
    journal = ledger_counts(live)
    request_id = rid()
    code, fail = refusal(lambda: getattr(client, kind)(funded, amount, request_id))
    field = "amount_minor" if kind == "top_up" else "gross_amount_minor"
    assert (code, fail.reason, fail.field) == (C.INVALID_ARGUMENT, R.REASON_INVALID_AMOUNT, field)
    assert client.card(funded) == card
    assert not_applied(live, request_id)
    assert ledger_counts(live) == journal


def test_top_up_to_int64_max_then_one_more_overflows(live, client):
    number = new_card_number()
    client.open(number)
    topped = client.top_up(number, INT64_MAX)
    assert topped.balance_after.principal_minor == topped.balance_after.available_minor == INT64_MAX
    card = client.card(number)
    journal, requests = ledger_counts(live)
    request_id = rid()
    code, fail = refusal(lambda: client.top_up(number, 1, request_id))
    assert (code, fail.reason) == (C.OUT_OF_RANGE, R.REASON_AMOUNT_OVERFLOW)
    assert client.card(number) == card
    # A ledger decline: its request record replays the decline, no journal entry.
    op = live.stub.GetOperation(pb.GetOperationRequest(request_id=request_id))
    assert op.found and op.result.reason == R.REASON_AMOUNT_OVERFLOW and op.result.seq == 0
    assert ledger_counts(live) == (journal, requests + 1)
    code, fail = refusal(lambda: client.top_up(number, INT64_MAX))
    assert fail.reason == R.REASON_AMOUNT_OVERFLOW and client.card(number) == card


@pytest.mark.parametrize("tier", [0, 2])  # gold's 90 % of INT64_MAX needs the kernel's 128-bit product
def test_purchase_of_int64_max_on_a_funded_card_is_insufficient_funds(live, client, tier):
    number = client.funded_card(10_000, tier=tier)
    card = client.card(number)
    journal, _ = ledger_counts(live)
    code, fail = refusal(lambda: client.purchase(number, INT64_MAX))
    assert (code, fail.reason, fail.available_minor) == (
        C.FAILED_PRECONDITION, R.REASON_INSUFFICIENT_FUNDS, 10_000)
    assert client.card(number) == card
    assert ledger_counts(live)[0] == journal


@pytest.mark.parametrize("tier", [TIERS, 255, 256, UINT32_MAX])  # 256 would wrap to 0 in a byte
def test_tiers_past_the_program_are_refused(live, client, tier):
    number, request_id = new_card_number(), rid()
    code, fail = refusal(lambda: client.open(number, tier=tier, request_id=request_id))
    assert (code, fail.reason, fail.field) == (C.INVALID_ARGUMENT, R.REASON_INVALID_TIER, "tier")
    assert refusal(lambda: client.card(number))[1].reason == R.REASON_CARD_NOT_FOUND
    assert not_applied(live, request_id)


def test_uint32_max_till_and_home_store_ids_are_kept_exactly(live, client, funded):
    number = new_card_number()
    client.open(number, home_store_id=UINT32_MAX)
    assert client.card(number).profile.home_store_id == UINT32_MAX
    paid = client.purchase(funded, 7, store_id=UINT32_MAX, terminal_id=UINT32_MAX, staff_id=UINT32_MAX)
    assert paid.reason == R.REASON_OK

    from cardcore import layout
    from cardcore.ledger import Ledger

    checkpointed(live.data_dir)
    ledger = Ledger(f"{live.data_dir}/ledger", sync=False, readonly=True)
    try:
        journal = dict(ledger.dump()["journal"])
    finally:
        ledger.close()
    entry = journal[layout.SEQ_KEY.pack(paid.seq)]
    assert struct.unpack_from("<III", entry, 104) == (UINT32_MAX,) * 3  # store, terminal, staff


def _id(length: int) -> str:
    return (uuid.uuid4().hex * 3)[:length]


@pytest.mark.parametrize("request_id", [
    _id(65), "", "réq-0001", "١٢٣٤", "ｒｅｑ１", "req 1", "req/1", "req\n", "\x00", "a" * 1000], ids=[
    "65 chars", "empty", "accented", "arabic-indic digits", "full-width", "space", "slash", "newline",
    "nul", "1000 chars"])
def test_bad_request_ids_are_refused_and_change_nothing(live, client, funded, request_id):
    card = client.card(funded)
    journal = ledger_counts(live)
    code, fail = refusal(lambda: client.purchase(funded, 1, request_id=request_id))
    assert (code, fail.reason, fail.field) == (C.INVALID_ARGUMENT, R.REASON_INVALID_REQUEST_ID, "request_id")
    code, fail = refusal(lambda: live.stub.GetOperation(pb.GetOperationRequest(request_id=request_id)))
    assert fail.reason == R.REASON_INVALID_REQUEST_ID  # not "not found": it could never be used
    assert client.card(funded) == card
    assert ledger_counts(live) == journal


def test_a_64_character_request_id_is_accepted(live, client, funded):
    request_id = "A.b_c:d-" + _id(56)
    assert len(request_id) == 64
    paid = client.purchase(funded, 1, request_id=request_id)
    op = live.stub.GetOperation(pb.GetOperationRequest(request_id=request_id))
    assert op.found and op.result.seq == paid.seq and op.result.request_id == request_id


def luhn_number(length: int) -> str:
    partial = "".join(random.choice("0123456789") for _ in range(length - 1))
    return partial + cards.luhn_check_digit(partial)


@pytest.mark.parametrize("length", [8, 19])
def test_card_numbers_of_8_and_19_digits_are_accepted(client, length):
    number = luhn_number(length)
    client.open(number)
    client.top_up(number, 500)
    card = client.card(number)
    assert card.balance.available_minor == 500
    assert number not in card.masked_number and card.masked_number.endswith(number[-2:])


@pytest.mark.parametrize("number", [
    luhn_number(7), luhn_number(20), luhn_number(100), "",
    "١٢٣٤٥٦٧٨", "۱۲۳۴۵۶۷۸۹۰۱۲۳۴۵۶", "１２３４５６７８",  # Arabic-Indic, Persian, full-width digits
    "4111 1111 1111 1111", "4111-1111-1111-1111", "+4111111111111111", "4111111111111112",
    "411111111111111\x00", "4111111111111111\n"], ids=[
    "7 digits", "20 digits", "100 digits", "empty", "arabic-indic", "persian", "full-width", "spaces",
    "dashes", "plus sign", "check digit wrong", "nul", "newline"])
def test_bad_card_numbers_are_refused_everywhere(live, client, number):
    request_id = rid()
    for call in (lambda: client.open(number, request_id=request_id),
                 lambda: client.top_up(number, 100),
                 lambda: client.card(number)):
        code, fail = refusal(call)
        assert (code, fail.reason, fail.field) == (
            C.INVALID_ARGUMENT, R.REASON_INVALID_CARD_NUMBER, "card.card_number")
    assert not_applied(live, request_id)


@pytest.mark.parametrize("name", ["x" * 64, "é" * 64, "\U0001F600" * 64, "王芳 Wang Fang"],
                         ids=["64 ascii", "64 accented", "64 emoji", "cjk"])
def test_profile_names_up_to_64_characters_are_kept(client, name):
    number = new_card_number()
    client.open(number, name=name)
    assert client.card(number).profile.name == name


@pytest.mark.parametrize("name, reason", [
    ("x" * 65, R.REASON_FIELD_TOO_LONG), ("\U0001F600" * 65, R.REASON_FIELD_TOO_LONG),
    ("\x00" * 65, R.REASON_FIELD_TOO_LONG),  # the length is checked first
    ("a\x00b", R.REASON_INVALID_ARGUMENT), ("a\nb", R.REASON_INVALID_ARGUMENT),
    ("\x1b[31mred", R.REASON_INVALID_ARGUMENT), ("a\x7fb", R.REASON_INVALID_ARGUMENT),
    ("evil\u202egnp.exe", R.REASON_INVALID_ARGUMENT), ("tab\there", R.REASON_INVALID_ARGUMENT)], ids=[
    "65 ascii", "65 emoji", "65 nul", "nul", "newline", "escape", "del", "rtl override", "tab"])
def test_bad_profile_names_are_refused_and_open_nothing(live, client, name, reason):
    number, request_id = new_card_number(), rid()
    code, fail = refusal(lambda: client.open(number, name=name, request_id=request_id))
    assert (code, fail.reason, fail.field) == (C.INVALID_ARGUMENT, reason, "profile.name")
    assert refusal(lambda: client.card(number))[1].reason == R.REASON_CARD_NOT_FOUND
    assert not_applied(live, request_id)


def test_a_batch_of_10000_is_applied_and_10001_is_refused_whole(live, client):
    numbers = [new_card_number() for _ in range(4)]
    for number in numbers:
        client.open(number)

    def top_ups(n: int) -> list[pb.Operation]:
        return [pb.Operation(top_up=pb.TopUpRequest(client_time_us=now_us(), 
            request_id=rid(), card=cpb.CardRef(card_number=numbers[i % 4]), amount_minor=1, till=TILL))
            for i in range(n)]

    journal, _ = ledger_counts(live)
    too_many = top_ups(BATCH_OPS_MAX + 1)
    code, fail = refusal(lambda: live.stub.SubmitBatch(pb.SubmitBatchRequest(operations=too_many),
                                                       timeout=30))
    assert (code, fail.reason, fail.field) == (C.INVALID_ARGUMENT, R.REASON_BATCH_TOO_LARGE, "operations")
    assert not_applied(live, too_many[0].top_up.request_id)
    assert not_applied(live, too_many[-1].top_up.request_id)
    assert [client.card(n).balance.available_minor for n in numbers] == [0] * 4
    assert ledger_counts(live)[0] == journal

    results = live.stub.SubmitBatch(pb.SubmitBatchRequest(operations=top_ups(BATCH_OPS_MAX)),
                                    timeout=30).results
    assert len(results) == BATCH_OPS_MAX and all(r.reason == R.REASON_OK for r in results)
    assert [client.card(n).balance.available_minor for n in numbers] == [2_500] * 4
    assert ledger_counts(live)[0] == journal + BATCH_OPS_MAX


def nested_ld(number: int, depth: int) -> bytes:
    payload = b"\x00"
    for _ in range(depth):
        payload = ld(number, payload)
    return payload


# Unknown fields of every wire type, including unknown groups 50 deep and length-delimited
# garbage nested 1,000 deep (opaque bytes to the parser), all appended to a valid message.
# (No request message has an enum field, so there is no unknown enum value to send.)
UNKNOWN_FIELDS = (tag(99, 0) + varint(UINT32_MAX << 20) + ld(100, b"\xff\xfe garbage \x00")
                  + tag(101, 5) + b"\x01\x02\x03\x04" + tag(102, 1) + struct.pack("<q", -1)
                  + groups(103, 50) + nested_ld(104, 1_000))


def test_unknown_fields_are_ignored_and_not_part_of_the_payload(live, client, funded):
    request_id = rid()
    plain = purchase_request(funded, 250, request_id)
    answer = call_raw(live, "Purchase", plain.SerializeToString() + UNKNOWN_FIELDS)
    assert answer.code == C.OK, answer
    paid = pb.OperationResult.FromString(answer.reply)
    assert paid.reason == R.REASON_OK and paid.amount_minor == 250 and not paid.replayed
    again = client.stub.Purchase(plain)  # the same request without them: the same payload
    assert again.replayed and again.seq == paid.seq

    # In a batch: unknown fields in the batch, the operation and the request itself; and an
    # operation of a kind this server does not know (a later oneof member) is refused alone.
    op_id = rid()
    op = pb.Operation(top_up=pb.TopUpRequest(client_time_us=sent_at(op_id), request_id=op_id, card=cpb.CardRef(card_number=funded),
                                             amount_minor=40, till=TILL))
    inner = op.top_up.SerializeToString() + UNKNOWN_FIELDS
    payload = ld(1, ld(2, inner) + UNKNOWN_FIELDS) + ld(1, ld(90, b"\x0a\x03xyz")) + UNKNOWN_FIELDS
    answer = call_raw(live, "SubmitBatch", payload)
    assert answer.code == C.OK, answer
    ok, unknown_kind = pb.SubmitBatchResponse.FromString(answer.reply).results
    assert (ok.request_id, ok.reason, ok.amount_minor) == (op_id, R.REASON_OK, 40)
    assert (unknown_kind.reason, unknown_kind.failure.field) == (R.REASON_INVALID_ARGUMENT, "op")

    # On the stream too.
    swipe_id = rid()
    swipe = pb.Operation(purchase=purchase_request(funded, 30, swipe_id)).SerializeToString()
    replies, end = stream_raw(live, [swipe + UNKNOWN_FIELDS])
    assert end.code == C.OK and [(r.request_id, r.reason) for r in replies] == [(swipe_id, R.REASON_OK)]
    assert ledger_counts(live)  # still clean


@pytest.mark.parametrize("wire_value, decoded", [
    (1 << 63, INT64_MIN),          # a uint64 past INT64_MAX is a negative int64
    ((1 << 64) - 1, -1),
    (1 << 64, 0),                  # 65 bits in a 10-byte varint: protobuf drops bit 64 ...
    ((1 << 64) + 100, 100),        # ... so this is a top-up of 100, not an amount "beyond int64"
])
def test_amounts_past_64_bits_on_the_wire_are_what_protobuf_decodes(live, client, wire_value, decoded):
    number = new_card_number()
    client.open(number)
    request_id = rid()
    head = pb.TopUpRequest(client_time_us=sent_at(request_id), request_id=request_id, card=cpb.CardRef(card_number=number), till=TILL)
    payload = head.SerializeToString() + tag(3, 0) + varint(wire_value)
    assert pb.TopUpRequest.FromString(payload).amount_minor == decoded  # upb's reading of it
    answer = call_raw(live, "TopUp", payload)
    if decoded <= 0:
        assert_refused(answer, R.REASON_INVALID_AMOUNT, "amount_minor")
        assert not_applied(live, request_id)
        assert client.card(number).balance.available_minor == 0
    else:
        assert answer.code == C.OK and pb.OperationResult.FromString(answer.reply).amount_minor == decoded
        assert client.card(number).balance.available_minor == decoded


# ---- 3. a stream of valid and invalid operations ----------------------------------------------------

def test_swipe_stream_answers_a_mix_of_good_and_bad_operations_in_order(live, client):
    number = client.funded_card(10_000)
    full = new_card_number()
    client.open(full)
    client.top_up(full, INT64_MAX)
    journal, _ = ledger_counts(live)

    def purchase(gross, request_id=None, card=number):
        return pb.Operation(purchase=purchase_request(card, gross, request_id or rid()))

    def top_up(amount, card=number, request_id=None):
        return pb.Operation(top_up=pb.TopUpRequest(client_time_us=now_us(), request_id=request_id or rid(), card=cpb.CardRef(
            card_number=card), amount_minor=amount, till=TILL))

    def open_card(card=None, tier=0, name=""):
        return pb.Operation(open_card=pb.OpenCardRequest(client_time_us=now_us(), 
            request_id=rid(), card=cpb.CardRef(card_number=card or new_card_number()), tier=tier,
            profile=pb.MemberProfile(name=name), till=TILL))

    first = rid()
    plan = [  # (operation, the reason it must get, the field named for INVALID_* reasons)
        (purchase(1_000, first), R.REASON_OK, ""),
        (purchase(0), R.REASON_INVALID_AMOUNT, "gross_amount_minor"),
        (top_up(INT64_MIN), R.REASON_INVALID_AMOUNT, "amount_minor"),
        (top_up(-1), R.REASON_INVALID_AMOUNT, "amount_minor"),
        (purchase(100, _id(65)), R.REASON_INVALID_REQUEST_ID, "request_id"),
        (purchase(100, "réq-1"), R.REASON_INVALID_REQUEST_ID, "request_id"),
        (open_card(luhn_number(7)), R.REASON_INVALID_CARD_NUMBER, "card.card_number"),
        (open_card("١٢٣٤٥٦٧٨"), R.REASON_INVALID_CARD_NUMBER, "card.card_number"),
        (open_card(tier=UINT32_MAX), R.REASON_INVALID_TIER, "tier"),
        (open_card(name="x" * 65), R.REASON_FIELD_TOO_LONG, "profile.name"),
        (open_card(name="bell\x07"), R.REASON_INVALID_ARGUMENT, "profile.name"),
        (pb.Operation(), R.REASON_INVALID_ARGUMENT, "op"),
        (purchase(INT64_MAX), R.REASON_INSUFFICIENT_FUNDS, ""),
        (purchase(100, card=new_card_number()), R.REASON_CARD_NOT_FOUND, ""),
        (top_up(1, card=full), R.REASON_AMOUNT_OVERFLOW, ""),
        (open_card(number), R.REASON_CARD_ALREADY_EXISTS, ""),
        (top_up(500), R.REASON_OK, ""),
        (purchase(1_000, first), R.REASON_OK, ""),                           # a retry: replayed
        (purchase(999, first), R.REASON_DUPLICATE_REQUEST_MISMATCH, ""),
        (purchase(2_000), R.REASON_OK, ""),
    ]
    replies = list(live.stub.SwipeStream(iter([op for op, _, _ in plan]), timeout=DEADLINE_S * 2))
    assert len(replies) == len(plan)
    for (op, reason, field), reply in zip(plan, replies, strict=True):
        kind = op.WhichOneof("op")
        assert reply.request_id == (getattr(op, kind).request_id if kind else "")
        assert (reply.reason, reply.failure.field) == (reason, field), (op, reply)
        assert reply.status_code == CODE[reason].value[0]
        assert (reply.seq != 0) == (reason == R.REASON_OK)
    assert replies[12].failure.available_minor == 10_000 - 1_000
    assert replies[17].replayed and replies[17].seq == replies[0].seq
    applied = [r for r in replies if r.reason == R.REASON_OK and not r.replayed]
    assert [r.seq for r in applied] == sorted(r.seq for r in applied)
    assert replies[-1].balance_after.available_minor == 10_000 - 1_000 + 500 - 2_000
    assert client.card(number).balance.available_minor == 10_000 - 1_000 + 500 - 2_000
    assert client.card(full).balance.available_minor == INT64_MAX
    assert ledger_counts(live)[0] == journal + len(applied) == journal + 3
