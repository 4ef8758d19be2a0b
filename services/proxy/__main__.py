"""The proxy process: python -m services.proxy."""

from __future__ import annotations

from aiohttp import web

from services.proxy.app import make_app
from shared import logs
from shared import settings as settings_mod

# On SIGTERM (a restart, `model stop`) the proxy stops accepting and gives open requests and
# streams this long to finish; the runner waits a little longer before it kills.
DRAIN_SECONDS = 30


def main() -> None:
    logs.setup("proxy")
    settings = settings_mod.load()
    web.run_app(make_app(settings), host=settings.listen_host, port=settings.proxy_port,
                handler_cancellation=True, access_log=None, print=None,
                shutdown_timeout=DRAIN_SECONDS)


if __name__ == "__main__":
    main()
