"""PINs, terminals, operators and card encryption end to end: real server, real keys, real TLS."""
from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys

import grpc
import pytest

from cardcore.terminal import now_us
from cardcore import layout as L
from cardcore.server import certs
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, Client, bearer, failure_of, journal_entries, new_card_number, rid,
                      tls_channel, verify)

R = cpb.Reason
ROLE = cpb.OperatorRole
PIN, OTHER_PIN, NEW_PIN = "482916", "735102", "604813"


def reason_of(call, *args, **kwargs) -> int:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return failure_of(err).reason
    return R.REASON_OK


@pytest.fixture
def till(admin):
    """Terminal 7 at store 3, enrolled."""
    return admin.enroll(7, 3)


def pin_card(server, terminal, pin=PIN, funds_minor=100_000) -> str:
    """A card opened at ``terminal`` with a first PIN, and topped up."""
    number = new_card_number()
    server.stub.OpenCard(terminal.open_card(rid(), number, pin))
    server.stub.TopUp(terminal.top_up(rid(), number, funds_minor))
    return number


def card_state(client: Client, number: str) -> tuple[int, bool, int]:
    card = client.card(number)
    return card.pin_tries, card.pin_locked, card.balance.available_minor


# ---- the PIN on the swipe ----------------------------------------------------------------

def test_right_pin_pays_and_wrong_pins_lock_after_three(server, client, till):
    number = pin_card(server, till)
    paid = server.stub.Purchase(till.purchase(rid(), number, PIN, 1_000))
    assert paid.reason == R.REASON_OK and paid.balance_after.available_minor == 99_000

    for tries_left in (2, 1, 0):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Purchase(till.purchase(rid(), number, OTHER_PIN, 1_000))
        fail = failure_of(err.value)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (fail.reason, fail.pin_tries_left) == (R.REASON_PIN_WRONG, tries_left)
    assert card_state(client, number) == (3, True, 99_000)  # locked; the money stays

    # The right PIN after the lock is refused without being checked.
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, PIN, 1_000)) == R.REASON_PIN_LOCKED
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, None, 1_000)) == R.REASON_PIN_LOCKED
    assert card_state(client, number) == (3, True, 99_000)
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_a_right_pin_resets_the_count_and_a_missing_pin_is_refused(server, client, till):
    number = pin_card(server, till)
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, OTHER_PIN, 100)) == R.REASON_PIN_WRONG
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, OTHER_PIN, 100)) == R.REASON_PIN_WRONG
    server.stub.Purchase(till.purchase(rid(), number, PIN, 100))
    assert card_state(client, number)[:2] == (0, False)
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, None, 100)) == R.REASON_PIN_REQUIRED
    # A clear card number cannot pay for a card that has a PIN, even in development mode.
    assert reason_of(client.purchase, number, 100) == R.REASON_PIN_REQUIRED


def test_reset_by_a_store_manager_unlocks_with_a_new_pin(server, client, admin, till):
    number = pin_card(server, till)
    for _ in range(3):
        reason_of(server.stub.Purchase, till.purchase(rid(), number, OTHER_PIN, 100))
    assert card_state(client, number)[:2] == (3, True)
    manager = admin.add_operator("li.manager", ROLE.OPERATOR_ROLE_STORE_MANAGER, [3])
    cashier = admin.add_operator("wu.cashier", ROLE.OPERATOR_ROLE_CASHIER, [3])
    other_store = admin.add_operator("zhao.manager", ROLE.OPERATOR_ROLE_STORE_MANAGER, [4])

    reset = till.reset_pin(rid(), number, NEW_PIN)
    assert reason_of(server.stub.ResetPin, reset) == R.REASON_UNAUTHENTICATED
    assert reason_of(server.stub.ResetPin, till.reset_pin(rid(), number, NEW_PIN),
                     metadata=bearer(cashier)) == R.REASON_PERMISSION_DENIED
    assert reason_of(server.stub.ResetPin, till.reset_pin(rid(), number, NEW_PIN),
                     metadata=bearer(other_store)) == R.REASON_PERMISSION_DENIED
    assert reason_of(server.stub.ResetPin, till.reset_pin(rid(), number, NEW_PIN),
                     metadata=bearer("cc_not-a-token")) == R.REASON_UNAUTHENTICATED
    done = server.stub.ResetPin(till.reset_pin(rid(), number, NEW_PIN), metadata=bearer(manager))
    assert done.type == cpb.OPERATION_TYPE_RESET_PIN
    assert card_state(client, number)[:2] == (0, False)
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, PIN, 100)) == R.REASON_PIN_WRONG
    assert server.stub.Purchase(till.purchase(rid(), number, NEW_PIN, 100)).reason == R.REASON_OK

    # The reset is journaled with the manager's operator id.
    manager_id = next(o.operator_id for o in admin.stub.ListOperators(
        apb.ListOperatorsRequest(), metadata=admin.metadata).operators if o.name == "li.manager")
    resets = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_RESET_PIN]
    assert len(resets) == 1 and resets[0][21] == manager_id
    assert verify(server.data_dir)["ok"]


