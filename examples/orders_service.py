"""An orders service over HTTP: idempotency keys, resends answered with the first response.

    POST /orders/{order_id}/items   {"sku": "tea", "quantity": 2}   Idempotency-Key: <key>
        201 and the order as this item left it. The same request again (the client did not
        hear the answer) gets the same 201 and the same body, byte for byte, and adds
        nothing. The same key with another body is a 422.
    GET /orders/{order_id}
        200 and the order as it is now, or 404.

Every error is an RFC 9457 problem response (`cqrs_resilience.contrib.starlette.install`).
The command is built from what the client sent alone (path, body, key), never from a read of
the order: a resend must be the same command, or it would be refused as another command
reusing the key. The handler reads the order, adds the item and writes it at the version it
read; when another request wrote first, it runs again on the order as it is now.

Run it (SQLite in `orders.sqlite3`, or the file `ORDERS_DB` names; PostgreSQL when
`CQRS_RESILIENCE_PG_DSN` is set):

    pip install -e '.[starlette]' fastapi uvicorn
    uvicorn examples.orders_service:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response

from cqrs_resilience import (
    Aggregate,
    Command,
    CommandResponse,
    ConflictConfig,
    ConflictResolutionPolicy,
    Repository,
    ResilientCommandHandler,
    RetryBudget,
    circuit_breaker,
    new_command_id,
)
from cqrs_resilience.contrib.starlette import install
from cqrs_resilience.http import idempotency_key


class LineItem(msgspec.Struct, frozen=True):
    id: str  # the key of the request that added it
    sku: str
    quantity: int


class Order(Aggregate):
    items: list[LineItem] = msgspec.field(default_factory=list)


class NewItem(msgspec.Struct, forbid_unknown_fields=True):
    """The request body: what the client asks for, checked as it is decoded."""

    sku: str
    quantity: int


class OrderView(msgspec.Struct, frozen=True):
    """The response body: the order as a request left it."""

    id: str
    version: int
    items: list[LineItem]


class AddItem(Command[OrderView]):
    """Add one line item: built from the client's input alone (path, body, key)."""

    order_id: str
    sku: str
    quantity: int


# On a conflict, run the command again on the order as it is now (the command carries the
# item, not the order: nothing to merge). Conflicts on one order are resolved one at a time.
RUN_AGAIN = ConflictConfig(policy=ConflictResolutionPolicy.RUN_AGAIN, max_attempts=10)


class AddItemHandler(ResilientCommandHandler[OrderView]):
    """Timeout, a budgeted retry of transient failures, a circuit breaker, conflicts run
    again; `responses` (set at startup) answers resends before any of them."""

    timeout_s = 10.0
    retry_budget = RetryBudget()
    breaker = circuit_breaker()
    conflict_config = RUN_AGAIN

    async def process(self, command: AddItem) -> CommandResponse[OrderView]:
        orders: Repository[Order] = self.repository
        found = await orders.retrieve([command.order_id])
        order = found[0] if found else Order(id=command.order_id)
        item = LineItem(id=command.command_id, sku=command.sku, quantity=command.quantity)
        stored = await orders.persist(msgspec.structs.replace(order, items=[*order.items, item]))
        return CommandResponse(result=OrderView(stored.id, stored.version, stored.items))


def open_orders() -> Any:
    """The store: PostgreSQL when `CQRS_RESILIENCE_PG_DSN` is set, else a SQLite file."""
    dsn = os.environ.get("CQRS_RESILIENCE_PG_DSN")
    if dsn:
        from cqrs_resilience.stores import PostgresRepository

        return PostgresRepository(dsn, Order)
    from cqrs_resilience.stores import SQLiteRepository

    return SQLiteRepository(os.environ.get("ORDERS_DB", "orders.sqlite3"), Order)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with open_orders() as orders:
        handler = AddItemHandler(orders)
        handler.responses = orders  # resends answered from the same database
        app.state.orders = orders
        app.state.add_item = handler
        yield


app = FastAPI(title="orders", lifespan=lifespan)
install(app)  # every library error answered as application/problem+json


@app.post("/orders/{order_id}/items", status_code=201)
async def add_item(order_id: str, request: Request) -> Response:
    key = idempotency_key(request.headers) or new_command_id()  # no key: no resend to match
    body = msgspec.json.decode(await request.body(), type=NewItem)  # a 422 if it does not
    command = AddItem(command_id=key, order_id=order_id, sku=body.sku, quantity=body.quantity)
    response = await request.app.state.add_item.handle(command)
    return Response(msgspec.json.encode(response.result), 201, media_type="application/json")


@app.get("/orders/{order_id}")
async def get_order(order_id: str, request: Request) -> Response:
    found = await request.app.state.orders.retrieve([order_id])
    if not found:
        return Response(status_code=404)
    view = OrderView(found[0].id, found[0].version, found[0].items)
    return Response(msgspec.json.encode(view), media_type="application/json")
