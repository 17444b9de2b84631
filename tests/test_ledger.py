"""The ledger over real LMDB in a temp folder, below the gRPC layer."""
from __future__ import annotations

import os

import pytest

from cardcore import cards
from cardcore import layout as L
from cardcore.ledger import Ledger, PendingOp
from cardcore.rules import DEFAULT_PROGRAM
from conftest import new_card_number

KEY = bytes(range(32))


def cid(number: str) -> bytes:
    return cards.card_id(KEY, number)


def open_op(request_id: str, number: str, tier: int = 0) -> PendingOp:
    return PendingOp.build(request_id.encode(), L.OP_OPEN, cid(number), tier=tier, profile=b"{}")


def op(request_id: str, kind: int, number: str, amount: int) -> PendingOp:
    return PendingOp.build(request_id.encode(), kind, cid(number), amount, store_id=3)


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(str(tmp_path / "ledger"), DEFAULT_PROGRAM, sync=True)
    yield led
    led.close()


def test_a_group_applies_in_order_and_answers_repeats_inside_it(ledger):
    n = new_card_number()
    outcomes = ledger.apply_group([
        open_op("o", n), op("t", L.OP_TOP_UP, n, 1_000), op("p", L.OP_PURCHASE, n, 400),
        op("p", L.OP_PURCHASE, n, 400), op("p", L.OP_PURCHASE, n, 401)], ts_us=123)
    assert [o.reason for o in outcomes] == [0, 0, 0, 0, L.R_DUPLICATE_REQUEST_MISMATCH]
    assert [o.replayed for o in outcomes] == [False, False, False, True, False]
    assert outcomes[3].entry == outcomes[2].entry
    assert ledger.next_seq == 4
    assert ledger.read_card(cid(n))[0][5] == 600
    assert ledger.verify()["ok"]


def test_the_map_grows_instead_of_failing(tmp_path):
    led = Ledger(str(tmp_path / "small"), DEFAULT_PROGRAM, sync=False, map_size=256 << 10)
    numbers = [new_card_number() for _ in range(3_000)]
    for start in range(0, len(numbers), 500):
        chunk = numbers[start:start + 500]
        outcomes = led.apply_group([open_op(f"o{start + i}", n) for i, n in enumerate(chunk)], 1)
        assert all(o.reason == 0 for o in outcomes)
    assert led.env.info()["map_size"] > 256 << 10
    report = led.verify()
    assert report["ok"] and report["cards"] == 3_000
    led.close()


def test_next_sequence_comes_from_the_journal_after_reopening(tmp_path):
    path = str(tmp_path / "l")
    led = Ledger(path, DEFAULT_PROGRAM)
    n = new_card_number()
    led.apply_group([open_op("a", n), op("b", L.OP_TOP_UP, n, 5)], 1)
    led.close()
    led = Ledger(path, DEFAULT_PROGRAM)
    assert led.next_seq == 3
    assert led.read_operation(b"b").entry[8:16] == (2).to_bytes(8, "little")
    led.close()


def tamper(ledger: Ledger, db, key: bytes, offset: int, value: bytes) -> None:
    with ledger.env.begin(write=True, db=db) as txn:
        raw = bytearray(txn.get(key))
        raw[offset:offset + len(value)] = value
        txn.put(key, bytes(raw))


def forge(ledger: Ledger, cid_: bytes, seq: int, offset: int, value: int) -> None:
    """Change one i64 field of a journal entry and carry it through the later entries and the
    card record, so every running sum still agrees: only the entry's meaning is wrong."""
    delta = value - int.from_bytes(ledger.env.begin(db=ledger.journal).get(L.SEQ_KEY.pack(seq))[
        offset:offset + 8], "little", signed=True)
    with ledger.env.begin(write=True) as txn:
        raw = bytearray(txn.get(L.SEQ_KEY.pack(seq), db=ledger.journal))
        raw[offset:offset + 8] = value.to_bytes(8, "little", signed=True)
        txn.put(L.SEQ_KEY.pack(seq), bytes(raw), db=ledger.journal)
        if offset == 48:  # principal delta: shift every later principal-after and the card
            for later in range(seq, ledger.next_seq):
                e = bytearray(txn.get(L.SEQ_KEY.pack(later), db=ledger.journal))
                after = int.from_bytes(e[72:80], "little", signed=True) + delta
                e[72:80] = after.to_bytes(8, "little", signed=True)
                txn.put(L.SEQ_KEY.pack(later), bytes(e), db=ledger.journal)
            rec = bytearray(txn.get(cid_, db=ledger.cards))
            rec[8:16] = (int.from_bytes(rec[8:16], "little", signed=True) + delta).to_bytes(8, "little", signed=True)
            txn.put(cid_, bytes(rec), db=ledger.cards)


@pytest.mark.parametrize("seq,offset,value,what", [
    (1, 48, 1_000_000_000, "an opening that mints principal"),
    (2, 48, 5_000, "a top-up of 1,000 that adds 5,000"),
    (3, 40, 101, "a discount larger than the gross"),
])
def test_verify_finds_entries_that_add_up_but_mean_the_wrong_thing(ledger, seq, offset, value, what):
    n = new_card_number()
    ledger.apply_group([open_op("o", n), op("t", L.OP_TOP_UP, n, 1_000),
                        op("p", L.OP_PURCHASE, n, 100)], 1)
    forge(ledger, cid(n), seq, offset, value)
    report = ledger.verify()
    assert not report["ok"], what


@pytest.mark.parametrize("what", ["balance", "journal delta", "journal gap", "request record"])
def test_verify_finds_a_ledger_that_does_not_add_up(ledger, what):
    n = new_card_number()
    ledger.apply_group([open_op("o", n), op("t", L.OP_TOP_UP, n, 1_000),
                        op("p", L.OP_PURCHASE, n, 100)], 1)
    assert ledger.verify()["ok"]
    if what == "balance":
        tamper(ledger, ledger.cards, cid(n), 8, (1_001).to_bytes(8, "little"))
    elif what == "journal delta":
        tamper(ledger, ledger.journal, L.SEQ_KEY.pack(2), 48, (999).to_bytes(8, "little"))
    elif what == "journal gap":
        with ledger.env.begin(write=True, db=ledger.journal) as txn:
            txn.delete(L.SEQ_KEY.pack(2))
    else:
        tamper(ledger, ledger.requests, b"p", 24, (2).to_bytes(8, "little"))
    report = ledger.verify()
    assert not report["ok"] and report["problems"]


def test_no_card_number_reaches_the_data_file(tmp_path):
    path = str(tmp_path / "l")
    led = Ledger(path, DEFAULT_PROGRAM)
    numbers = [new_card_number() for _ in range(50)]
    led.apply_group([open_op(f"o{i}", n) for i, n in enumerate(numbers)], 1)
    led.close()
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        data = f.read()
    assert not [n for n in numbers if n.encode() in data or n[-10:].encode() in data]


def test_a_failing_group_writes_nothing(ledger, monkeypatch):
    n = new_card_number()
    ledger.apply_group([open_op("o", n)], 1)
    from cardcore import ledger as ledger_module

    def broken(*args):
        raise ValueError("card record breaks an invariant")

    monkeypatch.setattr(ledger_module.kernel, "apply_batch", broken)
    with pytest.raises(ValueError):
        ledger.apply_group([op("t", L.OP_TOP_UP, n, 5)], 1)
    monkeypatch.undo()
    assert ledger.read_operation(b"t") is None and ledger.next_seq == 2
    with ledger.env.begin() as txn:
        assert txn.stat(ledger.journal)["entries"] == 1
