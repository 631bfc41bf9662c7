"""POST /translate as a plain ASGI endpoint, beside the FastAPI route that describes it in /docs.

A painting request is the service's one hot path. Through FastAPI it crossed nine middleware and routing
layers, dependency solving and a pydantic validation of its query before reaching the service: about a
quarter of the event loop's time per request (docs/architecture.md, "The request path's own cost").
``TranslateEndpoint`` takes the request straight from the app's ``__call__``, under the same access log and
metrics (ObservabilityMiddleware) and the same arrival gate (ArrivalGate), and runs the route's own body
(``app.routes.paint_request``), answering refusals with the same JSON.

Only requests whose query it can read exactly as the route would take this path (no query, or known
parameters once each with plain values); anything else goes through FastAPI, which then answers with its own
422 wording. The route stays registered, so /docs and the OpenAPI schema describe POST /translate as before.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from app import errors
from app.encoding import FORMATS
from app.routes import paint_request, router, translate
from model.translator import NonFiniteOutput

log = logging.getLogger("monet.service")

_NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,12})?")
_STYLE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def route_bounds() -> dict[str, tuple[float, float]]:
    """The numeric parameters' (ge, le) bounds, read from the route's own Query declarations (app/routes.py),
    so the two paths cannot disagree about what is in range."""
    bounds = {}
    for name in ("strength", "stroke_scale"):
        limits = {key: getattr(m, key) for m in inspect.signature(translate).parameters[name].default.metadata
                  for key in ("ge", "le") if hasattr(m, key)}
        bounds[name] = (float(limits["ge"]), float(limits["le"]))
    return bounds


_BOUNDS = route_bounds()


def fast_params(query_string: bytes) -> dict | None:
    """The route's parameters from a query string, when each one is present at most once with a value the route
    would take as it is; None when FastAPI should read it (an unknown or repeated name, a value it would
    refuse or coerce), so every answer to an odd query keeps the route's exact wording."""
    params: dict = {"format": None, "strength": 1.0, "stroke_scale": None, "style": None}
    if not query_string:
        return params
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    seen = set()
    for name, value in pairs:
        if name in seen or name not in params:
            return None
        seen.add(name)
        if name == "format":
            if value not in FORMATS:
                return None
            params[name] = value
        elif name == "style":
            if not _STYLE.fullmatch(value):
                return None
            params[name] = value
        else:
            if not _NUMBER.fullmatch(value):
                return None
            number = float(value)
            low, high = _BOUNDS[name]
            if not (math.isfinite(number) and low <= number <= high):
                return None
            params[name] = number
    return params


class TranslateEndpoint:
    """POST /translate for requests whose query ``fast_params`` reads (app.main.take_fast_path decides). The
    route it stands in for (app/routes.py) is what the access log and metrics name, and its body
    (``paint_request``) is what it runs."""

    def __init__(self, app):
        self.app = app
        self.route = next(r for r in router.routes if r.path == "/translate")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        params = scope["fast_params"]
        try:
            response = await paint_request(Request(scope, receive), params["format"], params["strength"],
                                           params["stroke_scale"], params["style"])
        except (errors.Refusal, NonFiniteOutput) as exc:
            response = errors.answer_logged(exc)
        except Exception:  # a fault of ours: logged with its traceback, answered as FastAPI's 500 would be
            log.exception("POST /translate failed")
            response = errors.server_fault()
        await response(scope, receive, send)
