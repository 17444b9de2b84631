"""The proto as integrators expect it (issue 14): buf lint (STANDARD, the exceptions of
proto/buf.yaml pinned here to the RPCs and values they are for), buf breaking against the last
released contract, a comment on every message, field, enum value, service and RPC, the ErrorInfo
metadata keys the proto lists being the ones the server sends, GetOperation's explicit state,
and server reflection in v1 beside v1alpha, over the real server on loopback.

The buf tests need buf from tools/buf (`npm ci --prefix tools/buf`, as .ci/run does) and are
skipped with that message where it is missing; the others need nothing but the venv.
"""
from __future__ import annotations

import os
import re
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2 as refl

from cardcore.server import errors
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import rid, sent_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = os.path.join(ROOT, "proto")
BUF = os.path.join(ROOT, "tools", "buf", "node_modules", ".bin", "buf")
INSTALL = "npm ci --prefix tools/buf"
# The last released contract: release 1 (the Makefile's RELEASE, what bench-release builds).
RELEASED = "5c616b6d0b93bfe493b676f4e0b09c4306527c0d"
BUF_TIMEOUT_S = 180

needs_buf = pytest.mark.skipif(not os.access(BUF, os.X_OK),
                               reason=f"buf is not installed: {INSTALL} (needs node and npm)")

SERVICES = [pb.DESCRIPTOR.services_by_name["CardService"],
            apb.DESCRIPTOR.services_by_name["AdminService"]]


def buf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BUF, *args], cwd=PROTO, capture_output=True, text=True,
                          timeout=BUF_TIMEOUT_S)


@needs_buf
def test_buf_lint_passes_with_the_standard_rules():
    out = buf("lint", "--error-format=text")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_buf
def test_buf_breaking_finds_nothing_against_the_released_contract():
    git = os.path.join(ROOT, ".git")
    if not os.path.exists(git):
        pytest.skip("not a git checkout: no released contract to compare with")
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
    if shallow == "true":
        pytest.skip(f"a shallow clone: {RELEASED[:7]} may be missing (git fetch --unshallow)")
    out = buf("breaking", "--error-format=text", "--against",
              f"{git}#ref={RELEASED},subdir=proto")
    assert out.returncode == 0, out.stdout + out.stderr


@needs_buf
def test_buf_breaking_catches_a_renumbered_field(tmp_path):
    """The check can fail: a copy of the contract with Till.store_id renumbered is refused."""
    copy = tmp_path / "proto"
    (copy / "cardcore" / "v1").mkdir(parents=True)
    for name in os.listdir(os.path.join(PROTO, "cardcore", "v1")):
        if name.endswith(".proto"):
            with open(os.path.join(PROTO, "cardcore", "v1", name)) as f:
                text = f.read()
            if name == "common.proto":
                text = text.replace("uint32 store_id = 1;", "uint32 store_id = 40;")
            (copy / "cardcore" / "v1" / name).write_text(text)
    out = subprocess.run([BUF, "breaking", str(copy), "--against", PROTO, "--error-format=text"],
                         capture_output=True, text=True, timeout=BUF_TIMEOUT_S)
    assert out.returncode != 0 and "Till" in out.stdout, out.stdout + out.stderr


# What proto/buf.yaml excepts, exactly: a new RPC or enum cannot hide under its per-file rules.
THING_ANSWERS = {("CardService", "GetCard"): "Card", ("CardService", "GetBasket"): "Basket",
                 ("CardService", "GetReceipt"): "Receipt",
                 ("AdminService", "RevokeTerminal"): "Terminal",
                 ("AdminService", "RemoveOperator"): "Operator",
                 ("AdminService", "LoadProgram"): "ProgramVersion",
                 ("AdminService", "GetProgram"): "ProgramVersion"}
SHARED_ANSWERS = {"OperationResult", "ProgramVersion"}


def test_the_lint_exceptions_cover_only_the_released_rpcs_and_reason_ok():
    for service in SERVICES:
        for method in service.methods:
            key = (service.name, method.name)
            request, response = method.input_type.name, method.output_type.name
            if key == ("CardService", "SwipeStream"):
                assert request == "Operation" and response == "OperationResult"
                continue
            assert request == f"{method.name}Request", key
            assert response in (f"{method.name}Response", "OperationResult",
                                THING_ANSWERS.get(key)), key
    uses: dict[str, int] = {}
    for service in SERVICES:
        for method in service.methods:
            for t in {method.input_type.name, method.output_type.name}:
                uses[t] = uses.get(t, 0) + 1
    assert {t for t, n in uses.items() if n > 1} == SHARED_ANSWERS
    for module in (cpb, pb, apb):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            zero = enum.values_by_number[0].name
            assert zero.endswith("_UNSPECIFIED") or (enum.name, zero) == ("Reason", "REASON_OK")


def contract_with_comments() -> list[descriptor_pb2.FileDescriptorProto]:
    """The .proto files compiled with their source info (comments), by grpc_tools' protoc."""
    import tempfile

    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = sorted(f"cardcore/v1/{n}" for n in os.listdir(os.path.join(PROTO, "cardcore", "v1"))
                   if n.endswith(".proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        assert protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", "--include_source_info",
                            f"--descriptor_set_out={out}", *files]) == 0
        with open(out, "rb") as f:
            return list(descriptor_pb2.FileDescriptorSet.FromString(f.read()).file)


