"""README code blocks marked as runnable run as pasted, each in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
MARK = "<!-- runs as pasted: tests/test_readme.py -->"
BLOCKS = re.findall(re.escape(MARK) + r"\n```python\n(.*?)```", README.read_text(), re.S)


def test_marked_blocks_are_found() -> None:
    """The marker finds every block it is put on (a typo in it would skip a block silently)."""
    assert len(BLOCKS) == README.read_text().count(MARK) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.splitlines()[-1][:40])
def test_block_runs_as_pasted(block: str) -> None:
    """The block exits 0 in a fresh interpreter; its own asserts are the checks."""
    result = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
