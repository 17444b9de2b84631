"""Building operations: a validated request becomes a ``PendingOp`` for the writer.

Limits are checked here, where data enters; the card and PIN blocks are
resolved by ``swipe``; what is packed is what the writer applies.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import re

from cardcore import cards, profiles
from cardcore import layout as L
from cardcore.idempotency import (DIGEST_FIELDS, SCOPE_NONE, SCOPE_STORE, basket_tag,
                                  digest_spans, request_key)
from cardcore.keyring import Keyring
from cardcore.ledger import Ledger, PendingOp
from cardcore.ext import batchwire, wire
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb

from .access import ROLE, Access, Caller
from .errors import Invalid
from .swipe import CardAccess, Swipes

log = logging.getLogger("cardcore.service")

R = cpb.Reason
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
IMPORT_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,40}")  # + ":" + 16 hex digits: a request id
PHONE_RE = re.compile(r"[0-9+\- ]{0,20}")
BIRTHDAY_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
NAME_LEN_MAX = 64
PHONE_QUERY_LEN_MAX = 20  # a phone as typed, at opening and in FindCards
NO_PIN = bytes(32)


class _Malformed:
    """What a request that does not decode becomes, instead of an exception inside grpc (which
    answers UNKNOWN, logs a traceback per call and ends a whole stream)."""

    __slots__ = ()

    def WhichOneof(self, _name):  # a stream item that names no operation
        return None


MALFORMED = _Malformed()


def request_id_bytes(request_id: str, field: str = "request_id") -> bytes:
    if not REQUEST_ID_RE.fullmatch(request_id):
        raise Invalid(R.REASON_INVALID_REQUEST_ID, field)
    return request_id.encode("ascii")


def import_request_id(import_id: str, card_id: bytes) -> bytes:
    """Rule 18: an imported row's request id: the import's id, ":" and 16 hex digits of BLAKE2b
    of the card's keyed id (never of the number), so a re-run of the same file names the same
    requests (its rows are replays) and nothing in the request records leads to a number."""
    return f"{import_id}:{hashlib.blake2b(card_id, digest_size=8).hexdigest()}".encode("ascii")


def member_profile(p: pb.MemberProfile) -> dict:
    """An opening's or an import's member profile, checked where it enters (without the masked
    number, which the card adds)."""
    if len(p.name) > NAME_LEN_MAX:
        raise Invalid(R.REASON_FIELD_TOO_LONG, "profile.name")
    if not p.name.isprintable():
        raise Invalid(R.REASON_INVALID_ARGUMENT, "profile.name")
    if len(p.phone) > PHONE_QUERY_LEN_MAX:
        raise Invalid(R.REASON_FIELD_TOO_LONG, "profile.phone")
    if not PHONE_RE.fullmatch(p.phone):
        raise Invalid(R.REASON_INVALID_ARGUMENT, "profile.phone")
    if p.birthday:
        try:
            if not BIRTHDAY_RE.fullmatch(p.birthday):
                raise ValueError
            datetime.date.fromisoformat(p.birthday)
        except ValueError:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "profile.birthday") from None
    return {"name": p.name, "phone": p.phone, "birthday": p.birthday,
            "home_store_id": p.home_store_id}


def client_time_us(request) -> int:
    """Every mutating request carries its client's clock; its age is judged by the writer."""
    value = request.client_time_us
    if value <= 0:
        raise Invalid(R.REASON_INVALID_ARGUMENT, "client_time_us")
    return value






_LINES_FIELD = {m.DESCRIPTOR: m.DESCRIPTOR.fields_by_name["lines"].number
                for m in (pb.PurchaseRequest, pb.QuoteRequest, pb.CaptureRequest)}
_LINE_PROBLEMS = {
    wire.BAD_WIRE: (R.REASON_INVALID_ARGUMENT, "lines"),
    wire.TOO_MANY: (R.REASON_INVALID_ARGUMENT, "lines"),
    wire.BAD_AMOUNT: (R.REASON_INVALID_AMOUNT, "lines[{}].amount_minor"),
    wire.BAD_CATEGORY: (R.REASON_UNKNOWN_CATEGORY, "lines[{}].category_code"),
    wire.SKU_TOO_LONG: (R.REASON_FIELD_TOO_LONG, "lines[{}].sku"),
    wire.SKU_NOT_PRINTABLE: (R.REASON_INVALID_ARGUMENT, "lines[{}].sku"),
    wire.TOTAL_TOO_BIG: (R.REASON_INVALID_AMOUNT, "lines"),
}


