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
      3  u8  pin_tries             consecutive wrong PINs (PIN issue; 0 now)
      4  u32 flags                 bit 0 PIN set, bit 1 PIN locked (PIN issue)
      8  i64 principal_minor       prepaid money the member paid in
     16  i64 bonus_minor           promotional value, kept apart from principal
     24  i64 points                points balance
     32  i64 held_minor            money reserved by open holds (holds issue; 0 now)
     40  i64 lifetime_paid_minor   cumulative amount paid (tier rules)
     48  u64 last_seq              journal sequence of the card's last entry
     56  i64 opened_us             Unix time of opening, microseconds
     64  u32 home_store_id
     68  u32 reserved
     72  32B pin_check             PIN verification value (PIN issue; zeros now)
    104  24B reserved              zeros

Journal entry, v1, 128 bytes, LMDB ``journal`` value (key: u64 big-endian seq)::

      0  u8  version               1
      1  u8  op                    OperationType: 1 open, 2 top-up, 3 purchase
      2  u8  tier                  the card's tier when applied
      3  u8  status                the card's status after the operation
      4  u16 reason                Reason; always 0 in the journal, non-zero only
                                   in the kernel's output for a declined operation
      6  u16 reserved
      8  u64 seq                   strictly increasing, from 1; 0 when declined
     16  16B card_id
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
    116  u32 reserved
    120  8B  request_tag           first 8 bytes of BLAKE2b(request_id): links entry and request

Operation, v1, 64 bytes: the kernel's input, one per queued mutation. The
card's slot in the records buffer and the group's timestamp are passed beside
the operations, so a handler can pack its operation before the writer runs::

      0  u8  op                    OperationType
      1  u8  tier                  open: the new card's tier
      2  u16 reserved
      4  u32 home_store_id         open: the profile's home store
      8  i64 amount_minor          top-up amount or purchase gross amount
     16  u32 store_id
     20  u32 terminal_id
     24  u32 staff_id
     28  u32 reserved
     32  8B  request_tag
     40  16B card_id
     56  8B  reserved

Program, v1, 96 bytes: the arithmetic's parameters (see ``rules``)::

      0  u32 tier_count            1..16
      4  u32 reserved
      8  i64 points_unit_minor     > 0: points are earned per this much paid
     16  i64 points_per_unit       >= 0
     24  u32[16] rate_bp           what a tier pays, in basis points (1..10000)
     88  8B  reserved

Idempotency record, v1, 48 bytes, LMDB ``requests`` value (key: request_id)::

      0  u8  version               1
      1  u8  op
      2  u16 reason                0 applied, else why it was declined
      4  u32 reserved
      8  16B payload_digest        BLAKE2b-128 of the canonical payload
     24  u64 seq                   journal entry when applied, else 0
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
JOURNAL = struct.Struct("<BBBBHHQ16sqqqqqqqqqIII I8s".replace(" ", ""))
OP = struct.Struct("<BBHIqIIII8s16s8s")
PROGRAM = struct.Struct("<IIqq16I8s")
IDEM = struct.Struct("<BBHI16sQqq")
SEQ_KEY = struct.Struct(">Q")  # big-endian so LMDB's byte order is sequence order

CARD_SIZE, JOURNAL_SIZE, OP_SIZE, PROGRAM_SIZE, IDEM_SIZE = 128, 128, 64, 96, 48
assert CARD.size == CARD_SIZE and JOURNAL.size == JOURNAL_SIZE
assert OP.size == OP_SIZE and PROGRAM.size == PROGRAM_SIZE and IDEM.size == IDEM_SIZE

CARD_ID_SIZE = 16
REQUEST_TAG_SIZE = 8
MAX_TIERS = 16
INT64_MAX = (1 << 63) - 1

# Field offsets the ledger reads without unpacking a whole record.
CARD_OFF_LAST_SEQ = 48
JOURNAL_OFF_SEQ = 8
JOURNAL_OFF_REASON = 4

# Operation types: values of cardcore.v1.OperationType (a test checks they agree).
OP_OPEN, OP_TOP_UP, OP_PURCHASE = 1, 2, 3
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

SLOT_NONE = 0xFFFFFFFF
