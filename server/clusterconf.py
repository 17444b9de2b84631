"""The cluster's NATS node configuration, written in one place: for the hosts of a real cluster
(``cardcore cluster-config``, with the systemd units in ``deploy/``) and for ``make cluster`` and
the tests on loopback (cardcore.server.devcluster).

A node: JetStream with file storage fsynced before every acknowledgement (``sync_interval:
always``), messages up to 8 MB (a group), routes to every other node, a monitoring port whose
``/healthz`` says when JetStream is ready; with certificates, mutual TLS on the client port and
on the routes, and the roles' users, mapped from the client certificate's name
(``ROLE_PERMISSIONS``, and a replica user per shard that reaches that shard alone,
``shard_replica_permissions``; docs/cluster.md, "Who may do what on NATS").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from cardcore.natsnames import (CHECKPOINTS_BUCKET, LEADERS_BUCKET, ROUTES_KEY, SHARDS_BUCKET,
                                follower_inbox_prefix, log_subject, replica_inbox_prefix,
                                stream_name, submit_subject, tick_subject)
from cardcore.keyring import load_index_key, write_index_key
from cardcore.shards import SHARD_NUMBER_MAX

from .certs import NATS_ROUTE_URI, make_ca, make_nats_node_cert, make_nats_role_cert

# What each role's certificate may do on NATS (docs/cluster.md). A replica: the parts of the
# JetStream API it uses (a stream's or bucket's info and creation, message gets, the purge of
# retention; never a message delete or an update), the KV puts of the leases, the genesis and
# the checkpoints, the logs' subjects, submissions (answered through allow_responses, and only
# to a submitter's inbox: the replica checks), the leader's ticks (a group's number, said and
# heard), its own inbox; a front: submit, a stream's info (where its follower must be before a
# read of everything), and its own inbox (not the replicas' reads); a front's follower: the
# reads of a replica, the ticks, its retention report, never a log, a lease, a genesis or a
# purge. A replica and a follower run with their role's one-shard form (replica-s<n>,
# follower-s<n>: below); the every-shard replica and follower are for tools.
ROLE_PERMISSIONS = {
    "replica": {"publish": ["$JS.API.STREAM.INFO.*", "$JS.API.STREAM.CREATE.*",
                            "$JS.API.STREAM.MSG.GET.*", "$JS.API.DIRECT.GET.>",
                            "$JS.API.STREAM.PURGE.*", "$KV.cardcore-leaders.>",
                            "$KV.cardcore-shards.>", "$KV.cardcore-checkpoints.>",
                            "cardcore.*.log", "cardcore.*.tick"],
                "subscribe": ["cardcore.*.submit", "cardcore.*.tick", "_INBOX_replica.>"],
                "allow_responses": True},
    "front": {"publish": ["cardcore.*.submit", "$JS.API.STREAM.INFO.*",
                          # the routing table of a front over several card shards: read, and
                          # made by the first (jetlog.ensure_routes)
                          f"$KV.{SHARDS_BUCKET}.{ROUTES_KEY}",
                          f"$JS.API.STREAM.MSG.GET.KV_{SHARDS_BUCKET}",
                          f"$JS.API.DIRECT.GET.KV_{SHARDS_BUCKET}",
                          f"$JS.API.DIRECT.GET.KV_{SHARDS_BUCKET}.>"],
              "subscribe": ["_INBOX_front.>"]},
    "follower": {"publish": ["$JS.API.STREAM.INFO.*", "$JS.API.STREAM.MSG.GET.*",
                             "$JS.API.DIRECT.GET.>", "$KV.cardcore-checkpoints.>"],
                 "subscribe": ["cardcore.*.tick", "_INBOX_follower.>"]},
}
SHARDS_DEFAULT = 2   # shards whose replicas get a user (and a certificate) each
SHARDS_MAX = SHARD_NUMBER_MAX + 1  # (cardcore replica --shard 0..4095)


def shard_replica_role(shard: int) -> str:
    """The role of a replica of one shard alone: its certificate is ``nats:replica-s<n>``."""
    assert 0 <= shard < SHARDS_MAX, shard
    return f"replica-s{shard}"


def shard_follower_role(shard: int) -> str:
    """The role of a front's follower of one shard alone: ``nats:follower-s<n>``."""
    assert 0 <= shard < SHARDS_MAX, shard
    return f"follower-s{shard}"


