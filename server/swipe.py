"""The swipe: who names which card, and the per-swipe crypto that proves it.

Resolves a request's ``CardRef`` into a card id: a clear number from an
operator (or anyone in development mode), a card id an operator found by the
member's phone or name (rule 17; only where the call takes one), or a
terminal's encrypted card data
opened under the DUKPT data key its KSN names, after the terminal's admission
into its budget. Deciphers PIN blocks under the same KSN into the stored-form
check value. Nothing here writes; the writer checks the KSN again against the
ledger, atomically with the operation.
"""
from __future__ import annotations

import dataclasses

from cardcore import cards
from cardcore import layout as L
from cardcore import pin as pinlib
from cardcore.carddata import CardDataError, decrypt_card_data
from cardcore.dukpt import Ksn, KeyUsage
from cardcore.ext import cardno
from cardcore.keyring import Keyring
from cardcore.v1 import common_pb2 as cpb

from .access import ADMIT, BUSY, ROLE, Access, Caller
from .errors import Invalid

R = cpb.Reason


@dataclasses.dataclass(slots=True, repr=False)
class CardAccess:
    """A request's card, resolved: its id and number ("" when named by its id), and for a
    terminal its swipe keys. No repr: it holds a clear card number and a PIN key."""
    card_id: bytes
    number: str
    pin_key: bytes | None = None   # this transaction's DUKPT PIN key (terminal swipes)
    terminal_id: int = 0           # the terminal whose KSN this is
    ksn_counter: int = 0


class Swipes:
    """Card resolution and PIN blocks for one server (its keyring and access registry)."""

    def __init__(self, access: Access, keyring: Keyring, require_luhn: bool):
        self.access = access
        self.require_luhn = require_luhn
        self._index = cards.CardIndex(keyring.index_key)
        self._pin_checker = pinlib.PinChecker(keyring.pin_key)
        # The terminal of the swipe being built: taken into its budget, answered by whoever
        # ends the swipe (the builder's refusal, or the writer's answer).
        self.taken: int | None = None

    def number_ok(self, number: str, field: str) -> None:
        if not cardno.number_ok(number, self.require_luhn):
            raise Invalid(R.REASON_INVALID_CARD_NUMBER, field)

    def card(self, ref: cpb.CardRef, till: cpb.Till | None, caller: Caller,
             role: int = ROLE.OPERATOR_ROLE_CASHIER, by_id: bool = False) -> CardAccess:
        """Resolve the card and check that this caller may name it this way.

        Clear numbers and card ids come from operators (``role`` or above, the
        till's store in scope; no till is store 0) or, without TLS, from anyone;
        terminals always encrypt (an inquiry may leave out the till: the KSN
        names it). A card id only where the call takes one (``by_id``): it has
        no number, so nothing that needs the number (a PIN block, a seal) can
        follow.
        """
        if caller.bad_token:
            raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        kind = ref.WhichOneof("ref")
        if kind == "secure":
            return self._secure_card(ref.secure, till, caller)
        field = "card.card_id" if kind == "card_id" else "card.card_number"
        if caller.cert_terminal_id is not None:
            raise Invalid(R.REASON_CLEAR_CARD_REFUSED, field)
        if kind == "card_id" and (not by_id or len(ref.card_id) != L.CARD_ID_SIZE):
            raise Invalid(R.REASON_CARD_ID_NOT_ACCEPTED, field)
        operator = caller.operator
        if operator is None:
            if self.access.tls:
                raise Invalid(R.REASON_UNAUTHENTICATED, "authorization")
        elif not operator.may(role, till.store_id if till is not None else 0):
            raise Invalid(R.REASON_PERMISSION_DENIED, "till.store_id")
        if kind == "card_id":
            return CardAccess(ref.card_id, "")
        number = ref.card_number
        self.number_ok(number, "card.card_number")
        return CardAccess(self._index.card_id(number), number)

    def referrer(self, number: str, caller: Caller) -> bytes:
        """The card id of a referring member's card, named by its number: from an operator (any
        store: a referral is not a swipe) or without TLS; a terminal alone cannot name one."""
        if caller.operator is None and self.access.tls:
            raise Invalid(R.REASON_OPERATOR_REQUIRED, "referrer_card_number")
        self.number_ok(number, "referrer_card_number")
        return self._index.card_id(number)

    def _secure_card(self, secure: cpb.SecureCard, till: cpb.Till | None, caller: Caller) -> CardAccess:
        """A terminal's swipe: its KSN names the terminal, whose keys open the card data."""
        access = self.access
        try:
            ksn = Ksn.parse(secure.ksn)
        except ValueError:
            raise Invalid(R.REASON_KSN_INVALID, "card.secure.ksn") from None
        terminal = access.terminal_of_ikid(ksn.ikid)
        if terminal is None or (till is not None and till.terminal_id != terminal.terminal_id):
            raise Invalid(R.REASON_TERMINAL_UNKNOWN, "card.secure.ksn")
        tid = terminal.terminal_id
        if terminal.revoked:
            raise Invalid(R.REASON_TERMINAL_REVOKED, "till.terminal_id")
        if access.tls and caller.cert_terminal_id != tid:
            raise Invalid(R.REASON_TERMINAL_MISMATCH, "till.terminal_id")
        if till is not None and till.store_id != terminal.store_id:
            raise Invalid(R.REASON_TERMINAL_MISMATCH, "till.store_id")
        admission = access.admission(tid)  # before the KSN is used: a busy swipe can retry
        if admission != ADMIT:
            raise Invalid(R.REASON_RATE_LIMITED, "till.terminal_id",
                          busy_terminal=tid if admission == BUSY else 0)
        if not access.ksn_fresh(tid, ksn.counter):
            raise Invalid(R.REASON_KSN_REPLAYED, "card.secure.ksn")
        access.take(tid)
        self.taken = tid
        data_key, pin_key = access.key_path(ksn.ikid).working_keys(
            ksn.counter, KeyUsage.DATA_ENCRYPTION, KeyUsage.PIN_ENCRYPTION)
        try:
            number = decrypt_card_data(data_key, secure.ksn, secure.encrypted_card)
        except CardDataError:
            raise Invalid(R.REASON_CARD_DATA_INVALID, "card.secure.encrypted_card") from None
        self.number_ok(number, "card.secure.encrypted_card")
        return CardAccess(self._index.card_id(number), number, pin_key, tid, ksn.counter)

    def pin_check(self, card: CardAccess, block: bytes, field: str, *, new: bool = False,
                  birthday: str = "") -> bytes:
        """The stored-form check value of the PIN inside ``block`` (the PIN itself goes no
        further); a ``new`` PIN must not be an obvious one."""
        if card.pin_key is None:
            raise Invalid(R.REASON_PIN_BLOCK_INVALID, field)  # PIN blocks need a terminal's key
        try:
            pin = pinlib.decipher(card.pin_key, block, card.number)
        except pinlib.PinBlockError:
            raise Invalid(R.REASON_PIN_BLOCK_INVALID, field) from None
        if new and pinlib.is_weak(pin, birthday):
            raise Invalid(R.REASON_PIN_WEAK, field)
        return self._pin_checker.check(card.card_id, pin)