def test_set_and_change_pin(server, client, admin, till):
    cashier = bearer(admin.add_operator("wu.cashier", ROLE.OPERATOR_ROLE_CASHIER, [3]))
    elsewhere = bearer(admin.add_operator("ma.cashier", ROLE.OPERATOR_ROLE_CASHIER, [4]))
    number = new_card_number()
    server.stub.OpenCard(till.open_card(rid(), number))  # no PIN yet
    server.stub.TopUp(till.top_up(rid(), number, 5_000))
    assert reason_of(server.stub.Purchase, till.purchase(rid(), number, PIN, 100)) == R.REASON_PIN_NOT_SET
    for weak in ("1234", "9876", "000000", "111111"):
        assert reason_of(server.stub.SetPin, till.set_pin(rid(), number, weak),
                         metadata=cashier) == R.REASON_PIN_WEAK
    # A first PIN needs a cashier of this store at the till, vouching for the member.
    assert reason_of(server.stub.SetPin, till.set_pin(rid(), number, PIN)) == R.REASON_OPERATOR_REQUIRED
    assert reason_of(server.stub.SetPin, till.set_pin(rid(), number, PIN),
                     metadata=elsewhere) == R.REASON_PERMISSION_DENIED
    server.stub.SetPin(till.set_pin(rid(), number, PIN), metadata=cashier)
    assert reason_of(server.stub.SetPin, till.set_pin(rid(), number, NEW_PIN)) == R.REASON_PIN_REQUIRED
    assert reason_of(server.stub.SetPin, till.set_pin(rid(), number, NEW_PIN, OTHER_PIN)) == R.REASON_PIN_WRONG
    server.stub.SetPin(till.set_pin(rid(), number, NEW_PIN, PIN))
    assert card_state(client, number)[:2] == (0, False)  # the right old PIN cleared the wrong try
    assert server.stub.Purchase(till.purchase(rid(), number, NEW_PIN, 100)).reason == R.REASON_OK


def test_50_concurrent_wrong_pins_count_exactly_up_to_the_limit(server, client, admin):
    """Ten terminals, five pipelined guesses each, all at once: three are checked, the rest are
    refused as locked without a check, and the journal holds exactly three PIN failures."""
    terminals = [admin.enroll(100 + i, 3) for i in range(10)]
    number = pin_card(server, terminals[0])

    async def guesses(terminal) -> list[int]:
        async with server.aio_channel() as channel:
            stub = pb_grpc.CardServiceStub(channel)
            ops = [pb.Operation(purchase=terminal.purchase(rid(), number, OTHER_PIN, 100))
                   for _ in range(5)]
            return [r.reason async for r in stub.SwipeStream(iter(ops))]

    async def run():
        return await asyncio.gather(*(guesses(t) for t in terminals))

    reasons = [r for rs in asyncio.run(run()) for r in rs]
    assert sorted(reasons).count(R.REASON_PIN_WRONG) == 3
    assert reasons.count(R.REASON_PIN_LOCKED) == 47
    assert card_state(client, number) == (3, True, 100_000)
    failed = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_PIN_FAILED]
    assert [e[5] for e in failed] == [1, 2, 3]  # tries after each counted failure
    assert verify(server.data_dir)["ok"]


# ---- what a terminal sends ----------------------------------------------------------------

def test_pin_block_bound_to_another_card_is_refused_and_not_counted(server, client, till):
    number, other = pin_card(server, till), new_card_number()
    ksn_ref, pin_key = till.secure(number)
    from cardcore import pin as pinlib

    request = pb.PurchaseRequest(client_time_us=now_us(), request_id=rid(), card=ksn_ref, gross_amount_minor=100, till=till.till(),
                                 pin_block=pinlib.encipher(pin_key, PIN, other))
    assert reason_of(server.stub.Purchase, request) == R.REASON_PIN_BLOCK_INVALID
    assert card_state(client, number) == (0, False, 100_000)


def test_tampered_card_data_is_refused(server, till):
    number = pin_card(server, till)
    request = till.purchase(rid(), number, PIN, 100)
    blob = bytearray(request.card.secure.encrypted_card)
    blob[14] ^= 1
    request.card.secure.encrypted_card = bytes(blob)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Purchase(request)
    assert failure_of(err.value).reason == R.REASON_CARD_DATA_INVALID
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_replayed_ksn_is_refused_before_and_after_a_restart(start_server, tmp_path):
    server = start_server()
    terminal = Admin(server.channel, server.admin_token).enroll(7, 3)
    number = pin_card(server, terminal)
    captured = terminal.purchase(rid(), number, PIN, 100)   # counter n, not sent yet
    later = terminal.purchase(rid(), number, PIN, 100)      # counter n + 1
    server.stub.Purchase(later)
    assert reason_of(server.stub.Purchase, captured) == R.REASON_KSN_REPLAYED
    replay = pb.PurchaseRequest(client_time_us=now_us())
    replay.CopyFrom(later)
    replay.request_id = rid()  # same KSN, new request id
    assert reason_of(server.stub.Purchase, replay) == R.REASON_KSN_REPLAYED
    server.stop()
    server = start_server()  # memory is gone; the ledger's counter is not
    assert reason_of(server.stub.Purchase, captured) == R.REASON_KSN_REPLAYED
    assert reason_of(server.stub.Purchase, replay) == R.REASON_KSN_REPLAYED
    assert Client(server.stub).card(number).balance.available_minor == 99_900


def test_ksn_of_another_terminal_and_revoked_terminals_are_refused(server, admin, till):
    number = pin_card(server, till)
    other = admin.enroll(8, 3)
    request = other.purchase(rid(), number, PIN, 100)
    request.till.terminal_id = 7  # claims to be terminal 7 with terminal 8's keys
    assert reason_of(server.stub.Purchase, request) == R.REASON_TERMINAL_UNKNOWN
    request = other.purchase(rid(), number, PIN, 100)
    request.till.store_id = 4  # terminal 8 belongs to store 3
    assert reason_of(server.stub.Purchase, request) == R.REASON_TERMINAL_MISMATCH
    admin.stub.RevokeTerminal(apb.RevokeTerminalRequest(client_time_us=now_us(), request_id=rid(), terminal_id=8),
                              metadata=admin.metadata)
    assert reason_of(server.stub.Purchase, other.purchase(rid(), number, PIN, 100)) == R.REASON_TERMINAL_REVOKED
    assert server.stub.Purchase(till.purchase(rid(), number, PIN, 100)).reason == R.REASON_OK
    revoked = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_TERMINAL_REVOKED]
    assert len(revoked) == 1 and int.from_bytes(revoked[0][8][:4], "little") == 8


