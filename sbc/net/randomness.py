"""Random bytes for identifiers (tags, branches, Call-IDs, call uuids, cnonces), drawn from
the operating system a block at a time.

A bridged call draws seven small pieces (its uuid, leg a's tag, leg b's Call-ID and tag, three
branches): each ``os.urandom`` is a ``getrandom`` system call that lets go of the GIL and
takes it back, 0.43 us of CPU for a dozen bytes on this project's VM against 0.12 us from
here (docs/performance.md, "Round 9: call"). :func:`random_bytes` hands out the bytes of one
``os.urandom(POOL_SIZE)`` in turn, each byte once: the same source and the same
unpredictability, one system call for dozens of calls.

Each byte is handed out once, whichever threads draw: ``BytesIO.read`` runs in C under the
GIL, and a refill is drawn into a buffer of its own, read by the thread that made it before
any other thread can see it. A child process forked after a draw starts with an empty pool
(``os.register_at_fork``): parent and child never hand out the same bytes.
"""

from __future__ import annotations

import io
import os

__all__ = ["POOL_SIZE", "random_bytes"]

POOL_SIZE = 4096  # bytes a system call: about 50 calls' identifiers


_buffer = io.BytesIO()  # empty: the first draw fills it


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's random source, as ``os.urandom(n)``."""
    global _buffer
    data = _buffer.read(n)
    if len(data) == n:
        return data
    if n > POOL_SIZE:
        return os.urandom(n)
    # The rest of the old block (shorter than n) is dropped, never handed out later.
    buffer = io.BytesIO(os.urandom(POOL_SIZE))
    data = buffer.read(n)
    _buffer = buffer
    return data


def _forget() -> None:
    """A forked child draws its own bytes (what the parent had left is not for it)."""
    global _buffer
    _buffer = io.BytesIO()


os.register_at_fork(after_in_child=_forget)
