"""The card program and the arithmetic rules, written down once.

The rules (the Cython kernel in ``ext/kernel.pyx`` and the pure-Python
reference in ``reference.py`` both implement exactly these; a hypothesis test
checks they agree on every input):

1. Money is int64 minor units (fen). Points are int64. Nothing is ever
   wrapped: an operation whose result would pass 2**63 - 1 in any field
   (principal + bonus, points, lifetime paid or topped up) is declined with
   REASON_AMOUNT_OVERFLOW and changes nothing.
2. A purchase is a list of lines (category code, gross amount); a purchase
   without lines is one line of category 0 for its amount. A category code
   the program does not define declines it with REASON_UNKNOWN_CATEGORY.
3. Per line, with the card's tier before the purchase: the rate is the tier's
   ``rate_bp`` for the category (the tier's rate unless the tier overrides the
   category; 10000 for a category that is not discountable), and
   ``paid = round_half_up(gross * rate_bp / 10000) = (gross * rate_bp + 5000) // 10000``
   (exact integers; the kernel uses 128-bit intermediates). Edges: gross 1 at
   9500 -> 0.95 -> 1; 10 at 9500 -> 9.5 -> 10; 30 at 9500 -> 28.5 -> 29; 1 at
   4999 -> 0. ``discount = gross - paid``. The purchase's figures are the sums
   of its lines'.
4. Points redemption (the program offers it when ``redeem_points > 0``): the
   member offers P points; the card must hold them (else
   REASON_INSUFFICIENT_POINTS; REASON_REDEMPTION_NOT_OFFERED when the program
   has no redemption). ``blocks = min(P // redeem_points,
   cap // redeem_value_minor)`` with ``cap = paid * redeem_cap_bp // 10000``
   (floor); points taken ``blocks * redeem_points``, fen paid by them
   ``redeemed = blocks * redeem_value_minor``. Points left over from a partial
   block, or over the cap, stay on the card: the result says what was taken.
   The redeemed fen pay the lines in order (the first line first, each up to
   its paid amount).
5. Points earned, per line, on the money the line took from the balance:
   ``((paid - redeemed_on_line) // points_unit_minor) * points_per_unit`` (floor;
   the tier's ``points_per_unit`` for the category). Points never earn points.
   In the member's birth month (the group's time at the program's
   ``utc_offset_minutes``), each line's points are multiplied by
   ``birthday_points_bp / 10000``, floored (20000: double points). What a line
   earns and what the purchase earns in all are fields of their own (the line,
   the journal entry's points delta, the undo record a refund reads): past
   2**63 - 1 either declines the purchase with REASON_AMOUNT_OVERFLOW (rule 1),
   even when the card owes points (rule 12) enough to keep its balance within.
6. The balance pays ``due = paid - redeemed``. It needs ``due <= principal +
   bonus - held`` (REASON_INSUFFICIENT_FUNDS with the available amount
   otherwise; balances never go negative). The program's ``spend_order`` says
   which bucket pays: principal first, bonus first, or proportional, where
   ``from_bonus = round_half_up(due * bonus / (principal + bonus))`` and the
   rest from principal (neither bucket can go below zero: see ``spend``).
7. A top-up adds its amount to principal and the best promotion's bonus to
   bonus, never mixed. A promotion applies when the group's time is in its
   window ``[starts, ends)``, the amount is at least ``min_top_up_minor``, the
   card has used it fewer than ``per_card_limit`` times (0 = no limit) and,
   for a first-top-up promotion, the card was never topped up. Bonus: fixed
   ``bonus_minor``; or percent ``amount * bonus_bp // 10000`` (floor), at most
   ``max_bonus_minor`` when that is set. Of several, the largest bonus wins; a
   tie goes to the one written first. One promotion per top-up.
8. Tier upgrades, in the same write as the operation that earns them, never
   down: after a purchase, the highest tier above the card's whose
   ``upgrade_spend_minor`` (> 0) is at most the card's lifetime paid (the
   money purchases took from the balance); after a top-up, the highest tier
   above the card's whose ``upgrade_top_up_minor`` (> 0) is at most this one
   top-up. The journal entry's ``tier`` is the tier the operation was
   computed with, ``tier_after`` the card's tier after it. While the program
   reviews tiers (rule 11) on a card it tracks, the spend that counts is the
   current period's (lifetime paid minus ``period_base_paid_minor``), not the
   lifetime's.
9. Only active cards before their expiry can be topped up or spent (rule 14).
10. PINs (the exact order of checks is in ``layout``): a purchase always
   needs the card's PIN, a top-up when ``pin_on_top_up`` is set. After
   ``pin_tries_max`` wrong PINs in a row (default 3) the PIN locks: the money
   stays, the card cannot be spent until an operator resets the PIN. A right
   PIN sets the count back to 0.

11. Tier review (the program's ``tier_review_days`` P > 0; 0: tiers never go
   down). A card's qualification periods run P days each from the (UTC) day
   it was opened. A card opened under such a program is tracked from its
   opening; one opened before starts being tracked by a review entry that
   changes no tier (``review_start``: the period it is in that day; its spend
   before that day does not count); so does a card tracked with periods of another
   length, when the program's ``tier_review_days`` changed. The writer reviews a card before the
   first operation on it on or after its period's end day: the period that
   ended counts its spend and its largest single top-up (both 0 when a whole
   period went by without an operation, the period that ended being a later,
   empty one); the card's tier becomes the lower of its own and the highest
   tier those reach by rule 8's thresholds (tier 0 when none), except that a
   tier with neither threshold (given at opening, not earned) is kept. The
   new period starts on the last period boundary on or before that day. The
   review entry (OP_TIER_REVIEWED) carries the period's spend as its amount,
   the new period's first day as its ref_id, ``tier`` and ``tier_after``.
   Reads (GetCard) show the tier as of the card's last review; Quote reviews
   first, as the purchase would.

12. Refunds (of a purchase, named by its journal seq, on the same card, active): the
   refundable amount is what the sale cost after the tier's discount and any coupon,
   ``paid`` (the card's part plus the fen its points paid); a refund gives back R fen of what
   is left (0: all of it; more: REASON_REFUND_EXCEEDS_ORIGINAL with what is left). With T0
   the total refunded before and T1 = T0 + R, every figure of the sale goes back by its
   cumulative share ``share(x) = x * T1 // paid - x * T0 // paid`` (floor; the shares of all
   of a sale's refunds add up to exactly x): its money (principal + bonus; exactly R when no
   points paid), split between the buckets by the bonus's cumulative share of that money
   (``undo_money``), goes back to principal and bonus; the points it redeemed come back (into
   today's lot); the points it earned are taken back (oldest lots first). If the card holds
   fewer, the program's ``refund_points_shortfall`` says what happens: "forgive" (the
   default) takes what it holds, never below zero (the rest is the chain's loss); "owe" takes
   them all, and the card's points go below zero: a debt, which holds no lots, cannot be
   redeemed, exchanged or spent (every such check needs points the card holds), and the
   points the card earns next pay it first (the lots get only what is left over them: the lots
   add up to the card's points when positive, to nothing when not). Points the refund gives
   back (that the sale redeemed) pay the debt likewise. Cancelling a card forfeits its points,
   a debt too (its points become 0). A card that owes points under a program that later
   forgives keeps its debt; such a refund takes nothing more from it. Lifetime paid goes down by the money given back; the tier stays. The refund
   that leaves nothing (T1 = paid) gives back the sale's coupon while it is still valid. A
   refund or reversal is never refunded (REASON_NOT_REFUNDABLE), nor a reversed sale
   (REASON_ALREADY_REVERSED).
   By line (a sale with lines): the refund names lines by their 1-based numbers on the
   receipt, and no amount. A line's price is what the member paid for it, ``p = gross -
   discount`` (its tier's discount and the share of the sale's coupon it was given; the fen its
   points paid included): the stored line's figures. With P the sum of every line's p, L0 that
   of the lines refunds by line gave back before and L1 = L0 + that of the lines named, the
   refund gives back ``R = paid * L1 // P - paid * L0 // P`` (``line_refund``; exactly the
   lines' p when the card paid the whole sale, P = paid; in proportion when a till collected
   part of it), as a refund of R by the rest of this rule, so that a sale's lines refunded one
   by one give back exactly what one full refund gives, to the fen (the points taken back are
   the sale's cumulative share, not the line's own). R may be 0 (a free item: the line is
   given back, nothing moves); more than what is left: REASON_REFUND_EXCEEDS_ORIGINAL. It
   leaves nothing (the coupon comes back) when T1 = paid and no line is left. A line is given
   back once (REASON_LINE_ALREADY_REFUNDED); a number the sale has no line for is
   REASON_LINE_NOT_FOUND; lines of a sale without lines, or lines with an amount,
   REASON_INVALID_ARGUMENT.
13. Reversals (a terminal that timed out names its own request by request_id, within the
   program's ``reversal_window_minutes`` of the original): a purchase is refunded in full (of
   what refunds left) by rule 12, its coupon comes back whatever its validity, and an upgrade
   it made is undone if the card is still at the tier it reached; a top-up takes back its
   amount and its bonus (REASON_INSUFFICIENT_FUNDS if the card no longer holds them), its
   promotion use and its count, and an upgrade it made likewise. A request that was never
   applied (unknown, or declined) is reversed by an entry that moves nothing; an unknown one
   leaves a tombstone, so the original is refused with REASON_REVERSED when it arrives. A
   request reversed before is reversed again by an entry that moves nothing (a retry of the
   same reversal replays its answer, as every request does). A package use gives its use back
   (a count package one more use left, whatever its validity: the member did not get the
   service), moving no money; a gift redemption gives its points back (into today's lot, a
   debt paid first under "owe") and the gift back to its stock. Other operations are not
   reversible (REASON_NOT_REVERSIBLE: a package sale, a coupon bought with points, a points
   exchange are not undone; an operator refunds or re-issues by hand).

14. Card life (every change a journal entry: an operator's, but expiry, the server's). A card
   is opened active, or issued (OpenCard's ``issue_only``: a stock or gift card printed and
   handed out, not yet sold), which moves nothing until an operator activates it (issued ->
   active; a top-up does not activate it: REASON_CARD_NOT_ACTIVATED, so every activation names
   its operator, who sold the card). The program's ``activation_points`` come with becoming
   active: in the opening of an active card, in the activation of an issued one; never twice.
   active -> frozen (no money moves in or out; it is kept) -> active again; active or frozen ->
   reported lost -> active again (found); issued, active, frozen, lost or expired -> closed
   (cancelled; an issued card destroyed), for ever: the principal is paid back to the member
   (the entry's principal delta, what the till pays out), the bonus and the points are
   forfeited, the card is emptied. Any other change, or a change to the status the card has,
   is refused with REASON_ILLEGAL_TRANSITION and the card's status in the answer.
   Expiry: a card opened under a program whose ``card_valid_months`` M > 0 expires at
   ``expires_us`` (``card_expiry_us``), fixed in its record at opening, so a later program
   does not move a printed date (0: never; every card opened before): the start of the day M
   calendar months after its opening day on the chain's clock (``utc_offset_minutes``), the
   day of the month kept or, past the month's end, its last day (opened 31 January, M = 1: it
   expires at 28 February 00:00). A card is expired AT expires_us: an operation whose group
   time is >= expires_us finds it expired, whatever its stored status. The server writes
   the change (issued, active, frozen or lost -> expired, status 7, an OP_CARD_STATUS entry of
   the server's, operator 0) in the first group at or after the expiry, before the group's
   operations: for every card they name, and up to ``CARD_EXPIRIES_MAX`` others, oldest
   first (an idle server's maintenance groups too), so the stored status and GetCard follow
   within a tick. Only that sweep moves a card to expired; an expired card (or one past its
   expiry) is only closed (or replaced onto a new card): any other change is refused with
   REASON_CARD_EXPIRED. Only an active card before its expiry is topped up, spent or
   refunded (REASON_CARD_NOT_ACTIVATED for an issued one, REASON_CARD_EXPIRED for one
   expired, REASON_CARD_NOT_ACTIVE otherwise), except that a sale of an expired card is
   refunded to it, for its cancel to pay out; reversals apply whatever the status but closed
   (nothing comes back to a card paid out and emptied: REASON_CARD_NOT_ACTIVE); points
   expiries, tier reviews and hold releases whatever the status (but no tier review of a
   replaced card, rule 16). A card with open holds is
   not closed (REASON_HOLDS_OPEN: void them first).
15. Holds (pre-authorisation: a car wash, a hotel). An authorization (active card, the PIN
   like a purchase) holds A > 0 fen for M minutes (1..``HOLD_MINUTES_MAX``; the request's, or
   ``HOLD_MINUTES_DEFAULT``): it needs ``A <= available`` where ``available = principal +
   bonus - held`` (``available_minor``, the one function every reader uses), moves no money
   and adds A to ``held``; the hold's serial is the entry's seq, its expiry the group's time +
   M minutes. Exactly one of these closes an open hold, and releases A from ``held``: a
   capture (a purchase, rules 2-8 with every line, discount and point earned, with no coupon,
   no points offered and no partial payment, no PIN: the member gave it at the authorization,
   for money, not for points; funds judged with the
   hold released; it needs the card's part ``due <= A``, else REASON_CAPTURE_EXCEEDS_HOLD,
   and a time before the expiry, else REASON_HOLD_EXPIRED; at most once); a void (whatever
   the time, the card's status but closed); the server's release in the first group at or
   after the expiry; a reversal of the authorization while the hold is open (one of a hold
   already closed moves nothing; of a captured one: REASON_NOT_REVERSIBLE, reverse the
   capture). A closed hold is REASON_HOLD_CLOSED; a hold of another card, or captured or
   voided by a terminal of another store than the authorization's, REASON_HOLD_NOT_FOUND.
   A capture is refunded and reversed like any purchase; its hold stays closed.
16. Replacement (a new card for a lost, stolen, damaged, worn or expired one; an operator's,
   store manager or above, as cancelling: it moves everything a card holds; journaled): an
   active, frozen, lost or expired card with no open holds (REASON_HOLDS_OPEN) and a number
   that is not a card yet (REASON_CARD_ALREADY_EXISTS) becomes REPLACED, dead for ever, in one
   write with the new card's opening: two entries, CARD_REPLACED on the old card (its
   principal, bonus and points out, to zero; amount = principal + bonus; ref_id the status it
   left; link_seq the next entry) and right after it REPLACEMENT_OPENED on the new card (the
   same figures in; link_seq the first). The new card is active whatever the old one was,
   with the old one's tier, lifetime paid, opening time (its tier periods run on), home store
   and birth month, its program state (promotion uses, tier period), its points lots on their
   own days (so they expire when they would have), its coupons and packages under their
   serials, and the member's profile (as the group left it); it expires as a card opened at
   the replacement (rule 14), and counts in its tier in the old one's place. Its PIN is the one
   entered for it at the desk (the PIN check is bound to the card number, so the old one
   cannot be carried), or none until one is set with an operator at a till. Any later
   operation on the old number is refused with REASON_CARD_REPLACED, a second replacement of
   it too (a status change: REASON_ILLEGAL_TRANSITION with its status); a closed or issued
   card is not replaced (REASON_ILLEGAL_TRANSITION). A sale of the old card is refunded to the
   new card, which lists the old card's history after its own; a reversal sent with the old
   card (a terminal that timed out before the replacement) is applied to the new card, which
   holds what the request moved. History, refunds and reversals follow at most LINEAGE_MAX
   (64) replacements back.
17. Member lookup (an operator finds a member's cards without the card in hand). A card is
   found by its member's phone or name as given at opening, matched whole after normalising
   both sides the same way (``normalise_phone``, ``normalise_name``): a phone keeps its ASCII
   digits only, and a mainland China mobile number (11 digits starting with 1) written with
   its country code (``86`` or ``0086``, the ``+`` already dropped) loses the code; other
   numbers keep every digit as written (a foreign number typed once with its country code and
   once without does not match). A phone of fewer than ``PHONE_DIGITS_MIN`` (6) or more than
   ``PHONE_DIGITS_MAX`` (20) digits is neither indexed nor asked for. A name is NFKC-normalised,
   case-folded (then NFKC again), every white space removed (``Li Wei``, ``LI  WEI``, ``liwei``
   and full-width ``ＬＩ　ＷＥＩ`` are one name; ``张 三`` is ``张三``) and the middle dots of
   minority and foreign names (U+00B7, U+30FB, U+2022, U+2027, U+FF65) made one; no
   transliteration (``张三`` is not ``zhang san``); an empty result is neither indexed nor asked
   for. The index holds a keyed digest of the result, never the phone or name. One answer names
   at most ``layout.MEMBER_MATCHES_MAX`` cards (in card id order, not by date) and says when
   there are more; a phone or name that matches nothing is an empty answer, not an error.
18. Legacy import (a card of another system brought in with what it held there; a chain
   admin's, ``cardcore import``): one operation, one journal entry (OPERATION_TYPE_IMPORT_CARD),
   on a number that is not a card yet (REASON_CARD_ALREADY_EXISTS, whoever opened it: so a
   row is imported at most once, whatever runs or crashes). The card opens as an opening does
   (active, at the group's time, its expiry and tier period from then, home store and birth
   month from the profile) at the tier given (a tier of the current program, else
   REASON_INVALID_TIER), with principal ``P``, bonus ``B`` and points ``N`` as given (each
   >= 0 and ``P + B`` within int64, else REASON_INVALID_AMOUNT): the entry's amount is ``P``,
   its deltas ``P``, ``B`` and ``N``. The points go into one lot dated the day of the import
   (the group's UTC day), so they expire ``points_expire_days`` after the import, not after
   their days in the old system (which are not known). No activation or referral points (the
   member was one already), lifetime paid 0 (the old spend is not known: tier upgrades by
   spend count from the import on), no top-up in the program state (a first-top-up promotion
   is still due), and no PIN: the first one is set at a till with an operator vouching (the
   PIN rule's first PIN), as for a card opened without one. An import never carries a PIN
   (REASON_INVALID_ARGUMENT).

The default program has three tiers (standard 100 %, silver 95 %, gold
90 %), earns 1 point per 1.00 paid and has no categories, promotions or
redemption. Programs are TOML documents (``cardcore.program`` validates them),
stored in the ledger by version: each journal entry names the version it was
computed under; ``compiled`` turns one into the C struct the kernel reads.
"""
from __future__ import annotations