def _reads(names: tuple[str, ...], apis: tuple[str, ...]) -> list[str]:
    """The JetStream API calls ``apis``, and direct gets, on the streams ``names``."""
    return [*(f"$JS.API.STREAM.{api}.{s}" for s in names for api in apis),
            *(f"$JS.API.DIRECT.GET.{s}{tail}" for s in names for tail in ("", ".>"))]


def _shard_reads(shard: int, apis: tuple[str, ...]) -> list[str]:
    """``_reads`` on one shard's stream and on the three buckets. The buckets' records of other
    shards (leases, genesis, checkpoints: who leads where, never card data) stay readable: a
    bucket's reads are one API subject for every key."""
    return _reads((stream_name(shard),
                   *(f"KV_{b}" for b in (LEADERS_BUCKET, SHARDS_BUCKET, CHECKPOINTS_BUCKET))),
                  apis)


def shard_replica_permissions(shard: int, admin_shard: int | None = None) -> dict:
    """A replica role that reaches one shard alone: what ``replica`` may do, on that shard's
    stream, subjects, keys and inboxes only; and with an admin shard (not this one), read its
    stream too (the leader relays its groups: docs/cluster.md, "The admin shard")."""
    relayed = ([] if admin_shard is None or admin_shard == shard
               else _reads((stream_name(admin_shard),), ("INFO", "MSG.GET")))
    return {"publish": [*_shard_reads(shard, ("INFO", "CREATE", "MSG.GET")), *relayed,
                        f"$JS.API.STREAM.PURGE.{stream_name(shard)}",
                        f"$KV.{LEADERS_BUCKET}.s{shard}", f"$KV.{SHARDS_BUCKET}.s{shard}-genesis",
                        f"$KV.{CHECKPOINTS_BUCKET}.s{shard}", log_subject(shard),
                        tick_subject(shard)],
            "subscribe": [submit_subject(shard), tick_subject(shard),
                          f"{replica_inbox_prefix(shard)}.>"],
            "allow_responses": True}


def shard_follower_permissions(shard: int) -> dict:
    """A front's follower of one shard alone: what ``follower`` may do (read, report its
    checkpoint), on that shard's stream, checkpoint key, ticks and inboxes only; so a front
    host's key for one shard cannot forge another shard's retention report (which could purge
    that stream up to its leader's checkpoint)."""
    return {"publish": [*_shard_reads(shard, ("INFO", "MSG.GET")),
                        f"$KV.{CHECKPOINTS_BUCKET}.s{shard}"],
            "subscribe": [tick_subject(shard), f"{follower_inbox_prefix(shard)}.>"]}


def nats_users(shards: int, admin_shard: int | None = None) -> dict[str, dict]:
    """Every user of the nodes: the roles', and a replica role and a follower role per shard
    0..shards-1 (with ``admin_shard``, one of them: the others' replicas read its stream)."""
    assert 0 <= shards <= SHARDS_MAX, shards
    assert admin_shard is None or 0 <= admin_shard < shards, admin_shard
    return {**ROLE_PERMISSIONS,
            **{shard_replica_role(s): shard_replica_permissions(s, admin_shard)
               for s in range(shards)},
            **{shard_follower_role(s): shard_follower_permissions(s) for s in range(shards)}}


CLUSTER_NAME = "cardcore"
NODES_MIN, NODES_MAX = 3, 7          # a quorum that survives a node (3) .. what we ever tried (7)
CLIENT_PORT, ROUTE_PORT, HTTP_PORT = 4222, 6222, 8222  # NATS's own defaults
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True)
class Node:
    name: str           # server_name, and its certificate's (nats-node-NAME.pem)
    host: str           # the address it listens on and the others reach it by
    client_port: int = CLIENT_PORT
    route_port: int = ROUTE_PORT
    http_port: int = HTTP_PORT


