"""Card program documents: checked, with the line and the problem when they are wrong.

A chain's program is a TOML document, stored in the ledger by version (the
writer computes with the stored version, never with a file). A typo such as
``point_per_unit`` must not be silently ignored, nor ``rate_bp = true``
become 1: an operator editing the program needs "line 7: tier 'gold':
rate_bp must be 1..10000", before the program reaches a ledger.
``parse_program`` gives that: it refuses unknown keys, wrong TOML types and
out-of-range values, reports the line of the offending key, and otherwise
returns the ``rules.Program`` the kernel's arithmetic is compiled from.

The keys (every one optional unless marked; ``examples/programs/*.toml`` show
them with comments; money in fen):

- top level: ``points_unit_minor``, ``points_per_unit``, ``require_luhn``,
  ``pin_tries_max``, ``pin_on_top_up``; ``spend_order`` = "principal_first"
  (default) | "bonus_first" | "proportional"; ``points_expire_days`` (0..3660:
  points expire this many days after the day they were earned; 0 = never);
  ``activation_points`` (a new card's points); ``referral_points`` (the
  referrer's, when a card is opened on its referral: one level, never the
  referrer's referrer); ``birthday_points_bp`` (0, or 10000..100000: points in
  the member's birth month, 20000 = double) and ``utc_offset_minutes``
  (-720..840, default 0; 480 for China) for which month it is;
  ``tier_review_days`` (0, or 7..3660: tiers are reviewed, and can go down,
  every that many days from each card's opening; 365 for a yearly review; 0 =
  tiers never go down; ``rules`` rule 11); ``reversal_window_minutes`` (1..43200,
  default 1440: how long after a request a terminal can reverse it; ``rules`` rule 13);
  ``card_valid_months`` (0..1200, default 0 = never: a card opened under the program expires
  that many calendar months after its opening day, a date fixed in the card at its opening;
  ``rules`` rule 14).
  ``business_day_utc_offset_minutes`` (-720..840, default 480: UTC+8) and
  ``business_day_cutoff_hour`` (0..23, default 4): the daily close's business day starts at
  that local hour on that clock, so a sale at 01:30 belongs to the day before
  (``cardcore.daytotals``; apart from ``utc_offset_minutes``, whose default 0 dates birth
  months and card expiries as before).
  ``refund_points_shortfall`` = "forgive" (default: a refund takes back at most the points
  the card holds) or "owe" (the card's points go below zero, and what it earns next pays the
  debt first; ``rules`` rule 12).
- ``[exchange]``: ``points`` and ``bonus_minor`` (required: whole blocks of that
  many points become that much bonus money). No table: no exchange.
- ``[[gifts]]`` (at most 32): ``id``, ``name``, ``points_price``, ``stock`` (all
  required; stock: the total ever offered under the id).
- ``[redemption]``: ``points`` and ``value_minor`` (required: that many points
  pay that many fen), ``cap_bp`` (at most this share of a purchase's paid
  amount, default 10000). No table: no redemption.
- ``[[categories]]`` (at most 63): ``code`` (1..63, required, unique; 0 is
  the default category), ``name`` (required, unique, not "default"),
  ``discountable`` (default true).
- ``[[tiers]]`` (1..16, in order; default: standard, silver, gold): ``name``,
  ``rate_bp`` (required); ``points_per_unit`` (default: the program's);
  ``upgrade_spend_minor``, ``upgrade_top_up_minor`` (0: not reached that way;
  0 on the first tier); ``category_rate_bp``, ``category_points_per_unit``
  (tables: declared category name -> value).
- ``[[promotions]]`` (at most 16): ``id``, ``name``, ``kind`` ("fixed" |
  "percent" | "first_top_up"), ``min_top_up_minor`` (required);
  ``bonus_minor`` (fixed and first_top_up) or ``bonus_bp`` and
  ``max_bonus_minor`` (percent); ``starts``/``ends`` (date-times with their UTC
  offset; default: always); ``per_card_limit`` (0..255, 0 = no limit).
- ``[[coupons]]`` (at most 32): ``id``, ``name``, ``kind`` ("amount_off" |
  "percent_off" | "free_item") (required); ``category`` (a declared
  discountable category or "default"; default: every discountable line;
  required for free_item, the item it gives); ``min_spend_minor``;
  ``amount_off_minor`` (amount_off, required) or ``percent_bp`` (percent_off,
  required); ``max_off_minor`` (percent_off and free_item; 0 = no cap);
  ``valid_days`` (1..3660, default 30); ``points_price`` (0 = not for points).
- ``[[packages]]`` (at most 32): ``id``, ``name``, ``kind`` ("count" |
  "time"), ``price_minor`` (paid from the card's balance when sold),
  ``days`` (1..3660, valid that many days from the sale) (required);
  ``uses`` (1..10000; required for count packages, refused by time packages,
  which give any number of uses); ``category`` (a declared category or
  "default"; default: any service).

Problems name their table: "tier 'gold'" (or "tier 2", the second ``[[tiers]]``
when its name is wrong), "category 'drinks'" (or "category #2"), "promotion 3"
(the promotion of id 3, or "promotion #2" when its id is wrong), "coupon 3" (or
"coupon #2", likewise), "package 3" (or "package #2", likewise), "redemption".
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import tomllib

from cardcore import layout
from cardcore.rules import (
    COUPON_KINDS,
    COUPON_VALID_DAYS_MAX,
    POINTS_EXPIRE_DAYS_MAX,
    TIER_REVIEW_DAYS_MAX,
    REVERSAL_WINDOW_MINUTES_MAX,
    TIER_REVIEW_DAYS_MIN,
    BIRTHDAY_BP_MAX,
    DEFAULT_PROGRAM,
    MAX_NAME_LEN,
    MAX_TIER_NAME_LEN,
    PACKAGE_KINDS,
    PACKAGE_USES_MAX,
    PER_CARD_LIMIT_MAX,
    PROMOTION_KINDS,
    RATE_BP_FULL,
    SHORTFALLS,
    SPEND_ORDERS,
    Category,
    Coupon,
    Gift,
    Package,
    Program,
    Promotion,
    Tier,
)

__all__ = ["DEFAULT_PROGRAM_TOML", "PROGRAM_TEXT_BYTES_MAX", "ProgramError", "checked_program_file",
           "parse_program", "read_program_file"]

PROGRAM_TEXT_BYTES_MAX = 64 * 1024  # UTF-8 bytes; a longer document is refused unparsed


class ProgramError(ValueError):
    """A program document is wrong at ``line`` (1-based; 0: no single line)."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(line, problem)
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}" if self.line else self.problem


