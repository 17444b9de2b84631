"""Text for people on the command line: amounts, tables, secrets read from a terminal, and the
checks every argument passes before anything is sent (a bad one is a one-line usage error)."""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys

DEFAULT_DATA_DIR = "./var/cardcore"
DEFAULT_PORT = 50051
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

I64_MAX = 2**63 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
CARD_NUMBER_LEN = (8, 19)  # cardcore.cards.CARD_NUMBER_LEN_MIN, _MAX


class UsageError(Exception):
    """A bad argument found after parsing: ``cardcore`` prints it on one line and exits 2."""


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def fen(amount_minor: int) -> str:
    """Minor units as a readable amount: 123456 -> '1,234.56'."""
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 100)
    return f"{sign}{whole:,}.{frac:02d}"


def parse_amount(text: str) -> int:
    """'12.34' or '12' (yuan) -> 1234 fen; refuses more than two decimals."""
    text = text.strip()
    whole, _, frac = text.partition(".")
    if not whole.lstrip("-").isdigit() or (frac and (not frac.isdigit() or len(frac) > 2)):
        raise argparse.ArgumentTypeError(f"not an amount in yuan with at most two decimals "
                                         f"(like 12 or 12.50): {text!r}")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 100 + int((frac + "00")[:2]))


def amount_arg(text: str) -> int:
    """An amount in yuan for the wire: above 0, at most two decimals, and fen that fit int64."""
    fen_ = parse_amount(text)
    if not 0 < fen_ <= I64_MAX:
        raise argparse.ArgumentTypeError(
            f"{text.strip()!r} is out of range: an amount is above 0 and at most {fen(I64_MAX)}")
    return fen_


def int_arg(low: int, high: int):
    """An argparse type: a decimal integer in low..high (the wire field's range)."""
    def convert(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value
    return convert


def shards_arg(high: int, most: int):
    """An argparse type: comma-separated shard numbers in 0..high, distinct, at most ``most``."""
    one = int_arg(0, high)

    def convert(text: str) -> tuple[int, ...]:
        shards = tuple(one(part) for part in text.split(",") if part.strip())
        if not shards or len(set(shards)) != len(shards) or len(shards) > most:
            raise argparse.ArgumentTypeError(
                f"{text!r}: 1 to {most} distinct shard numbers, comma-separated")
        return shards
    return convert


uint32_arg = int_arg(0, U32_MAX)
client_time_arg = int_arg(0, I64_MAX)


def seconds_arg(text: str) -> float:
    """A time in seconds: above 0, finite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: above 0 seconds")
    return value


def check_card_number(number: str, where: str = "") -> str:
    """8..19 ASCII digits (the server checks the check digit, when its program asks for one).
    The message never repeats the number."""
    if not number:
        raise UsageError(f"no card number{where}")
    low, high = CARD_NUMBER_LEN
    if not (low <= len(number) <= high and number.isascii() and number.isdigit()):
        raise UsageError(f"the card number{where} is not {low} to {high} digits")
    return number


def card_number_arg(text: str) -> str:
    if text == "-":
        if sys.stdin.isatty():
            import getpass

            text = getpass.getpass("card number: ").strip()
            where = " typed"
        else:
            text = sys.stdin.readline().strip()
            where = " on standard input"
    else:
        where = ""
    try:
        return check_card_number(text, where)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def card_id_arg(text: str) -> bytes:
    """A card id as find-card prints it: 32 hex digits (16 bytes)."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 16:
        raise argparse.ArgumentTypeError("a card id is 32 hex digits, as find-card prints it")
    return value


_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")


def host_port(text: str, *, port_zero: bool, default_port: int | None = DEFAULT_PORT) -> str:
    """HOST:PORT, [IPv6]:PORT, or a host alone, which means ``default_port`` (the server's; gRPC
    itself would take 443). A gRPC URI (dns:, unix:, ...) passes as it is."""
    text = text.strip()
    if text.startswith(_SCHEMES):
        return text
    if not text:
        raise argparse.ArgumentTypeError("empty: give HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text.partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"not [IPv6 address]:PORT: {text!r}")
        host, port = host + "]", rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an IPv6 address in brackets: {text!r}") from None
    elif text.count(":") > 1:
        raise argparse.ArgumentTypeError(f"an IPv6 address goes in brackets: [{text}] or "
                                         f"[{text}]:PORT")
    else:
        host, sep, port = text.partition(":")
        port = port if sep else None
        if not host:
            raise argparse.ArgumentTypeError(f"no host in {text!r}")
    if port is None:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"no port in {text!r}: give HOST:PORT")
        return f"{host}:{default_port}"
    if not (port.isascii() and port.isdigit() and (0 if port_zero else 1) <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"port {port!r} is not {0 if port_zero else 1}..65535 in {text!r}")
    return f"{host}:{int(port)}"


def target_arg(text: str) -> str:
    return host_port(text, port_zero=False)


def listen_arg(text: str) -> str:
    return host_port(text, port_zero=True)


def metrics_listen_arg(text: str) -> str:
    return host_port(text, port_zero=True, default_port=None)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
