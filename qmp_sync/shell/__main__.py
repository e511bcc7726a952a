"""``python -m qmp_sync.shell``: the same as ``qmp-shell``."""

import sys

from .cli import main

sys.exit(main())
