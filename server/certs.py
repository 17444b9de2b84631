"""A local certificate authority for mutual TLS in a test or a small deployment.

Terminals prove who they are with client certificates, so even a single shop needs a CA
to issue them; this makes one in a folder, with a server certificate beside it. A chain
with its own PKI issues these certificates there instead, following the same names:

    terminal:<decimal terminal id>   a till, id 1..4294967295 without sign or leading zeros
    backoffice:<name>                a back-office client host, name 1..32 of [A-Za-z0-9._-]

The server reads the peer's certificate common name to tell which of the two is calling.

The cluster's NATS connections (docs/cluster.md) use the same CA: each NATS node a certificate for
both ends of a TLS connection (clients and the other nodes connect to it, it connects to the other
nodes), ``nats-node:<name>``; each process that connects a role certificate, which the NATS
nodes map to a user with that role's permissions:

    nats:replica                     a replica of any shard: the streams, the buckets, the submissions
    nats:replica-s<n>                the same, on shard n's stream, keys and subjects alone
    nats:front                       a front (and a tool): it may only submit to a shard's leader
    nats:follower                    a front's follower of any shard: reads, its retention report
    nats:follower-s<n>               the same, on shard n's stream, key and subjects alone
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cardcore.shards import SHARD_NUMBER_MAX

TERMINAL_CN_PREFIX = "terminal:"
BACKOFFICE_CN_PREFIX = "backoffice:"
TERMINAL_ID_MAX = 2**32 - 1
DEFAULT_CERT_DIR = "./var/cardcore/certs"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
SERVER_CN = "cardcore server"  # clients check the server's names in its SANs, not here
CLOCK_SKEW = datetime.timedelta(minutes=5)

NATS_NODE_CN_PREFIX = "nats-node:"
NATS_ROUTE_URI = "urn:cardcore:nats-route"  # every node's: the routes' one user (clusterconf)
NATS_ROLES = ("replica", "front", "follower")  # the role certificates' names are nats:<role>
_SHARD_ROLE_RE = re.compile(r"(?:replica|follower)-s(0|[1-9][0-9]{0,3})")  # one shard's
_TERMINAL_ID_RE = re.compile(r"[1-9][0-9]{0,9}")
_BACKOFFICE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
_FILE_STEM_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def terminal_cn(terminal_id: int) -> str:
    """The certificate common name that identifies a terminal."""
    if not 1 <= terminal_id <= TERMINAL_ID_MAX:
        raise ValueError(f"terminal id must be 1..{TERMINAL_ID_MAX}, not {terminal_id}")
    return f"{TERMINAL_CN_PREFIX}{terminal_id}"


def parse_terminal_cn(cn: str) -> int | None:
    """The terminal id in a common name, or None: one spelling per id, so ids compare as names."""
    if not cn.startswith(TERMINAL_CN_PREFIX):
        return None
    digits = cn[len(TERMINAL_CN_PREFIX):]
    if not _TERMINAL_ID_RE.fullmatch(digits):
        return None
    terminal_id = int(digits)
    return terminal_id if terminal_id <= TERMINAL_ID_MAX else None


def backoffice_cn(name: str) -> str:
    """The certificate common name that identifies a back-office client host."""
    if not _BACKOFFICE_NAME_RE.fullmatch(name):
        raise ValueError(f"back-office name must be 1..32 of A-Z a-z 0-9 . _ -, not {name!r}")
    return f"{BACKOFFICE_CN_PREFIX}{name}"


# ---- files ---------------------------------------------------------------------------

def _pair(out_dir: str, stem: str) -> tuple[str, str]:
    return os.path.join(out_dir, f"{stem}.pem"), os.path.join(out_dir, f"{stem}.key")


def _refuse_existing(*paths: str) -> None:
    """Checked before any key is made, so a refusal leaves nothing half-written."""
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists: refusing to overwrite it")


def _write_new(path: str, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_pair(cert_path: str, key_path: str, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> None:
    # Unencrypted: gRPC takes the key as clear PEM bytes; file mode 0600 is the protection.
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_new(key_path, key_pem, 0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_ca(out_dir: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = _pair(out_dir, "ca")
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        raise FileNotFoundError(f"no CA in {out_dir}: run 'cardcore certs init' first")
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return cert, key


# ---- certificates --------------------------------------------------------------------

def _builder(subject_cn: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False,
                         decipher_only=False)


def _make_leaf(out_dir: str, stem: str, common_name: str, sans: list[x509.GeneralName],
               usages: list[x509.ObjectIdentifier], days: int) -> tuple[str, str]:
    cert_path, key_path = _pair(out_dir, stem)
    ca_cert, ca_key = _load_ca(out_dir)
    _refuse_existing(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (_builder(common_name, ca_cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def make_ca(out_dir: str, common_name: str = "cardcore local CA",
            days: int = 3650) -> tuple[str, str]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    cert_path, key_path = _pair(out_dir, "ca")
    _refuse_existing(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (_builder(common_name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .sign(key, hashes.SHA256()))
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def _server_sans(hosts: list[str]) -> list[x509.GeneralName]:
    """Each host as an IP address if it parses as one, else a DNS name; ValueError if neither."""
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *DEFAULT_HOSTS]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host:
                raise ValueError("empty host name") from None
            sans.append(x509.DNSName(host))
    return sans


def make_server_cert(out_dir: str, hosts: list[str], days: int = 825) -> tuple[str, str]:
    """The server's certificate, valid for ``hosts`` and always for localhost and 127.0.0.1."""
    return _make_leaf(out_dir, "server", SERVER_CN, _server_sans(hosts),
                      [ExtendedKeyUsageOID.SERVER_AUTH], days)


