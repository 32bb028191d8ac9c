"""`idempotency_key()`: the `Idempotency-Key` header of a request, as a command id.

The header is read from whatever a framework hands over (a mapping, multi-valued or not, or
ASGI's raw pairs) and checked with the command-id rule (`check_command_id`), so a key that
passes is a valid `command_id`. A quoted value is an RFC 8941 string (section 4.2.5); the
IETF draft defines the header as one, without parameters, so anything after the closing quote
is refused rather than dropped (two keys that differ only there must not become one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol, TypeAlias, cast

from ._errors import InvalidIdempotencyKeyError
from ._messages import MAX_ID_LENGTH, check_command_id


class _HasItems(Protocol):
    def items(self) -> Iterable[tuple[Any, Any]]: ...


Headers: TypeAlias = _HasItems | Iterable[tuple[str | bytes, str | bytes]]
"""What frameworks hand you: a mapping (a dict, Starlette's `Headers`, `http.client`'s
`HTTPMessage`) or ASGI's raw `(name, value)` pairs, as bytes or text."""

_NAME = "Idempotency-Key"
_LOWER = _NAME.lower()
_SHOWN = 40
"""The most characters of a refused value an error message repeats."""
_PLAIN_QUOTED = re.compile(r'"([ !#-\[\]-~]*)"')
"""A quoted string of printable ASCII without `"` or `\\` inside: nothing to unescape."""
_LONGEST = 2 + 2 * MAX_ID_LENGTH
"""The longest value that may hold a valid key: a quoted one with every character escaped."""


def idempotency_key(headers: Headers) -> str | None:
    """The request's `Idempotency-Key`, a valid `command_id`; None when it has none.

    The header's name matches in any case. Its value is either a structured-field string
    (RFC 8941: in double quotes, printable ASCII, `\\"` and `\\\\` escaped) or taken as it is
    (a UUID, say), less surrounding spaces and tabs. Bytes are read as UTF-8; text is taken as
    the framework decoded it. A key that cannot be a command id (empty, longer than 255
    characters, a control character), a value that is not UTF-8, bad quoting, or several
    `Idempotency-Key` headers that disagree raise `InvalidIdempotencyKeyError` (HTTP 400),
    which says what is wrong.
    """
    found: str | None = None
    for name, value in _pairs(headers):
        if _header_name(name) != _LOWER:
            continue
        key = _parse(value)
        if found is not None and key != found:
            raise InvalidIdempotencyKeyError(
                f"the request has several {_NAME} headers with different values: "
                f"{_shown(found)} and {_shown(key)}"
            )
        found = key
    return found


def _pairs(headers: Headers) -> Iterable[tuple[object, object]]:
    # A multi-valued mapping (Starlette's Headers, an email Message) lists a repeated header
    # once per value in items(), where a lookup by name would see only the first.
    items = getattr(headers, "items", None)
    pairs: object = items() if callable(items) else headers
    try:
        iterator = iter(cast(Iterable[object], pairs))
    except TypeError:
        raise TypeError(
            "idempotency_key() takes the request's headers: a mapping or (name, value) pairs, "
            f"got {type(headers).__name__}"
        ) from None
    for pair in iterator:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(
                "idempotency_key() takes the request's headers as (name, value) pairs, "
                f"got an item of type {type(pair).__name__}"
            )
        yield pair[0], pair[1]


def _header_name(name: object) -> str | None:
    if isinstance(name, str):
        return name.lower()
    if isinstance(name, bytes | bytearray):
        return bytes(name).decode("latin-1").lower()
    return None


def _parse(value: object) -> str:
    """The key a header value carries, or `InvalidIdempotencyKeyError`."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        try:
            value = raw.decode()
        except UnicodeDecodeError:
            raise InvalidIdempotencyKeyError(
                f"the {_NAME} header is not UTF-8 text: {_shown(raw)}"
            ) from None
    elif not isinstance(value, str):
        raise TypeError(
            f"idempotency_key() takes header values as str or bytes, got {type(value).__name__}"
        )
    text = value.strip(" \t")
    if len(text) > _LONGEST:  # refused before it is read a character at a time
        raise InvalidIdempotencyKeyError(
            f"the {_NAME} header must be at most {MAX_ID_LENGTH} characters; "
            f"it is {len(text):,} long: {_shown(text)}"
        )
    key = _unquote(text) if text.startswith('"') or text.endswith('"') else text
    problem = check_command_id(key, f"the {_NAME} header")
    if problem is not None:
        raise InvalidIdempotencyKeyError(f"{problem}: {_shown(key)}")
    return key


def _unquote(text: str) -> str:
    """An RFC 8941 string (sf-string, section 4.2.5) without its quotes and escapes."""
    if not text.startswith('"'):
        raise _bad_quoting(text, " ends with a quote it does not start with")
    plain = _PLAIN_QUOTED.fullmatch(text)
    if plain is not None:  # the usual key, a quoted UUID: no escape to read
        return plain[1]
    chars: list[str] = []
    escaped = False
    for at, char in enumerate(text[1:], start=1):
        if escaped:
            if char not in '"\\':
                raise _bad_quoting(
                    text, f"'s quoted string escapes {char!r} (only \\\" and \\\\ may be)"
                )
            chars.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if at != len(text) - 1:
                raise _bad_quoting(text, " has text after its quoted string")
            return "".join(chars)
        elif " " <= char <= "~":
            chars.append(char)
        else:
            raise _bad_quoting(
                text, f"'s quoted string holds U+{ord(char):04X} (it takes printable ASCII only)"
            )
    raise _bad_quoting(text, " starts a quoted string it does not end")


def _bad_quoting(text: str, what: str) -> InvalidIdempotencyKeyError:
    return InvalidIdempotencyKeyError(f"the {_NAME} header{what}: {_shown(text)}")


def _shown(value: str | bytes) -> str:
    """`value`'s repr, cut to a few dozen characters: enough to recognize, never a flood."""
    text = repr(value)
    if len(text) <= _SHOWN:
        return text
    unit = "bytes" if isinstance(value, bytes) else "characters"
    return f"{text[: _SHOWN - 3]}... ({len(value):,} {unit})"