DEFAULT_PROGRAM_TOML = """\
# cardcore card program. Money is in minor units (fen, 1/100 yuan).

# Size of one point-earning unit, in fen paid (100 = 1.00 yuan); 1..2**63-1.
points_unit_minor = 100
# Points earned per whole unit paid, in points (0 = earn no points).
points_per_unit = 1
# Refuse card numbers whose Luhn check digit is wrong (true/false).
require_luhn = true
# Wrong PINs in a row before the PIN locks, a count (1..15).
pin_tries_max = 3
# Ask for the PIN on top-ups too, not only on purchases (true/false).
pin_on_top_up = false

# Tiers, 1..16, in order: a card stores its tier's position, so append new
# tiers at the end. Names are unique, printable, 1..32 characters.
[[tiers]]
# Tier name shown to people (text).
name = "standard"
# What the member pays, in basis points of the gross price (10000 = 100 %).
rate_bp = 10000

[[tiers]]
# Tier name shown to people (text).
name = "silver"
# What the member pays, in basis points of the gross price (9500 = 95 %).
rate_bp = 9500

[[tiers]]
# Tier name shown to people (text).
name = "gold"
# What the member pays, in basis points of the gross price (9000 = 90 %).
rate_bp = 9000
"""


@dataclasses.dataclass(frozen=True)
class _Key:
    """One key a table may hold: its TOML kind, range and whether it must be written."""
    name: str
    kind: str                      # "integer", "boolean", "string", "table", "tables", "datetime"
    low: int = 0                   # integers: the values; names: the length
    high: int = 0
    required: bool = False
    choices: tuple[str, ...] = ()  # a string that must be one of these (else: a name)


_I64 = layout.INT64_MAX
_TOP_KEYS = (
    _Key("points_unit_minor", "integer", 1, _I64),
    _Key("points_per_unit", "integer", 0, _I64),
    _Key("require_luhn", "boolean"),
    _Key("pin_tries_max", "integer", 1, layout.PIN_TRIES_MAX_LIMIT),
    _Key("pin_on_top_up", "boolean"),
    _Key("spend_order", "string", choices=tuple(SPEND_ORDERS)),
    _Key("refund_points_shortfall", "string", choices=tuple(SHORTFALLS)),
    _Key("points_expire_days", "integer", 0, POINTS_EXPIRE_DAYS_MAX),
    _Key("tier_review_days", "integer", 0, TIER_REVIEW_DAYS_MAX),
    _Key("reversal_window_minutes", "integer", 1, REVERSAL_WINDOW_MINUTES_MAX),
    _Key("card_valid_months", "integer", 0, layout.CARD_VALID_MONTHS_MAX),
    _Key("activation_points", "integer", 0, _I64),
    _Key("referral_points", "integer", 0, _I64),
    _Key("birthday_points_bp", "integer", 0, BIRTHDAY_BP_MAX),
    _Key("utc_offset_minutes", "integer", -720, 840),
    _Key("business_day_utc_offset_minutes", "integer", -720, 840),
    _Key("business_day_cutoff_hour", "integer", 0, 23),
    _Key("redemption", "table"),
    _Key("exchange", "table"),
    _Key("gifts", "tables"),
    _Key("categories", "tables"),
    _Key("tiers", "tables"),
    _Key("promotions", "tables"),
    _Key("coupons", "tables"),
    _Key("packages", "tables"),
)
_EXCHANGE_KEYS = (
    _Key("points", "integer", 1, _I64, required=True),
    _Key("bonus_minor", "integer", 1, _I64, required=True),
)
_GIFT_ID = _Key("id", "integer", 1, 0xFFFF, required=True)
_GIFT_KEYS = (
    _GIFT_ID,
    _Key("name", "string", 1, MAX_NAME_LEN, required=True),
    _Key("points_price", "integer", 1, _I64, required=True),
    _Key("stock", "integer", 0, _I64, required=True),
)
_REDEMPTION_KEYS = (
    _Key("points", "integer", 1, _I64, required=True),
    _Key("value_minor", "integer", 1, _I64, required=True),
    _Key("cap_bp", "integer", 0, RATE_BP_FULL),
)
_CATEGORY_KEYS = (
    _Key("code", "integer", 1, layout.MAX_CATEGORIES - 1, required=True),
    _Key("name", "string", 1, MAX_NAME_LEN, required=True),
    _Key("discountable", "boolean"),
)
_TIER_KEYS = (
    _Key("name", "string", 1, MAX_TIER_NAME_LEN, required=True),
    _Key("rate_bp", "integer", 1, RATE_BP_FULL, required=True),
    _Key("points_per_unit", "integer", 0, _I64),
    _Key("upgrade_spend_minor", "integer", 0, _I64),
    _Key("upgrade_top_up_minor", "integer", 0, _I64),
    _Key("category_rate_bp", "table"),
    _Key("category_points_per_unit", "table"),
)
# A tier's per-category tables: (the table's key with the range of its values, the tier key
# each value stands in for).
_TIER_OVERRIDES = (
    (_Key("category_rate_bp", "integer", 1, RATE_BP_FULL), "rate_bp"),
    (_Key("category_points_per_unit", "integer", 0, _I64), "points_per_unit"),
)
_PROMOTION_ID = _Key("id", "integer", 1, 0xFFFF, required=True)
_PROMOTION_KEYS = (
    _PROMOTION_ID,
    _Key("name", "string", 1, MAX_NAME_LEN, required=True),
    _Key("kind", "string", required=True, choices=tuple(PROMOTION_KINDS)),
    _Key("min_top_up_minor", "integer", 1, _I64, required=True),
    _Key("bonus_minor", "integer", 1, _I64),
    _Key("bonus_bp", "integer", 1, RATE_BP_FULL),
    _Key("max_bonus_minor", "integer", 0, _I64),
    _Key("starts", "datetime"),
    _Key("ends", "datetime"),
    _Key("per_card_limit", "integer", 0, PER_CARD_LIMIT_MAX),
)
# The bonus keys of each promotion kind (the others refuse them).
_BONUS_KEYS = {"fixed": ("bonus_minor",), "first_top_up": ("bonus_minor",),
               "percent": ("bonus_bp", "max_bonus_minor")}