def node_config(node: Node, peers: list[Node], store_dir: str, certs_dir: str | None,
                shards: int = SHARDS_DEFAULT, admin_shard: int | None = None) -> str:
    """One node's nats-server configuration; ``certs_dir`` (None: plain, no users) holds ca.pem
    and the node's nats-node-NAME.pem/.key; ``shards``: the shards with a replica and a follower user each."""
    routes = ", ".join(f"nats-route://{p.host}:{p.route_port}" for p in peers if p != node)
    client_tls = route_tls = ""
    if certs_dir is not None:
        files = (f'  cert_file: "{certs_dir}/nats-node-{node.name}.pem"\n'
                 f'  key_file: "{certs_dir}/nats-node-{node.name}.key"\n'
                 f'  ca_file: "{certs_dir}/ca.pem"\n  timeout: 2\n')
        users = "\n".join(f'    {{ user: "CN=nats:{role}", permissions: {json.dumps(perms)} }}'
                          for role, perms in nats_users(shards, admin_shard).items())
        client_tls = (f"tls {{\n{files}  verify_and_map: true\n}}\n"
                      f"authorization {{\n  users = [\n{users}\n  ]\n}}\n")
        # a route must be another node: its certificate maps to the routes' one user (every
        # node's carries NATS_ROUTE_URI); a role's certificate from the same CA does not
        route_tls = (f"  tls {{\n{files}  verify_and_map: true\n  }}\n"
                     f'  authorization {{ user: "{NATS_ROUTE_URI}" }}\n')
    return f"""{client_tls}server_name: {node.name}
listen: {node.host}:{node.client_port}
http: {node.host}:{node.http_port}
max_payload: 8MB
jetstream {{
  store_dir: "{store_dir}"
  sync_interval: always
}}
cluster {{
  name: {CLUSTER_NAME}
  listen: {node.host}:{node.route_port}
  routes: [{routes}]
{route_tls}}}
"""


def make_certs(certs_dir: str, nodes: list[Node], shards: int = SHARDS_DEFAULT,
               ca_name: str = "cardcore cluster CA") -> None:
    """A CA, each node's certificate (for its host) and each role's (a replica's and a follower's per shard too),
    in ``certs_dir``."""
    make_ca(certs_dir, ca_name)
    for node in nodes:
        make_nats_node_cert(certs_dir, node.name, [node.host])
    for role in nats_users(shards):
        make_nats_role_cert(certs_dir, role)


def urls_of(nodes: list[Node]) -> str:
    return ",".join(f"nats://{n.host}:{n.client_port}" for n in nodes)


# ---- cardcore cluster-config ---------------------------------------------------------------