import dataclasses
import struct
import unicodedata
from array import array

from cardcore import layout as L

MAX_TIER_NAME_LEN = 32
MAX_NAME_LEN = 32  # categories and promotions
RATE_BP_FULL = 10000
SPEND_ORDERS = {"principal_first": L.SPEND_PRINCIPAL_FIRST, "bonus_first": L.SPEND_BONUS_FIRST,
                "proportional": L.SPEND_PROPORTIONAL}
SHORTFALLS = {"forgive": L.SHORTFALL_FORGIVE, "owe": L.SHORTFALL_OWE}  # rule 12
PROMOTION_KINDS = {"fixed": L.PROMO_FIXED, "percent": L.PROMO_PERCENT,
                   "first_top_up": L.PROMO_FIRST_TOP_UP}
PER_CARD_LIMIT_MAX = 255
COUPON_KINDS = {"amount_off": L.COUPON_AMOUNT_OFF, "percent_off": L.COUPON_PERCENT_OFF,
                "free_item": L.COUPON_FREE_ITEM}
COUPON_VALID_DAYS_MAX = 3660
PACKAGE_KINDS = {"count": L.PACKAGE_COUNT, "time": L.PACKAGE_TIME}
PACKAGE_USES_MAX = 10_000
POINTS_EXPIRE_DAYS_MAX = 3660
TIER_REVIEW_DAYS_MIN, TIER_REVIEW_DAYS_MAX = 7, 3660
REVERSAL_WINDOW_MINUTES_DEFAULT, REVERSAL_WINDOW_MINUTES_MAX = 1440, 43200
BIRTHDAY_BP_MAX = 100_000


