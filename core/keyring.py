"""Keys kept outside LMDB.

For now one key: the card index key (HMAC-SHA256) that turns card numbers
into card ids. The embedded default creates it in the data folder, mode
0600, on first start; production points ``CARDCORE_KEYRING`` at a file kept
elsewhere (the PIN security issue grows this into a versioned keyring).
Losing this key makes every card unfindable by number: back it up.
"""
from __future__ import annotations

import logging
import os

INDEX_KEY_SIZE = 32
log = logging.getLogger("cardcore.keyring")


def load_or_create_index_key(path: str) -> bytes:
    """Read the index key file, or create it (0600) if it does not exist."""
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        key = os.urandom(INDEX_KEY_SIZE)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        log.warning("created a new card index key at %s (0600); production keeps the keyring "
                    "outside the data folder (CARDCORE_KEYRING) and backs it up", path)
    if len(key) != INDEX_KEY_SIZE:
        raise ValueError(f"index key file {path} must hold {INDEX_KEY_SIZE} bytes")
    return key
