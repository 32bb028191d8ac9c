"""The words users read: one spelling, and no internal terms in log lines or error messages."""

from __future__ import annotations

import ast
import inspect
import itertools
import re
from pathlib import Path

import pytest

from cqrs_resilience import (
    ConfigurationError,
    ConflictConfig,
    ExponentialBackoffPolicy,
    FixedRetryPolicy,
    RetryPolicy,
)
from cqrs_resilience.contrib._jobs import JobRetry  # procrastinate's, without procrastinate

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cqrs_resilience"


# British spellings a user of the US-spelled public names (`Behavior`) would trip over;
# "cancelled" stays, as asyncio spells it (`CancelledError`).
BRITISH = re.compile(r"behaviour|recognis|serialis|normalis|honour", re.IGNORECASE)


def test_behavior_is_spelled_as_the_public_names_spell_it() -> None:
    """`Behavior` and `add_behavior` decide: the package's text, the README, the docs and the
    changelog say "behavior", never "behaviour", and spell the rest the same way."""
    texts = [
        *sorted(PACKAGE.rglob("*.py")),
        *sorted((ROOT / "docs").rglob("*.md")),
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
    ]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in texts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if BRITISH.search(line)
    ]
    assert found == []


def attribute_docstring(path: Path, class_name: str, field: str) -> str:
    """The string literal that follows `field`'s definition in `class_name` (what the API
    reference shows for it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    [klass] = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name]
    body = klass.body
    for statement, following in itertools.pairwise(body):
        target = getattr(statement, "target", None)
        if not (isinstance(target, ast.Name) and target.id == field):
            continue
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            return str(following.value.value)
    return ""


COUNTS = [
    (FixedRetryPolicy, "max_retries", "at most N more calls after the first"),
    (ExponentialBackoffPolicy, "max_retries", "at most N more calls after the first"),
    (ConflictConfig, "max_attempts", "at most N more calls after the first"),
    (JobRetry, "max_retries", "at most N more calls after the first"),
]


@pytest.mark.parametrize(("settings", "field", "meaning"), COUNTS)
def test_each_count_says_what_it_counts_in_the_same_words(
    settings: type, field: str, meaning: str
) -> None:
    """Every count of calls counts the calls after the first: each one's docstring and the
    error for a wrong value say so, in the same words."""
    path = Path(inspect.getfile(settings))
    assert meaning in " ".join(attribute_docstring(path, settings.__name__, field).split())
    with pytest.raises(ConfigurationError, match=f"^{field} must .*{meaning}"):
        settings(**{field: -1})
    with pytest.raises(ConfigurationError, match=f"^{field} must .*{meaning}"):
        settings(**{field: "3"})


def test_a_policys_max_retries_is_described_as_the_policies_describe_it() -> None:
    """The `RetryPolicy` protocol, which user policies implement, counts as the built-in ones."""
    assert "at most N more calls after the first" in (RetryPolicy.max_retries.__doc__ or "")


INTERNAL_WORDS = re.compile(r"\b(turns?|rounds?|yield\w*|scopes?|lease[sd]?)\b", re.IGNORECASE)


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string nodes that are docstrings (of modules, classes, functions and
    attributes): text for readers of the code and the API reference, not messages."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for before, statement in itertools.pairwise([None, *body]):
            documents = before is None or isinstance(before, ast.Assign | ast.AnnAssign)
            if documents and isinstance(statement, ast.Expr):
                found.add(id(statement.value))
    return found


def test_log_lines_and_error_messages_speak_the_users_words() -> None:
    """Every text the package puts in a log line, an error message or a note (a string with a
    space in it, docstrings aside) says "retry", "conflict", "resolve", never the internal
    "turn", "round", "yield", "scope" or "lease"."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = docstrings(tree)
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) else None
            message = isinstance(text, str) and " " in text and id(node) not in skip
            if message and INTERNAL_WORDS.search(str(text)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert found == []
