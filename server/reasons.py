"""The one table from cardcore.v1.Reason to gRPC status codes and messages."""
from __future__ import annotations

import grpc

from cardcore.v1 import common_pb2 as pb

R = pb.Reason
C = grpc.StatusCode

# reason -> (gRPC status code, message for people; never carries a card number or secret)
TABLE: dict[int, tuple[grpc.StatusCode, str]] = {
    R.REASON_OK: (C.OK, "applied"),
    R.REASON_INVALID_ARGUMENT: (C.INVALID_ARGUMENT, "malformed request"),
    R.REASON_INVALID_AMOUNT: (C.INVALID_ARGUMENT, "amount must be a positive number of minor units"),
    R.REASON_INVALID_CARD_NUMBER: (C.INVALID_ARGUMENT, "card number must be 8 to 19 digits with a valid check digit"),
    R.REASON_INVALID_REQUEST_ID: (C.INVALID_ARGUMENT, "request_id must be 1 to 64 characters of A-Z a-z 0-9 . _ : -"),
    R.REASON_INVALID_TIER: (C.INVALID_ARGUMENT, "tier is not in the card program"),
    R.REASON_FIELD_TOO_LONG: (C.INVALID_ARGUMENT, "a field is longer than its limit"),
    R.REASON_BATCH_TOO_LARGE: (C.INVALID_ARGUMENT, "too many operations in one batch"),
    R.REASON_CARD_NOT_FOUND: (C.NOT_FOUND, "no such card"),
    R.REASON_CARD_ALREADY_EXISTS: (C.ALREADY_EXISTS, "a card with this number already exists"),
    R.REASON_CARD_NOT_ACTIVE: (C.FAILED_PRECONDITION, "the card is not active"),
    R.REASON_INSUFFICIENT_FUNDS: (C.FAILED_PRECONDITION, "insufficient funds"),
    R.REASON_AMOUNT_OVERFLOW: (C.OUT_OF_RANGE, "the result would exceed the largest amount the ledger holds"),
    R.REASON_DUPLICATE_REQUEST_MISMATCH: (C.ALREADY_EXISTS, "request_id was used before with a different payload"),
    R.REASON_OVERLOADED: (C.RESOURCE_EXHAUSTED, "the writer queue is full; retry later with the same request_id"),
    R.REASON_DEADLINE_EXCEEDED: (C.DEADLINE_EXCEEDED, "the deadline passed before the operation was applied; it was not applied"),
    R.REASON_UNAVAILABLE: (C.UNAVAILABLE, "the server is shutting down; retry with the same request_id"),
    R.REASON_INTERNAL: (C.INTERNAL, "the writer stopped before this operation reached it; it was not applied"),
    R.REASON_STORAGE_UNAVAILABLE: (C.UNAVAILABLE, "the ledger could not be written (disk full or I/O "
                                   "error); not applied: retry later with the same request_id"),
    R.REASON_OUTCOME_UNKNOWN: (C.UNAVAILABLE, "the writer stopped while applying this operation; ask "
                               "GetOperation or retry with the same request_id"),
}

CODE_NUMBER: dict[int, int] = {reason: code.value[0] for reason, (code, _) in TABLE.items()}
