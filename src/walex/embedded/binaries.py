"""Finding Postgres binaries that the embedded cluster can run.

This module owns discovery: the sources of Postgres installations, tried in
the order of :data:`_SOURCES` (the system's, then the ``pgserver`` wheel's),
the probe that says whether an installation runs for the user who will run
the server (``postgres`` or ``nobody`` when we are root), and the readable
copy of a wheel's files for that user. It must not start or stop a server,
nor keep any state between calls.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from ..errors import EmbeddedPostgresError

__all__ = ["PostgresBinaries", "find_binaries"]

_VERSION = re.compile(r"\(PostgreSQL\)\s+((\d+)(?:\.(\d+))?\S*)")


class PostgresBinaries(NamedTuple):
    """One Postgres installation: where its programs are and its version.

    Attributes:
        major: the major version, such as ``16``.
        version: the full version, such as ``"16.2"``.
        bindir: the directory with ``initdb``, ``pg_ctl`` and ``postgres``.
    """

    major: int
    version: str
    bindir: Path


# --- running the programs as an unprivileged user -----------------------------


class _RunAs(NamedTuple):
    """The unprivileged OS user that runs Postgres when we are root."""

    name: str
    uid: int
    gid: int


def _run_as() -> _RunAs | None:
    """Who runs the Postgres programs: ``None`` means the current user."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd  # Unix only, and only needed when root.

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return _RunAs(name, entry.pw_uid, entry.pw_gid)
    raise EmbeddedPostgresError(
        "Postgres refuses to run as root, and there is neither a 'postgres' "
        "nor a 'nobody' user to run it as"
    )


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... of the caller's environment would redirect
    # the tools (postgres itself reads PGPORT) to another cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run(
    args: list[str | Path], run_as: _RunAs | None, *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a program, as ``run_as`` when given, and capture its output."""
    return subprocess.run(
        [str(arg) for arg in args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env=_clean_env(),
        # The unprivileged user may not be able to enter the current directory.
        cwd="/",
        timeout=timeout,
        user=run_as.uid if run_as else None,
        group=run_as.gid if run_as else None,
        # Otherwise the child keeps root's supplementary groups.
        extra_groups=[] if run_as else None,
    )


# --- probing one installation -------------------------------------------------


def _probe(bindir: Path, run_as: _RunAs | None) -> PostgresBinaries | None:
    """The version in ``bindir`` if its programs run for ``run_as``, else None."""
    if not all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
        return None
    found: list[re.Match[str]] = []
    # initdb is run too: it is the program that loads libpq, and a copied or
    # broken install fails there first.
    for tool in ("postgres", "initdb"):
        try:
            result = _run([bindir / tool, "--version"], run_as, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        match = _VERSION.search(result.stdout)
        if result.returncode != 0 or match is None:
            return None
        found.append(match)
    postgres, initdb = found
    if postgres.group(2) != initdb.group(2):
        return None
    return PostgresBinaries(int(postgres.group(2)), postgres.group(1), bindir)


# --- source: the system's installations ---------------------------------------


def _system_bindirs() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = _run([pg_config, "--bindir"], None, timeout=30)
            if result.returncode == 0 and result.stdout.strip():
                yield Path(result.stdout.strip())
    for pattern in (
        "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
        "/usr/pgsql-*/bin",  # PGDG RPMs
        "/usr/local/pgsql/bin",  # built from source
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ):
        yield from (Path(match) for match in sorted(glob.glob(pattern)))
    initdb = shutil.which("initdb")
    if initdb:
        yield Path(initdb).resolve().parent


def _system_binaries(run_as: _RunAs | None) -> Iterator[PostgresBinaries]:
    """Every system installation whose programs run for ``run_as``."""
    seen: set[Path] = set()
    for bindir in _system_bindirs():
        resolved = bindir.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        found = _probe(resolved, run_as)
        if found is not None:
            yield found


# --- source: the pgserver wheel -----------------------------------------------


def _pgserver_package() -> Path | None:
    # Not imported: importing pgserver warns (about XDG_RUNTIME_DIR) and does
    # work we do not need; its files are all we use.
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _trusted_dir(path: Path) -> bool:
    """True if ``path`` is a directory that only the current user could have written."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        path.is_dir()
        and not path.is_symlink()
        and info.st_uid == os.geteuid()
        and not info.st_mode & 0o022
    )


