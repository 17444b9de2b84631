"""``cardcore import FILE.csv``: a legacy member base brought in (rule 18), through the writer in
chunks of SubmitBatch, idempotent and resumable.

Every row becomes one ImportCardRequest whose request id the server makes from the import's id
(the file's SHA-256) and the card's keyed id, so a re-run of the same file, after a crash or a
kill, is answered from the request records (replays) and imports nothing twice; a card number
that is a card already (opened by other means, or by an import of another version of the file)
is refused by the writer. The client time of the first run is kept beside the file
(``FILE.import.json``), since a retry must repeat it. Rows are checked here first, with the
server's own checks (``operations.member_profile``, ``cards.number_ok``); a rejected row is
reported by its row number and reason, its card number masked, never in full.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys

from cardcore import layout as L

from .text import UsageError, fen, table

# The file's columns (a header row names them; the profile's four may be left out).
COLUMNS = ("number", "principal", "bonus", "points", "tier", "name", "phone", "birthday",
           "home_store")
REQUIRED = COLUMNS[:5]
ROWS_MAX = 1_000_000           # rows one file may hold
FIELD_CHARS_MAX = 256          # characters one field may hold (csv.field_size_limit)
CHUNK_ROWS_DEFAULT = 500       # rows one SubmitBatch carries (at most layout/server's 10,000)
CHUNK_ROWS_MAX = 10_000
FILE_BYTES_MAX = 512 << 20     # 512 MiB: a million rows of at most ~500 bytes
STATE_SUFFIX = ".import.json"
HASH_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(slots=True)
class Row:
    """A row that passed the checks here: what goes to the server."""
    line: int          # its row number in the file (the header is row 1)
    number: str
    principal_minor: int
    bonus_minor: int
    points: int
    tier: int
    profile: dict


def file_identity(path: str) -> str:
    """The file's SHA-256, hex: the import's identity (a changed file is another import)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def import_id_of(sha256_hex: str) -> str:
    """What each row's request id starts with (ImportCardRequest.request_id)."""
    return "imp-" + sha256_hex[:32]


def masked(number: str) -> str:
    """A row's card number as reports show it: masked, or nothing of it when it is no number."""
    from cardcore import cards  # (imported on use: the command line's start does not pay it)

    if number.isascii() and number.isdigit() and \
            cards.CARD_NUMBER_LEN_MIN <= len(number) <= cards.CARD_NUMBER_LEN_MAX:
        return cards.mask(number)
    return "(not a card number)"


def _whole(text: str, field: str, yuan: bool) -> int:
    """A non-negative amount: whole fen (or, with --yuan, yuan with at most two decimals) that
    fits int64, or points (always whole)."""
    text = text.strip()
    if yuan and field in ("principal", "bonus"):
        whole, _, frac = text.partition(".")
        if not (whole.isascii() and whole.isdigit()) or (
                frac and not (frac.isascii() and frac.isdigit() and len(frac) <= 2)):
            raise ValueError(f"{field}: not yuan with at most two decimals")
        value = int(whole) * 100 + int((frac + "00")[:2])
    else:
        if not (text.isascii() and text.isdigit()):
            unit = "points" if field == "points" else "fen (or give --yuan)"
            raise ValueError(f"{field}: not a whole number of {unit}, 0 or more")
        value = int(text)
    if value > L.INT64_MAX:
        raise ValueError(f"{field}: too large")
    return value


def check_row(fields: dict, line: int, tiers: dict, require_luhn: bool, yuan: bool) -> Row:
    """A row as the server will take it, or ValueError saying why not (never the number)."""
    from cardcore import cards
    from cardcore.server.errors import Invalid
    from cardcore.server.operations import member_profile
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    number = fields["number"].strip()
    if not cards.number_ok(number, require_luhn):
        raise ValueError("number: not 8 to 19 digits" + (" with a valid check digit"
                                                         if require_luhn else ""))
    principal = _whole(fields["principal"], "principal", yuan)
    bonus = _whole(fields["bonus"], "bonus", yuan)
    points = _whole(fields["points"], "points", yuan)
    if principal > L.INT64_MAX - bonus:
        raise ValueError("principal and bonus: too large together")
    tier_text = fields["tier"].strip()
    tier = tiers.get(tier_text.casefold())
    if tier is None:
        raise ValueError(f"tier: not a tier of the card program (an index from 0, or one of "
                         f"{_tier_names(tiers)})")
    home = (fields.get("home_store") or "").strip() or "0"
    if not (home.isascii() and home.isdigit()) or int(home) > 0xFFFFFFFF:
        raise ValueError("home_store: not a store id")
    try:
        profile = member_profile(pb.MemberProfile(
            name=(fields.get("name") or "").strip(), phone=(fields.get("phone") or "").strip(),
            birthday=(fields.get("birthday") or "").strip(), home_store_id=int(home)))
    except Invalid as exc:
        field = exc.field.removeprefix("profile.")
        raise ValueError(f"{field}: " + _PROFILE_PROBLEMS.get(
            (field, exc.reason == cpb.REASON_FIELD_TOO_LONG), "not valid")) from None
    return Row(line, number, principal, bonus, points, tier, profile)


