"""Legacy import (rule 18): ``cardcore import FILE.csv`` against a real server, killed and
resumed; the import operation's checks over gRPC."""
from __future__ import annotations

import datetime
import os
import random
import re
import struct
import subprocess

import pytest

from cardcore import layout as L
from cardcore.lots import day_of
from cardcore.terminal import now_us
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from cardcore.v1.common_pb2 import OperatorRole as ROLE
from conftest import (bearer, journal_entries, new_card_number, operator_cli,
                      operator_cli_command, rid, verify)

HEADER = "number,principal,bonus,points,tier,name,phone,birthday,home_store"
PIN = "482916"


def good_row(rng: random.Random, number: str, i: int) -> tuple[str, tuple[int, int, int]]:
    principal, bonus, points = rng.randint(0, 5_000_000), rng.choice([0, rng.randint(1, 90_000)]), \
        rng.randint(0, 40_000)
    tier = rng.choice(["0", "1", "2", "gold", "Silver"])
    line = f"{number},{principal},{bonus},{points},{tier},Member {i},1380013{i:04d}," \
           f"19{rng.randint(50, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)},{i % 7}"
    return line, (principal, bonus, points)


def member_file(path: str, rows: int, existing: str, seed: int = 11):
    """A legacy member base of ``rows`` rows: every 200th bad (a reason each, and one row the
    card ``existing`` that is a card already, which only the server can tell). (good rows'
    numbers and figures by number, the bad rows' row numbers, the existing card's row number)."""
    rng = random.Random(seed)
    lines, good, bad = [HEADER], {}, []
    numbers = set()
    existing_row = 0
    bad_kinds = [
        lambda n: "12345,1,1,1,0,,,,",                                # too short a number
        lambda n: f"{n[:-1]}{(int(n[-1]) + 1) % 10},1,1,1,0,,,,",    # a wrong check digit
        lambda n: f"{n},-5,1,1,0,,,,",                               # negative money
        lambda n: f"{n},12.5,1,1,0,,,,",                             # yuan without --yuan
        lambda n: f"{n},1,1,1,platinum,,,,",                         # no such tier
        lambda n: f"{n},1,1,1,7,,,,",                                # nor this one
        lambda n: f"{n},1,1,1,0,Li,,1990-02-30,",                    # no such day
        lambda n: f"{n},1,1,1,0,Li,call me,,",                       # not a phone
        lambda n: f"{n},1,1",                                        # fields missing
        lambda n: f"{n},1,1,{1 << 63},0,,,,",                        # points past int64
    ]
    k = 0
    for i in range(rows):
        row_number = i + 2  # the header is row 1
        number = new_card_number(rng)
        while number in numbers or number == existing:
            number = new_card_number(rng)
        numbers.add(number)
        if i % 200 == 199:
            bad.append(row_number)
            if not existing_row:
                existing_row = row_number
                line, figures = good_row(rng, existing, i)
                lines.append(line)
                continue
            if k % 11 == 10:  # the number of a good row before it
                lines.append(good_row(rng, lines[2].split(",")[0], i)[0])
            else:
                lines.append(bad_kinds[k % 11 % len(bad_kinds)](number))
            k += 1
            continue
        line, figures = good_row(rng, number, i)
        lines.append(line)
        good[number] = figures
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return good, bad, existing_row


def summary_of(output: str) -> dict[str, str]:
    return dict(re.findall(r"^(imported|already imported|rejected|rows|principal|bonus|points)"
                           r"\s{2,}(.+)$", output, re.M))


def imports(data_dir: str) -> list[tuple]:
    return [e for e in journal_entries(data_dir) if e[1] == L.OP_IMPORT_CARD]


