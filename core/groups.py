"""A group's bytes: the writer's input, as the gRPC process sends it and as the group log keeps it.

The log (``cardcore.grouplog``) stores exactly these bytes, so a group replayed after a crash, or
applied by a replica, is the group the writer first applied: its time and its operations::

    group = ts_us:i64 | n:u32 | n x (key_len:u8 | ksn_counter:u32 | profile_len:u32
            | sealed_len:u32 | payload_len:u32 | need_role:u8 | scope:u8 | scope_store:u32
            | op:192 B | digest:16 B | key | profile | sealed | payload | lines)
            (a length of 0xFFFFFFFF = none; lines: the op's line_count x 64 B)

A group of no operations is a checkpoint request (the gRPC process asks for one before a read that
must see what it answered): the writer applies nothing and logs nothing for it.
"""
from __future__ import annotations

import dataclasses
import struct

from cardcore import layout as L
from cardcore.idempotency import PendingOp

GROUP_HEAD = struct.Struct("<qI")
OP_HEAD = struct.Struct("<BIIIIBBI")
NONE_LEN = 0xFFFFFFFF


def encode_group(ops: list[PendingOp], ts_us: int) -> bytes:
    parts = [GROUP_HEAD.pack(ts_us, len(ops))]
    for op in ops:
        extras = (op.profile, op.sealed, op.payload)
        parts.append(OP_HEAD.pack(len(op.request_key), op.ksn_counter,
                                  *[NONE_LEN if x is None else len(x) for x in extras],
                                  op.need_role, op.scope, op.scope_store_id))
        parts.append(op.packed)
        parts.append(op.digest)
        parts.append(op.request_key)
        parts.extend([x for x in extras if x is not None])
        parts.append(op.lines)
    return b"".join(parts)


def decode_group(data: bytes) -> tuple[list[PendingOp], int]:
    ts_us, n = GROUP_HEAD.unpack_from(data, 0)
    pos = GROUP_HEAD.size
    ops = []
    for _ in range(n):
        key_len, ksn_counter, l_profile, l_sealed, l_payload, role, scope, store = \
            OP_HEAD.unpack_from(data, pos)
        pos += OP_HEAD.size
        packed = data[pos:pos + L.OP_SIZE]
        digest = data[pos + L.OP_SIZE:pos + L.OP_SIZE + 16]
        pos += L.OP_SIZE + 16
        key = data[pos:pos + key_len]
        pos += key_len
        n_lines = L.OP_PROGRAM.unpack_from(packed, L.OP_OFF_PROGRAM)[0] * L.LINE_SIZE
        if l_profile == l_sealed == l_payload == NONE_LEN:  # most operations: a purchase, a top-up
            lines = data[pos:pos + n_lines] if n_lines else b""
            pos += n_lines
            ops.append(PendingOp(key, packed[40:56], packed, digest, None, ksn_counter, None, None,
                                 role, scope, store, lines))
            continue
        extras = []
        for n_bytes in (l_profile, l_sealed, l_payload):
            extras.append(None if n_bytes == NONE_LEN else data[pos:pos + n_bytes])
            pos += 0 if n_bytes == NONE_LEN else n_bytes
        ops.append(PendingOp(key, packed[40:56], packed, digest, extras[0], ksn_counter,
                             extras[1], extras[2], role, scope, store, data[pos:pos + n_lines]))
        pos += n_lines
    if pos != len(data):
        raise ValueError("group message has trailing bytes")
    return ops, ts_us


def relay_ops(admin_shard: int, group_no: int, admin_group: bytes) -> list[PendingOp]:
    """What a card shard's leader appends for group ``group_no`` of the admin shard's stream
    (docs/cluster.md, "The admin shard"): the mark, then that group's admin entries as they
    came (their request keys moved to the relayed namespace), and its floors of the operator
    ids; [] if it holds none (its leader's barriers and maintenance: nothing to relay)."""
    from cardcore.admin import relayed

    assert group_no >= 1
    ops, ts_us = decode_group(admin_group)
    admin = [dataclasses.replace(op, request_key=L.RELAYED_KEY_PREFIX + op.request_key
                                 if op.request_key else b"")
             for op in ops if relayed(op)]
    if not admin:
        return []
    return [relay_mark(admin_shard, L.RELAY_ROLE_CARD, group_no, ts_us), *admin]


def relay_mark(admin_shard: int, role: int, group_no: int = 0, ts_us: int = 0) -> PendingOp:
    """The operation that says a shard's place in a cluster with an admin shard (group 0, at
    its first leader's start), or begins a relayed group."""
    return PendingOp.internal(L.OP_ADMIN_RELAY, payload=struct.pack("<q", ts_us),
                              subject=L.ADMIN_RELAY_SUBJECT.pack(admin_shard, role, group_no))


def group_ts_us(data: bytes) -> int:
    return GROUP_HEAD.unpack_from(data, 0)[0]


def deferrable(op: PendingOp) -> bool:
    """May its group wait for the next checkpoint (the log holds it)? A card's own operation
    without extras, yes; anything that changes what the gRPC process reads for other calls (an
    opening's card index and profile, a replacement, admin state) is checkpointed at once."""
    return (op.profile is None and op.sealed is None and op.payload is None
            and op.packed[0] in L.CARD_OPS)