def _make_world_readable(top: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, mode | 0o444 | (0o111 if mode & 0o111 else 0))


def _readable_copy(package: Path, version: str, *, fresh: bool = False) -> Path:
    """Copy pgserver's Postgres where an unprivileged user can run it.

    pgserver lives in site-packages, which is often under root's mode-700
    home. The copy is made once per pgserver install, atomically (copied
    under a temporary name, then renamed), and reused after that.

    Args:
        package: pgserver's package directory.
        version: its Postgres version, for the name of the copy.
        fresh: remove an existing copy first (a /tmp cleaner may have eaten
            part of it).

    Returns:
        The ``bin`` directory of the copy.
    """
    source = package / "pginstall"
    postgres = (source / "bin" / "postgres").stat()
    key = f"{source.resolve()}\0{postgres.st_mtime_ns}\0{postgres.st_size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    target = Path(tempfile.gettempdir()) / f"walex-pg-{version}-{digest}"
    # The binaries' RPATH is $ORIGIN/../../../pgserver.libs (where the wheel
    # keeps libpq), so the copy keeps the wheel's layout.
    bindir = target / "pgserver" / "pginstall" / "bin"
    if fresh and _trusted_dir(target):
        shutil.rmtree(target, ignore_errors=True)
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            shutil.copytree(source, staging / "pgserver" / "pginstall", symlinks=True)
            libs = package.parent / "pgserver.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
            _make_world_readable(staging)
            try:
                staging.rename(target)
            except OSError:
                if not target.exists():
                    raise
                # Another process made the same copy first.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # /tmp is shared: run nothing that another user could have put there.
    if not _trusted_dir(target):
        raise EmbeddedPostgresError(
            f"refusing to run Postgres from {target}: it is not owned by this user "
            "or others may write to it; remove it and try again"
        )
    return bindir


def _pgserver_binaries(run_as: _RunAs | None) -> Iterator[PostgresBinaries]:
    """The ``pgserver`` wheel's installation, copied first if ``run_as`` cannot read it."""
    package = _pgserver_package()
    if package is None or not (package / "pginstall" / "bin" / "postgres").is_file():
        return
    found = _probe(package / "pginstall" / "bin", run_as)
    if found is None and run_as is not None:
        as_root = _probe(package / "pginstall" / "bin", None)
        if as_root is None:
            return
        found = _probe(_readable_copy(package, as_root.version), run_as)
        if found is None:
            found = _probe(_readable_copy(package, as_root.version, fresh=True), run_as)
    if found is not None:
        yield found


# --- all sources --------------------------------------------------------------

_Source = Callable[[_RunAs | None], Iterable[PostgresBinaries]]
"""One place Postgres may be installed: yields what runs for the given user."""

# Tried in this order; on a tie of versions an earlier source wins. A new
# source (another wheel, another package manager) is one more entry here.
_SOURCES: tuple[_Source, ...] = (
    _system_binaries,
    _pgserver_binaries,
)


def _version_key(binaries: PostgresBinaries) -> tuple[int, int]:
    parts = binaries.version.split(".")
    minor = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    return binaries.major, minor


def find_binaries() -> list[PostgresBinaries]:
    """Find every usable Postgres installation.

    Looks at the system's (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``
    and other usual places, the ``initdb`` on ``PATH``) and at the one that the
    ``pgserver`` wheel ships. When running as root, pgserver's copy is first
    copied to a place the unprivileged user can read. An installation counts
    only if its programs run for the user that will run the server.

    Returns:
        One installation per major version, the newest minor version (the
        system's on a tie), sorted by major version. Empty if none is found.
    """
    run_as = _run_as()
    best: dict[int, PostgresBinaries] = {}
    for source in _SOURCES:
        for found in source(run_as):
            current = best.get(found.major)
            if current is None or _version_key(found) > _version_key(current):
                best[found.major] = found
    return [best[major] for major in sorted(best)]
