"""walex.embedded.binaries on this machine: every version under test is found and runs."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from tests.fix_pg import requested_majors
from walex.embedded import find_binaries


def test_find_binaries_finds_every_version_under_test() -> None:
    found = find_binaries()
    majors = [binaries.major for binaries in found]
    assert majors == sorted(set(majors)), "one installation per major, sorted"
    assert set(requested_majors()) <= set(majors), found
    for binaries in found:
        assert binaries.version.startswith(f"{binaries.major}.")
        for tool in ("initdb", "pg_ctl", "postgres", "pg_recvlogical"):
            assert (binaries.bindir / tool).is_file()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="as root, Postgres runs as another user, who must be able to run it"
)
def test_found_binaries_run_for_the_unprivileged_user() -> None:
    names = {entry.pw_name: entry for entry in pwd.getpwall()}
    user = names.get("postgres") or names["nobody"]
    for binaries in find_binaries():
        result = subprocess.run(
            [binaries.bindir / "initdb", "--version"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
        )
        assert result.returncode == 0, result.stderr
        assert binaries.version in result.stdout