_COUPON_ID = _Key("id", "integer", 1, 0xFFFF, required=True)
_COUPON_KEYS = (
    _COUPON_ID,
    _Key("name", "string", 1, MAX_NAME_LEN, required=True),
    _Key("kind", "string", required=True, choices=tuple(COUPON_KINDS)),
    _Key("category", "string", 1, MAX_NAME_LEN),
    _Key("min_spend_minor", "integer", 0, _I64),
    _Key("amount_off_minor", "integer", 1, _I64),
    _Key("percent_bp", "integer", 1, RATE_BP_FULL),
    _Key("max_off_minor", "integer", 0, _I64),
    _Key("valid_days", "integer", 1, COUPON_VALID_DAYS_MAX),
    _Key("points_price", "integer", 0, _I64),
)
# Coupon keys that are Coupon fields of the same name (absent: the field's default).
_OPTIONAL_COUPON_FIELDS = ("min_spend_minor", "amount_off_minor", "percent_bp", "max_off_minor",
                           "valid_days", "points_price")
# The discount keys of each coupon kind (the others refuse them); the key each kind requires
# and what it gives, for messages.
_OFF_KEYS = {"amount_off": ("amount_off_minor",), "percent_off": ("percent_bp", "max_off_minor"),
             "free_item": ("max_off_minor",)}
_COUPON_NEEDS = {"amount_off": ("amount_off_minor", "an amount_off coupon", "amount_off_minor"),
                 "percent_off": ("percent_bp", "a percent_off coupon", "percent_bp"),
                 "free_item": ("category", "a free_item coupon", "one item of its category")}
_PACKAGE_ID = _Key("id", "integer", 1, 0xFFFF, required=True)
_PACKAGE_KEYS = (
    _PACKAGE_ID,
    _Key("name", "string", 1, MAX_NAME_LEN, required=True),
    _Key("kind", "string", required=True, choices=tuple(PACKAGE_KINDS)),
    _Key("price_minor", "integer", 1, _I64, required=True),
    _Key("days", "integer", 1, COUPON_VALID_DAYS_MAX, required=True),
    _Key("uses", "integer", 1, PACKAGE_USES_MAX),
    _Key("category", "string", 1, MAX_NAME_LEN),
)


# --- where keys are written --------------------------------------------------

# A table is named by its path from the document: () the document itself,
# ("redemption",), ("tiers", 0) the first [[tiers]], ("tiers", 0, "category_rate_bp").
Path = tuple[str | int, ...]

# One part of a TOML key: bare, "basic" (with escapes) or 'literal'.
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_KEY_LINE_RE = re.compile(rf"\s*({_DOTTED_KEY})\s*=")
_HEADER_RE = re.compile(rf"\s*(\[\[?)\s*({_DOTTED_KEY})\s*\]")
_KEY_PART_RE = re.compile(_KEY_PART)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _key_text(part: str) -> str:
    """The key a written key part stands for: unquoted, escapes decoded."""
    if part.startswith("'"):
        return part[1:-1]
    if part.startswith('"'):
        return next(iter(tomllib.loads(f"{part} = 0")))
    return part


def _key_parts(dotted: str) -> list[str]:
    return [_key_text(p) for p in _KEY_PART_RE.findall(dotted)]


