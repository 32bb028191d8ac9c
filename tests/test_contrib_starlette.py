"""cqrs_resilience.contrib.starlette: a Starlette or FastAPI app answers the library's errors
with problem details, and leaves every other exception to the framework."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from cqrs_resilience import StoreError, TransientError
from cqrs_resilience.contrib.starlette import install
from cqrs_resilience.http import idempotency_key, problem
from tests.http_errors import ROWS, Row

BY_NAME = {row.name: row for row in ROWS}


async def raise_row(request: Request) -> Response:
    raise BY_NAME[request.path_params["name"]].make()


async def raise_value_error(request: Request) -> Response:
    raise ValueError("a bug in the app")


async def echo_key(request: Request) -> Response:
    return JSONResponse(
        {
            "headers": idempotency_key(request.headers),
            "raw": idempotency_key(request.scope["headers"]),
        }
    )


def starlette_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/raise/{name}", raise_row),
            Route("/bug", raise_value_error),
            Route("/key", echo_key, methods=["POST"]),
        ]
    )
    install(app)
    return app


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/raise/{name}")
    async def raise_named(name: str) -> None:
        raise BY_NAME[name].make()

    @app.get("/bug")
    async def bug() -> None:
        raise ValueError("a bug in the app")

    @app.post("/orders/{order_id}/pay")
    async def pay(order_id: int, request: FastAPIRequest) -> dict[str, Any]:
        return {"order_id": order_id, "key": idempotency_key(request.headers)}

    install(app)
    return app


APPS = {"starlette": starlette_app, "fastapi": fastapi_app}


@pytest.fixture(params=list(APPS))
def client(request: pytest.FixtureRequest) -> TestClient:
    """A TestClient on a Starlette app and on a FastAPI app, each with install() applied."""
    return TestClient(APPS[request.param](), raise_server_exceptions=False)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_an_endpoint_raising_a_library_error_answers_with_its_problem(
    client: TestClient, row: Row
) -> None:
    """Status, headers and an application/problem+json body: what problem() says."""
    response = client.get(f"/raise/{row.name}")
    expected = problem(row.make())
    assert expected is not None
    assert response.status_code == row.status
    assert response.headers["content-type"] == "application/problem+json"
    for name, value in row.headers.items():
        assert response.headers[name] == value
    assert "retry-after" in response.headers or not row.headers
    assert response.json() == expected.body


def test_other_exceptions_are_left_to_the_framework(client: TestClient) -> None:
    """A bug in the app is the framework's plain 500, and raises in tests as it did before."""
    response = client.get("/bug")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/plain")
    with pytest.raises(ValueError, match="a bug in the app"):
        TestClient(client.app).get("/bug")
    assert client.get("/nowhere").status_code == 404  # the framework's own HTTP errors too


def test_server_faults_are_logged_with_their_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A 500 is answered and logged on the cqrs_resilience logger (the framework no longer
    sees it); a 503 or a 409 is an answer, not a fault, and is not logged here."""
    with caplog.at_level(logging.INFO, logger="cqrs_resilience"):
        client.get("/raise/StoreError")
        client.get("/raise/TransientError")
        client.get("/raise/ConcurrencyError")
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.name == "cqrs_resilience"
    assert record.getMessage() == "GET /raise/StoreError failed: StoreError"
    assert record.exc_info is not None and isinstance(record.exc_info[1], StoreError)


def test_a_handler_the_app_registered_stays() -> None:
    """install() adds its handlers beside the app's: one the app set for a class stays."""

    async def own(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("the app's own answer", status_code=599)

    app = Starlette(
        routes=[Route("/raise/{name}", raise_row)], exception_handlers={TimeoutError: own}
    )
    install(app)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/raise/TimeoutError").status_code == 599
    assert client.get("/raise/CommandTimeoutError").status_code == 504  # a library error
    assert client.get("/raise/BrokenCircuitError").status_code == 503


def test_the_key_is_read_from_starlette_headers_and_raw_asgi_headers() -> None:
    """idempotency_key() takes Starlette's Headers and the ASGI scope's raw headers alike."""
    client = TestClient(starlette_app())
    response = client.post("/key", headers={"Idempotency-Key": '"k-1"'})
    assert response.json() == {"headers": "k-1", "raw": "k-1"}
    assert client.post("/key").json() == {"headers": None, "raw": None}
    assert idempotency_key(Headers(raw=[(b"idempotency-key", b"k-2")])) == "k-2"


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "k-1"), ("idempotency-key", "k-2")],
        [("Idempotency-Key", '"unterminated')],
        [("Idempotency-Key", "k" * 256)],
    ],
)
def test_an_invalid_key_is_a_400_problem(headers: list[tuple[str, str]]) -> None:
    """A key that cannot be a command id (or two keys that disagree) is answered 400."""
    for app, path in ((starlette_app(), "/key"), (fastapi_app(), "/orders/1/pay")):
        response = TestClient(app).post(path, headers=headers)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["code"] == "invalid_idempotency_key" and "Idempotency-Key" in body["detail"]


def test_fastapi_keeps_its_own_request_validation() -> None:
    """FastAPI's own 422 for a bad path or body stays FastAPI's; a key reads as usual."""
    client = TestClient(fastapi_app())
    response = client.post("/orders/one/pay")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    ok = client.post("/orders/7/pay", headers={"Idempotency-Key": "k-7"})
    assert ok.json() == {"order_id": 7, "key": "k-7"}


def test_a_retried_transient_error_that_gives_up_is_a_503_with_retry_after() -> None:
    """The usual path: retries give up on a TransientError that says when to come back."""
    from cqrs_resilience import FakeClock, FixedRetryPolicy, retry

    @retry(FixedRetryPolicy(max_retries=2, delay_ms=10, jitter=False), clock=FakeClock())
    async def charge() -> str:
        raise TransientError("gateway busy", retry_after=7.5)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(await charge())

    app = Starlette(routes=[Route("/charge", endpoint)])
    install(app)
    response = TestClient(app).get("/charge")
    assert (response.status_code, response.headers["retry-after"]) == (503, "8")


def test_import_cqrs_resilience_does_not_need_starlette() -> None:
    """The core and cqrs_resilience.http import no web framework."""
    code = (
        "import sys, cqrs_resilience, cqrs_resilience.http; "
        "assert not {'starlette', 'fastapi'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_starlette_the_import_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Importing the integration without Starlette says which pip command brings it."""
    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    monkeypatch.delitem(sys.modules, "cqrs_resilience.contrib.starlette")
    with pytest.raises(ImportError, match=r"pip install 'cqrs-resilience\[starlette\]'"):
        importlib.import_module("cqrs_resilience.contrib.starlette")
