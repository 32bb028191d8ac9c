"""Every ```python block of README.md and of the documentation site (docs/) runs on its own, as a
reader who pastes it into a file of their own folder would run it.

The tool is pytest-examples rather than sybil. pytest-examples runs each block alone, in a
fresh module namespace, so a block that leans on a name from an earlier block fails here as
it fails for the reader who pastes only that block; it checks the output comments under each
`print()` against what it printed, lints the block with ruff (undefined names, unused
imports) and reports failures at page line numbers. Sybil shines at doctest-style pages
whose blocks share one namespace, which is exactly what these pages must not rely on.
`ruff format` formats the blocks in place and writes pytest-examples' `#> output` comments as
`# > output`, so that is the form read here; `pytest tests/test_readme.py --update-examples`
rewrites them from what the blocks print (review the diff: it is the documentation).

No block opts in or out. What a block contains says how it runs:

- a block that defines `test_*` functions is a test file: it runs under pytest in a fresh
  interpreter, in a folder with no project configuration (pytest-asyncio's strict default);
- a block that reads `CQRS_RESILIENCE_PG_DSN` runs against the tests' PostgreSQL server, in
  a fresh database (it skips where the store tests skip);
- a block that reads `OTEL_EXPORTER_OTLP_ENDPOINT` exports to a small OTLP/HTTP receiver
  started on 127.0.0.1 for it, which must have received the library's spans on /v1/traces
  and its metrics on /v1/metrics (protobuf, as an OpenTelemetry collector gets them);
- every other block runs as a script.
"""

from __future__ import annotations

import gzip
import http.server
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_examples.run_code
from pytest_examples import CodeExample, EvalExample, find_examples

from cqrs_resilience import get_hook_registry, is_testing, set_testing
from cqrs_resilience._hooks import EVENTS
from tests.pg_server import ENV_DSN

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLES = list(find_examples(*PAGES))
OUTPUT = "# > "
OUTPUT_RE = re.compile(f"^ *{re.escape(OUTPUT)}", re.M)
ENV_OTLP = "OTEL_EXPORTER_OTLP_ENDPOINT"


def is_test_file(example: CodeExample) -> bool:
    return re.search(r"^(async )?def test_", example.source, re.M) is not None


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_python_block_is_collected(page: Path) -> None:
    """One test per ```python fence: no block escapes by a typo in its fence (or by an indent)."""
    text = page.read_text()
    found = [example for example in EXAMPLES if example.path == page]
    assert len(found) == text.count("\n```python\n") == len(re.findall(r"^ *```py", text, re.M))
    assert all(example.prefix == "python" for example in found)


def test_some_blocks_are_test_files() -> None:
    assert sum(map(is_test_file, EXAMPLES)) >= 2


@pytest.fixture
def process_state() -> Iterator[None]:
    """What a block may change process-wide is put back: blocks run in this process."""
    hooks = get_hook_registry()
    assert not any(hooks.wants(event) for event in EVENTS), "the global registry is not empty"
    main = sys.modules["__main__"]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with set_testing(is_testing()):
            yield
    finally:
        hooks.clear()
        sys.modules["__main__"] = main
        root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("process_state")
@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_block(
    example: CodeExample,
    eval_example: EvalExample,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The block passes ruff, runs to the end, prints what its `#>` comments say, and logs no
    traceback (a hook that raises is swallowed, so only the log would show it)."""
    # pytest-examples types target_version without "py311", which it handles.
    eval_example.set_config(line_length=100, target_version="py311")  # type: ignore[arg-type]
    # `ruff format` writes pytest-examples' `#> output` comments as `# > output`: read those.
    monkeypatch.setattr(pytest_examples.run_code, "comment_prefix", OUTPUT)
    monkeypatch.setattr(pytest_examples.run_code, "comment_prefix_re", OUTPUT_RE)
    eval_example.lint_ruff(example)
    if is_test_file(example):
        run_as_test_file(example, tmp_path)
        return
    if ENV_DSN in example.source:
        monkeypatch.setenv(ENV_DSN, request.getfixturevalue("pg_database"))
    receiver: OtlpReceiver | None = None
    if ENV_OTLP in example.source:
        receiver = request.getfixturevalue("otlp_receiver")
        monkeypatch.setenv(ENV_OTLP, receiver.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the exporters honor a proxy otherwise
        monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.chdir(tmp_path)
    if eval_example.update_examples:  # pytest --update-examples rewrites the `#>` comments
        eval_example.run_print_update(example)
    else:
        eval_example.run_print_check(example)
    assert not [record for record in caplog.records if record.exc_info], caplog.text
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    if receiver is not None:
        assert receiver.scopes("/v1/traces") >= {"cqrs_resilience"}, receiver.posts
        assert receiver.scopes("/v1/metrics") >= {"cqrs_resilience"}, receiver.posts


def run_as_test_file(example: CodeExample, tmp_path: Path) -> None:
    (tmp_path / "test_from_docs.py").write_text(example.source)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_from_docs.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b\d+ passed\b", result.stdout) and " skipped" not in result.stdout


class OtlpReceiver:
    """What an OpenTelemetry collector's OTLP/HTTP receiver does, enough to check an export:
    takes POSTs on 127.0.0.1 (a free port), keeps each one's path and body, answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, bytes]] = []  # path, content type, body
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                posts.append((self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")  # an empty Export*ServiceResponse
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # no line per request on stderr

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def scopes(self, path: str) -> set[str]:
        """The instrumentation scopes of what was posted to `path`, decoded as OTLP protobuf
        (nothing for a body that is empty or not protobuf)."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found: set[str] = set()
        for posted, content_type, body in self.posts:
            if posted != path or content_type != "application/x-protobuf" or not body:
                continue
            if path == "/v1/traces":
                traces = ExportTraceServiceRequest.FromString(body)
                found |= {s.scope.name for r in traces.resource_spans for s in r.scope_spans}
            else:
                metrics = ExportMetricsServiceRequest.FromString(body)
                found |= {s.scope.name for r in metrics.resource_metrics for s in r.scope_metrics}
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A running OTLP/HTTP receiver, for a block that exports to OTEL_EXPORTER_OTLP_ENDPOINT."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()
