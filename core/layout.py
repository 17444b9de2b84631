"""Fixed-size binary layouts shared by the ledger, the Cython kernel and the reference.

Every record is little-endian, naturally aligned (so the C structs in
``ext/kernel.pxd`` need no packing pragma) and starts with a version byte.
The sizes are asserted here and, at import, in the kernel. Change a layout
only by bumping its version and teaching the ledger to read the old one.

Card record, v1, 128 bytes, LMDB ``cards`` value (key: 16-byte card id)::

    off size field                 meaning
      0  u8  version               1; 0 marks an empty slot (no such card)
      1  u8  status                CardStatus: 1 active, 2 frozen, 3 lost, 4 closed, 5 replaced,
                                   6 issued (not yet activated), 7 expired (rule 14)
      2  u8  tier                  index into the program's tiers
      3  u8  pin_tries             consecutive wrong PINs since the last right one or reset
      4  u32 flags                 bit 0 PIN set, bit 1 PIN locked
      8  i64 principal_minor       prepaid money the member paid in
     16  i64 bonus_minor           promotional value, kept apart from principal
     24  i64 points                points balance; below zero only under a program whose
                                   refunds owe points (rule 12): the debt later earning pays
     32  i64 held_minor            money reserved by the card's open holds (rule 15): the sum of
                                   their amounts; available = principal + bonus - held
     40  i64 lifetime_paid_minor   cumulative amount paid (tier rules)
     48  u64 last_seq              journal sequence of the card's last entry
     56  i64 opened_us             Unix time of opening, microseconds
     64  u32 home_store_id
     68  u32 birth_month           1..12 from the member's birthday at opening; 0 unknown
     72  32B pin_check             PIN verification value (see ``pin``); zeros when no PIN
    104  i64 expires_us            when the card expires (rule 14), fixed at its opening from the
                                   program's card_valid_months, so a later program does not move
                                   a printed date; 0 = never (and every card opened before)
    112  16B reserved              zeros

Journal entry, v2, 256 bytes, LMDB ``journal`` value (key: u64 big-endian seq)::

      0  u8  version               2
      1  u8  op                    OperationType: 1 open, 2 top-up, 3 purchase,
                                   4 set PIN, 5 reset PIN, 6 PIN failed; 16..22 admin
      2  u8  tier                  the card's tier when applied
      3  u8  status                the card's status after the operation
      4  u16 reason                Reason: 0, or REASON_PIN_WRONG in a PIN-failed
                                   entry; in the kernel's output, why it declined
      6  u8  pin_tries             the card's pin_tries after the operation
      7  u8  pin_flags             the card's flags (low byte) after the operation
      8  u64 seq                   strictly increasing, from 1; 0 when not journaled
     16  16B card_id               the card; for admin entries the subject (below)
     32  i64 amount_minor          top-up amount or purchase gross amount
     40  i64 discount_minor        purchase: gross - paid
     48  i64 principal_delta_minor signed change of principal
     56  i64 bonus_delta_minor     signed change of bonus
     64  i64 points_delta          signed change of points
     72  i64 principal_after_minor
     80  i64 bonus_after_minor
     88  i64 points_after
     96  i64 ts_us                 the group's time, microseconds; never goes back
    104  u32 store_id
    108  u32 terminal_id
    112  u32 staff_id
    116  u32 operator_id           the back-office operator who did it; 0 = a terminal alone
    120  8B  request_tag           first 8 bytes of BLAKE2b(request key): links entry and request
    128  u32 program_version       the stored program the entry was computed under;
                                   0 = unknown (an entry migrated from a v1 ledger)
    132  u8  caller_kind           CallerKind of the request's namespace (below)
    133  3B  reserved              zeros
    136  u32 caller_id             terminal id or operator id of the namespace; 0 otherwise
    140  u32 reserved              zeros
    144  u64 link_seq              the entry this one acts on (refund, reversal, capture); 0
    152  u64 ref_id                a coupon, package or gift, a points lot's day; an opening
                                   on a referral: the referrer's tag (idempotency.referrer_tag);
                                   a hold's authorization: when it expires (Unix microseconds);
                                   a referral bonus: 0, or for an opening on another card shard
                                   that shard's number + 1 (its link_seq is that shard's seq)
    160  u64 basket_tag            split tender: first 8 bytes of BLAKE2b(namespace | basket
                                   id); 0 = no basket
    168  i64 client_time_us        the caller's clock when it made the request; 0 internal
    176  i64 points_redeemed       purchase: points taken to pay (points_delta = earned -
                                   redeemed, so earned = points_delta + points_redeemed)
    184  i64 redeemed_minor        purchase: fen paid by those points (not by the balance)
    192  u8  tier_after            the card's tier after the operation (an upgrade it earned)
    193  u8  birth_month           the card's birth month (0: unknown), as rule 5 used it
    194  u16 line_count            purchase: its lines, stored under the same seq in
                                   ``journal_lines``; 0 = one line of category 0; a refund by
                                   line: the sale's lines it gave back, stored likewise
    196  u16 item_id               top-up: the promotion whose bonus it got (bonus_delta);
                                   coupon issue, or a purchase with a coupon: the coupon's
                                   definition id; 0 = none
    198  u16 purchase_flags        bit 0 PARTIAL_PAYMENT: the card paid less than was due (split
                                   tender); the rest, due - paid, is the till's to collect;
                                   bit 2 BASKET_BEGUN_ELSEWHERE: a later payment of a basket
                                   whose earlier one is on another card shard (counts no
                                   sale); a refund or reversal: bit 1 UNDO_COMPLETE
    200  16B lines_digest          BLAKE2b-128 of the purchase's stored lines (zeros: none), so
                                   the digest chain covers them too; the ledger fills it
    216  i64 coupon_off_minor      purchase: what its coupon took off (part of discount_minor,
                                   which is the tier's discount plus this); ref_id is the coupon
                                   (its serial: the sequence of the entry that issued it)
    224  32B digest                SHA-256(the previous entry's digest | bytes 0..223 of this
                                   entry); the first entry chains from 32 zero bytes

The first 128 bytes keep the v1 offsets, so readers of the money fields did not
move. Why 256: v1's 128 bytes were full; v2 adds 48 bytes of links, namespace and
client time and a 32-byte digest (208), and rounds up to a power of two, which
keeps entries cache-line aligned in the kernel's buffer and left 48 bytes for
later fields without another layout version: the card programs took 24 of them
(redemption, tier after, lines, promotion; zeros in older entries read as "none").
A million entries take 256 MB.

Admin entries (op >= 16) move no money; their 16-byte subject is, for
terminal events, u32 terminal_id | u32 store_id | 8B initial key ID; for
operator events, u32 operator_id | u8 role | zeros; for a key rotation,
u32 new key version | zeros; for a program load, u32 version | 12 bytes of the
program document's SHA-256; for a request window change, u32 seconds | zeros; for a
close, u32 store_id | u32 business day | zeros; for a region or store put, layout.REGION_SUBJECT
or layout.STORE_SUBJECT (below, with the records).

Request key (LMDB ``requests`` key): u8 caller_kind | u32 caller_id (big-endian)
| the request_id's ASCII bytes. Request ids are scoped to their caller: two
terminals may use the same request_id. CallerKind: 1 terminal (its id, from the
KSN that opened the swipe), 2 operator (its id, from the token), 3 development
(the one caller of an --insecure server without a token), 4 system (the server
itself), 5 legacy (request records migrated from a v1 ledger: one namespace).

Operation, v3, 192 bytes: the kernel's input, one per queued mutation (never
stored, so it has no version byte; v2 was 128 bytes without the namespace and
links). The card's slot in the records buffer and the group's timestamp are
passed beside the operations, so a handler can pack its operation before the
writer runs::

      0  u8  op                    OperationType (1..5 and 7 reach the kernel)
      1  u8  tier                  open, import: the new card's tier
      2  u8  pin_flags             PIN_PRESENTED: pin_check holds the PIN entered;
                                   PIN_REQUIRED: the operation needs the card's PIN;
                                   PIN_OPTIONAL_UNSET: development mode lets a card
                                   without a PIN pass; NEW_PIN: new_pin_check is set
      3  u8  caller_kind
      4  u32 home_store_id         open: the profile's home store
      8  i64 amount_minor          top-up amount or purchase gross amount
     16  u32 store_id
     20  u32 terminal_id
     24  u32 staff_id
     28  u32 operator_id
     32  8B  request_tag
     40  16B card_id
     56  i64 client_time_us
     64  32B pin_check             the entered PIN's verification value (PIN_PRESENTED)
     96  32B new_pin_check         the new PIN's verification value (NEW_PIN)
    128  u32 caller_id
    132  u32 birth_month           open: the member's birth month, 1..12 (0: unknown)
    136  u64 link_seq
    144  u64 ref_id                import (rule 18): the bonus, fen (<= INT64_MAX); amount_minor
                                   is the principal and redeem_points the points
    152  u64 basket_tag
    160  u16 line_count            purchase: how many LINE records it has in the run's lines
                                   buffer (in operation order); 0 = one line of category 0
                                   for amount_minor; a refund by line: the sale's lines, all of
                                   them, marked (LINE line_tag), put there by the writer
    162  u8  op_flags              purchase: bit 0 ALLOW_PARTIAL (rule 6b: the card pays what it
                                   has, the till collects the rest); bit 1 CAPTURE (rule 15:
                                   paid from the hold link_seq names, which it closes);
                                   open: bit 2 ISSUE_ONLY (rule 14: opened issued, not active)
    163  u8  route_flags           set by a front over several card shards, never by a caller
                                   (outside the digest): open: bit 0 REFERRER_ELSEWHERE
                                   (the referrer's card is on another card shard: the writer
                                   puts its bonus in the outbox, OUTBOX below); purchase: bit
                                   1 BASKET_ELSEWHERE (its basket has a payment made on
                                   another card shard: the entry's BASKET_BEGUN_ELSEWHERE)
    164  4B  reserved
    168  i64 redeem_points         purchase: points the member offers to pay with (0: none);
                                   coupon issue: the points it is bought with (0: given by an
                                   operator); exchange: the points offered
    176  16B referrer_id           open: the card of the member who referred this one (zeros:
                                   none); the writer credits it the program's referral points;
                                   replacement: the new card's id

Purchase line, v1, 64 bytes: the kernel's lines buffer (in) and, for an applied
purchase with lines, LMDB ``journal_lines`` (key: the purchase's seq; value: its
lines, in order, as the kernel filled them)::

      0  u16 category_code         0..63: the program's category (0 = default)
      2  u16 line_tag              a purchase's lines: 0. A refund by line (rule 12): in the
                                   kernel's input (the sale's lines, all of them) bit 0
                                   LINE_ASKED (this refund gives it back), bit 1 LINE_REFUNDED
                                   (an earlier refund did); stored under the refund's seq (only
                                   the lines it gave back, as the sale had them): the sale's
                                   line number, 1-based, as on the receipt
      4  u32 quantity              for receipts (0 = not given); the arithmetic ignores it
      8  i64 amount_minor          the line's gross price, > 0
     16  i64 discount_minor        out: gross - paid for this line
     24  i64 points_earned         out: points this line earned
     32  i64 redeemed_minor        out: how much of this line points paid
     40  24B sku                   ASCII, zero-padded; may be empty

Coupon, v1, 64 bytes, LMDB ``coupons`` value (key: card id | u64 big-endian serial, the
sequence of the journal entry that issued it; a purchase names it in ref_id)::

      0  u8  version               1
      1  u8  state                 1 issued, 2 used (an expired coupon stays issued: time says)
      2  u16 coupon_id             its definition in the program
      4  u32 reserved
      8  i64 valid_from_us         the issue's group time
     16  i64 valid_until_us        valid_from + the definition's valid_days (exclusive)
     24  u64 issued_seq
     32  u64 used_seq              the purchase that used it; 0
     40  i64 off_minor             what it took off there; 0
     48  16B reserved

Package, v1, 64 bytes, LMDB ``packages`` value (key: card id | u64 big-endian serial, the
sequence of the entry that sold it; a package use names it in ref_id)::

      0  u8  version               1
      1  u8  kind                  1 count (uses_left counts down), 2 time (any number of uses)
      2  u16 package_id            its definition in the program
      4  u32 uses_left             count packages; 0 for time packages
      8  i64 valid_from_us         the sale's group time
     16  i64 valid_until_us        valid_from + the definition's days (exclusive)
     24  u64 sold_seq
     32  u64 last_used_seq         0 until used
     40  u32 uses                  how many times it was used
     44  u32 reserved
     48  16B reserved

Points lot, 16 bytes, LMDB ``points_lots`` value (key: card id | u32 big-endian day the points
were earned, UTC days since 1970-01-01; ``lots_by_day`` holds day | card id -> empty, the expiry
sweep's order; the rule is in ``cardcore.lots``)::

      0  i64 points_left           the lot's points the card still holds
      8  i64 points_earned         all the points earned that day

Gift stock, v1, 64 bytes, LMDB ``gift_stock`` value (key: u32 big-endian gift id; none yet:
zeros): how many of the catalogue's gift were given, so that its stock (the program's, the
total ever offered) is checked and taken in the same write as the points::

      0  u8  version               1
      1  u8  reserved
      2  u16 gift_id
      4  u32 reserved
      8  i64 given
     16  48B reserved

Undo record, v1, 64 bytes, LMDB ``undone`` value (key: the original entry's u64 big-endian
seq): what refunds and a reversal took back of a purchase or top-up, with the original's
figures the kernel needs (the ledger assembles it from the original journal entry the first
time a refund or reversal names it; rules 12 and 13)::

      0  u8  version               1; 0: no such entry of this card (not found)
      1  u8  flags                 bit 0 REVERSED
      2  u8  op                    the original's operation type
      3  u8  tier                  the original's tier, and
      4  u8  tier_after            its tier after (a reversal undoes an upgrade it made)
      5  u8  reserved
      6  u16 item_id               the original's promotion (top-up) or coupon definition
      8  i64 refunded_minor        what refunds and the reversal gave back so far (of paid)
     16  i64 paid_minor            purchase: what the sale cost after discounts (the card's
                                   part + the points' fen); top-up: its amount
     24  i64 principal_minor       principal the original moved (taken, or added), >= 0
     32  i64 bonus_minor           bonus the original moved, >= 0
     40  i64 points_redeemed       points the purchase took to pay
     48  i64 points_earned         points the purchase earned
     56  u64 reversal_seq          the reversal's entry; 0 until reversed

Line refunds, v1, 32 bytes, LMDB ``refunded_lines`` value (key: the sale's u64 big-endian seq):
which of a sale's lines refunds by line gave back (rule 12), so a line is given back once;
none yet: zeros::

      0  u8  version               1
      1  u8  reserved
      2  u16 lines_refunded        how many bits are set below
      4  u32 reserved
      8  16B refunded              bit k of byte k // 8 (k = line number - 1): given back;
                                   LINES_MAX (100) <= 128
     24  u64 last_refund_seq       the refund that set the last bit

Hold, v1, 64 bytes, LMDB ``holds`` value (key: card id | u64 big-endian serial, the sequence of
the authorization entry that made it; a capture or a void names it in link_seq; rule 15)::

      0  u8  version               1
      1  u8  state                 1 open, 2 captured, 3 voided, 4 expired (released by the
                                   server), 5 reversed (its authorization was reversed)
      2  u16 reserved
      4  u32 store_id              the authorizing till's store: only its terminals (or an
                                   operator) capture or void it
      8  i64 amount_minor          what it holds
     16  i64 authorized_us         the authorization's group time
     24  i64 expires_us            released by the server at the first group at or after it
     32  u64 authorized_seq
     40  u64 closed_seq            the entry that captured, voided, released or reversed it; 0
     48  i64 captured_minor        a capture: what the card paid from it (<= amount_minor); 0
     56  8B  reserved

``holds_by_expiry`` (key: u64 big-endian expires_us | card id | u64 big-endian serial; value
empty) names exactly the open holds, in the order the server releases them.

``cards_by_expiry`` (key: u64 big-endian expires_us | card id; value empty) names exactly the
cards with an expiry that have not expired, closed or been replaced (rule 14), in the order the
server expires them.

Card history, LMDB ``card_entries`` (key: card id | u64 big-endian seq, one per journal entry
of a card, written with it; value, 16 bytes: u8 op, 7 reserved, i64 ts_us): a card's entries
newest first, filtered by type and time without reading the journal, in time independent of
how many the card has.

Card program state, v1, 128 bytes, LMDB ``card_ext`` value (key: card id); a card
without one reads as all zeros (release 1 and ledger v2 cards)::

      0  u8  version               1; 0 = none yet (all zeros)
      1  u8  flags                 bit 0 REVIEW_STARTED: the tier review (rule 11) tracks
                                   this card's qualification periods
      2  2B  reserved
      4  u32 top_up_count          top-ups applied (a first-top-up bonus needs 0)
      8  i64 lifetime_top_up_minor principal topped up in total
     16  u16[16] promotion_id      limited promotions this card has used; 0 = a free slot
     48  u16[16] promotion_uses    how many times, same position
     80  u32 review_day            the current qualification period's first day (UTC days
                                   since 1970-01-01); the period ends review_day + tier_review_days
     84  u32 review_period_days    the period's length when it started (the program's
                                   tier_review_days then: another length restarts tracking)
     88  i64 period_base_paid_minor   lifetime_paid_minor when the period started: the period's
                                   spend is lifetime paid minus this
     96  i64 period_top_up_max_minor  the largest single top-up in the period
    104  24B reserved

The PIN rule (kernel and reference): for an operation that presents a PIN or
requires one, on a card with a PIN: locked -> REASON_PIN_LOCKED, not checked;
none presented -> REASON_PIN_REQUIRED; wrong -> pin_tries + 1, locked when it
reaches the program's pin_tries_max, a PIN-failed journal entry, declined with
REASON_PIN_WRONG; right -> pin_tries back to 0 and on. On a card without a PIN:
a PIN presented -> REASON_PIN_NOT_SET; required -> REASON_PIN_NOT_SET unless
PIN_OPTIONAL_UNSET. The checks run after "card exists" and "card active" and
before the amount. A right PIN sets pin_tries back to 0 only if the operation
then applies. Setting a first PIN (no PIN yet, none presented) needs an
operator (operator_id != 0): REASON_OPERATOR_REQUIRED otherwise. A balance
inquiry (op 7) requires the PIN like a purchase and changes nothing when it is
right (no entry, pin_tries untouched); a wrong one is counted like any other.

Program, v3, 15,008 bytes: the arithmetic's parameters (see ``rules``),
compiled from the stored program document of that version (never stored: a
ledger keeps documents, so the compiled form can change freely)::

      0  u32 tier_count            1..16
      4  u32 pin_tries_max         wrong PINs in a row that lock the PIN, 1..15
      8  i64 points_unit_minor     > 0: points are earned per this much paid
     16  i64 redeem_points         points per redemption block; 0 = no redemption
     24  i64 redeem_value_minor    fen one block pays
     32  u32 redeem_cap_bp         points pay at most this share of the amount due
     36  u32 program_version       >= 1, written into every journal entry
     40  u8  spend_order           0 principal first, 1 bonus first, 2 proportional
     41  u8  promotion_count       0..16
     42  u16 card_valid_months     a card expires this many calendar months after its opening
                                   (rule 14); 0 = never
     44  u8  points_shortfall      a refund taking back more points than the card holds (rule
                                   12): 0 forgive (take what it holds), 1 owe (go below zero)
     45  3B  reserved
     48  u8[64] category_flags     by code: bit 0 defined, bit 1 discountable
    112  i64[16] upgrade_spend_minor    by tier: lifetime paid that reaches it; 0 never
    240  i64[16] upgrade_top_up_minor   by tier: one top-up this large reaches it; 0 never
    368  promotion[16], 64 bytes each:
           0 u16 id, 2 u8 kind (1 fixed, 2 percent, 3 first top-up), 3 u8 per_card_limit
           (0 = none), 4 u32 bonus_bp, 8 i64 min_top_up_minor, 16 i64 bonus_minor,
           24 i64 max_bonus_minor (0 = no cap), 32 i64 starts_us, 40 i64 ends_us
           (half-open [starts, ends), Unix microseconds), 48 16B reserved
   1392  u16[16][64] rate_bp       by tier and category code: what the member pays, in bp
   3440  i64[16][64] points_per_unit    by tier and category code
  11632  coupon[32], 48 bytes each:
           0 u16 id, 2 u8 kind (1 amount off, 2 percent off, 3 free item), 3 u8 reserved,
           4 i32 category (-1: every discountable line), 8 i64 min_spend_minor,
           16 i64 amount_off_minor, 24 u32 percent_bp, 28 u32 reserved, 32 i64 max_off_minor,
           40 i64 points_price
  13168  u32 coupon_count, u32 package_count
  13176  package[32], 32 bytes each:
           0 u16 id, 2 u8 kind (1 count, 2 time), 3 u8 reserved, 4 i32 category (-1: any),
           8 u32 uses (count packages), 12 u32 days, 16 i64 price_minor, 24 8B reserved
  14200  i64 activation_points     points a card gets when opened
  14208  i64 exchange_points       points per exchange block; 0 = no exchange into bonus money
  14216  i64 exchange_bonus_minor  bonus fen one block buys
  14224  u32 gift_count
  14228  u32 birthday_points_bp    points in the member's birth month, in bp of the usual (0: none)
  14232  i32 utc_offset_minutes    the chain's clock: which month (and day) it is
  14236  u32 tier_review_days      the tier review's period (rule 11); 0 = tiers never go down
  14240  gift[32], 24 bytes each: 0 u16 id, 2 6B reserved, 8 i64 points_price, 16 i64 stock

Terminal record, v1, 64 bytes, LMDB ``terminals`` value (key: u32 big-endian terminal id)::

      0  u8  version               1
      1  u8  status                1 active, 2 revoked
      2  u16 reserved
      4  u32 terminal_id
      8  u32 store_id
     12  u32 last_ksn_counter      highest DUKPT counter applied; a KSN must exceed it
     16  8B  initial_key_id        BDK ID (4 B) | terminal id (4 B, big-endian)
     24  i64 enrolled_us
     32  i64 revoked_us            0 while active
     40  u32 enrolled_by           operator id
     44  u32 revoked_by
     48  16B reserved

Idempotency record, v2, 64 bytes, LMDB ``requests`` value (key: request key)::

      0  u8  version               2
      1  u8  op
      2  u16 reason                0 applied, else why it was declined
      4  u32 reserved
      8  16B payload_digest        BLAKE2b-128 over the operation's digest fields
                                   (``idempotency.DIGEST_FIELDS``)
     24  u64 seq                   its journal entry (applied, or PIN failed), else 0
     32  i64 available_minor       for INSUFFICIENT_FUNDS; applied: the card's held_minor after
                                   it (rule 15), which the journal entry does not carry
     40  i64 ts_us                 when it was applied (the group's time)
     48  i64 client_time_us        the request's own time (part of its payload)
     56  8B  reserved

Day totals, v1, 704 bytes, LMDB ``day_totals`` value (key: u32 big-endian store_id | u32
big-endian business day, ``cardcore.daytotals``) and ``day_chain`` value (key: u32 big-endian
business day: the whole chain, the sum of every store's record of that day): what the journal
entries that landed in that store's business day moved, added up in the write transaction that
wrote them (``daytotals.add_figures`` maps one entry to its figures)::

      0  u8  version               1
      1  7B  reserved
      8  i64[24] figures           DAY_FIGURES, in that order: entries, principal_in_minor,
                                   principal_out_minor, bonus_in_minor, bonus_out_minor,
                                   points_in, points_out, sales_gross_minor, discount_minor,
                                   coupon_off_minor, tender_principal_minor, tender_bonus_minor,
                                   tender_points_minor, tender_till_minor, points_issued,
                                   points_redeemed, points_expired, coupons_used,
                                   clearing_owes_minor, clearing_owed_minor,
                                   own_day_principal_net_minor, own_day_bonus_net_minor
                                   (day_chain only, below), holds_net_minor,
                                   own_day_held_net_minor (day_chain only)
    200  u32[40] count_by_op       journal entries by OperationType (index = op)
    360  i64[40] amount_by_op      their amount_minor, added up
    680  24B reserved

The chain's stored-value liability (principal and bonus apart) at the end of a day is the sum of
own_day_principal_net_minor (bonus likewise) over the chain's records up to that day: a range
read, never a journal scan. Those two figures are kept by each entry's *own* business day (the
day of its time), not the day it landed in, so money taken after a store closed its day early
counts on the day it was taken; they are 0 in stores' records (a closed day never changes).
Money held by open holds (rule 15) likewise: ``holds_net_minor`` is the net change of what holds
*placed at the store* hold (+ an authorization, - its capture, void, expiry or reversal, whichever
store's entry closes it), landed like every figure, so a store's holds outstanding at the end of a
day is the range sum of its records up to it; the chain's, by own business day, is the sum of
``own_day_held_net_minor``.

Store day, v1, 32 bytes, LMDB ``store_days`` value (key as ``day_totals``'s): a closed business
day (CloseDay); no record: open::

      0  u8  version               1
      1  u8  state                 1 closed
      2  2B  reserved
      4  u32 operator_id           who closed it
      8  u64 closed_seq            the close's journal entry
     16  i64 closed_us             the close's group time
     24  i64 holds_outstanding_minor  what the store's holds held at the close's end of the day
                                   (its answer for ever, whatever lands in earlier days later)

Region, v1, 96 bytes, LMDB ``chain_regions`` value (key: u32 big-endian region id, 1..; region 0
is none: a store directly under head office)::

      0  u8  version               1
      1  u8  name_len              bytes of name used, 1..NAME_BYTES_MAX (64)
      2  u16 reserved
      4  u32 region_id
      8  i64 updated_us            the last put's group time
     16  u32 updated_by            its operator
     20  u32 reserved
     24  64B name                  UTF-8, zero-padded
     88  8B  reserved

Store, v1, 112 bytes, LMDB ``chain_stores`` value (key: u32 big-endian store id, 1..; store 0 is
head office, implicit, never stored); ``chain_region_stores`` (key: u32 BE region | u32 BE store,
value empty) names each region's stores (``cardcore.stores``)::

      0  u8  version               1
      1  u8  name_len              bytes of name used, 1..64
      2  u8  flags                 bit 0 OWN_DAY: the store's business day is its own (below);
                                   unset: the program's business_day_* keys
      3  u8  cutoff_hour           OWN_DAY: 0..23, the hour (local) its business day starts
      4  u32 store_id
      8  u32 region_id             0: directly under head office
     12  i32 utc_offset_minutes    OWN_DAY: -720..840, the store's clock
     16  i64 updated_us
     24  u32 updated_by
     28  u32 reserved
     32  64B name                  UTF-8, zero-padded
     96  16B reserved

A put is journaled as an admin entry (OP_REGION_PUT, OP_STORE_PUT) whose 16-byte subject holds
what the day totals need, so the journal alone rebuilds every store's business day: a region's,
u32 region_id | zeros; a store's, u32 store_id | u32 region_id | i16 utc_offset_minutes | u8
cutoff_hour | u8 flags | zeros. Names live in the registry only.

Clearing, LMDB ``day_clearing`` (key: u32 BE store | u32 BE day | u32 BE counterparty store;
value i64): what the store owes the counterparty for that day, net (negative: is owed); every
amount is written on both sides, so the chain's table nets to zero. Staff, LMDB ``day_staff``
(key: u32 BE store | u32 BE day | u32 BE staff_id; value 4 x i64: sales, sales_minor (gross
minus discount), top-ups, top_up_minor). Money home, LMDB ``day_money_home`` (key: card id;
value u32 store): the store of the card's last top-up, which answers for all its principal
(the clearing rule, ``cardcore.daytotals``).

Request time index, LMDB ``request_times`` (key: the group's u64 ts_us,
big-endian, strictly increasing, so appended; value: the request keys the
group recorded, each as u8 length | key): the order in which the writer looks
at request records, oldest applied first, to prune those whose client time is
older than the retention window. One value per group, not per request: one
B-tree append instead of thousands.

Meta, LMDB ``meta``: ``format`` u32 (2); ``program_current`` u32;
``tier_cards`` 16 x u64 (cards per tier, so a program change cannot strand a
tier that holds cards); ``request_window_s`` u32 (the retention window: in the
ledger, so every writer that applies the same groups judges ages alike);
``pruned_through_us`` i64 (no request with a client
time at or before it can apply: its record may be gone); ``clock_us`` i64 (the
last group's time: the next one never goes back from it, nor moves more than an
hour past it); ``birth_months`` (set once card records hold the members' birth months, filled
from their profiles for cards opened before). Request records of
a migrated v1 ledger live under the legacy namespace and are looked up by
request_id alone while any remain.
"""
import struct
import sys