@dataclasses.dataclass(frozen=True)
class Category:
    """A product category, by the code tills send (1..63; 0 is the default, always defined)."""
    code: int
    name: str
    discountable: bool = True


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str
    rate_bp: int
    points_per_unit: int | None = None     # None: the program's
    upgrade_spend_minor: int = 0           # rule 8; 0 = not reached by spend
    upgrade_top_up_minor: int = 0          # rule 8; 0 = not reached by one top-up
    category_rate_bp: tuple[tuple[int, int], ...] = ()         # (code, rate_bp) overrides
    category_points_per_unit: tuple[tuple[int, int], ...] = ()  # (code, points) overrides


@dataclasses.dataclass(frozen=True)
class Promotion:
    """A top-up promotion (rule 7). ``id`` is the chain's, stable across program versions: a
    card's use count follows it."""
    id: int
    name: str
    kind: int
    min_top_up_minor: int
    bonus_minor: int = 0
    bonus_bp: int = 0
    max_bonus_minor: int = 0
    starts_us: int = 0
    ends_us: int = L.INT64_MAX
    per_card_limit: int = 0


@dataclasses.dataclass(frozen=True)
class Coupon:
    """A coupon definition (rule 4a). ``id`` is the chain's, stable across program versions:
    issued coupons name it."""
    id: int
    name: str
    kind: int                    # COUPON_KINDS
    category: int = -1           # the eligible lines' category code; -1: every discountable line
    min_spend_minor: int = 0     # the eligible lines' paid amount needed (after the tier's rate)
    amount_off_minor: int = 0    # amount_off
    percent_bp: int = 0          # percent_off
    max_off_minor: int = 0       # percent_off, free_item: at most this much off (0 = no cap)
    valid_days: int = 30         # an issued coupon is valid this many days from its issue
    points_price: int = 0        # > 0: a member may buy one with this many points


