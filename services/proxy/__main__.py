"""The proxy process: python -m services.proxy."""

from __future__ import annotations

import contextlib
import resource

from aiohttp import web

from services.proxy.app import make_app
from services.proxy.http import parse_errors
from shared import logs
from shared import settings as settings_mod


def main() -> None:
    logs.setup("proxy")
    settings = settings_mod.load()
    more_files()
    parse_errors.install()
    # keepalive_timeout also closes a connection whose request never finishes arriving
    web.run_app(make_app(settings), host=settings.listen_host, port=settings.proxy_port,
                handler_cancellation=True, access_log=None, print=None,
                shutdown_timeout=5, keepalive_timeout=settings.request_read_timeout,
                max_line_size=parse_errors.MAX_LINE, max_field_size=parse_errors.MAX_LINE,
                max_headers=parse_errors.MAX_HEADERS)


def more_files() -> None:
    """Each client connection is a file descriptor: the soft limit (often 256 on a Mac, 1024
    on Linux) goes up to the hard one, so many open clients do not lock out new ones."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (65536, 10240):  # macOS refuses more than OPEN_MAX (10240)
        if hard != resource.RLIM_INFINITY:
            target = min(target, hard)
        if soft >= target:
            return
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return


if __name__ == "__main__":
    main()
