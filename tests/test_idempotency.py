"""The idempotency digest: an explicit list of fields per operation type, and nothing forgotten."""
from __future__ import annotations

import pytest

from cardcore import layout as L
from cardcore.idempotency import (DIGEST_FIELDS, DIGEST_LEFT_OUT, OP_FIELD_AT, OP_FIELDS,
                                  payload_digest, unused_fields)


def test_every_field_of_the_operation_layout_is_covered_or_left_out_with_a_reason():
    """Fails when a field is added to layout.OP (and OP_FIELDS) without deciding whether a retry
    must repeat it: name it in DIGEST_FIELDS for the operations that set it, or in
    DIGEST_LEFT_OUT with the reason."""
    assert sum(size for _, size in OP_FIELD_AT.values()) == L.OP_SIZE
    covered = set().union(*DIGEST_FIELDS.values())
    assert covered | set(DIGEST_LEFT_OUT) == set(OP_FIELDS)
    assert not covered & set(DIGEST_LEFT_OUT)
    assert all(why for why in DIGEST_LEFT_OUT.values())
    kernel_ops = {*range(L.OP_OPEN, L.OP_RESET_PIN + 1), L.OP_COUPON_ISSUE, L.OP_PACKAGE_SELL,
                  L.OP_PACKAGE_USE, L.OP_POINTS_EXCHANGE, L.OP_GIFT_REDEEM, L.OP_REFUND,
                  L.OP_REVERSAL, L.OP_CARD_STATUS, L.OP_HOLD, L.OP_HOLD_VOID, L.OP_IMPORT_CARD}
    admin_ops = L.ADMIN_OPS  # the close of a day (op 35) among them
    writer_ops = {L.OP_CARD_REPLACED}  # applied by the writer itself (rule 16)
    delivered = {L.OP_REFERRAL_BONUS}  # a front's, from another card shard's outbox
    assert set(DIGEST_FIELDS) == kernel_ops | set(admin_ops) | writer_ops | delivered


def flipped(packed: bytes, field: str) -> bytes:
    off, _ = OP_FIELD_AT[field]
    out = bytearray(packed)
    out[off] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("op", sorted(DIGEST_FIELDS))
def test_a_retry_that_changes_a_digest_field_is_another_payload_and_others_are_not(op):
    packed = bytes([op]) + bytes(range(1, L.OP_SIZE))
    base = payload_digest(packed, b"extra")
    for field in DIGEST_FIELDS[op]:
        if field == "op":
            continue
        assert payload_digest(flipped(packed, field), b"extra") != base, field
    for field in set(DIGEST_LEFT_OUT) | unused_fields(op):
        assert payload_digest(flipped(packed, field), b"extra") == base, field
    assert payload_digest(packed, b"other") != base


def test_the_new_pin_of_set_pin_is_covered_and_the_pin_entered_is_not():
    """A SetPin retried with another new PIN is another request (finding 8); the PIN entered
    never is, or the answer would tell a right guess from a wrong one."""
    assert "new_pin_check" in DIGEST_FIELDS[L.OP_SET_PIN]
    assert "new_pin_check" in DIGEST_FIELDS[L.OP_OPEN]
    assert "pin_check" in DIGEST_LEFT_OUT
    assert "client_time_us" in DIGEST_FIELDS[L.OP_PURCHASE]
