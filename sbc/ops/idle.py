"""Memory given back after a burst of calls (docs/performance.md, "Round 4: idle" and "Round 8:
idle").

CPython's allocator takes memory from the system in arenas of 1 MiB and gives an arena back only
once every block in it is free. A burst of calls takes a few arenas more for as long as its
completed calls' transactions wait out their timers (32 s); when they are gone, one small block
made during the burst and kept for good holds its whole arena. Besides the service's own
long-lived objects (made before the burst, or kept in arrays: see the counters), two kinds of
free lists keep such blocks, and this module deals with both:

* the interpreter's own free lists of dead tuples, floats, lists, dicts and contexts (up to 2,000
  tuples of each length): they are emptied by a full collection only, which the service's
  collector thresholds make rare (sbc/ops/cli.py, ``GC_THRESHOLD``). :func:`collect_when_idle`
  runs one once the service has gone quiet after calls: no call up and no transaction left,
  so that nothing of the burst is alive any more.
* the event loop's free lists: uvloop keeps up to 250 dead ``Handle`` (``call_soon``) and
  ``TimerHandle`` (``call_later``/``call_at``) objects, and asyncio's C module up to 255 dead
  future iterators (one per ``await`` of a future), for reuse; a full collection does not empty
  them. When a burst needs more of them at once than start-up did, the new ones, made in the
  burst's arenas, end in those lists. :func:`warm_free_lists` fills them at start-up instead,
  with objects made before any call: a burst then takes its handles and iterators from them.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
from array import array
from collections.abc import Awaitable, Callable

import structlog

__all__ = [
    "FREE_LIST_SIZE",
    "IDLE_CHECK_EVERY",
    "collect_when_idle",
    "warm_free_lists",
]

log = structlog.get_logger(__name__)

# uvloop's free lists hold 250 objects of each class (its DEFAULT_FREELIST_SIZE), asyncio's 255
# future iterators (FI_FREELIST_MAXLEN): one more than both fills any of them.
FREE_LIST_SIZE = 256
IDLE_CHECK_EVERY = 2.0  # seconds between looks at whether the service went quiet


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


# What the burst took outside Python's allocator (message buffers and dict tables over 512
# bytes, SQLite's, in the loop's and the records writer's malloc arenas) is free once the calls
# are gone, but glibc gives back only the top of each heap: free pages in the middle stay in
# RSS. malloc_trim(0) hands them back (madvise) in every arena, about 1.3 MiB after 3,000
# calls, in 0.2 ms (docs/performance.md, Round 8b: idle). Once per quiet spell, with the
# collection.
_MALLOC_TRIM = _find_malloc_trim()


def _nothing() -> None:
    pass


def warm_free_lists(loop: asyncio.AbstractEventLoop, size: int = FREE_LIST_SIZE) -> None:
    """Make ``size`` of each object the loop keeps dead for reuse, all alive at once, then let
    them go: the loop's free lists are then full of objects made now (start-up), not during a
    burst of calls. Nothing runs: every handle is cancelled before the loop gets to it, every
    future is left pending and dropped. With asyncio's own loop (no free lists of handles)
    only the iterators' list is filled."""
    soon = [loop.call_soon(_nothing) for _ in range(size)]
    later = [loop.call_later(3600.0, _nothing) for _ in range(size)]
    futures = [loop.create_future() for _ in range(size)]
    iterators = [future.__await__() for future in futures]
    for handle in soon:
        handle.cancel()
    for timer in later:
        timer.cancel()
    del soon, later, iterators, futures


async def collect_when_idle(
    calls_up: Callable[[], int],
    calls_seen: Callable[[], float],
    quiet: float,
    every: float = IDLE_CHECK_EVERY,
    release: Callable[[], None] | None = None,
    shrink: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Every ``every`` seconds, look at the calls: once none has been up and none has started
    for ``quiet`` seconds after some did (the longest a completed call's transactions wait,
    64*T1, and a margin: nothing of the burst is alive then), run one full collection. It
    empties the interpreter's free lists, so that the arenas the burst took can be given back.
    ``calls_up``: calls up now; ``calls_seen``: any count that grows with every call. Runs
    until cancelled. A full collection takes a few milliseconds, once per quiet spell.
    ``release``: called just before it, to free what the calls' tables kept (their dicts' tables
    grown by the burst; see ``SipEngine.release_tables``). ``shrink``: awaited then, for what
    other tasks and threads keep (the call records' delivery task waiting for its next event:
    ``EventBus.rest``; their page cache: ``RecordWriter.release_memory``). After the
    collection, the C library's free pages go back to the system (``malloc_trim``, glibc
    only)."""
    loop = asyncio.get_running_loop()
    # What it remembers between looks, as C doubles: the calls' count last seen, and when
    # calls were last up or started (-1: collected since). Number objects kept here from one
    # look to the next, the count made by the burst's last call, would be just what holds an
    # arena of the burst.
    state = array("d", (calls_seen(), -1.0))
    while True:
        await asyncio.sleep(every)
        if _look(state, calls_up(), calls_seen(), loop.time(), quiet):
            if release is not None:
                release()
            if shrink is not None:
                await shrink()
            found = gc.collect()
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
            log.debug("idle_collection", unreachable=found)


def _look(state: array[float], up: int, seen: float, now: float, quiet: float) -> bool:
    """One look (see collect_when_idle): whether to collect now."""
    if up or seen != state[0]:
        state[0] = seen
        state[1] = now
    elif state[1] >= 0.0 and now - state[1] >= quiet:
        state[1] = -1.0
        return True
    return False
