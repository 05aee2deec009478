"""``python -m adapter_engine``: the ``adapter-engine`` command line (adapter_engine/cli.py)."""

import sys

from .cli import main

sys.exit(main())
