"""HTTP services: read the `Idempotency-Key` header, answer the library's errors (RFC 9457).

No web framework needed (`cqrs_resilience.contrib.starlette.install(app)` wires `problem()`
into Starlette and FastAPI):

    from cqrs_resilience.http import idempotency_key, problem

    try:
        key = idempotency_key(request.headers)  # a bad one: InvalidIdempotencyKeyError, a 400
        command = PayOrder(order_id=..., command_id=key or uuid.uuid4().hex)
        response = await handler.handle(command)
    except Exception as exc:
        answer = problem(exc)  # status, headers and body; None: not the library's to answer
        if answer is None:
            raise
        return Response(answer.to_json(), answer.status, answer.headers, answer.media_type)

The docs' HTTP page (docs/how-to/http.md) has the status table and what each answer holds.
"""

from ._http_headers import idempotency_key
from ._problems import Problem, problem

__all__ = ["Problem", "idempotency_key", "problem"]
