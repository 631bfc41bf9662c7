"""Getting the image bytes out of a request: a multipart field `image` or a raw image/* body,
counted while streaming so an oversized body is refused before it is all buffered."""
from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.service import ServiceError


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"the body is {declared} bytes; the limit is {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ServiceError(413, f"the body exceeds the limit of {limit} bytes")
    return bytes(buf)


async def image_bytes(request: Request, limit: int) -> bytes:
    """The uploaded image's bytes. Raises ServiceError 413/415/422/400 with a message that says what to send."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("image/"):
        return await read_limited(request, limit)
    if content_type != "multipart/form-data":
        raise ServiceError(415, f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data "
                                "with a file field named 'image', or the raw image with an image/* content type")
    body = await read_limited(request, limit)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception:
        raise ServiceError(400, "the multipart body cannot be parsed") from None
    try:
        field = form.get("image")
        if not isinstance(field, UploadFile):
            raise ServiceError(422, "the multipart body needs a file field named 'image'")
        return await field.read()
    finally:
        await form.close()