def write_hosts(out_dir: str, nodes: list[Node], etc_dir: str, data_dir: str,
                program: str | None = None, keyring: str | None = None,
                shards: int = SHARDS_DEFAULT, admin_shard: int | None = None) -> list[str]:
    """Every host's files under ``out_dir/<node>/`` (to copy to the host's ``etc_dir``):
    ``nats.conf``, ``replica.env`` and ``nats/`` (the CA's certificate, the node's certificate
    and key, a replica certificate per shard 0..shards-1, each reaching its shard alone, which
    ``replica.env`` names with ``{shard}``; with ``keyring``, the chain's index key alone,
    0600); the
    fronts' under ``out_dir/front/`` (``front.env``, the front role's certificate and key, a
    follower certificate per shard for its follower, each reaching its shard alone, which
    ``front.env`` names with ``{shard}``, and with ``keyring`` the whole keyring: a front reads
    PIN blocks and card data); the CA's key stays in
    ``out_dir/ca/`` (keep it off the hosts). The paths written inside are the hosts' own."""
    import shutil

    ca_dir = os.path.join(out_dir, "ca")
    if os.path.exists(ca_dir):
        raise FileExistsError(f"{out_dir} holds a cluster's files already: choose another --out")
    make_certs(ca_dir, nodes, shards)
    written = []

    def put(path: str, text: str | None = None, source: str | None = None,
            mode: int = 0o644) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if source is not None:
            shutil.copyfile(source, path)
        else:
            with open(path, "w") as f:
                f.write(text)
        os.chmod(path, mode)
        written.append(path)

    for node in nodes:
        here = os.path.join(out_dir, node.name)
        host_etc = etc_dir.replace('{node}', node.name)
        host_certs = f"{host_etc}/nats"
        put(os.path.join(here, "nats.conf"), node_config(
            node, nodes, f"{data_dir.replace('{node}', node.name)}/nats", host_certs, shards,
            admin_shard))
        put(os.path.join(here, "replica.env"), (
            "# cardcore replica on this host (deploy/cardcore-replica@.service)\n"
            f"CARDCORE_NATS_URLS={urls_of(nodes)}\n"
            f"CARDCORE_NATS_CA={host_certs}/ca.pem\n"
            "# {shard}: the replica's own (cardcore replica --shard): its shard's certificate\n"
            f"CARDCORE_NATS_CERT={host_certs}/nats-replica-s{{shard}}.pem\n"
            f"CARDCORE_NATS_KEY={host_certs}/nats-replica-s{{shard}}.key\n"
            + (f"CARDCORE_PROGRAM={host_etc}/program.toml\n" if program else "")
            + (f"CARDCORE_ADMIN_SHARD={admin_shard}\n" if admin_shard is not None else "")
            + (f"CARDCORE_KEYRING={host_etc}/index-key.json\n" if keyring else "")))
        if program:  # a new shard's genesis: the same document on every host
            put(os.path.join(here, "program.toml"), source=program)
        if keyring:  # every replica of a shard: the same index key (checked at start), alone
            write_index_key(os.path.join(here, "index-key.json"), load_index_key(keyring))
            written.append(os.path.join(here, "index-key.json"))
        role_files = [(f"nats-{shard_replica_role(s)}.{ext}", mode) for s in range(shards)
                      for ext, mode in (("pem", 0o644), ("key", 0o600))]
        for stem, mode in (("ca.pem", 0o644), (f"nats-node-{node.name}.pem", 0o644),
                           (f"nats-node-{node.name}.key", 0o600), *role_files):
            put(os.path.join(here, "nats", stem), source=os.path.join(ca_dir, stem), mode=mode)
    front_etc = etc_dir.replace('{node}', "front")
    follower_files = [(f"nats-{shard_follower_role(s)}.{ext}", mode) for s in range(shards)
                      for ext, mode in (("pem", 0o644), ("key", 0o600))]
    for stem, mode in (("ca.pem", 0o644), ("nats-front.pem", 0o644), ("nats-front.key", 0o600),
                       *follower_files):
        put(os.path.join(out_dir, "front", stem), source=os.path.join(ca_dir, stem), mode=mode)
    if keyring:
        put(os.path.join(out_dir, "front", "keyring.json"), source=keyring, mode=0o600)
    put(os.path.join(out_dir, "front", "front.env"), (
        "# cardcore serve --cluster on a front host (deploy/cardcore-front.service)\n"
        f"CARDCORE_NATS_URLS={urls_of(nodes)}\n"
        f"CARDCORE_NATS_CA={front_etc}/ca.pem\n"
        f"CARDCORE_NATS_CERT={front_etc}/nats-front.pem\n"
        f"CARDCORE_NATS_KEY={front_etc}/nats-front.key\n"
        "# {shard}: the front's own (cardcore serve --cluster --shard): its follower's certificate\n"
        f"CARDCORE_FOLLOWER_CERT={front_etc}/nats-follower-s{{shard}}.pem\n"
        f"CARDCORE_FOLLOWER_KEY={front_etc}/nats-follower-s{{shard}}.key\n"
        + (f"CARDCORE_KEYRING={front_etc}/keyring.json\n" if keyring else
           "# CARDCORE_KEYRING=... the chain's keyring (cluster-config --keyring puts it here)\n")))
    return written


def parse_node(text: str, ports: tuple[int, int, int]) -> Node:
    """``NAME=HOST`` (a DNS name or an IP address), with the cluster's ports."""
    name, sep, host = text.partition("=")
    if not sep or not _NAME_RE.fullmatch(name) or not host or any(c in host for c in " ,/:\"'"):
        raise ValueError(f"--node wants NAME=HOST (NAME: a-z, 0-9, -), not {text!r}")
    return Node(name, host, *ports)