def make_client_cert(out_dir: str, common_name: str, days: int = 825) -> tuple[str, str]:
    """A client certificate whose common name is the caller's identity (see the module doc)."""
    stem = common_name.replace(":", "-")
    if not _FILE_STEM_RE.fullmatch(stem):
        raise ValueError(f"common name {common_name!r} does not make a plain file name")
    sans = [x509.UniformResourceIdentifier(f"urn:cardcore:{common_name}")]
    return _make_leaf(out_dir, stem, common_name, sans, [ExtendedKeyUsageOID.CLIENT_AUTH], days)


def make_nats_node_cert(out_dir: str, name: str, hosts: list[str],
                        days: int = 825) -> tuple[str, str]:
    """A NATS node's certificate (``nats-node-NAME.pem``): a server to its clients and to the
    other nodes' routes, a client on its own routes to them, so both usages."""
    if not _BACKOFFICE_NAME_RE.fullmatch(name):
        raise ValueError(f"node name {name!r}: 1..32 of A-Z a-z 0-9 . _ -")
    sans = [*_server_sans(hosts), x509.UniformResourceIdentifier(NATS_ROUTE_URI)]
    return _make_leaf(out_dir, f"nats-node-{name}", f"{NATS_NODE_CN_PREFIX}{name}", sans,
                      [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days)


def make_nats_role_cert(out_dir: str, role: str, days: int = 825) -> tuple[str, str]:
    """A NATS client certificate of ``role`` (``nats-ROLE.pem``; see the module doc)."""
    shard = _SHARD_ROLE_RE.fullmatch(role)
    if role not in NATS_ROLES and not (shard and int(shard.group(1)) <= SHARD_NUMBER_MAX):
        raise ValueError(f"NATS role must be one of {', '.join(NATS_ROLES)}, replica-sN or "
                         f"follower-sN (one shard's), not {role!r}")
    return make_client_cert(out_dir, f"nats:{role}", days)


# ---- command line --------------------------------------------------------------------

def run(args) -> int:
    """``cardcore certs ...``: print the files written, or the reason nothing was."""
    try:
        if args.certs_command == "init":
            _server_sans(args.hosts or [])  # a bad --host stops here, before the CA is made
            _refuse_existing(*_pair(args.dir, "ca"), *_pair(args.dir, "server"))
            paths = [*make_ca(args.dir), *make_server_cert(args.dir, args.hosts or [])]
        elif args.certs_command == "terminal":
            terminal_id = parse_terminal_cn(f"{TERMINAL_CN_PREFIX}{args.id}")
            if terminal_id is None:
                raise ValueError(f"terminal id must be 1..{TERMINAL_ID_MAX}, not {args.id!r}")
            paths = [*make_client_cert(args.dir, terminal_cn(terminal_id))]
        elif args.certs_command == "nats-node":
            paths = [*make_nats_node_cert(args.dir, args.name, args.hosts or [])]
        elif args.certs_command == "nats-client":
            paths = [*make_nats_role_cert(args.dir, args.role)]
        else:
            paths = [*make_client_cert(args.dir, backoffice_cn(args.name))]
    except (OSError, ValueError) as exc:
        print(f"cardcore: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def add_parser(sub) -> None:
    """Register ``certs init|terminal|client|nats-node|nats-client`` on the ``cardcore`` subcommands."""
    certs = sub.add_parser("certs", help="a local CA for mutual TLS: server and client certs")
    commands = certs.add_subparsers(dest="certs_command", required=True)

    def cert_dir(p):
        p.add_argument("--dir", default=DEFAULT_CERT_DIR,
                       help="folder holding ca.pem and ca.key (default %(default)s)")
        p.set_defaults(func=run)

    p = commands.add_parser("init", help="make the CA and the server certificate")
    cert_dir(p)
    p.add_argument("--host", dest="hosts", action="append", metavar="HOST",
                   help="a DNS name or IP address the server is reached by (repeatable; "
                        "localhost and 127.0.0.1 are always included)")
    p = commands.add_parser("terminal", help="a client certificate for terminal ID")
    cert_dir(p)
    p.add_argument("id", metavar="ID", help=f"terminal id, 1..{TERMINAL_ID_MAX}")
    p = commands.add_parser("client", help="a client certificate for back-office host NAME")
    cert_dir(p)
    p.add_argument("name", metavar="NAME", help="1..32 of A-Z a-z 0-9 . _ -")
    p = commands.add_parser("nats-node", help="a cluster NATS node's certificate (docs/cluster.md)")
    cert_dir(p)
    p.add_argument("name", metavar="NAME", help="the node's name, 1..32 of A-Z a-z 0-9 . _ -")
    p.add_argument("--host", dest="hosts", action="append", metavar="HOST",
                   help="a DNS name or IP address the node is reached by (repeatable)")
    p = commands.add_parser("nats-client", help="a NATS role certificate: replica-sN, front, "
                                                "follower-sN (a front's), replica or follower")
    cert_dir(p)
    p.add_argument("role", metavar="ROLE",
                   help="replica-sN (a replica of shard N alone), replica (of every shard), "
                        "front (submits only), follower-sN (a front's follower of shard N "
                        "alone) or follower (of every shard): docs/cluster.md")
