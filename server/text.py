"""Text for people on the command line: amounts, tables, secrets read from a terminal."""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_DATA_DIR = "./var/cardcore"
DEFAULT_LISTEN = "127.0.0.1:50051"


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
        raise argparse.ArgumentTypeError(f"not an amount with at most two decimals: {text!r}")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * 100 + int((frac + "00")[:2]))


def card_number_arg(text: str) -> str:
    if text != "-":
        return text
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("card number: ").strip()
    return sys.stdin.readline().strip()


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
