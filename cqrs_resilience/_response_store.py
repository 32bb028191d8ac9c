"""What a store keeps for `idempotent()`: each command's first response, or its claim on it.

Every store of the library keeps it (in memory, SQLite, PostgreSQL), in a table of its own,
apart from the versions `keep_versions` prunes. A response is kept `keep_s` seconds (the
store's `keep_commands_s` by default); while a command runs, each of its writes to the store
keeps a *claim* on its response instead (see `Claim`), which lapses `lease_s` after its last
write, so that a process dying mid-command holds its resends up for a while, not for good.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._clock import Clock


class RecordedResponse(NamedTuple):
    """A command id's row: the command's fingerprint and its response; or, while it runs
    (`response` None), who claimed it and until when."""

    fingerprint: bytes
    response: bytes | None
    owner: str | None = None
    expires_at: float | None = None


@runtime_checkable
class ResponseStore(Protocol):
    """A store `idempotent()` can record responses in."""

    max_state_bytes: int  # the largest response it takes, encoded
    clock: Clock  # whose time expiries and claims go by

    async def recorded_response(self, command_id: str) -> RecordedResponse | None:
        """The response recorded for `command_id`, or its live claim, or None: one read."""
        ...

    async def record_response(
        self, command_id: str, fingerprint: bytes, response: bytes, keep_s: float | None
    ) -> RecordedResponse:
        """Record `response` unless a response is recorded already; return the one that is
        (this one, or the first)."""
        ...

    async def release_claim(self, command_id: str, owner: str) -> None:
        """Drop `owner`'s claim on the response (its command failed): a resend runs again."""
        ...


def kept_until(now: float, keep_s: float | None, keep_commands_s: float | None) -> float | None:
    """When a response recorded `now` expires: `keep_s` from now, else the store's
    `keep_commands_s`; None (never) when both are None."""
    keep = keep_s if keep_s is not None else keep_commands_s
    return None if keep is None else now + keep


def replaceable(row: RecordedResponse | None, now: float) -> bool:
    """Whether a claim or a response may take `row`'s place: none is there, it is a claim,
    or it expired. A live response never gives way: the first one stays."""
    return (
        row is None
        or row.response is None
        or (row.expires_at is not None and row.expires_at <= now)
    )


def record_args(
    command_id: str,
    fingerprint: bytes,
    response: bytes,
    keep_s: float | None,
    keep_commands_s: float | None,
    now: float,
) -> dict[str, object]:
    """The parameters of the statement that records a response (`_sql.RECORD_RESPONSE`)."""
    return {
        "command_id": command_id,
        "fingerprint": fingerprint,
        "response": response,
        "now": now,
        "keep_until": kept_until(now, keep_s, keep_commands_s),
    }