assert sys.byteorder == "little", "layouts are little-endian and read in place"

CARD_VERSION = 1
JOURNAL_VERSION = 2
IDEM_VERSION = 2
LEDGER_FORMAT = 2

CARD = struct.Struct("<BBBBIqqqqqQqII32s24s")
JOURNAL = struct.Struct("<BBBBHBBQ16sqqqqqqqqqIIII8sIB3sIIQQQq48s32s")
OP = struct.Struct("<BBBBIqIIII8s16sq32s32sIIQQQH6sq16s")
IDEM = struct.Struct("<BBHI16sQqqq8s")
TERMINAL = struct.Struct("<BBHIII8sqqII16s")
TERMINAL_KEY = struct.Struct(">I")
SEQ_KEY = struct.Struct(">Q")  # big-endian so LMDB's byte order is sequence order
REQUEST_KEY_HEAD = struct.Struct(">BI")  # caller_kind, caller_id; then the request_id
REQUEST_TIME_KEY = struct.Struct(">Q")   # the group's ts_us
VERSION_KEY = struct.Struct(">I")        # programs: version

LINE = struct.Struct("<HHIqqqq24s")
CARD_EXT = struct.Struct("<BB2sIq16H16HIIqq24s")
PROGRAM_HEAD = struct.Struct("<IIqqqIIBB6s64s16q16q")
# PROGRAM_HEAD's 6 bytes at 42: card_valid_months (rule 14), points_shortfall (rule 12)
PROGRAM_HEAD_TAIL = struct.Struct("<HB3x")
PROMOTION = struct.Struct("<HBBIqqqqq16s")
COUPON_DEF = struct.Struct("<HBxiqqIxxxxqq")
COUPON = struct.Struct("<BBHIqqQQq16s")
COUPON_KEY = struct.Struct(">16sQ")   # card id, serial (coupons and packages alike)
POINTS_LOT = struct.Struct("<qq")      # points left, points earned
LOT_KEY = struct.Struct(">16sI")       # card id, earned day
LOT_DAY_KEY = struct.Struct(">I16s")   # earned day, card id: the expiry order
PACKAGE_DEF = struct.Struct("<HBxiIIq8x")
PACKAGE = struct.Struct("<BBHIqqQQII16s")
GIFT = struct.Struct("<BxHIq48s")     # a gift's stock record: version, id, given
UNDO = struct.Struct("<BBBBBxHqqqqqqQ")  # what a refund or reversal can still undo of an entry
HOLD = struct.Struct("<BBHIqqqQQq8s")   # a hold (rule 15)
HOLD_EXPIRY_KEY = struct.Struct(">Q16sQ")  # expires_us, card id, serial: the release order
HOLD_VERSION = 1
HOLD_OPEN, HOLD_CAPTURED, HOLD_VOIDED, HOLD_EXPIRED, HOLD_REVERSED = 1, 2, 3, 4, 5
HOLD_MINUTES_DEFAULT = 1440    # a hold's life when the request names none: a day
HOLD_MINUTES_MAX = 43200       # at most 30 days (a hotel stay, a rental)
HOLD_RELEASES_MAX = 1000       # expired holds one group releases at most (the rest: the next)
CARD_ENTRY_KEY = struct.Struct(">16sQ")  # a card's history: card id, seq
CARD_ENTRY = struct.Struct("<B7xq")      # its value: the entry's op and time
# Member lookup (rule 17): a ``members`` key (value empty) is the kind, the keyed digest of the
# normalised phone or name (``lookup.MemberIndex``; never the phone or name itself) and the card
# id, so one phone's or one name's cards are the keys under one 17-byte prefix.
MEMBER_KEY = struct.Struct(">B16s16s")
MEMBER_PREFIX = struct.Struct(">B16s")
MEMBER_BY_PHONE, MEMBER_BY_NAME = 1, 2
MEMBER_DIGEST_SIZE = 16
MEMBER_MATCHES_MAX = 20   # cards one FindCards answer names at most (the rest: ``more``)
UNDO_VERSION, UNDO_REVERSED = 1, 1
LINE_REFUNDS = struct.Struct("<BxHI16sQ")  # a sale's lines refunds by line gave back (rule 12)
LINE_REFUNDS_VERSION = 1
LINE_ASKED, LINE_REFUNDED = 1, 2  # a refund's input lines' line_tag (rule 12)
LINE_TAG, LINE_OFF_TAG = struct.Struct("<2xH"), 2  # a line's line_tag, read alone (unpack only:
# packing writes the category's zeros too)
assert LINE_REFUNDS.size == 32
GIFT_KEY = struct.Struct(">I")
# The card programs' fields of a journal entry and of an operation, at these offsets.
JOURNAL_PROGRAM, JOURNAL_OFF_PROGRAM = struct.Struct("<qqBxHH"), 176
JOURNAL_COUPON_OFF, JOURNAL_OFF_COUPON = struct.Struct("<q"), 216  # coupon_off_minor
JOURNAL_OFF_LINES_DIGEST, LINES_DIGEST_SIZE = 200, 16
JOURNAL_OFF_BIRTH_MONTH = 193
JOURNAL_PURCHASE_FLAGS, JOURNAL_OFF_PURCHASE_FLAGS = struct.Struct("<H"), 198
ALLOW_PARTIAL, PARTIAL_PAYMENT = 1, 1  # an operation's op_flags; an entry's purchase_flags
CAPTURE = 2  # an operation's op_flags: a purchase paid from the hold its link_seq names
ISSUE_ONLY = 4  # an opening's op_flags: the card is issued, not active (rule 14)
OP_OFF_ROUTE_FLAGS = 163  # an operation's route_flags (a front over several card shards)
REFERRER_ELSEWHERE = 1    # route_flags of an opening whose referrer is on another card shard
BASKET_ELSEWHERE = 2      # route_flags of a split-tender payment whose basket has a payment made
#                           on another card shard (docs/cluster.md, "A basket paid on two card
#                           shards"): its entry is marked BASKET_BEGUN_ELSEWHERE
# The outbox (docs/cluster.md, "Two cards on two card shards"): what this card shard owes another,
# written in the group that made it, delivered by a front, then taken out (OP_OUTBOX_DONE). LMDB
# ``meta``, key OUTBOX_KEY_PREFIX | u64 big-endian seq of the entry that made it; value, v1,
# 48 bytes::
#
#      0  u8  version               1
#      1  u8  kind                  1 OUTBOX_REFERRAL: a referral bonus
#      2  6B  reserved              zeros
#      8  u64 seq                   the opening's entry (the bonus's link_seq)
#     16  16B card_id               the referrer, who gets the points
#     32  i64 points                the program's referral points when the card was opened
#     40  i64 made_us               the opening's group time
OUTBOX = struct.Struct("<BB6xQ16sqq")
OUTBOX_VERSION, OUTBOX_REFERRAL = 1, 1
OUTBOX_KEY_PREFIX = b"outbox/"
OUTBOX_KEY = struct.Struct(">Q")
OUTBOX_DONE_MAX = 256  # outbox records one OP_OUTBOX_DONE takes out at most (u64 seqs, payload)
assert OUTBOX.size == 48
# A card number forwarded (docs/cluster.md, "A replacement by a card of another card shard"): the
# card shard its slot routes to keeps, for a new card a replacement made on another card shard,
# where that card is; it never holds that card itself, and refuses its operations
# (R_CARD_ELSEWHERE). LMDB ``meta``, key FORWARD_KEY_PREFIX | card id; value, v1, 16 bytes::
#
#      0  u8  version               1
#      1  u8  reserved              zero
#      2  u16 shard                 the card shard that holds the card
#      4  4B  reserved              zeros
#      8  u64 n                     this shard's forwards before it, plus 1 (FORWARDS_KEY)
#
# and FORWARDS_KEY_PREFIX | u64 big-endian n -> the card id: the order they were made in, which a
# front reads on from the last it knows. Made by OP_CARD_FORWARDED, never taken out.
FORWARD = struct.Struct("<BxH4xQ")
FORWARD_VERSION = 1
FORWARD_KEY_PREFIX, FORWARDS_KEY_PREFIX = b"forward/", b"forwards/"
FORWARDS_KEY = struct.Struct(">Q")
FORWARD_PAYLOAD = struct.Struct("<H")  # an OP_CARD_FORWARDED's payload: the shard
assert FORWARD.size == 16
CARD_EXPIRES, CARD_OFF_EXPIRES = struct.Struct("<q"), 104  # a card record's expires_us
CARD_EXPIRY_KEY = struct.Struct(">Q16s")  # cards_by_expiry: expires_us, card id
CARD_EXPIRIES_MAX = 1000  # cards one group expires at most besides its own (the rest: the next)
CARD_VALID_MONTHS_MAX = 1200  # a card is valid at most 100 years
UNDO_COMPLETE = 2  # an entry's purchase_flags: this refund or reversal leaves nothing to refund
BASKET_BEGUN_ELSEWHERE = 4  # an entry's purchase_flags: a payment of a basket that has an earlier
#                             one on another card shard (which counted the basket's sale)
OP_PROGRAM, OP_OFF_PROGRAM = struct.Struct("<H6xq"), 160

