"""A skip cannot hide a test in CI: with `CI=true` it fails, naming why it would have skipped."""

from __future__ import annotations

import pytest

SKIPPING = """
import pytest

def test_needs_a_server():
    pytest.skip("no PostgreSQL binaries")

@pytest.mark.skipif(True, reason="needs SIGKILL (POSIX)")
def test_marked():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_skip_fails_in_ci_and_skips_elsewhere(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    """In CI both kinds of skip fail with their reason; locally they skip."""
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_skipping=SKIPPING)
    result = pytester.runpytest("-p", "tests.no_skips_in_ci", "-p", "no:asyncio")
    if ci:  # the marked one fails at setup, which pytest counts as an error
        result.assert_outcomes(failed=1, errors=1)
        result.stdout.fnmatch_lines(["*skipped in CI*no PostgreSQL binaries*"])
        result.stdout.fnmatch_lines(["*skipped in CI*needs SIGKILL (POSIX)*"])
    else:
        result.assert_outcomes(skipped=2)


def test_a_module_that_skips_at_import_fails_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pytest.importorskip` of a missing integration fails the run in CI."""
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_optional="import pytest\npytest.importorskip('not_installed_x')\n")
    result = pytester.runpytest("-p", "tests.no_skips_in_ci", "-p", "no:asyncio")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped in CI*not_installed_x*"])
