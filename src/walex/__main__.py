"""``python -m walex``: the ``walex`` command."""

import sys

from .cli import main

sys.exit(main())