CARD_SIZE, JOURNAL_SIZE, OP_SIZE, IDEM_SIZE, TERMINAL_SIZE = 128, 256, 192, 64, 64
LINE_SIZE, CARD_EXT_SIZE, PROMOTION_SIZE, COUPON_SIZE = 64, 128, 64, 64
MAX_TIERS, MAX_CATEGORIES, MAX_PROMOTIONS, PROMOTION_SLOTS, MAX_COUPONS = 16, 64, 16, 16, 32
PROGRAM_RATES_OFFSET = PROGRAM_HEAD.size + MAX_PROMOTIONS * PROMOTION_SIZE
PROGRAM_PER_UNIT_OFFSET = PROGRAM_RATES_OFFSET + 2 * MAX_TIERS * MAX_CATEGORIES
PROGRAM_COUPONS_OFFSET = PROGRAM_PER_UNIT_OFFSET + 8 * MAX_TIERS * MAX_CATEGORIES
PROGRAM_COUPON_COUNT_OFFSET = PROGRAM_COUPONS_OFFSET + MAX_COUPONS * 48
PROGRAM_PACKAGES_OFFSET = PROGRAM_COUPON_COUNT_OFFSET + 8
PROGRAM_POINTS_OFFSET = PROGRAM_PACKAGES_OFFSET + 32 * 32
PROGRAM_POINTS = struct.Struct("<qqqIIiI")  # activation, exchange, gifts, birthday, UTC offset,
# tier review days
PROGRAM_GIFTS_OFFSET = PROGRAM_POINTS_OFFSET + PROGRAM_POINTS.size
GIFT_DEF = struct.Struct("<H6xqq")
PROGRAM_SIZE = PROGRAM_GIFTS_OFFSET + 32 * GIFT_DEF.size
assert PROGRAM_HEAD.size == 368 and PROMOTION.size == PROMOTION_SIZE and PROGRAM_SIZE == 15008
assert COUPON_DEF.size == 48 and COUPON.size == 64 and UNDO.size == 64 and HOLD.size == 64
assert LINE.size == LINE_SIZE and CARD_EXT.size == CARD_EXT_SIZE
LINES_MAX = 100          # lines of one purchase
SKU_LEN_MAX = 24         # a line's SKU, ASCII characters (layout.LINE's 24 bytes)
CARD_EXT_VERSION = 1
REVIEW_STARTED = 1  # a card program state's flags
CATEGORY_DEFINED, CATEGORY_DISCOUNTABLE = 1, 2
SPEND_PRINCIPAL_FIRST, SPEND_BONUS_FIRST, SPEND_PROPORTIONAL = 0, 1, 2
SHORTFALL_FORGIVE, SHORTFALL_OWE = 0, 1  # the program's points_shortfall (rule 12)
PROMO_FIXED, PROMO_PERCENT, PROMO_FIRST_TOP_UP = 1, 2, 3
COUPON_AMOUNT_OFF, COUPON_PERCENT_OFF, COUPON_FREE_ITEM = 1, 2, 3
PACKAGE_COUNT, PACKAGE_TIME = 1, 2
PACKAGE_VERSION = 1
MAX_PACKAGES = 32
MAX_GIFTS = 32
GIFT_VERSION = 1
COUPON_VERSION, COUPON_ISSUED, COUPON_USED = 1, 1, 2
DAY_US = 86_400_000_000
JOURNAL_DIGEST_OFFSET, DIGEST_SIZE = 224, 32
assert CARD.size == CARD_SIZE and JOURNAL.size == JOURNAL_SIZE
assert OP.size == OP_SIZE and IDEM.size == IDEM_SIZE
assert TERMINAL.size == TERMINAL_SIZE and JOURNAL_DIGEST_OFFSET + DIGEST_SIZE == JOURNAL_SIZE

