"""The filter's HTTP side: Prometheus metrics and a health check for load balancers, systemd
watchdogs and ``gpgfilter doctor``, on one loopback listener."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gpgfilter.process.config import Endpoint


@dataclass(frozen=True, slots=True)
class Health:
    """``ok`` is what a load balancer acts on; ``checks`` say why, for a human."""

    ok: bool
    status: str  # "ok", "draining" or "failing"
    checks: dict[str, str] = field(default_factory=dict)


HealthCheck = Callable[[], Awaitable[Health]]
Refresh = Callable[[], Awaitable[None]]


def make_app(
    registry: CollectorRegistry, health: HealthCheck, before_scrape: Refresh | None = None
) -> web.Application:
    """``before_scrape`` reads what the collectors report from slow sources (the key store)
    off the event loop: collecting itself runs on the loop and must not block it."""

    async def metrics(_request: web.Request) -> web.Response:
        if before_scrape is not None:
            await before_scrape()
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def check(_request: web.Request) -> web.Response:
        result = await health()
        body = json.dumps({"status": result.status, "checks": result.checks}, indent=2)
        return web.Response(
            text=body + "\n", status=200 if result.ok else 503, content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", check)
    return app


async def start_monitoring(
    endpoint: Endpoint,
    registry: CollectorRegistry,
    health: HealthCheck,
    before_scrape: Refresh | None = None,
) -> web.AppRunner:
    runner = web.AppRunner(make_app(registry, health, before_scrape), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if endpoint.is_unix:
        site = web.UnixSite(runner, endpoint.path)
    else:
        site = web.TCPSite(runner, endpoint.host, endpoint.port, reuse_address=True)
    await site.start()
    return runner
