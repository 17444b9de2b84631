"""Cluster: the names on NATS (streams, subjects, inboxes, KV buckets and keys), in a module of
their own so that what only names them (``cardcore cluster-config``'s permissions, the command
line) does not import nats-py (``cardcore.jetlog`` does, and uses these)."""
from __future__ import annotations

import struct

# Each role's replies come to inboxes of its own, so that the NATS users can keep them apart
# (a submitter must not hear a replica's reads of the log): docs/cluster.md.
REPLICA_INBOX_PREFIX = "_INBOX_replica"
SUBMIT_INBOX_PREFIX = "_INBOX_front"
FOLLOWER_INBOX_PREFIX = "_INBOX_follower"  # a front's follower (replica --follow-only)


def replica_inbox_prefix(shard: int) -> str:
    """A replica's inboxes: under REPLICA_INBOX_PREFIX (the every-shard replica user hears them
    all), a token of its shard's (a one-shard replica user hears its shard's alone)."""
    return f"{REPLICA_INBOX_PREFIX}.s{shard}"


def follower_inbox_prefix(shard: int) -> str:
    """A front's follower's inboxes: as ``replica_inbox_prefix``, under FOLLOWER_INBOX_PREFIX."""
    return f"{FOLLOWER_INBOX_PREFIX}.s{shard}"


LEADERS_BUCKET = "cardcore-leaders"
SHARDS_BUCKET = "cardcore-shards"
CHECKPOINTS_BUCKET = "cardcore-checkpoints"  # key s<n>: {replica id: [checkpointed group, at s]}
ROUTES_KEY = "routes"  # in SHARDS_BUCKET: which card shard holds each slot (cardcore.shards)


def stream_name(shard: int) -> str:
    return f"CARDS_S{shard}"


def log_subject(shard: int) -> str:
    return f"cardcore.s{shard}.log"


def tick_subject(shard: int) -> str:
    """Where a shard's leader says, after the stream acknowledged a group, that group's number
    (``TICK``; plain NATS, at most once): followers wait for it instead of asking the stream
    for its end again and again. A wake-up only: groups are read from the stream."""
    return f"cardcore.s{shard}{TICK_SUFFIX}"


TICK_SUFFIX = ".tick"
TICK = struct.Struct("<Q")  # a tick's payload: the group number the stream acknowledged


def submit_subject(shard: int) -> str:
    """Where the shard's leader takes groups of operations (a front sends them; docs/cluster.md)."""
    return f"cardcore.s{shard}.submit"
