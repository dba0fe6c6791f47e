"""The seed README's ExampleApp, in Python: one app, one module of handlers per table.

Run it with ``walex run example_app:app`` from ``examples/seed`` (it reads
``WALEX_URL``), or ``python examples/seed/main.py`` for a self-contained demo.
"""

from . import todo_event, user_account_event
from .app import app

__all__ = ["app", "todo_event", "user_account_event"]
