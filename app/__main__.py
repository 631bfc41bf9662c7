"""`python -m app [--host H] [--port P] [--weights FILE] [--device auto|cpu|cuda]`: serve the API and UI."""
from __future__ import annotations

import argparse
import logging
import sys
import threading

import uvicorn
from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1, env MONET_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000, env MONET_PORT)")
    parser.add_argument("--weights", help="generator weight file (default weights/photo2monet.safetensors)")
    parser.add_argument("--device", help="auto | cpu | cuda (env MONET_DEVICE)")
    args = parser.parse_args(argv)
    from app.config import Settings

    try:
        settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"error: bad setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    if not settings.weights.is_file():
        print(f"error: weights file {settings.weights} not found (set --weights or MONET_WEIGHTS)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from app.main import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_grace_s)
    DrainingServer(config, app.state.service, settings.drain_s).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain step on SIGTERM/SIGINT: /readyz turns 503 and new requests get 503 at
    once; after ``drain_s`` (time for load balancers to notice) uvicorn stops accepting, lets the requests
    it has finish within MONET_SHUTDOWN_GRACE_S, and the process exits 0."""

    def __init__(self, config: uvicorn.Config, service, drain_s: float):
        super().__init__(config)
        self.service, self.drain_s = service, drain_s

    def handle_exit(self, sig, frame):
        if self.service.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.service.draining = True
        logging.getLogger("monet.service").info("draining: /readyz is 503; stopping in %.1f s", self.drain_s)
        # set should_exit rather than pass the signal on: uvicorn would re-raise it at the end, and the
        # process would die of SIGTERM instead of exiting 0
        timer = threading.Timer(self.drain_s, setattr, (self, "should_exit", True))
        timer.daemon = True
        timer.start()


if __name__ == "__main__":
    sys.exit(main())
