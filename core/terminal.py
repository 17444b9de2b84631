"""The terminal library: what a POS terminal does before it swipes, in one place.

``cardcore pos``, the tests, the benchmarks and the locust fleets all swipe
through this module, and an integrator porting a terminal copies it:

- the terminal holds its AES-128 DUKPT initial key (IK) and initial key ID
  (IKID), handed out once by EnrollTerminal, and a transaction counter that
  only grows (``next_counter``); every transaction gets a fresh KSN;
- from the KSN it derives two working keys: "data encryption" for the card
  number and "PIN encryption" for PIN blocks;
- the card number travels as ``CardRef.secure``: nonce || AES-128-GCM(number)
  || tag, with the KSN as associated data (``cardcore.carddata``, shared with
  the host, which opens it);
- PINs travel as ISO 9564-1 format 4 PIN blocks bound to the card number
  (``cardcore.pin.encipher``).

A terminal must never use a counter twice: ``TerminalKeys.save`` stores the
counter with the keys, and ``cardcore pos`` saves before it sends.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from cardcore import pin as pinlib
from cardcore.carddata import encrypt_card_data
from cardcore.dukpt import IKID_SIZE, KSN_SIZE, KeyPath, KeyUsage, next_counter
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb

USAGES = (KeyUsage.DATA_ENCRYPTION, KeyUsage.PIN_ENCRYPTION)


@dataclasses.dataclass(repr=False)
class TerminalKeys:
    """What enrolment hands a terminal, plus the last transaction counter it used."""
    terminal_id: int
    store_id: int
    initial_key: bytes
    initial_key_id: bytes
    counter: int = 0

    def save(self, path: str) -> None:
        """Write (0600, replace atomically): the counter must survive a restart of the terminal."""
        doc = {"terminal_id": self.terminal_id, "store_id": self.store_id,
               "initial_key": self.initial_key.hex(), "initial_key_id": self.initial_key_id.hex(),
               "counter": self.counter}
        tmp = f"{path}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def __repr__(self) -> str:  # never the initial key
        return f"TerminalKeys(terminal {self.terminal_id}, store {self.store_id}, counter {self.counter})"

    @classmethod
    def load(cls, path: str) -> "TerminalKeys":
        """OSError if the file cannot be read; ValueError, naming the path and the field but
        nothing of the key, if it is not a terminal's keys file."""
        with open(path) as f:
            text = f.read()
        bad = f"{path} is not a terminal's keys file (as 'cardcore terminals enroll' writes it)"
        try:
            doc = json.loads(text)
        except ValueError:
            raise ValueError(f"{bad}: not JSON") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{bad}: not a JSON object")
        fields = {}
        for name, kind, size in (("terminal_id", int, (1, 2**32 - 1)), ("store_id", int, (0, 2**32 - 1)),
                                 ("initial_key", bytes, 16), ("initial_key_id", bytes, IKID_SIZE),
                                 ("counter", int, (0, 2**32 - 1))):
            if name not in doc:
                if name == "counter":
                    fields[name] = 0
                    continue
                raise ValueError(f"{bad}: no {name}")
            value = doc[name]
            try:
                if kind is int:
                    if isinstance(value, bool) or not isinstance(value, int) \
                            or not size[0] <= value <= size[1]:
                        raise ValueError
                else:
                    value = bytes.fromhex(value)
                    if len(value) != size:
                        raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"{bad}: its {name} is not valid") from None
            fields[name] = value
        return cls(**fields)