def test_an_import_of_10000_rows_killed_and_resumed_imports_each_good_row_once(server, client,
                                                                               tmp_path):
    """The ISSUE's test: 10,000 rows with 50 bad ones reported, the CLI killed with SIGKILL in
    the middle (a subprocess), then run again: every good row imported exactly once, the
    totals equal the file's, nothing twice on a third run, verify clean."""
    existing = new_card_number()
    client.open(existing)  # a card already, opened at a till before the import
    path = str(tmp_path / "members.csv")
    good, bad, existing_row = member_file(path, 10_000, existing)
    assert len(good) == 9_950 and len(bad) == 50
    argv, env = operator_cli_command(server, "import", path, "--chunk-rows", "200")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    done_before = 0
    for line in proc.stderr:  # the progress lines: kill it once 2,000 rows are in
        m = re.match(r"rows to \d+: ([\d,]+) imported", line)
        if m and int(m.group(1).replace(",", "")) >= 2_000:
            done_before = int(m.group(1).replace(",", ""))
            break
    assert proc.poll() is None and 2_000 <= done_before < 9_950, "killed mid-import"
    proc.kill()
    proc.wait(30)
    assert done_before <= len(imports(server.data_dir)) < len(good)

    code, out = operator_cli(server, "import", path, "--chunk-rows", "200", timeout_s=300)
    assert code == 1, out  # rows were rejected
    s = summary_of(out)
    assert s["rows"] == "10,000" and s["rejected"].startswith("50")
    # what the killed run imported (and the chunk it was sending, which may have landed) is
    # answered as replays; the rest is imported now
    imported = int(s["imported"].replace(",", ""))
    already = int(s["already imported"].split()[0].replace(",", ""))
    assert already >= done_before and imported > 0 and imported + already == len(good)
    for row in bad:  # each bad row reported by its row number, with a reason
        assert re.search(rf"^row {row}  .+  rejected: \S", out, re.M), row
    assert re.search(rf"^row {existing_row}  \S+  rejected: REASON_CARD_ALREADY_EXISTS", out, re.M)
    assert "the same as row 3's" in out and "an earlier run's" in out
    file_sums = [sum(f[k] for f in good.values()) for k in range(3)]
    for name, total in zip(("principal", "bonus"), file_sums[:2]):
        assert s[name].startswith(f"{total // 100:,}.{total % 100:02d} on the imported cards"), s
    assert s["points"].startswith(f"{file_sums[2]:,} on the imported cards")
    for number in good:
        assert number not in out  # never a clear number in a report
    # Exactly once: one import entry per good row, each card once, the file's figures in all.
    entries = imports(server.data_dir)
    assert len(entries) == len(good) and len({e[8] for e in entries}) == len(good)
    assert [sum(e[11 + k] for e in entries) for k in range(3)] == file_sums
    rng = random.Random(5)
    for number in rng.sample(sorted(good), 100):
        card = client.card(number)
        assert (card.balance.principal_minor, card.balance.bonus_minor, card.balance.points) == \
            good[number] and card.status == cpb.CARD_STATUS_ACTIVE
    assert client.card(existing).balance.principal_minor == 0  # untouched

    code, out = operator_cli(server, "import", path, "--chunk-rows", "5000", timeout_s=300)
    s = summary_of(out)
    assert code == 1 and s["imported"] == "0" and s["already imported"].startswith("9,950 ")
    assert len(imports(server.data_dir)) == len(good)
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def import_op(number: str, principal=100, bonus=0, points=0, tier=0, import_id="imp-test",
              **profile) -> pb.Operation:
    return pb.Operation(import_card=pb.ImportCardRequest(
        request_id=import_id, card=cpb.CardRef(card_number=number), principal_minor=principal,
        bonus_minor=bonus, points=points, tier=tier, profile=pb.MemberProfile(**profile),
        client_time_us=now_us()))


def batch(server, *ops, token=None):
    return server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=list(ops)),
                                   metadata=bearer(token) if token else None).results


def test_only_a_chain_admin_imports_and_bad_figures_change_nothing(server, admin):
    number = new_card_number()
    manager = admin.add_operator("li.manager", ROLE.OPERATOR_ROLE_REGION_MANAGER, [0, 1])
    assert [r.reason for r in batch(server, import_op(number))] == [cpb.REASON_UNAUTHENTICATED]
    assert [r.reason for r in batch(server, import_op(number), token=manager)] == \
        [cpb.REASON_PERMISSION_DENIED]
    token = server.admin_token
    refused = batch(server, import_op(number, principal=-1), import_op(number, bonus=-1),
                    import_op(number, points=-1), import_op(number, tier=3),
                    import_op(number, principal=L.INT64_MAX, bonus=1),
                    import_op(number, import_id="x" * 41),
                    import_op(number, birthday="1990-02-30"), token=token)
    assert [(r.reason, r.failure.field) for r in refused] == [
        (cpb.REASON_INVALID_AMOUNT, "principal_minor"), (cpb.REASON_INVALID_AMOUNT, "bonus_minor"),
        (cpb.REASON_INVALID_AMOUNT, "points"), (cpb.REASON_INVALID_TIER, "tier"),
        (cpb.REASON_INVALID_AMOUNT, "bonus_minor"), (cpb.REASON_INVALID_REQUEST_ID, "request_id"),
        (cpb.REASON_INVALID_ARGUMENT, "profile.birthday")]
    assert imports(server.data_dir) == []


def test_a_token_that_may_not_import_stops_at_the_first_chunk_with_one_message(server, admin,
                                                                              tmp_path):
    """A store manager's import is refused once, plainly, not row by row."""
    manager = admin.add_operator("wang.manager", ROLE.OPERATOR_ROLE_STORE_MANAGER, [1])
    path = tmp_path / "m.csv"
    member_file(str(path), 30, new_card_number())
    code, out = operator_cli(server, "import", str(path), "--chunk-rows", "10", token=manager)
    assert code == 2 and "may not import cards (REASON_PERMISSION_DENIED" in out, out
    assert "rejected" not in out and imports(server.data_dir) == []


