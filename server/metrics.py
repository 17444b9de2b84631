"""Prometheus metrics, served on their own port (``--metrics-listen``).

What a chain's operators watch: operations by type and outcome, call
latency, group-commit sizes and round trips, queue depth, LMDB map use. The
hot path pays little: batches count their outcomes first and add once per
distinct (type, reason); gauges are read when Prometheus scrapes.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cardcore.v1 import common_pb2 as cpb

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
GROUP_OPS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

_TYPE_NAMES = {v: k.removeprefix("OPERATION_TYPE_").lower() for k, v in cpb.OperationType.items()}
_REASON_NAMES = dict((v, k) for k, v in cpb.Reason.items())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._front_lags: list[Callable[[], int]] = []  # (watch_front)
        self.operations = Counter(
            "cardcore_operations", "Mutating operations answered, by type and reason",
            ["type", "reason"], registry=self.registry)
        self.call_seconds = Histogram(
            "cardcore_call_seconds", "Time from a call's arrival to its answer, by RPC",
            ["rpc"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.group_ops = Histogram(
            "cardcore_group_operations", "Operations per group commit",
            buckets=GROUP_OPS_BUCKETS, registry=self.registry)
        self.group_seconds = Histogram(
            "cardcore_group_seconds", "A group's round trip through the writer (apply, commit, fsync)",
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.queue_ops = Gauge("cardcore_queue_operations", "Operations waiting for the writer",
                               registry=self.registry)
        self.map_bytes = Gauge("cardcore_lmdb_map_bytes", "LMDB map size", registry=self.registry)
        self.used_bytes = Gauge("cardcore_lmdb_used_bytes", "LMDB pages in use x page size",
                                registry=self.registry)

    def watch(self, queued_ops: Callable[[], int], lmdb_usage: Callable[[], tuple[int, int]]) -> None:
        """Gauges read on scrape: the writer queue and the ledger's map."""
        self.queue_ops.set_function(queued_ops)
        self.map_bytes.set_function(lambda: lmdb_usage()[0])
        self.used_bytes.set_function(lambda: lmdb_usage()[1])

    def watch_front(self, follower_lag_groups: Callable[[], int]) -> None:
        """A cluster's front (``cardcore.server.front``): what it sent again and why, the
        answers it found again in its follower, the follower's restarts and how far it is behind
        what the front was answered (a read of a card waits that long at most). A front over
        several shards calls it once per shard: the counters are shared, the lag is the most
        any shard's follower is behind."""
        self._front_lags.append(follower_lag_groups)
        if len(self._front_lags) > 1:  # (the metrics exist: the shard's lag is among them now)
            return
        self.front_resent = Counter(
            "cardcore_front_resent", "Submits sent to the shard again: not_leader (or the "
            "leader's queue full: not applied) or unknown (unanswered: maybe applied)", ["why"],
            registry=self.registry)
        self.front_recovered = Counter(
            "cardcore_front_recovered", "Operations whose re-send was refused (a KSN, a "
            "terminal, an operator) answered with their original outcome from the follower",
            registry=self.registry)
        self.front_follower_restarts = Counter(
            "cardcore_front_follower_restarts", "Times the front started its follower again",
            registry=self.registry)
        lag = Gauge("cardcore_front_follower_lag_groups", "Groups this front was answered for "
                    "that its follower does not hold yet", registry=self.registry)
        lag.set_function(lambda: max(f() for f in self._front_lags))

    def count(self, op_type: int, reason: int, n: int = 1) -> None:
        self.operations.labels(_TYPE_NAMES.get(op_type, "unknown"),
                               _REASON_NAMES.get(reason, str(reason))).inc(n)

    def serve(self, listen: str) -> str:
        """Start the HTTP endpoint; return the bound HOST:PORT (port 0 picks a free one)."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1",
                                            registry=self.registry)
        return f"{host or '127.0.0.1'}:{server.server_port}"
