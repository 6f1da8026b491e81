"""``python -m dlforge.labeler``: serve the labeler's API and run its worker."""

from __future__ import annotations

from dlforge.common.app import serve
from dlforge.common.settings import load_settings
from dlforge.labeler.app import create_app
from dlforge.labeler.settings import LabelerSettings


def main() -> None:
    settings = load_settings(LabelerSettings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
