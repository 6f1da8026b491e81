"""Serve the console alone (the multi-service deployment): ``python -m dlforge.console``."""

from dlforge.common.app import serve
from dlforge.common.settings import load_settings
from dlforge.console.app import ConsoleSettings, create_app


def main() -> None:
    settings = load_settings(ConsoleSettings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
