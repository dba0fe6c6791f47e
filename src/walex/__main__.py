"""``python -m walex``: the ``walex`` command.

It only hands over to :func:`walex.cli.main`.
"""

import sys

from .cli import main

sys.exit(main())
