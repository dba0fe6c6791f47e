"""The ``walex`` command.

It owns parsing the command line, logging and turning errors into exit codes;
what each command does is in :mod:`walex.commands`, on top of the public API.

Each subcommand lives in its own module under :mod:`walex.commands` and
exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the parser's default. Errors are one line with the
fix and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .errors import WalexError

__all__ = ["main"]

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
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
