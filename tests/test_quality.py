"""Lint and type checks, run as tests so that the one test command covers them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "ruff", "check", "src", "tests"],
        # Files and options come from [tool.mypy] in pyproject.toml.
        ["-m", "mypy", "--strict"],
        # The layering contract in [tool.importlinter] of pyproject.toml.
        ["-c", "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"],
    ],
    ids=["ruff", "mypy", "import-linter"],
)
def test_tool_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"


TESTS = ROOT / "tests"
SRC = ROOT / "src" / "walex"
# Test modules that are about no one module: the public surface, the tools,
# and the runnable examples.
NOT_A_MODULE = {"test_api", "test_quality", "test_examples", "test_seed_example"}


def _mirrors(test: Path) -> bool:
    """Whether tests/<pkg>/test_<module>[_aspect].py names a module of src/walex/<pkg>."""
    where = SRC.joinpath(*test.relative_to(TESTS).parent.parts)
    words = test.stem.removeprefix("test_").split("_")
    for n in range(len(words), 0, -1):
        name = "_".join(words[:n])
        if (where / f"{name}.py").exists() or (where / name / "__init__.py").exists():
            return True
        private = where / f"_{name}"  # _accel/, _runner.py
        if private.exists() or private.with_suffix(".py").exists() or name == "init":
            return True
    return False


def test_tests_mirror_the_source_layout() -> None:
    strays = [
        str(t.relative_to(ROOT))
        for t in sorted(TESTS.rglob("test_*.py"))
        if t.stem not in NOT_A_MODULE and not _mirrors(t)
    ]
    assert strays == [], "each test module is named after the module it tests"


def test_test_modules_do_not_import_each_other() -> None:
    offenders = [
        str(t.relative_to(ROOT))
        for t in sorted(TESTS.rglob("*.py"))
        if re.search(r"^\s*(from|import) tests(\.\w+)*\.test_", t.read_text(), flags=re.M)
    ]
    assert offenders == [], "shared helpers belong in tests/helpers.py or a fix_*.py module"