def basket(req, explicit: bool = False) -> tuple[bytes, int, int]:
    """A purchase's (or quote's) lines packed for the kernel (layout.LINE), its gross amount
    and the points offered, checked where they enter. ``explicit``: a basket without lines
    becomes one line of category 0 (a quote always answers per line)."""
    gross = req.gross_amount_minor
    if req.redeem_points < 0:
        raise Invalid(R.REASON_INVALID_ARGUMENT, "redeem_points")
    if not req.lines:
        if gross <= 0:
            raise Invalid(R.REASON_INVALID_AMOUNT, "gross_amount_minor")
        lines = L.LINE.pack(0, 0, 0, gross, 0, 0, 0, b"") if explicit else b""
        return lines, gross, req.redeem_points
    # the lines read off the request's own bytes in one C loop (cardcore.ext.wire): at most
    # layout.LINES_MAX; each amount > 0, a category below MAX_CATEGORIES, a SKU of at most
    # layout.SKU_LEN_MAX printable ASCII characters; a total that fits int64
    packed, total, problem, k = wire.lines_of(req.SerializeToString(),
                                              _LINES_FIELD[req.DESCRIPTOR])
    if problem:
        reason, field = _LINE_PROBLEMS[problem]
        raise Invalid(reason, field.format(k))
    if gross not in (0, total):
        raise Invalid(R.REASON_INVALID_AMOUNT, "gross_amount_minor")
    return packed, total, req.redeem_points


def refund_line_numbers(req: pb.RefundRequest) -> bytes:
    """A refund by line's line numbers (rule 12), checked for what needs no ledger: distinct,
    at most LINES_MAX, none 0 (the writer checks them against the sale's lines), no amount
    with them; as the writer takes them, u8 each in the order asked. b"": by amount."""
    numbers = list(req.line_numbers)
    if not numbers:
        return b""
    if req.amount_minor:
        raise Invalid(R.REASON_INVALID_ARGUMENT, "line_numbers",
                      detail="a refund is by amount or by line, not both")
    if len(numbers) > L.LINES_MAX or len(set(numbers)) != len(numbers) or 0 in numbers:
        raise Invalid(R.REASON_INVALID_ARGUMENT, "line_numbers",
                      detail=f"distinct line numbers from 1, at most {L.LINES_MAX}")
    if max(numbers) > L.LINES_MAX:
        raise Invalid(R.REASON_LINE_NOT_FOUND, "line_numbers")
    return bytes(numbers)


def hold_serial(req) -> int:
    """A capture's or void's hold (rule 15): a serial is a journal seq, 1..INT64_MAX."""
    if not 0 < req.hold_serial <= L.INT64_MAX:
        raise Invalid(R.REASON_HOLD_NOT_FOUND, "hold_serial")
    return req.hold_serial


def top_up_amount(req: pb.TopUpRequest) -> tuple[int, dict]:
    if req.amount_minor <= 0:
        raise Invalid(R.REASON_INVALID_AMOUNT, "amount_minor")
    return req.amount_minor, {}


NO_EXTRA: dict = {}  # a plain purchase's: no keyword arguments to pass along (shared, read only)


def purchase_amount(req: pb.PurchaseRequest) -> tuple[int, dict]:
    if not (req.lines or req.redeem_points or req.coupon_serial or req.allow_partial
            or req.basket_id):  # most purchases: one amount, nothing else to check or pass
        if req.gross_amount_minor <= 0:
            raise Invalid(R.REASON_INVALID_AMOUNT, "gross_amount_minor")
        return req.gross_amount_minor, NO_EXTRA
    lines, amount, redeem = basket(req)
    kw = {"lines": lines, "redeem_points": redeem, "ref_id": req.coupon_serial,
          "op_flags": L.ALLOW_PARTIAL if req.allow_partial else 0}
    if req.basket_id:
        if not REQUEST_ID_RE.fullmatch(req.basket_id):
            raise Invalid(R.REASON_INVALID_ARGUMENT, "basket_id")
        kw["basket_id"] = req.basket_id.encode("ascii")
    return amount, kw


