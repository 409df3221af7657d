"""``python -m fxfuse``: the ``fxfuse`` command."""
import sys

from .commands.cli import main

sys.exit(main())
