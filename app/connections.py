"""What the HTTP server does with connections, below the app: a cap on open connections, a deadline for a
request's line and headers, and a drain that never closes a connection mid-request.

uvicorn takes its HTTP protocol as a class (``uvicorn.Config(http=...)``); ``guarded_protocol`` returns its
httptools protocol with these three rules added. uvicorn's own ``limit_concurrency`` is not enough: it
answers 503 only once a request's headers are complete, so sockets that send nothing hold a file descriptor
each for as long as their clients like.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import struct
import sys
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("monet.connections")
FRESH_GRACE_S = 0.5


def raw_response(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 answer with a JSON ``detail`` that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """httptools' protocol with a connection cap, a header deadline, a drain that never closes a connection a
    client may be about to use, and a lingering close for answers sent before their request's body was in.

    - **Cap** (``max_connections``): a connection past the cap evicts the oldest one that is not in a request
      (one that never sent a byte first, then one still sending its headers, then an idle keep-alive one), so
      idle sockets cannot lock real clients out. When every open connection is in a request, the new one is
      answered 503 and closed at once.
    - **Header deadline** (``header_timeout_s``): a new connection, and each next request on a kept-alive one
      from its first byte, must finish its request line and headers in time, else 408 and close.
    - **Drain**: once draining, every answer carries ``Connection: close`` (requests in progress included), a
      connection whose next request has begun arriving is kept until that request is answered, and a
      connection idle between requests when the server stops is kept until its next request (answered 503
      with ``Connection: close``) or its keep-alive timeout, whichever comes first.
    - **Answered before the body was in** (the arrival gate's 503, a large photo refused from its header,
      app/uploads.py): uvicorn discards the rest of the body as it arrives; the connection is kept until it has
      (never evicted or closed mid-body by a drain, nor by the answer's own ``Connection: close``:
      ``LingeringClose``; that would reset it and lose the answer), for at most ``body_timeout_s``.
    """

    max_connections: int | None = None
    header_timeout_s: float | None = None
    body_timeout_s: float | None = None  # the rest of a body answered before it was in must come within this
    drain = None  # anything with a ``draining`` flag, set on SIGTERM (the PaintingService)
    on_refusal = staticmethod(lambda reason: None)  # counts refused connections (a metric)

    last_opened = 0.0  # time.monotonic() of the newest connection, on the class a server uses

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._opened = type(self).last_opened = time.monotonic()
        self._requests = 0  # requests whose headers completed on this connection
        self._receiving = False  # a request's line or headers have begun arriving but are not complete
        self._header_timer = None
        self._body_timer = None  # while the rest of an answered request's body is discarded
        self._close_after_body = False
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            victim = self._eviction_candidate()
            if victim is None:
                self._refuse(503, "Service Unavailable", "busy",
                             f"the server holds {self.max_connections} connections, all in requests; retry shortly")
                return
            victim._refuse(503, "Service Unavailable", "evicted",
                           "closed to make room for a new connection: the connection limit is reached")
        self._arm_header_timer()

    def _eviction_candidate(self) -> "GuardedProtocol | None":
        def rank(c: GuardedProtocol):
            if c._receiving:
                return 1
            return 0 if c._requests == 0 else 2

        idle = [c for c in self.connections if isinstance(c, GuardedProtocol) and c is not self
                and not c.transport.is_closing() and not c._discarding()
                and (c.cycle is None or c.cycle.response_complete)]
        return min(idle, key=lambda c: (rank(c), c._opened), default=None)

    def _refuse(self, status: int, reason: str, kind: str, detail: str) -> None:
        """Answer (unless nothing was asked yet) and close; one log line and one count."""
        self._cancel_header_timer()
        if kind != "evicted" or self._receiving or self._requests == 0:  # never between a kept-alive
            self.transport.write(raw_response(status, reason, detail))  # connection's requests: it may be reused
        self.transport.close()
        log.info(json.dumps({"connection": kind, "status": status, "client": (self.client or ["?"])[0],
                             "open_s": round(time.monotonic() - self._opened, 2)}))
        self.on_refusal(kind)

    def _arm_header_timer(self) -> None:
        if self.header_timeout_s is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:  # armed only while no request's headers are complete
        self._header_timer = None
        if not self.transport.is_closing():
            self._refuse(408, "Request Timeout", "header_timeout",
                         f"the request line and headers did not arrive within {self.header_timeout_s:g} s")

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _discarding(self) -> bool:
        """The request was answered while its body is still arriving (uvicorn discards what comes)."""
        return self.cycle is not None and self.cycle.response_complete and self.cycle.more_body

    def _close_after_discard(self) -> bool:
        """When the request was answered while its body still arrives: close the connection once the rest is in
        and discarded (True); else False, nothing decided."""
        if self._discarding() and not self.transport.is_closing():
            self._close_after_body = True
            return True
        return False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._discarding() and not self.transport.is_closing() and self.body_timeout_s is not None:
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_too_slow)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():  # answered already: nothing to write, one log line
            self.transport.close()
            log.info(json.dumps({"connection": "body_timeout", "client": (self.client or ["?"])[0],
                                 "open_s": round(time.monotonic() - self._opened, 2)}))
            self.on_refusal("body_timeout")

    def on_message_complete(self) -> None:
        discarded = self._discarding()
        super().on_message_complete()
        if discarded:  # the rest of an answered body is in: the connection is idle as after any request
            self.cycle.more_body = False
            self._cancel_body_timer()
            if self._close_after_body or not self.cycle.keep_alive:
                self.transport.close()
            elif not self.transport.is_closing():
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # a request has begun: the connection is not idle. uvicorn cancels the keep-alive timeout only when a read
        # begins; a discarded body's end re-arms it (on_message_complete), and when the next request's head came
        # in the same read, the timeout then closed the connection under that request 5 s later (the soak's lost
        # valid request, a 499 on the server)
        self._unset_keepalive_if_required()
        self._receiving = True
        self._arm_header_timer()  # a kept-alive connection's next request: its deadline starts now

    def on_headers_complete(self) -> None:
        self._receiving = False
        self._requests += 1
        self._cancel_header_timer()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not previous:  # a new request (not an upgrade)
            self.cycle.transport = LingeringClose(self, self.cycle)  # before its task first runs
        if self.drain is not None and self.drain.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def last_request(self) -> None:
        """The request in progress (if any) is this connection's last: its answer says Connection: close.
        Not once its headers are out without it: the client would reuse a connection the server then closes
        (then the next request on the connection gets it, from on_headers_complete)."""
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.keep_alive = False

    def shutdown(self) -> None:
        """The server stops: close nothing a client may be about to use. A request that began arriving is answered
        first (uvicorn waits for open connections, within its graceful-shutdown timeout), and a connection that has
        not sent its first byte yet gets ``FRESH_GRACE_S`` to send it: it was accepted just before the listener
        closed, and its client is most likely sending."""
        if self._receiving:
            return  # on_headers_complete turns keep-alive off, the answer closes the connection
        if self._requests == 0:
            self.loop.call_later(FRESH_GRACE_S, self._close_if_silent)
            return
        if self._close_after_discard():  # answered; closed once the rest of its body is in
            return
        if self.cycle is None or self.cycle.response_complete:
            # idle between requests: left open until its next request (answered 503, Connection: close) or
            # uvicorn's keep-alive timeout. Closed now, a client waking at that moment (after a Retry-After,
            # say) sends on a socket being closed and loses its request; the keep-alive timeout is a close
            # the client could meet anyway, the drain adds none (in one CI run, keep-alive clients woken after
            # a 503's Retry-After just as the drain ended lost 2 requests)
            return
        self.last_request()  # uvicorn's own shutdown turns keep-alive off even after the headers went out

    def _close_if_silent(self) -> None:
        if not self._receiving and self._requests == 0 and not self.transport.is_closing():
            self._cancel_header_timer()
            self.transport.close()


class LingeringClose:
    """A request cycle's view of its connection's transport. uvicorn closes the connection as soon as an answer
    with ``Connection: close`` is complete; when that answer went out before the request's body was in (a
    refusal from the headers: the arrival gate's 503, a large photo refused from its header, a 413), closing on
    the unread bytes would reset the connection, and the client would see the reset, not the answer. Here that
    close waits until the rest of the body has come and been discarded (``GuardedProtocol``), for at most
    ``body_timeout_s``. A close of an answer left incomplete (the app failed mid-answer) happens at once."""

    __slots__ = ("protocol", "cycle")

    def __init__(self, protocol: GuardedProtocol, cycle):
        self.protocol, self.cycle = protocol, cycle

    def close(self) -> None:
        if self.cycle is self.protocol.cycle and self.protocol._close_after_discard():
            return
        self.protocol.transport.close()

    def write(self, data) -> None:
        self.protocol.transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self.protocol.transport, name)


def guarded_protocol(max_connections: int | None, header_timeout_s: float | None, drain=None,
                     on_refusal=None, body_timeout_s: float | None = None) -> type[GuardedProtocol]:
    """A GuardedProtocol class with these settings, for ``uvicorn.Config(http=...)``."""
    attrs = {"max_connections": max_connections, "header_timeout_s": header_timeout_s, "drain": drain,
             "body_timeout_s": body_timeout_s}
    if on_refusal is not None:
        attrs["on_refusal"] = staticmethod(on_refusal)
    return type("GuardedProtocol", (GuardedProtocol,), attrs)


# Classic BPF on a TCP socket sees the packet from its TCP header: byte 13 holds the flags. A segment with SYN
# and without ACK (a client's first) is dropped; every other passes, so handshakes already under way complete.
_DROP_NEW_HANDSHAKES = [(0x30, 0, 0, 13),           # ldb [13]
                        (0x54, 0, 0, 0x12),         # and #(SYN|ACK)
                        (0x15, 0, 1, 0x02),         # jeq #SYN: next, else skip one
                        (0x06, 0, 0, 0),            # ret #0: drop
                        (0x06, 0, 0, 0xFFFFFFFF)]   # ret #-1: keep all of it
SO_ATTACH_FILTER = 26


def duplicate(listening) -> socket.socket:
    """A full socket object on a new descriptor for the same kernel socket as ``listening``: the event loops
    hand out wrappers without the whole socket API (asyncio's TransportSocket, uvloop's PseudoSocket)."""
    return socket.socket(fileno=os.dup(listening.fileno()))


def refuse_new_handshakes(listening) -> bool:
    """Make the kernel drop new connection attempts (SYNs) to a listening TCP socket, while handshakes already
    under way complete into its backlog: then the backlog can be emptied and the socket closed with no
    connection caught between (a client that connected just before the close, and sent its request, would be
    reset; one whose SYN is dropped retries it after about 1 s and finds the port closed: refused, nothing
    sent). Linux only (a socket filter); False where it cannot be attached."""
    if not sys.platform.startswith("linux"):
        return False
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _DROP_NEW_HANDSHAKES))
    fprog = struct.pack("HL", len(_DROP_NEW_HANDSHAKES), ctypes.addressof(program))  # struct sock_fprog
    try:
        with duplicate(listening) as dup:
            dup.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def start_draining(connections) -> None:
    """Mark every open connection's request in progress as the last on its connection."""
    for c in list(connections):
        if isinstance(c, GuardedProtocol):
            c.last_request()
