"""Retries happening: a flaky email service behind a decorated handler and a handler class.

python examples/retry_demo.py
"""

from __future__ import annotations

import asyncio
import random

import msgspec

from cqrs_resilience import (
    Command,
    CommandResponse,
    ExponentialBackoffPolicy,
    HookRegistry,
    Retryable,
    RetryableCommandHandler,
    TransientError,
    retry,
)

hooks = HookRegistry()


@hooks.hook("handler.retry.*")
def show(context: dict[str, object]) -> None:
    if context["delay_ms"] is None:
        print(f"  gave up on {context['command.type']}: {context['error']!r}")
    else:
        print(
            f"  retry {context['attempt']}/{context['max_retries']} of {context['command.type']} "
            f"in {context['delay_ms']:.0f} ms after {context['error']!r}"
        )


class SendEmail(Command[str], Retryable):
    to: str
    retry_policy: ExponentialBackoffPolicy = msgspec.field(
        default_factory=lambda: ExponentialBackoffPolicy(max_retries=4, initial_delay_ms=20)
    )


class FlakySmtp:
    """Times out on a fixed share of calls."""

    def __init__(self, failure_rate: float, seed: int) -> None:
        self.random = random.Random(seed)
        self.failure_rate = failure_rate
        self.calls = 0

    async def send(self, to: str) -> None:
        self.calls += 1
        if self.random.random() < self.failure_rate:
            raise TransientError(f"smtp timeout (call {self.calls})")


async def main() -> None:
    smtp = FlakySmtp(failure_rate=0.5, seed=7)

    @retry(hooks=hooks)
    async def send_email(command: SendEmail) -> str:
        await smtp.send(command.to)
        return f"sent to {command.to}"

    print("A decorated function:")
    for name in ("ada", "grace", "edsger"):
        print(" ", await send_email(SendEmail(to=f"{name}@example.com")))

    class SendEmailHandler(RetryableCommandHandler[str]):
        async def process(self, command: SendEmail) -> CommandResponse[str]:
            await self.dispatcher.send(command.to)
            return CommandResponse(result=f"sent to {command.to}")

    print("A handler class:")
    handler = SendEmailHandler(smtp, hooks=hooks)
    for name in ("barbara", "donald", "alan"):
        try:
            response = await handler.handle(SendEmail(to=f"{name}@example.com"))
        except TransientError as exc:  # the budget ran out: the last error, with a note
            print(f"  failed: {exc} ({'; '.join(exc.__notes__)})")
        else:
            print(" ", response.result)
    print(f"{smtp.calls} SMTP calls for 6 emails.")


if __name__ == "__main__":
    asyncio.run(main())
