"""In CI (`CI=true`) a skipped test is a failure: a skip there would hide a test that must run
(a PostgreSQL store, a SIGKILL drill, an optional integration the dev extra installs)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.conftest_stores import in_ci


def _fail(report: Any) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:  # a module-level importorskip
        _fail(report)