class Terminal:
    """Builds the requests of one terminal: a fresh KSN, encrypted card data and PIN blocks each."""

    def __init__(self, keys: TerminalKeys, keys_path: str | None = None):
        self.keys = keys
        self.keys_path = keys_path
        self._path = KeyPath(keys.initial_key, keys.initial_key_id)

    @property
    def terminal_id(self) -> int:
        return self.keys.terminal_id

    def till(self, staff_id: int = 0) -> cpb.Till:
        return cpb.Till(store_id=self.keys.store_id, terminal_id=self.keys.terminal_id,
                        staff_id=staff_id)

    def transaction(self) -> tuple[bytes, bytes, bytes]:
        """(KSN, data key, PIN key) of the next transaction; the counter is saved first."""
        self.keys.counter = next_counter(self.keys.counter)
        if self.keys_path:
            self.keys.save(self.keys_path)
        ksn = self.keys.initial_key_id + self.keys.counter.to_bytes(4, "big")
        assert len(ksn) == KSN_SIZE
        data_key, pin_key = self._path.working_keys(self.keys.counter, *USAGES)
        return ksn, data_key, pin_key

    def secure(self, number: str) -> tuple[cpb.CardRef, bytes]:
        """The CardRef for ``number`` under a fresh KSN, and that transaction's PIN key."""
        ksn, data_key, pin_key = self.transaction()
        ref = cpb.CardRef(secure=cpb.SecureCard(ksn=ksn, encrypted_card=encrypt_card_data(
            data_key, ksn, number)))
        return ref, pin_key

    @staticmethod
    def _block(pin_key: bytes, pin: str | None, number: str) -> bytes:
        return pinlib.encipher(pin_key, pin, number) if pin else b""

    # ---- requests ---------------------------------------------------------------------
    # Every mutating request carries the terminal's clock (client_time_us): a retry of the same
    # request repeats it with the request_id (and, as any transaction, takes a fresh KSN).

    def purchase(self, request_id: str, number: str, pin: str | None, gross_amount_minor: int,
                 staff_id: int = 0, client_time_us: int | None = None) -> pb.PurchaseRequest:
        card, pin_key = self.secure(number)
        return pb.PurchaseRequest(request_id=request_id, card=card,
                                  gross_amount_minor=gross_amount_minor, till=self.till(staff_id),
                                  pin_block=self._block(pin_key, pin, number),
                                  client_time_us=client_time_us or now_us())

    def top_up(self, request_id: str, number: str, amount_minor: int, pin: str | None = None,
               staff_id: int = 0, client_time_us: int | None = None) -> pb.TopUpRequest:
        card, pin_key = self.secure(number)
        return pb.TopUpRequest(request_id=request_id, card=card, amount_minor=amount_minor,
                               till=self.till(staff_id), pin_block=self._block(pin_key, pin, number),
                               client_time_us=client_time_us or now_us())

    def open_card(self, request_id: str, number: str, pin: str | None = None, tier: int = 0,
                  profile: pb.MemberProfile | None = None, staff_id: int = 0,
                  client_time_us: int | None = None) -> pb.OpenCardRequest:
        card, pin_key = self.secure(number)
        return pb.OpenCardRequest(request_id=request_id, card=card, tier=tier, profile=profile,
                                  till=self.till(staff_id), pin_block=self._block(pin_key, pin, number),
                                  client_time_us=client_time_us or now_us())

    def set_pin(self, request_id: str, number: str, new_pin: str, old_pin: str | None = None,
                staff_id: int = 0, client_time_us: int | None = None) -> pb.SetPinRequest:
        card, pin_key = self.secure(number)
        return pb.SetPinRequest(request_id=request_id, card=card, till=self.till(staff_id),
                                old_pin_block=self._block(pin_key, old_pin, number),
                                new_pin_block=self._block(pin_key, new_pin, number),
                                client_time_us=client_time_us or now_us())

    def reset_pin(self, request_id: str, number: str, new_pin: str | None = None,
                  staff_id: int = 0, client_time_us: int | None = None) -> pb.ResetPinRequest:
        card, pin_key = self.secure(number)
        return pb.ResetPinRequest(request_id=request_id, card=card, till=self.till(staff_id),
                                  new_pin_block=self._block(pin_key, new_pin, number),
                                  client_time_us=client_time_us or now_us())

    def get_card(self, number: str, pin: str | None = None) -> pb.GetCardRequest:
        """A card inquiry; with the PIN, the answer shows the balances (CARD_VIEW_BALANCE)."""
        card, pin_key = self.secure(number)
        return pb.GetCardRequest(card=card, pin_block=self._block(pin_key, pin, number))


def now_us() -> int:
    """The client's clock for ``client_time_us``: Unix time in microseconds."""
    return time.time_ns() // 1000