# The v1 layouts, read only by the migration (cardcore.migrate).
JOURNAL_V1 = struct.Struct("<BBBBHBBQ16sqqqqqqqqqIIII8s")
IDEM_V1 = struct.Struct("<BBHI16sQqq")
assert JOURNAL_V1.size == 128 and IDEM_V1.size == 48
TERMINAL_VERSION = 1
TERMINAL_ACTIVE, TERMINAL_REVOKED = 1, 2

CARD_ID_SIZE = 16
REQUEST_TAG_SIZE = 8
INT64_MAX = (1 << 63) - 1

# Field offsets the ledger reads without unpacking a whole record.
CARD_OFF_LAST_SEQ = 48
JOURNAL_OFF_SEQ = 8
JOURNAL_OFF_REASON = 4
JOURNAL_OFF_PIN_TRIES = 6
JOURNAL_OFF_TS = 96
JOURNAL_OFF_TAG = 120
OP_TERMINAL_ID = struct.Struct("<20xI")  # an operation's terminal_id, read alone
OP_OPERATOR_ID = struct.Struct("<28xI")  # an operation's operator_id, read alone
OP_CLIENT_TIME = struct.Struct("<56xq")   # an operation's client_time_us, read alone
# The fields of a journal entry after the v1 part (offset 128): program version, caller kind,
# caller id, link, ref, basket, client time.
JOURNAL_TAIL = struct.Struct("<128xIB3xI4xQQQq")

