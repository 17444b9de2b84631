"""Cluster test fixtures (docs/cluster.md): 3 nats-server nodes with JetStream on loopback, and
``cardcore replica`` processes (cardcore.server.devcluster); every process started and stopped
by its pid.

Without the cluster extra (``make cluster-deps``) the tests are skipped, saying so.
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from cardcore.server.devcluster import NatsCluster, ReplicaProcess, cluster_available


@pytest.fixture
def nats_cluster(tmp_path):
    """Three NATS nodes on loopback (skipped, saying why, without the cluster extra)."""
    why = cluster_available()
    if why:
        pytest.skip(why)
    cluster = NatsCluster(str(tmp_path))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def start_replica(tmp_path, nats_cluster):
    """Start replicas (on the test's NATS cluster); every one is stopped at the end."""
    started: list[ReplicaProcess] = []

    def start(name: str, shard: int = 0, *extra: str) -> ReplicaProcess:
        replica = ReplicaProcess(str(tmp_path / name), shard, nats_cluster.urls, *extra)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        if replica.proc.poll() is None:
            try:
                os.kill(replica.pid, signal.SIGCONT)  # a test that paused one
            except ProcessLookupError:
                pass
            replica.stop()


@pytest.fixture
def tls_cluster(tmp_path):
    """Three NATS nodes with mutual TLS and the roles' users (make cluster's setting, from
    ``clusterconf.ROLE_PERMISSIONS`` as it is when the fixture is set up), and a starter of
    replicas with their shard's replica certificate (``replica-s<n>``): (cluster, start,
    started); all stopped at the end."""
    why = cluster_available()
    if why:
        pytest.skip(why)
    cluster = NatsCluster(str(tmp_path / "nats"), tls=True)
    started: list[ReplicaProcess] = []

    def start(name: str, shard: int, *extra: str) -> ReplicaProcess:
        started.append(ReplicaProcess(str(tmp_path / name), shard, cluster.urls, *extra,
                                      *cluster.replica_args(shard)))
        return started[-1]

    try:
        yield cluster, start, started
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.stop()
        cluster.stop()


def nats_monitor(http_port: int, page: str) -> dict:
    """A page of a NATS node's monitoring port (``routez``, ``connz?limit=4096``...), as JSON."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/{page}", timeout=5) as r:
        return json.load(r)


def ledger_digest(data_dir: str) -> tuple[str, dict]:
    """(a BLAKE2b of every record of every sub-database, meta and its applied group included,
    the verify report) of a stopped replica's ledger: identical replicas, identical digests."""
    import hashlib

    import lmdb

    from cardcore.server.cmd_server import _verify_at

    path = os.path.join(data_dir, "ledger")
    h = hashlib.blake2b(digest_size=32)
    env = lmdb.open(path, readonly=True, max_dbs=64, lock=False)
    try:
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                for k, v in txn.cursor(db=db):
                    h.update(json.dumps([name.hex(), k.hex(), len(v)]).encode())
                    h.update(v)
    finally:
        env.close()
    return h.hexdigest(), _verify_at(path)
