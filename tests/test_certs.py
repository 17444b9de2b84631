"""The local CA: real certificates on disk and a real mutual-TLS handshake over loopback."""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cardcore.server import certs

WHO_METHOD = "/cardcore.test.Who/Am"
CALL_TIMEOUT_S = 5


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(_read(path))


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind).value


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def ca_dir(tmp_path) -> str:
    """A CA, a server certificate and a terminal certificate, as `certs init` and `terminal` do."""
    out = str(tmp_path / "certs")
    certs.make_ca(out)
    certs.make_server_cert(out, ["cardcore.example", "10.0.0.5", "::1"])
    certs.make_client_cert(out, certs.terminal_cn(17))
    return out


# ---- files and fields ----------------------------------------------------------------

def test_ca_is_a_path_length_0_signing_ca(ca_dir):
    ca = _cert(os.path.join(ca_dir, "ca.pem"))
    ca.verify_directly_issued_by(ca)
    assert _cn(ca) == "cardcore local CA"
    basic = _ext(ca, x509.BasicConstraints)
    assert basic.ca and basic.path_length == 0
    usage = _ext(ca, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert _mode(ca_dir) == 0o700
    assert _mode(os.path.join(ca_dir, "ca.key")) == 0o600


def test_validity_starts_before_now_for_clock_skew(ca_dir):
    now = datetime.datetime.now(datetime.UTC)
    server = _cert(os.path.join(ca_dir, "server.pem"))
    assert now - datetime.timedelta(minutes=6) < server.not_valid_before_utc < now
    assert server.not_valid_after_utc - now > datetime.timedelta(days=824)


def test_server_cert_names_every_host_and_always_loopback(ca_dir):
    ca = _cert(os.path.join(ca_dir, "ca.pem"))
    server = _cert(os.path.join(ca_dir, "server.pem"))
    server.verify_directly_issued_by(ca)
    sans = _ext(server, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["cardcore.example", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1")]
    assert list(_ext(server, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _mode(os.path.join(ca_dir, "server.key")) == 0o600


def test_terminal_cert_carries_its_identity(ca_dir):
    ca = _cert(os.path.join(ca_dir, "ca.pem"))
    leaf = _cert(os.path.join(ca_dir, "terminal-17.pem"))
    leaf.verify_directly_issued_by(ca)
    assert _cn(leaf) == "terminal:17"
    assert certs.parse_terminal_cn(_cn(leaf)) == 17
    sans = _ext(leaf, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:cardcore:terminal:17"]
    assert list(_ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not _ext(leaf, x509.BasicConstraints).ca
    assert _ext(leaf, x509.KeyUsage).digital_signature
    assert (_ext(leaf, x509.AuthorityKeyIdentifier).key_identifier
            == _ext(ca, x509.SubjectKeyIdentifier).digest)
    assert _mode(os.path.join(ca_dir, "terminal-17.key")) == 0o600


def test_backoffice_cert(ca_dir):
    cert_path, key_path = certs.make_client_cert(ca_dir, certs.backoffice_cn("ops-1"))
    assert os.path.basename(cert_path) == "backoffice-ops-1.pem"
    assert os.path.basename(key_path) == "backoffice-ops-1.key"
    leaf = _cert(cert_path)
    leaf.verify_directly_issued_by(_cert(os.path.join(ca_dir, "ca.pem")))
    assert _cn(leaf) == "backoffice:ops-1"
    assert certs.parse_terminal_cn(_cn(leaf)) is None


def test_nats_node_and_role_certs(ca_dir):
    """A NATS node's certificate serves both ends of a route (server and client usages) for
    its hosts; a role's is a client certificate named nats:<role>, only the roles' (a replica's
    of one shard: replica-s<n>)."""
    node, _ = certs.make_nats_node_cert(ca_dir, "n1", ["10.0.0.7"])
    leaf = _cert(node)
    leaf.verify_directly_issued_by(_cert(os.path.join(ca_dir, "ca.pem")))
    assert (os.path.basename(node), _cn(leaf)) == ("nats-node-n1.pem", "nats-node:n1")
    assert set(_ext(leaf, x509.ExtendedKeyUsage)) == {ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ipaddress.ip_address("10.0.0.7") in _ext(leaf, x509.SubjectAlternativeName) \
        .get_values_for_type(x509.IPAddress)
    front, _ = certs.make_nats_role_cert(ca_dir, "front")
    assert (os.path.basename(front), _cn(_cert(front))) == ("nats-front.pem", "nats:front")
    assert list(_ext(_cert(front), x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    one_shard, _ = certs.make_nats_role_cert(ca_dir, "replica-s4095")
    assert (os.path.basename(one_shard), _cn(_cert(one_shard))) == ("nats-replica-s4095.pem",
                                                                   "nats:replica-s4095")
    its_follower, _ = certs.make_nats_role_cert(ca_dir, "follower-s4095")
    assert _cn(_cert(its_follower)) == "nats:follower-s4095"
    for refused in ("admin", "replica-s", "replica-s01", "replica-s4096", "replica-sx",
                    "follower-s", "follower-s-1", "follower-s4096", "front-s1"):
        with pytest.raises(ValueError):
            certs.make_nats_role_cert(ca_dir, refused)
    with pytest.raises(ValueError):
        certs.make_nats_node_cert(ca_dir, "bad/name", [])


def test_refuses_to_overwrite(ca_dir):
    key_before = _read(os.path.join(ca_dir, "terminal-17.key"))
    with pytest.raises(FileExistsError, match="terminal-17"):
        certs.make_client_cert(ca_dir, "terminal:17")
    with pytest.raises(FileExistsError, match="ca"):
        certs.make_ca(ca_dir)
    assert _read(os.path.join(ca_dir, "terminal-17.key")) == key_before


def test_refuses_when_only_the_key_exists(ca_dir):
    stray = os.path.join(ca_dir, "terminal-18.key")
    with open(stray, "wb") as f:
        f.write(b"not mine")
    with pytest.raises(FileExistsError, match="terminal-18.key"):
        certs.make_client_cert(ca_dir, "terminal:18")
    assert _read(stray) == b"not mine"
    assert not os.path.exists(os.path.join(ca_dir, "terminal-18.pem"))


def test_leaf_needs_a_ca(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CA"):
        certs.make_client_cert(str(tmp_path), "terminal:1")


@pytest.mark.parametrize("common_name", ["../x", "a/b", ".hidden", ""])
def test_client_name_must_be_a_plain_file_name(ca_dir, common_name):
    with pytest.raises(ValueError):
        certs.make_client_cert(ca_dir, common_name)


@pytest.mark.parametrize(("cn", "terminal_id"), [
    ("terminal:17", 17), ("terminal:1", 1), ("terminal:4294967295", 2**32 - 1),
    ("terminal:0", None), ("terminal:-1", None), ("terminal:+1", None), ("terminal:007", None),
    ("terminal:4294967296", None), ("terminal:99999999999", None), ("terminal:", None),
    ("terminal:1 ", None), ("terminal:17\n", None), ("terminal:١٧", None),
    ("Terminal:17", None), ("backoffice:x", None), ("", None),
])
def test_parse_terminal_cn(cn, terminal_id):
    assert certs.parse_terminal_cn(cn) == terminal_id


@pytest.mark.parametrize("terminal_id", [0, -1, 2**32])
def test_terminal_cn_refuses_out_of_range(terminal_id):
    with pytest.raises(ValueError):
        certs.terminal_cn(terminal_id)


# ---- mutual TLS with grpc ------------------------------------------------------------

def _who(request: bytes, context) -> bytes:
    return context.auth_context()["x509_common_name"][0]


@pytest.fixture
def tls_target(ca_dir):
    """A grpc server that requires a client certificate from the CA and answers with its CN."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "cardcore.test.Who", {"Am": grpc.unary_unary_rpc_method_handler(_who)})])
    creds = grpc.ssl_server_credentials(
        [(_read(os.path.join(ca_dir, "server.key")), _read(os.path.join(ca_dir, "server.pem")))],
        root_certificates=_read(os.path.join(ca_dir, "ca.pem")), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _ask(target: str, creds: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(target, creds) as channel:
        return channel.unary_unary(WHO_METHOD)(b"", timeout=CALL_TIMEOUT_S)


def test_mutual_tls_names_the_terminal(ca_dir, tls_target):
    creds = grpc.ssl_channel_credentials(_read(os.path.join(ca_dir, "ca.pem")),
                                         _read(os.path.join(ca_dir, "terminal-17.key")),
                                         _read(os.path.join(ca_dir, "terminal-17.pem")))
    assert _ask(tls_target, creds) == b"terminal:17"


def test_mutual_tls_refuses_a_client_without_certificate(ca_dir, tls_target):
    creds = grpc.ssl_channel_credentials(_read(os.path.join(ca_dir, "ca.pem")))
    with pytest.raises(grpc.RpcError) as err:
        _ask(tls_target, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(ca_dir, tls_target, tmp_path):
    other = str(tmp_path / "other")
    certs.make_ca(other)
    cert_path, key_path = certs.make_client_cert(other, "terminal:17")
    creds = grpc.ssl_channel_credentials(_read(os.path.join(ca_dir, "ca.pem")),
                                         _read(key_path), _read(cert_path))
    with pytest.raises(grpc.RpcError) as err:
        _ask(tls_target, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- command line --------------------------------------------------------------------

def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cardcore")
    certs.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    return args.func(args)


def test_cli_init_terminal_client(tmp_path, capsys):
    out = str(tmp_path / "certs")
    assert _run("init", "--dir", out, "--host", "till.example") == 0
    assert _run("terminal", "17", "--dir", out) == 0
    assert _run("client", "ops.1", "--dir", out) == 0
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == [
        "ca.pem", "ca.key", "server.pem", "server.key", "terminal-17.pem", "terminal-17.key",
        "backoffice-ops.1.pem", "backoffice-ops.1.key"]
    sans = _ext(_cert(os.path.join(out, "server.pem")), x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["till.example", "localhost"]


def test_cli_init_defaults_to_loopback(tmp_path):
    out = str(tmp_path / "certs")
    assert _run("init", "--dir", out) == 0
    sans = _ext(_cert(os.path.join(out, "server.pem")), x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_cli_init_twice_refuses(tmp_path, capsys):
    out = str(tmp_path / "certs")
    assert _run("init", "--dir", out) == 0
    key_before = _read(os.path.join(out, "ca.key"))
    assert _run("init", "--dir", out) == 2
    assert capsys.readouterr().err.startswith("cardcore: ")
    assert _read(os.path.join(out, "ca.key")) == key_before


@pytest.mark.parametrize("argv", [
    ("terminal", "0"), ("terminal", "4294967296"), ("terminal", "007"), ("terminal", "x"),
    ("terminal", "-1"), ("client", ""), ("client", "a" * 33), ("client", "a/b"),
    ("client", "ops 1"),
])
def test_cli_refuses_bad_names(tmp_path, capsys, argv):
    out = str(tmp_path / "certs")
    assert _run("init", "--dir", out) == 0
    capsys.readouterr()
    assert _run(*argv, "--dir", out) == 2
    assert capsys.readouterr().err.startswith("cardcore: ")
    assert sorted(os.listdir(out)) == ["ca.key", "ca.pem", "server.key", "server.pem"]


def test_cli_bad_host_makes_nothing(tmp_path, capsys):
    out = str(tmp_path / "certs")
    assert _run("init", "--dir", out, "--host", "héllo") == 2
    assert capsys.readouterr().err.startswith("cardcore: ")
    assert not os.path.exists(out)


def test_cli_without_ca(tmp_path, capsys):
    assert _run("terminal", "17", "--dir", str(tmp_path)) == 2
    assert "certs init" in capsys.readouterr().err