# Caller kinds: values of cardcore.v1.CallerKind (a test checks they agree).
CALLER_NONE, CALLER_TERMINAL, CALLER_OPERATOR, CALLER_DEVELOPMENT = 0, 1, 2, 3
CALLER_SYSTEM, CALLER_LEGACY = 4, 5

# Operation types: values of cardcore.v1.OperationType (a test checks they agree).
OP_OPEN, OP_TOP_UP, OP_PURCHASE, OP_SET_PIN, OP_RESET_PIN, OP_PIN_FAILED = 1, 2, 3, 4, 5, 6
OP_BALANCE_INQUIRY = 7  # checks the PIN; changes nothing when right (no entry)
OP_COUPON_ISSUE = 8     # a coupon for a card: given by an operator, or bought with points
OP_PACKAGE_SELL = 9     # a prepaid package bought from the card's balance
OP_PACKAGE_USE = 10     # one use of a package (a haircut of ten; a visit on a month pass)
OP_POINTS_EXPIRED = 11  # the writer's sweep: points whose lots reached the program's horizon
OP_POINTS_EXCHANGE = 12  # points into bonus money
OP_GIFT_REDEEM = 13     # points for a gift of the catalogue, from its stock
OP_REFERRAL_BONUS = 14  # the writer's: a referrer's points for a card opened on its referral
OP_TIER_REVIEWED = 15  # the writer's: a card's tier reviewed at the end of its period (rule 11)
OP_TERMINAL_ENROLLED, OP_TERMINAL_REVOKED = 16, 17
OP_OPERATOR_ADDED, OP_OPERATOR_REMOVED, OP_DATA_KEY_ROTATED = 18, 19, 20
OP_PROGRAM_LOADED, OP_OPERATOR_TOKEN_REISSUED, OP_REQUEST_WINDOW_SET = 21, 22, 23
OP_ADMIN_MIN, OP_ADMIN_MAX = 16, 23
OP_REFUND = 24          # money back for (part of) a purchase, to the buckets it came from (rule 12)
OP_REVERSAL = 25        # a timed-out request undone exactly, or refused before it arrives (rule 13)
OP_CARD_STATUS = 26      # freeze, unfreeze, report lost, found, cancel: the op's tier byte is the
                         # status wanted; the entry's ref_id the status it left (rule 14)
