"""Card program documents: checked, with the line and the problem when they are wrong.

A chain's program is a TOML document, stored in the ledger by version (the
writer computes with the stored version, never with a file). A typo such as
``point_per_unit`` must not be silently ignored, nor ``rate_bp = true``
become 1: an operator editing the program needs "line 7: tier 'gold':
rate_bp must be 1..10000", before the program reaches a ledger.
``parse_program`` gives that: it refuses unknown keys, wrong TOML types and
out-of-range values, reports the line of the offending key, and otherwise
returns the ``rules.Program`` the kernel's arithmetic is compiled from.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib

from cardcore import layout
from cardcore.rules import DEFAULT_PROGRAM, MAX_TIER_NAME_LEN, Program, Tier

__all__ = ["DEFAULT_PROGRAM_TOML", "PROGRAM_TEXT_BYTES_MAX", "ProgramError", "checked_program_file",
           "parse_program", "read_program_file"]

PROGRAM_TEXT_BYTES_MAX = 64 * 1024  # UTF-8 bytes; a longer document is refused unparsed

_RATE_BP_MAX = 10000


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

# Top-level keys: (name, TOML type, low, high); high None for booleans.
_SCALARS: tuple[tuple[str, type, int, int | None], ...] = (
    ("points_unit_minor", int, 1, layout.INT64_MAX),
    ("points_per_unit", int, 0, layout.INT64_MAX),
    ("require_luhn", bool, 0, None),
    ("pin_tries_max", int, 1, layout.PIN_TRIES_MAX_LIMIT),
    ("pin_on_top_up", bool, 0, None),
)
_TOP_KEYS = tuple(name for name, *_ in _SCALARS) + ("tiers",)
_TIER_KEYS = ("name", "rate_bp")


# --- where keys are written --------------------------------------------------

# One part of a TOML key: bare, "basic" (with escapes) or 'literal'.
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_KEY_LINE_RE = re.compile(rf"\s*({_KEY_PART})\s*[=.]")
_HEADER_RE = re.compile(rf"\s*(\[\[?)\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]")
_KEY_PART_RE = re.compile(_KEY_PART)


def _key_text(part: str) -> str:
    """The key a written key part stands for: unquoted, escapes decoded."""
    if part.startswith("'"):
        return part[1:-1]
    if part.startswith('"'):
        return next(iter(tomllib.loads(f"{part} = 0")))
    return part


@dataclasses.dataclass
class _Lines:
    """Line numbers (1-based) where the keys of a program document are written."""
    top: dict[str, int] = dataclasses.field(default_factory=dict)  # top-level key -> line
    tier_headers: list[int] = dataclasses.field(default_factory=list)  # k-th [[tiers]] -> line
    tier_keys: list[dict[str, int]] = dataclasses.field(default_factory=list)  # k-th tier's keys

    def top_line(self, key: str) -> int:
        return self.top.get(key, 0)

    def tier_line(self, k: int, key: str | None = None) -> int:
        """Line of ``key`` in tier k (0-based); its [[tiers]] header when key is None
        or not written there; the ``tiers =`` line for an inline array of tables."""
        if k >= len(self.tier_headers):
            return self.top_line("tiers")
        if key is None:
            return self.tier_headers[k]
        return self.tier_keys[k].get(key, self.tier_headers[k])


def _locate(text: str) -> _Lines:
    """Find where each key of an already valid TOML document is first written.

    Scans line by line (lines end at "\\n", as tomllib counts them). A line
    starts a statement unless it continues a multi-line string or a
    multi-line array/inline table (tracked by skipping strings and comments
    and counting brackets). A statement is a table header or ``key =`` /
    ``key.sub =``, the first key part bare, "quoted" or 'quoted'. The k-th
    ``[[tiers]]`` header opens tier k; keys up to the next header are that
    tier's. ``[tiers.x]`` after a tier is key x of the last tier; any other
    ``[x]``/``[[x]]`` header is top-level key x, and keys below it are not
    recorded. For ``tiers = [{...}, ...]`` only the ``tiers =`` line is known:
    problems inside an inline array are reported there.

    Not handled (positions may be off, never wrong results): keys inside
    inline tables (reported at the line of the key holding the table), and
    several statements' positions within one line (columns are not tracked).
    """
    lines = _Lines()
    context: dict[str, int] | None = lines.top  # where key lines go; None: ignored
    ml_quote: str | None = None  # the closing quote of an open multi-line string
    depth = 0  # open [ and { of values continued on the next lines
    for number, line in enumerate(text.split("\n"), start=1):
        if ml_quote is None and depth == 0:
            header = _HEADER_RE.match(line)
            key = None if header else _KEY_LINE_RE.match(line)
            if header:
                parts = [_key_text(p) for p in _KEY_PART_RE.findall(header.group(2))]
                is_array = header.group(1) == "[["
                if parts == ["tiers"] and is_array:
                    lines.top.setdefault("tiers", number)
                    lines.tier_headers.append(number)
                    lines.tier_keys.append({})
                    context = lines.tier_keys[-1]
                elif parts[0] == "tiers" and len(parts) > 1 and lines.tier_keys:
                    lines.tier_keys[-1].setdefault(parts[1], number)
                    context = None
                else:
                    lines.top.setdefault(parts[0], number)
                    context = None
            elif key and context is not None:
                context.setdefault(_key_text(key.group(1)), number)
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

def _toml_type(value: object) -> str:
    """A TOML type name for people, with an article."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                       (str, "a string"), (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return "a date or time"


