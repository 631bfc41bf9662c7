"""`python -m app [--host H] [--port P] [--weights FILE] [--device auto|cpu|cuda]`: serve the API and UI."""
from __future__ import annotations

import argparse
import logging
import sys

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
    import uvicorn

    from app.main import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=False,
                log_level="info", timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