OP_HOLD = 27            # Authorize: money held on the card until captured, voided or expired
                        # (rule 15); the entry's ref_id is when it expires
OP_HOLD_VOID = 28       # a hold released by its till or an operator
OP_HOLD_EXPIRED = 29    # the writer's: a hold released at its expiry
OP_KERNEL_MAX = OP_HOLD_EXPIRED  # 1..5, 7..15, 24..29 go through the kernel; 6 is written by it
# Replacement (rule 16): the writer's, in Python (it copies; no arithmetic): one request, two
# entries, one per card. The request's op is OP_CARD_REPLACED on the old card.
OP_CARD_REPLACED = 30       # the old card's: principal, bonus and points moved out; status replaced
OP_REPLACEMENT_OPENED = 31  # the new card's, right after: opens holding them; link_seq the first
# Rule 18: a legacy card opened with its balances (a chain admin's import), through the kernel:
# the op's amount_minor is its principal, ref_id its bonus (fen), redeem_points its points.
OP_IMPORT_CARD = 37


CARD_OPS = frozenset(op for op in range(1, OP_KERNEL_MAX + 1)
                     if not OP_ADMIN_MIN <= op <= OP_ADMIN_MAX) | {OP_IMPORT_CARD}
# Operations that open a card: its tier counted, its profile and sealed number stored.
OPENINGS = frozenset((OP_OPEN, OP_IMPORT_CARD))