@dataclasses.dataclass(frozen=True)
class Package:
    """A prepaid package the card program sells (rule 4b): ``uses`` services of a category
    (a count card: 10 haircuts) or, for a time package, any number of uses for ``days`` (a month
    pass, a trial week). ``id`` is the chain's, stable across program versions."""
    id: int
    name: str
    kind: int                    # PACKAGE_KINDS
    price_minor: int             # paid from the card's balance when sold
    days: int                    # valid this many days from the sale
    uses: int = 0                # count packages: how many uses; time packages: 0
    category: int = -1           # the service category it covers (-1: any), for the till


@dataclasses.dataclass(frozen=True)
class Gift:
    """A gift of the catalogue (rule 4c), for points, while its stock lasts: ``stock`` is the
    total ever offered under this id (raise it in a later program version to restock)."""
    id: int
    name: str
    points_price: int
    stock: int


@dataclasses.dataclass(frozen=True)
class Program:
    tiers: tuple[Tier, ...]
    points_unit_minor: int = 100
    points_per_unit: int = 1
    require_luhn: bool = True
    pin_tries_max: int = 3
    pin_on_top_up: bool = False
    categories: tuple[Category, ...] = ()
    promotions: tuple[Promotion, ...] = ()
    spend_order: int = L.SPEND_PRINCIPAL_FIRST
    redeem_points: int = 0
    redeem_value_minor: int = 0
    redeem_cap_bp: int = RATE_BP_FULL
    coupons: tuple[Coupon, ...] = ()
    packages: tuple[Package, ...] = ()
    points_expire_days: int = 0   # lots expire this many days after the day earned; 0 = never
    activation_points: int = 0    # points a card gets when opened
    referral_points: int = 0      # points the referrer gets when a card opened on its referral
    birthday_points_bp: int = 0   # points in the birth month, in bp of the usual; 0 = no bonus
    utc_offset_minutes: int = 0   # the chain's clock (480: China): which month it is
    exchange_points: int = 0      # whole blocks of this many points ...
    exchange_bonus_minor: int = 0  # ... become this much bonus money; 0 and 0: no exchange
    gifts: tuple[Gift, ...] = ()
    tier_review_days: int = 0     # rule 11: the qualification period; 0 = tiers never go down
    reversal_window_minutes: int = REVERSAL_WINDOW_MINUTES_DEFAULT  # rule 13
    card_valid_months: int = 0    # rule 14: a new card expires this many months on; 0 = never
    refund_points_shortfall: int = L.SHORTFALL_FORGIVE  # rule 12: SHORTFALLS
    # The business day (cardcore.daytotals): the chain's clock for its daily close, and the local
    # hour a business day starts (a sale at 01:30 belongs to the day before, with 4).
    business_day_utc_offset_minutes: int = 480
    business_day_cutoff_hour: int = 4

    def business_day_of(self, own: tuple[int, int] | None) -> tuple[int, int]:
        """(UTC offset minutes, cutoff hour) of a store's business day: its own (``own``, set
        by PutStore) if it has one, else the program's: the one place this rule is written."""
        return own or (self.business_day_utc_offset_minutes, self.business_day_cutoff_hour)

    def __post_init__(self) -> None:
        if not 1 <= len(self.tiers) <= L.MAX_TIERS:
            raise ValueError(f"a program has 1..{L.MAX_TIERS} tiers")
        codes = {c.code for c in self.categories}
        if len(codes) != len(self.categories) or not codes <= set(range(1, L.MAX_CATEGORIES)):
            raise ValueError(f"category codes are distinct, 1..{L.MAX_CATEGORIES - 1}")
        for tier in self.tiers:
            if not 1 <= tier.rate_bp <= RATE_BP_FULL:
                raise ValueError(f"tier {tier.name!r}: rate_bp must be 1..10000")
            if not tier.name or len(tier.name) > MAX_TIER_NAME_LEN:
                raise ValueError(f"tier names are 1..{MAX_TIER_NAME_LEN} characters")
            for code, bp in tier.category_rate_bp:
                if code not in codes or not 1 <= bp <= RATE_BP_FULL:
                    raise ValueError(f"tier {tier.name!r}: bad category rate {code}: {bp}")
            for code, per in tier.category_points_per_unit + (
                    (0, tier.points_per_unit or 0),):
                if (code and code not in codes) or not 0 <= per <= L.INT64_MAX:
                    raise ValueError(f"tier {tier.name!r}: bad points per unit {code}: {per}")
            if min(tier.upgrade_spend_minor, tier.upgrade_top_up_minor) < 0:
                raise ValueError(f"tier {tier.name!r}: upgrade thresholds are >= 0")
        if not 0 < self.points_unit_minor <= L.INT64_MAX:
            raise ValueError("points_unit_minor must be > 0")
        if not 0 <= self.points_per_unit <= L.INT64_MAX:
            raise ValueError("points_per_unit must be >= 0")
        if not 1 <= self.pin_tries_max <= L.PIN_TRIES_MAX_LIMIT:
            raise ValueError(f"pin_tries_max must be 1..{L.PIN_TRIES_MAX_LIMIT}")
        if len(self.promotions) > L.MAX_PROMOTIONS:
            raise ValueError(f"a program has at most {L.MAX_PROMOTIONS} promotions")
        if len({p.id for p in self.promotions}) != len(self.promotions):
            raise ValueError("promotion ids are distinct")
        for p in self.promotions:
            if (not 1 <= p.id <= 0xFFFF or p.kind not in PROMOTION_KINDS.values()
                    or not 0 < p.min_top_up_minor <= L.INT64_MAX
                    or not 0 <= p.bonus_bp <= RATE_BP_FULL
                    or min(p.bonus_minor, p.max_bonus_minor) < 0
                    or not p.starts_us < p.ends_us
                    or not 0 <= p.per_card_limit <= PER_CARD_LIMIT_MAX):
                raise ValueError(f"promotion {p.id}: out of range")
        if (len(self.coupons) > L.MAX_COUPONS
                or len({c.id for c in self.coupons}) != len(self.coupons)):
            raise ValueError(f"at most {L.MAX_COUPONS} coupons, with distinct ids")
        for c in self.coupons:
            if (not 1 <= c.id <= 0xFFFF or c.kind not in COUPON_KINDS.values()
                    or not (c.category == -1 or c.category == 0 or c.category in codes)
                    or min(c.min_spend_minor, c.amount_off_minor, c.max_off_minor,
                           c.points_price) < 0
                    or not 0 <= c.percent_bp <= RATE_BP_FULL
                    or not 1 <= c.valid_days <= COUPON_VALID_DAYS_MAX):
                raise ValueError(f"coupon {c.id}: out of range")
        if len(self.packages) > L.MAX_PACKAGES or len({p.id for p in self.packages}) != len(
                self.packages):
            raise ValueError(f"at most {L.MAX_PACKAGES} packages, with distinct ids")
        for p in self.packages:
            if (not 1 <= p.id <= 0xFFFF or p.kind not in PACKAGE_KINDS.values()
                    or not 0 < p.price_minor <= L.INT64_MAX
                    or not 1 <= p.days <= COUPON_VALID_DAYS_MAX
                    or not (1 <= p.uses <= PACKAGE_USES_MAX if p.kind == L.PACKAGE_COUNT
                            else p.uses == 0)
                    or not (p.category == -1 or p.category == 0 or p.category in codes)):
                raise ValueError(f"package {p.id}: out of range")
        if (not 0 <= self.activation_points <= L.INT64_MAX or self.referral_points < 0
                or self.exchange_points < 0
                or self.exchange_bonus_minor < 0
                or (self.exchange_points > 0) != (self.exchange_bonus_minor > 0)):
            raise ValueError("activation or exchange out of range")
        if (len(self.gifts) > L.MAX_GIFTS or len({g.id for g in self.gifts}) != len(self.gifts)
                or any(not 1 <= g.id <= 0xFFFF or g.points_price <= 0 or g.stock < 0
                       for g in self.gifts)):
            raise ValueError(f"at most {L.MAX_GIFTS} gifts, distinct ids, prices > 0")
        if not (self.birthday_points_bp == 0 or RATE_BP_FULL <= self.birthday_points_bp
                <= BIRTHDAY_BP_MAX) or not -720 <= self.utc_offset_minutes <= 840:
            raise ValueError("birthday_points_bp or utc_offset_minutes out of range")
        if not (-720 <= self.business_day_utc_offset_minutes <= 840
                and 0 <= self.business_day_cutoff_hour <= 23):
            raise ValueError("business_day_utc_offset_minutes or business_day_cutoff_hour out of "
                             "range")
        if not 0 <= self.points_expire_days <= POINTS_EXPIRE_DAYS_MAX:
            raise ValueError(f"points_expire_days must be 0..{POINTS_EXPIRE_DAYS_MAX}")
        if self.tier_review_days and not (
                TIER_REVIEW_DAYS_MIN <= self.tier_review_days <= TIER_REVIEW_DAYS_MAX):
            raise ValueError(f"tier_review_days must be 0 or {TIER_REVIEW_DAYS_MIN}.."
                             f"{TIER_REVIEW_DAYS_MAX}")
        if not 0 <= self.card_valid_months <= L.CARD_VALID_MONTHS_MAX:
            raise ValueError(f"card_valid_months must be 0..{L.CARD_VALID_MONTHS_MAX}")
        if not 1 <= self.reversal_window_minutes <= REVERSAL_WINDOW_MINUTES_MAX:
            raise ValueError(f"reversal_window_minutes must be 1..{REVERSAL_WINDOW_MINUTES_MAX}")
        if self.spend_order not in SPEND_ORDERS.values():
            raise ValueError("spend_order unknown")
        if self.refund_points_shortfall not in SHORTFALLS.values():
            raise ValueError("refund_points_shortfall unknown")
        if (self.redeem_points < 0 or self.redeem_value_minor < 0
                or (self.redeem_points > 0) != (self.redeem_value_minor > 0)
                or not 0 <= self.redeem_cap_bp <= RATE_BP_FULL):
            raise ValueError("redemption out of range")

    def gift(self, gift_id: int) -> Gift | None:
        return next((g for g in self.gifts if g.id == gift_id), None)

    def package(self, package_id: int) -> Package | None:
        return next((p for p in self.packages if p.id == package_id), None)

    def coupon(self, coupon_id: int) -> Coupon | None:
        return next((c for c in self.coupons if c.id == coupon_id), None)

    def category(self, code: int) -> Category | None:
        """The category of ``code`` (0: the default category)."""
        if code == 0:
            return DEFAULT_CATEGORY
        return next((c for c in self.categories if c.code == code), None)

    def packed(self, version: int) -> bytes:
        """The compiled program (layout: Program v3) the kernel reads, for stored ``version``:
        every lookup of rules 3, 5, 7 and 8 is an array index, never a dict per operation."""
        assert version >= 1
        flags = bytearray(L.MAX_CATEGORIES)
        flags[0] = L.CATEGORY_DEFINED | L.CATEGORY_DISCOUNTABLE
        for c in self.categories:
            flags[c.code] = L.CATEGORY_DEFINED | (L.CATEGORY_DISCOUNTABLE if c.discountable else 0)
        rates = array("H", bytes(2 * L.MAX_TIERS * L.MAX_CATEGORIES))
        per_unit = array("q", bytes(8 * L.MAX_TIERS * L.MAX_CATEGORIES))
        spend = [0] * L.MAX_TIERS
        top_up = [0] * L.MAX_TIERS
        for t, tier in enumerate(self.tiers):
            base = t * L.MAX_CATEGORIES
            tier_per = (self.points_per_unit if tier.points_per_unit is None
                        else tier.points_per_unit)
            rate_of, per_of = dict(tier.category_rate_bp), dict(tier.category_points_per_unit)
            for code in range(L.MAX_CATEGORIES):
                if not flags[code] & L.CATEGORY_DEFINED:
                    continue
                rates[base + code] = (rate_of.get(code, tier.rate_bp)
                                      if flags[code] & L.CATEGORY_DISCOUNTABLE else RATE_BP_FULL)
                per_unit[base + code] = per_of.get(code, tier_per)
            spend[t], top_up[t] = tier.upgrade_spend_minor, tier.upgrade_top_up_minor
        head = L.PROGRAM_HEAD.pack(
            len(self.tiers), self.pin_tries_max, self.points_unit_minor, self.redeem_points,
            self.redeem_value_minor, self.redeem_cap_bp, version, self.spend_order,
            len(self.promotions),
            L.PROGRAM_HEAD_TAIL.pack(self.card_valid_months, self.refund_points_shortfall),
            bytes(flags), *spend, *top_up)
        promos = b"".join(L.PROMOTION.pack(p.id, p.kind, p.per_card_limit, p.bonus_bp,
                                           p.min_top_up_minor, p.bonus_minor, p.max_bonus_minor,
                                           p.starts_us, p.ends_us, bytes(16))
                          for p in self.promotions)
        promos += bytes((L.MAX_PROMOTIONS - len(self.promotions)) * L.PROMOTION_SIZE)
        coupons = b"".join(L.COUPON_DEF.pack(c.id, c.kind, c.category, c.min_spend_minor,
                                             c.amount_off_minor, c.percent_bp, c.max_off_minor,
                                             c.points_price) for c in self.coupons)
        coupons += bytes((L.MAX_COUPONS - len(self.coupons)) * L.COUPON_DEF.size)
        packages = b"".join(L.PACKAGE_DEF.pack(p.id, p.kind, p.category, p.uses, p.days,
                                               p.price_minor) for p in self.packages)
        packages += bytes((L.MAX_PACKAGES - len(self.packages)) * L.PACKAGE_DEF.size)
        gifts = b"".join(L.GIFT_DEF.pack(g.id, g.points_price, g.stock) for g in self.gifts)
        gifts += bytes((L.MAX_GIFTS - len(self.gifts)) * L.GIFT_DEF.size)
        out = (head + promos + rates.tobytes() + per_unit.tobytes() + coupons
               + struct.pack("<II", len(self.coupons), len(self.packages)) + packages
               + L.PROGRAM_POINTS.pack(self.activation_points, self.exchange_points,
                                       self.exchange_bonus_minor, len(self.gifts),
                                       self.birthday_points_bp, self.utc_offset_minutes,
                                       self.tier_review_days)
               + gifts)
        assert len(out) == L.PROGRAM_SIZE
        return out


