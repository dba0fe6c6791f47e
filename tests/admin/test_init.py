"""``walex.admin``: the old module's names still import, and the package stays low in the flow."""

from __future__ import annotations

import ast
from pathlib import Path

import walex.admin

# What `from walex.admin import X` gave before admin.py became a package.
OLD_NAMES = {
    "DEFAULT_LAG_WARN_BYTES",
    "SLOT_NAME",
    "Check",
    "CheckStatus",
    "ServerFacts",
    "SlotStatus",
    "TableRef",
    "connect_sql",
    "connection_error",
    "diagnose",
    "drop_slot",
    "find_tables",
    "format_bytes",
    "list_slots",
    "mask_dsn",
    "preflight",
    "publication_tables",
    "setup_plan",
    "slot_info",
    "worst",
}

# The walex modules the admin package may import: nothing above it in the flow.
ALLOWED = {"walex.admin", "walex.errors", "walex.events", "walex.lsn", "walex.names"}

PACKAGE = Path(walex.admin.__file__).parent


def test_old_names_are_exported() -> None:
    assert not OLD_NAMES - set(walex.admin.__all__)
    for name in walex.admin.__all__:
        assert getattr(walex.admin, name) is not None, name


def _walex_imports(path: Path) -> set[str]:
    """The walex modules *path* imports, as absolute names (``walex.errors``)."""
    package = ["walex", "admin"]  # every file here is in the package walex.admin
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "walex" or n.startswith("walex."))
    return found


def _top(module: str) -> str:
    """``walex.admin.slots`` → ``walex.admin``; ``walex.errors`` → ``walex.errors``."""
    return ".".join(module.split(".")[:2])


def test_imports_only_what_lies_below() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} >= {
        "__init__.py",
        "connect.py",
        "doctor.py",
        "preflight.py",
        "setup.py",
        "slots.py",
    }
    for path in files:
        above = {m for m in _walex_imports(path) if _top(m) not in ALLOWED}
        assert not above, f"{path.name} imports {sorted(above)}"