# Entries of one card (its history): the kernel's, and a replacement's two (rule 16).
CARD_ENTRY_OPS = CARD_OPS | {OP_CARD_REPLACED, OP_REPLACEMENT_OPENED}


def card_op(op: int) -> bool:
    """Whether operation type ``op`` is a card operation the kernel applies (not admin)."""
    return op in CARD_OPS


# The daily close (cardcore.daytotals): an admin entry (no money) whose subject is u32 store_id |
# u32 business day | zeros.
OP_CLOSE_DAY = 35
# The chain's shape (cardcore.stores): admin entries whose subject is layout.REGION_SUBJECT or
# layout.STORE_SUBJECT (a region or store created or changed; names in the registry only).
OP_REGION_PUT, OP_STORE_PUT = 36, 38
# Admin entries: move no money, name a subject, not a card.
ADMIN_OPS = frozenset(range(OP_ADMIN_MIN, OP_ADMIN_MAX + 1)) | {OP_CLOSE_DAY, OP_REGION_PUT,
                                                                 OP_STORE_PUT}


def admin_op(op: int) -> bool:
    """Whether operation type ``op`` is an admin event (no money, a subject in card_id)."""
    return op in ADMIN_OPS


DAY_TOTALS_VERSION, STORE_DAY_VERSION, DAY_CLOSED = 1, 1, 1
DAY_OPS = 40  # count_by_op and amount_by_op slots: operation types 0..39
DAY_FIGURES = ("entries", "principal_in_minor", "principal_out_minor", "bonus_in_minor",
               "bonus_out_minor", "points_in", "points_out", "sales_gross_minor", "discount_minor",
               "coupon_off_minor", "tender_principal_minor", "tender_bonus_minor",
               "tender_points_minor", "tender_till_minor", "points_issued", "points_redeemed",
               "points_expired", "coupons_used", "clearing_owes_minor", "clearing_owed_minor",
               "own_day_principal_net_minor", "own_day_bonus_net_minor", "holds_net_minor",
               "own_day_held_net_minor")
DAY_FIGURE_SLOTS = 24
DAY_TOTALS = struct.Struct(f"<B7x{DAY_FIGURE_SLOTS}q{DAY_OPS}I{DAY_OPS}q24x")
DAY_KEY = struct.Struct(">II")      # store_id, business day
DAY_PAIR_KEY = struct.Struct(">III")  # store_id, business day, counterparty (or staff id)
STORE_DAY = struct.Struct("<BBxxIQqq")
DAY_STAFF = struct.Struct("<qqqq")
DAY_CHAIN_KEY = struct.Struct(">I")  # day_chain: business day
REGION = struct.Struct("<BBHIqII64s8x")
STORE = struct.Struct("<BBBBIIiqII64s16x")
STORE_SUBJECT = struct.Struct("<IIhBB4x")   # an OP_STORE_PUT entry's subject
REGION_SUBJECT = struct.Struct("<I12x")     # an OP_REGION_PUT entry's subject
REGION_STORE_KEY = struct.Struct(">II")     # chain_region_stores: region, store
REGION_VERSION, STORE_VERSION, STORE_OWN_DAY = 1, 1, 1
NAME_BYTES_MAX = 64
assert REGION.size == 96 and STORE.size == 112 and STORE_SUBJECT.size == 16
assert DAY_TOTALS.size == 704 and STORE_DAY.size == 32 and len(DAY_FIGURES) <= DAY_FIGURE_SLOTS