@dataclasses.dataclass
class _Lines:
    """Line numbers (1-based) where the tables and keys of a program document are written."""
    headers: dict[Path, int] = dataclasses.field(default_factory=dict)  # table -> its [header]
    # table -> key -> the line where it is first written
    keys: dict[Path, dict[str, int]] = dataclasses.field(default_factory=dict)

    def line(self, path: Path, key: str | None = None) -> int:
        """The line of ``key`` in the table at ``path``; of the table itself when key is None or
        not written in it: its header, else the line of the key holding it (an inline or dotted
        table; an element of an inline array: the array's key); 0 for the document."""
        if key is not None and key in self.keys.get(path, {}):
            return self.keys[path][key]
        if path in self.headers:
            return self.headers[path]
        if not path:
            return 0
        if isinstance(path[-1], int):
            return self.line(path[:-2], str(path[-2]))  # the array's key
        return self.line(path[:-1], path[-1])

    def note(self, table: Path, parts: list[str] | Path, number: int) -> None:
        """Keys ``parts``, each nested in the one before, from ``table``, are written at line
        ``number`` unless they were earlier (array positions in parts are skipped)."""
        for i, part in enumerate(parts):
            if isinstance(part, str):
                self.keys.setdefault(table + tuple(parts[:i]), {}).setdefault(part, number)


def _locate(text: str) -> _Lines:
    """Find where each table and key of an already valid TOML document is first written.

    Scans line by line (lines end at "\\n", as tomllib counts them). A line
    starts a statement unless it continues a multi-line string or a
    multi-line array/inline table (tracked by skipping strings and comments
    and counting brackets). A statement is a table header or ``key =`` /
    ``key.sub =`` (parts bare, "quoted" or 'quoted'). A header names a table
    path as TOML does: each ``[[x]]`` header opens the next element of array
    x, and a later ``[x.y]`` is table y of x's last element (``[tiers.z]``
    after the second ``[[tiers]]`` is ("tiers", 1, "z")). Keys belong to the
    last header's table; each part of a header or a dotted key is recorded as
    a key of the table holding it. For ``tiers = [{...}, ...]`` only the
    ``tiers =`` line is known: problems inside an inline array are reported
    there.

    Not handled (positions may be off, never wrong results): keys inside
    inline tables (reported at the line of the key holding the table), and
    several statements' positions within one line (columns are not tracked).
    """
    lines = _Lines()
    elements: dict[Path, int] = {}  # array of tables -> its [[headers]] so far
    table: Path = ()  # the table key lines belong to
    ml_quote: str | None = None  # the closing quote of an open multi-line string
    depth = 0  # open [ and { of values continued on the next lines
    for number, line in enumerate(text.split("\n"), start=1):
        if ml_quote is None and depth == 0:
            header = _HEADER_RE.match(line)
            key = None if header else _KEY_LINE_RE.match(line)
            if header:
                parts = _key_parts(header.group(2))
                table = ()
                for i, part in enumerate(parts):
                    table += (part,)
                    if header.group(1) == "[[" and i == len(parts) - 1:
                        elements[table] = elements.get(table, 0) + 1
                    if table in elements:
                        table += (elements[table] - 1,)
                lines.headers.setdefault(table, number)
                lines.note((), table, number)
            elif key:
                lines.note(table, _key_parts(key.group(1)), number)
        ml_quote, depth = _scan(line, ml_quote, depth)
    return lines


def _scan(line: str, ml_quote: str | None, depth: int) -> tuple[str | None, int]:
    """Carry the multi-line string and bracket state across one line."""
    i, n = 0, len(line)
    while i < n:
        if ml_quote is not None:  # inside """...""" or '''...'''
            if ml_quote == '"""' and line[i] == "\\":
                i += 2
            elif line.startswith(ml_quote, i):
                i += 3
                while i < n and line[i] == ml_quote[0]:  # up to two quotes end the string
                    i += 1
                ml_quote = None
            else:
                i += 1
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            ml_quote = line[i:i + 3]
            i += 3
        elif c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        elif c == "'":
            end = line.find("'", i + 1)
            i = n if end < 0 else end + 1
        else:
            depth += c in "[{"
            depth -= c in "]}"
            i += 1
    return ml_quote, max(depth, 0)


# --- checks ------------------------------------------------------------------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_KIND_NAMES = {"integer": "an integer", "boolean": "a boolean", "string": "a string",
               "table": "a table", "tables": "an array of tables",
               "datetime": "a date-time with its UTC offset, such as 2026-12-24T00:00:00+08:00"}


