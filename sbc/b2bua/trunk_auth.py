"""Digest authentication of the calls Retell sends to sbc (RFC 3261 §22.3, RFC 7616).

Retell places its ``sip_invite`` transfers and outbound calls to the number's termination URI
(sbc), digest-authenticated with the number's trunk credentials (``docs/peers.md``). When
``[retell] auth_username`` is set, :class:`~sbc.b2bua.calls.CallManager` asks a
:class:`TrunkAuth` about every new INVITE from ``retell.trusted`` before anything is allocated:

* no credentials for sbc's realm (or unreadable ones): ``407`` with a fresh challenge
  (``Proxy-Authenticate: Digest realm=..., nonce=..., algorithm=MD5, qop="auth"``);
* the right password on a nonce that has expired (older than :data:`NONCE_LIFETIME`) or that
  another process issued: ``407`` with ``stale=true`` (RFC 7616 §3.3: retry without asking);
* a wrong username, password or digest-uri (the Request-URI, or the To URI, which is what
  Retell's LiveKit stack hashes): ``403``. RFC 3261 §22.3 would have a proxy challenge again;
  sbc refuses, as 3CX does after a bad retry: the client learns at once that its credentials
  are wrong (LiveKit would otherwise answer up to five challenges with the same ones), and a
  guesser gets no further nonce in that exchange;
* the same accepted credentials again (nonce, ``nc`` and ``cnonce`` seen before, a replay):
  ``407`` with a fresh challenge, as if none had been sent.

Nonces are stateless (:func:`~sbc.sip.digest.make_nonce`): a time stamp of the monotonic clock
and a random salt, with their HMAC under a secret drawn once per process, so that no two
challenges share a nonce and a restart makes the old ones stale. The realm is sbc's advertised
address. The pure checks are :func:`sbc.sip.digest.check_credentials`; this module adds the
clock, the randomness and the memory of accepted credentials.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable

from sbc.sip.digest import (
    Credentials,
    CredentialsCheck,
    Verdict,
    build_challenge,
    check_credentials,
    make_nonce,
)
from sbc.sip.message import Request

__all__ = ["NONCE_LIFETIME", "TrunkAuth"]

NONCE_LIFETIME = 300.0  # seconds a challenge's nonce may be answered
_REPLAY_MEMORY = 4096  # accepted credentials remembered (within NONCE_LIFETIME) at most


class TrunkAuth:
    """Challenges and checks the credentials of requests sent to sbc for one trunk."""

    def __init__(
        self,
        credentials: Credentials,
        realm: str,
        *,
        lifetime: float = NONCE_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        secret: bytes | None = None,
    ) -> None:
        self.credentials = credentials
        self.realm = realm
        self.lifetime = lifetime
        self._clock = clock
        self._random = random_bytes
        self._secret = random_bytes(32) if secret is None else secret
        # (nonce, nc, cnonce) of accepted credentials -> when, oldest first.
        self._accepted: OrderedDict[tuple[str, str | None, str | None], float] = OrderedDict()

    def challenge(self, *, stale: bool = False) -> str:
        """A ``Proxy-Authenticate`` value with a fresh nonce."""
        nonce = make_nonce(self._secret, int(self._clock()), self._random(8))
        return build_challenge(self.realm, nonce, algorithm="MD5", qop=("auth",), stale=stale)

    def check(self, request: Request) -> CredentialsCheck:
        """The verdict on ``request``'s ``Proxy-Authorization`` (or ``Authorization``)."""
        now = self._clock()
        headers = request.headers
        values = [*headers.get_all("Proxy-Authorization"), *headers.get_all("Authorization")]
        result = check_credentials(
            values,
            credentials=self.credentials,
            realm=self.realm,
            method=request.method,
            # RFC 7616 §3.4.6 names the Request-URI; LiveKit (Retell) hashes the To URI.
            uris=(str(request.uri), str(request.to.uri)),
            secret=self._secret,
            now=now,
            lifetime=self.lifetime,
            body=request.body,
        )
        auth = result.authorization
        if result.verdict is Verdict.ACCEPTED and auth is not None:
            self._forget(now)
            key = (auth.nonce, auth.nc, auth.cnonce)
            if key in self._accepted:
                return CredentialsCheck(Verdict.MISSING, auth, "credentials replayed")
            self._accepted[key] = now
            while len(self._accepted) > _REPLAY_MEMORY:
                self._accepted.popitem(last=False)
        return result

    def _forget(self, now: float) -> None:
        """Drop accepted credentials whose nonce has expired anyway."""
        while self._accepted:
            key, at = next(iter(self._accepted.items()))
            if now - at <= self.lifetime:
                return
            del self._accepted[key]
