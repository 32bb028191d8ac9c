"""The examples the README points to run and show what it says they show."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from cqrs_resilience import set_testing

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_lost_update_example(capsys: pytest.CaptureFixture[str]) -> None:
    """Two-way loses writer A's change, three-way keeps both and reports a real conflict."""
    runpy.run_path(str(EXAMPLES / "lost_update.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "two-way merge: status='pending', notes='gift wrap'  <- A's change is LOST" in out
    assert "three-way merge: status='processing', notes='gift wrap'" in out
    assert "conflict at ('status',): base='pending', current='shipped', incoming='cancelled'" in out


def test_retry_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The retry example shows retries, a give-up with its note, and successes."""
    with set_testing():
        runpy.run_path(str(EXAMPLES / "retry_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "retry 1/4 of SendEmail" in out
    assert "gave up after 5 attempts" in out
    assert "sent to ada@example.com" in out


def test_typed_pipeline_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The typed example runs; CI's `mypy --strict examples` checks its types."""
    runpy.run_path(str(EXAMPLES / "typed_pipeline.py"), run_name="__main__")
    assert capsys.readouterr().out == "price: The price of `quantity` items. -> total 28.5\n"