_PROFILE_PROBLEMS = {("name", True): "more than 64 characters",
                    ("name", False): "not printable text",
                    ("phone", True): "more than 20 characters",
                    ("phone", False): "not digits, +, - and spaces",
                    ("birthday", False): "not a date YYYY-MM-DD"}


def _tier_names(tiers: dict) -> str:
    return ", ".join(k for k in tiers if not k.isdigit())


def read_rows(path: str, tiers: dict, require_luhn: bool, yuan: bool):
    """(good rows, rejected rows as (row number, masked number, reason), rows read). Rows past
    ROWS_MAX are refused as a whole: nothing is sent."""
    if os.path.getsize(path) > FILE_BYTES_MAX:
        raise UsageError(f"{path}: more than {FILE_BYTES_MAX >> 20} MiB (split the file)")
    csv.field_size_limit(FIELD_CHARS_MAX)
    good: list[Row] = []
    rejected: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}  # number -> the row that has it first (never printed)
    count = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise UsageError(f"{path}: empty (a header row naming the columns comes first: "
                             f"{','.join(COLUMNS)})") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: row 1: {exc}") from None
        unknown = [h for h in header if h not in COLUMNS]
        missing = [c for c in REQUIRED if c not in header]
        if unknown or missing or len(set(header)) != len(header):
            raise UsageError(f"{path}: the header row must name the columns {','.join(REQUIRED)} "
                             f"and may add {','.join(COLUMNS[5:])}, each once"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                             + (f" (missing: {', '.join(missing)})" if missing else ""))
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # a field past FIELD_CHARS_MAX, a bad quote
                count += 1
                rejected.append((line, "", f"not a CSV row ({exc})"))
                continue
            except UnicodeDecodeError:
                raise UsageError(f"{path}: row {line}: not UTF-8") from None
            if not values:
                continue  # a blank line
            count += 1
            if count > ROWS_MAX:
                raise UsageError(f"{path}: more than {ROWS_MAX:,} rows (split the file)")
            if len(values) != len(header):
                rejected.append((line, "", f"{len(values)} fields where the header has "
                                           f"{len(header)}"))
                continue
            fields = dict(zip(header, values))
            number = fields["number"].strip()
            try:
                row = check_row(fields, line, tiers, require_luhn, yuan)
            except ValueError as exc:
                rejected.append((line, masked(number), str(exc)))
                continue
            first = seen.setdefault(number, line)
            if first != line:
                rejected.append((line, masked(number), f"number: the same as row {first}'s"))
                continue
            good.append(row)
    return good, rejected, count


def _state(path: str, sha: str, given_us: int) -> tuple[int, str]:
    """The import's client time: --client-time-us, else the one kept for this file's content by
    an earlier run, else now (kept, durably, before anything is sent: a re-run must repeat
    it). (client time, where it came from)."""
    from cardcore.terminal import now_us

    state_path = path + STATE_SUFFIX
    if given_us:
        return given_us, "--client-time-us"
    try:
        with open(state_path) as f:
            kept = json.load(f)
        if kept.get("sha256") == sha and isinstance(kept.get("client_time_us"), int):
            return kept["client_time_us"], f"{state_path} (an earlier run's)"
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise UsageError(f"{state_path}: unreadable ({exc}): remove it, or give the earlier "
                         "run's --client-time-us") from None
    at_us = now_us()
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"sha256": sha, "client_time_us": at_us}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_path)
    return at_us, f"{state_path} (new)"


def _program_tiers(args) -> tuple[dict, bool]:
    """The current program's tiers (by index and by name, case-folded) and its Luhn rule."""
    from cardcore.program import ProgramError, parse_program
    from cardcore.v1 import admin_service_pb2 as apb

    from .cmd_client import admin_stub_of, call

    version = call(admin_stub_of(args).GetProgram, apb.GetProgramRequest(version=0), args)
    try:
        program = parse_program(version.document)
    except ProgramError as exc:  # the server's own document: not expected
        raise UsageError(f"the server's card program does not parse here: {exc}") from None
    tiers = {str(i): i for i in range(len(program.tiers))}
    tiers.update({t.name.casefold(): i for i, t in enumerate(program.tiers)})
    return tiers, program.require_luhn


