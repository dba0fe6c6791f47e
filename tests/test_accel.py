"""walex._accel: C or pure Python, chosen once; both give the same answers.

The C extension is tested against the pure-Python code it replaces in each
step's own tests (decoder, values, transactions, fast path). Here: the choice
itself, and a run of the unit tests and representative integration tests
with pure Python forced, as the README's test command promises.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from walex import _accel

ROOT = Path(__file__).resolve().parent.parent

# The steps that have a C path, and integration tests that cross all of them.
PURE_PYTHON_SUBSET = [
    "tests/pgoutput/test_decoder.py",
    "tests/test_values_json.py",
    "tests/test_transactions.py",
    "tests/test_checkpoint.py",
    "tests/test_values.py",
    "tests/test_events_identity.py",
    "tests/test_stream.py",
]


def _impl(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != _accel.ENV_VAR}
    if env_value is not None:
        env[_accel.ENV_VAR] = env_value
    return subprocess.run(
        [sys.executable, "-c", "import walex._accel as a; print(a.__impl__)"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


def test_the_choice_follows_the_environment() -> None:
    forced = _impl("python")
    assert forced.stdout.strip() == "python", forced.stderr
    default = _impl(None)
    assert default.stdout.strip() == ("c" if _built() else "python"), default.stderr
    bad = _impl("fortran")
    assert bad.returncode != 0
    assert "WALEX_IMPL='fortran'" in bad.stderr


def _built() -> bool:
    return importlib.util.find_spec("walex._accel._speedups") is not None


@pytest.mark.skipif(not _built(), reason="the C extension is not built")
def test_insisting_on_c_gets_c() -> None:
    assert _impl("c").stdout.strip() == "c"


@pytest.mark.slow
@pytest.mark.skipif(
    _accel.__impl__ == "python", reason="pure Python already runs: the whole suite is this test"
)
def test_the_pure_python_implementation_passes_the_same_tests() -> None:
    env = {**os.environ, _accel.ENV_VAR: "python"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *PURE_PYTHON_SUBSET],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=1800,
    )
    tail = "\n".join(result.stdout.splitlines()[-30:])
    assert result.returncode == 0, f"with {_accel.ENV_VAR}=python:\n{tail}\n{result.stderr[-3000:]}"
    assert " passed" in tail
