"""Server reflection in both versions clients ask for: grpc.reflection.v1 (grpcurl, Postman and
the grpc-go/grpc-java tools try it first) beside grpc.reflection.v1alpha (older clients).

grpcio-reflection (1.85) serves v1alpha only. v1 is the same protocol under another package:
grpc/reflection/v1/reflection.proto is v1alpha's file with the package renamed, every message and
field number alike (grpc-go serves both from one implementation). So v1 is served here by
grpcio-reflection's own servicer through a second method path, its messages read and written
with v1alpha's classes, and v1's descriptor is registered in the default pool (v1alpha's, renamed)
so that reflection can describe itself in both versions."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha import reflection_pb2_grpc as alpha_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def _register_v1_descriptor() -> None:
    """grpc.reflection.v1's file descriptor in the default pool, made from v1alpha's (once: a
    pool that has it already, from a later grpcio-reflection or a second server, keeps it)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(proto)
    old = alpha.DESCRIPTOR.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.options.Clear()  # v1alpha's java/go options name v1alpha's packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old}."):
                field.type_name = f".{V1_PACKAGE}." + field.type_name[len(old) + 2:]
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type[len(old) + 2:]
            method.output_type = f".{V1_PACKAGE}." + method.output_type[len(old) + 2:]
    pool.AddSerializedFile(proto.SerializeToString())


def enable(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Reflection v1alpha and v1 on `server`, listing `service_names` and both reflections."""
    _register_v1_descriptor()
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)  # one servicer answers both versions
    alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=alpha.ServerReflectionRequest.FromString,
            response_serializer=alpha.ServerReflectionResponse.SerializeToString)})
    server.add_generic_rpc_handlers((v1,))
