"""The card program and the arithmetic rules, written down once.

The rules (the Cython kernel in ``ext/kernel.pyx`` and the pure-Python
reference in ``reference.py`` both implement exactly these; a hypothesis test
checks they agree on every input):

1. Money is int64 minor units (fen). Points are int64. Nothing is ever
   wrapped: an operation whose result would pass 2**63 - 1 in any field
   (principal + bonus, points, lifetime paid) is declined with
   REASON_AMOUNT_OVERFLOW and changes nothing.
2. A tier's discount rate is in basis points of what the member pays:
   ``rate_bp = 8500`` means the member pays 85 %. 1 <= rate_bp <= 10000.
3. ``paid_minor = round_half_up(gross_minor * rate_bp / 10000)``
   ``= (gross_minor * rate_bp + 5000) // 10000`` (gross > 0, exact integer
   arithmetic: the kernel uses 128-bit intermediates). Examples at the edge:
   gross 1 at 9500 -> 0.95 -> 1; gross 10 at 9500 -> 9.5 -> 10;
   gross 30 at 9500 -> 28.5 -> 29; gross 1 at 4999 -> 0.4999 -> 0.
   ``discount_minor = gross_minor - paid_minor``.
4. ``points_earned = (paid_minor // points_unit_minor) * points_per_unit``
   (floor: 1.99 paid at 1 point per 1.00 earns 1 point).
5. A purchase spends principal first, then bonus. It needs
   ``paid_minor <= principal + bonus - held``; otherwise it is declined with
   REASON_INSUFFICIENT_FUNDS and the available amount. Balances are never
   negative.
6. A top-up adds to principal. Only active cards can be topped up or spent.
7. PINs (the exact order of checks is in ``layout``): a purchase always
   needs the card's PIN, a top-up when ``pin_on_top_up`` is set. After
   ``pin_tries_max`` wrong PINs in a row (default 3) the PIN locks: the money
   stays, the card cannot be spent until an operator resets the PIN. A right
   PIN sets the count back to 0.

The default program has three tiers (standard 100 %, silver 95 %, gold
90 %) and earns 1 point per 1.00 paid. Programs are TOML documents
(``cardcore.program`` validates them), stored in the ledger by version: each
journal entry names the version it was computed under.
"""
from __future__ import annotations

import dataclasses

from cardcore import layout

MAX_TIER_NAME_LEN = 32


@dataclasses.dataclass(frozen=True)
class Tier:
    name: str
    rate_bp: int


@dataclasses.dataclass(frozen=True)
class Program:
    tiers: tuple[Tier, ...]
    points_unit_minor: int = 100
    points_per_unit: int = 1
    require_luhn: bool = True
    pin_tries_max: int = 3
    pin_on_top_up: bool = False

    def __post_init__(self) -> None:
        if not 1 <= len(self.tiers) <= layout.MAX_TIERS:
            raise ValueError(f"a program has 1..{layout.MAX_TIERS} tiers")
        for tier in self.tiers:
            if not 1 <= tier.rate_bp <= 10000:
                raise ValueError(f"tier {tier.name!r}: rate_bp must be 1..10000")
            if not tier.name or len(tier.name) > MAX_TIER_NAME_LEN:
                raise ValueError(f"tier names are 1..{MAX_TIER_NAME_LEN} characters")
        if not 0 < self.points_unit_minor <= layout.INT64_MAX:
            raise ValueError("points_unit_minor must be > 0")
        if not 0 <= self.points_per_unit <= layout.INT64_MAX:
            raise ValueError("points_per_unit must be >= 0")
        if not 1 <= self.pin_tries_max <= layout.PIN_TRIES_MAX_LIMIT:
            raise ValueError(f"pin_tries_max must be 1..{layout.PIN_TRIES_MAX_LIMIT}")

    def packed(self, version: int) -> bytes:
        """The 96-byte program struct the kernel reads, for stored version ``version``."""
        assert version >= 1
        rates = [t.rate_bp for t in self.tiers] + [0] * (layout.MAX_TIERS - len(self.tiers))
        return layout.PROGRAM.pack(len(self.tiers), self.pin_tries_max, self.points_unit_minor,
                                   self.points_per_unit, *rates, version, 0)


DEFAULT_PROGRAM = Program(tiers=(Tier("standard", 10000), Tier("silver", 9500), Tier("gold", 9000)))


def paid_minor(gross_minor: int, rate_bp: int) -> int:
    """Rule 3: what the member pays, rounded half-up to the fen."""
    assert gross_minor > 0 and 1 <= rate_bp <= 10000
    return (gross_minor * rate_bp + 5000) // 10000


def points_earned(paid: int, points_unit_minor: int, points_per_unit: int) -> int:
    """Rule 4: whole units paid times points per unit (may exceed int64: callers check)."""
    return (paid // points_unit_minor) * points_per_unit


def available_minor(principal_minor: int, bonus_minor: int, held_minor: int) -> int:
    """Rule 5: what a purchase can spend now. The one definition for the ledger, the service and
    verify; the kernel and the reference compute it in their own language, held equal by the
    differential tests."""
    return principal_minor + bonus_minor - held_minor
