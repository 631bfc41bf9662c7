"""`monet-serve` / `python -m app [--host H] [--port P] [--weights FILE|FOLDER] [--device auto|cpu|cuda]`: serve
the API and UI. SIGHUP reads the styles in MONET_WEIGHTS again (app/catalogue.py); SIGTERM drains and stops."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time

import uvicorn
from pydantic import ValidationError

from app.connections import guarded_protocol, start_draining

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
    from app.main import create_app

    app = create_app(settings)
    service = app.state.service
    refused = app.state.metrics.connections_refused
    protocol = guarded_protocol(settings.max_connections, settings.header_timeout_s, service,
                                lambda reason: refused.labels(reason).inc())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_grace_s, http=protocol)
    DrainingServer(config, service, settings.drain_s, protocol).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain step on SIGTERM/SIGINT: /readyz turns 503, requests that arrive from then
    on get 503 at once (those that arrived before are served), and every answer carries Connection: close.
    After ``drain_s`` (time for load balancers to notice) uvicorn stops accepting, closes the connections idle
    between requests, lets the requests it has finish within MONET_SHUTDOWN_GRACE_S, and the process exits 0."""

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
        """Close the listener in a lull, when no connection has opened for ``QUIET_S`` (waiting at most
        ``drain_s``): closing it resets the connections the kernel has accepted but the server not yet taken,
        and a client that connected a moment ago is sending its request on one of those."""
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline:
            await asyncio.sleep(QUIET_S / 10)
            await asyncio.sleep(0)  # let the accepts that are ready run their connection_made
            if time.monotonic() - self.protocol.last_opened >= QUIET_S:
                break
        await super().shutdown(sockets)  # closes the listener before its first await


if __name__ == "__main__":
    sys.exit(main())
