"""A hint that the journal may have grown, for the journal feed's streams (``feed``).

The gRPC process's writer notifies it once a group's answer is handled; a caught-up stream
waits on it before it reads the ledger again. Only a hint: a stream also re-reads after a
timeout, so an entry is never missed for want of a notice (one written by another process, a
notice lost in a race), only delivered later.
"""
from __future__ import annotations

import asyncio


class JournalSignal:
    """A counter of notices and an event; for one event loop (no locks: notify and wait run on
    it)."""

    def __init__(self) -> None:
        self.count = 0   # notices so far: a stream takes it before reading, and waits past it
        self._event = asyncio.Event()

    def notify(self) -> None:
        """The journal may have grown: wake every waiter."""
        self.count += 1
        self._event.set()
        self._event = asyncio.Event()  # the next waiters wait for the next notice

    async def wait(self, timeout_s: float, seen: int) -> None:
        """Until a notice after the ``seen``-th (at once if one came already), or ``timeout_s``."""
        if self.count != seen:
            return
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
