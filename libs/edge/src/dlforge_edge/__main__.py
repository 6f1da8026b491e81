"""``python -m dlforge_edge``: the same as the ``dlforge-edge`` command."""

import sys

from dlforge_edge.cli import main

sys.exit(main())
