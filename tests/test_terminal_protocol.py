"""docs/terminal-protocol.md against the code: every vector the document shows is checked here.

The document's ```vector blocks hold `name = value` lines (quoted: ASCII text; otherwise hex,
spaces and `# comments` ignored; an indented line continues the value above). Each name is
checked against cardcore's own code: the DUKPT module, the terminal library (core/terminal.py,
behind `cardcore pos`) and the host side that opens a swipe. The worked example is rebuilt by the
terminal library with the document's two random inputs (the GCM nonce, the PIN field's fill) put
in place of the random source, and finally sent, as the document gives it, to a real server whose
keyring holds the document's BDK.
"""
from __future__ import annotations

import json
import os
import re
import types

import grpc
import pytest

from cardcore import carddata, dukpt
from cardcore import pin as pinlib
from cardcore.carddata import decrypt_card_data
from cardcore.dukpt import KeyPath, KeyType, KeyUsage, Ksn
from cardcore.ext.aes import ecb_decrypt, ecb_encrypt
from cardcore.terminal import Terminal, TerminalKeys, now_us
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Admin, ServerProcess, failure_of, rid

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "terminal-protocol.md")
R = cpb.Reason


def parse_vectors(text: str) -> dict[str, bytes | str]:
    """Every `name = value` of the document's ```vector blocks; a name appears once."""
    found: dict[str, bytes | str] = {}
    for block in re.findall(r"^```vector\n(.*?)^```", text, re.M | re.S):
        raw: dict[str, str] = {}
        name = None
        for line in block.splitlines():
            content = line.split("#", 1)[0].rstrip()
            if not content.strip():
                continue
            if line[0].isspace():
                assert name is not None, f"a continuation line before any name: {line!r}"
                raw[name] += " " + content.strip()
                continue
            name, eq, value = content.partition("=")
            assert eq, f"not a `name = value` line: {line!r}"
            name = name.strip()
            assert name not in raw and name not in found, f"vector {name} appears twice"
            raw[name] = value.strip()
        for name, value in raw.items():
            if value.startswith('"'):
                assert value.endswith('"') and len(value) >= 2, f"{name}: unterminated text"
                found[name] = value[1:-1]
            else:
                found[name] = bytes.fromhex(value.replace(" ", ""))
    return found


