"""Fixed-size binary layouts shared by the ledger, the Cython kernel and the reference.

Every record is little-endian, naturally aligned (so the C structs in
``ext/kernel.pxd`` need no packing pragma) and starts with a version byte.
The sizes are asserted here and, at import, in the kernel. Change a layout
only by bumping its version and teaching the ledger to read the old one.

Card record, v1, 128 bytes, LMDB ``cards`` value (key: 16-byte card id)::

    off size field                 meaning
      0  u8  version               1; 0 marks an empty slot (no such card)
      1  u8  status                CardStatus: 1 active, 2 frozen, 3 lost, 4 closed
      2  u8  tier                  index into the program's tiers
      3  u8  pin_tries             consecutive wrong PINs since the last right one or reset
      4  u32 flags                 bit 0 PIN set, bit 1 PIN locked
      8  i64 principal_minor       prepaid money the member paid in
     16  i64 bonus_minor           promotional value, kept apart from principal
     24  i64 points                points balance
     32  i64 held_minor            money reserved by open holds (holds issue; 0 now)
     40  i64 lifetime_paid_minor   cumulative amount paid (tier rules)
     48  u64 last_seq              journal sequence of the card's last entry
     56  i64 opened_us             Unix time of opening, microseconds
     64  u32 home_store_id
     68  u32 reserved
     72  32B pin_check             PIN verification value (see ``pin``); zeros when no PIN
    104  24B reserved              zeros

Journal entry, v1, 128 bytes, LMDB ``journal`` value (key: u64 big-endian seq)::

      0  u8  version               1
      1  u8  op                    OperationType: 1 open, 2 top-up, 3 purchase,
                                   4 set PIN, 5 reset PIN, 6 PIN failed; 16..20 admin
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
     96  i64 ts_us                 Unix time, microseconds
    104  u32 store_id
    108  u32 terminal_id
    112  u32 staff_id
    116  u32 operator_id           the back-office operator who did it; 0 = a terminal alone
    120  8B  request_tag           first 8 bytes of BLAKE2b(request_id): links entry and request

Admin entries (op >= 16) move no money; their 16-byte subject is, for
terminal events, u32 terminal_id | u32 store_id | 8B initial key ID; for
operator events, u32 operator_id | u8 role | zeros; for a key rotation,
u32 new key version | zeros.

Operation, v2, 128 bytes: the kernel's input, one per queued mutation (never
stored, so it has no version byte; v1 was 64 bytes without the PIN fields). The
card's slot in the records buffer and the group's timestamp are passed beside
the operations, so a handler can pack its operation before the writer runs::

      0  u8  op                    OperationType (1..5 reach the kernel)
      1  u8  tier                  open: the new card's tier
      2  u8  pin_flags             PIN_PRESENTED: pin_check holds the PIN entered;
                                   PIN_REQUIRED: the operation needs the card's PIN;
                                   PIN_OPTIONAL_UNSET: development mode lets a card
                                   without a PIN pass; NEW_PIN: new_pin_check is set
      3  u8  reserved
      4  u32 home_store_id         open: the profile's home store
      8  i64 amount_minor          top-up amount or purchase gross amount
     16  u32 store_id
     20  u32 terminal_id
     24  u32 staff_id
     28  u32 operator_id
     32  8B  request_tag
     40  16B card_id
     56  8B  reserved
     64  32B pin_check             the entered PIN's verification value (PIN_PRESENTED)
     96  32B new_pin_check         the new PIN's verification value (NEW_PIN)

The PIN rule (kernel and reference): for an operation that presents a PIN or
requires one, on a card with a PIN: locked -> REASON_PIN_LOCKED, not checked;
none presented -> REASON_PIN_REQUIRED; wrong -> pin_tries + 1, locked when it
reaches the program's pin_tries_max, a PIN-failed journal entry, declined with
REASON_PIN_WRONG; right -> pin_tries back to 0 and on. On a card without a PIN:
a PIN presented -> REASON_PIN_NOT_SET; required -> REASON_PIN_NOT_SET unless
PIN_OPTIONAL_UNSET. The checks run after "card exists" and "card active" and
before the amount. A right PIN sets pin_tries back to 0 only if the operation
then applies. Setting a first PIN (no PIN yet, none presented) needs an
operator (operator_id != 0): REASON_OPERATOR_REQUIRED otherwise.

Program, v1, 96 bytes: the arithmetic's parameters (see ``rules``)::

      0  u32 tier_count            1..16
      4  u32 pin_tries_max         wrong PINs in a row that lock the PIN, 1..15
      8  i64 points_unit_minor     > 0: points are earned per this much paid
     16  i64 points_per_unit       >= 0
     24  u32[16] rate_bp           what a tier pays, in basis points (1..10000)
     88  8B  reserved

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

Idempotency record, v1, 48 bytes, LMDB ``requests`` value (key: request_id)::

      0  u8  version               1
      1  u8  op
      2  u16 reason                0 applied, else why it was declined
      4  u32 reserved
      8  16B payload_digest        BLAKE2b-128 of the canonical payload
     24  u64 seq                   its journal entry (applied, or PIN failed), else 0
     32  i64 available_minor       for INSUFFICIENT_FUNDS
     40  i64 ts_us
"""
import struct
import sys