def _caller_refusals() -> frozenset[int]:
    from cardcore.v1 import common_pb2 as cpb

    return frozenset((cpb.REASON_PERMISSION_DENIED, cpb.REASON_UNAUTHENTICATED))


CALLER_REFUSALS = _caller_refusals()  # reasons that are the caller's, never a row's


def cmd_import(args) -> int:
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb

    from .cmd_client import call, stub_of

    path = args.file
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    sha = file_identity(path)
    import_id = import_id_of(sha)
    tiers, require_luhn = _program_tiers(args)
    good, rejected, count = read_rows(path, tiers, require_luhn, args.yuan)
    at_us, kept_in = _state(path, sha, args.client_time_us)
    stub = stub_of(args)
    till = cpb.Till(store_id=args.store)
    imported = replayed = 0
    sums_file = [sum(r.principal_minor for r in good), sum(r.bonus_minor for r in good),
                 sum(r.points for r in good)]
    sums_in = [0, 0, 0]       # what the server holds for the rows it imported (its answers)
    sums_refused = [0, 0, 0]  # the good rows the server refused
    for start in range(0, len(good), args.chunk_rows):
        chunk = good[start:start + args.chunk_rows]
        ops = [pb.Operation(import_card=pb.ImportCardRequest(
            request_id=import_id, card=cpb.CardRef(card_number=r.number),
            principal_minor=r.principal_minor, bonus_minor=r.bonus_minor, points=r.points,
            tier=r.tier, profile=pb.MemberProfile(**r.profile), till=till,
            client_time_us=at_us)) for r in chunk]
        try:
            answer = call(stub.SubmitBatch, pb.SubmitBatchRequest(operations=ops), args)
        except SystemExit:
            print(f"cardcore import: stopped before row {chunk[0].line}: run the same command "
                  "again to go on (rows already imported are answered as such, never imported "
                  "twice)", file=sys.stderr)
            raise
        if start == 0 and all(r.reason in CALLER_REFUSALS for r in answer.results):
            # the caller's, not the rows': every row would be refused alike (nothing was applied)
            reason = answer.results[0].reason
            raise UsageError(
                f"this token may not import cards ({cpb.Reason.Name(reason)}: "
                + ("a chain admin's is needed" if reason == cpb.REASON_PERMISSION_DENIED
                   else "the server does not accept it") + "); nothing was imported")
        for row, result in zip(chunk, answer.results, strict=True):
            figures = (row.principal_minor, row.bonus_minor, row.points)
            if result.reason == cpb.REASON_OK:
                b = result.balance_after
                got = (b.principal_minor, b.bonus_minor, b.points)
                for k in range(3):
                    sums_in[k] += got[k]
                if result.replayed:
                    replayed += 1
                else:
                    imported += 1
                continue
            for k in range(3):
                sums_refused[k] += figures[k]
            why = cpb.Reason.Name(result.reason)
            if result.reason == cpb.REASON_CARD_ALREADY_EXISTS:
                why += ": the number is a card already (not opened by this file's import)"
            elif result.reason == cpb.REASON_DUPLICATE_REQUEST_MISMATCH:
                why += (": imported before by a run of this file with another client time "
                        "(give that run's --client-time-us)")
            elif result.failure.field:
                why += f" ({result.failure.field})"
            rejected.append((row.line, masked(row.number), why))
        print(f"rows to {chunk[-1].line}: {imported:,} imported, {replayed:,} already",
              file=sys.stderr, flush=True)
    rejected.sort()
    for line, shown, why in rejected:
        print(f"row {line}  {shown or '-'}  rejected: {why}")
    rows = [("file", f"{path} (sha256 {sha[:16]}...)"), ("import", import_id),
            ("client time", f"{at_us}  (a re-run repeats it: kept in {kept_in})"),
            ("rows", f"{count:,}"), ("imported", f"{imported:,}"),
            ("already imported", f"{replayed:,}  (by an earlier run: replayed)"),
            ("rejected", f"{len(rejected):,}" + ("  (listed above)" if rejected else ""))]
    equal = True
    for k, (name, show) in enumerate((("principal", fen), ("bonus", fen),
                                      ("points", lambda n: f"{n:,}"))):
        if sums_in[k] == sums_file[k]:
            verdict = "equal"
        elif sums_in[k] + sums_refused[k] == sums_file[k]:
            verdict = f"short by {show(sums_refused[k])}: the rows the server refused"
        else:
            verdict = "NOT EQUAL: the server holds other figures than the file's"
            equal = False
        rows.append((name, f"{show(sums_in[k])} on the imported cards, {show(sums_file[k])} in "
                           f"the file's good rows: {verdict}"))
    print(table(rows))
    if not equal:
        return 3
    return 1 if rejected else 0