def test_an_imported_card_holds_its_figures_its_points_in_one_lot_of_the_day_and_a_first_pin_at_the_till(
        server, admin, client):
    """Rule 18: an entry of its own with the figures, the points in today's lot, no PIN until
    a cashier vouches at a till; the same number again (another import, or an opening) is
    refused, and a replay answers the original under the row's request id."""
    number = new_card_number()
    token = server.admin_token
    op = import_op(number, principal=12_345, bonus=500, points=77, tier=2, name="Li Wei",
                   birthday="1990-03-04", home_store_id=3)
    first, again = batch(server, op, op, token=token)
    assert first.reason == cpb.REASON_OK and not first.replayed and again.replayed
    assert re.fullmatch(r"imp-test:[0-9a-f]{16}", first.request_id) and number not in first.request_id
    assert again.request_id == first.request_id and again.seq == first.seq
    assert (first.type, first.amount_minor, first.principal_delta_minor, first.bonus_delta_minor,
            first.points_earned, first.tier_after) == (cpb.OPERATION_TYPE_IMPORT_CARD, 12_345,
                                                       12_345, 500, 77, 2)
    card = client.card(number)
    assert (card.balance.principal_minor, card.balance.bonus_minor, card.balance.points,
            card.tier, card.profile.name) == (12_345, 500, 77, 2, "Li Wei")
    import_day = datetime.date(1970, 1, 1) + datetime.timedelta(days=day_of(first.applied_at_us))
    assert [(lot.earned_on, lot.points) for lot in card.points_lots] == \
        [(import_day.isoformat(), 77)]
    [other] = batch(server, import_op(number, import_id="imp-other"), token=token)
    assert other.reason == cpb.REASON_CARD_ALREADY_EXISTS
    till = admin.enroll(7, 3)
    cashier = bearer(admin.add_operator("wu.cashier", ROLE.OPERATOR_ROLE_CASHIER, [3]))
    assert server.stub.SetPin(till.set_pin(rid(), number, PIN), metadata=cashier).reason == \
        cpb.REASON_OK
    assert server.stub.Purchase(till.purchase(rid(), number, PIN, 10_000)).reason == cpb.REASON_OK
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


@pytest.mark.parametrize("header", ["number,principal,bonus,points", "number,principal,bonus,"
                                    "points,tier,email"])
def test_a_file_without_the_columns_is_refused_before_anything_is_sent(server, tmp_path, header):
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\n{new_card_number()},1,1,1\n")
    code, out = operator_cli(server, "import", str(path))
    assert code == 2 and "header row" in out and imports(server.data_dir) == []


def test_yuan_amounts_and_tier_names(server, client, tmp_path):
    """--yuan: principal and bonus in yuan with at most two decimals; a tier by its name in any
    case; the profile's columns may be left out."""
    number = new_card_number()
    path = tmp_path / "yuan.csv"
    path.write_text(f"\ufeffnumber,principal,bonus,points,tier\n{number},1234.5,0.07,12,GOLD\n"
                    f"{new_card_number()},1.234,0,0,gold\n", encoding="utf-8")
    code, out = operator_cli(server, "import", str(path), "--yuan")
    assert code == 1 and re.search(r"^row 3  .+  rejected: principal: not yuan", out, re.M), out
    card = client.card(number)
    assert (card.balance.principal_minor, card.balance.bonus_minor, card.balance.points,
            card.tier) == (123_450, 7, 12, 2)


def test_verify_finds_an_import_entry_that_is_not_a_card_opened_with_its_figures(server):
    """An import entry rewritten to move bonus past what it says it imported (its digests
    chained again, as a forger with the disk would) is reported by verify."""
    import lmdb

    from cardcore.chain import link

    [result] = batch(server, import_op(new_card_number(), principal=500, bonus=20),
                     token=server.admin_token)
    assert result.reason == cpb.REASON_OK
    server.stop()
    env = lmdb.open(os.path.join(server.data_dir, "ledger"), max_dbs=64)
    journal = env.open_db(b"journal", create=False)
    with env.begin(write=True, db=journal) as txn:
        items = list(txn.cursor())
        prev = items[result.seq - 2][1][L.JOURNAL_DIGEST_OFFSET:] if result.seq > 1 else bytes(32)
        for key, value in items[result.seq - 1:]:
            entry = bytearray(value)
            if L.SEQ_KEY.unpack(key)[0] == result.seq:  # its amount no longer its principal
                struct.pack_into("<q", entry, 32, 499)  # layout.JOURNAL amount_minor
            entry[L.JOURNAL_DIGEST_OFFSET:] = prev = link(prev, bytes(entry[:L.JOURNAL_DIGEST_OFFSET]))
            txn.put(key, bytes(entry))
    env.close()
    report = verify(server.data_dir)
    assert not report["ok"]
    assert any(f"journal entry {result.seq}: an import of 500 principal" in p
               for p in report["problems"]), report["problems"]