DEFAULT_CATEGORY = Category(0, "default")
DEFAULT_PROGRAM = Program(tiers=(Tier("standard", 10000), Tier("silver", 9500), Tier("gold", 9000)))


def month_of(ts_us: int, utc_offset_minutes: int) -> int:
    """Rule 5: the month (1..12) of a Unix time in microseconds on a clock ``utc_offset_minutes``
    ahead of UTC (the proleptic Gregorian calendar, days from 1970-01-01 as in Hinnant's
    civil_from_days; integers only, so the kernel computes it the same way)."""
    days = (ts_us + utc_offset_minutes * 60_000_000) // 86_400_000_000 + 719_468
    era = days // 146_097
    doe = days - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    return mp + 3 if mp < 10 else mp - 9


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days from 1970-01-01 of the proleptic Gregorian date y-m-d (Hinnant's days_from_civil;
    integers only, so the kernel computes it the same way)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The (year, month, day) of ``days`` from 1970-01-01 (Hinnant's civil_from_days)."""
    days += 719_468
    era = days // 146_097
    doe = days - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def card_expiry_us(opened_us: int, months: int, utc_offset_minutes: int) -> int:
    """Rule 14: when a card opened at ``opened_us`` expires under a program whose cards are valid
    ``months`` (0: never, 0): the start, on the chain's clock, of the day ``months`` calendar
    months after its opening day (the day kept, or the month's last); kept within 1..INT64_MAX
    (a record's expiry is never 0 when it has one, never past int64)."""
    if not months:
        return 0
    offset_us = utc_offset_minutes * 60_000_000
    y, m, d = civil_from_days((opened_us + offset_us) // L.DAY_US)
    y, m0 = divmod(y * 12 + m - 1 + months, 12)
    m = m0 + 1
    last = _MONTH_DAYS[m0] + (m == 2 and y % 4 == 0 and (y % 100 != 0 or y % 400 == 0))
    expires = days_from_civil(y, m, min(d, last)) * L.DAY_US - offset_us
    return min(max(expires, 1), L.INT64_MAX)


def expired(expires_us: int, ts_us: int) -> bool:
    """Rule 14: whether a card with ``expires_us`` (0: never) is expired at group time ``ts_us``:
    at its expiry, not only after it."""
    return expires_us != 0 and ts_us >= expires_us


def paid_minor(gross_minor: int, rate_bp: int) -> int:
    """Rule 3: what the member pays for a line, rounded half-up to the fen."""
    assert gross_minor > 0 and 1 <= rate_bp <= RATE_BP_FULL
    return (gross_minor * rate_bp + 5000) // 10000


def points_earned(paid: int, points_unit_minor: int, points_per_unit: int) -> int:
    """Rule 5: whole units paid times points per unit (may exceed int64: callers check)."""
    return (paid // points_unit_minor) * points_per_unit


def redemption(points_offered: int, paid: int, redeem_points: int, redeem_value_minor: int,
               redeem_cap_bp: int) -> tuple[int, int]:
    """Rule 4: (points taken, fen they pay) for ``points_offered`` against ``paid``."""
    cap = paid * redeem_cap_bp // RATE_BP_FULL
    blocks = min(points_offered // redeem_points, cap // redeem_value_minor)
    return blocks * redeem_points, blocks * redeem_value_minor


def spend(due: int, principal: int, bonus: int, order: int) -> tuple[int, int]:
    """Rule 6: (from principal, from bonus) for ``due`` <= principal + bonus."""
    assert 0 <= due <= principal + bonus
    if order == L.SPEND_BONUS_FIRST:
        from_bonus = min(due, bonus)
    elif order == L.SPEND_PROPORTIONAL:
        # half up; due - from_bonus <= principal: due*principal/(p+b) + 1/2 rounds to <= principal
        from_bonus = (2 * due * bonus + principal + bonus) // (2 * (principal + bonus)) if due else 0
    else:
        from_bonus = due - min(due, principal)
    return due - from_bonus, from_bonus


def promotion_bonus(p: Promotion, amount_minor: int) -> int:
    """Rule 7: the bonus promotion ``p`` gives a top-up of ``amount_minor`` that qualifies."""
    if p.kind == L.PROMO_PERCENT:
        bonus = amount_minor * p.bonus_bp // RATE_BP_FULL
        return min(bonus, p.max_bonus_minor) if p.max_bonus_minor else bonus
    return p.bonus_minor


def available_minor(principal_minor: int, bonus_minor: int, held_minor: int) -> int:
    """Rule 6: what a purchase can spend now. The one definition for the ledger, the service and
    verify; the kernel and the reference compute it in their own language, held equal by the
    differential tests."""
    return principal_minor + bonus_minor - held_minor


def review_start(opened_day: int, today: int, period_days: int) -> int:
    """Rule 11: the first day of the qualification period a card opened on ``opened_day`` is
    in on ``today`` (periods of ``period_days`` from its opening day)."""
    return opened_day + max(0, today - opened_day) // period_days * period_days


def review_due(period_days: int, flags: int, review_day: int, tracked_days: int,
               today: int) -> bool:
    """Rule 11: whether the writer reviews a card before its next operation on ``today``: the
    program reviews tiers and the card is not tracked yet (or was, with periods of another
    length: ``tracked_days``), or its period has ended."""
    return bool(period_days) and (not flags & L.REVIEW_STARTED or tracked_days != period_days
                                  or today >= review_day + period_days)


PHONE_DIGITS_MIN, PHONE_DIGITS_MAX = 6, 20
MAINLAND_CODES = ("0086", "86")
_MIDDLE_DOTS = str.maketrans({"\u30fb": "\u00b7", "\u2022": "\u00b7", "\u2027": "\u00b7",
                              "\uff65": "\u00b7"})


def normalise_phone(phone: str) -> str:
    """Rule 17: the digits a phone is matched by; "" when it has too few or too many."""
    digits = "".join(ch for ch in phone if "0" <= ch <= "9")
    for code in MAINLAND_CODES:
        rest = digits[len(code):]
        if digits.startswith(code) and len(rest) == 11 and rest[0] == "1":
            digits = rest
            break
    return digits if PHONE_DIGITS_MIN <= len(digits) <= PHONE_DIGITS_MAX else ""


def normalise_name(name: str) -> str:
    """Rule 17: the form a name is matched by (NFKC, case-folded, no white space, one middle
    dot); "" when nothing is left."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(folded.split()).translate(_MIDDLE_DOTS)


def undo_money(principal: int, bonus: int, paid: int, before: int, after: int) -> tuple[int, int]:
    """Rule 12: (principal, bonus) a sale's refunds from ``before`` to ``after`` (of ``paid``)
    give back. The money is the sale's money's cumulative share, so a sale paid without points
    gives back exactly what is asked; the bonus its share of that money, cumulatively, so both
    buckets end exact and neither part is ever negative."""
    money = principal + bonus
    if paid:
        m0, m1 = money * before // paid, money * after // paid
    else:  # nothing was paid: all of it, once
        m0, m1 = 0, 0 if before else money
    b = bonus * m1 // money - bonus * m0 // money if money else 0
    return m1 - m0 - b, b


def undo_share(x: int, paid: int, before: int, after: int) -> int:
    """Rule 12: the part of a sale's figure ``x`` that refunds from ``before`` to ``after`` (of
    ``paid``) give back; the parts of all of a sale's refunds add up to exactly ``x``."""
    assert 0 <= before <= after <= paid and paid > 0
    return x * after // paid - x * before // paid


def line_refund(paid: int, lines_paid: int, before: int, after: int) -> int:
    """Rule 12 by line: the fen a refund of lines gives back, from ``before`` to ``after`` of the
    sale's lines' prices (``lines_paid`` = P in all); the parts of all its lines add up to
    exactly ``paid``, however they are grouped."""
    assert 0 <= before <= after <= lines_paid and 0 <= paid <= lines_paid
    if not lines_paid:
        return 0
    return paid * after // lines_paid - paid * before // lines_paid