def _toml_type(value: object) -> str:
    """A TOML type name for people, with an article."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                       (str, "a string"), (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    if isinstance(value, dt.datetime):
        return "a local date-time" if value.tzinfo is None else "a date-time"
    return "a date" if isinstance(value, dt.date) else "a time"


def _is_kind(value: object, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "tables":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if kind == "datetime":
        return isinstance(value, dt.datetime) and value.tzinfo is not None
    return isinstance(value, {"boolean": bool, "string": str, "table": dict}[kind])


def _bounds(low: int, high: int) -> str:
    return f"{low}..{'2**63-1' if high == _I64 else high}"


def _value_problem(key: _Key, value: object, shown: str | None = None) -> str | None:
    """Why ``value`` cannot be the value of ``key`` (written ``shown``), or None if it can."""
    shown = shown or key.name
    if not _is_kind(value, key.kind):
        return f"{shown} must be {_KIND_NAMES[key.kind]} (got {_toml_type(value)})"
    if key.kind == "integer" and not key.low <= value <= key.high:
        return f"{shown} must be {_bounds(key.low, key.high)}"
    if key.kind == "string" and key.choices and value not in key.choices:
        return f"{shown} must be one of {', '.join(key.choices)} (got {value!r})"
    if key.kind == "string" and not key.choices and not key.low <= len(value) <= key.high:
        return f"{shown} must be {key.low}..{key.high} characters"
    if key.kind == "string" and not key.choices and not value.isprintable():
        return f"{shown} {value!r} has unprintable characters"
    if key.kind == "datetime" and value < _EPOCH:
        return f"{shown} must not be before 1970-01-01T00:00:00Z"
    return None


def _name_ok(value: object, high: int = MAX_NAME_LEN) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= high and value.isprintable()


def _unix_us(value: dt.datetime) -> int:
    """An offset date-time as Unix microseconds, exactly."""
    return (value - _EPOCH) // dt.timedelta(microseconds=1)


def _dotted(table: str, key: str) -> str:
    """``table.key`` as it would be written in TOML (key quoted unless bare)."""
    return f"{table}.{key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)}"


class _Table:
    """One table being checked: problems carry its label and the line of their key."""

    def __init__(self, raw: dict, path: Path, label: str, lines: _Lines,
                 problems: list[tuple[int, str]]) -> None:
        self.raw, self.path, self.label = raw, path, label
        self.lines, self.problems = lines, problems
        self.found = len(problems)
        self.misspelt = False  # a key is unknown: its missing keys are not reported

    @property
    def ok(self) -> bool:
        """No problem in this table so far."""
        return len(self.problems) == self.found

    def refuse(self, key: str | None, why: str, label: str | None = None) -> None:
        """A problem at ``key``'s line (None: the table's own line), named by ``label`` (by
        default the table's)."""
        label = self.label if label is None else label
        self.problems.append((self.lines.line(self.path, key), f"{label}: {why}" if label else why))

    def missing(self, key: str, why: str = "") -> None:
        if not self.misspelt:  # a misspelt key says more
            self.refuse(None, f"missing {key}{why}")

    def check(self, keys: tuple[_Key, ...]) -> dict[str, object]:
        """The table's values that are well typed and in range; problems for unknown keys,
        missing required keys and the values that are not."""
        known = {k.name: k for k in keys}
        for key in self.raw:
            if key not in known:
                self.refuse(key, f"unknown key {key!r} (known: {', '.join(known)})")
                self.misspelt = True
        for key in keys:
            if key.required and key.name not in self.raw:
                self.missing(key.name)
        values = {}
        for name, value in self.raw.items():
            if name not in known:
                continue
            why = _value_problem(known[name], value)
            if why is None:
                values[name] = value
            else:
                self.refuse(name, why)
        return values


def _syntax_error(err: tomllib.TOMLDecodeError, text: str) -> ProgramError:
    """tomllib's message ends "(at line N, column M)" or "(at end of document)"."""
    message = str(err)
    at = re.search(r" \(at line (\d+), column \d+\)$", message)
    if at:
        return ProgramError(int(at.group(1)), message[:at.start()])
    if message.endswith(" (at end of document)"):
        last_line = len(text.rstrip().split("\n"))
        problem = message.removesuffix(" (at end of document)") + " at end of document"
        return ProgramError(last_line, problem)
    return ProgramError(0, message)


def _too_many(what: str, raw: list, most: int, lines: _Lines,
              problems: list[tuple[int, str]]) -> None:
    """Refuse an array of tables longer than ``most``, at the first element too many."""
    if len(raw) > most:
        problems.append((lines.line((what, most)),
                         f"too many {what}: {len(raw)} (at most {most})"))


def _check_exchange(raw: dict, lines: _Lines, problems: list[tuple[int, str]]) -> dict:
    """The Program fields of an [exchange] table (none after its problems)."""
    table = _Table(raw, ("exchange",), "exchange", lines, problems)
    values = table.check(_EXCHANGE_KEYS)
    if not table.ok:
        return {}
    return {"exchange_points": values["points"], "exchange_bonus_minor": values["bonus_minor"]}


def _with_ids(what: str, raw: list[dict], most: int, check_one, lines: _Lines,
              problems: list[tuple[int, str]]) -> tuple:
    """An array of tables whose elements carry the chain's ids (promotions, coupons, packages,
    gifts): at most ``most``, each checked by ``check_one(k, table)`` (None after its problems),
    and no id twice."""
    word = what[:-1]
    _too_many(what, raw, most, lines, problems)
    items: list = []
    first_with_id: dict[int, int] = {}
    for k, table in enumerate(raw):
        item = check_one(k, table)
        if item is None:
            continue
        if item.id in first_with_id:
            why = (f"{word} #{k + 1}: duplicate {word} id {item.id} "
                   f"(also {word} #{first_with_id[item.id] + 1})")
            problems.append((lines.line((what, k), "id"), why))
        first_with_id.setdefault(item.id, k)
        items.append(item)
    return tuple(items)


def _check_gift(k: int, raw: dict, lines: _Lines, problems: list[tuple[int, str]]) -> Gift | None:
    """Check the k-th (0-based) gift table; the Gift, or None after its problems."""
    gid = raw.get("id")
    label = f"gift {gid}" if _value_problem(_GIFT_ID, gid) is None else f"gift #{k + 1}"
    table = _Table(raw, ("gifts", k), label, lines, problems)
    values = table.check(_GIFT_KEYS)
    if not table.ok:
        return None
    return Gift(gid, values["name"], values["points_price"], values["stock"])


def _check_gifts(raw: list[dict], lines: _Lines,
                 problems: list[tuple[int, str]]) -> tuple[Gift, ...]:
    return _with_ids("gifts", raw, layout.MAX_GIFTS,
                     lambda k, table: _check_gift(k, table, lines, problems), lines, problems)


def _check_redemption(raw: dict, lines: _Lines, problems: list[tuple[int, str]]) -> dict:
    """The Program fields of a [redemption] table (none after its problems)."""
    table = _Table(raw, ("redemption",), "redemption", lines, problems)
    values = table.check(_REDEMPTION_KEYS)
    if not table.ok:
        return {}
    return {"redeem_points": values["points"], "redeem_value_minor": values["value_minor"],
            "redeem_cap_bp": values.get("cap_bp", RATE_BP_FULL)}


# Categories by name; None: written with a problem (already reported).
_Declared = dict[str, Category | None]


def _check_categories(raw: list[dict], lines: _Lines,
                      problems: list[tuple[int, str]]) -> tuple[tuple[Category, ...], _Declared]:
    _too_many("categories", raw, layout.MAX_CATEGORIES - 1, lines, problems)
    categories: list[Category] = []
    declared: _Declared = {}
    first_code: dict[int, int] = {}  # code -> the position of the first category with it
    first_name: dict[str, int] = {}  # name -> the position of the first category with it
    for k, fields in enumerate(raw):
        name = fields.get("name")
        label = f"category {name!r}" if _name_ok(name) else f"category #{k + 1}"
        table = _Table(fields, ("categories", k), label, lines, problems)
        values = table.check(_CATEGORY_KEYS)
        if values.get("name") == "default":
            table.refuse("name", "the name 'default' is reserved for category code 0")
        code = values.get("code")
        if code in first_code:  # named by position: the name may be the other duplicate
            table.refuse("code", f"duplicate category code {code} "
                                 f"(also category #{first_code[code] + 1})", f"category #{k + 1}")
        if code is not None:
            first_code.setdefault(code, k)
        if "name" in values and name in first_name:
            table.refuse("name", f"duplicate category name {name!r} "
                                 f"(also category #{first_name[name] + 1})", f"category #{k + 1}")
        if isinstance(name, str):
            first_name.setdefault(name, k)
            declared.setdefault(name, None)
        if table.ok:
            category = Category(code, name, values.get("discountable", True))
            categories.append(category)
            declared[name] = category
    return tuple(categories), declared


def _check_overrides(table: _Table, values: dict, declared: _Declared | None,
                     ) -> dict[str, tuple[tuple[int, int], ...]]:
    """A tier's category_* tables as Tier fields: (code, value) sorted by code."""
    out = {}
    for key, overridden in _TIER_OVERRIDES:
        if key.name not in values:
            continue
        sub = _Table(values[key.name], table.path + (key.name,), table.label, table.lines,
                     table.problems)
        pairs = []
        for name, value in sub.raw.items():
            shown = _dotted(key.name, name)
            category = declared.get(name) if declared else None  # None: not checked here
            if declared is not None and name == "default":
                why = f"{shown}: the default category takes the tier's own {overridden}"
            elif declared is not None and name not in declared:
                known = ", ".join(declared) or "none"
                why = f"{shown}: no category {name!r} in [[categories]] (declared: {known})"
            else:
                why = _value_problem(key, value, shown)
            if why is None and overridden == "rate_bp" and category and not category.discountable:
                why = f"{shown}: category {name!r} is not discountable (it always pays 100 %)"
            if why is not None:
                sub.refuse(name, why)
            elif category is not None:
                pairs.append((category.code, value))
        out[key.name] = tuple(sorted(pairs))
    return out


def _check_tier(k: int, raw: dict, declared: _Declared | None, lines: _Lines,
                problems: list[tuple[int, str]]) -> Tier | None:
    """Check the k-th (0-based) tier table; the Tier, or None after adding its problems."""
    name = raw.get("name")
    label = f"tier {name!r}" if _name_ok(name, MAX_TIER_NAME_LEN) else f"tier {k + 1}"
    table = _Table(raw, ("tiers", k), label, lines, problems)
    values = table.check(_TIER_KEYS)
    for key in ("upgrade_spend_minor", "upgrade_top_up_minor"):
        if k == 0 and values.get(key, 0) > 0:
            table.refuse(key, f"{key} must be 0: the first tier is not reached by an upgrade")
    overrides = _check_overrides(table, values, declared)
    if not table.ok:
        return None
    return Tier(name, values["rate_bp"], values.get("points_per_unit"),
                values.get("upgrade_spend_minor", 0), values.get("upgrade_top_up_minor", 0),
                overrides.get("category_rate_bp", ()),
                overrides.get("category_points_per_unit", ()))


def _check_tiers(raw: list[dict], declared: _Declared | None, lines: _Lines,
                 problems: list[tuple[int, str]]) -> tuple[Tier, ...]:
    if not raw:
        problems.append((lines.line((), "tiers"),
                         f"no tiers (a program has 1..{layout.MAX_TIERS})"))
        return ()
    _too_many("tiers", raw, layout.MAX_TIERS, lines, problems)
    tiers: list[Tier] = []
    first_with_name: dict[str, int] = {}
    for k, table in enumerate(raw):
        tier = _check_tier(k, table, declared, lines, problems)
        if tier is None:
            continue
        if tier.name in first_with_name:
            first = first_with_name[tier.name] + 1
            why = f"tier {k + 1}: duplicate tier name {tier.name!r} (also tier {first})"
            problems.append((lines.line(("tiers", k), "name"), why))
        first_with_name.setdefault(tier.name, k)
        tiers.append(tier)
    return tuple(tiers)


def _check_promotion(k: int, raw: dict, lines: _Lines,
                     problems: list[tuple[int, str]]) -> Promotion | None:
    """Check the k-th (0-based) promotion table; the Promotion, or None after its problems."""
    pid = raw.get("id")
    label = (f"promotion {pid}" if _value_problem(_PROMOTION_ID, pid) is None
             else f"promotion #{k + 1}")
    table = _Table(raw, ("promotions", k), label, lines, problems)
    kind = raw.get("kind") if isinstance(raw.get("kind"), str) else None
    gives = _BONUS_KEYS.get(kind, ())  # (): the kind is wrong, reported below
    for key in ("bonus_minor", "bonus_bp", "max_bonus_minor"):
        if gives and key in raw and key not in gives:  # before its value: this says more
            kinds = " and ".join(k for k, keys in _BONUS_KEYS.items() if key in keys)
            table.refuse(key, f"{key} is only for {kinds} promotions "
                              f"(a {kind} promotion gives {gives[0]})")
    values = table.check(_PROMOTION_KEYS)
    if gives and gives[0] not in raw:
        table.missing(gives[0], f" (required for a {kind} promotion)")
    starts = _unix_us(values["starts"]) if "starts" in values else 0
    ends = _unix_us(values["ends"]) if "ends" in values else _I64
    if starts >= ends:
        shown = (values.get("starts", _EPOCH).isoformat(), values["ends"].isoformat())
        table.refuse("ends", "starts must be before ends (starts {}, ends {})".format(*shown))
    if not table.ok:
        return None
    return Promotion(pid, values["name"], PROMOTION_KINDS[kind], values["min_top_up_minor"],
                     values.get("bonus_minor", 0), values.get("bonus_bp", 0),
                     values.get("max_bonus_minor", 0), starts, ends,
                     values.get("per_card_limit", 0))


def _check_promotions(raw: list[dict], lines: _Lines,
                      problems: list[tuple[int, str]]) -> tuple[Promotion, ...]:
    return _with_ids("promotions", raw, layout.MAX_PROMOTIONS,
                     lambda k, table: _check_promotion(k, table, lines, problems), lines, problems)


def _named_category(table: _Table, name: str, declared: _Declared | None) -> int | None:
    """The category code a table's ``category`` names (0: "default"); None after its problem
    (or when the categories cannot say: their problem is reported)."""
    if name == "default":
        return 0
    if declared is None:
        return None
    if name not in declared:
        known = ", ".join(declared) or "none"
        table.refuse("category", f"no category {name!r} in [[categories]] (declared: {known})")
        return None
    category = declared[name]
    return None if category is None else category.code  # None: its problem is reported there


def _coupon_category(table: _Table, name: str, declared: _Declared | None) -> int | None:
    """The category code a coupon's ``category`` names: a discountable one; None after its
    problem (or when the categories cannot say: their problem is reported)."""
    code = _named_category(table, name, declared)
    category = declared.get(name) if code and declared is not None else None
    if category is not None and not category.discountable:
        table.refuse("category", f"category {name!r} is not discountable "
                                 "(coupons apply to discountable lines only)")
        return None
    return code


def _check_coupon(k: int, raw: dict, declared: _Declared | None, lines: _Lines,
                  problems: list[tuple[int, str]]) -> Coupon | None:
    """Check the k-th (0-based) coupon table; the Coupon, or None after its problems."""
    cid = raw.get("id")
    label = f"coupon {cid}" if _value_problem(_COUPON_ID, cid) is None else f"coupon #{k + 1}"
    table = _Table(raw, ("coupons", k), label, lines, problems)
    kind = raw.get("kind") if isinstance(raw.get("kind"), str) else None
    takes = _OFF_KEYS.get(kind, ())  # (): the kind is wrong, reported below
    needs, a_kind, gives = _COUPON_NEEDS.get(kind, (None, "", ""))
    for key in ("amount_off_minor", "percent_bp", "max_off_minor"):
        if takes and key in raw and key not in takes:  # before its value: this says more
            kinds = " and ".join(other for other, keys in _OFF_KEYS.items() if key in keys)
            table.refuse(key, f"{key} is only for {kinds} coupons ({a_kind} gives {gives})")
    values = table.check(_COUPON_KEYS)
    if needs is not None and needs not in raw:
        table.missing(needs, f" (required for {a_kind})")
    category = -1
    if "category" in values:
        category = _coupon_category(table, values["category"], declared)
    if not table.ok or category is None:
        return None  # category None: its problem is reported (in the coupon or its category)
    optional = {key: values[key] for key in _OPTIONAL_COUPON_FIELDS if key in values}
    return Coupon(cid, values["name"], COUPON_KINDS[kind], category, **optional)


def _check_coupons(raw: list[dict], declared: _Declared | None, lines: _Lines,
                   problems: list[tuple[int, str]]) -> tuple[Coupon, ...]:
    return _with_ids("coupons", raw, layout.MAX_COUPONS,
                     lambda k, table: _check_coupon(k, table, declared, lines, problems), lines,
                     problems)


def _check_package(k: int, raw: dict, declared: _Declared | None, lines: _Lines,
                   problems: list[tuple[int, str]]) -> Package | None:
    """Check the k-th (0-based) package table; the Package, or None after its problems."""
    pid = raw.get("id")
    label = f"package {pid}" if _value_problem(_PACKAGE_ID, pid) is None else f"package #{k + 1}"
    table = _Table(raw, ("packages", k), label, lines, problems)
    kind = raw.get("kind") if isinstance(raw.get("kind"), str) else None
    if kind == "time" and "uses" in raw:  # before its value: this says more
        table.refuse("uses", "uses is only for count packages "
                             "(a time package gives any number of uses for its days)")
    values = table.check(_PACKAGE_KEYS)
    if kind == "count" and "uses" not in raw:
        table.missing("uses", " (required for a count package)")
    category = -1
    if "category" in values:
        category = _named_category(table, values["category"], declared)
    if not table.ok or category is None:
        return None  # category None: its problem is reported (in the package or its category)
    return Package(pid, values["name"], PACKAGE_KINDS[kind], values["price_minor"],
                   values["days"], values.get("uses", 0), category)


def _check_packages(raw: list[dict], declared: _Declared | None, lines: _Lines,
                    problems: list[tuple[int, str]]) -> tuple[Package, ...]:
    return _with_ids("packages", raw, layout.MAX_PACKAGES,
                     lambda k, table: _check_package(k, table, declared, lines, problems), lines,
                     problems)


def parse_program(text: str) -> Program:
    """Parse and check a card program TOML document.

    Missing keys take the defaults of ``rules.Program`` (no ``tiers``: the
    default tiers). Raises ProgramError for the problem written earliest in the
    document (every key is checked; the smallest line is reported).
    """
    if len(text) > PROGRAM_TEXT_BYTES_MAX or \
            len(text.encode("utf-8", "surrogatepass")) > PROGRAM_TEXT_BYTES_MAX:
        raise ProgramError(0, f"the program is longer than {PROGRAM_TEXT_BYTES_MAX} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _syntax_error(err, text) from None
    except RecursionError:
        raise ProgramError(0, "the program is nested too deeply") from None
    lines = _locate(text)
    problems: list[tuple[int, str]] = []
    values = _Table(data, (), "", lines, problems).check(_TOP_KEYS)
    fields: dict[str, object] = {key.name: values[key.name] for key in _TOP_KEYS
                                 if key.kind in ("integer", "boolean") and key.name in values}
    if "spend_order" in values:
        fields["spend_order"] = SPEND_ORDERS[values["spend_order"]]
    if "refund_points_shortfall" in values:
        fields["refund_points_shortfall"] = SHORTFALLS[values["refund_points_shortfall"]]
    if 0 < values.get("tier_review_days", 0) < TIER_REVIEW_DAYS_MIN:
        problems.append((lines.line((), "tier_review_days"),
                         f"tier_review_days must be 0 (no review) or {TIER_REVIEW_DAYS_MIN}.."
                         f"{TIER_REVIEW_DAYS_MAX}"))
    if "redemption" in values:
        fields.update(_check_redemption(values["redemption"], lines, problems))
    if "exchange" in values:
        fields.update(_check_exchange(values["exchange"], lines, problems))
    fields["gifts"] = _check_gifts(values.get("gifts", []), lines, problems)
    categories, declared = _check_categories(values.get("categories", []), lines, problems)
    if "categories" in data and "categories" not in values:
        declared = None  # not an array of tables: tiers cannot say which names are declared
    if "tiers" not in data:
        tiers = DEFAULT_PROGRAM.tiers
    elif "tiers" in values:
        tiers = _check_tiers(values["tiers"], declared, lines, problems)
    else:
        tiers = ()  # not an array of tables: reported
    promotions = _check_promotions(values.get("promotions", []), lines, problems)
    coupons = _check_coupons(values.get("coupons", []), declared, lines, problems)
    packages = _check_packages(values.get("packages", []), declared, lines, problems)
    if problems:
        raise ProgramError(*min(problems, key=lambda p: p[0]))
    try:
        return Program(tiers=tiers, categories=categories, promotions=promotions,
                       coupons=coupons, packages=packages, **fields)
    except ValueError as err:  # the dataclass's own checks: should not happen after ours
        raise ProgramError(0, str(err)) from None


def checked_program_file(path: str) -> str:
    """The text of a program file that ``parse_program`` accepts; ProgramError otherwise."""
    text = read_program_file(path)
    parse_program(text)
    return text


def read_program_file(path: str) -> str:
    """The text of a program file (checked by ``parse_program`` before it is used): refuses a
    file that is too long, unreadable or not UTF-8, with the problem and no traceback."""
    try:
        with open(path, "rb") as f:
            raw = f.read(PROGRAM_TEXT_BYTES_MAX + 1)
    except OSError as exc:
        raise ProgramError(0, f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > PROGRAM_TEXT_BYTES_MAX:
        raise ProgramError(0, f"the program is longer than {PROGRAM_TEXT_BYTES_MAX} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ProgramError(line, "the program is not UTF-8 text") from None
