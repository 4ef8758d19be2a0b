"""The proxy process: python -m services.proxy."""

from __future__ import annotations

import logging

from aiohttp import web

from services.proxy.app import make_app
from shared import settings as settings_mod


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="proxy: %(message)s")
    settings = settings_mod.load()
    web.run_app(make_app(settings), host=settings.listen_host, port=settings.proxy_port,
                handler_cancellation=True, access_log=None, print=None)


if __name__ == "__main__":
    main()
