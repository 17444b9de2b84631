"""A card's history (``card_entries``, ``ListTransactions``) and receipts (``GetReceipt``):
through the ledger and over gRPC, newest first, paged, by type and time, from an index kept
with the journal."""
from __future__ import annotations

import grpc
import pytest

from cardcore import layout as L
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from cardcore.ledger import Ledger
from conftest import Client, failure_of, new_card_number, operator_cli, verify
from test_card_programs import CAFE_FOOD, cafe_ledger, line
from test_ledger import cid
from test_refunds import a_sale, seq_of
from test_service_programs import FOOD, purchase

R = cpb.Reason


@pytest.fixture
def till(tmp_path):
    with cafe_ledger(str(tmp_path / "cafe")) as t:
        yield t


def test_a_cards_history_pages_newest_first_by_type_and_time(till):
    """Three cards' entries interleaved; one card's history, 2 a page: newest first, only its
    own entries, every page continuing where the last stopped; by type (its purchases only)
    and by time (from the second sale on)."""
    number, other = "6225880000000530", "6225880000000531"
    till.open(number)
    till.open(other)
    till.top_up(number, 30000)
    sales = []
    for k in range(4):
        sales.append(seq_of(till.buy(number, line(CAFE_FOOD, 1000 + k))))
        till.top_up(other, 100)
    card = cid(number)
    seen, before = [], 0
    while True:
        page, before = till.ledger.read_history(card, before, 2)
        assert len(page) <= 2
        seen.extend(L.JOURNAL.unpack(entry)[7] for entry, _ in page)
        if not before:
            break
    journal = [L.JOURNAL.unpack(v) for _, v in till.ledger.dump()["journal"]]
    assert seen == sorted((e[7] for e in journal if e[8] == card), reverse=True)
    purchases, _ = till.ledger.read_history(card, 0, 10, types=frozenset({L.OP_PURCHASE}))
    assert [L.JOURNAL.unpack(e)[7] for e, _ in purchases] == sales[::-1]
    assert all(lines for _, lines in purchases)  # each with its lines
    second_at = next(e[17] for e in journal if e[7] == sales[1])
    later, _ = till.ledger.read_history(card, 0, 10, from_us=second_at,
                                        types=frozenset({L.OP_PURCHASE}))
    assert [L.JOURNAL.unpack(e)[7] for e, _ in later] == sales[:0:-1]


def test_a_ledger_made_before_the_history_index_gets_it_from_its_journal(till):
    number = "6225880000000532"
    a_sale(till, number)
    before, _ = till.ledger.read_history(cid(number), 0, 10)
    path = till.ledger.path
    with till.ledger.env.begin(write=True) as txn:
        txn.drop(till.ledger.card_entries, delete=True)
    till.ledger.close()
    till.ledger = Ledger(path)
    assert till.ledger.read_history(cid(number), 0, 10)[0] == before


def test_history_and_receipts_over_grpc(cafe):
    """Over gRPC (the cafe server, development mode): a card's history newest first with each
    entry's till, by type, paged; a receipt of the sale with its lines and the masked number;
    a receipt of another card's entry refused; a page size past 100 refused."""
    client = Client(cafe.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 30000)
    sale = cafe.stub.Purchase(purchase(number, (FOOD, 1200, 2, "SKU-9")))
    other = new_card_number()
    client.open(other)
    ref = cpb.CardRef(card_number=number)
    page = cafe.stub.ListTransactions(pb.ListTransactionsRequest(card=ref, page_size=2))
    assert [e.type for e in page.entries] == [cpb.OPERATION_TYPE_PURCHASE,
                                              cpb.OPERATION_TYPE_TOP_UP]
    assert page.entries[0].seq == sale.seq and page.entries[0].till.staff_id == 9
    assert page.next_before_seq
    rest = cafe.stub.ListTransactions(pb.ListTransactionsRequest(
        card=ref, page_size=2, before_seq=page.next_before_seq))
    assert [e.type for e in rest.entries] == [cpb.OPERATION_TYPE_OPEN_CARD]
    assert rest.next_before_seq == 0
    only = cafe.stub.ListTransactions(pb.ListTransactionsRequest(
        card=ref, types=[cpb.OPERATION_TYPE_TOP_UP]))
    assert [e.type for e in only.entries] == [cpb.OPERATION_TYPE_TOP_UP]
    receipt = cafe.stub.GetReceipt(pb.GetReceiptRequest(card=ref, seq=sale.seq))
    assert receipt.result.seq == sale.seq and receipt.result.paid_minor == sale.paid_minor
    assert [(x.sku, x.quantity) for x in receipt.result.lines] == [("SKU-9", 2)]
    assert receipt.masked_number == number[:6] + "*" * (len(number) - 10) + number[-4:]
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.GetReceipt(pb.GetReceiptRequest(card=cpb.CardRef(card_number=other),
                                                  seq=sale.seq))
    assert failure_of(err.value).reason == R.REASON_ORIGINAL_NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.ListTransactions(pb.ListTransactionsRequest(card=ref, page_size=101))
    assert failure_of(err.value).field == "page_size"
    report = verify(cafe.data_dir)
    assert report["ok"], report["problems"]


def test_the_cli_refunds_reverses_changes_status_and_lists_history(server):
    """`cardcore refund`, `reverse`, `card-status` and `history`, as an operator uses them."""
    def cli(*args):
        return operator_cli(server, *args)

    number = new_card_number()
    assert cli("open-card", number)[0] == 0
    assert cli("top-up", number, "500")[0] == 0
    rc, out = cli("purchase", number, "120", "--request-id", "cli-sale")
    assert rc == 0
    sale = int(out.split("journal seq")[1].split()[0])
    rc, out = cli("refund", number, str(sale), "--amount", "20", "--request-id", "cli-refund")
    assert rc == 0 and "given back    20.00" in out and f"of entry      {sale}" in out
    # its answer names the client time, so the clerk's retry (the answer lost) can repeat it
    at = out.split("client time")[1].split()[0]
    again = cli("refund", number, str(sale), "--amount", "20", "--request-id", "cli-refund",
                "--client-time-us", at)
    assert again[0] == 0 and again[1].split("journal seq")[1].split()[0] == \
        out.split("journal seq")[1].split()[0]
    rc, out = cli("refund", number, str(sale), "--line", "1")
    assert rc == 1 and "INVALID_ARGUMENT" in out  # a sale without lines
    basket = server.stub.Purchase(purchase(number, (0, 1000, 1, "TEA"), (0, 2500, 1, "CAKE")))
    rc, out = cli("refund", number, str(basket.seq), "--line", "2")
    assert rc == 0 and "given back    25.00" in out and "line 2" in out and "CAKE" in out
    rc, out = cli("card-status", number, "frozen")
    assert rc == 0 and "status       frozen" in out
    rc, out = cli("card-status", number, "frozen")
    assert rc == 1 and "the card is frozen" in out
    rc, out = cli("history", number, "--type", "refund")
    assert rc == 0 and "refund" in out and "purchase" not in out
    rc, out = cli("history", number, "--limit", "2")
    assert rc == 0 and "card_status_changed" in out and "more: --before" in out
