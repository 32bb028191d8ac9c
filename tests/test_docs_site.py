"""The documentation site builds without a warning, documents every public name, and the
README stays a page for someone in a hurry."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
PUBLIC_MODULES = [
    "cqrs_resilience",
    "cqrs_resilience.stores",
    "cqrs_resilience.http",
    "cqrs_resilience.otel",
    "cqrs_resilience.contrib.starlette",
    "cqrs_resilience.contrib.procrastinate",
    "cqrs_resilience.pytest_plugin",
]


def documented() -> set[int]:
    """The objects the reference pages render (`::: module.name`), by identity: a name
    re-exported by two modules is documented once."""
    found: set[int] = set()
    for page in REFERENCE.glob("*.md"):
        for path in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M):
            module, _, name = path.rpartition(".")
            found.add(id(getattr(importlib.import_module(module), name)))
    return found


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module: str) -> None:
    imported = importlib.import_module(module)
    names = [name for name in imported.__all__ if name != "__version__"]
    missing = [name for name in names if id(getattr(imported, name)) not in documented()]
    assert not missing, f"{module}: not in docs/reference: {missing}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links, anchors, cross-references and pages left out of the nav fail the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reference" / "retries" / "index.html").read_text().count("retry") > 10


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
