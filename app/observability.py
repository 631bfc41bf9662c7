"""Prometheus metrics (one registry per app) and structured JSON access logs."""
from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("monet.access")


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("monet_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        ms = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.queue_seconds = Histogram("monet_queue_seconds", "time a request waited for its batch", buckets=ms,
                                       registry=self.registry)
        self.compute_seconds = Histogram("monet_compute_seconds", "forward pass time per batch", buckets=ms,
                                         registry=self.registry)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("monet_batch_size", "images per forward pass", buckets=sizes,
                                    registry=self.registry)
        self.queue_depth = Gauge("monet_queue_depth", "requests waiting for the model", registry=self.registry)
        self.decodes = Counter("monet_decodes", "uploads decoded (each admitted first: a refusal decodes nothing)",
                               registry=self.registry)
        self.in_progress = Gauge("monet_requests_in_progress", "HTTP requests being answered (the metrics "
                                 "request that reads it included)", registry=self.registry)
        self.paintings = Counter("monet_paintings", "paintings answered, by style (the catalogue's names: at most "
                                 "MONET_MAX_STYLES)", ["style"], registry=self.registry)
        self.styles_loaded = Gauge("monet_styles_loaded", "styles loaded (warmed up, in memory)",
                                   registry=self.registry)
        self.reloads = Counter("monet_reloads", "style reloads (SIGHUP, POST /admin/reload) by outcome: ok, or "
                               "refused when some file was refused", ["outcome"], registry=self.registry)
        self.jobs = Gauge("monet_jobs", "video jobs by state (queued, running, done, failed, cancelled)",
                          ["state"], registry=self.registry)
        self.refused_by_wait = Counter("monet_refused_by_wait", "requests refused at admission because the work "
                                       "ahead of them would pass their deadline, by lane (batch, large)", ["lane"],
                                       registry=self.registry)
        self.seconds_per_megapixel = Gauge("monet_seconds_per_megapixel", "measured painting time per megapixel "
                                           "(moving average), by lane (batch, large): admission's estimate",
                                           ["lane"], registry=self.registry)
        self.frames_painted = Counter("monet_video_frames_painted", "video frames painted by jobs",
                                      registry=self.registry)
        self.connections_refused = Counter(
            "monet_connections_refused", "connections closed by the server before a request: busy (over "
            "MONET_MAX_CONNECTIONS, all in requests), evicted (the oldest idle one, to make room), header_timeout, "
            "body_timeout (the rest of a body answered early did not come)",
            ["reason"], registry=self.registry)


def route_label(scope: Scope, entry: Scope | None = None) -> str:
    """A bounded label: the matched route's template, '/ui' for the whole UI, else 'unmatched'.

    FastAPI puts its own routes in the scope; plain Starlette routes and mounts (/openapi.json, the
    offline docs' static files) are looked up among the app's routes, with ``entry``, the scope as it
    came in (routing rewrites the scope's paths in place)."""
    path = scope.get("path", "")
    if path == "/ui" or path.startswith("/ui/"):
        return "/ui"
    route = scope.get("route")
    if route is None and (app := scope.get("app")) is not None:
        route = _matching(getattr(app, "routes", []), {**(entry or scope), "type": "http"})
    return getattr(route, "path", None) or "unmatched"


def _matching(routes, probe: Scope):
    """The route with a path template among ``routes`` that fully matches ``probe``, looking inside included
    routers (recent FastAPI lists an included router as one entry of ``app.routes``, without a path: the arrival
    gate's 503s for POST /translate were counted as "unmatched")."""
    for route in routes:
        if route.matches(probe)[0] != Match.FULL:
            continue
        if getattr(route, "path", None):
            return route
        inner = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if inner and (found := _matching(inner, probe)) is not None:
            return found
    return None


class ObservabilityMiddleware:
    """Counts every response by route and status and writes one JSON access-log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        scope.setdefault("state", {})["arrived"] = time.monotonic()  # what a drain compares with (SIGTERM)
        entry = dict(scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_progress.dec()
            route = route_label(scope, entry)
            self.metrics.requests.labels(route, str(status)).inc()
            if route != "/ui":
                access_log.info(json.dumps({
                    "method": scope.get("method"), "path": scope.get("path"), "route": route, "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "client": (scope.get("client") or ["?"])[0],
                    **({"style": style} if (style := scope["state"].get("style")) else {}),
                }))