def test_card_enumeration_from_one_terminal_hits_the_rate_limit(start_server):
    server = start_server("--failures-per-minute", "5")
    admin = Admin(server.channel, server.admin_token)
    prober, honest = admin.enroll(7, 3), admin.enroll(8, 3)
    number = pin_card(server, honest)
    reasons = [reason_of(server.stub.GetCard, prober.get_card(new_card_number())) for _ in range(5)]
    assert reasons == [R.REASON_CARD_NOT_FOUND] * 5
    # The sixth probe, even of a real card with the right PIN, is refused unchecked.
    assert reason_of(server.stub.GetCard, prober.get_card(number)) == R.REASON_RATE_LIMITED
    assert reason_of(server.stub.Purchase, prober.purchase(rid(), number, PIN, 100)) == R.REASON_RATE_LIMITED
    # Other terminals are not affected; with the card's PIN a terminal sees the balance.
    assert server.stub.GetCard(honest.get_card(number, PIN)).balance.available_minor == 100_000


# ---- operators -----------------------------------------------------------------------------

def test_operators_act_only_within_their_role_and_scope(server, admin):
    region = Admin(server.channel, admin.add_operator("east", ROLE.OPERATOR_ROLE_REGION_MANAGER, [3, 4]))
    manager = Admin(server.channel, admin.add_operator("s3", ROLE.OPERATOR_ROLE_STORE_MANAGER, [3]))
    region.enroll(30, 3)
    with pytest.raises(grpc.RpcError) as err:
        region.enroll(50, 5)  # store 5 is outside the region
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        manager.enroll(31, 3)  # enrolling needs a region manager
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        region.add_operator("boss", ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        region.add_operator("peer", ROLE.OPERATOR_ROLE_REGION_MANAGER, [3])  # not above itself
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        admin.add_operator("scoped.admin", ROLE.OPERATOR_ROLE_CHAIN_ADMIN, [3])  # admins are chain-wide
    assert (failure_of(err.value).reason, failure_of(err.value).field) == (R.REASON_INVALID_ARGUMENT,
                                                                           "store_ids")
    cashier = region.add_operator("c3", ROLE.OPERATOR_ROLE_CASHIER, [3])
    listed = manager.stub.ListTerminals(apb.ListTerminalsRequest(), metadata=manager.metadata)
    assert [t.terminal_id for t in listed.terminals] == [30]
    region.stub.RemoveOperator(apb.RemoveOperatorRequest(client_time_us=now_us(), request_id=rid(), name="c3"),
                               metadata=region.metadata)
    with pytest.raises(grpc.RpcError) as err:
        Admin(server.channel, cashier).stub.ListTerminals(apb.ListTerminalsRequest(),
                                                          metadata=bearer(cashier))
    assert failure_of(err.value).reason == R.REASON_UNAUTHENTICATED  # removed: token dead
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.ListTerminals(apb.ListTerminalsRequest())  # no token at all
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    added = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_OPERATOR_ADDED]
    assert [e[21] for e in added] == [0, 1, 1, 2]  # bootstrap (system), then admin 1, then east (2)
    enrolled = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_TERMINAL_ENROLLED]
    assert [e[21] for e in enrolled] == [2]
    assert verify(server.data_dir)["ok"]


def test_a_lost_enrolment_answer_is_given_again_until_the_terminal_transacts(server, admin):
    from cardcore.terminal import Terminal, TerminalKeys

    request = apb.EnrollTerminalRequest(client_time_us=now_us(), request_id=rid(), terminal_id=9, store_id=3)
    first = admin.stub.EnrollTerminal(request, metadata=admin.metadata)
    again = admin.stub.EnrollTerminal(request, metadata=admin.metadata)  # a retry: the answer was lost
    assert len(first.initial_key) == 16 and again.initial_key == first.initial_key
    terminal = Terminal(TerminalKeys(9, 3, again.initial_key, again.terminal.initial_key_id))
    server.stub.OpenCard(terminal.open_card(rid(), new_card_number(), PIN))
    late = admin.stub.EnrollTerminal(request, metadata=admin.metadata)  # it has transacted since
    assert late.initial_key == b"" and late.terminal.last_ksn_counter == 1
    with pytest.raises(grpc.RpcError) as err:
        admin.enroll(9, 3)  # a new request for the same terminal
    assert failure_of(err.value).reason == R.REASON_TERMINAL_EXISTS


# ---- keys and secrets at rest --------------------------------------------------------------

def keys_check(data_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cardcore.server.cli", "keys", "check",
                           "--data-dir", data_dir], capture_output=True, text=True, timeout=60)


