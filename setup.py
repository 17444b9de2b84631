"""Build: one import package, ``cardcore``, mapped from the repository's folders.

    core/   -> cardcore          domain logic, ledger, reference arithmetic
    server/ -> cardcore.server   gRPC service, writer, CLI
    ext/    -> cardcore.ext      Cython kernel
    proto/cardcore/v1 -> cardcore.v1   generated protobuf + gRPC modules

The ``_pb2`` modules are generated from proto/ by grpc_tools at build time
(``build_py`` and editable installs alike) and are never committed.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "proto")
GEN_DIR = os.path.join(PROTO_ROOT, "cardcore", "v1")


def generate_protos() -> None:
    """Run protoc over proto/cardcore/v1/*.proto into the same folder."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(glob.glob(os.path.join(GEN_DIR, "*.proto")))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={PROTO_ROOT}",
            f"--pyi_out={PROTO_ROOT}", f"--grpc_python_out={PROTO_ROOT}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(sources))
    init = os.path.join(GEN_DIR, "__init__.py")
    with open(init, "w") as f:
        f.write('"""Generated from proto/cardcore/v1 by the build; do not edit."""\n')


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


generate_protos()  # also for editable installs, whose build_py may only map folders

setup(
    packages=["cardcore", "cardcore.server", "cardcore.ext", "cardcore.v1"],
    package_dir={
        "cardcore": "core",
        "cardcore.server": "server",
        "cardcore.ext": "ext",
        "cardcore.v1": "proto/cardcore/v1",
    },
    package_data={"cardcore.v1": ["*.proto", "*.pyi"], "cardcore.ext": ["*.pxd", "*.pyx", "*.h"]},
    ext_modules=cythonize(
        [Extension("cardcore.ext.kernel", ["ext/kernel.pyx"], include_dirs=["ext"],
                   extra_compile_args=["-O2"]),
         Extension("cardcore.ext.cardno", ["ext/cardno.pyx"], extra_compile_args=["-O2"]),
         Extension("cardcore.ext.wire", ["ext/wire.pyx"], extra_compile_args=["-O2"]),
         # SubmitBatch's per-operation glue; libcrypto for SHA-256 (the card index's HMAC)
         Extension("cardcore.ext.batchwire", ["ext/batchwire.pyx"], include_dirs=["ext"],
                   libraries=["crypto"], extra_compile_args=["-O2", "-Wno-deprecated-declarations"]),
         # the writer's per-operation glue after the kernel (ext/blake2b.h for the lines' digest)
         Extension("cardcore.ext.writerglue", ["ext/writerglue.pyx"], include_dirs=["ext"],
                   extra_compile_args=["-O2"]),
         Extension("cardcore.ext.daytotals", ["ext/daytotals.pyx"], extra_compile_args=["-O2"]),
         Extension("cardcore.ext.members", ["ext/members.pyx"], extra_compile_args=["-O2"]),
         # OpenSSL's libcrypto (Debian: libssl-dev to build, libssl3 to run)
         Extension("cardcore.ext.aes", ["ext/aes.pyx"], libraries=["crypto"],
                   extra_compile_args=["-O2"]),
         Extension("cardcore.ext.chain", ["ext/chain.pyx"], libraries=["crypto"],
                   extra_compile_args=["-O2"])],
        include_path=["ext"],
        compiler_directives={"language_level": "3"},
    ),
    cmdclass={"build_py": BuildPyWithProtos},
)
