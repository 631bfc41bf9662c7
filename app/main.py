"""`create_app(settings)`: the FastAPI app with its routes, metrics, access logs and the Gradio UI."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import errors
from app.config import Settings
from app.fastpath import TranslateEndpoint, fast_params
from app.observability import Metrics, ObservabilityMiddleware
from app.routes import admin, router
from app.service import PaintingService
from app.uploads import UploadBudget


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch_size)
    service = PaintingService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    # FastAPIOffline serves Swagger UI (/docs) from files inside its wheel, not a CDN. ReDoc is dropped: its
    # page still fetches its logo from cdn.redoc.ly.
    app = FastAPIOffline(title="monet-cyclegan", version="0.1.0", lifespan=lifespan, favicon_url="/favicon.ico",
                         redoc_url=None,
                         description="Turn photos into paintings in Claude Monet's style. POST an image to /translate.")
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    app.state.upload_budget = UploadBudget(settings.upload_buffer_bytes)
    app.include_router(router)
    if settings.admin_token is not None and settings.admin_token.get_secret_value():  # an empty token: unset
        app.include_router(admin)

    errors.install(app)  # refusals -> status codes, in one place

    if settings.ui:
        from app.ui import mount_ui

        app = mount_ui(app, service)
    app.add_middleware(ArrivalGate, service=service)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: it counts and logs the gate's 503s
    take_fast_path(app, ObservabilityMiddleware(ArrivalGate(TranslateEndpoint(app), service), metrics))
    return app


def take_fast_path(app: FastAPI, fast) -> None:
    """Put ``fast`` in front of the app's whole stack for a POST /translate whose query ``fast_params`` reads
    (app/fastpath.py); every other request goes through the stack Starlette builds, as before. (FastAPIOffline
    builds the FastAPI object, so this wraps what it builds rather than subclassing it.)"""
    build = app.build_middleware_stack

    def build_with_fast_path():
        stack = build()

        async def dispatch(scope, receive, send) -> None:
            if (scope["type"] == "http" and scope["path"] == "/translate" and scope["method"] == "POST"
                    and (params := fast_params(scope.get("query_string", b""))) is not None):
                scope["app"], scope["fast_params"] = app, params
                await fast(scope, receive, send)
                return
            await stack(scope, receive, send)

        return dispatch

    app.build_middleware_stack = build_with_fast_path


class ArrivalGate:
    """Answers a POST /translate as it arrives when the service would refuse it anyway (queue full, shutting
    down, loading): no routing, no parameter validation, no multipart parsing, so under overload a 503 costs
    next to nothing. The answer goes out at once, before the body is read: the server (uvicorn with
    app/connections.py's protocol) discards the rest of the body as it arrives and keeps the connection until it
    has, so the client is not reset. Draining it here first put the whole burst's uploads ahead of every 503.
    A request let in holds its place in the queue while its body arrives (``PaintingService.arrival``; the
    route's slot takes it over), so the next arrivals of a burst are judged with it counted."""

    def __init__(self, app, service: PaintingService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/translate"):
            await self.app(scope, receive, send)
            return
        refusal, hold = self.service.arrival()
        if refusal is not None:
            await errors.answer(refusal)(scope, receive, send)
            return
        scope.setdefault("state", {})["hold"] = hold
        try:
            await self.app(scope, receive, send)
        finally:
            if hold is not None:  # its body never came in time, or the request ended before its slot
                hold.release()
