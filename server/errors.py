"""Refusals, in one place: the table from cardcore.v1.Reason to gRPC status codes and messages,
the ``Invalid`` exception that request handling raises, and the helpers that turn a reason into
a status with machine-readable details (google.rpc.ErrorInfo and cardcore.v1.Failure)."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

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
    R.REASON_PIN_REQUIRED: (C.FAILED_PRECONDITION, "this card needs its PIN for this operation"),
    R.REASON_PIN_WRONG: (C.PERMISSION_DENIED, "wrong PIN"),
    R.REASON_PIN_LOCKED: (C.PERMISSION_DENIED, "the card's PIN is locked after too many wrong PINs; "
                          "a store manager must reset it"),
    R.REASON_PIN_NOT_SET: (C.FAILED_PRECONDITION, "the card has no PIN (set one first), or a PIN was "
                           "sent for a card without one"),
    R.REASON_PIN_BLOCK_INVALID: (C.INVALID_ARGUMENT, "the PIN block is not valid for this card and "
                                 "transaction"),
    R.REASON_PIN_WEAK: (C.INVALID_ARGUMENT, "the new PIN is too easy to guess"),
    R.REASON_KSN_INVALID: (C.INVALID_ARGUMENT, "the key serial number is malformed"),
    R.REASON_KSN_REPLAYED: (C.PERMISSION_DENIED, "the key serial number was used before by this terminal"),
    R.REASON_TERMINAL_UNKNOWN: (C.PERMISSION_DENIED, "unknown terminal, or the key does not belong to it"),
    R.REASON_TERMINAL_REVOKED: (C.PERMISSION_DENIED, "the terminal was revoked"),
    R.REASON_TERMINAL_MISMATCH: (C.PERMISSION_DENIED, "the certificate or store does not match the "
                                 "terminal claimed"),
    R.REASON_CARD_DATA_INVALID: (C.INVALID_ARGUMENT, "the encrypted card data failed authentication"),
    R.REASON_CLEAR_CARD_REFUSED: (C.PERMISSION_DENIED, "terminals must send card data encrypted"),
    R.REASON_UNAUTHENTICATED: (C.UNAUTHENTICATED, "no valid credentials for this call"),
    R.REASON_PERMISSION_DENIED: (C.PERMISSION_DENIED, "the operator's role or store scope does not "
                                 "allow this"),
    R.REASON_RATE_LIMITED: (C.RESOURCE_EXHAUSTED, "too many failed attempts from this terminal; "
                            "wait a minute"),
    R.REASON_TERMINAL_EXISTS: (C.ALREADY_EXISTS, "a terminal with this id was enrolled before"),
    R.REASON_TERMINAL_NOT_FOUND: (C.NOT_FOUND, "no terminal with this id"),
    R.REASON_OPERATOR_EXISTS: (C.ALREADY_EXISTS, "an operator with this name exists"),
    R.REASON_OPERATOR_NOT_FOUND: (C.NOT_FOUND, "no active operator with this name"),
    R.REASON_OPERATOR_REQUIRED: (C.PERMISSION_DENIED, "a first PIN needs an operator's token (a "
                                 "cashier or above of this store) at the till"),
    R.REASON_REQUEST_TOO_OLD: (C.FAILED_PRECONDITION, "client_time_us is older than the request "
                               "retention window; not applied: a new attempt takes a new request_id "
                               "and the current time"),
    R.REASON_CLIENT_TIME_AHEAD: (C.INVALID_ARGUMENT, "client_time_us is more than an hour ahead of "
                                 "the server's clock"),
    R.REASON_PROGRAM_INVALID: (C.INVALID_ARGUMENT, "the card program is not valid (see detail); the "
                               "running program is unchanged"),
    R.REASON_PROGRAM_STRANDS_CARDS: (C.FAILED_PRECONDITION, "the new program drops a tier that cards "
                                     "hold"),
    R.REASON_UNKNOWN_CATEGORY: (C.INVALID_ARGUMENT, "a purchase line names a category the card "
                                "program does not define"),
    R.REASON_INSUFFICIENT_POINTS: (C.FAILED_PRECONDITION, "the card has fewer points than offered"),
    R.REASON_REDEMPTION_NOT_OFFERED: (C.FAILED_PRECONDITION, "the card program does not redeem "
                                      "points"),
    R.REASON_COUPON_NOT_FOUND: (C.NOT_FOUND, "no such coupon"),
    R.REASON_COUPON_USED: (C.FAILED_PRECONDITION, "the coupon was used"),
    R.REASON_COUPON_NOT_VALID_NOW: (C.FAILED_PRECONDITION, "the coupon is not valid now"),
    R.REASON_COUPON_NOT_APPLICABLE: (C.FAILED_PRECONDITION, "the basket does not qualify for the "
                                     "coupon"),
    R.REASON_COUPON_NOT_FOR_SALE: (C.FAILED_PRECONDITION, "the coupon cannot be bought with "
                                   "points"),
    R.REASON_PACKAGE_NOT_FOUND: (C.NOT_FOUND, "no such package"),
    R.REASON_PACKAGE_NOT_VALID_NOW: (C.FAILED_PRECONDITION, "the package is not valid now"),
    R.REASON_PACKAGE_USED_UP: (C.FAILED_PRECONDITION, "the package has no uses left"),
    R.REASON_GIFT_NOT_FOUND: (C.NOT_FOUND, "no such gift in the catalogue"),
    R.REASON_GIFT_OUT_OF_STOCK: (C.FAILED_PRECONDITION, "the gift is out of stock"),
    R.REASON_EXCHANGE_NOT_OFFERED: (C.FAILED_PRECONDITION, "the card program does not exchange "
                                    "points"),
    R.REASON_ORIGINAL_NOT_FOUND: (C.NOT_FOUND, "no applied operation of this card has that seq"),
    R.REASON_NOT_REFUNDABLE: (C.FAILED_PRECONDITION, "only purchases can be refunded"),
    R.REASON_REFUND_EXCEEDS_ORIGINAL: (C.FAILED_PRECONDITION, "more than what is left of the sale "
                                       "to refund"),
    R.REASON_ALREADY_REVERSED: (C.FAILED_PRECONDITION, "the sale was reversed"),
    R.REASON_REVERSED: (C.FAILED_PRECONDITION, "this request was reversed before it arrived; it "
                        "was not applied"),
    R.REASON_REVERSAL_WINDOW_PASSED: (C.FAILED_PRECONDITION, "too late to reverse: refund it "
                                      "instead"),
    R.REASON_NOT_REVERSIBLE: (C.FAILED_PRECONDITION, "only purchases, top-ups and "
                              "authorizations not captured can be reversed"),
    R.REASON_ILLEGAL_TRANSITION: (C.FAILED_PRECONDITION, "the card's status does not allow that "
                                  "change"),
    R.REASON_HOLD_NOT_FOUND: (C.NOT_FOUND, "the card has no such hold (of this store)"),
    R.REASON_HOLD_CLOSED: (C.FAILED_PRECONDITION, "the hold was captured, voided, released or "
                           "reversed already"),
    R.REASON_HOLD_EXPIRED: (C.FAILED_PRECONDITION, "the hold expired: too late to capture"),
    R.REASON_CAPTURE_EXCEEDS_HOLD: (C.FAILED_PRECONDITION, "the capture takes more than the hold "
                                    "holds"),
    R.REASON_HOLDS_OPEN: (C.FAILED_PRECONDITION, "the card has open holds: void them first"),
    R.REASON_CARD_REPLACED: (C.FAILED_PRECONDITION, "the card was replaced by a new one: use "
                             "the new card"),
    R.REASON_LOOKUP_QUERY_INVALID: (C.INVALID_ARGUMENT, "give a phone of 6 to 20 digits or a name "
                                    "of at most 64 characters"),
    R.REASON_CARD_ID_NOT_ACCEPTED: (C.INVALID_ARGUMENT, "this call needs the card's number (a card "
                                    "id names a card to SetCardStatus, ReplaceCard, GetCard and history reads only)"),
    R.REASON_CARD_EXPIRED: (C.FAILED_PRECONDITION, "the card expired: it can be cancelled or "
                            "replaced"),
    R.REASON_CARD_NOT_ACTIVATED: (C.FAILED_PRECONDITION, "the card is not activated yet: an "
                                  "operator activates it"),
    R.REASON_LINE_ALREADY_REFUNDED: (C.FAILED_PRECONDITION, "a line named was given back "
                                     "already"),
    R.REASON_LINE_NOT_FOUND: (C.NOT_FOUND, "the sale has no line with that number"),
    R.REASON_FEED_WATCHERS_LIMIT: (C.RESOURCE_EXHAUSTED, "the journal feed serves as many streams "
                                   "as it takes; end one or try again later"),
    R.REASON_FEED_SEQ_AHEAD: (C.OUT_OF_RANGE, "from_seq is past the end of the journal (see "
                              "detail): this ledger never reached that entry"),
    R.REASON_DAY_NOT_STARTED: (C.FAILED_PRECONDITION, "that business day has not begun: only a "
                               "day that has begun can be closed"),
    R.REASON_REPORT_RANGE_INVALID: (C.INVALID_ARGUMENT, "to_day must be on or after from_day, at "
                                    "most 3660 days on"),
    R.REASON_MEMBER_RANGE_INVALID: (C.INVALID_ARGUMENT, "months must be YYYY-MM from 1970-01, "
                                    "to_month on or after from_month and at most 24 months on, "
                                    "as_of_day a date"),
    R.REASON_MEMBER_PAGE_INVALID: (C.INVALID_ARGUMENT, "dormant_limit must be at most 10000 and "
                                   "page_token one an answer gave"),
    R.REASON_REGION_NOT_FOUND: (C.NOT_FOUND, "no region with this id"),
    R.REASON_ADMIN_ELSEWHERE: (C.FAILED_PRECONDITION, "this card shard takes admin changes from "
                               "the cluster's admin shard: make the change through a front of "
                               "that shard"),
    R.REASON_NOT_A_CARD_SHARD: (C.FAILED_PRECONDITION, "this is the cluster's admin shard, which "
                                "holds no cards: send card operations through a front of a card "
                                "shard"),
    R.REASON_CROSS_SHARD: (C.FAILED_PRECONDITION, "one card shard of the cluster cannot make "
                           "this alone (a gift's chain-wide stock: not built yet), or not yet (a "
                           "basket payment while one on another shard is unsettled: ask again): "
                           "nothing changed"),
    R.REASON_CARD_ELSEWHERE: (C.UNAVAILABLE, "this card was made by a replacement on another "
                              "card shard than its number's, which this front had not read "
                              "yet: nothing changed; ask again with the same request_id"),
    R.REASON_STORE_NOT_FOUND: (C.NOT_FOUND, "no store with this id: not in the chain's registry "
                               "and no entry ever"),
    R.REASON_NAME_INVALID: (C.INVALID_ARGUMENT, "a name must be 1 to 64 bytes of UTF-8 without "
                            "control characters"),
    R.REASON_UTC_OFFSET_INVALID: (C.INVALID_ARGUMENT, "utc_offset_minutes must be -720 to 840 "
                                  "(-12:00 to +14:00)"),
    R.REASON_CUTOFF_HOUR_INVALID: (C.INVALID_ARGUMENT, "business_day_cutoff_hour must be 0 to 23, "
                                   "given with utc_offset_minutes"),
    R.REASON_CHAIN_ID_INVALID: (C.INVALID_ARGUMENT, "a region or store id must be 1 or more (store "
                                "0 is head office)"),
    R.REASON_CHAIN_TREE_FULL: (C.RESOURCE_EXHAUSTED, "the chain holds as many regions or stores "
                               "as it takes"),
}

CODE_NUMBER: dict[int, int] = {reason: code.value[0] for reason, (code, _) in TABLE.items()}

DOMAIN = "cardcore.v1"


class Invalid(Exception):
    """Bad input: answered with INVALID_ARGUMENT (or its reason's code), nothing changed."""

    def __init__(self, reason: int, field: str, busy_terminal: int = 0, detail: str = ""):
        super().__init__(field)
        self.reason = reason
        self.field = field
        # RATE_LIMITED by this terminal's unanswered swipes, not its failures: wait, then retry
        self.busy_terminal = busy_terminal
        self.detail = detail  # for people, never a secret: where a program document is wrong


class ShardBehind(Exception):
    """A read over several card shards that one of them cannot answer yet (a day closed on
    the admin shard that a card shard has not closed: its leader has not relayed it); the
    message says which: UNAVAILABLE, REASON_UNAVAILABLE (ask again)."""


def failure(reason: int, field: str = "", available_minor: int = 0,
            pin_tries_left: int = 0, detail: str = "") -> pb.Failure:
    return pb.Failure(reason=reason, message=TABLE[reason][1], field=field,
                      available_minor=available_minor, pin_tries_left=pin_tries_left,
                      detail=detail)


def status_details(fail: pb.Failure) -> tuple[tuple[str, bytes]]:
    """Trailing metadata carrying google.rpc.Status with ErrorInfo and Failure details."""
    info = error_details_pb2.ErrorInfo(reason=R.Name(fail.reason), domain=DOMAIN)
    if fail.field:
        info.metadata["field"] = fail.field
    if fail.reason in (R.REASON_INSUFFICIENT_FUNDS, R.REASON_CAPTURE_EXCEEDS_HOLD):
        info.metadata["available_minor"] = str(fail.available_minor)
    if fail.reason == R.REASON_PIN_WRONG:
        info.metadata["pin_tries_left"] = str(fail.pin_tries_left)
    if fail.detail:
        info.metadata["detail"] = fail.detail
    status = status_pb2.Status(code=CODE_NUMBER[fail.reason], message=fail.message)
    for detail in (info, fail):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext, fail: pb.Failure):
    await context.abort(TABLE[fail.reason][0], fail.message, status_details(fail))


async def fresh_or_abort(writer, context: grpc.aio.ServicerContext,
                         card_ids: tuple[bytes, ...] = (), keys: tuple[bytes, ...] = (),
                         everything: bool = False) -> None:
    """``Writer.fresh`` for a handler: a read that cannot see what was answered (LMDB cannot be
    checkpointed) is refused, never answered from the older state."""
    from .writer import Stale

    try:
        await writer.fresh(card_ids, keys, everything)
    except Stale:
        await abort(context, failure(pb.REASON_STORAGE_UNAVAILABLE))
