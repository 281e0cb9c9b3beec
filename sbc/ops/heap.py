"""Freed heap memory handed back to the system, so that RSS comes back near idle once a burst
of calls and their transactions' timers are over (issue 12; docs/performance.md, "Round 3:
memory").

CPython's small-object allocator gives an arena back as soon as it is empty, but what is larger
than 512 bytes (dict and list tables, message texts and bodies) comes from glibc's malloc,
which only gives back free memory at the top of its heap: the pages freed in the middle, where
the long-lived objects of other calls sit around them, stay in RSS for good. ``malloc_trim(0)``
returns every whole free page (madvise); it takes well under a millisecond when there is
nothing to return, a few when there is (15 MiB: 3.4 ms), and runs in a worker thread (ctypes
releases the GIL) so that the event loop is not held up. On a C library without it (musl,
macOS) nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

# Seconds between two trims: what a burst left is given back within this of its transactions'
# last timers (Timers J, L and M: 64*T1 = 32 s after its last call). A trim with nothing to
# give back costs about 0.2 ms of a worker thread; pages given back and used again cost a
# page fault each, which at this period stays far below 0.1 % of a core under steady load.
HEAP_TRIM_INTERVAL = 10.0


def malloc_trim() -> Callable[[], bool] | None:
    """``malloc_trim(0)`` of the C library as a function returning whether it gave memory
    back; None when the library has none."""
    try:
        function = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int

    def trim() -> bool:
        return bool(function(0))

    return trim


async def trim_heap_every(interval: float, trim: Callable[[], bool] | None = None) -> None:
    """Trim the heap every ``interval`` seconds until cancelled (``trim``: the default is
    :func:`malloc_trim`'s; nothing to do without one)."""
    trim = trim or malloc_trim()
    if trim is None:
        log.debug("heap_trim_unavailable")
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(trim)
