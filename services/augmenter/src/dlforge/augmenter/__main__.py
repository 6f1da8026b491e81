"""``python -m dlforge.augmenter``: serve the augmenter (REST API and its event worker)."""

from __future__ import annotations

from dlforge.augmenter.app import create_app
from dlforge.augmenter.settings import AugmenterSettings
from dlforge.common.app import serve
from dlforge.common.settings import load_settings


def main() -> None:
    settings = load_settings(AugmenterSettings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
