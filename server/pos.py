"""``cardcore pos``: a terminal on the command line, on the terminal library."""
from __future__ import annotations

import argparse
import os
import sys
import uuid

from .cmd_client import call, client_time, print_card, print_result, stub_of
from .text import UsageError, check_card_number

# what each action reads: (takes an amount, --pin, --old-pin); a PIN marked "needed" is read
# from standard input even without its option (after the ones the command line names)
ACTIONS = {
    "purchase": (True, "needed", None),
    "top-up": (True, "optional", None),
    "balance": (False, "optional", None),
    "open-card": (False, "optional", None),
    "set-pin": (False, "needed", "optional"),
    "reset-pin": (False, "optional", None),
}
PROMPTS = {"card": "card number: ", "pin": "PIN: ", "old_pin": "current PIN (empty if none): "}
NEW_PIN_ACTIONS = ("open-card", "set-pin", "reset-pin")
OPTION_OF = {"card": "the card number", "pin": "--pin", "old_pin": "--old-pin"}


class StdinOrder(argparse.Action):
    """Store the value and remember the order the secret arguments stand in on the command line:
    standard input is read in that order, one line per '-'."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        order = [d for d in (getattr(namespace, "stdin_order", None) or []) if d != self.dest]
        setattr(namespace, "stdin_order", [*order, self.dest])


def _read_line(prompt: str, dest: str) -> str:
    """One secret from standard input: a terminal prompts without echo; a pipe gives a line."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt).strip()
    line = sys.stdin.readline()
    if not line:
        raise UsageError(f"standard input ended before {OPTION_OF[dest]}: one line per '-', in "
                         "the order they stand on the command line")
    return line.strip()


def _check_pin(pin: str, option: str, where: str) -> str:
    from cardcore import pin as pinlib

    if not (pinlib.PIN_LEN_MIN <= len(pin) <= pinlib.PIN_LEN_MAX and pin.isascii()
            and pin.isdigit()):
        raise UsageError(f"{option}: the PIN{where} is not {pinlib.PIN_LEN_MIN} to "
                         f"{pinlib.PIN_LEN_MAX} digits")
    return pin


def read_secrets(args) -> dict[str, str | None]:
    """The card number and the PINs this action uses, each checked (the message never shows
    one): '-' reads a line of standard input, in the order the arguments stand on the command
    line; a PIN the action needs but no option names is read after those."""
    takes_amount, pin_use, old_use = ACTIONS[args.action]
    if takes_amount and not args.amount:
        raise UsageError(f"pos {args.action} needs an amount in yuan (after the card number)")
    if not takes_amount and args.amount:
        raise UsageError(f"pos {args.action} takes no amount")
    if args.old_pin is not None and old_use is None:
        raise UsageError("--old-pin is for pos set-pin only")
    given = {"card": args.card, "pin": args.pin, "old_pin": args.old_pin}
    order = [d for d in (getattr(args, "stdin_order", None) or ["card"]) if given[d] is not None]
    if "card" not in order:
        order.insert(0, "card")
    if pin_use == "needed" and args.pin is None:
        given["pin"] = "-"
        order.append("pin")
    values: dict[str, str | None] = {"pin": None, "old_pin": None}
    for dest in order:
        value, where = given[dest], ""
        if value == "-":
            prompt = "new PIN: " if dest == "pin" and args.action in NEW_PIN_ACTIONS else PROMPTS[dest]
            value = _read_line(prompt, dest)
            where = " typed" if sys.stdin.isatty() else " on standard input"
        if dest == "card":
            values[dest] = check_card_number(value, where)
        elif dest == "old_pin" and not value:
            values[dest] = None  # no current PIN: a first PIN, with an operator vouching
        else:
            values[dest] = _check_pin(value, OPTION_OF[dest], where)
    return values


def _terminal(path: str):
    """The terminal of a keys file, or a one-line reason it cannot be used."""
    from cardcore.terminal import Terminal, TerminalKeys

    try:
        keys = TerminalKeys.load(path)
    except OSError as exc:
        raise UsageError(f"--keys {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--keys {exc}") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not (os.access(path, os.W_OK) and os.access(folder, os.W_OK)):
        raise UsageError(f"--keys {path}: the file and its folder must be writable (the "
                         "transaction counter is saved there before every swipe)")
    return Terminal(keys, keys_path=path)


def cmd_pos(args) -> int:
    terminal = _terminal(args.keys)
    args.send_token = bool(args.operator)
    secret = read_secrets(args)
    number, pin, old = secret["card"], secret["pin"], secret["old_pin"]
    request_id = args.request_id or str(uuid.uuid4())
    at_us = client_time(args)
    stub = stub_of(args)
    try:
        if args.action == "balance":  # with --pin, the balances; without, status and tier
            print_card(call(stub.GetCard, terminal.get_card(number, pin), args))
            return 0
        if args.action == "purchase":
            request, method = terminal.purchase(request_id, number, pin, args.amount, args.staff,
                                                at_us), stub.Purchase
        elif args.action == "top-up":
            request, method = terminal.top_up(request_id, number, args.amount, pin, args.staff,
                                              at_us), stub.TopUp
        elif args.action == "open-card":
            request, method = terminal.open_card(request_id, number, pin, args.tier,
                                                 staff_id=args.staff, client_time_us=at_us), \
                stub.OpenCard
        elif args.action == "set-pin":
            request, method = terminal.set_pin(request_id, number, pin, old, args.staff,
                                               at_us), stub.SetPin
        else:  # reset-pin, by a store manager at this till
            request, method = terminal.reset_pin(request_id, number, pin, args.staff, at_us), \
                stub.ResetPin
    except ValueError as exc:  # the DUKPT key used up; the inputs were checked above
        raise SystemExit(f"cardcore: {exc}") from None
    print_result(call(method, request, args), client_time_us=at_us)
    return 0
