"""SIP timer values (RFC 3261 §17 Table 4, RFC 6026 §8.11).

The transaction layer keeps deadlines, never sleeps: a timer here is only a name and a
duration. Durations depend on T1, T2 and T4, which are constructor arguments of the layer so
that a deployment (or a test) can shorten them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

__all__ = ["TRYING_DELAY", "Timer", "TimerConfig"]

# RFC 3261 §17.2.1: the INVITE server transaction sends 100 Trying itself when the TU has not
# sent a provisional response within 200 ms.
TRYING_DELAY = 0.2

# RFC 3261 Table 4: Timer D is "> 32 s" for unreliable transports.
_TIMER_D_UNRELIABLE = 32.0


class Timer(Enum):
    """Timer names of RFC 3261 Table 4 and RFC 6026, plus the 100 Trying delay."""

    A = "A"  # INVITE request retransmit interval, UDP only
    B = "B"  # INVITE transaction timeout
    D = "D"  # wait time for response retransmissions (INVITE client, Completed)
    E = "E"  # non-INVITE request retransmit interval, UDP only
    F = "F"  # non-INVITE transaction timeout
    G = "G"  # INVITE response retransmit interval
    H = "H"  # wait time for ACK receipt
    I = "I"  # noqa: E741 - RFC 3261 name; wait time for ACK retransmissions
    J = "J"  # wait time for non-INVITE request retransmissions
    K = "K"  # wait time for response retransmissions (non-INVITE client, Completed)
    L = "L"  # RFC 6026: INVITE server, wait time for accepted INVITE retransmissions
    M = "M"  # RFC 6026: INVITE client, wait time for retransmitted 2xx
    TRYING = "Trying"  # RFC 3261 §17.2.1: 200 ms before an automatic 100 Trying

    # Members are singletons: hashing by identity is what Enum's hash by name means, done
    # in C (the transition tables and timer maps hash these on every input).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1, T2, T4 (RFC 3261 Table 4 defaults) and the timers derived from them."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    def initial(self, timer: Timer, *, reliable: bool) -> float:
        """The first duration of ``timer``; 0.0 means "fire at once" (reliable transports)."""
        # A table per (T1, T4, transport kind), built once: a match on the members compared
        # them one by one (eight comparisons for Timer H), six times a call.
        return _initial_durations(self.t1, self.t4, reliable)[timer]

    def next_interval(self, timer: Timer, previous: float) -> float:
        """The retransmission interval after ``previous`` for Timers A, E and G.

        RFC 3261 §17.1.1.2: Timer A doubles without bound (Timer B ends it); §17.1.2.2 and
        §17.2.1: Timers E and G double up to T2.
        """
        if timer is Timer.A:
            return 2 * previous
        return min(2 * previous, self.t2)


@functools.lru_cache(maxsize=32)
def _initial_durations(t1: float, t4: float, reliable: bool) -> dict[Timer, float]:
    """Every timer's first duration (RFC 3261 Table 4, RFC 6026 for L and M): the waits that
    absorb retransmissions (D, I, J, K) are 0 over a reliable transport."""
    wait_d = 0.0 if reliable else max(_TIMER_D_UNRELIABLE, 64 * t1)
    wait_t4 = 0.0 if reliable else t4
    wait_j = 0.0 if reliable else 64 * t1
    return {
        **dict.fromkeys((Timer.A, Timer.E, Timer.G), t1),
        **dict.fromkeys((Timer.B, Timer.F, Timer.H, Timer.L, Timer.M), 64 * t1),
        Timer.D: wait_d,
        Timer.I: wait_t4,
        Timer.K: wait_t4,
        Timer.J: wait_j,
        Timer.TRYING: TRYING_DELAY,
    }