# Internal operations: no request record; no journal entry of their own.
OP_RESEAL = 32       # re-encrypt stored card numbers (compare and set)
OP_FLOOR = 33        # restore: raise a terminal's KSN counter or the next operator id
OP_MAINTENANCE = 34  # prune expired request records (the writer's idle tick)
# A card shard's copy of an admin shard's group (docs/cluster.md, "The admin shard"): the first
# operation of a group its leader relays, subject ADMIN_RELAY_SUBJECT; the group's other
# operations are that admin group's admin entries (ADMIN_OPS), applied as if submitted here.
OP_ADMIN_RELAY = 39
# Outbox records delivered (their seqs, u64 little-endian, in the payload): taken out, each once;
# a seq with no record is skipped (another front took it out first).
OP_OUTBOX_DONE = 40
# A card number forwarded to another card shard (its card id the operation's; the shard, u16
# little-endian, its payload): refused R_CARD_ALREADY_EXISTS when this shard holds the card, or
# forwarded it to another shard; made once (a second, the same, changes nothing: count 0).
OP_CARD_FORWARDED = 41
# the admin shard, this ledger's role, the admin shard's group relayed (0: none yet); a relayed
# group's mark carries that group's time in its payload (i64 us): its entries are judged at it
ADMIN_RELAY_SUBJECT = struct.Struct("<HBxxxxxQ")
RELAY_ROLE_CARD, RELAY_ROLE_ADMIN = 1, 2  # a card shard relaying from the admin shard; that one
# Relayed request keys live in a namespace of their own (no caller kind starts with it), so a
# caller's own key on a card shard never meets one: kept, never pruned (admin changes are few).
RELAYED_KEY_PREFIX = b"\xfa"
INTERNAL_OPS = frozenset((OP_RESEAL, OP_FLOOR, OP_MAINTENANCE, OP_ADMIN_RELAY, OP_OUTBOX_DONE,
                          OP_CARD_FORWARDED))
# Card flags (card record offset 4) and operation PIN flags (operation offset 2).
CARD_PIN_SET, CARD_PIN_LOCKED = 1, 2
PIN_PRESENTED, PIN_REQUIRED, PIN_OPTIONAL_UNSET, NEW_PIN = 1, 2, 4, 8
PIN_TRIES_MAX_LIMIT = 15
# Card statuses: values of cardcore.v1.CardStatus (5 REPLACED is the replacement's).
STATUS_ACTIVE, STATUS_FROZEN, STATUS_LOST, STATUS_CLOSED = 1, 2, 3, 4
STATUS_REPLACED = 5
STATUS_ISSUED, STATUS_EXPIRED = 6, 7
# Reasons the kernel can produce: values of cardcore.v1.Reason.
R_OK = 0
R_CARD_NOT_FOUND = 8
R_CARD_ALREADY_EXISTS = 9
R_CARD_NOT_ACTIVE = 10
R_INSUFFICIENT_FUNDS = 11
R_AMOUNT_OVERFLOW = 12
R_DUPLICATE_REQUEST_MISMATCH = 13
R_OVERLOADED, R_DEADLINE_EXCEEDED, R_UNAVAILABLE = 14, 15, 16
R_OUTCOME_UNKNOWN = 18
R_STORAGE_UNAVAILABLE = 19
R_INVALID_TIER = 5
R_INVALID_AMOUNT = 2
R_INVALID_ARGUMENT = 1
R_INTERNAL = 17
R_PIN_REQUIRED, R_PIN_WRONG, R_PIN_LOCKED, R_PIN_NOT_SET = 20, 21, 22, 23
R_UNAUTHENTICATED, R_PERMISSION_DENIED, R_OPERATOR_REQUIRED = 33, 34, 40
R_REQUEST_TOO_OLD, R_CLIENT_TIME_AHEAD = 41, 42
R_PROGRAM_INVALID, R_PROGRAM_STRANDS_CARDS = 43, 44
R_UNKNOWN_CATEGORY, R_INSUFFICIENT_POINTS, R_REDEMPTION_NOT_OFFERED = 64, 65, 66
R_COUPON_NOT_FOUND, R_COUPON_USED, R_COUPON_NOT_VALID_NOW = 67, 68, 69
R_COUPON_NOT_APPLICABLE, R_COUPON_NOT_FOR_SALE = 70, 71
R_PACKAGE_NOT_FOUND, R_PACKAGE_NOT_VALID_NOW, R_PACKAGE_USED_UP = 72, 73, 74
R_GIFT_NOT_FOUND, R_GIFT_OUT_OF_STOCK, R_EXCHANGE_NOT_OFFERED = 75, 76, 77
R_ORIGINAL_NOT_FOUND, R_NOT_REFUNDABLE, R_REFUND_EXCEEDS_ORIGINAL = 78, 79, 80
R_ALREADY_REVERSED, R_REVERSED, R_REVERSAL_WINDOW_PASSED, R_NOT_REVERSIBLE = 81, 82, 83, 84
R_ILLEGAL_TRANSITION = 85
R_HOLD_NOT_FOUND, R_HOLD_CLOSED, R_HOLD_EXPIRED, R_CAPTURE_EXCEEDS_HOLD = 86, 87, 88, 89
R_HOLDS_OPEN = 90
R_CARD_REPLACED = 91
R_CARD_EXPIRED, R_CARD_NOT_ACTIVATED = 92, 93
R_LINE_ALREADY_REFUNDED, R_LINE_NOT_FOUND = 96, 97
R_DAY_NOT_STARTED = 105  # CloseDay: a business day that has not begun
R_MEMBER_RANGE_INVALID, R_MEMBER_PAGE_INVALID = 115, 116  # GetMemberReport's input
# The chain's shape (cardcore.stores): PutRegion, PutStore, region scopes and reports.
R_REGION_NOT_FOUND, R_NAME_INVALID, R_UTC_OFFSET_INVALID, R_CUTOFF_HOUR_INVALID = 107, 108, 109, 110
R_CHAIN_ID_INVALID, R_CHAIN_TREE_FULL = 111, 112
R_ADMIN_ELSEWHERE = 117  # an admin change submitted to a card shard that takes its admin state
# from an admin shard (docs/cluster.md, "The admin shard"): it belongs there
R_NOT_A_CARD_SHARD = 118  # a card's operation submitted to that admin shard, which holds no cards
R_CROSS_SHARD = 119  # a front over several card shards: what one card shard cannot make alone
R_CARD_ELSEWHERE = 120  # a card's operation sent to the card shard its slot routes to, which
# forwarded its number to the shard that holds it (a front that has not read that yet): no
# request record, nothing changed; asked again, the front sends it there
# Rule 14: the card statuses each status can go to (CardStatus values). To EXPIRED only the
# server's sweep, at or after the card's expiry; nothing but closing from a card past it.
CARD_TRANSITIONS = {STATUS_ISSUED: (STATUS_ACTIVE, STATUS_CLOSED, STATUS_EXPIRED),
                    STATUS_ACTIVE: (STATUS_FROZEN, STATUS_LOST, STATUS_CLOSED, STATUS_EXPIRED),
                    STATUS_FROZEN: (STATUS_ACTIVE, STATUS_LOST, STATUS_CLOSED, STATUS_EXPIRED),
                    STATUS_LOST: (STATUS_ACTIVE, STATUS_CLOSED, STATUS_EXPIRED),
                    STATUS_EXPIRED: (STATUS_CLOSED,),
                    STATUS_CLOSED: ()}
# The statuses a card expires from (the others are ends: expired, closed, replaced).
STATUSES_LIVE = frozenset((STATUS_ISSUED, STATUS_ACTIVE, STATUS_FROZEN, STATUS_LOST))
# Rule 16: the statuses a card is replaced from (an expired card is renewed this way).
REPLACEABLE = (STATUS_ACTIVE, STATUS_FROZEN, STATUS_LOST, STATUS_EXPIRED)
R_KSN_REPLAYED, R_TERMINAL_UNKNOWN, R_TERMINAL_REVOKED = 27, 28, 29
R_TERMINAL_EXISTS, R_TERMINAL_NOT_FOUND, R_OPERATOR_EXISTS, R_OPERATOR_NOT_FOUND = 36, 37, 38, 39

SLOT_NONE = 0xFFFFFFFF