def test_key_rotation_keeps_every_card_readable_and_every_pin_valid(start_server):
    server = start_server()
    admin = Admin(server.channel, server.admin_token)
    till = admin.enroll(7, 3)
    numbers = [pin_card(server, till, funds_minor=1_000) for _ in range(30)]
    before = keys_check(server.data_dir)
    assert before.returncode == 0 and "v1: 30" in before.stdout
    keyring_path = os.path.join(server.data_dir, "keyring.json")
    with open(keyring_path) as f:
        from_before = f.read()
    resp = admin.stub.RotateDataKey(apb.RotateDataKeyRequest(client_time_us=now_us(), request_id=rid()), metadata=admin.metadata)
    assert (resp.key_version, resp.cards_resealed) == (2, 30)
    after = keys_check(server.data_dir)
    assert after.returncode == 0 and "v2: 30" in after.stdout and "v1" not in after.stdout
    for number in numbers[:5]:
        assert server.stub.Purchase(till.purchase(rid(), number, PIN, 100)).reason == R.REASON_OK
    # its file changed under it (another process rotated, or a copy put back): no rotation
    # saves over it
    with open(keyring_path) as f:
        rotated_file = f.read()
    with open(keyring_path, "w") as f:
        f.write(from_before)
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.RotateDataKey(apb.RotateDataKeyRequest(client_time_us=now_us(),
                                                          request_id=rid()),
                                 metadata=admin.metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "changed since" in failure_of(err.value).detail
    with open(keyring_path) as f:
        assert f.read() == from_before  # nothing saved over it
    server.stop()
    # the keyring restored from before the rotation: the server refuses to start on it
    stale = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure",
                            "--data-dir", server.data_dir, "--listen", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60)
    assert stale.returncode == 2 and "is behind the ledger" in stale.stderr, stale.stderr
    with open(keyring_path, "w") as f:
        f.write(rotated_file)
    server = start_server()  # the rotated keyring is read back
    assert server.stub.Purchase(till.purchase(rid(), numbers[-1], PIN, 100)).reason == R.REASON_OK
    rotated = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_DATA_KEY_ROTATED]
    assert len(rotated) == 1 and rotated[0][21] == 1
    # A damaged sealed number is found by the check.
    from cardcore.ledger import Ledger

    server.stop()
    ledger = Ledger(os.path.join(server.data_dir, "ledger"))
    with ledger.env.begin(write=True) as txn:
        cid, sealed = next(iter(txn.cursor(db=ledger.cardnos)))
        txn.put(cid, sealed[:-1] + bytes([sealed[-1] ^ 1]), db=ledger.cardnos)
    ledger.close()
    damaged = keys_check(server.data_dir)
    assert damaged.returncode == 1 and "1 DO NOT OPEN" in damaged.stdout


def test_a_rotation_cut_off_before_its_record_is_recorded_at_the_next_start(start_server):
    """The keyring saved with a new data key, then a stop before the rotation was journaled
    (here: the file rotated offline): the next start journals it, by the system, and re-seals
    under it, so that a keyring from before it is refused afterwards."""
    from cardcore.keyring import Keyring

    server = start_server()
    till = Admin(server.channel, server.admin_token).enroll(7, 3)
    number = pin_card(server, till)
    server.stop()
    path = os.path.join(server.data_dir, "keyring.json")
    with open(path) as f:
        from_before = f.read()
    assert Keyring.load(path).rotate_data_key() == 2
    server = start_server()
    assert server.stub.Purchase(till.purchase(rid(), number, PIN, 100)).reason == R.REASON_OK
    server.stop()
    assert "data key version 2 recorded" in server.log()
    rotated = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_DATA_KEY_ROTATED]
    assert len(rotated) == 1 and rotated[0][21] == 0  # the system's, no operator
    assert "v2: 1" in keys_check(server.data_dir).stdout  # re-sealed at that start
    with open(path, "w") as f:
        f.write(from_before)

    def start() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cardcore.server.cli", "serve",
                               "--insecure", "--data-dir", server.data_dir, "--listen",
                               "127.0.0.1:0"], capture_output=True, text=True, timeout=60)

    stale = start()
    assert stale.returncode == 2 and "is behind the ledger" in stale.stderr, stale.stderr
    # the same keyring rotated again on its own: a version 2 under another key than the ledger's
    assert Keyring.load(path).rotate_data_key() == 2
    other = start()
    assert other.returncode == 2 and "under another key" in other.stderr, other.stderr


def test_no_card_number_pin_or_pin_block_reaches_the_data_folder_or_the_logs(start_server,
                                                                            monkeypatch):
    monkeypatch.setenv("CARDCORE_LOG_LEVEL", "DEBUG")
    server = start_server()
    admin = Admin(server.channel, server.admin_token)
    till = admin.enroll(7, 3)
    number = pin_card(server, till)
    blocks = []
    for pin in (PIN, OTHER_PIN):
        request = till.purchase(rid(), number, pin, 100)
        blocks.append(request.pin_block)
        reason_of(server.stub.Purchase, request)
    unknown = new_card_number()
    reason_of(server.stub.Purchase, till.purchase(rid(), unknown, PIN, 100))
    server.stop()
    secrets = [number.encode(), unknown.encode(), PIN.encode(), OTHER_PIN.encode(), *blocks,
               *(b.hex().encode() for b in blocks)]
    keyring = os.path.join(server.data_dir, "keyring.json")
    files = [f for f in glob.glob(os.path.join(server.data_dir, "**"), recursive=True)
             if os.path.isfile(f) and f != keyring]
    assert any(f.endswith("data.mdb") for f in files) and any(f.endswith(".log") for f in files)
    for path in files:
        with open(path, "rb") as f:
            content = f.read()
        for secret in secrets:
            assert secret not in content, f"a secret in {path}"
    assert oct(os.stat(keyring).st_mode & 0o777) == "0o600"


# ---- mutual TLS ------------------------------------------------------------------------------

