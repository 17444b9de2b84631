# Cython declarations of ext/records.h: the fixed layouts of core/layout.py.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

cdef extern from "records.h":
    ctypedef long long cc_i128  # C sees __int128

    ctypedef struct cc_card_t:
        uint8_t version, status, tier, pin_tries
        uint32_t flags
        int64_t principal_minor, bonus_minor, points, held_minor, lifetime_paid_minor
        uint64_t last_seq
        int64_t opened_us
        uint32_t home_store_id, birth_month
        uint8_t pin_check[32]
        int64_t expires_us
        uint8_t reserved1[16]

    ctypedef struct cc_journal_t:
        uint8_t version, op, tier, status
        uint16_t reason
        uint8_t pin_tries, pin_flags
        uint64_t seq
        uint8_t card_id[16]
        int64_t amount_minor, discount_minor, principal_delta_minor, bonus_delta_minor
        int64_t points_delta, principal_after_minor, bonus_after_minor, points_after, ts_us
        uint32_t store_id, terminal_id, staff_id, operator_id
        uint8_t request_tag[8]
        uint32_t program_version
        uint8_t caller_kind
        uint8_t reserved0[3]
        uint32_t caller_id, reserved1
        uint64_t link_seq, ref_id, basket_tag
        int64_t client_time_us
        int64_t points_redeemed, redeemed_minor
        uint8_t tier_after, birth_month
        uint16_t line_count, item_id, purchase_flags
        uint8_t lines_digest[16]
        int64_t coupon_off_minor
        uint8_t digest[32]

    ctypedef struct cc_op_t:
        uint8_t op, tier, pin_flags, caller_kind
        uint32_t home_store_id
        int64_t amount_minor
        uint32_t store_id, terminal_id, staff_id, operator_id
        uint8_t request_tag[8]
        uint8_t card_id[16]
        int64_t client_time_us
        uint8_t pin_check[32]
        uint8_t new_pin_check[32]
        uint32_t caller_id, birth_month
        uint64_t link_seq, ref_id, basket_tag
        uint16_t line_count
        uint8_t op_flags
        uint8_t reserved1[5]
        int64_t redeem_points
        uint8_t reserved2[16]

    ctypedef struct cc_line_t:
        uint16_t category_code, line_tag
        uint32_t quantity
        int64_t amount_minor, discount_minor, points_earned, redeemed_minor
        uint8_t sku[24]

    ctypedef struct cc_card_ext_t:
        uint8_t version, flags
        uint8_t reserved0[2]
        uint32_t top_up_count
        int64_t lifetime_top_up_minor
        uint16_t promotion_id[16]
        uint16_t promotion_uses[16]
        uint32_t review_day, review_period_days
        int64_t period_base_paid_minor, period_top_up_max_minor
        uint8_t reserved2[24]

    ctypedef struct cc_promotion_t:
        uint16_t id
        uint8_t kind, per_card_limit
        uint32_t bonus_bp
        int64_t min_top_up_minor, bonus_minor, max_bonus_minor, starts_us, ends_us
        uint8_t reserved0[16]

    ctypedef struct cc_coupon_def_t:
        uint16_t id
        uint8_t kind, reserved0
        int32_t category
        int64_t min_spend_minor, amount_off_minor
        uint32_t percent_bp, reserved1
        int64_t max_off_minor, points_price

    ctypedef struct cc_coupon_t:
        uint8_t version, state
        uint16_t coupon_id
        uint32_t reserved0
        int64_t valid_from_us, valid_until_us
        uint64_t issued_seq, used_seq
        int64_t off_minor
        uint8_t reserved1[16]

    ctypedef struct cc_package_def_t:
        uint16_t id
        uint8_t kind, reserved0
        int32_t category
        uint32_t uses, days
        int64_t price_minor
        uint8_t reserved1[8]

    ctypedef struct cc_package_t:
        uint8_t version, kind
        uint16_t package_id
        uint32_t uses_left
        int64_t valid_from_us, valid_until_us
        uint64_t sold_seq, last_used_seq
        uint32_t uses, reserved0
        uint8_t reserved1[16]

    ctypedef struct cc_gift_def_t:
        uint16_t id
        uint8_t reserved0[6]
        int64_t points_price, stock

    ctypedef struct cc_gift_t:
        uint8_t version, reserved0
        uint16_t gift_id
        uint32_t reserved1
        int64_t given
        uint8_t reserved2[48]

    ctypedef struct cc_undo_t:
        uint8_t version, flags, op, tier, tier_after, reserved0
        uint16_t item_id
        int64_t refunded_minor, paid_minor, principal_minor, bonus_minor, points_redeemed
        int64_t points_earned
        uint64_t reversal_seq

    ctypedef struct cc_hold_t:
        uint8_t version, state
        uint16_t reserved0
        uint32_t store_id
        int64_t amount_minor, authorized_us, expires_us
        uint64_t authorized_seq, closed_seq
        int64_t captured_minor
        uint8_t reserved1[8]

    ctypedef struct cc_program_t:
        uint32_t tier_count, pin_tries_max
        int64_t points_unit_minor, redeem_points, redeem_value_minor
        uint32_t redeem_cap_bp, program_version
        uint8_t spend_order, promotion_count
        uint16_t card_valid_months
        uint8_t points_shortfall
        uint8_t reserved0[3]
        uint8_t category_flags[64]
        int64_t upgrade_spend_minor[16]
        int64_t upgrade_top_up_minor[16]
        cc_promotion_t promotions[16]
        uint16_t rate_bp[16][64]
        int64_t points_per_unit[16][64]
        cc_coupon_def_t coupons[32]
        uint32_t coupon_count, package_count
        cc_package_def_t packages[32]
        int64_t activation_points, exchange_points, exchange_bonus_minor
        uint32_t gift_count, birthday_points_bp
        int32_t utc_offset_minutes
        uint32_t tier_review_days
        cc_gift_def_t gifts[32]
