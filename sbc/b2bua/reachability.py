"""Whether a peer answers the INVITEs sbc sends it, told to the operator once per outage.

A call whose INVITE to Retell (or, for a call from Retell, to the PBX) ends in the engine's
own 408/503 (connection refused, no route, no answer: ``OutgoingRequest.local_failure``) found
the peer unreachable. Logging that per call would bury the log under one warning per call
during an outage; instead the first such call logs ``<peer>_unreachable`` at warning with the
error, later ones only count, and the first answer from the peer (any response, a refusal
included) logs ``<peer>_reachable_again`` with how many calls were refused and for how long.
An outage still going on at shutdown is summed up by :meth:`Reachability.summary`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

__all__ = ["Reachability"]

log = structlog.get_logger(__name__)


class Reachability:
    """The state of one peer (``"retell"``, ``"pbx"``) as the calls found it."""

    def __init__(self, peer: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.peer = peer
        self.reachable = True
        self.refused = 0  # calls refused in the current outage
        self.outages = 0
        self.error: str | None = None  # the first error of the current outage
        self._clock = clock
        self._since = 0.0

    def answered(self) -> None:
        """The peer sent a response (any status)."""
        if self.reachable:
            return
        log.warning(
            f"{self.peer}_reachable_again",
            calls_refused=self.refused,
            outage_s=round(self._clock() - self._since, 1),
        )
        self.reachable = True
        self.refused = 0
        self.error = None

    def failed(self, error: str) -> None:
        """A call was refused because the peer could not be reached (``error``: why)."""
        self.refused += 1
        if not self.reachable:
            return
        self.reachable = False
        self.outages += 1
        self.error = error
        self._since = self._clock()
        log.warning(
            f"{self.peer}_unreachable",
            error=error,
            calls_refused=self.refused,
            detail="calls are refused until it answers; logged once per outage",
        )

    def summary(self) -> None:
        """Log the outage still going on, if any (shutdown)."""
        if not self.reachable:
            log.warning(
                f"{self.peer}_still_unreachable",
                error=self.error,
                calls_refused=self.refused,
                outage_s=round(self._clock() - self._since, 1),
            )