def test_terminal_certificate_must_match_the_terminal_claimed(tls_server):
    server, ca_dir = tls_server
    office = tls_channel(server, ca_dir, "backoffice:hq")
    admin = Admin(office, server.admin_token)
    t7, t8 = admin.enroll(7, 3), admin.enroll(8, 3)
    as_t7 = pb_grpc.CardServiceStub(tls_channel(server, ca_dir, "terminal:7"))
    number = new_card_number()
    as_t7.OpenCard(t7.open_card(rid(), number, PIN))
    as_t7.TopUp(t7.top_up(rid(), number, 1_000))
    assert as_t7.Purchase(t7.purchase(rid(), number, PIN, 100)).reason == R.REASON_OK
    # Terminal 8's keys over terminal 7's certificate.
    assert reason_of(as_t7.Purchase, t8.purchase(rid(), number, PIN, 100)) == R.REASON_TERMINAL_MISMATCH
    # Terminals never send a clear card number.
    clear = pb.PurchaseRequest(client_time_us=now_us(), request_id=rid(), card=cpb.CardRef(card_number=number),
                               gross_amount_minor=100, till=t7.till())
    assert reason_of(as_t7.Purchase, clear) == R.REASON_CLEAR_CARD_REFUSED
    # A back-office host needs an operator token for clear numbers; with TLS a card
    # without a PIN cannot be spent at all.
    office_cards = pb_grpc.CardServiceStub(office)
    assert reason_of(office_cards.GetCard, pb.GetCardRequest(card=cpb.CardRef(card_number=number))) \
        == R.REASON_UNAUTHENTICATED
    other = new_card_number()
    office_cards.OpenCard(pb.OpenCardRequest(client_time_us=now_us(), request_id=rid(), card=cpb.CardRef(card_number=other),
                                             till=cpb.Till(store_id=3)), metadata=admin.metadata)
    as_t7.TopUp(t7.top_up(rid(), other, 1_000))
    assert reason_of(as_t7.Purchase, t7.purchase(rid(), other, None, 100)) == R.REASON_PIN_NOT_SET
    # No client certificate, or one from another CA: no connection at all.
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.CardServiceStub(tls_channel(server, ca_dir, None)).GetCard(
            t7.get_card(number), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_pos_command_swipes_through_tls_with_a_pin_from_stdin(tls_server, tmp_path):
    server, ca_dir = tls_server
    office_cert, office_key = certs.make_client_cert(ca_dir, "backoffice:hq")
    cert, key = certs.make_client_cert(ca_dir, "terminal:21")
    env = dict(os.environ, CARDCORE_TOKEN=server.admin_token, CARDCORE_TLS_CA=f"{ca_dir}/ca.pem")

    def cli(*args, stdin="", token=True):
        e = env if token else {k: v for k, v in env.items() if k != "CARDCORE_TOKEN"}
        return subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args], input=stdin,
                              capture_output=True, text=True, timeout=60, env=e)

    keys = str(tmp_path / "t21.json")
    out = cli("terminals", "enroll", "21", "--store", "3", "--out", keys, "--target", server.target,
              "--tls-cert", office_cert, "--tls-key", office_key)
    assert out.returncode == 0, out.stderr
    assert oct(os.stat(keys).st_mode & 0o777) == "0o600"
    number = new_card_number()
    pos = ("pos", "--keys", keys, "--target", server.target, "--tls-cert", cert, "--tls-key", key)
    assert cli(*pos, "open-card", "-", "--pin", "-", stdin=f"{number}\n{PIN}\n", token=False).returncode == 0
    assert cli(*pos, "top-up", "-", "50", stdin=f"{number}\n", token=False).returncode == 0
    paid = cli(*pos, "purchase", "-", "12.50", "--pin", "-", stdin=f"{number}\n{PIN}\n", token=False)
    assert paid.returncode == 0 and "37.50" in paid.stdout, paid.stderr
    wrong = cli(*pos, "purchase", "-", "1", "--pin", "-", stdin=f"{number}\n{OTHER_PIN}\n", token=False)
    assert wrong.returncode == 1 and "REASON_PIN_WRONG" in wrong.stderr and "tries_left=2" in wrong.stderr
    balance = cli(*pos, "balance", "-", stdin=f"{number}\n", token=False)
    assert "37.50" not in balance.stdout and "active" in balance.stdout  # no PIN: status only
    balance = cli(*pos, "balance", "-", "--pin", "-", stdin=f"{number}\n{PIN}\n", token=False)
    assert "37.50" in balance.stdout and number not in balance.stdout


def test_a_resent_request_with_another_pin_gets_the_original_answer(server, client, till):
    """The idempotency check must not tell a right PIN from a wrong one."""
    number = pin_card(server, till)
    request_id, at = rid(), now_us()
    first = server.stub.Purchase(till.purchase(request_id, number, PIN, 100, client_time_us=at))
    for guess in (OTHER_PIN, NEW_PIN, PIN):  # fresh KSN each, same request_id and payload
        again = server.stub.Purchase(till.purchase(request_id, number, guess, 100, client_time_us=at))
        assert again.replayed and again.seq == first.seq
    declined = rid()
    assert reason_of(server.stub.Purchase, till.purchase(declined, number, OTHER_PIN, 100,
                                                         client_time_us=at)) == R.REASON_PIN_WRONG
    assert reason_of(server.stub.Purchase, till.purchase(declined, number, PIN, 100,
                                                         client_time_us=at)) == R.REASON_PIN_WRONG
    assert card_state(client, number)[:2] == (1, False)  # one try counted, not two


