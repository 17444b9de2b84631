"""The keyring: sealing card numbers under versioned keys, rotation, storage."""
from __future__ import annotations

import logging
import os

import pytest

from cardcore import keyring
from cardcore.keyring import Keyring, SealError

CARD_ID, OTHER_ID, NUMBER = b"c" * 16, b"d" * 16, "6225880000001231"


def test_sealed_numbers_open_only_for_their_card_and_unchanged(tmp_path):
    ring = Keyring.load_or_create(str(tmp_path / "k.json"))
    sealed = ring.seal(CARD_ID, NUMBER)
    assert NUMBER.encode() not in sealed and ring.unseal(CARD_ID, sealed) == NUMBER
    assert ring.seal(CARD_ID, NUMBER) != sealed  # a fresh nonce each time
    with pytest.raises(SealError):
        ring.unseal(OTHER_ID, sealed)  # bound to its card id
    for i in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[i] ^= 1
        with pytest.raises(SealError):
            ring.unseal(CARD_ID, bytes(damaged))


def test_rotation_adds_a_version_and_keeps_the_old_ones_readable(tmp_path):
    path = str(tmp_path / "k.json")
    ring = Keyring.load_or_create(path)
    old = ring.seal(CARD_ID, NUMBER)
    assert ring.rotate_data_key() == 2
    new = ring.seal(CARD_ID, NUMBER)
    assert Keyring.sealed_version(old) == 1 and Keyring.sealed_version(new) == 2
    again = Keyring.load(path)  # saved
    assert again.data_key_current == 2 and again.unseal(CARD_ID, old) == again.unseal(CARD_ID, new)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert "key" not in repr(again).replace("key versions", "")


def test_a_keyring_re_reads_a_rotation_made_by_another_process_and_no_other_chains(tmp_path):
    path = str(tmp_path / "k.json")
    mine, theirs = Keyring.load_or_create(path), Keyring.load(path)
    assert not mine.reload()  # nothing newer
    assert theirs.rotate_data_key() == 2
    assert mine.reload() and mine.data_key_current == 2
    assert Keyring.sealed_version(mine.seal(CARD_ID, NUMBER)) == 2
    assert mine.unseal(CARD_ID, theirs.seal(CARD_ID, NUMBER)) == NUMBER
    # a rotation from an object that did not read the file as it is now (another process
    # rotated since): refused, and the other's key stays in the file
    stale = Keyring.load(path)
    assert theirs.rotate_data_key() == 3
    with pytest.raises(ValueError, match="changed since"):
        stale.rotate_data_key()
    assert Keyring.load(path).data_keys == theirs.data_keys
    other = Keyring.load_or_create(str(tmp_path / "other.json"))
    other.rotate_data_key()  # its version 2: another key, another fingerprint
    assert mine.fingerprint(2) == theirs.fingerprint(2) != other.fingerprint(2)
    assert len(mine.fingerprint(2)) == 8 and mine.fingerprint(2) not in mine.data_keys[2]
    os.replace(other.path, path)  # another chain's file in its place: refused, nothing adopted
    with pytest.raises(ValueError):
        mine.reload()
    assert mine.data_key_current == 2 and mine.unseal(CARD_ID, mine.seal(CARD_ID, NUMBER))
    assert stale.data_key_current == 2


def test_a_rotation_that_cannot_be_saved_changes_nothing(tmp_path, monkeypatch):
    ring = Keyring.load_or_create(str(tmp_path / "k.json"))

    def refuse(*_args):
        raise OSError("read-only file system")

    monkeypatch.setattr(keyring.os, "replace", refuse)
    with pytest.raises(OSError):
        ring.rotate_data_key()
    assert ring.data_key_current == 1 and set(ring.data_keys) == {1}
    assert Keyring.sealed_version(ring.seal(CARD_ID, NUMBER)) == 1


def test_a_keyring_readable_by_others_is_reported(tmp_path, caplog):
    path = str(tmp_path / "k.json")
    Keyring.load_or_create(path)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="cardcore.keyring"):
        Keyring.load(path)
    assert "chmod 600" in caplog.text


def test_the_first_release_index_key_is_kept(tmp_path):
    legacy = tmp_path / keyring.LEGACY_INDEX_KEY
    legacy.write_bytes(b"i" * 32)
    ring = Keyring.load_or_create(str(tmp_path / "k.json"), str(tmp_path))
    assert ring.index_key == b"i" * 32
