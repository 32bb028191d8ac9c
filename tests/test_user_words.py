"""The words users read: one spelling, and no internal terms in log lines or error messages."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cqrs_resilience"


def test_behavior_is_spelled_as_the_public_names_spell_it() -> None:
    """`Behavior` and `add_behavior` decide: the package's text and the changelog say
    "behavior", never "behaviour"."""
    texts = [*sorted(PACKAGE.rglob("*.py")), ROOT / "CHANGELOG.md"]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in texts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search("behaviour", line, re.IGNORECASE)
    ]
    assert found == []
