"""``python -m dlforge.tuner``: serve the tuner's REST API and run its worker."""

from __future__ import annotations

import logging


def main() -> None:
    from dlforge.common.app import serve
    from dlforge.common.settings import load_settings
    from dlforge.tuner.app import create_app
    from dlforge.tuner.settings import TunerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(TunerSettings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
