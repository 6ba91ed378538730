"""``python -m fastbptt``: the same as the ``fastbptt`` command."""

import sys

from .tools.cli import main

sys.exit(main())
