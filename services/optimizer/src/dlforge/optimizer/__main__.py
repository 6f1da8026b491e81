"""``python -m dlforge.optimizer``: serve the optimizer's REST API and run its worker."""

from __future__ import annotations

import logging

from dlforge.common.app import serve
from dlforge.common.settings import load_settings
from dlforge.optimizer.app import create_app
from dlforge.optimizer.settings import OptimizerSettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(OptimizerSettings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
