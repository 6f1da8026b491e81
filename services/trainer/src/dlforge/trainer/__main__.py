"""``python -m dlforge.trainer``: serve the trainer's REST API and run its worker."""

from __future__ import annotations

import logging


def main() -> None:
    from dlforge.common.app import serve
    from dlforge.common.settings import load_settings
    from dlforge.trainer.app import create_app
    from dlforge.trainer.settings import TrainerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(TrainerSettings)
    serve(create_app(settings), settings)


# The guard matters: DDP workers are spawned processes that re-import the main module.
if __name__ == "__main__":
    main()
