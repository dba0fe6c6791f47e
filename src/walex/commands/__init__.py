"""The subcommands of the ``walex`` command, one module each (see :mod:`walex.cli`).

Each exposes ``register(subparsers)``. They are thin: what they do is reachable
through walex's API (:mod:`walex.admin`, :func:`walex.connect`,
:mod:`walex.serve`), and nothing below imports them.
"""