def test_a_batch_or_a_stream_cannot_carry_more_guesses_than_the_budget(start_server):
    server = start_server("--failures-per-minute", "5")
    admin = Admin(server.channel, server.admin_token)
    sprayer, honest = admin.enroll(7, 3), admin.enroll(8, 3)
    numbers = [pin_card(server, honest, funds_minor=10_000) for _ in range(12)]
    batch = pb.SubmitBatchRequest(operations=[
        pb.Operation(purchase=sprayer.purchase(rid(), n, OTHER_PIN, 100)) for n in numbers])
    reasons = [r.reason for r in server.stub.SubmitBatch(batch).results]
    assert reasons.count(R.REASON_PIN_WRONG) == 5
    assert reasons.count(R.REASON_RATE_LIMITED) == 7
    stream = [pb.Operation(purchase=sprayer.purchase(rid(), n, OTHER_PIN, 100)) for n in numbers]
    assert {r.reason for r in server.stub.SwipeStream(iter(stream))} == {R.REASON_RATE_LIMITED}
    # An honest terminal is never limited: more swipes than the budget in one batch or one
    # pipelined stream go through in turn (a batch in chunks, a stream reading on).
    results = server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[
        pb.Operation(purchase=honest.purchase(rid(), numbers[i % 12], PIN, 1)) for i in range(23)]))
    assert [r.reason for r in results.results] == [R.REASON_OK] * 23
    stream = [pb.Operation(purchase=honest.purchase(rid(), numbers[i % 12], PIN, 1)) for i in range(23)]
    assert [r.reason for r in server.stub.SwipeStream(iter(stream))] == [R.REASON_OK] * 23
    for i in range(20):
        assert server.stub.Purchase(honest.purchase(rid(), numbers[i % 12], PIN, 1)).reason == R.REASON_OK
    # Refusals that are not guesses (a weak new PIN) give their attempt back too.
    cashier = bearer(admin.add_operator("c3", ROLE.OPERATOR_ROLE_CASHIER, [3]))
    for _ in range(8):
        assert reason_of(server.stub.SetPin, honest.set_pin(rid(), numbers[0], "1111", PIN),
                         metadata=cashier) == R.REASON_PIN_WEAK
    assert server.stub.Purchase(honest.purchase(rid(), numbers[0], PIN, 1)).reason == R.REASON_OK


def test_opening_cards_that_exist_counts_as_probing(start_server):
    server = start_server("--failures-per-minute", "3")
    admin = Admin(server.channel, server.admin_token)
    prober, honest = admin.enroll(7, 3), admin.enroll(8, 3)
    numbers = [pin_card(server, honest) for _ in range(3)]
    assert [reason_of(server.stub.OpenCard, prober.open_card(rid(), n)) for n in numbers] == [
        R.REASON_CARD_ALREADY_EXISTS] * 3
    assert reason_of(server.stub.OpenCard, prober.open_card(rid(), new_card_number())) == \
        R.REASON_RATE_LIMITED


def test_get_operation_answers_within_the_callers_namespace(tls_server):
    """Finding 2: request ids are scoped to their caller; a terminal learns nothing of another's
    ids, not even whether they exist; a chain admin may name a terminal's namespace."""
    server, ca_dir = tls_server
    admin = Admin(tls_channel(server, ca_dir, "backoffice:hq"), server.admin_token)
    t7, t8 = admin.enroll(7, 3), admin.enroll(8, 3)
    as_t7 = pb_grpc.CardServiceStub(tls_channel(server, ca_dir, "terminal:7"))
    as_t8 = pb_grpc.CardServiceStub(tls_channel(server, ca_dir, "terminal:8"))
    office = pb_grpc.CardServiceStub(tls_channel(server, ca_dir, "backoffice:hq"))
    number, request_id = new_card_number(), "till-000001"
    as_t7.OpenCard(t7.open_card(rid(), number, PIN))
    as_t7.TopUp(t7.top_up(request_id, number, 1_000))
    ask = pb.GetOperationRequest(request_id=request_id)
    mine = as_t7.GetOperation(ask)
    assert mine.state == pb.OPERATION_STATE_APPLIED and mine.result.balance_after.available_minor == 1_000
    assert mine.result.caller.kind == cpb.CALLER_KIND_TERMINAL and mine.result.caller.id == 7
    assert as_t8.GetOperation(ask).state == pb.OPERATION_STATE_NOT_FOUND
    # terminal 8 may use the same request_id for its own top-up: both succeed
    other = as_t8.TopUp(t8.top_up(request_id, number, 500))
    assert other.reason == R.REASON_OK and not other.replayed
    declined = rid()
    assert reason_of(as_t7.Purchase, t7.purchase(declined, number, PIN, 10**9)) == R.REASON_INSUFFICIENT_FUNDS
    answer = as_t7.GetOperation(pb.GetOperationRequest(request_id=declined))
    assert answer.state == pb.OPERATION_STATE_DECLINED
    assert answer.result.reason == R.REASON_INSUFFICIENT_FUNDS
    named = pb.GetOperationRequest(request_id=request_id,
                                   caller=cpb.Caller(kind=cpb.CALLER_KIND_TERMINAL, id=8))
    assert reason_of(as_t7.GetOperation, named) == R.REASON_PERMISSION_DENIED
    assert reason_of(office.GetOperation, ask) == R.REASON_UNAUTHENTICATED
    by_admin = office.GetOperation(named, metadata=admin.metadata)
    assert by_admin.state == pb.OPERATION_STATE_APPLIED and by_admin.result.amount_minor == 500


def test_back_office_calls_are_refused_from_a_till(tls_server):
    server, ca_dir = tls_server
    from_till = Admin(tls_channel(server, ca_dir, "terminal:7"), server.admin_token)
    with pytest.raises(grpc.RpcError) as err:
        from_till.enroll(9, 3)  # a valid chain admin token, but sent from a terminal's connection
    assert failure_of(err.value).reason == R.REASON_PERMISSION_DENIED
    Admin(tls_channel(server, ca_dir, "backoffice:hq"), server.admin_token).enroll(9, 3)


