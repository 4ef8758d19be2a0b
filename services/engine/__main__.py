"""The engine process: bring the catalog and engine config up to date, then become the engine.

exec keeps one process, so honcho's and `make down`'s signals reach the engine itself.
"""

from __future__ import annotations

import logging
import os
import sys

from shared import settings as settings_mod
from shared.catalog import Catalog
from shared.engines import make_engine
from shared.files import write_if_changed
from shared.sync import rebuild


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="engine: %(message)s")
    settings = settings_mod.load()
    engine = make_engine(settings)
    result = rebuild(settings, engine)
    if result.catalog is None and not engine.config_path.exists():
        write_if_changed(engine.config_path, engine.render(Catalog()))
    try:
        argv = engine.command()
    except FileNotFoundError as e:
        sys.exit(f"engine: {e}")
    logging.info("starting %s on 127.0.0.1:%d", engine.name, settings.engine_port)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, {**os.environ, **engine.environment()})


if __name__ == "__main__":
    main()