def _bounds(low: int, high: int) -> str:
    return f"{low}..{'2**63-1' if high == layout.INT64_MAX else high}"


def _type_problem(key: str, value: object, kind: type) -> str | None:
    """Why value is not of TOML type kind (int, bool or str), or None if it is."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return None
    return f"{key} must be {_toml_type(kind())} (got {_toml_type(value)})"


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


def _check_tier(k: int, raw: dict, lines: _Lines, problems: list[tuple[int, str]]) -> Tier | None:
    """Check the k-th (0-based) tier table; the Tier, or None after adding its problems."""
    found = len(problems)
    name, rate_bp = raw.get("name"), raw.get("rate_bp")
    name_ok = (isinstance(name, str) and 1 <= len(name) <= MAX_TIER_NAME_LEN
               and name.isprintable())
    label = f"tier {name!r}" if name_ok else f"tier {k + 1}"
    for key in raw:
        if key not in _TIER_KEYS:
            problems.append((lines.tier_line(k, key),
                             f"{label}: unknown key {key!r} (known: {', '.join(_TIER_KEYS)})"))
    for key in _TIER_KEYS:
        if key not in raw and len(problems) == found:  # a misspelt key says more
            problems.append((lines.tier_line(k), f"{label}: missing {key}"))
    if "name" in raw and not name_ok:
        why = _type_problem("name", name, str)
        if why is None and not 1 <= len(name) <= MAX_TIER_NAME_LEN:
            why = f"name must be 1..{MAX_TIER_NAME_LEN} characters"
        elif why is None:
            why = f"name {name!r} has unprintable characters"
        problems.append((lines.tier_line(k, "name"), f"{label}: {why}"))
    if "rate_bp" in raw:
        why = _type_problem("rate_bp", rate_bp, int)
        if why is None and not 1 <= rate_bp <= _RATE_BP_MAX:
            why = f"rate_bp must be 1..{_RATE_BP_MAX}"
        if why is not None:
            problems.append((lines.tier_line(k, "rate_bp"), f"{label}: {why}"))
    return Tier(name, rate_bp) if len(problems) == found else None


def _check_tiers(data: dict, lines: _Lines, problems: list[tuple[int, str]]) -> tuple[Tier, ...]:
    if "tiers" not in data:
        return DEFAULT_PROGRAM.tiers
    raw, line = data["tiers"], lines.top_line("tiers")
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.append((line, f"tiers must be an array of tables (got {_toml_type(raw)})"))
        return ()
    if not raw:
        problems.append((line, f"no tiers (a program has 1..{layout.MAX_TIERS})"))
        return ()
    if len(raw) > layout.MAX_TIERS:
        problems.append((lines.tier_line(layout.MAX_TIERS),
                         f"too many tiers: {len(raw)} (at most {layout.MAX_TIERS})"))
    tiers: list[Tier] = []
    first_with_name: dict[str, int] = {}
    for k, table in enumerate(raw):
        tier = _check_tier(k, table, lines, problems)
        if tier is None:
            continue
        if tier.name in first_with_name:
            first = first_with_name[tier.name] + 1
            why = f"tier {k + 1}: duplicate tier name {tier.name!r} (also tier {first})"
            problems.append((lines.tier_line(k, "name"), why))
        first_with_name.setdefault(tier.name, k)
        tiers.append(tier)
    return tuple(tiers)


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
    for key in data:
        if key not in _TOP_KEYS:
            problems.append((lines.top_line(key),
                             f"unknown key {key!r} (known: {', '.join(_TOP_KEYS)})"))
    values: dict[str, object] = {}
    for key, kind, low, high in _SCALARS:
        if key not in data:
            continue
        value = data[key]
        why = _type_problem(key, value, kind)
        if why is None and high is not None and not low <= value <= high:
            why = f"{key} must be {_bounds(low, high)}"
        if why is None:
            values[key] = value
        else:
            problems.append((lines.top_line(key), why))
    tiers = _check_tiers(data, lines, problems)
    if problems:
        raise ProgramError(*min(problems, key=lambda p: p[0]))
    try:
        return Program(tiers=tiers, **values)
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
