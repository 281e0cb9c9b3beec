"""The admin HTTP endpoint: liveness, readiness and metrics.

* ``GET /healthz``: 200 as long as the process serves HTTP at all.
* ``GET /readyz``: 200 when every readiness check passes (registered with the PBX, ...), else
  503; the body lists each check as ``name: ok`` or ``name: failing``.
* ``GET /metrics``: the Prometheus text exposition of :class:`~sbc.ops.metrics.Metrics`.

Readiness checks are plain callables given by the service, so new ones (media, calls) can be added
without touching this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog
from aiohttp import web

from sbc.ops.metrics import CONTENT_TYPE, Metrics

__all__ = ["AdminServer"]

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
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.ready_checks: dict[str, Callable[[], bool]] = dict(ready_checks or {})
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
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

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, results = self.is_ready()
        body = "".join(f"{name}: {'ok' if ok else 'failing'}\n" for name, ok in results.items())
        return web.Response(status=200 if ready else 503, text=body or "ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response
