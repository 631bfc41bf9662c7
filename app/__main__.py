"""`monet-serve` / `python -m app [--host H] [--port P] [--weights FILE|FOLDER] [--device auto|cpu|cuda]`: serve
the API and UI. SIGHUP reads the styles in MONET_WEIGHTS again (app/catalogue.py); SIGTERM drains and stops."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time

import uvicorn
from pydantic import ValidationError

from app.connections import duplicate, guarded_protocol, refuse_new_handshakes, start_draining

QUIET_S = 0.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1, env MONET_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000, env MONET_PORT)")
    parser.add_argument("--weights", help="generator weight file, or a folder of them, one style each (default "
                        "weights/photo2monet.safetensors; env MONET_WEIGHTS)")
    parser.add_argument("--device", help="auto | cpu | cuda (env MONET_DEVICE)")
    args = parser.parse_args(argv)
    from app.config import Settings

    try:
        settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"error: bad setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    if not settings.weights.exists():
        print(f"error: weights {settings.weights} not found (set --weights or MONET_WEIGHTS: a .safetensors file "
              "or a folder of them)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    # our loggers' level set on them, not only inherited from the root: OpenVINO's converter sets the root
    # logger to ERROR while it converts, and a style's graphs convert in a background thread while requests
    # are served (their access-log lines were lost meanwhile)
    logging.getLogger("monet").setLevel(logging.INFO)
    from app.main import create_app

    app = create_app(settings)
    service = app.state.service
    refused = app.state.metrics.connections_refused
    protocol = guarded_protocol(settings.max_connections, settings.header_timeout_s, service,
                                lambda reason: refused.labels(reason).inc(), settings.upload_timeout_s)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_grace_s, http=protocol)
    DrainingServer(config, service, settings.drain_s, protocol).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain step on SIGTERM/SIGINT: /readyz turns 503, requests that arrive from then
    on get 503 at once (those that arrived before are served), and every answer carries Connection: close.
    After ``drain_s`` (time for load balancers to notice) uvicorn stops accepting, lets the requests it has
    finish within MONET_SHUTDOWN_GRACE_S (a connection idle between requests is answered 503 if it sends
    another, else closed by its keep-alive timeout), and the process exits 0."""

    def __init__(self, config: uvicorn.Config, service, drain_s: float, protocol: type):
        super().__init__(config)
        self.service, self.drain_s, self.protocol = service, drain_s, protocol

    def handle_exit(self, sig, frame):
        if self.service.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.service.start_draining()
        start_draining(self.server_state.connections)  # the answers in progress close their connections
        logging.getLogger("monet.service").info("draining: /readyz is 503; stopping in %.1f s", self.drain_s)
        # set should_exit rather than pass the signal on: uvicorn would re-raise it at the end, and the
        # process would die of SIGTERM instead of exiting 0
        timer = threading.Timer(self.drain_s, setattr, (self, "should_exit", True))
        timer.daemon = True
        timer.start()

    async def shutdown(self, sockets=None) -> None:
        """Close the listener without resetting any connection it let in. First the kernel stops taking new
        connections (``refuse_new_handshakes``: new SYNs are dropped, handshakes under way complete) and the
        loop goes on accepting for ``QUIET_S``; where that filter cannot be attached, the listener closes in a
        lull instead, when no connection has opened for ``QUIET_S`` (waiting at most ``drain_s``). Then the
        connections the loop accepted get their protocol, those still in the kernel's backlog are taken over
        (``adopt_backlog``), and the listening socket is shut down (not only closed: a forked child's copy of the
        fd would keep it accepting). Every connection let in is then answered (503, Connection: close) or
        served."""
        listeners = [sock for server in self.servers for sock in server.sockets]
        if listeners and all([refuse_new_handshakes(sock) for sock in listeners]):
            await asyncio.sleep(QUIET_S)  # the handshakes under way complete (one round trip) and are accepted
        else:
            deadline = time.monotonic() + self.drain_s
            while time.monotonic() < deadline:
                await asyncio.sleep(QUIET_S / 10)
                await asyncio.sleep(0)  # let the accepts that are ready run their connection_made
                if time.monotonic() - self.protocol.last_opened >= QUIET_S:
                    break
        # Stop the loop accepting, let the connections it has accepted but not yet given a protocol get one
        # (closing the server under them resets them: asyncio's Server._attach fails), take what the kernel
        # still holds in the backlog, and close the listener in the same breath (no await in between): no
        # connection is reset with its request unanswered. Without the filter a handshake completing between
        # the backlog's last accept and the close is still reset (1 request in 150 SIGTERMs under the test's
        # load, where clients reconnect just as the listener closes).
        # (On uvloop, which uvicorn picks when it is installed, remove_reader does nothing: libuv goes on
        # accepting in its poll phase, but it gives each connection its protocol as it accepts it, and nothing
        # below yields between emptying the backlog and shutting the listener.)
        loop = asyncio.get_running_loop()
        for listening in listeners:
            loop.remove_reader(listening.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
        adopted = self.adopt_backlog(listeners)
        for listening in listeners:  # stops listening even where a forked child holds a copy of the fd
            with duplicate(listening) as dup, contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)
        for server in self.servers:
            server.close()
        if adopted:
            await asyncio.gather(*adopted, return_exceptions=True)  # their connection_made has run
            logging.getLogger("monet.service").info("took %d waiting connection(s) from the backlog", len(adopted))
        await super().shutdown(sockets)  # the adopted connections are answered as every other one

    def new_protocol(self) -> asyncio.Protocol:
        """A protocol for one connection, made as uvicorn's ``startup`` makes those it gives ``create_server``.
        Not taken from the server object: asyncio's keeps its factory (``_protocol_factory``), uvloop's does
        not, and on uvloop every connection waiting in the backlog was reset when the listener closed (13 of 16
        clients reconnecting back to back, at every SIGTERM)."""
        return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                               app_state=self.lifespan.state)

    def adopt_backlog(self, listeners: list) -> list:
        """Accept every connection waiting in the listeners' backlogs (a duplicate of each listening socket,
        non-blocking) and hand it to the server's protocol; the tasks that do so."""
        loop, tasks = asyncio.get_running_loop(), []
        for listening in listeners:
            with duplicate(listening) as dup:
                dup.setblocking(False)
                with contextlib.suppress(OSError):
                    while True:
                        try:
                            conn, _ = dup.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        conn.setblocking(False)
                        tasks.append(loop.create_task(loop.connect_accepted_socket(self.new_protocol, conn)))
        return tasks


if __name__ == "__main__":
    sys.exit(main())
