"""``embed-serve`` / ``python -m service``: settings from CLI + environment, logging, serve.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 2 when the settings are invalid or the
server could not start (bad manifest, hash mismatch, provider missing, failed self-test); the
reason is printed on stderr.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from service.logs import configure_logging
from service.server import serve
from service.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except (ValidationError, ValueError) as exc:
        print(f"embed-serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