def cmd_cluster_config(args) -> int:
    """Write the hosts' NATS configuration, certificates and replica environment."""
    import sys

    try:
        ports = (args.client_port, args.route_port, args.http_port)
        if len(set(ports)) != 3:
            raise ValueError("the client, route and monitoring ports must differ")
        nodes = [parse_node(t, ports) for t in args.nodes or ()]
        if not NODES_MIN <= len(nodes) <= NODES_MAX or len(nodes) % 2 == 0:
            raise ValueError(f"give {NODES_MIN}, 5 or {NODES_MAX} --node (an odd number: a "
                             "quorum survives a node)")
        if len({n.name for n in nodes}) != len(nodes) or len({n.host for n in nodes}) != len(nodes):
            raise ValueError("every --node needs a name and a host of its own")
        if args.program is not None and not os.path.isfile(args.program):
            raise ValueError(f"--program {args.program}: no such file")
        if args.keyring is not None:
            load_index_key(args.keyring)  # a keyring, readable: ValueError or OSError otherwise
        if args.admin_shard is not None and args.admin_shard >= args.shards:
            raise ValueError(f"--admin-shard {args.admin_shard}: one of the --shards "
                             f"(0..{args.shards - 1})")
        paths = write_hosts(args.out, nodes, args.etc_dir, args.host_data_dir, args.program,
                            args.keyring, args.shards, args.admin_shard)
    except (OSError, ValueError) as exc:
        print(f"cardcore cluster-config: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"copy <node>/* to each host's {args.etc_dir}/ (owned by the cardcore user: its keys "
          f"are 0600), front/* to each front's {args.etc_dir.replace('{node}', 'front')}/; "
          f"keep {os.path.join(args.out, 'ca')} (the CA's key) off the hosts; units: "
          "deploy/cardcore-nats.service, deploy/cardcore-replica@.service, "
          "deploy/cardcore-front.service (docs/cluster.md)", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    from .text import int_arg

    p = sub.add_parser("cluster-config", help="the NATS configuration, certificates and replica "
                       "environment of a cluster's hosts (docs/cluster.md)")
    p.add_argument("--node", dest="nodes", action="append", metavar="NAME=HOST",
                   help="a host: its node name and the address the others reach it by "
                        "(3, 5 or 7 of them)")
    p.add_argument("--out", required=True, help="a new folder for the files")
    p.add_argument("--program", default=None,
                   help="the card program (TOML) new shards start with, copied to every host "
                        "(default: none, the default program)")
    p.add_argument("--keyring", default=None,
                   help="the chain's keyring (the single server's, cardcore serve --keyring): "
                        "its index key alone is written to every host (index-key.json, 0600), "
                        "with which the replicas keep the member index (default: none, keyless "
                        "shards)")
    p.add_argument("--shards", type=int_arg(1, SHARDS_MAX), default=SHARDS_DEFAULT,
                   help="the shards: each gets NATS users and a replica and a follower "
                        "certificate that reach it alone (default %(default)s; a shard added "
                        "later: docs/cluster.md)")
    p.add_argument("--admin-shard", type=int_arg(0, SHARDS_MAX - 1), default=None,
                   help="one of the shards as the cluster's admin shard (docs/cluster.md, The "
                        "admin shard): the others' replicas may read its stream, and every "
                        "replica.env names it (default: none, a cluster whose shards each keep "
                        "their own admin state)")
    p.add_argument("--etc-dir", default="/etc/cardcore",
                   help="where the files go on each host (default %(default)s; {node} is the "
                        "node's name, for nodes that share a disk, as the tests' do)")
    p.add_argument("--host-data-dir", default="/var/lib/cardcore",
                   help="the hosts' data folder: NATS's store in its nats/ (default %(default)s; "
                        "{node} as in --etc-dir)")
    for flag, default, what in (("--client-port", CLIENT_PORT, "clients (replicas, fronts)"),
                                ("--route-port", ROUTE_PORT, "the other nodes' routes"),
                                ("--http-port", HTTP_PORT, "monitoring (/healthz)")):
        p.add_argument(flag, type=int_arg(1, 65535), default=default,
                       help=f"every node's port for {what} (default %(default)s)")
    p.set_defaults(func=cmd_cluster_config)