assert sys.byteorder == "little", "layouts are little-endian and read in place"

CARD_VERSION = 1
JOURNAL_VERSION = 1
IDEM_VERSION = 1

CARD = struct.Struct("<BBBBIqqqqqQqII32s24s")
JOURNAL = struct.Struct("<BBBBHBBQ16sqqqqqqqqqIIII8s")
OP = struct.Struct("<BBBBIqIIII8s16s8s32s32s")
PROGRAM = struct.Struct("<IIqq16I8s")
IDEM = struct.Struct("<BBHI16sQqq")
TERMINAL = struct.Struct("<BBHIII8sqqII16s")
TERMINAL_KEY = struct.Struct(">I")
SEQ_KEY = struct.Struct(">Q")  # big-endian so LMDB's byte order is sequence order

CARD_SIZE, JOURNAL_SIZE, OP_SIZE, PROGRAM_SIZE, IDEM_SIZE, TERMINAL_SIZE = 128, 128, 128, 96, 48, 64
OP_DIGEST_SIZE = 64  # the idempotency digest covers an operation's first 64 bytes: no PIN field
assert CARD.size == CARD_SIZE and JOURNAL.size == JOURNAL_SIZE
assert OP.size == OP_SIZE and PROGRAM.size == PROGRAM_SIZE and IDEM.size == IDEM_SIZE
assert TERMINAL.size == TERMINAL_SIZE
TERMINAL_VERSION = 1
TERMINAL_ACTIVE, TERMINAL_REVOKED = 1, 2

CARD_ID_SIZE = 16
REQUEST_TAG_SIZE = 8
MAX_TIERS = 16
INT64_MAX = (1 << 63) - 1

# Field offsets the ledger reads without unpacking a whole record.
CARD_OFF_LAST_SEQ = 48
JOURNAL_OFF_SEQ = 8
JOURNAL_OFF_REASON = 4
JOURNAL_OFF_PIN_TRIES = 6
OP_TERMINAL_ID = struct.Struct("<20xI")  # an operation's terminal_id, read alone
OP_OPERATOR_ID = struct.Struct("<28xI")  # an operation's operator_id, read alone

# Operation types: values of cardcore.v1.OperationType (a test checks they agree).
OP_OPEN, OP_TOP_UP, OP_PURCHASE, OP_SET_PIN, OP_RESET_PIN, OP_PIN_FAILED = 1, 2, 3, 4, 5, 6
OP_KERNEL_MAX = OP_RESET_PIN  # 1..5 go through the kernel; 6 is written by it
OP_TERMINAL_ENROLLED, OP_TERMINAL_REVOKED = 16, 17
OP_OPERATOR_ADDED, OP_OPERATOR_REMOVED, OP_DATA_KEY_ROTATED = 18, 19, 20
OP_ADMIN_MIN = 16
OP_RESEAL = 32  # internal: re-encrypt stored card numbers (no journal entry, no request record)
# Card flags (card record offset 4) and operation PIN flags (operation offset 2).
CARD_PIN_SET, CARD_PIN_LOCKED = 1, 2
PIN_PRESENTED, PIN_REQUIRED, PIN_OPTIONAL_UNSET, NEW_PIN = 1, 2, 4, 8
PIN_TRIES_MAX_LIMIT = 15
# Card statuses: values of cardcore.v1.CardStatus.
STATUS_ACTIVE, STATUS_FROZEN, STATUS_LOST, STATUS_CLOSED = 1, 2, 3, 4
# Reasons the kernel can produce: values of cardcore.v1.Reason.
R_OK = 0
R_CARD_NOT_FOUND = 8
R_CARD_ALREADY_EXISTS = 9
R_CARD_NOT_ACTIVE = 10
R_INSUFFICIENT_FUNDS = 11
R_AMOUNT_OVERFLOW = 12
R_DUPLICATE_REQUEST_MISMATCH = 13
R_STORAGE_UNAVAILABLE = 19
R_INVALID_TIER = 5
R_INVALID_AMOUNT = 2
R_INVALID_ARGUMENT = 1
R_INTERNAL = 17
R_PIN_REQUIRED, R_PIN_WRONG, R_PIN_LOCKED, R_PIN_NOT_SET = 20, 21, 22, 23
R_PERMISSION_DENIED, R_OPERATOR_REQUIRED = 34, 40
R_KSN_REPLAYED, R_TERMINAL_UNKNOWN, R_TERMINAL_REVOKED = 27, 28, 29
R_TERMINAL_EXISTS, R_TERMINAL_NOT_FOUND, R_OPERATOR_EXISTS, R_OPERATOR_NOT_FOUND = 36, 37, 38, 39

SLOT_NONE = 0xFFFFFFFF
