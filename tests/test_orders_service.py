"""`examples/orders_service.py` under a real uvicorn server, over HTTP: 200 concurrent POSTs
to one order, 20 of them resending one key, then a late resend; and bad input at the door."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

httpx2 = pytest.importorskip("httpx2")  # in the dev extra

ROOT = Path(__file__).resolve().parent.parent
CONCURRENT = 200
RESENDS = 20
BOUND_S = 60.0


class Server:
    """The example service under uvicorn, in a process of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.orders_service:app", "--port", "0"],
            cwd=ROOT,
            env={**os.environ, **env},
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        assert self.process.stderr is not None
        threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + BOUND_S
        while (left := deadline - time.monotonic()) > 0:
            line = self.lines.get(timeout=left)
            self.log.append(line)
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                return found.group(1)
            if line == "":
                break
        raise AssertionError("the service did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(BOUND_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """The service on SQLite (a fresh file) or PostgreSQL (a fresh database)."""
    env = {"ORDERS_DB": str(tmp_path / "orders.sqlite3"), "CQRS_RESILIENCE_PG_DSN": ""}
    if request.param == "postgres":
        env["CQRS_RESILIENCE_PG_DSN"] = request.getfixturevalue("pg_database")
    server = Server(env)
    yield server
    server.stop()


def item_body(n: int) -> bytes:
    return msgspec.json.encode({"sku": f"sku-{n}", "quantity": n % 5 + 1})


async def test_a_burst_with_resends_adds_every_item_once_and_answers_resends_alike(
    service: Server,
) -> None:
    """200 concurrent POSTs to one order, 20 resending one key, then a late resend: every
    status 201, every item in the order exactly once, every resend's body byte-identical."""
    async with httpx2.AsyncClient(
        base_url=service.url, timeout=BOUND_S, limits=httpx2.Limits(max_connections=CONCURRENT)
    ) as client:

        async def post(key: str, body: bytes) -> Any:
            return await client.post(
                "/orders/hot/items", content=body, headers={"Idempotency-Key": key}
            )

        sends = [("resent", item_body(0))] * RESENDS
        sends += [(f"key-{n}", item_body(n)) for n in range(1, CONCURRENT - RESENDS + 1)]
        started = time.monotonic()
        answers = await asyncio.gather(*(post(key, body) for key, body in sends))
        elapsed = time.monotonic() - started
        late = await post("resent", item_body(0))
        order = msgspec.json.decode((await client.get("/orders/hot")).content)

    statuses = Counter(answer.status_code for answer in [*answers, late])
    assert statuses == Counter({201: CONCURRENT + 1}), [
        answer.text for answer in answers if answer.status_code != 201
    ][:3]
    resent_bodies = {answer.content for answer in answers[:RESENDS]} | {late.content}
    assert len(resent_bodies) == 1, resent_bodies
    keys = Counter(item["id"] for item in order["items"])
    assert keys == Counter({key: 1 for key, _ in sends})
    assert order["version"] == len(keys)  # the first item made the order, at version 1
    print(
        f"\n{service.url}: {CONCURRENT} POSTs in {elapsed:.2f} s ({CONCURRENT / elapsed:.0f} "
        f"requests/s); {len(resent_bodies)} distinct answer(s) to {RESENDS + 1} sends of one key"
    )


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({"Idempotency-Key": ""}, item_body(1), 400, "invalid_idempotency_key"),
        ({"Idempotency-Key": "k" * 256}, item_body(1), 400, "invalid_idempotency_key"),
        ({"Idempotency-Key": '"a\\u0000b"'}, item_body(1), 400, "invalid_idempotency_key"),
        ({"Idempotency-Key": '"tab\there"'}, item_body(1), 400, "invalid_idempotency_key"),
        ({"Idempotency-Key": "fresh"}, b'{"sku": "tea"}', 422, "invalid_body"),
        ({"Idempotency-Key": "fresh"}, b"not json", 422, "invalid_body"),
        ({"Idempotency-Key": "first"}, item_body(2), 422, "idempotency_key_reuse"),
    ],
    ids=["empty", "too long", "NUL", "control", "missing field", "not json", "reused key"],
)
async def test_bad_input_at_the_door_is_a_problem_and_writes_nothing(
    service: Server, headers: dict[str, str], body: bytes, status: int, code: str
) -> None:
    """A bad key, a body that does not decode, a key reused with another body: a problem
    response with the right status, and the order as it was."""
    async with httpx2.AsyncClient(base_url=service.url, timeout=BOUND_S) as client:
        first = await client.post(
            "/orders/o/items", content=item_body(1), headers={"Idempotency-Key": "first"}
        )
        assert first.status_code == 201
        answer = await client.post("/orders/o/items", content=body, headers=headers)
        after = msgspec.json.decode((await client.get("/orders/o")).content)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert msgspec.json.decode(answer.content)["code"] == code
    assert after == msgspec.json.decode(first.content)