def uncommented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Every message, field, enum, enum value, service and RPC of `file` without a leading or
    trailing comment (paths as descriptor.proto numbers them)."""
    said = {tuple(loc.path) for loc in file.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()}
    missing: list[str] = []

    def check(path: list[int], what: str) -> None:
        if tuple(path) not in said:
            missing.append(f"{file.name}: {what}")

    def enum(e, path, outer):
        check(path, f"enum {outer}{e.name}")
        for i, value in enumerate(e.value):
            check(path + [2, i], f"enum value {value.name}")

    def message(m, path, outer):
        name = outer + m.name
        check(path, f"message {name}")
        for i, field in enumerate(m.field):
            check(path + [2, i], f"field {name}.{field.name}")
        for i, nested in enumerate(m.nested_type):
            message(nested, path + [3, i], name + ".")
        for i, e in enumerate(m.enum_type):
            enum(e, path + [4, i], name + ".")

    for i, m in enumerate(file.message_type):
        message(m, [4, i], "")
    for i, e in enumerate(file.enum_type):
        enum(e, [5, i], "")
    for i, service in enumerate(file.service):
        check([6, i], f"service {service.name}")
        for j, method in enumerate(service.method):
            check([6, i, 2, j], f"rpc {service.name}.{method.name}")
    return missing


def test_every_message_field_enum_value_and_rpc_has_a_comment():
    files = contract_with_comments()
    assert {f.name for f in files} >= {"cardcore/v1/common.proto", "cardcore/v1/card_service.proto",
                                       "cardcore/v1/admin_service.proto"}
    missing = [line for f in files for line in uncommented(f)]
    assert missing == [], "\n".join(missing)


def test_the_comment_check_sees_a_missing_comment():
    file = descriptor_pb2.FileDescriptorProto(name="x.proto")
    file.message_type.add(name="Bare").field.add(name="amount_minor", number=1)
    assert uncommented(file) == ["x.proto: message Bare", "x.proto: field Bare.amount_minor"]


def test_the_error_info_keys_the_proto_lists_are_the_ones_the_server_sends():
    """Every reason, with every Failure fact set: the ErrorInfo metadata keys that come out are
    the keys Failure's comment lists, no more, no fewer."""
    with open(os.path.join(PROTO, "cardcore", "v1", "common.proto")) as f:
        text = f.read()
    comment = text[:text.index("message Failure {")].rsplit("\n\n", 1)[1]
    listed = set(re.findall(r"`(\w+)`\s+=", comment))
    sent: set[str] = set()
    for reason in cpb.Reason.values():
        if reason == cpb.REASON_OK:
            continue
        fail = errors.failure(reason, field="amount_minor", available_minor=100,
                              pin_tries_left=0, detail="line 3: x")
        status = status_pb2.Status.FromString(dict(errors.status_details(fail))[
            "grpc-status-details-bin"])
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info) and info.reason == cpb.Reason.Name(reason)
        assert info.domain == "cardcore.v1"
        assert status.details[1].Is(cpb.Failure.DESCRIPTOR)
        sent |= set(info.metadata)
    assert listed == sent == {"field", "available_minor", "pin_tries_left", "detail"}


def ask(stub, request_id: str, client_time_us: int = 0) -> pb.GetOperationResponse:
    return stub.GetOperation(pb.GetOperationRequest(request_id=request_id,
                                                    client_time_us=client_time_us))


def test_get_operation_says_applied_declined_or_not_found(server, client):
    """A top-up of 50.00 applied; a purchase of 80.00 declined (insufficient funds: found, but
    DECLINED with seq 0, which `found` alone would not tell); a request never sent: NOT_FOUND;
    one older than the retention window: EXPIRED."""
    number = client.funded_card(5_000)
    paid = rid()
    client.purchase(number, 1_000, request_id=paid)
    short = rid()
    with pytest.raises(grpc.RpcError) as err:
        client.purchase(number, 8_000, request_id=short)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    applied = ask(server.stub, paid, sent_at(paid))
    assert (applied.state, applied.found, applied.result.reason, applied.result.paid_minor) == \
        (pb.OPERATION_STATE_APPLIED, True, cpb.REASON_OK, 1_000)
    assert applied.result.seq > 0 and applied.result.replayed
    declined = ask(server.stub, short, sent_at(short))
    assert (declined.state, declined.found, declined.result.reason, declined.result.seq) == \
        (pb.OPERATION_STATE_DECLINED, True, cpb.REASON_INSUFFICIENT_FUNDS, 0)
    assert declined.result.failure.available_minor == 4_000
    never = rid()
    unknown = ask(server.stub, never, sent_at(never))
    assert (unknown.state, unknown.found) == (pb.OPERATION_STATE_NOT_FOUND, False)
    old = ask(server.stub, rid(), sent_at(never) - 8 * 24 * 3600 * 1_000_000)
    assert (old.state, old.found) == (pb.OPERATION_STATE_EXPIRED, False)


def reflect(channel: grpc.Channel, version: str,
            *requests: refl.ServerReflectionRequest) -> list[refl.ServerReflectionResponse]:
    """A reflection client of `version`, on the wire: v1's messages are v1alpha's, renamed."""
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=refl.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=refl.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=10))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_services(server, version):
    listed, card, itself = reflect(
        server.channel, version,
        refl.ServerReflectionRequest(list_services=""),
        refl.ServerReflectionRequest(file_containing_symbol="cardcore.v1.CardService"),
        refl.ServerReflectionRequest(file_containing_symbol=f"grpc.reflection.{version}."
                                                            "ServerReflection"))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"cardcore.v1.CardService", "cardcore.v1.AdminService", "grpc.health.v1.Health",
                     "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in card.file_descriptor_response.file_descriptor_proto]
    assert "cardcore/v1/card_service.proto" in {f.name for f in files}
    described = descriptor_pb2.FileDescriptorProto.FromString(
        itself.file_descriptor_response.file_descriptor_proto[0])
    assert (described.package, described.service[0].method[0].name) == \
        (f"grpc.reflection.{version}", "ServerReflectionInfo")
