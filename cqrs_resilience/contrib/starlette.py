"""Starlette and FastAPI: answer the library's errors with problem details.

    pip install 'cqrs-resilience[starlette]'

    from cqrs_resilience.contrib.starlette import install
    install(app)  # a Starlette or FastAPI app

Every error `cqrs_resilience.http.problem()` maps (each `CqrsResilienceError`, the builtin
`TimeoutError`, `msgspec.DecodeError`) raised by an endpoint is answered with its status,
its headers and an `application/problem+json` body. Other exceptions are left to the app and
the framework. A server fault (status 500) is logged with its traceback on the
`cqrs_resilience` logger at ERROR, since the framework no longer sees it; the others are
answers, not faults, and are not logged here.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import msgspec

from .._errors import CqrsResilienceError
from ..http import problem

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cqrs_resilience.contrib.starlette needs Starlette: "
        "pip install 'cqrs-resilience[starlette]'"
    ) from exc

__all__ = ["install"]

logger = logging.getLogger("cqrs_resilience")

ANSWERED: tuple[type[Exception], ...] = (
    CqrsResilienceError,
    TimeoutError,
    msgspec.DecodeError,
)
"""The exception classes `install()` adds a handler for: what `problem()` maps."""


def install(app: Starlette) -> None:
    """Answer what `problem()` maps with problem details, on `app` (Starlette or FastAPI).

    Call it once, where the app is built. A handler you registered for one of these classes
    (`CqrsResilienceError`, `TimeoutError`, `msgspec.DecodeError`) stays in place.
    """
    for kind in ANSWERED:
        if kind not in app.exception_handlers:
            app.add_exception_handler(kind, answer)


async def answer(request: Request, exc: Exception) -> Response:
    """The problem-details response for `exc` (the exception handler `install()` adds)."""
    found = problem(exc)
    if found is None:  # only reached when registered by hand for another class
        raise exc
    if found.status == HTTPStatus.INTERNAL_SERVER_ERROR:
        logger.error(
            "%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
        )
    return Response(
        found.to_json(),
        status_code=found.status,
        headers=found.headers,
        media_type=found.media_type,
    )
