# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ledger's arithmetic over fixed-size records: the hot loop of every group commit.

Works on bytes and C structs only: the records buffer, the operations buffer,
the slot array and the journal output are typed memoryviews; the loop touches
no Python object. The rules are in cardcore.rules; cardcore.reference is the
readable twin and the differential tests hold the two to the same output.
Bounds are checked once, before the loop (boundscheck is off inside it).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcpy, memset

from records cimport (cc_card_ext_t, cc_card_t, cc_coupon_def_t, cc_coupon_t, cc_i128,
                     cc_gift_def_t, cc_gift_t, cc_journal_t, cc_line_t, cc_op_t,
                     cc_package_def_t, cc_package_t, cc_program_t, cc_promotion_t, cc_undo_t,
                     cc_hold_t)

cdef extern from "<stdint.h>":
    const int64_t INT64_MAX

cdef enum:
    CARD_SIZE = 128
    JOURNAL_SIZE = 256
    OP_SIZE = 192
    PROGRAM_SIZE = 15008
    LINE_SIZE = 64
    EXT_SIZE = 128
    PIN_CHECK_SIZE = 32
    MAX_TIERS = 16
    MAX_CATEGORIES = 64
    MAX_PROMOTIONS = 16
    PROMOTION_SLOTS = 16
    LINES_MAX = 100
    RATE_FULL = 10000
    CARD_VALID_MONTHS_MAX = 1200

# Values of cardcore.v1.OperationType / CardStatus / Reason and the flag bits of
# cardcore.layout (tests check they agree).
cdef enum:
    OP_OPEN = 1
    OP_TOP_UP = 2
    OP_PURCHASE = 3
    OP_SET_PIN = 4
    OP_RESET_PIN = 5
    OP_PIN_FAILED = 6
    OP_BALANCE_INQUIRY = 7
    OP_COUPON_ISSUE = 8
    OP_PACKAGE_SELL = 9
    OP_PACKAGE_USE = 10
    OP_POINTS_EXPIRED = 11
    OP_POINTS_EXCHANGE = 12
    OP_GIFT_REDEEM = 13
    OP_REFERRAL_BONUS = 14
    OP_TIER_REVIEWED = 15
    OP_ADMIN_MIN = 16
    OP_ADMIN_MAX = 23
    OP_REFUND = 24
    OP_REVERSAL = 25
    OP_CARD_STATUS = 26
    OP_HOLD = 27
    OP_HOLD_VOID = 28
    OP_HOLD_EXPIRED = 29
    OP_KERNEL_MAX = 29
    OP_IMPORT_CARD = 37  # rule 18: past OP_KERNEL_MAX, let through by name
    CAPTURE = 2
    HOLD_OPEN = 1
    HOLD_CAPTURED = 2
    HOLD_VOIDED = 3
    HOLD_EXPIRED = 4
    HOLD_REVERSED = 5
    HOLD_MINUTES_MAX = 43200
    STATUS_FROZEN = 2
    STATUS_LOST = 3
    STATUS_CLOSED = 4
    STATUS_REPLACED = 5
    STATUS_ISSUED = 6
    STATUS_EXPIRED = 7
    ISSUE_ONLY = 4
    UNDO_REVERSED = 1
    UNDO_COMPLETE = 2
    REVIEW_STARTED = 1
    TIER_REVIEW_DAYS_MIN = 7
    TIER_REVIEW_DAYS_MAX = 3660
    STATUS_ACTIVE = 1
    R_OK = 0
    R_INVALID_ARGUMENT = 1
    R_INVALID_AMOUNT = 2
    R_INVALID_TIER = 5
    R_CARD_NOT_FOUND = 8
    R_CARD_ALREADY_EXISTS = 9
    R_CARD_NOT_ACTIVE = 10
    R_INSUFFICIENT_FUNDS = 11
    R_AMOUNT_OVERFLOW = 12
    R_PIN_REQUIRED = 20
    R_PIN_WRONG = 21
    R_PIN_LOCKED = 22
    R_PIN_NOT_SET = 23
    R_OPERATOR_REQUIRED = 40
    R_UNKNOWN_CATEGORY = 64
    R_INSUFFICIENT_POINTS = 65
    R_REDEMPTION_NOT_OFFERED = 66
    R_COUPON_NOT_FOUND = 67
    R_COUPON_USED = 68
    R_COUPON_NOT_VALID_NOW = 69
    R_COUPON_NOT_APPLICABLE = 70
    R_COUPON_NOT_FOR_SALE = 71
    R_PACKAGE_NOT_FOUND = 72
    R_PACKAGE_NOT_VALID_NOW = 73
    R_PACKAGE_USED_UP = 74
    R_GIFT_NOT_FOUND = 75
    R_GIFT_OUT_OF_STOCK = 76
    R_EXCHANGE_NOT_OFFERED = 77
    R_ORIGINAL_NOT_FOUND = 78
    R_NOT_REFUNDABLE = 79
    R_REFUND_EXCEEDS_ORIGINAL = 80
    R_ALREADY_REVERSED = 81
    R_NOT_REVERSIBLE = 84
    R_ILLEGAL_TRANSITION = 85
    R_HOLD_NOT_FOUND = 86
    R_HOLD_CLOSED = 87
    R_HOLD_EXPIRED = 88
    R_CAPTURE_EXCEEDS_HOLD = 89
    R_HOLDS_OPEN = 90
    R_CARD_REPLACED = 91
    R_CARD_EXPIRED = 92
    R_CARD_NOT_ACTIVATED = 93
    R_LINE_ALREADY_REFUNDED = 96
    SHORTFALL_OWE = 1
    LINE_ASKED = 1
    LINE_REFUNDED = 2
    MAX_GIFTS = 32
    PACKAGE_COUNT = 1
    MAX_PACKAGES = 32
    CATEGORY_DEFINED = 1
    CATEGORY_DISCOUNTABLE = 2
    COUPON_SIZE = 64
    MAX_COUPONS = 32
    COUPON_AMOUNT_OFF = 1
    COUPON_PERCENT_OFF = 2
    COUPON_ISSUED = 1
    COUPON_USED = 2
    SLOT_NONE = 0xFFFFFFFF
    SPEND_BONUS_FIRST = 1
    SPEND_PROPORTIONAL = 2
    PROMO_PERCENT = 2
    PROMO_FIRST_TOP_UP = 3
    ALLOW_PARTIAL = 1
    PARTIAL_PAYMENT = 1
    DIRTY_CARD = 1
    DIRTY_EXT = 2
    CARD_PIN_SET = 1
    CARD_PIN_LOCKED = 2
    PIN_PRESENTED = 1
    PIN_REQUIRED = 2
    PIN_OPTIONAL_UNSET = 4
    NEW_PIN = 8
    PIN_RIGHT = 1
    PIN_FAILED = 2


cdef inline int record_ok(const cc_card_t* rec) noexcept nogil:
    """Invariants of a stored card record, checked after read and before write."""
    if rec.version == 0:
        return 1
    if rec.version != 1:
        return 0
    if (rec.principal_minor < 0 or rec.bonus_minor < 0 or rec.points < -INT64_MAX
            or rec.held_minor < 0 or rec.lifetime_paid_minor < 0):
        return 0
    if rec.flags & ~<uint32_t>(CARD_PIN_SET | CARD_PIN_LOCKED):
        return 0
    if rec.flags & CARD_PIN_LOCKED and not rec.flags & CARD_PIN_SET:
        return 0
    if rec.birth_month > 12 or rec.expires_us < 0:
        return 0
    if not (STATUS_ACTIVE <= rec.status <= STATUS_CLOSED or rec.status == STATUS_ISSUED
            or rec.status == STATUS_EXPIRED or rec.status == 5):  # 5: replaced (its stream's)
        return 0
    return rec.principal_minor <= INT64_MAX - rec.bonus_minor


cdef inline int same_check(const uint8_t* a, const uint8_t* b) noexcept nogil:
    """Constant-time equality of two PIN verification values."""
    cdef uint8_t diff = 0
    cdef int i
    for i in range(PIN_CHECK_SIZE):
        diff |= a[i] ^ b[i]
    return diff == 0


