"""``walex run``: run apps until SIGINT or SIGTERM.

A command: loading apps and running them (:mod:`walex.serve`); it holds no
logic of the app itself.

::

    walex run myproject.events:app               # a WalEx object in a module
    walex run myproject.events:app other:app     # several, each with its own slot
    walex run --config walex.toml                # settings and handlers from a file

A file with a ``[metrics]`` table (``listen = "127.0.0.1:9187"``) also serves
``/metrics`` and ``/healthz`` while the app runs.

Shutdown is graceful: running handlers finish, what they handled is
confirmed, and the command exits 0 (a handler or destination waiting to
retry stops waiting; its transaction is not confirmed). A second signal
cancels running handlers and destination sends: their transaction is not
confirmed and comes again next time, and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
from typing import Any

from ..app import WalEx
from ..config import MetricsConfig, import_object, read_file
from ..errors import ConfigurationError
from ..serve import serve

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``run`` subcommand to *subparsers*."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run WalEx apps until SIGINT/SIGTERM",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Example: walex run myproject.events:app",
    )
    parser.add_argument("apps", nargs="*", metavar="MODULE:APP", help="WalEx objects to run")
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        default=[],
        metavar="FILE",
        help="a TOML settings file (repeatable: one app each)",
    )
    parser.add_argument(
        "--stop-all-on-error",
        action="store_true",
        help="stop every app when one fails (default: the others go on)",
    )
    parser.set_defaults(func=main)


def _load(ref: str) -> WalEx:
    app = import_object(ref, "MODULE:APP")
    if callable(app) and not isinstance(app, WalEx):
        # A factory: walex run myproject:create_app
        try:
            inspect.signature(app).bind()
        except TypeError:
            raise ConfigurationError(
                f"{ref} needs arguments; name a walex.WalEx app, or a factory that takes none"
            ) from None
        except ValueError:
            pass  # no signature to read (some built-ins): call it and see
        try:
            app = app()
        except Exception as exc:
            raise ConfigurationError(
                f"{ref}() raised {type(exc).__name__}: {exc} (walex --debug run … shows where)"
            ) from exc
    if not isinstance(app, WalEx):
        raise ConfigurationError(f"{ref} is a {type(app).__name__}, not a walex.WalEx app")
    return app


def main(args: argparse.Namespace) -> int:
    """Run the apps; 0 after a graceful stop, 1 if an app failed or a forced stop left work
    unconfirmed (the error is printed)."""
    if not args.apps and not args.config:
        raise ConfigurationError("name an app (walex run module:app) or a --config file")
    # Let `walex run app:app` find modules in the current directory, as python -m does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    apps = [_load(ref) for ref in args.apps]
    wanted: dict[tuple[str, int], Any] = {}  # address → the Metrics served there
    for path in args.config:
        metrics = read_file(path).metrics
        if metrics is None:
            apps.append(WalEx.from_config(path))
            continue
        observer = _observer(metrics, wanted)
        apps.append(WalEx.from_config(path, observers=[observer]))
    asyncio.run(_serve(apps, wanted, args.stop_all_on_error))
    return 0


def _observer(config: MetricsConfig, wanted: dict[tuple[str, int], Any]) -> Any:
    """The Metrics that serves *config*'s address (files naming one address share it)."""
    try:
        from ..metrics import Metrics
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            'a [metrics] table needs prometheus-client: pip install "walex[metrics]"'
        ) from exc
    key = (config.host, config.port)
    if key not in wanted:
        wanted[key] = Metrics(max_lag_bytes=config.max_lag_bytes, namespace=config.namespace)
    return wanted[key]


async def _serve(
    apps: list[WalEx], wanted: dict[tuple[str, int], Any], stop_all_on_error: bool
) -> None:
    servers = []
    try:
        for (host, port), metrics in wanted.items():
            try:
                servers.append(await metrics.serve(host, port))
            except OSError as exc:
                raise ConfigurationError(f"[metrics] listen: {exc}") from exc
        await serve(*apps, stop_all_on_error=stop_all_on_error)
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
