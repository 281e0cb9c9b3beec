"""The admin HTTP endpoint: liveness, readiness, metrics, and the calls in progress.

* ``GET /healthz``: 200 as long as the process serves HTTP at all.
* ``GET /readyz``: 200 when every readiness check passes (registered with the PBX, ...), else
  503; the body lists each check as ``name: ok`` or ``name: failing``. With several routes
  (``[[routes]]``) "registered" means every route is; ``GET /readyz?route=NAME`` checks one
  route alone (``route NAME registered: ok``; 404 for a route that is not configured).
* ``GET /metrics``: the Prometheus text exposition of :class:`~sbc.ops.metrics.Metrics`.
* ``GET /calls``: the calls in progress as JSON (:func:`describe_call`), oldest first;
  ``GET /calls/{call_uuid}`` one of them (404 when there is no such call).
* ``DELETE /calls/{call_uuid}``: end that call, BYE on every leg that is up (CANCEL while it
  rings): 202 once the call was told, 404 when there is no such call.

With a token (``[admin] token``, ``token_file`` or the ``admin_token`` credential) every request
must carry ``Authorization: Bearer <token>`` (compared in constant time); any other gets 401.

Readiness checks are plain callables given by the service, so new ones (media, calls) can be added
without touching this module.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from sbc.b2bua.call import Call
from sbc.b2bua.calls import CallManager
from sbc.b2bua.leg import Role
from sbc.b2bua.messages import Peer
from sbc.ops.metrics import CONTENT_TYPE, Metrics

__all__ = ["AdminServer", "describe_call"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger(__name__)


class AdminServer:
    """aiohttp on ``host:port`` (port 0 picks a free one; see :attr:`address`)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        ready_checks: Mapping[str, Callable[[], bool]] | None = None,
        bridge: CallManager | None = None,
        token: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        route_checks: Mapping[str, Callable[[], bool]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.ready_checks: dict[str, Callable[[], bool]] = dict(ready_checks or {})
        # Each route's own readiness (its registration), by route name: /readyz?route=NAME.
        self.route_checks: dict[str, Callable[[], bool]] = dict(route_checks or {})
        self.bridge = bridge
        self._token = None if token is None else token.encode()
        self._wall = wall_clock
        self.app = web.Application(middlewares=[self._authorized])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/calls", self._calls)
        self.app.router.add_get("/calls/{call_uuid}", self._call)
        self.app.router.add_delete("/calls/{call_uuid}", self._hang_up)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()  # e.g. the port is taken: release what setup() made
            raise
        self._runner = runner
        bound = runner.addresses
        self.address = (str(bound[0][0]), int(bound[0][1])) if bound else (self.host, self.port)
        log.info("admin_http_started", address=f"{self.address[0]}:{self.address[1]}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def is_ready(self) -> tuple[bool, dict[str, bool]]:
        results: dict[str, bool] = {}
        for name, check in self.ready_checks.items():
            try:
                results[name] = bool(check())
            except Exception:
                log.exception("readiness_check_failed", check=name)
                results[name] = False
        return all(results.values()), results

    @web.middleware
    async def _authorized(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With a token set, only requests bearing it reach the handlers (RFC 6750 §2.1)."""
        if self._token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self._token
            ):
                log.info(
                    "admin_unauthorized",
                    remote=request.remote,
                    method=request.method,
                    path=request.path,
                )
                return web.json_response(
                    {"error": "a bearer token is required"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="sbc admin"'},
                )
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        route = request.query.get("route")
        if route is not None:
            return self._route_ready(route)
        ready, results = self.is_ready()
        body = "".join(f"{name}: {'ok' if ok else 'failing'}\n" for name, ok in results.items())
        return web.Response(status=200 if ready else 503, text=body or "ok\n")

    def _route_ready(self, route: str) -> web.Response:
        check = self.route_checks.get(route)
        if check is None:
            known = ", ".join(self.route_checks) or "none"
            return web.Response(status=404, text=f"no route {route!r} (routes: {known})\n")
        try:
            ok = bool(check())
        except Exception:
            log.exception("readiness_check_failed", check=f"route {route}")
            ok = False
        status = "ok" if ok else "failing"
        return web.Response(status=200 if ok else 503, text=f"route {route} registered: {status}\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def _calls(self, request: web.Request) -> web.Response:
        now = self._wall()
        calls = [] if self.bridge is None else list(self.bridge.calls.values())
        calls.sort(key=lambda call: call.started)
        return web.json_response({"calls": [describe_call(call, now) for call in calls]})

    def _find(self, request: web.Request) -> Call:
        call_uuid = request.match_info["call_uuid"]
        call = None if self.bridge is None else self.bridge.calls.get(call_uuid)
        if call is None:
            raise web.HTTPNotFound(
                text=f'{{"error": "no call {call_uuid} in progress"}}',
                content_type="application/json",
            )
        return call

    async def _call(self, request: web.Request) -> web.Response:
        return web.json_response(describe_call(self._find(request), self._wall()))

    async def _hang_up(self, request: web.Request) -> web.Response:
        call = self._find(request)
        assert self.bridge is not None  # _find found the call there
        log.info("admin_hang_up", call_uuid=call.call_uuid, remote=request.remote)
        self.bridge.hang_up(call.call_uuid, reason="admin")
        return web.json_response(
            {"call_uuid": call.call_uuid, "state": call.state.value, "hanging_up": True},
            status=202,
        )


def describe_call(call: Call, now: float) -> dict[str, Any]:
    """A live call as ``GET /calls`` shows it: ids (``pbx_call_id`` and ``retell_call_id``
    whichever side called, ``human_call_id`` after a transfer by INVITE), who called whom,
    state, times (wall clock, seconds), each leg, and the media counters per side (``a`` the
    caller's leg, ``b`` the far leg)."""
    humans = [leg for leg in call.all_legs if leg.role is Role.HUMAN]
    media = call.bridge.media
    sides: dict[str, Any] = {}
    backend = None
    if media is not None:
        try:
            stats = media.stats()
        except Exception:
            log.exception("media_stats_failed", call_uuid=call.call_uuid)
        else:
            sides = stats.get("sides", {})
            backend = stats.get("backend")
    return {
        "call_uuid": call.call_uuid,
        "direction": f"{call.origin.peer.value}->{call.bridge.b.peer.value}",
        "pbx_call_id": call.call_id_of(Peer.PBX),
        "retell_call_id": call.call_id_of(Peer.RETELL),
        "human_call_id": humans[-1].call_id if humans else None,
        "caller": call.caller.number,
        "caller_name": call.caller.display or None,
        "called": call.called,
        "state": call.state.value,
        "started": call.started,
        "answered": call.answered,
        "duration": round(max(0.0, now - call.started), 3),
        "talk": None if call.answered is None else round(max(0.0, now - call.answered), 3),
        "legs": [
            {
                "role": leg.role.value,
                "peer": leg.peer.value,
                "call_id": leg.call_id,
                "state": leg.state.value,
                "status": leg.status,
            }
            for leg in call.all_legs
        ],
        "transfers": [
            {"target": t.target, "mode": t.mode, "outcome": t.outcome, "status": t.status}
            for t in call.transfers
        ],
        "media": {"backend": backend, "sides": sides},
    }
