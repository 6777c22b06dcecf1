"""``python -m ltzoo``: the same as the ``ltzoo`` command."""

import sys

from .cli import main

sys.exit(main())