cdef inline uint8_t pin_gate(const cc_program_t* prog, const cc_op_t* op, uint8_t pin_flags,
                             cc_card_t* rec, int* checked) noexcept nogil:
    """The PIN rule of cardcore.layout. *checked becomes PIN_RIGHT or PIN_FAILED (a wrong PIN
    counted) when the PIN was compared; a right PIN resets the count only if the operation
    then applies (the caller does that)."""
    cdef int presented = pin_flags & PIN_PRESENTED
    if not presented and not pin_flags & PIN_REQUIRED:
        return R_OK
    if not rec.flags & CARD_PIN_SET:
        if presented or not pin_flags & PIN_OPTIONAL_UNSET:
            return R_PIN_NOT_SET
        return R_OK
    if rec.flags & CARD_PIN_LOCKED:
        return R_PIN_LOCKED
    if not presented:
        return R_PIN_REQUIRED
    if not same_check(op.pin_check, rec.pin_check):
        rec.pin_tries += 1
        if rec.pin_tries >= prog.pin_tries_max:
            rec.flags |= CARD_PIN_LOCKED
        checked[0] = PIN_FAILED
        return R_PIN_WRONG
    checked[0] = PIN_RIGHT
    return R_OK


cdef inline void set_pin(const cc_op_t* op, cc_card_t* rec) noexcept nogil:
    """The new PIN from the operation, or none when it carries none; unlocks."""
    if op.pin_flags & NEW_PIN:
        memcpy(rec.pin_check, op.new_pin_check, PIN_CHECK_SIZE)
        rec.flags = CARD_PIN_SET
    else:
        memset(rec.pin_check, 0, PIN_CHECK_SIZE)
        rec.flags = 0
    rec.pin_tries = 0


cdef int64_t DAY_US = 86400 * <int64_t>1000000
cdef int64_t MINUTE_US = 60 * <int64_t>1000000


cdef inline int month_of(int64_t ts_us, int32_t offset_minutes) noexcept nogil:
    """Rule 5: the month (1..12) on the chain's clock (cardcore.rules.month_of)."""
    cdef cc_i128 t = <cc_i128>ts_us + <cc_i128>offset_minutes * MINUTE_US  # cannot overflow
    cdef cc_i128 whole = t // DAY_US
    if t % DAY_US != 0 and t < 0:  # floor, as Python's // (C truncates toward zero)
        whole -= 1
    cdef int64_t days = <int64_t>whole + 719468
    cdef int64_t era = (days if days >= 0 else days - 146096) // 146097
    cdef int64_t doe = days - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    return <int>(mp + 3 if mp < 10 else mp - 9)


cdef inline int64_t floor_div(int64_t a, int64_t b) noexcept nogil:
    """a // b rounded down, as Python's (C truncates toward zero); b > 0."""
    cdef int64_t q = a // b
    if a % b != 0 and a < 0:
        q -= 1
    return q


cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    """cardcore.rules.days_from_civil: days from 1970-01-01 of the date y-m-d."""
    if m <= 2:
        y -= 1
    cdef int64_t era = floor_div(y, 400)
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef int64_t[12] MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


cdef inline int64_t card_expiry(int64_t opened_us, uint32_t months,
                                int32_t offset_minutes) noexcept nogil:
    """Rule 14 (cardcore.rules.card_expiry_us): when a card opened at ``opened_us`` expires: the
    start, on the chain's clock, of the day ``months`` calendar months after its opening day
    (the day kept, or the month's last); 0 for months 0; kept within 1..INT64_MAX."""
    if months == 0:
        return 0
    cdef int64_t offset_us = <int64_t>offset_minutes * MINUTE_US
    cdef cc_i128 t = <cc_i128>opened_us + offset_us  # cannot overflow
    cdef cc_i128 whole = t // DAY_US
    if t % DAY_US != 0 and t < 0:
        whole -= 1
    cdef int64_t days = <int64_t>whole + 719468
    cdef int64_t era = floor_div(days, 146097)
    cdef int64_t doe = days - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int64_t d = doy - (153 * mp + 2) // 5 + 1
    cdef int64_t m = mp + 3 if mp < 10 else mp - 9
    cdef int64_t y = yoe + era * 400 + (1 if m <= 2 else 0)
    cdef int64_t k = y * 12 + m - 1 + months
    y = floor_div(k, 12)
    cdef int64_t m0 = k - y * 12
    m = m0 + 1
    cdef int64_t last = MONTH_DAYS[m0]
    if m == 2 and y % 4 == 0 and (y % 100 != 0 or y % 400 == 0):
        last += 1
    cdef cc_i128 expires = <cc_i128>days_from_civil(y, m, d if d < last else last) * DAY_US \
        - offset_us
    if expires < 1:
        return 1
    if expires > INT64_MAX:
        return INT64_MAX
    return <int64_t>expires


cdef inline int card_live(uint8_t status) noexcept nogil:
    """Rule 14: a status a card expires from (issued, active, frozen, lost)."""
    return (status == STATUS_ISSUED or status == STATUS_ACTIVE or status == STATUS_FROZEN
            or status == STATUS_LOST)


cdef inline uint32_t upgrade(const cc_program_t* prog, uint32_t tier, const int64_t* thresholds,
                             int64_t reached) noexcept nogil:
    """Rule 8: the highest tier above ``tier`` whose threshold (> 0) ``reached`` meets."""
    cdef int t = <int>prog.tier_count - 1
    while t > <int>tier:
        if thresholds[t] > 0 and thresholds[t] <= reached:
            return <uint32_t>t
        t -= 1
    return tier


cdef inline int64_t day_of(int64_t ts_us) noexcept nogil:
    """Rule 11's day: UTC days since 1970-01-01 (a time before 1970 counts as day 0)."""
    return ts_us // DAY_US if ts_us > 0 else 0


cdef inline int64_t period_spend(const cc_program_t* prog, const cc_card_t* rec,
                                 const cc_card_ext_t* ext) noexcept nogil:
    """Rule 8's spend: the lifetime's, or the current period's while rule 11 tracks the card."""
    if prog.tier_review_days and ext.flags & REVIEW_STARTED:
        return rec.lifetime_paid_minor - ext.period_base_paid_minor
    return rec.lifetime_paid_minor


cdef inline void start_period(cc_card_ext_t* ext, const cc_card_t* rec, int64_t day,
                              uint32_t period_days) noexcept nogil:
    ext.version = 1
    ext.flags |= REVIEW_STARTED
    ext.review_day = <uint32_t>day
    ext.review_period_days = period_days
    ext.period_base_paid_minor = rec.lifetime_paid_minor
    ext.period_top_up_max_minor = 0


cdef inline uint8_t review(const cc_program_t* prog, cc_card_t* rec, cc_card_ext_t* ext,
                           int64_t ts_us, int64_t* spent, int64_t* next_day) noexcept nogil:
    """Rule 11: the card's tier reviewed at the end of its period (or its tracking started)."""
    cdef int64_t period = prog.tier_review_days, today = day_of(ts_us)
    cdef int64_t opened = day_of(rec.opened_us), k, top = 0
    cdef int t, reached = 0
    if period == 0:
        return R_INVALID_ARGUMENT
    if not ext.flags & REVIEW_STARTED or ext.review_period_days != prog.tier_review_days:
        next_day[0] = opened + (today - opened if today > opened else 0) // period * period
        start_period(ext, rec, next_day[0], prog.tier_review_days)
        return R_OK
    if today < <int64_t>ext.review_day + period:
        return R_INVALID_ARGUMENT  # not due: the writer never asks
    k = (today - ext.review_day) // period
    if k == 1:  # else a whole period went by without an operation: nothing spent in it
        spent[0] = rec.lifetime_paid_minor - ext.period_base_paid_minor
        top = ext.period_top_up_max_minor
    t = <int>prog.tier_count - 1
    while t > 0:
        if ((prog.upgrade_spend_minor[t] > 0 and spent[0] >= prog.upgrade_spend_minor[t])
                or (prog.upgrade_top_up_minor[t] > 0 and top >= prog.upgrade_top_up_minor[t])):
            reached = t
            break
        t -= 1
    if rec.tier < prog.tier_count and (prog.upgrade_spend_minor[rec.tier] > 0
                                       or prog.upgrade_top_up_minor[rec.tier] > 0):
        if reached < rec.tier:
            rec.tier = <uint8_t>reached
    next_day[0] = ext.review_day + k * period
    start_period(ext, rec, next_day[0], prog.tier_review_days)
    return R_OK


cdef inline int promotion_slot(const cc_program_t* prog, const cc_card_ext_t* ext,
                               uint16_t pid) noexcept nogil:
    """The card's use slot of promotion ``pid``: its own, else the first free one (id 0, or a
    promotion the program no longer has); -1 when all are taken."""
    cdef int k, j, known
    for k in range(PROMOTION_SLOTS):
        if ext.promotion_id[k] == pid:
            return k
    for k in range(PROMOTION_SLOTS):
        if ext.promotion_id[k] == 0:
            return k
        known = 0
        for j in range(prog.promotion_count):
            if prog.promotions[j].id == ext.promotion_id[k]:
                known = 1
                break
        if not known:
            return k
    return -1