def keys_file_text(text: str) -> str:
    blocks = re.findall(r"^```json keys-file\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) == 1, "the worked example shows one keys file"
    return blocks[0].strip()


@pytest.fixture(scope="module")
def doc() -> str:
    with open(DOC) as f:
        return f.read()


@pytest.fixture(scope="module")
def v(doc) -> dict[str, bytes | str]:
    return parse_vectors(doc)


NEXT_COUNTER = re.compile(r"next_counter_after_([0-9A-F]{8})")
CHECKED = {
    "bdk", "initial_key_id", "initial_key_derivation_data", "initial_key", "counter_2_pin_key",
    "counter_FFFF0000_derivation_key",
    "walk_5_step_1_data", "walk_5_step_1_key", "walk_5_step_2_data", "walk_5_step_2_key",
    "walk_5_pin_data", "walk_5_pin_key", "walk_5_data_data", "walk_5_data_key",
    "ksn_counter", "ksn", "derivation_data", "derivation_key", "data_key_data", "data_key",
    "pin_key_data", "pin_key",
    "card_number", "gcm_nonce", "gcm_plaintext", "gcm_aad", "gcm_ciphertext", "gcm_tag",
    "encrypted_card",
    "pin", "pin_fill", "pin_field", "pan_field", "pin_block_a", "pin_block_b", "pin_block",
    "request_id", "client_time_us", "purchase_request",
}


def test_the_document_shows_exactly_the_vectors_checked_here(v):
    """A vector added to the document without a check, or a check whose vector went, fails."""
    counters = {n for n in v if NEXT_COUNTER.fullmatch(n)}
    assert len(counters) >= 3
    assert set(v) - counters == CHECKED


def test_the_parser_reads_text_hex_comments_and_continuations():
    text = ('```vector\na = 01 02  # one, two\nb = "x y"\nc =\n    0A # ten\n    0B\n```\n'
            '```python\nd = 03\n```\n')
    assert parse_vectors(text) == {"a": b"\x01\x02", "b": "x y", "c": b"\x0a\x0b"}


# ---- section 3: the counter rule -------------------------------------------------------------

def test_next_counter(v):
    for name in v:
        m = NEXT_COUNTER.fullmatch(name)
        if m:
            assert dukpt.next_counter(int(m.group(1), 16)) == int.from_bytes(v[name], "big"), name
    with pytest.raises(ValueError):
        dukpt.next_counter(dukpt.COUNTER_MAX)  # "the key is used up"


# ---- section 4: key derivation -----------------------------------------------------------------

def derivation_data(usage: KeyUsage, ikid: bytes, counter: int) -> bytes:
    return bytes(dukpt._derivation_data(usage, KeyType.AES128, ikid, counter))


def test_initial_key_and_the_standards_values(v):
    bdk, ikid = v["bdk"], v["initial_key_id"]
    assert v["initial_key_derivation_data"] == derivation_data(KeyUsage.INITIAL_KEY, ikid, 0)
    assert ecb_encrypt(bdk, v["initial_key_derivation_data"]) == v["initial_key"]
    assert dukpt.initial_key(bdk, ikid) == v["initial_key"]
    assert dukpt.host_working_key(bdk, Ksn.parse(ikid + (2).to_bytes(4, "big")),
                                  KeyUsage.PIN_ENCRYPTION) == v["counter_2_pin_key"]
    assert dukpt.derivation_key(v["initial_key"], ikid, 0xFFFF0000) == \
        v["counter_FFFF0000_derivation_key"]


def test_a_two_step_walk(v):
    ik, ikid = v["initial_key"], v["initial_key_id"]
    steps = [("walk_5_step_1", KeyUsage.KEY_DERIVATION, 4, ik),
             ("walk_5_step_2", KeyUsage.KEY_DERIVATION, 5, v["walk_5_step_1_key"]),
             ("walk_5_pin", KeyUsage.PIN_ENCRYPTION, 5, v["walk_5_step_2_key"]),
             ("walk_5_data", KeyUsage.DATA_ENCRYPTION, 5, v["walk_5_step_2_key"])]
    for name, usage, counter, under in steps:
        assert v[f"{name}_data"] == derivation_data(usage, ikid, counter), name
        assert ecb_encrypt(under, v[f"{name}_data"]) == v[f"{name}_key"], name
    assert dukpt.derivation_key(ik, ikid, 4) == v["walk_5_step_1_key"]
    assert dukpt.derivation_key(ik, ikid, 5) == v["walk_5_step_2_key"]
    ksn = Ksn(ikid, 5)
    assert dukpt.working_key(ik, ksn, KeyUsage.PIN_ENCRYPTION) == v["walk_5_pin_key"]
    assert dukpt.working_key(ik, ksn, KeyUsage.DATA_ENCRYPTION) == v["walk_5_data_key"]
    assert KeyPath(ik, ikid).working_keys(5, KeyUsage.DATA_ENCRYPTION, KeyUsage.PIN_ENCRYPTION) \
        == [v["walk_5_data_key"], v["walk_5_pin_key"]]


# ---- section 10: the worked example ------------------------------------------------------------

TERMINAL_ID, STORE_ID, STAFF_ID, GROSS_MINOR = 2417112150, 12, 31, 12345


def test_the_keys_file_is_what_enrolment_writes(doc, v, tmp_path):
    """Byte for byte what `cardcore terminals enroll` writes (TerminalKeys.save) for the
    document's terminal, whose IK the server derives from the document's BDK."""
    ikid = v["initial_key_id"]
    assert int.from_bytes(ikid[4:], "big") == TERMINAL_ID  # the IKID names the terminal
    path = str(tmp_path / "t.keys.json")
    TerminalKeys(TERMINAL_ID, STORE_ID, dukpt.initial_key(v["bdk"], ikid), ikid).save(path)
    with open(path) as f:
        assert f.read() == keys_file_text(doc)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


@pytest.fixture
def fixed_randomness(v, monkeypatch):
    """The terminal library's two random inputs, replaced by the document's fixed ones."""
    nonce, fill = v["gcm_nonce"], v["pin_fill"]

    def urandom(n: int) -> bytes:
        assert n == len(nonce)
        return nonce

    def pad(n: int) -> bytes:
        assert n == len(fill)
        return fill

    from psec import pinblock
    monkeypatch.setattr(carddata, "os", types.SimpleNamespace(urandom=urandom))
    monkeypatch.setattr(pinblock, "_urandom", pad)


def test_the_terminal_library_builds_the_documents_request(doc, v, tmp_path, fixed_randomness):
    path = str(tmp_path / "t.keys.json")
    with open(path, "w") as f:
        f.write(keys_file_text(doc))
    terminal = Terminal(TerminalKeys.load(path), keys_path=path)
    request = terminal.purchase(v["request_id"], v["card_number"], v["pin"], GROSS_MINOR,
                                staff_id=STAFF_ID,
                                client_time_us=int.from_bytes(v["client_time_us"], "big"))
    assert request.SerializeToString() == v["purchase_request"]
    assert len(v["purchase_request"]) == 144
    with open(path) as f:  # the counter was saved before the request was built
        assert json.load(f)["counter"] == int.from_bytes(v["ksn_counter"], "big") == 1
    secure = request.card.secure
    assert (secure.ksn, secure.encrypted_card, request.pin_block) == \
        (v["ksn"], v["encrypted_card"], v["pin_block"])
    assert (request.till.store_id, request.till.terminal_id, request.till.staff_id) == \
        (STORE_ID, TERMINAL_ID, STAFF_ID)


def test_the_worked_example_step_by_step(v):
    ik, ikid, ksn = v["initial_key"], v["initial_key_id"], v["ksn"]
    counter = int.from_bytes(v["ksn_counter"], "big")
    assert counter == dukpt.next_counter(0) and ksn == ikid + v["ksn_counter"]
    assert Ksn.parse(ksn) == Ksn(ikid, counter)
    # the keys
    assert v["derivation_data"] == derivation_data(KeyUsage.KEY_DERIVATION, ikid, counter)
    assert ecb_encrypt(ik, v["derivation_data"]) == v["derivation_key"] == \
        dukpt.derivation_key(ik, ikid, counter)
    for name, usage in (("data_key", KeyUsage.DATA_ENCRYPTION), ("pin_key", KeyUsage.PIN_ENCRYPTION)):
        assert v[f"{name}_data"] == derivation_data(usage, ikid, counter)
        assert ecb_encrypt(v["derivation_key"], v[f"{name}_data"]) == v[name]
        assert dukpt.host_working_key(v["bdk"], Ksn.parse(ksn), usage) == v[name]  # the server
    # the card data
    blob = v["encrypted_card"]
    assert v["gcm_plaintext"] == v["card_number"].encode("ascii") and v["gcm_aad"] == ksn
    assert blob == v["gcm_nonce"] + v["gcm_ciphertext"] + v["gcm_tag"]
    assert len(v["gcm_ciphertext"]) == len(v["card_number"]) and len(v["gcm_tag"]) == 16
    assert decrypt_card_data(v["data_key"], ksn, blob) == v["card_number"]
    with pytest.raises(carddata.CardDataError):  # the KSN is the associated data
        decrypt_card_data(v["data_key"], ikid + (2).to_bytes(4, "big"), blob)
    # the PIN block
    from psec import pinblock
    pin, number, key = v["pin"], v["card_number"], v["pin_key"]
    assert v["pin_field"][:8].hex().upper() == f"4{len(pin):X}{pin}".ljust(16, "A")
    assert v["pin_field"][8:] == v["pin_fill"]
    assert v["pan_field"] == pinblock.encode_pan_field_iso_4(number)
    assert pinblock.decode_pin_field_iso_4(v["pin_field"]) == pin
    assert ecb_encrypt(key, v["pin_field"]) == v["pin_block_a"]
    assert bytes(a ^ b for a, b in zip(v["pin_block_a"], v["pan_field"], strict=True)) == \
        v["pin_block_b"]
    assert ecb_encrypt(key, v["pin_block_b"]) == v["pin_block"]
    assert ecb_decrypt(key, v["pin_block"]) == v["pin_block_b"]
    assert pinlib.decipher(key, v["pin_block"], number) == pin  # the server
    # the request
    request = pb.PurchaseRequest.FromString(v["purchase_request"])
    assert request.request_id == v["request_id"]
    assert request.client_time_us == int.from_bytes(v["client_time_us"], "big") == 1796012142736303
    assert request.gross_amount_minor == GROSS_MINOR


# ---- the worked example on a real server ----------------------------------------------------------

def test_a_server_with_the_documents_bdk_accepts_the_example_once(v, tmp_path):
    """A keyring holding the document's BDK: enrolment hands out the document's initial key, and
    the document's request (with a current client time) pays; its bytes sent again do not."""
    keyring = tmp_path / "keyring.json"
    fd = os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": "cardcore-keyring/1", "index_key": os.urandom(32).hex(),
                   "pin_key": os.urandom(32).hex(), "bdk": v["bdk"].hex(),
                   "bdk_id": v["initial_key_id"][:4].hex(),
                   "data_keys": {"1": os.urandom(32).hex()}, "data_key_current": 1}, f)
    server = ServerProcess(str(tmp_path / "data"), "--keyring", str(keyring))
    try:
        admin = Admin(server.channel, server.admin_token)
        example = admin.enroll(TERMINAL_ID, STORE_ID)
        assert (example.keys.initial_key, example.keys.initial_key_id) == \
            (v["initial_key"], v["initial_key_id"])
        issuing = admin.enroll(1, STORE_ID)  # another till of the store issues the card
        number, pin = v["card_number"], v["pin"]
        server.stub.OpenCard(issuing.open_card(rid(), number, pin))
        server.stub.TopUp(issuing.top_up(rid(), number, 100_000))

        request = pb.PurchaseRequest.FromString(v["purchase_request"])
        request.client_time_us = now_us()  # the document's clock is fixed; the server's is not
        paid = server.stub.Purchase(request)
        assert (paid.reason, paid.type, paid.paid_minor, paid.points_earned) == \
            (R.REASON_OK, cpb.OPERATION_TYPE_PURCHASE, GROSS_MINOR, 123)
        assert paid.balance_after.available_minor == 100_000 - GROSS_MINOR
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Purchase(request)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert failure_of(err.value).reason == R.REASON_KSN_REPLAYED
    finally:
        server.stop()
    log = server.log()
    assert number not in log and v["pin_block"].hex() not in log.lower()