def test_an_operator_removed_during_a_stream_is_refused_from_the_next_operation(server, admin, till):
    numbers = [pin_card(server, till) for _ in range(2)]
    manager = admin.add_operator("night.manager", ROLE.OPERATOR_ROLE_STORE_MANAGER, [3])

    async def run():
        async with server.aio_channel() as channel:
            call = pb_grpc.CardServiceStub(channel).SwipeStream(metadata=bearer(manager))
            await call.write(pb.Operation(reset_pin=till.reset_pin(rid(), numbers[0], NEW_PIN)))
            first = await call.read()
            admin.stub.RemoveOperator(apb.RemoveOperatorRequest(client_time_us=now_us(), request_id=rid(), name="night.manager"),
                                      metadata=admin.metadata)
            await call.write(pb.Operation(reset_pin=till.reset_pin(rid(), numbers[1], NEW_PIN)))
            second = await call.read()
            await call.done_writing()
            return first.reason, second.reason

    assert asyncio.run(run()) == (R.REASON_OK, R.REASON_UNAUTHENTICATED)


def test_concurrent_calls_from_one_terminal_wait_for_room_instead_of_failing(start_server):
    server = start_server("--failures-per-minute", "2")
    admin = Admin(server.channel, server.admin_token)
    till = admin.enroll(7, 3)
    number = pin_card(server, till)
    # Built in KSN order, sent at once on separate calls and a batch: more unanswered swipes
    # than the budget holds, no failures among them.
    unary = [till.purchase(rid(), number, PIN, 1) for _ in range(16)]
    batch = pb.SubmitBatchRequest(operations=[
        pb.Operation(purchase=till.purchase(rid(), number, PIN, 1)) for _ in range(6)])

    async def run():
        async with server.aio_channel() as channel:
            stub = pb_grpc.CardServiceStub(channel)

            async def one(req):
                try:
                    return (await stub.Purchase(req)).reason
                except grpc.aio.AioRpcError as err:
                    return failure_of(err).reason

            calls = [one(r) for r in unary]
            batch_call = stub.SubmitBatch(batch)
            done = await asyncio.gather(*calls, batch_call)
            return done[:-1], [r.reason for r in done[-1].results]

    singles, batched = asyncio.run(run())
    # KSNs arrive out of order across concurrent calls, so some single calls may be replays
    # (the batch holds the newest); none is rate-limited.
    assert R.REASON_RATE_LIMITED not in singles
    assert set(singles) <= {R.REASON_OK, R.REASON_KSN_REPLAYED}
    assert batched == [R.REASON_OK] * 6


def test_the_admin_cli_end_to_end(server, tmp_path):
    """operators, terminals and keys through the `cardcore` command, as an operator uses them."""
    env = dict(os.environ, CARDCORE_TOKEN=server.admin_token)

    def cli(*args, token=True):
        e = env if token else {k: v for k, v in env.items() if k != "CARDCORE_TOKEN"}
        out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", *args, "--target",
                              server.target], capture_output=True, text=True, timeout=60, env=e)
        return out.returncode, out.stdout + out.stderr

    rc, out = cli("operators", "add", "li.region", "--role", "region_manager", "--stores", "3,4")
    assert rc == 0 and "region_manager" in out and "stores 3,4" in out
    token = out.split("token (shown once; the server keeps only its hash): ")[1].split()[0]
    assert token.startswith("cc_")
    rc, out = cli("operators", "add", "boss2", "--role", "chain_admin", "--stores", "3")
    assert rc == 1 and "REASON_INVALID_ARGUMENT field=store_ids" in out
    as_region = dict(env, CARDCORE_TOKEN=token)
    out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "terminals", "enroll", "5",
                          "--store", "3", "--out", str(tmp_path / "t5.keys.json"), "--target",
                          server.target], capture_output=True, text=True, timeout=60, env=as_region)
    assert out.returncode == 0, out.stderr
    rc, out = cli("terminals", "list")
    assert rc == 0 and "terminal 5  store 3  active" in out
    rc, out = cli("terminals", "revoke", "5")
    assert rc == 0 and "revoked" in out
    rc, out = cli("terminals", "list", token=False)
    assert rc == 1 and "REASON_UNAUTHENTICATED" in out
    rc, out = cli("keys", "rotate")
    assert rc == 0 and "data key version 2 is current" in out
    rc, out = cli("operators", "remove", "li.region")
    assert rc == 0 and "removed" in out
    rc, out = cli("operators", "list")
    assert rc == 0 and "li.region" in out and "admin" in out
    journal = journal_entries(server.data_dir)
    kinds = [e[1] for e in journal if e[1] >= L.OP_ADMIN_MIN]
    assert kinds == [L.OP_PROGRAM_LOADED, L.OP_OPERATOR_ADDED, L.OP_OPERATOR_ADDED,
                     L.OP_TERMINAL_ENROLLED, L.OP_TERMINAL_REVOKED, L.OP_DATA_KEY_ROTATED,
                     L.OP_OPERATOR_REMOVED]


# ---- ledger v2: privacy, retried admin calls, the digest of a PIN change --------------------

