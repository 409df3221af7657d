"""``python -m fxfuse``: the ``fxfuse`` command."""
import sys

from .cli import main

sys.exit(main())
