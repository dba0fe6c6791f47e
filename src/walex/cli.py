"""The ``walex`` command.

It owns parsing the command line, logging and turning errors into exit codes;
what each command does is in :mod:`walex.commands`, on top of the public API.

Each subcommand lives in its own module under :mod:`walex.commands` and
exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the parser's default. A fatal error is one line with
the fix, printed once, and an exit code that says what kind it was
(:data:`EXIT_CODES`); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import ConfigurationError, WalexError

__all__ = ["EXIT_CODES", "main"]

#: The exit codes of ``walex run``, ``tail``, ``setup`` and ``slots``
#: (``walex doctor`` has its own: 0 OK, 1 warnings, 2 failures).
EXIT_CODES = {
    0: "a clean stop: everything handled was confirmed",
    1: "a fatal error while running (the server, the slot, a handler or a destination)",
    2: "a configuration or usage error: nothing ran",
    3: "a forced stop (a second signal) left a transaction unconfirmed",
    130: "interrupted before anything ran",
}

# Libraries whose INFO logs are per request (httpx logs every webhook POST):
# quiet unless --debug.
_CHATTY = ("httpx", "httpcore", "aio_pika", "aiormq", "nats", "asyncio")

# The subcommand modules, in the order `walex --help` lists them.
COMMANDS = [
    "walex.commands.run",
    "walex.commands.demo",
    "walex.commands.tail",
    "walex.commands.doctor",
    "walex.commands.setup",
    "walex.commands.slots",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walex",
        description="Postgres change data capture for Python.",
        epilog="Example: walex tail postgresql://postgres@localhost/app --table orders",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"walex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.debug)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130
    except WalexError as exc:
        if args.debug:
            raise
        print(f"walex: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else getattr(exc, "exit_code", 1)


class _NotTwice(logging.Filter):
    """Drops the log line of an error that the command prints itself, as ``walex: ...``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "walex_fatal", False)


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not debug:
        handler.addFilter(_NotTwice())
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    if not debug:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