def test_a_terminal_sees_the_balance_only_with_the_pin_and_never_the_profile(server, admin, till):
    """Finding 5: a till cannot read a member's name, phone, birthday or balance without the
    card's PIN; a wrong PIN on an inquiry counts like one on a purchase; operators in scope see
    everything."""
    number = new_card_number()
    server.stub.OpenCard(till.open_card(rid(), number, PIN, profile=pb.MemberProfile(
        name="Li Wei", phone="13800138000", birthday="1990-05-17")))
    server.stub.TopUp(till.top_up(rid(), number, 12_345))
    bare = server.stub.GetCard(till.get_card(number))
    assert bare.view == pb.CARD_VIEW_STATUS and bare.status == cpb.CARD_STATUS_ACTIVE
    assert (bare.balance.available_minor, bare.profile.name, bare.last_seq) == (0, "", 0)
    assert bare.masked_number.endswith(number[-4:]) and number not in str(bare)
    seen = server.stub.GetCard(till.get_card(number, PIN))
    assert seen.view == pb.CARD_VIEW_BALANCE and seen.balance.available_minor == 12_345
    assert (seen.profile.name, seen.profile.phone, seen.profile.birthday) == ("", "", "")
    assert reason_of(server.stub.GetCard, till.get_card(number, OTHER_PIN)) == R.REASON_PIN_WRONG
    assert server.stub.GetCard(till.get_card(number, PIN)).pin_tries == 1  # counted; a right
    # PIN on an inquiry changes nothing (a purchase with it resets the count)
    failed = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_PIN_FAILED]
    assert len(failed) == 1 and failed[0][24] == L.CALLER_TERMINAL and failed[0][26] == 7
    cashier = bearer(admin.add_operator("wu.cashier", ROLE.OPERATOR_ROLE_CASHIER, [3]))
    full = server.stub.GetCard(till.get_card(number), metadata=cashier)  # an operator at the till
    assert full.view == pb.CARD_VIEW_FULL and full.profile.name == "Li Wei"
    elsewhere = bearer(admin.add_operator("ma.cashier", ROLE.OPERATOR_ROLE_CASHIER, [4]))
    assert server.stub.GetCard(till.get_card(number), metadata=elsewhere).view == pb.CARD_VIEW_STATUS


def test_every_inquiry_from_a_terminal_counts_against_its_budget(start_server):
    """Finding 5: not only misses: a till reading real cards one after another is throttled."""
    server = start_server("--failures-per-minute", "4")
    admin = Admin(server.channel, server.admin_token)
    reader, payer = admin.enroll(7, 3), admin.enroll(8, 3)
    number = pin_card(server, payer)
    for _ in range(4):
        assert server.stub.GetCard(reader.get_card(number)).view == pb.CARD_VIEW_STATUS
    assert reason_of(server.stub.GetCard, reader.get_card(number, PIN)) == R.REASON_RATE_LIMITED
    assert server.stub.Purchase(payer.purchase(rid(), number, PIN, 100)).reason == R.REASON_OK


def test_a_set_pin_retried_with_another_new_pin_is_another_payload(server, client, till):
    """Finding 8: the new PIN is part of the idempotency digest; a replay never sets a PIN the
    member did not choose."""
    number = pin_card(server, till)
    request_id, at = rid(), now_us()
    server.stub.SetPin(till.set_pin(request_id, number, NEW_PIN, PIN, client_time_us=at))
    again = server.stub.SetPin(till.set_pin(request_id, number, NEW_PIN, PIN, client_time_us=at))
    assert again.replayed
    assert reason_of(server.stub.SetPin, till.set_pin(request_id, number, "918273", PIN,
                                                      client_time_us=at)) == \
        R.REASON_DUPLICATE_REQUEST_MISMATCH
    assert server.stub.Purchase(till.purchase(rid(), number, NEW_PIN, 100)).reason == R.REASON_OK


def test_a_retried_add_operator_gets_a_fresh_token_and_the_lost_one_stops_working(server, admin):
    request = apb.AddOperatorRequest(request_id=rid(), name="wu.cashier", store_ids=[3],
                                     role=ROLE.OPERATOR_ROLE_CASHIER, client_time_us=now_us())
    lost = admin.stub.AddOperator(request, metadata=admin.metadata).token
    again = admin.stub.AddOperator(request, metadata=admin.metadata)
    assert again.token.startswith("cc_") and again.token != lost
    assert again.operator.operator_id == 2  # the same operator: no id burnt
    top_up = lambda token: reason_of(  # noqa: E731
        server.stub.OpenCard, pb.OpenCardRequest(
            request_id=rid(), card=cpb.CardRef(card_number=new_card_number()),
            till=cpb.Till(store_id=3), client_time_us=now_us()), metadata=bearer(token))
    assert top_up(lost) == R.REASON_UNAUTHENTICATED
    assert top_up(again.token) == R.REASON_OK
    kinds = [e[1] for e in journal_entries(server.data_dir) if e[1] >= L.OP_ADMIN_MIN]
    assert kinds[-2:] == [L.OP_OPERATOR_ADDED, L.OP_OPERATOR_TOKEN_REISSUED]
    assert verify(server.data_dir)["ok"]


def test_concurrent_retries_of_one_key_rotation_rotate_once(server, admin):
    """Two calls with the same request_id at once (a client that timed out and retried): one new
    key version, journaled once, and both answers name it."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    request = apb.RotateDataKeyRequest(request_id=rid(), client_time_us=now_us())
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: admin.stub.RotateDataKey(
            request, metadata=admin.metadata, timeout=60), range(2)))
    assert {a.key_version for a in answers} == {2}
    with open(os.path.join(server.data_dir, "keyring.json")) as f:
        assert sorted(json.load(f)["data_keys"]) == ["1", "2"]
    rotated = [e for e in journal_entries(server.data_dir) if e[1] == L.OP_DATA_KEY_ROTATED]
    assert len(rotated) == 1
