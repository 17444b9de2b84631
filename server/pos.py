"""``cardcore pos``: a terminal on the command line, on the terminal library."""
from __future__ import annotations

import sys
import uuid

from .cmd_client import call, client_time, print_card, print_result, stub_of


def _secret(prompt: str, given: str | None) -> str:
    """A card number or PIN: '-' reads a line from standard input, never from the command line
    in clear unless given (tests); a terminal prompts without echo."""
    if given and given != "-":
        return given
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt).strip()
    return sys.stdin.readline().strip()


def cmd_pos(args) -> int:
    from cardcore.terminal import Terminal, TerminalKeys

    terminal = Terminal(TerminalKeys.load(args.keys), keys_path=args.keys)
    args.send_token = bool(args.operator)  # a till sends the operator token only when asked
    number = _secret("card number: ", args.card)
    request_id = args.request_id or str(uuid.uuid4())
    at_us = client_time(args)
    stub = stub_of(args)
    if args.action == "balance":  # with --pin, the balances; without, status and tier
        pin = _secret("PIN: ", args.pin) if args.pin else None
        print_card(call(stub.GetCard, terminal.get_card(number, pin), args))
        return 0
    if args.action == "purchase":
        pin = _secret("PIN: ", args.pin)
        result = call(stub.Purchase, terminal.purchase(request_id, number, pin, args.amount,
                                                       args.staff, at_us), args)
    elif args.action == "top-up":
        pin = _secret("PIN: ", args.pin) if args.pin else None
        result = call(stub.TopUp, terminal.top_up(request_id, number, args.amount, pin, args.staff,
                                                  at_us), args)
    elif args.action == "open-card":
        pin = _secret("new PIN: ", args.pin) if args.pin else None
        result = call(stub.OpenCard, terminal.open_card(request_id, number, pin, args.tier,
                                                        staff_id=args.staff, client_time_us=at_us),
                      args)
    elif args.action == "set-pin":
        old = _secret("current PIN (empty if none): ", args.old_pin) if args.old_pin else None
        result = call(stub.SetPin, terminal.set_pin(request_id, number, _secret("new PIN: ", args.pin),
                                                    old or None, args.staff, at_us), args)
    else:  # reset-pin, by a store manager at this till
        pin = _secret("new PIN: ", args.pin) if args.pin else None
        result = call(stub.ResetPin, terminal.reset_pin(request_id, number, pin, args.staff, at_us),
                      args)
    print_result(result, client_time_us=at_us)
    return 0