cdef inline int best_promotion(const cc_program_t* prog, const cc_card_ext_t* ext, int64_t amount,
                               int64_t ts_us, int64_t* bonus_out, int* slot_out) noexcept nogil:
    """Rule 7: the index of the best promotion for this top-up (its bonus and the card's use
    slot, -1 when unlimited, through the pointers), or -1 when none applies."""
    cdef int j, best = -1, slot_k
    cdef int64_t bonus
    cdef const cc_promotion_t* p
    bonus_out[0] = 0
    slot_out[0] = -1
    for j in range(prog.promotion_count):
        p = &prog.promotions[j]
        if ts_us < p.starts_us or ts_us >= p.ends_us or amount < p.min_top_up_minor:
            continue
        if p.kind == PROMO_FIRST_TOP_UP and ext.top_up_count != 0:
            continue
        slot_k = -1
        if p.per_card_limit:
            slot_k = promotion_slot(prog, ext, p.id)
            if slot_k < 0:
                continue
            if ext.promotion_id[slot_k] == p.id and ext.promotion_uses[slot_k] >= p.per_card_limit:
                continue
        if p.kind == PROMO_PERCENT:
            bonus = <int64_t>((<cc_i128>amount * p.bonus_bp) // RATE_FULL)
            if p.max_bonus_minor and bonus > p.max_bonus_minor:
                bonus = p.max_bonus_minor
        else:
            bonus = p.bonus_minor
        if bonus > bonus_out[0]:
            best = j
            bonus_out[0] = bonus
            slot_out[0] = slot_k
    return best


cdef inline const cc_coupon_def_t* coupon_def(const cc_program_t* prog, uint32_t coupon_id) noexcept nogil:
    cdef uint32_t j
    for j in range(prog.coupon_count):
        if prog.coupons[j].id == coupon_id:
            return &prog.coupons[j]
    return NULL


cdef inline const cc_package_def_t* package_def(const cc_program_t* prog,
                                                uint64_t package_id) noexcept nogil:
    cdef uint32_t j
    for j in range(prog.package_count):
        if prog.packages[j].id == package_id:
            return &prog.packages[j]
    return NULL


cdef inline int needs_item(const cc_op_t* op) noexcept nogil:
    """Whether an operation names a coupon, package or gift record the caller must pass."""
    return (op.op == OP_PACKAGE_USE or op.op == OP_GIFT_REDEEM or op.op == OP_REFUND
            or op.op == OP_REVERSAL or op.op == OP_HOLD_VOID or op.op == OP_HOLD_EXPIRED
            or (op.op == OP_PURCHASE and (op.ref_id != 0 or (op.op_flags & CAPTURE) != 0)))


cdef inline int hold_ok(const cc_hold_t* hold) noexcept nogil:
    """Invariants of a stored hold (none: all zeros)."""
    return hold.version == 0 or (hold.version == 1 and HOLD_OPEN <= hold.state <= HOLD_REVERSED
                                 and hold.amount_minor > 0
                                 and 0 <= hold.captured_minor <= hold.amount_minor)


cdef inline int hold_within(const cc_hold_t* hold, const cc_card_t* rec) noexcept nogil:
    """An open hold is part of what its card holds: one past it is a broken ledger, not a
    refusal (and would make a capture spend money the card has not got)."""
    return hold.version == 0 or hold.state != HOLD_OPEN or hold.amount_minor <= rec.held_minor


cdef inline uint8_t hold_check(const cc_hold_t* hold, const cc_op_t* op) noexcept nogil:
    """Rule 15: whether ``op`` may close this hold of its card: one of another card (not in the
    item: zeros), or closed by a terminal of another store, is not found; a closed one is
    closed."""
    if hold.version != 1 or (op.op != OP_HOLD_EXPIRED and op.operator_id == 0
                             and op.store_id != hold.store_id):
        return R_HOLD_NOT_FOUND
    if hold.state != HOLD_OPEN:
        return R_HOLD_CLOSED
    return R_OK


cdef inline int64_t share(int64_t x, int64_t paid, int64_t before, int64_t after) noexcept nogil:
    """Rule 12: the part of a sale's figure ``x`` (>= 0) refunds from ``before`` to ``after``
    give back (cardcore.rules.undo_share); the whole of it when nothing was paid."""
    if paid == 0:
        return x if before == 0 else 0
    return <int64_t>((<cc_i128>x * after) // paid - (<cc_i128>x * before) // paid)


cdef inline uint8_t give_back(const cc_undo_t* undo, cc_card_t* rec, int64_t before,
                              int64_t after, int64_t* fig, uint8_t shortfall) noexcept nogil:
    """Rules 12 and 13: a purchase's buckets and points from ``before`` to ``after`` of its
    paid amount: fig[0] principal, fig[1] bonus, fig[2] points taken back, fig[3] points
    given back (fig untouched on a decline)."""
    cdef cc_i128 money = <cc_i128>undo.principal_minor + undo.bonus_minor
    cdef cc_i128 m0 = money, m1 = money  # the money given back before, and after
    cdef int64_t p, b
    if undo.paid_minor:
        m0, m1 = money * before // undo.paid_minor, money * after // undo.paid_minor
    elif before:
        m0 = m1 = 0
    else:
        m0 = 0
    if money:  # the bonus's share of the money, cumulatively: exact at the end
        b = <int64_t>(undo.bonus_minor * m1 // money - undo.bonus_minor * m0 // money)
    else:
        b = 0
    p = <int64_t>(m1 - m0) - b
    cdef int64_t back = share(undo.points_redeemed, undo.paid_minor, before, after)
    cdef int64_t take = share(undo.points_earned, undo.paid_minor, before, after)
    if (<cc_i128>rec.principal_minor + rec.bonus_minor + p + b > INT64_MAX
            or rec.points > INT64_MAX - back):
        return R_AMOUNT_OVERFLOW
    if shortfall == SHORTFALL_OWE:  # all of them: the card may owe points
        if <cc_i128>rec.points - take < -<cc_i128>INT64_MAX:
            return R_AMOUNT_OVERFLOW
    elif take > rec.points:  # what the card holds: never below zero (nothing from a debt)
        take = rec.points if rec.points > 0 else 0
    fig[0], fig[1], fig[2], fig[3] = p, b, take, back
    rec.lifetime_paid_minor = rec.lifetime_paid_minor - p - b if rec.lifetime_paid_minor > p + b else 0
    return R_OK


cdef inline uint8_t line_refund(const cc_line_t* ls, int n, int64_t paid, int64_t* amount,
                                 int* asked, int* whole) noexcept nogil:
    """Rule 12 by line: the reason; on success *amount is what the lines marked LINE_ASKED
    give back (cardcore.rules.line_refund), *asked how many they are, *whole whether no line of
    the sale is left after them. ``ls`` are the sale's lines, all of them, as stored."""
    cdef cc_i128 total = 0, before = 0, after = 0
    cdef int64_t p
    cdef int k, bad = 0, again = 0
    asked[0] = 0
    whole[0] = 1
    for k in range(n):
        if (ls[k].line_tag > (LINE_ASKED | LINE_REFUNDED) or ls[k].amount_minor <= 0
                or ls[k].discount_minor < 0 or ls[k].discount_minor > ls[k].amount_minor):
            bad = 1
            continue
        p = ls[k].amount_minor - ls[k].discount_minor
        total += p
        if ls[k].line_tag & LINE_REFUNDED:
            before += p
            if ls[k].line_tag & LINE_ASKED:
                again = 1
        elif ls[k].line_tag & LINE_ASKED:
            after += p
            asked[0] += 1
        else:
            whole[0] = 0
    if bad or total > INT64_MAX or total < paid:
        return R_INVALID_ARGUMENT  # not the lines of a sale that cost paid
    if again:
        return R_LINE_ALREADY_REFUNDED
    if asked[0] == 0:
        return R_INVALID_ARGUMENT
    after += before
    amount[0] = <int64_t>((paid * after) // total - (paid * before) // total) if total else 0
    return R_OK


cdef inline int transition_ok(uint8_t now, uint8_t wanted) noexcept nogil:
    """Rule 14 (layout.CARD_TRANSITIONS): whether a card's status may change to ``wanted``
    (to expired: only at or after the card's expiry, which the caller checks)."""
    if now == STATUS_ISSUED:
        return wanted == STATUS_ACTIVE or wanted == STATUS_CLOSED or wanted == STATUS_EXPIRED
    if now == STATUS_ACTIVE:
        return (wanted == STATUS_FROZEN or wanted == STATUS_LOST or wanted == STATUS_CLOSED
                or wanted == STATUS_EXPIRED)
    if now == STATUS_FROZEN:
        return (wanted == STATUS_ACTIVE or wanted == STATUS_LOST or wanted == STATUS_CLOSED
                or wanted == STATUS_EXPIRED)
    if now == STATUS_LOST:
        return wanted == STATUS_ACTIVE or wanted == STATUS_CLOSED or wanted == STATUS_EXPIRED
    if now == STATUS_EXPIRED:
        return wanted == STATUS_CLOSED
    return 0


cdef inline int undo_ok(const cc_undo_t* undo) noexcept nogil:
    return undo.version == 0 or (
        undo.version == 1 and 0 <= undo.refunded_minor <= undo.paid_minor
        and undo.principal_minor >= 0 and undo.bonus_minor >= 0 and undo.points_redeemed >= 0
        and undo.points_earned >= 0)


cdef inline const cc_gift_def_t* gift_def(const cc_program_t* prog, uint64_t gift_id) noexcept nogil:
    cdef uint32_t j
    for j in range(prog.gift_count):
        if prog.gifts[j].id == gift_id:
            return &prog.gifts[j]
    return NULL


cdef inline int eligible(const cc_program_t* prog, const cc_coupon_def_t* d,
                         uint16_t code) noexcept nogil:
    """A line of category ``code`` is one coupon ``d`` takes off."""
    if d.category >= 0:
        return code == d.category
    return (prog.category_flags[code] & CATEGORY_DISCOUNTABLE) != 0


cdef inline uint8_t apply_coupon(const cc_program_t* prog, const cc_coupon_t* coupon,
                                 cc_line_t* ls, int n, int64_t* line_paid, int64_t ts_us,
                                 int64_t* off_out) noexcept nogil:
    """Rule 4a: the reason; on success *off_out is the fen off, taken from the eligible lines
    in order (their paid amounts and discounts carry it)."""
    cdef const cc_coupon_def_t* d
    cdef int k, first = -1
    cdef int64_t base = 0, off, left, share
    off_out[0] = 0
    if coupon.version != 1:
        return R_COUPON_NOT_FOUND
    if coupon.state != COUPON_ISSUED:
        return R_COUPON_USED
    if ts_us < coupon.valid_from_us or ts_us >= coupon.valid_until_us:
        return R_COUPON_NOT_VALID_NOW
    d = coupon_def(prog, coupon.coupon_id)
    if d == NULL:
        return R_COUPON_NOT_APPLICABLE
    for k in range(n):
        if eligible(prog, d, ls[k].category_code):
            base += line_paid[k]  # <= the purchase's gross: fits
            if first < 0:
                first = k
    if base == 0 or base < d.min_spend_minor:
        return R_COUPON_NOT_APPLICABLE
    if d.kind == COUPON_AMOUNT_OFF:
        off = d.amount_off_minor if d.amount_off_minor < base else base
    elif d.kind == COUPON_PERCENT_OFF:
        off = <int64_t>((<cc_i128>base * d.percent_bp) // RATE_FULL)
    else:  # one free item: the first eligible line
        off = line_paid[first]
    if d.kind != COUPON_AMOUNT_OFF and d.max_off_minor and off > d.max_off_minor:
        off = d.max_off_minor
    if off == 0:
        return R_COUPON_NOT_APPLICABLE
    left = off
    for k in range(n):
        if eligible(prog, d, ls[k].category_code):
            share = left if left < line_paid[k] else line_paid[k]
            line_paid[k] -= share
            ls[k].discount_minor += share
            left -= share
    off_out[0] = off
    return R_OK


cdef inline uint8_t purchase(const cc_program_t* prog, const cc_op_t* op, const cc_card_t* rec,
                             cc_line_t* lines, const cc_coupon_t* coupon, int64_t ts_us,
                             int64_t released, int64_t* fig) noexcept nogil:
    """Rules 2-6 for one purchase: the reason; fig = paid (after the tier's rate and the
    coupon), earned, points taken, redeemed fen, coupon off. Fills the lines' output fields
    once they passed the category check. ``released``: a capture's hold, counted as available
    (rule 15)."""
    cdef cc_line_t implicit
    cdef cc_line_t* ls = lines
    cdef int64_t line_paid[LINES_MAX]
    cdef int n = op.line_count, k, over = 0
    cdef uint32_t code, tier = rec.tier
    cdef int64_t gross = 0, paid = 0, p, taken = 0, redeemed = 0, blocks, cap_blocks, left, on_line
    cdef int64_t due
    cdef cc_i128 wide, earned = 0
    cdef uint8_t reason = R_OK
    fig[0] = fig[1] = fig[2] = fig[3] = fig[4] = 0
    if n == 0:
        memset(&implicit, 0, LINE_SIZE)
        implicit.amount_minor = op.amount_minor
        ls = &implicit
        n = 1
    for k in range(n):
        if ls[k].amount_minor <= 0 or ls[k].amount_minor > INT64_MAX - gross:
            return R_INVALID_AMOUNT
        gross += ls[k].amount_minor
    if gross != op.amount_minor:
        return R_INVALID_AMOUNT
    for k in range(n):
        code = ls[k].category_code
        if code >= MAX_CATEGORIES or not prog.category_flags[code] & CATEGORY_DEFINED:
            return R_UNKNOWN_CATEGORY
    for k in range(n):
        wide = <cc_i128>ls[k].amount_minor * prog.rate_bp[tier][ls[k].category_code] + 5000
        p = <int64_t>(wide // RATE_FULL)  # <= the line's amount: fits
        ls[k].discount_minor = ls[k].amount_minor - p
        ls[k].points_earned = 0
        ls[k].redeemed_minor = 0
        line_paid[k] = p
        paid += p
    if coupon != NULL:
        reason = apply_coupon(prog, coupon, ls, n, line_paid, ts_us, &fig[4])
        paid -= fig[4]
    if reason != R_OK:
        pass
    elif op.redeem_points:
        if prog.redeem_points == 0:
            reason = R_REDEMPTION_NOT_OFFERED
        elif rec.points < op.redeem_points:
            reason = R_INSUFFICIENT_POINTS
        else:
            blocks = op.redeem_points // prog.redeem_points
            cap_blocks = <int64_t>((<cc_i128>paid * prog.redeem_cap_bp) // RATE_FULL) // prog.redeem_value_minor
            if cap_blocks < blocks:
                blocks = cap_blocks
            taken = blocks * prog.redeem_points         # <= the points offered
            redeemed = blocks * prog.redeem_value_minor  # <= the cap <= paid
    cdef int birthday = (prog.birthday_points_bp != 0 and rec.birth_month != 0
                         and month_of(ts_us, prog.utc_offset_minutes) == <int>rec.birth_month)
    cdef int64_t available, card_pay = 0, left_card, share
    if reason == R_OK:
        due = paid - redeemed
        available = rec.principal_minor + rec.bonus_minor - (rec.held_minor - released)
        card_pay = due  # rule 6b: a partial payment takes what the card has, the till the rest
        if op.op_flags & ALLOW_PARTIAL and due > available and available > 0:
            card_pay = available
        left = redeemed
        left_card = card_pay
        for k in range(n):
            p = line_paid[k]
            on_line = left if left < p else p
            left -= on_line
            ls[k].redeemed_minor = on_line
            share = left_card if left_card < p - on_line else p - on_line
            left_card -= share
            wide = <cc_i128>(share // prog.points_unit_minor) * \
                prog.points_per_unit[tier][ls[k].category_code]
            if birthday and wide <= INT64_MAX:  # (past int64 it overflows either way)
                wide = wide * prog.birthday_points_bp // RATE_FULL
            if wide > INT64_MAX:
                over = 1
                ls[k].points_earned = INT64_MAX
            else:
                ls[k].points_earned = <int64_t>wide
                earned += wide
        if card_pay > available:
            reason = R_INSUFFICIENT_FUNDS
        elif (over or earned > INT64_MAX  # rule 5: a figure of the entry, whatever a debt absorbs
              or earned > <cc_i128>INT64_MAX - (<cc_i128>rec.points - taken)
              or card_pay > INT64_MAX - rec.lifetime_paid_minor):
            reason = R_AMOUNT_OVERFLOW
    fig[5] = card_pay
    fig[0] = paid
    fig[1] = <int64_t>earned if not over and earned <= INT64_MAX else 0
    fig[2] = taken
    fig[3] = redeemed
    return reason


cdef inline int new_card(const cc_program_t* prog, const cc_op_t* op, cc_card_t* rec,
                         cc_card_ext_t* ext, int64_t ts_us, uint8_t status) noexcept nogil:
    """A new card's record (an opening, an import), from its opening day: its expiry (rule
    14), and its tier period (rule 11) in ``ext`` when the program reviews tiers; 1 if ``ext``
    was written."""
    memset(rec, 0, CARD_SIZE)
    rec.version = 1
    rec.status = status
    rec.tier = op.tier
    rec.opened_us = ts_us
    rec.expires_us = card_expiry(ts_us, prog.card_valid_months, prog.utc_offset_minutes)
    rec.home_store_id = op.home_store_id
    rec.birth_month = op.birth_month
    if not prog.tier_review_days:
        return 0
    memset(ext, 0, EXT_SIZE)
    start_period(ext, rec, day_of(ts_us), prog.tier_review_days)
    return 1


cdef inline void spend(int64_t due, const cc_card_t* rec, uint8_t order, int64_t* from_principal,
                       int64_t* from_bonus) noexcept nogil:
    """Rule 6: which bucket pays ``due`` (<= principal + bonus)."""
    cdef int64_t total = rec.principal_minor + rec.bonus_minor  # fits: a record invariant
    cdef int64_t b
    if order == SPEND_BONUS_FIRST:
        b = due if due < rec.bonus_minor else rec.bonus_minor
    elif order == SPEND_PROPORTIONAL:
        if due == 0:
            b = 0
        else:
            b = <int64_t>((2 * <cc_i128>due * rec.bonus_minor + total) // (2 * <cc_i128>total))
    else:
        b = due - (due if due < rec.principal_minor else rec.principal_minor)
    from_bonus[0] = b
    from_principal[0] = due - b


cdef inline uint8_t apply_one(const cc_program_t* prog, const cc_op_t* op, cc_card_t* rec,
                              cc_card_ext_t* ext, cc_line_t* lines, cc_coupon_t* coupon,
                              cc_journal_t* out, int64_t ts_us, uint64_t seq, uint8_t* dirty,
                              uint8_t* item_dirty) noexcept nogil:
    """Apply one operation to its record; fill its journal entry; return the reason.

    The entry's seq is non-zero when the record changed: the operation was
    applied, or a wrong PIN was counted (a PIN-failed entry, reason PIN_WRONG).
    """
    cdef uint8_t reason = R_OK
    cdef uint8_t entry_op = op.op
    cdef uint8_t tier_before = rec.tier
    cdef int checked = 0, promo = -1, slot_k = -1, ext_changed = 0
    cdef int64_t amount = op.amount_minor
    cdef int64_t d_principal = 0, d_bonus = 0, d_points = 0, discount = 0, bonus = 0
    cdef int64_t d_held = 0, released = 0
    cdef int capture = op.op == OP_PURCHASE and (op.op_flags & CAPTURE) != 0
    cdef cc_hold_t* hold = <cc_hold_t*>coupon  # a capture's or void's hold, likewise
    cdef int64_t from_principal, from_bonus, due
    cdef int64_t fig[6]
    cdef uint16_t promotion_id = 0  # the entry's item_id: a promotion or a coupon definition
    cdef uint64_t entry_ref = op.ref_id
    cdef int partial = 0
    cdef const cc_coupon_def_t* d
    cdef const cc_package_def_t* pd
    cdef cc_package_t* pkg = <cc_package_t*>coupon  # a package use's record, in the same slot
    cdef cc_gift_t* gift = <cc_gift_t*>coupon        # a gift's stock record, likewise
    cdef const cc_gift_def_t* gd
    cdef int64_t blocks, next_day = 0
    cdef const cc_coupon_t* used_coupon = coupon if op.op == OP_PURCHASE and not capture else NULL
    cdef cc_undo_t* undo = <cc_undo_t*>coupon  # a refund's or reversal's original, likewise
    cdef int64_t g[4]
    cdef int64_t left
    cdef int undo_changed = 0, complete = 0, k, asked = 0, whole = 0
    cdef uint16_t entry_lines = op.line_count  # the entry's line_count: a refund's, those asked
    # rule 14: at or after its expiry a card is expired, whatever its stored status says
    cdef int lapsed = rec.expires_us != 0 and ts_us >= rec.expires_us
    cdef uint8_t status_now = STATUS_EXPIRED if lapsed and card_live(rec.status) else rec.status
    fig[0] = fig[1] = fig[2] = fig[3] = fig[4] = fig[5] = 0
    if ((op.line_count and op.op != OP_PURCHASE and op.op != OP_REFUND) or op.redeem_points < 0
            or op.line_count > LINES_MAX
            or (op.redeem_points and op.op != OP_PURCHASE and op.op != OP_COUPON_ISSUE
                and op.op != OP_POINTS_EXCHANGE and op.op != OP_IMPORT_CARD)
            or (op.op_flags & CAPTURE and (op.op != OP_PURCHASE or op.ref_id != 0
                                           or op.op_flags & ALLOW_PARTIAL
                                           or op.redeem_points != 0))
            or (op.op_flags & ISSUE_ONLY and op.op != OP_OPEN)):
        reason = R_INVALID_ARGUMENT
    elif op.op == OP_OPEN:
        if op.birth_month > 12:
            reason = R_INVALID_ARGUMENT
        elif rec.version != 0:
            reason = R_CARD_ALREADY_EXISTS
        elif op.tier >= prog.tier_count:
            reason = R_INVALID_TIER
        else:
            ext_changed = new_card(prog, op, rec, ext, ts_us,
                                   STATUS_ISSUED if op.op_flags & ISSUE_ONLY else STATUS_ACTIVE)
            tier_before = op.tier
            if rec.status == STATUS_ACTIVE:  # an issued card's come with its activation
                d_points = prog.activation_points
            if op.pin_flags & NEW_PIN:
                set_pin(op, rec)
    elif op.op == OP_IMPORT_CARD:  # rule 18: opened with its balances; amount principal,
        # ref_id bonus, redeem_points points
        if op.birth_month > 12 or op.pin_flags != 0 or op.op_flags != 0:
            reason = R_INVALID_ARGUMENT  # an import never carries a PIN
        elif rec.version != 0:
            reason = R_CARD_ALREADY_EXISTS
        elif op.tier >= prog.tier_count:
            reason = R_INVALID_TIER
        elif amount < 0 or op.ref_id > <uint64_t>(INT64_MAX - amount):
            reason = R_INVALID_AMOUNT
        else:
            ext_changed = new_card(prog, op, rec, ext, ts_us, STATUS_ACTIVE)
            tier_before = op.tier
            d_principal = amount
            d_bonus = <int64_t>op.ref_id
            d_points = op.redeem_points
            entry_ref = 0
    elif rec.version == 0:
        reason = R_CARD_NOT_FOUND
    elif op.op == OP_RESET_PIN:
        if rec.status == STATUS_REPLACED:
            reason = R_CARD_REPLACED  # rule 16: the number is dead; the new card has its PIN
        else:
            set_pin(op, rec)
    elif op.op == OP_CARD_STATUS:  # rule 14: an operator's change of the card's life, or expiry
        if amount != 0 or op.ref_id != 0:
            reason = R_INVALID_ARGUMENT
        elif op.tier == STATUS_EXPIRED:  # the server's, at or after the card's expiry only
            if not (lapsed and card_live(rec.status)):
                reason = R_ILLEGAL_TRANSITION
        elif not transition_ok(rec.status, op.tier):
            reason = R_ILLEGAL_TRANSITION
        elif status_now == STATUS_EXPIRED and op.tier != STATUS_CLOSED:
            reason = R_CARD_EXPIRED  # past its expiry: closed (or replaced), nothing else
        elif op.tier == STATUS_CLOSED and rec.held_minor != 0:
            reason = R_HOLDS_OPEN  # rule 15: the holds are voided first
        elif (rec.status == STATUS_ISSUED and op.tier == STATUS_ACTIVE
              and prog.activation_points > <cc_i128>INT64_MAX - rec.points):
            reason = R_AMOUNT_OVERFLOW
        if reason == R_OK:
            entry_ref = rec.status  # the status it left
            if op.tier == STATUS_CLOSED:  # the principal paid back, the rest forfeited
                amount = rec.principal_minor
                d_principal, d_bonus, d_points = -rec.principal_minor, -rec.bonus_minor, -rec.points
            elif rec.status == STATUS_ISSUED and op.tier == STATUS_ACTIVE:  # activated
                d_points = prog.activation_points
            rec.status = op.tier
    elif op.op == OP_REVERSAL:  # whatever the card's status but closed: it undoes what was done
        if amount != 0:
            reason = R_INVALID_AMOUNT
        elif rec.status == STATUS_CLOSED:
            reason = R_CARD_NOT_ACTIVE  # paid out and emptied for ever: nothing comes back to it
        elif rec.status == STATUS_REPLACED:
            reason = R_CARD_REPLACED  # rule 16: what it held moved on; a refund goes there
        elif undo.version == 0:
            pass  # never applied: an entry that moves nothing (the ledger keeps the tombstone)
        elif undo.flags & UNDO_REVERSED:
            pass  # reversed before: nothing more to undo
        elif undo.op == OP_PURCHASE:
            left = undo.paid_minor - undo.refunded_minor
            reason = give_back(undo, rec, undo.refunded_minor, undo.paid_minor, g,
                               prog.points_shortfall)
            if reason == R_OK:
                d_principal, d_bonus, d_points = g[0], g[1], g[3] - g[2]
                fig[2], fig[3] = g[2], left - g[0] - g[1]
                amount = left
                undo_changed = complete = 1
        elif undo.op == OP_TOP_UP:
            if (rec.principal_minor < undo.principal_minor or rec.bonus_minor < undo.bonus_minor
                    or rec.principal_minor - undo.principal_minor + rec.bonus_minor
                    - undo.bonus_minor < rec.held_minor):
                reason = R_INSUFFICIENT_FUNDS
            else:
                d_principal, d_bonus = -undo.principal_minor, -undo.bonus_minor
                amount = undo.paid_minor
                if ext.top_up_count != 0 and ext.top_up_count != <uint32_t>0xFFFFFFFF:
                    ext.top_up_count -= 1
                ext.lifetime_top_up_minor -= (undo.principal_minor
                                              if ext.lifetime_top_up_minor > undo.principal_minor
                                              else ext.lifetime_top_up_minor)
                for k in range(PROMOTION_SLOTS):
                    if (undo.item_id != 0 and ext.promotion_id[k] == undo.item_id
                            and ext.promotion_uses[k] > 0):
                        ext.promotion_uses[k] -= 1
                        break
                ext_changed = undo_changed = complete = 1
        elif undo.op == OP_HOLD:  # rule 15: what the hold still holds (0: it was closed)
            if undo.paid_minor > rec.held_minor:
                reason = R_INVALID_ARGUMENT
            else:
                d_held = -undo.paid_minor
                amount = undo.paid_minor
                undo_changed = complete = 1
        elif undo.op == OP_PACKAGE_USE:  # rule 13: the use comes back (the writer's, to its package)
            undo_changed = complete = 1
        elif undo.op == OP_GIFT_REDEEM:  # rule 13: its points come back (the writer: its stock)
            if undo.points_redeemed < 0 or undo.points_redeemed > <cc_i128>INT64_MAX - rec.points:
                reason = R_AMOUNT_OVERFLOW
            else:
                d_points = undo.points_redeemed
                undo_changed = complete = 1
        else:
            reason = R_NOT_REVERSIBLE
        if reason == R_OK and undo_changed and rec.tier == undo.tier_after and undo.tier < rec.tier:
            rec.tier = undo.tier  # the upgrade it made, undone
    elif op.op == OP_TIER_REVIEWED:  # whatever the card's status, like an expiry
        if amount != 0 or op.ref_id != 0:
            reason = R_INVALID_ARGUMENT
        else:
            reason = review(prog, rec, ext, ts_us, &amount, &next_day)
            entry_ref = <uint64_t>next_day  # the new period's first day
            ext_changed = 1
    elif op.op == OP_POINTS_EXPIRED:  # whatever the card's status: points expire all the same
        if amount <= 0:
            reason = R_INVALID_AMOUNT
        elif amount > rec.points:
            reason = R_INSUFFICIENT_POINTS
        else:
            d_points = -amount
    elif op.op == OP_HOLD_VOID or op.op == OP_HOLD_EXPIRED:  # rule 15: whatever the status
        if amount != 0 or op.ref_id != 0:
            reason = R_INVALID_ARGUMENT
        else:
            reason = hold_check(hold, op)
            if reason == R_OK and op.op == OP_HOLD_EXPIRED and ts_us < hold.expires_us:
                reason = R_INVALID_ARGUMENT  # not expired yet: the writer's to get right
            if reason == R_OK:
                amount = hold.amount_minor
                d_held = -amount
    elif status_now != STATUS_ACTIVE and not (status_now == STATUS_EXPIRED and op.op == OP_REFUND):
        reason = (R_CARD_REPLACED if status_now == STATUS_REPLACED else
                  R_CARD_EXPIRED if status_now == STATUS_EXPIRED else
                  R_CARD_NOT_ACTIVATED if status_now == STATUS_ISSUED else R_CARD_NOT_ACTIVE)
    elif op.op == OP_REFERRAL_BONUS:
        if amount <= 0:
            reason = R_INVALID_AMOUNT
        elif amount > <cc_i128>INT64_MAX - rec.points:
            reason = R_AMOUNT_OVERFLOW
        else:
            d_points = amount
    elif op.op == OP_REFUND:
        if undo.version == 0:
            reason = R_ORIGINAL_NOT_FOUND
        elif undo.op != OP_PURCHASE:
            reason = R_NOT_REFUNDABLE
        elif undo.flags & UNDO_REVERSED:
            reason = R_ALREADY_REVERSED
        elif amount < 0:
            reason = R_INVALID_AMOUNT
        elif op.line_count and amount != 0:
            reason = R_INVALID_ARGUMENT  # by line or by amount, not both
        else:
            left = undo.paid_minor - undo.refunded_minor
            if op.line_count:
                reason = line_refund(lines, op.line_count, undo.paid_minor, &amount, &asked,
                                     &whole)
                entry_lines = <uint16_t>asked
            elif amount == 0:
                amount = left  # all that is left
            if reason != R_OK:
                pass
            elif (amount == 0 and not op.line_count) or amount > left:
                reason = R_REFUND_EXCEEDS_ORIGINAL
                fig[3] = left  # what is left, for the answer (a decline is never journaled)
            else:
                reason = give_back(undo, rec, undo.refunded_minor, undo.refunded_minor + amount, g,
                                   prog.points_shortfall)
                if reason == R_OK:
                    d_principal, d_bonus, d_points = g[0], g[1], g[3] - g[2]
                    fig[2], fig[3] = g[2], amount - g[0] - g[1]
                    undo_changed = 1
                    complete = (undo.refunded_minor + amount == undo.paid_minor
                                and (whole or not op.line_count))
    elif op.op == OP_SET_PIN:
        if not op.pin_flags & NEW_PIN:
            reason = R_INVALID_ARGUMENT
        elif rec.flags & CARD_PIN_SET or op.pin_flags & PIN_PRESENTED:
            # changing a PIN always needs the old one
            reason = pin_gate(prog, op, op.pin_flags | PIN_REQUIRED, rec, &checked)
        elif op.operator_id == 0:
            reason = R_OPERATOR_REQUIRED  # a first PIN is set with an operator at the till
        if reason == R_OK:
            set_pin(op, rec)
    elif op.op == OP_BALANCE_INQUIRY:
        # the PIN like a purchase; a right one changes nothing (no entry, tries untouched)
        reason = pin_gate(prog, op, op.pin_flags | PIN_REQUIRED, rec, &checked)
        checked = PIN_FAILED if checked == PIN_FAILED else 0
    else:  # top-up, purchase or coupon issue (the caller checked the type)
        reason = pin_gate(prog, op, op.pin_flags, rec, &checked)
        if reason != R_OK:
            pass
        elif op.op == OP_COUPON_ISSUE:
            d = coupon_def(prog, <uint32_t>op.ref_id) if op.ref_id <= 0xFFFF else NULL
            if d == NULL:
                reason = R_COUPON_NOT_FOUND
            elif op.redeem_points == 0 and op.operator_id == 0:
                reason = R_OPERATOR_REQUIRED  # given away: an operator (a campaign) gives it
            elif op.redeem_points and op.redeem_points != d.points_price:
                reason = R_COUPON_NOT_FOR_SALE  # bought: at its points price, when it has one
            elif op.redeem_points and rec.points < op.redeem_points:
                reason = R_INSUFFICIENT_POINTS  # (a coupon given: whatever the points, a debt too)
            else:
                d_points = -op.redeem_points
                fig[2] = op.redeem_points
                promotion_id = d.id
        elif op.op == OP_POINTS_EXCHANGE:
            blocks = op.redeem_points // prog.exchange_points if prog.exchange_points else 0
            if not prog.exchange_points:
                reason = R_EXCHANGE_NOT_OFFERED
            elif amount != 0 or blocks == 0:
                reason = R_INVALID_ARGUMENT  # fewer points than one block offered
            elif rec.points < op.redeem_points:
                reason = R_INSUFFICIENT_POINTS
            elif (<cc_i128>rec.principal_minor + rec.bonus_minor
                  + <cc_i128>blocks * prog.exchange_bonus_minor > INT64_MAX):
                reason = R_AMOUNT_OVERFLOW
            else:
                fig[2] = blocks * prog.exchange_points
                d_points = -fig[2]
                d_bonus = blocks * prog.exchange_bonus_minor
        elif op.op == OP_GIFT_REDEEM:
            gd = gift_def(prog, op.ref_id)
            if amount != 0:
                reason = R_INVALID_AMOUNT
            elif gd == NULL:
                reason = R_GIFT_NOT_FOUND
            elif gift.given >= gd.stock:
                reason = R_GIFT_OUT_OF_STOCK
            elif rec.points < gd.points_price:
                reason = R_INSUFFICIENT_POINTS
            else:
                fig[2] = gd.points_price
                d_points = -gd.points_price
                promotion_id = gd.id
        elif op.op == OP_PACKAGE_USE:
            if amount != 0:
                reason = R_INVALID_AMOUNT
            elif pkg.version != 1:
                reason = R_PACKAGE_NOT_FOUND
            elif ts_us < pkg.valid_from_us or ts_us >= pkg.valid_until_us:
                reason = R_PACKAGE_NOT_VALID_NOW
            elif pkg.kind == PACKAGE_COUNT and pkg.uses_left == 0:
                reason = R_PACKAGE_USED_UP
            else:
                promotion_id = pkg.package_id
        elif amount <= 0:
            reason = R_INVALID_AMOUNT
        elif op.op == OP_HOLD:  # rule 15: held, not spent
            if op.ref_id < 1 or op.ref_id > HOLD_MINUTES_MAX:
                reason = R_INVALID_ARGUMENT
            elif amount > rec.principal_minor + rec.bonus_minor - rec.held_minor:
                reason = R_INSUFFICIENT_FUNDS
            elif ts_us > INT64_MAX - <int64_t>op.ref_id * MINUTE_US:
                reason = R_AMOUNT_OVERFLOW
            else:
                d_held = amount
                entry_ref = <uint64_t>(ts_us + <int64_t>op.ref_id * MINUTE_US)  # its expiry
        elif op.op == OP_PACKAGE_SELL:
            pd = package_def(prog, op.ref_id)
            if pd == NULL:
                reason = R_PACKAGE_NOT_FOUND
            elif amount != pd.price_minor:
                reason = R_INVALID_AMOUNT  # at the program's price
            elif rec.tier >= prog.tier_count:
                reason = R_INVALID_TIER
            elif amount > rec.principal_minor + rec.bonus_minor - rec.held_minor:
                reason = R_INSUFFICIENT_FUNDS
            elif amount > INT64_MAX - rec.lifetime_paid_minor:
                reason = R_AMOUNT_OVERFLOW
            else:  # paid like a purchase at full price: no discount, no points
                spend(amount, rec, prog.spend_order, &from_principal, &from_bonus)
                d_principal = -from_principal
                d_bonus = -from_bonus
                rec.lifetime_paid_minor += amount
                rec.tier = <uint8_t>upgrade(prog, rec.tier, prog.upgrade_spend_minor,
                                            period_spend(prog, rec, ext))
                promotion_id = pd.id
        elif op.op == OP_TOP_UP:
            promo = best_promotion(prog, ext, amount, ts_us, &bonus, &slot_k)
            if (<cc_i128>rec.principal_minor + rec.bonus_minor + amount + bonus > INT64_MAX
                    or ext.lifetime_top_up_minor > INT64_MAX - amount):
                reason = R_AMOUNT_OVERFLOW
            else:
                d_principal = amount
                d_bonus = bonus
                ext.version = 1
                if ext.top_up_count != <uint32_t>0xFFFFFFFF:
                    ext.top_up_count += 1
                ext.lifetime_top_up_minor += amount
                if ext.flags & REVIEW_STARTED and amount > ext.period_top_up_max_minor:
                    ext.period_top_up_max_minor = amount
                if promo >= 0:
                    promotion_id = prog.promotions[promo].id
                    if slot_k >= 0:
                        if ext.promotion_id[slot_k] != promotion_id:
                            ext.promotion_id[slot_k] = promotion_id
                            ext.promotion_uses[slot_k] = 0
                        ext.promotion_uses[slot_k] += 1
                ext_changed = 1
                rec.tier = <uint8_t>upgrade(prog, rec.tier, prog.upgrade_top_up_minor, amount)
        elif rec.tier >= prog.tier_count:
            reason = R_INVALID_TIER
        else:
            if capture:  # rule 15: paid from its hold, which it closes
                reason = hold_check(hold, op)
                if reason == R_OK and ts_us >= hold.expires_us:
                    reason = R_HOLD_EXPIRED
                released = hold.amount_minor
            if reason == R_OK:
                reason = purchase(prog, op, rec, lines, used_coupon, ts_us, released, fig)
            if reason == R_OK and capture and fig[5] > released:
                reason = R_CAPTURE_EXCEEDS_HOLD
            if reason == R_OK:
                d_held = -released
                if used_coupon != NULL:
                    promotion_id = coupon.coupon_id
                discount = amount - fig[0]
                due = fig[5]  # what the card pays: all that is due, or what it has (partial)
                spend(due, rec, prog.spend_order, &from_principal, &from_bonus)
                d_principal = -from_principal
                d_bonus = -from_bonus
                d_points = fig[1] - fig[2]
                partial = due < fig[0] - fig[3]
                rec.lifetime_paid_minor += due
                rec.tier = <uint8_t>upgrade(prog, rec.tier, prog.upgrade_spend_minor,
                                            period_spend(prog, rec, ext))
    cdef int pin_failed = checked == PIN_FAILED
    if pin_failed:
        entry_op = OP_PIN_FAILED
        amount = 0
    if reason == R_OK:
        if checked == PIN_RIGHT:
            rec.pin_tries = 0
        rec.principal_minor += d_principal
        rec.bonus_minor += d_bonus
        rec.points += d_points
        rec.held_minor += d_held
    cdef int changed = pin_failed or (reason == R_OK and op.op != OP_BALANCE_INQUIRY)
    if changed:
        rec.last_seq = seq
        dirty[0] |= DIRTY_CARD
        if ext_changed and reason == R_OK:
            dirty[0] |= DIRTY_EXT
        if used_coupon != NULL and reason == R_OK:
            coupon.state = COUPON_USED
            coupon.used_seq = seq
            coupon.off_minor = fig[4]
            item_dirty[0] = 1
        if op.op == OP_GIFT_REDEEM and reason == R_OK:
            gift.version = 1
            gift.gift_id = <uint16_t>op.ref_id
            gift.given += 1
            item_dirty[0] = 1
        if undo_changed and reason == R_OK:
            undo.refunded_minor = undo.paid_minor if op.op == OP_REVERSAL else (
                undo.refunded_minor + amount)
            if op.op == OP_REVERSAL:
                undo.flags |= UNDO_REVERSED
                undo.reversal_seq = seq
            item_dirty[0] = 1
        if reason == R_OK and (capture or op.op == OP_HOLD_VOID or op.op == OP_HOLD_EXPIRED):
            hold.state = (HOLD_CAPTURED if capture else
                          HOLD_VOIDED if op.op == OP_HOLD_VOID else HOLD_EXPIRED)
            hold.closed_seq = seq
            hold.captured_minor = fig[5] if capture else 0
            item_dirty[0] = 1
        if op.op == OP_PACKAGE_USE and reason == R_OK:
            if pkg.kind == PACKAGE_COUNT:
                pkg.uses_left -= 1
            pkg.last_used_seq = seq
            if pkg.uses != <uint32_t>0xFFFFFFFF:
                pkg.uses += 1
            item_dirty[0] = 1
    if op.op == OP_COUPON_ISSUE or op.op == OP_PACKAGE_SELL:
        entry_ref = seq if changed else 0  # the new coupon's or package's serial
    memset(out, 0, JOURNAL_SIZE)
    out.version = 2
    out.op = entry_op
    out.tier = tier_before
    out.status = rec.status
    out.reason = reason
    out.pin_tries = rec.pin_tries
    out.pin_flags = <uint8_t>rec.flags
    out.seq = seq if changed else 0
    memcpy(out.card_id, op.card_id, 16)
    out.amount_minor = amount
    out.discount_minor = discount
    out.principal_delta_minor = d_principal
    out.bonus_delta_minor = d_bonus
    out.points_delta = d_points
    out.principal_after_minor = rec.principal_minor
    out.bonus_after_minor = rec.bonus_minor
    out.points_after = rec.points
    out.ts_us = ts_us
    out.store_id = op.store_id
    out.terminal_id = op.terminal_id
    out.staff_id = op.staff_id
    out.operator_id = op.operator_id
    memcpy(out.request_tag, op.request_tag, 8)
    out.program_version = prog.program_version
    out.caller_kind = op.caller_kind
    out.caller_id = op.caller_id
    out.link_seq = op.link_seq
    out.ref_id = entry_ref
    out.basket_tag = op.basket_tag
    out.client_time_us = op.client_time_us
    out.tier_after = rec.tier
    out.birth_month = <uint8_t>rec.birth_month
    if reason == R_REFUND_EXCEEDS_ORIGINAL:
        out.redeemed_minor = fig[3]
    if reason == R_OK:
        out.points_redeemed = fig[2]
        out.redeemed_minor = fig[3]
        out.line_count = entry_lines
        out.item_id = promotion_id
        out.coupon_off_minor = fig[4]
        out.purchase_flags = (PARTIAL_PAYMENT if partial else 0) | (UNDO_COMPLETE if complete else 0)
    return reason


cdef inline int ext_ok(const cc_card_ext_t* ext) noexcept nogil:
    return ((ext.version == 0 or ext.version == 1) and ext.lifetime_top_up_minor >= 0
            and ext.period_base_paid_minor >= 0 and ext.period_top_up_max_minor >= 0)


def apply_batch(const uint8_t[::1] program, const uint8_t[::1] ops, uint8_t[::1] lines,
                const uint32_t[::1] slots, uint8_t[::1] records, uint8_t[::1] extras,
                const uint32_t[::1] item_slots, uint8_t[::1] items,
                uint8_t[::1] journal_out, uint8_t[::1] slot_dirty, uint8_t[::1] item_dirty,
                int64_t ts_us, uint64_t first_seq):
    """Apply len(ops) // 192 operations in order; return the next free sequence number.

    Same contract as cardcore.reference.apply_batch. Raises ValueError, and
    leaves the caller to abort its transaction, if any input breaks the
    layout or a record breaks an invariant: the writer never writes a
    half-truth.
    """
    cdef Py_ssize_t n = ops.shape[0] // OP_SIZE
    cdef Py_ssize_t nslots = records.shape[0] // CARD_SIZE
    cdef Py_ssize_t i, t, c, line_total = 0
    cdef uint32_t slot
    cdef uint64_t seq = first_seq
    cdef int bad = 0
    cdef uint8_t reason
    if program.shape[0] != PROGRAM_SIZE or ops.shape[0] != n * OP_SIZE:
        raise ValueError("program or operations buffer has the wrong size")
    if slots.shape[0] != n or journal_out.shape[0] != n * JOURNAL_SIZE:
        raise ValueError("slots or journal buffer does not match the operations")
    if (records.shape[0] != nslots * CARD_SIZE or slot_dirty.shape[0] != nslots
            or extras.shape[0] != nslots * EXT_SIZE):
        raise ValueError("records, program states or dirty buffer has the wrong size")
    cdef Py_ssize_t ncoupons = items.shape[0] // COUPON_SIZE
    if (items.shape[0] != ncoupons * COUPON_SIZE or item_dirty.shape[0] != ncoupons
            or item_slots.shape[0] != n):
        raise ValueError("coupons, their slots or dirty buffer has the wrong size")
    cdef const cc_program_t* prog = <const cc_program_t*>&program[0]
    if (prog.tier_count < 1 or prog.tier_count > MAX_TIERS or prog.points_unit_minor <= 0
            or prog.pin_tries_max < 1 or prog.pin_tries_max > 15 or prog.program_version < 1
            or prog.promotion_count > MAX_PROMOTIONS or prog.redeem_points < 0
            or prog.card_valid_months > CARD_VALID_MONTHS_MAX
            or (prog.redeem_points > 0 and prog.redeem_value_minor <= 0)
            or prog.redeem_cap_bp > RATE_FULL or prog.spend_order > SPEND_PROPORTIONAL
            or prog.points_shortfall > SHORTFALL_OWE
            or prog.coupon_count > MAX_COUPONS or prog.package_count > MAX_PACKAGES
            or prog.gift_count > MAX_GIFTS or prog.activation_points < 0
            or prog.exchange_points < 0 or prog.exchange_bonus_minor < 0
            or prog.birthday_points_bp > 100000
            or (prog.birthday_points_bp != 0 and prog.birthday_points_bp < RATE_FULL)
            or prog.utc_offset_minutes < -720
            or prog.utc_offset_minutes > 840
            or (prog.tier_review_days != 0 and (prog.tier_review_days < TIER_REVIEW_DAYS_MIN
                                                or prog.tier_review_days > TIER_REVIEW_DAYS_MAX))):
        raise ValueError("program out of range")
    for t in range(prog.tier_count):
        for c in range(MAX_CATEGORIES):
            if prog.category_flags[c] & CATEGORY_DEFINED and (
                    prog.rate_bp[t][c] < 1 or prog.rate_bp[t][c] > RATE_FULL
                    or prog.points_per_unit[t][c] < 0):
                raise ValueError("program rate out of range")
    cdef const cc_op_t* o
    for i in range(n):
        o = <const cc_op_t*>&ops[i * OP_SIZE]
        line_total += o.line_count
        if (needs_item(o) != (item_slots[i] != SLOT_NONE)
                or (item_slots[i] != SLOT_NONE and item_slots[i] >= ncoupons)):
            raise ValueError("an operation's coupon or package and its slot do not match")
    if lines.shape[0] != line_total * LINE_SIZE:
        raise ValueError("lines buffer does not match the operations' line counts")
    if n == 0:
        return seq
    cdef const cc_op_t* op_base = <const cc_op_t*>&ops[0]
    cdef cc_card_t* rec_base = <cc_card_t*>&records[0] if nslots else NULL
    cdef cc_card_ext_t* ext_base = <cc_card_ext_t*>&extras[0] if nslots else NULL
    cdef cc_line_t* line_base = <cc_line_t*>&lines[0] if line_total else NULL
    cdef cc_coupon_t* coupon_base = <cc_coupon_t*>&items[0] if ncoupons else NULL
    cdef uint8_t no_dirty = 0
    cdef uint32_t cslot
    cdef cc_journal_t* out_base = <cc_journal_t*>&journal_out[0]
    cdef const cc_op_t* op
    cdef cc_card_t* rec
    cdef Py_ssize_t line_at = 0
    with nogil:
        for i in range(n):
            op = op_base + i
            slot = slots[i]
            if (slot >= nslots or op.op < OP_OPEN
                    or (op.op > OP_KERNEL_MAX and op.op != OP_IMPORT_CARD)
                    or op.op == OP_PIN_FAILED or (OP_ADMIN_MIN <= op.op <= OP_ADMIN_MAX)):
                bad = 1
                break
            rec = rec_base + slot
            cslot = item_slots[i]
            if not record_ok(rec) or not ext_ok(ext_base + slot) or (
                    (op.op == OP_REFUND or op.op == OP_REVERSAL)
                    and not undo_ok(<const cc_undo_t*>(coupon_base + cslot))) or (
                    (op.op == OP_HOLD_VOID or op.op == OP_HOLD_EXPIRED
                     or (op.op == OP_PURCHASE and op.op_flags & CAPTURE))
                    and not (hold_ok(<const cc_hold_t*>(coupon_base + cslot))
                             and hold_within(<const cc_hold_t*>(coupon_base + cslot), rec))):
                bad = 2
                break
            apply_one(prog, op, rec, ext_base + slot, line_base + line_at if op.line_count else NULL,
                      coupon_base + cslot if cslot != SLOT_NONE else NULL, out_base + i, ts_us,
                      seq, &slot_dirty[slot], &item_dirty[cslot] if cslot != SLOT_NONE else &no_dirty)
            line_at += op.line_count
            if out_base[i].seq != 0:
                seq += 1
                if not record_ok(rec):
                    bad = 3
                    break
    if bad == 1:
        raise ValueError("operation with an unknown type or a slot out of range")
    if bad:
        raise ValueError("card record breaks an invariant")
    return seq
