"""Getting the image bytes out of a request: a multipart field `image` or a raw image/* body,
counted while streaming so an oversized body is refused before it is all buffered."""
from __future__ import annotations

import asyncio
import re
import shutil
from typing import Callable

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from app.errors import BadRequest, Busy, ClientClosed, MalformedBody, TooLarge, UnsupportedMedia, UploadTooSlow


MAX_FILES, MAX_FIELDS, MAX_PART_SIZE, MAX_HEADER = 4, 16, 64 * 1024, 4096
# where a body's first bytes are shown to ``peek`` while the rest is still arriving: a JPEG's size comes after
# its EXIF block (up to 64 KiB) and ICC profile; a second look for the rare header that does not fit the first
PEEK_AT = (128 * 1024, 1024 * 1024)
_IMAGE_PART = re.compile(rb'Content-Disposition:[^\r\n]*\bname=(?:"image"|image\b)[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n',
                         re.I)


def image_head(prefix: bytes, multipart: bool) -> bytes | None:
    """The image's first bytes in a body's ``prefix``: the prefix itself for a raw image/* body, the start of
    the part named ``image`` of a multipart one (None when its part header is not in the prefix)."""
    if not multipart:
        return prefix
    match = _IMAGE_PART.search(prefix)
    return prefix[match.end():] if match else None


def longest_part_header(body: bytes) -> int:
    """The longest Content-Disposition header line in a multipart body (where a huge filename shows)."""
    longest, start = 0, body.find(b"Content-Disposition")
    while start != -1:
        end = body.find(b"\r\n", start)
        longest = max(longest, (len(body) if end == -1 else end) - start)
        start = body.find(b"Content-Disposition", start + 1)
    return longest


class UploadBudget:
    """Bytes held by all unfinished uploads together; past ``limit`` a new chunk is refused (503)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


async def read_limited(request: Request, limit: int, timeout_s: float | None = None,
                       budget: UploadBudget | None = None, peek: Callable[[bytes], None] | None = None) -> bytes:
    """The request body. Raises TooLarge as soon as it exceeds ``limit`` bytes, UploadTooSlow when it takes
    longer than ``timeout_s`` to arrive, Busy when unfinished uploads together would hold more than ``budget``,
    ClientClosed when the client leaves mid-body. ``peek`` sees the first bytes of a long body (``PEEK_AT``)
    while the rest arrives, and may refuse it by raising: the answer then goes out at once, and the server
    (uvicorn, app/connections.py) discards the rest of the body as it comes, so the connection is not reset."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {declared} bytes; the limit is {limit}")
    buf = bytearray()
    held = 0
    looks = list(PEEK_AT) if peek is not None else []

    async def read() -> None:
        nonlocal held
        async for chunk in request.stream():
            if looks and len(buf) + len(chunk) >= looks[0]:
                while looks and len(buf) + len(chunk) >= looks[0]:
                    looks.pop(0)
                peek(bytes(buf) + chunk)
            if budget is not None:
                if not budget.take(len(chunk)):
                    raise Busy("the server holds too many unfinished uploads; retry shortly")
                held += len(chunk)
            buf.extend(chunk)
            if len(buf) > limit:
                raise TooLarge(f"the body exceeds the limit of {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise UploadTooSlow(f"the body did not arrive within {timeout_s:g} s ({len(buf)} bytes came); "
                                "send it faster or in a smaller size") from None
    except ClientDisconnect:
        raise ClientClosed(f"the client closed the connection after {len(buf)} bytes of the body") from None
    finally:
        if budget is not None:
            budget.give(held)
    return bytes(buf)


