"""Random bytes for identifiers (branches, tags, Call-IDs, call uuids), drawn from the OS in
blocks.

A bridged call draws ten small random strings (three Via branches, two in-dialog branches,
three tags, a Call-ID, its uuid). Each ``os.urandom`` is a system call; one block of
:data:`BLOCK` bytes serves about forty calls, cut into pieces that are each used once. The
bytes are the kernel's CSPRNG output as before, only read ahead: each thread has its own block
(no two threads can be handed the same bytes), and a forked child starts with none (it must
not repeat its parent's).
"""

from __future__ import annotations

import os
import threading
import uuid

__all__ = ["BLOCK", "random_bytes", "random_uuid"]

BLOCK = 4096  # bytes read from the OS at a time


class _Block(threading.local):
    data = b""
    used = 0


_block = _Block()


def random_bytes(n: int) -> bytes:
    """``n`` random bytes, as ``os.urandom(n)`` gives them (a request larger than a block is
    ``os.urandom``'s own)."""
    block = _block
    start = block.used
    end = start + n
    data = block.data
    if end > len(data):
        if n > BLOCK:
            return os.urandom(n)
        data = block.data = os.urandom(BLOCK)
        start, end = 0, n
    block.used = end
    return data[start:end]


def random_uuid() -> str:
    """A random (version 4) UUID's text, as ``str(uuid.uuid4())`` makes it."""
    return str(uuid.UUID(bytes=random_bytes(16), version=4))


def _forget_block() -> None:
    # The child would otherwise hand out the same bytes as its parent.
    global _block
    _block = _Block()


os.register_at_fork(after_in_child=_forget_block)