class Operations:
    """Builders for every mutating card operation, by request type."""

    def __init__(self, ledger: Ledger, keyring: Keyring, access: Access):
        self.ledger = ledger
        self.keyring = keyring
        self.access = access
        self.swipes = Swipes(access, keyring, True)
        # a batch's plain purchases and top-ups, and its baskets (lines, points, a coupon),
        # built in one C loop, as purchase_op and top_up_op build them (one digest for both:
        # the same fields)
        assert DIGEST_FIELDS[L.OP_PURCHASE] == DIGEST_FIELDS[L.OP_TOP_UP]
        self._money_ops = batchwire.MoneyOps(keyring.index_key, digest_spans(
            DIGEST_FIELDS[L.OP_PURCHASE]), PendingOp, L.OP_PURCHASE, L.OP_TOP_UP)
        self.adopt_program()
        # Development mode (no TLS) lets a card without a PIN be spent with a clear number.
        self.dev_pin = 0 if access.tls else L.PIN_OPTIONAL_UNSET
        self.builders = {"open_card": (L.OP_OPEN, self.open_op),
                         "top_up": (L.OP_TOP_UP, self.top_up_op),
                         "purchase": (L.OP_PURCHASE, self.purchase_op),
                         "set_pin": (L.OP_SET_PIN, self.set_pin_op),
                         "reset_pin": (L.OP_RESET_PIN, self.reset_pin_op),
                         "issue_coupon": (L.OP_COUPON_ISSUE, self.issue_coupon_op),
                         "sell_package": (L.OP_PACKAGE_SELL, self.sell_package_op),
                         "use_entitlement": (L.OP_PACKAGE_USE, self.use_entitlement_op),
                         "exchange_points": (L.OP_POINTS_EXCHANGE, self.exchange_points_op),
                         "redeem_gift": (L.OP_GIFT_REDEEM, self.redeem_gift_op),
                         "refund": (L.OP_REFUND, self.refund_op),
                         "reverse": (L.OP_REVERSAL, self.reverse_op),
                         "set_card_status": (L.OP_CARD_STATUS, self.set_card_status_op),
                         "authorize": (L.OP_HOLD, self.authorize_op),
                         "capture": (L.OP_PURCHASE, self.capture_op),
                         "void_hold": (L.OP_HOLD_VOID, self.void_hold_op),
                         "replace_card": (L.OP_CARD_REPLACED, self.replace_card_op),
                         "import_card": (L.OP_IMPORT_CARD, self.import_card_op)}

    def adopt_program(self) -> None:
        """The limits of the current program (at start, and after a program load)."""
        program = self.ledger.program
        self.swipes.require_luhn = program.require_luhn
        self.tier_count = len(program.tiers)
        self.top_up_pin = L.PIN_REQUIRED if program.pin_on_top_up else 0

    def _op(self, req, rid: bytes, at_us: int, op_type: int, card: CardAccess, caller: Caller,
            amount_minor: int = 0, pin_flags: int = 0, pin_check: bytes = NO_PIN,
            new_pin_check: bytes = NO_PIN, role: int = ROLE.OPERATOR_ROLE_CASHIER,
            **kw) -> PendingOp:
        """The operation, in its caller's namespace; an operator's role and store scope are
        checked again by the writer when it is applied."""
        operator, till = caller.operator, req.till
        namespace = caller.namespace(card.terminal_id)
        key = request_key(*namespace, rid)
        if "basket_id" in kw:  # scoped to the caller like the request id
            kw["basket_tag"] = basket_tag(*namespace, kw.pop("basket_id"))
        if operator is None:
            return PendingOp.build(key, op_type, card.card_id, amount_minor, till.store_id,
                                   till.terminal_id, till.staff_id, pin_flags=pin_flags,
                                   pin_check=pin_check, new_pin_check=new_pin_check,
                                   ksn_counter=card.ksn_counter, client_time_us=at_us,
                                   caller=namespace, **kw)
        return PendingOp.build(key, op_type, card.card_id,
                               amount_minor, till.store_id, till.terminal_id, till.staff_id,
                               pin_flags=pin_flags, pin_check=pin_check,
                               new_pin_check=new_pin_check, operator_id=operator.operator_id,
                               ksn_counter=card.ksn_counter, client_time_us=at_us,
                               need_role=role, scope=SCOPE_STORE, scope_store_id=till.store_id,
                               caller=namespace, **kw)

    def _operator_card(self, req, caller: Caller, role: int,
                       missing: int = R.REASON_OPERATOR_REQUIRED, by_id: bool = False) -> CardAccess:
        """The card of an operation only an operator does: one of ``role`` or above whose scope
        holds the till's store (``missing`` when no operator acts); the writer checks again.
        ``by_id``: the card may be named by its id (rule 17), as FindCards found it."""
        operator = caller.operator
        if operator is None:
            raise Invalid(missing, "authorization")
        if not operator.may(role, req.till.store_id):
            raise Invalid(R.REASON_PERMISSION_DENIED, "till.store_id")
        return self.swipes.card(req.card, req.till, caller, role, by_id)

    def open_op(self, req: pb.OpenCardRequest, caller: Caller) -> PendingOp:
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        if req.tier >= self.tier_count:
            raise Invalid(R.REASON_INVALID_TIER, "tier")
        p = req.profile
        checked = member_profile(p)
        swipes = self.swipes
        card = swipes.card(req.card, req.till, caller)
        pin_flags, new_check = 0, NO_PIN
        if req.pin_block:
            new_check = swipes.pin_check(card, req.pin_block, "pin_block", new=True,
                                         birthday=p.birthday)
            pin_flags = L.NEW_PIN
        profile = {"masked": cards.mask(card.number), **checked}
        referrer = bytes(16)
        if req.referrer_card_number:
            referrer = swipes.referrer(req.referrer_card_number, caller)
            if referrer == card.card_id or req.issue_only:  # (a stock card is nobody's referral)
                raise Invalid(R.REASON_INVALID_ARGUMENT, "referrer_card_number")
        op = self._op(req, rid, at_us, L.OP_OPEN, card, caller, pin_flags=pin_flags,
                      new_pin_check=new_check, tier=req.tier, home_store_id=p.home_store_id,
                      profile=profiles.encode(profile),
                      sealed=self.keyring.seal(card.card_id, card.number), referrer_id=referrer,
                      birth_month=int(p.birthday[5:7]) if p.birthday else 0,
                      op_flags=L.ISSUE_ONLY if req.issue_only else 0)
        return self._sealed_profile(op, card.card_id, profile)

    def import_card_op(self, req: pb.ImportCardRequest, caller: Caller) -> PendingOp:
        """Rule 18: a legacy card opened with its balances, by a chain admin, by its clear
        number; the request id is derived from the import's id and the card's keyed id."""
        if not IMPORT_ID_RE.fullmatch(req.request_id):
            raise Invalid(R.REASON_INVALID_REQUEST_ID, "request_id")
        at_us = client_time_us(req)
        if req.tier >= self.tier_count:
            raise Invalid(R.REASON_INVALID_TIER, "tier")
        for field in ("principal_minor", "bonus_minor", "points"):
            if getattr(req, field) < 0:
                raise Invalid(R.REASON_INVALID_AMOUNT, field)
        if req.principal_minor > L.INT64_MAX - req.bonus_minor:
            raise Invalid(R.REASON_INVALID_AMOUNT, "bonus_minor")
        checked = member_profile(req.profile)
        if req.card.WhichOneof("ref") != "card_number":
            raise Invalid(R.REASON_INVALID_ARGUMENT, "card")  # a clear number, never a swipe
        role = ROLE.OPERATOR_ROLE_CHAIN_ADMIN
        card = self._operator_card(req, caller, role, R.REASON_UNAUTHENTICATED)
        profile = {"masked": cards.mask(card.number), **checked}
        birthday = checked["birthday"]
        op = self._op(req, import_request_id(req.request_id, card.card_id), at_us,
                      L.OP_IMPORT_CARD, card, caller, req.principal_minor, tier=req.tier,
                      home_store_id=checked["home_store_id"], profile=profiles.encode(profile),
                      sealed=self.keyring.seal(card.card_id, card.number),
                      birth_month=int(birthday[5:7]) if birthday else 0, ref_id=req.bonus_minor,
                      redeem_points=req.points, role=role)
        return self._sealed_profile(op, card.card_id, profile)

    def _sealed_profile(self, op: PendingOp, card_id: bytes, profile: dict) -> PendingOp:
        """``op`` storing ``profile`` sealed (``cardcore.profiles``): its digest stays the one of
        the profile's JSON, so a retry is the same request whatever its sealed bytes."""
        box = self.ledger.profile_box
        if not box.keyed:  # a ledger opened without the keyring (tools): stored as JSON
            return op
        return dataclasses.replace(op, profile=box.seal(card_id, profile))

    def _money_op(self, req, caller: Caller, op_type: int, pin_flags: int, measure) -> PendingOp:
        """A top-up or purchase; ``measure(req)`` gives (amount, extra fields) and is checked
        after the request_id and client time, before the card."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        amount, kw = measure(req)
        card = self.swipes.card(req.card, req.till, caller)
        check = NO_PIN
        if req.pin_block:
            check = self.swipes.pin_check(card, req.pin_block, "pin_block")
            pin_flags |= L.PIN_PRESENTED
        return self._op(req, rid, at_us, op_type, card, caller, amount, pin_flags, check, **kw)

    def top_up_op(self, req: pb.TopUpRequest, caller: Caller) -> PendingOp:
        return self._money_op(req, caller, L.OP_TOP_UP, self.top_up_pin | self.dev_pin, top_up_amount)

    def purchase_op(self, req: pb.PurchaseRequest, caller: Caller) -> PendingOp:
        return self._money_op(req, caller, L.OP_PURCHASE, L.PIN_REQUIRED | self.dev_pin,
                              purchase_amount)

    def set_pin_op(self, req: pb.SetPinRequest, caller: Caller) -> PendingOp:
        """A change needs the old PIN; a first PIN needs an operator at the till (the kernel
        refuses it without one), who vouches for the member."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        if not req.new_pin_block:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "new_pin_block")
        if caller.operator is not None and not caller.operator.may(ROLE.OPERATOR_ROLE_CASHIER,
                                                                   req.till.store_id):
            raise Invalid(R.REASON_PERMISSION_DENIED, "till.store_id")
        swipes = self.swipes
        card = swipes.card(req.card, req.till, caller)
        pin_flags, check = L.NEW_PIN, NO_PIN
        if req.old_pin_block:
            check = swipes.pin_check(card, req.old_pin_block, "old_pin_block")
            pin_flags |= L.PIN_PRESENTED
        new_check = swipes.pin_check(card, req.new_pin_block, "new_pin_block", new=True,
                                     birthday=self.birthday(card.card_id))
        return self._op(req, rid, at_us, L.OP_SET_PIN, card, caller, 0, pin_flags, check, new_check)

    def reset_pin_op(self, req: pb.ResetPinRequest, caller: Caller) -> PendingOp:
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        card = self._operator_card(req, caller, ROLE.OPERATOR_ROLE_STORE_MANAGER,
                                   R.REASON_UNAUTHENTICATED)
        pin_flags, new_check = 0, NO_PIN
        if req.new_pin_block:
            new_check = self.swipes.pin_check(card, req.new_pin_block, "new_pin_block", new=True,
                                              birthday=self.birthday(card.card_id))
            pin_flags = L.NEW_PIN
        return self._op(req, rid, at_us, L.OP_RESET_PIN, card, caller, 0, pin_flags,
                        new_pin_check=new_check, role=ROLE.OPERATOR_ROLE_STORE_MANAGER)

    def issue_coupon_op(self, req: pb.IssueCouponRequest, caller: Caller) -> PendingOp:
        """Bought with points: the member's card and PIN, like a purchase. Given: an operator
        (store manager or above of the till's store) gives it; the writer checks again."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        definition = self.ledger.program.coupon(req.coupon_id)
        if definition is None:
            raise Invalid(R.REASON_COUPON_NOT_FOUND, "coupon_id")
        if req.pay_with_points:
            if not definition.points_price:
                raise Invalid(R.REASON_COUPON_NOT_FOR_SALE, "coupon_id")

            def priced(_req) -> tuple[int, dict]:
                return 0, {"ref_id": req.coupon_id, "redeem_points": definition.points_price}

            return self._money_op(req, caller, L.OP_COUPON_ISSUE, L.PIN_REQUIRED | self.dev_pin,
                                  priced)
        card = self._operator_card(req, caller, ROLE.OPERATOR_ROLE_STORE_MANAGER)
        op = self._op(req, rid, at_us, L.OP_COUPON_ISSUE, card, caller, 0, 0, ref_id=req.coupon_id,
                      role=ROLE.OPERATOR_ROLE_STORE_MANAGER)
        return op

    def sell_package_op(self, req: pb.SellPackageRequest, caller: Caller) -> PendingOp:
        """Paid from the balance like a purchase (the PIN), at the current program's price (the
        writer checks the price against the program it applies)."""
        definition = self.ledger.program.package(req.package_id)

        def priced(_req) -> tuple[int, dict]:
            if definition is None:
                raise Invalid(R.REASON_PACKAGE_NOT_FOUND, "package_id")
            return definition.price_minor, {"ref_id": req.package_id}

        return self._money_op(req, caller, L.OP_PACKAGE_SELL, L.PIN_REQUIRED | self.dev_pin, priced)

    def use_entitlement_op(self, req: pb.UseEntitlementRequest, caller: Caller) -> PendingOp:
        def which(_req) -> tuple[int, dict]:
            if not req.package_serial:
                raise Invalid(R.REASON_PACKAGE_NOT_FOUND, "package_serial")
            return 0, {"ref_id": req.package_serial}

        return self._money_op(req, caller, L.OP_PACKAGE_USE, L.PIN_REQUIRED | self.dev_pin, which)

    def exchange_points_op(self, req: pb.ExchangePointsRequest, caller: Caller) -> PendingOp:
        def offered(_req) -> tuple[int, dict]:
            if req.points <= 0:
                raise Invalid(R.REASON_INVALID_ARGUMENT, "points")
            return 0, {"redeem_points": req.points}

        return self._money_op(req, caller, L.OP_POINTS_EXCHANGE, L.PIN_REQUIRED | self.dev_pin,
                              offered)

    def redeem_gift_op(self, req: pb.RedeemGiftRequest, caller: Caller) -> PendingOp:
        def gift(_req) -> tuple[int, dict]:
            if self.ledger.program.gift(req.gift_id) is None:
                raise Invalid(R.REASON_GIFT_NOT_FOUND, "gift_id")
            return 0, {"ref_id": req.gift_id}

        return self._money_op(req, caller, L.OP_GIFT_REDEEM, L.PIN_REQUIRED | self.dev_pin, gift)

    def refund_op(self, req: pb.RefundRequest, caller: Caller) -> PendingOp:
        """Money back for a sale (rule 12): an operator (cashier or above) of the till's store,
        checked again by the writer; no PIN, the money goes back to the card."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        if not 0 < req.original_seq <= L.INT64_MAX:
            raise Invalid(R.REASON_ORIGINAL_NOT_FOUND, "original_seq")
        if req.amount_minor < 0:
            raise Invalid(R.REASON_INVALID_AMOUNT, "amount_minor")
        numbers = refund_line_numbers(req)
        card = self._operator_card(req, caller, ROLE.OPERATOR_ROLE_CASHIER)
        return self._op(req, rid, at_us, L.OP_REFUND, card, caller, req.amount_minor,
                        link_seq=req.original_seq, refund_lines=numbers)

    def authorize_op(self, req: pb.AuthorizeRequest, caller: Caller) -> PendingOp:
        """A hold (rule 15): the member's card and PIN, like a purchase."""
        def held(_req) -> tuple[int, dict]:
            if req.amount_minor <= 0:
                raise Invalid(R.REASON_INVALID_AMOUNT, "amount_minor")
            if req.hold_minutes > L.HOLD_MINUTES_MAX:
                raise Invalid(R.REASON_INVALID_ARGUMENT, "hold_minutes")
            return req.amount_minor, {"ref_id": req.hold_minutes or L.HOLD_MINUTES_DEFAULT}

        return self._money_op(req, caller, L.OP_HOLD, L.PIN_REQUIRED | self.dev_pin, held)

    def capture_op(self, req: pb.CaptureRequest, caller: Caller) -> PendingOp:
        """The sale a hold was for (rule 15): a purchase paid from the hold, no PIN (the member
        gave it at the authorization); the terminal's store or an operator's is checked by the
        kernel against the hold's."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        serial = hold_serial(req)
        lines, amount, redeem = basket(req)
        if redeem:  # points are spent with the member's PIN only, and a capture has none
            raise Invalid(R.REASON_INVALID_ARGUMENT, "redeem_points")
        card = self.swipes.card(req.card, req.till, caller)
        return self._op(req, rid, at_us, L.OP_PURCHASE, card, caller, amount, lines=lines,
                        op_flags=L.CAPTURE, link_seq=serial)

    def void_hold_op(self, req: pb.VoidHoldRequest, caller: Caller) -> PendingOp:
        """A hold released (rule 15): its store's terminal or an operator, no PIN."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        serial = hold_serial(req)
        card = self.swipes.card(req.card, req.till, caller)
        return self._op(req, rid, at_us, L.OP_HOLD_VOID, card, caller, link_seq=serial)

    def set_card_status_op(self, req: pb.SetCardStatusRequest, caller: Caller) -> PendingOp:
        """Card life (rule 14): an operator of the till's store, cashier or above; cancelling, a
        store manager or above. The writer checks the role, the scope and the transition. The
        card by its number or by its id (FindCards, rule 17): the same operation either way (the
        op, and so the journal entry and the request record, holds the card id only)."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        if req.status not in (L.STATUS_ACTIVE, L.STATUS_FROZEN, L.STATUS_LOST, L.STATUS_CLOSED):
            raise Invalid(R.REASON_INVALID_ARGUMENT, "status")
        role = (ROLE.OPERATOR_ROLE_STORE_MANAGER if req.status == L.STATUS_CLOSED
                else ROLE.OPERATOR_ROLE_CASHIER)
        card = self._operator_card(req, caller, role, by_id=True)
        return self._op(req, rid, at_us, L.OP_CARD_STATUS, card, caller, tier=req.status,
                        role=role)

    def replace_card_op(self, req: pb.ReplaceCardRequest, caller: Caller) -> PendingOp:
        """A new card for an old one (rule 16): an operator of the till's store, store manager
        or above (it moves everything a card holds, like a cancel), with the old card by number
        or by its id as FindCards found it (it is lost: never a swipe, so one request takes one
        terminal budget slot and one KSN, the new card's) and the new one (swiped at the desk,
        or by number); the new card's PIN, if the member gives one, under the new card's KSN.
        The writer checks both cards, the role and the scope."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        if not req.HasField("new_card"):
            raise Invalid(R.REASON_INVALID_ARGUMENT, "new_card")
        if req.card.WhichOneof("ref") == "secure":
            raise Invalid(R.REASON_INVALID_ARGUMENT, "card")
        role = ROLE.OPERATOR_ROLE_STORE_MANAGER
        old = self._operator_card(req, caller, role, by_id=True)
        new = self.swipes.card(req.new_card, req.till, caller)
        if new.card_id == old.card_id:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "new_card")
        pin_flags, new_check = 0, NO_PIN
        found = self.ledger.of_card(old.card_id).read_card(old.card_id)
        old_profile = found[1] if found else {}
        if req.new_pin_block:
            new_check = self.swipes.pin_check(new, req.new_pin_block, "new_pin_block", new=True,
                                              birthday=old_profile.get("birthday", ""))
            pin_flags = L.NEW_PIN
        # the op is the old card's; a swiped new card's KSN is the one the writer takes
        card = CardAccess(old.card_id, old.number, None, new.terminal_id, new.ksn_counter)
        mask = {"masked": cards.mask(new.number)}
        op = self._op(req, rid, at_us, L.OP_CARD_REPLACED, card, caller, pin_flags=pin_flags,
                      new_pin_check=new_check, referrer_id=new.card_id,
                      profile=profiles.encode(mask),
                      sealed=self.keyring.seal(new.card_id, new.number), role=role)
        # The member's profile moves to the new card with this masked number: sealed here for
        # the new card, so the group carries its bytes and a writer or replica without the
        # profile key stores what one with it does (docs/cluster.md, "Determinism rules");
        # none stored yet (opened in a group still in the writer's hands): the writer moves it.
        if not old_profile:
            return op
        return self._sealed_profile(op, new.card_id, {**old_profile, **mask})

    def reverse_op(self, req: pb.ReverseRequest, caller: Caller) -> PendingOp:
        """A request undone, or refused before it arrives (rule 13): named by its request_id in
        the caller's own namespace, so only the caller that sent it reverses it."""
        rid = request_id_bytes(req.request_id)
        at_us = client_time_us(req)
        original = request_id_bytes(req.original_request_id, "original_request_id")
        if original == rid:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "original_request_id")
        if req.original_client_time_us < 0:
            raise Invalid(R.REASON_INVALID_ARGUMENT, "original_client_time_us")
        card = self.swipes.card(req.card, req.till, caller)
        namespace = caller.namespace(card.terminal_id)
        return self._op(req, rid, at_us, L.OP_REVERSAL, card, caller,
                        original_key=request_key(*namespace, original),
                        ref_id=req.original_client_time_us)

    def money_ops(self, batch: bytes, caller: Caller) -> tuple[list, list, int] | None:
        """The plain purchases and top-ups of a serialized SubmitBatchRequest, and its purchases
        with lines, points offered or a coupon, built in C (cardcore.ext.batchwire): per
        operation, its PendingOp and request id, or None in both for one left to ``operation``
        (anything else, or one that fails a check); and how many were built. None when every operation goes through ``operation``:
        a caller that is a bad token, a terminal, no operator on a TLS server, an operator below
        cashier or not chain-wide (store scopes are checked per store there); a batch with an
        unknown field C cannot step over."""
        if caller.bad_token or caller.cert_terminal_id is not None:
            return None
        operator = caller.operator
        if operator is None:
            if self.access.tls:
                return None
            operator_id, role, scope = 0, 0, SCOPE_NONE
        elif operator.chain_wide and operator.role >= ROLE.OPERATOR_ROLE_CASHIER:
            operator_id, role, scope = operator.operator_id, ROLE.OPERATOR_ROLE_CASHIER, SCOPE_STORE
        else:
            return None
        kind, caller_id = caller.namespace(0)
        return self._money_ops.build(batch, L.PIN_REQUIRED | self.dev_pin,
                                 self.top_up_pin | self.dev_pin, self.swipes.require_luhn, kind,
                                 caller_id, operator_id, role, scope)

    def birthday(self, card_id: bytes) -> str:
        found = self.ledger.of_card(card_id).read_card(card_id)
        return found[1].get("birthday", "") if found else ""

    def build(self, build, request, caller: Caller):
        """``build(request, caller)``; a terminal swipe refused after it was taken into the
        terminal's budget is answered in the budget here (with the refusal's reason, or
        INTERNAL)."""
        swipes = self.swipes
        swipes.taken = None
        try:
            return build(request, caller)
        except BaseException as exc:
            if swipes.taken is not None:
                self.access.answered(swipes.taken, exc.reason if isinstance(exc, Invalid)
                                     else L.R_INTERNAL)
            raise

    def operation(self, op: pb.Operation, caller: Caller) -> tuple[str, int, PendingOp | Invalid]:
        """(request_id, op type, PendingOp or the Invalid that refused it) of a batch/stream item."""
        kind = op.WhichOneof("op")
        if kind is None:
            return "", 0, Invalid(R.REASON_INVALID_ARGUMENT, "(message)" if op is MALFORMED else "op")
        op_type, build = self.builders[kind]
        request = getattr(op, kind)
        try:
            built = self.build(build, request, caller)
            if op_type == L.OP_IMPORT_CARD:  # answered under the request id made for the row
                return built.request_key[L.REQUEST_KEY_HEAD.size:].decode("ascii"), op_type, built
            return request.request_id, op_type, built
        except Invalid as exc:
            return request.request_id, op_type, exc
        except Exception:  # a bug, not the caller's: this operation fails, its neighbours go on
            log.exception("operation %s failed", cpb.OperationType.Name(op_type))
            return request.request_id, op_type, Invalid(R.REASON_INTERNAL, "")