async def image_bytes(request: Request, limit: int, timeout_s: float | None = None,
                      budget: UploadBudget | None = None, peek: Callable[[bytes], None] | None = None) -> bytes:
    """The uploaded image's bytes. Raises TooLarge, UnsupportedMedia, BadRequest or MalformedBody (and what
    ``read_limited`` raises) with a message that says what to send. ``peek``: shown the image's first bytes
    while a long upload arrives (``read_limited``), to refuse it before the rest is read."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    look = None
    if peek is not None:
        def look(prefix: bytes) -> None:
            if (head := image_head(prefix, multipart)) is not None:
                peek(head)
    if content_type.startswith("image/"):
        return await read_limited(request, limit, timeout_s, budget, look)
    if not multipart:
        raise UnsupportedMedia(f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data "
                                "with a file field named 'image', or the raw image with an image/* content type")
    body = await read_limited(request, limit, timeout_s, budget, look)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=MAX_FILES, max_fields=MAX_FIELDS,
                                                         max_part_size=MAX_PART_SIZE)
    except (MultiPartException, HTTPException) as exc:  # starlette names the limit hit (files, fields, part size)
        message = getattr(exc, "message", None) or getattr(exc, "detail", "")
        if (longest := longest_part_header(body)) > MAX_HEADER:
            raise MalformedBody(f"a multipart part header (its name or filename) is {longest} bytes long; "
                                    f"the limit is {MAX_HEADER}") from None
        raise MalformedBody(f"the multipart body was refused: {message} (send one file field named "
                                f"'image'; at most {MAX_FILES} files, {MAX_FIELDS} fields, non-file fields and "
                                f"part headers under {MAX_PART_SIZE} bytes)") from None
    except Exception:
        raise MalformedBody("the multipart body cannot be parsed") from None
    try:
        fields = form.getlist("image")
        if len(fields) > 1:
            raise BadRequest(f"the multipart body has {len(fields)} fields named 'image'; send exactly one")
        field = fields[0] if fields else None
        if not isinstance(field, UploadFile):
            raise BadRequest("the multipart body needs a file field named 'image'")
        return await field.read()
    finally:
        await form.close()


ZIP_TYPES = ("application/zip", "application/x-zip-compressed")


async def save_video(request: Request, target, limit: int, timeout_s: float) -> str | None:
    """Stream an uploaded clip (or zip of photos) to the file ``target`` (a multipart field `file`, or a raw
    video/*, application/zip or application/octet-stream body), never holding more than a chunk in memory; the upload's file name (or
    None). Raises TooLarge past ``limit`` bytes, UploadTooSlow after ``timeout_s``, UnsupportedMedia for
    another content type, BadRequest or MalformedBody for a multipart body without one `file`, ClientClosed
    when the client leaves mid-body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = content_type.startswith("video/") or content_type in ZIP_TYPES + ("application/octet-stream",)
    if not raw and content_type != "multipart/form-data":
        raise UnsupportedMedia(f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data "
                               "with a file field named 'file', or the raw clip with a video/* content type (a "
                               "zip of photos: application/zip)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {declared} bytes; the limit is {limit} (MONET_JOBS_MAX_UPLOAD_BYTES)")
    received = 0

    async def counted():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge(f"the body exceeds the limit of {limit} bytes (MONET_JOBS_MAX_UPLOAD_BYTES)")
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
        return message

    async def read() -> str | None:
        if raw:
            with open(target, "wb") as out:
                async for chunk in Request(request.scope, counted).stream():
                    out.write(chunk)
            return None
        try:  # file parts spool to disk past 1 MB (starlette)
            form = await Request(request.scope, counted).form(max_files=1, max_fields=MAX_FIELDS,
                                                              max_part_size=MAX_PART_SIZE)
        except (MultiPartException, HTTPException) as exc:
            message = getattr(exc, "message", None) or getattr(exc, "detail", "")
            raise MalformedBody(f"the multipart body was refused: {message} (send one file field named 'file')") \
                from None
        try:
            field = form.get("file")
            if not isinstance(field, UploadFile):
                raise BadRequest("the multipart body needs a file field named 'file'")
            with open(target, "wb") as out:
                await asyncio.to_thread(shutil.copyfileobj, field.file, out, 1024 * 1024)
            return field.filename
        finally:
            await form.close()

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise UploadTooSlow(f"the clip did not arrive within {timeout_s:g} s ({received} bytes came); "
                            "MONET_JOBS_UPLOAD_TIMEOUT_S") from None
    except ClientDisconnect:
        raise ClientClosed(f"the client closed the connection after {received} bytes of the body") from None
