"""Member profiles at rest (cardcore.profiles): the name, phone and birthday sealed with the
profile key, the masked number in clear; legacy JSON profiles sealed by the first writer with
the key; a retry of an opening is the same request (its digest is the profile's JSON's)."""
from __future__ import annotations

import json
import os

import pytest

from cardcore import layout as L
from cardcore.keyring import Keyring
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger
from cardcore.profiles import ProfileBox, ProfileError, masked_of, profile_key
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, ledger_bytes, new_card_number, sent_at, verify
from test_ledger import NOW, cid, key

NAME, PHONE, BIRTHDAY = "Zhao Xiaoyan", "13712345678", "1990-07-14"


def test_a_profile_is_sealed_at_rest_and_shown_to_getcard(server):
    client = Client(server.stub)
    number = new_card_number()
    request = pb.OpenCardRequest(
        request_id="open-profile", client_time_us=sent_at("open-profile"),
        card=cpb.CardRef(card_number=number), till=cpb.Till(store_id=1, terminal_id=1),
        profile=pb.MemberProfile(name=NAME, phone=PHONE, birthday=BIRTHDAY, home_store_id=7))
    first = server.stub.OpenCard(request)
    again = server.stub.OpenCard(request)  # sealed anew, the same request
    assert again.replayed and again.seq == first.seq
    card = client.card(number)
    assert (card.profile.name, card.profile.phone, card.profile.birthday,
            card.profile.home_store_id) == (NAME, PHONE, BIRTHDAY, 7)
    stored = ledger_bytes(server.data_dir)
    for secret in (NAME.encode(), PHONE.encode(), BIRTHDAY.encode(), number.encode()):
        assert secret not in stored
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_without_the_key_only_the_masked_number_opens_and_a_moved_profile_does_not():
    key, other = bytes(range(32)), bytes(range(1, 33))
    box = ProfileBox(profile_key(key))
    card_a, card_b = bytes(16), bytes([1]) * 16
    doc = {"masked": "622588******0001", "name": NAME, "phone": PHONE}
    raw = box.seal(card_a, doc)
    assert box.open(card_a, raw) == doc
    assert masked_of(raw) == "622588******0001"
    assert ProfileBox(None).open(card_a, raw) == {"masked": "622588******0001"}
    with pytest.raises(ProfileError):
        box.open(card_b, raw)  # another card's: the associated data binds the card id
    with pytest.raises(ProfileError):
        ProfileBox(profile_key(other)).open(card_a, raw)
    forged = raw[:2] + b"622588******9999" + raw[2 + 16:]  # another masked number shown
    with pytest.raises(ProfileError):
        box.open(card_a, forged)
    legacy = json.dumps(doc).encode()
    assert box.open(card_a, legacy) == doc and masked_of(legacy) == doc["masked"]


def test_profiles_stored_before_sealing_are_sealed_by_the_first_writer_with_the_key(tmp_path):
    path = str(tmp_path / "ledger")
    number = "6225880000000800"
    profile = json.dumps({"masked": "622588******0800", "name": NAME, "phone": PHONE,
                          "birthday": BIRTHDAY}).encode()
    old = Ledger(path)  # a writer of the release before: profiles stored as their JSON
    (outcome,) = old.apply_group([PendingOp.build(key("o1"), L.OP_OPEN, cid(number),
                                                  profile=profile, client_time_us=NOW)], NOW)
    assert outcome.reason == L.R_OK
    old.close()
    ring = Keyring(str(tmp_path / "keyring.json"), os.urandom(32), os.urandom(32),
                   os.urandom(16), os.urandom(4), {1: os.urandom(32)}, 1)
    ledger = Ledger(path, profile_key=profile_key(ring.index_key))
    raw = dict(ledger.dump()["profiles"])[cid(number)]
    assert raw[0] == 2 and NAME.encode() not in raw
    assert ledger.read_card(cid(number))[1]["name"] == NAME
    report = ledger.verify()
    assert report["ok"], report["problems"]
    ledger.close()
    keyless = Ledger(path, readonly=True)
    assert keyless.read_card(cid(number))[1] == {"masked": "622588******0800"}
    keyless.close()


def test_a_nonce_is_of_everything_sealed_and_a_random_nonce_record_still_opens():
    """(found by a review) The synthetic IV's safety: the same card, mask and document seal to
    the same bytes, and changing any of them changes the nonce (a nonce shared by two different
    messages under one key would break AES-GCM); a record sealed before, under a random nonce,
    still opens."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from cardcore.profiles import NONCE_SIZE, encode

    key_ = os.urandom(32)
    box = ProfileBox(profile_key(key_))

    def nonce_of(raw: bytes) -> bytes:
        return raw[2 + raw[1]:2 + raw[1] + NONCE_SIZE]

    doc = {"masked": "622588******0001", "name": "N", "phone": "1"}
    c1, c2 = bytes(16), bytes([1]) * 16
    assert box.seal(c1, doc) == box.seal(c1, doc)
    nonces = {nonce_of(box.seal(c, d)) for c, d in (
        (c1, doc), (c2, doc), (c1, dict(doc, name="M")),
        (c1, dict(doc, masked="622588******0002")))}
    assert len(nonces) == 4
    masked = doc["masked"].encode()
    head = bytes((2, len(masked))) + masked
    nonce = os.urandom(NONCE_SIZE)
    old = head + nonce + AESGCM(profile_key(key_)).encrypt(nonce, encode(doc),
                                                           head[:1] + c1 + masked)
    assert box.open(c1, old) == doc
