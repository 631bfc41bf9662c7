"""What the service refuses, as exceptions that carry no HTTP status: each says what went wrong and what to
do. ``STATUS`` maps them to status codes in this one place; `install` registers the one handler that answers
them (REST), and the UI maps through ``status_of`` for its log line."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from model.translator import NonFiniteOutput

log = logging.getLogger("monet.service")


class Refusal(Exception):
    """A request the service answers without a painting. ``detail`` is for the client; ``retry_after``
    (seconds) says the refusal is temporary."""

    retry_after: int | None = None

    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if retry_after is not None:
            self.retry_after = retry_after


class BadImage(Refusal):
    """Not an image, or damaged, truncated or forged data; an empty body."""


class MalformedBody(Refusal):
    """A body that cannot be parsed as what its content type says (a refused multipart body)."""


class NotAcceptable(Refusal):
    """The client accepts none of the output formats."""


class UploadTooSlow(Refusal):
    """The body did not arrive within the upload deadline."""


class TooLarge(Refusal):
    """A body over the byte limit, or an image over the pixel limit (read from its header)."""


class UnsupportedMedia(Refusal):
    """A content type or an image format the service does not take."""


class BadRequest(Refusal):
    """A well-formed request that asks for something invalid (a multipart body without one `image` file)."""


class UnknownStyle(Refusal):
    """A style the catalogue does not have; the detail lists the ones it has."""


class UnknownJob(Refusal):
    """No video job with that id (never made, deleted, or expired)."""


class NotFinished(Refusal):
    """The video job has no result (yet): it is queued, running, failed or cancelled."""


class Unauthorized(Refusal):
    """An admin request without the right token."""


class ClientClosed(Refusal):
    """The client closed its connection before its answer; nobody reads the response."""


class Busy(Refusal):
    """Temporarily over capacity (queue, upload buffer, decode budget) or shutting down: retry shortly."""

    retry_after = 1


class NotReady(Refusal):
    """The model is loading (temporary, ``retry_after`` set) or could not be loaded (permanent)."""


class TimedOut(Refusal):
    """The request's deadline passed before its turn."""


CLIENT_CLOSED = 499  # nginx's status for a client that closed its connection before the answer

STATUS: dict[type[Exception], int] = {
    BadImage: 400, MalformedBody: 400, NotAcceptable: 406, UploadTooSlow: 408, TooLarge: 413,
    UnsupportedMedia: 415, BadRequest: 422, UnknownStyle: 404, UnknownJob: 404, NotFinished: 409, Unauthorized: 401, ClientClosed: CLIENT_CLOSED,
    NonFiniteOutput: 500,
    Busy: 503, NotReady: 503, TimedOut: 504,
}


def documented() -> dict[int, str]:
    """Each status code a client can get from a refusal, with what it means (the classes' first docstring
    lines): what OpenAPI documents. 499 is left out: nobody reads it."""
    texts: dict[int, list[str]] = {}
    for kind, code in STATUS.items():
        if code != CLIENT_CLOSED:
            texts.setdefault(code, []).append((kind.__doc__ or kind.__name__).strip().splitlines()[0].rstrip("."))
    return {code: "; ".join(lines) for code, lines in sorted(texts.items())}


def status_of(exc: Exception) -> int:
    """The HTTP status of a refusal (or of a model fault: NonFiniteOutput is the server's, 500)."""
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def detail_of(exc: Exception) -> str:
    if isinstance(exc, NonFiniteOutput):  # the weights' fault, not the client's
        return f"server fault: {exc}"
    return getattr(exc, "detail", str(exc))


def answer(exc: Exception) -> JSONResponse:
    """The JSON answer to a refusal: its status, its detail, and Retry-After when it is temporary."""
    retry = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry)} if retry is not None else {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": detail_of(exc)}, status_code=status_of(exc), headers=headers or None)


def server_fault() -> JSONResponse:
    """The answer to an unexpected fault of the server's own (logged where it is caught)."""
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def answer_logged(exc: Exception) -> JSONResponse:
    """``answer``, with a log line first for a model fault (NonFiniteOutput: the server's, not the client's)."""
    if isinstance(exc, NonFiniteOutput):
        log.error("non-finite output: %s", exc)
    return answer(exc)


def install(app: FastAPI) -> None:
    """Answer every refusal and model fault raised under ``app``'s routes through ``answer_logged``."""

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        return answer_logged(exc)

    app.add_exception_handler(Refusal, refused)
    app.add_exception_handler(NonFiniteOutput, refused)
