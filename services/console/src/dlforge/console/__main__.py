"""Serve the console alone (the multi-service deployment): ``python -m dlforge.console``."""

from dlforge.common.app import serve
from dlforge.common.settings import CommonSettings, load_settings
from dlforge.console.app import create_app


def main() -> None:
    settings: CommonSettings = load_settings()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
