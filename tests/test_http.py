"""cqrs_resilience.http: the Idempotency-Key header, and the problem details each error gets."""

from __future__ import annotations

import asyncio
import contextlib
import email
import io
import math
import re
from http import HTTPStatus
from http.client import parse_headers
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cqrs_resilience
from cqrs_resilience import (
    BrokenCircuitError,
    Command,
    CommandInProgressError,
    CommandTimeoutError,
    CqrsResilienceError,
    IdempotencyKeyReuseError,
    InvalidIdempotencyKeyError,
    StoreError,
    TransientError,
)
from cqrs_resilience._messages import check_command_id
from cqrs_resilience.http import Problem, idempotency_key, problem
from tests.http_errors import ROWS, SECRET, Row

HTTP_PAGE = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "http.md"


def answer_to(exc: BaseException) -> Problem:
    """`problem(exc)`, which must not be None."""
    found = problem(exc)
    assert found is not None, exc
    return found


# --- idempotency_key() ------------------------------------------------------------------------

UUID = "8e03978e-40d5-43e8-bc93-6894a57f9324"


def test_the_module_exports_its_three_names() -> None:
    """cqrs_resilience.http exports Problem, idempotency_key and problem, and nothing else."""
    import cqrs_resilience.http as http

    assert http.__all__ == ["Problem", "idempotency_key", "problem"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Content-Type": "application/json"},
        [],
        [(b"content-type", b"application/json")],
    ],
)
def test_a_request_without_the_header_has_no_key(headers: Any) -> None:
    """No Idempotency-Key header: None, so the command keeps its own fresh id."""
    assert idempotency_key(headers) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Idempotency-Key": UUID},
        {"idempotency-key": UUID},
        {"IDEMPOTENCY-KEY": UUID},
        {"Accept": "*/*", "iDempotency-kEY": UUID},
        [(b"idempotency-key", UUID.encode())],
        [(b"Idempotency-Key", UUID.encode()), (b"accept", b"*/*")],
        [("Idempotency-Key", UUID)],
        (("idempotency-key", UUID),),
    ],
    ids=repr,
)
def test_the_header_is_found_in_any_case_in_a_mapping_or_raw_pairs(headers: Any) -> None:
    """A dict or ASGI's raw (name, value) pairs, bytes or text, any case of the name."""
    assert idempotency_key(headers) == UUID


def test_http_client_and_email_messages_are_read() -> None:
    """http.client's HTTPMessage and an email Message (multi-valued, case-insensitive) work."""
    raw = f"Host: example.com\r\nidempotency-KEY: {UUID}\r\n\r\n".encode()
    assert idempotency_key(parse_headers(io.BytesIO(raw))) == UUID
    message = email.message_from_string(f"Idempotency-Key: {UUID}\n\n")
    assert idempotency_key(message) == UUID


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (UUID, UUID),
        (f"  {UUID}\t", UUID),  # optional whitespace around a value
        (f'"{UUID}"', UUID),  # the IETF draft's structured-field string
        (f' "{UUID}" ', UUID),
        (r'"a\"b\\c"', 'a"b\\c'),  # the two escapes of RFC 8941
        ('"with inner spaces "', "with inner spaces "),  # inside quotes spaces are the key's
        ('ab"c', 'ab"c'),  # a bare value is taken as it is
        ("café-1", "café-1"),
        (b"caf\xc3\xa9-1", "café-1"),  # bytes are UTF-8
        ("k" * 255, "k" * 255),
        ('"' + "\\\\" * 255 + '"', "\\" * 255),  # the longest quoted form of a valid key
    ],
)
def test_a_bare_or_quoted_value_gives_the_key(value: str | bytes, key: str) -> None:
    """A bare value is the key less surrounding whitespace; a quoted one is unescaped."""
    assert idempotency_key({"Idempotency-Key": value}) == key


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must be a non-empty string"),
        (" \t ", "must be a non-empty string"),
        ('""', "must be a non-empty string"),
        ("k" * 256, "must be at most 255 characters, not 256"),
        ('"' + "k" * 256 + '"', "must be at most 255 characters, not 256"),
        ("k" * 513, "must be at most 255 characters; it is 513 long"),
        ("a\x00b", "must not contain control characters .* U\\+0000"),
        ("a\x1fb", "U\\+001F"),
        ("a\x7fb", "U\\+007F"),
        ("a\nb", "U\\+000A"),
        ("\udc80abc", "valid Unicode"),
        ('"abc', "starts a quoted string it does not end"),
        ('"', "starts a quoted string it does not end"),
        ('abc"', "ends with a quote it does not start with"),
        ('"abc\\"', "starts a quoted string it does not end"),
        ('"abc";x=1', "has text after its quoted string"),
        ('"a", "b"', "has text after its quoted string"),
        ('"a\\nb"', r"quoted string escapes 'n' \(only"),
        ('"café"', r"quoted string holds U\+00E9 \(it takes printable ASCII only\)"),
        ('"a\tb"', r"quoted string holds U\+0009"),
        (b"caf\xe9", "is not UTF-8 text"),
    ],
)
def test_an_invalid_key_is_refused_saying_what_is_wrong(value: str | bytes, message: str) -> None:
    """A key no command id could be, bad quoting or bytes that are not UTF-8: a 400 error
    naming the header and the fault."""
    with pytest.raises(InvalidIdempotencyKeyError, match=message) as caught:
        idempotency_key({"Idempotency-Key": value})
    assert "Idempotency-Key header" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert answer_to(caught.value).status == 400


@pytest.mark.parametrize("value", ["k" * 100_000, '"' + "k" * 100_000, b"\xff" * 100_000])
def test_a_huge_value_is_never_repeated_in_full(value: str | bytes) -> None:
    """The message shows the start of a refused value and its length, not the value."""
    with pytest.raises(InvalidIdempotencyKeyError) as caught:
        idempotency_key([(b"idempotency-key", value)])
    text = str(caught.value)
    assert len(text) < 200 and re.search(r"100,00[01]", text)


def test_repeated_headers_must_agree() -> None:
    """The same key sent twice (quoted or not) is that key; two different keys are refused."""
    same = [(b"idempotency-key", b"k-1"), (b"Idempotency-Key", b'"k-1"')]
    assert idempotency_key(same) == "k-1"
    with pytest.raises(InvalidIdempotencyKeyError, match=r"several .* 'k-1' and 'k-2'"):
        idempotency_key([(b"idempotency-key", b"k-1"), (b"idempotency-key", b"k-2")])
    with pytest.raises(InvalidIdempotencyKeyError, match="several"):
        idempotency_key({"Idempotency-Key": "k-1", "idempotency-key": "k-2"})
    message = email.message_from_string("Idempotency-Key: k-1\nIdempotency-Key: k-2\n\n")
    with pytest.raises(InvalidIdempotencyKeyError, match="several"):
        idempotency_key(message)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (42, "takes the request's headers: a mapping or .* got int"),
        ([b"idempotency-key"], "takes .* as \\(name, value\\) pairs, got an item of type bytes"),
        ({"Idempotency-Key": 42}, "takes header values as str or bytes, got int"),
    ],
)
def test_something_that_is_no_headers_is_a_type_error(headers: Any, message: str) -> None:
    """A programming mistake is a TypeError naming idempotency_key(), not a 400."""
    with pytest.raises(TypeError, match=f"idempotency_key\\(\\) {message}"):
        idempotency_key(headers)


@given(st.one_of(st.text(), st.binary()))
def test_any_value_gives_a_valid_command_id_or_a_400(value: str | bytes) -> None:
    """Whatever a client sends, the answer is a key a command can carry, or the 400 error."""
    try:
        key = idempotency_key([(b"Idempotency-Key", value)])
    except InvalidIdempotencyKeyError:
        return
    assert key is not None and check_command_id(key) is None
    assert Command(command_id=key).command_id == key


PRINTABLE_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)


@given(PRINTABLE_ASCII.filter(lambda k: len(k) <= 255))
def test_a_quoted_key_reads_back_as_itself(key: str) -> None:
    """A key sent as an RFC 8941 string (quotes and backslashes escaped) is read back exactly."""
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert idempotency_key({"Idempotency-Key": quoted}) == key


@given(st.text(min_size=1, max_size=255))
def test_a_bare_key_reads_back_as_itself(key: str) -> None:
    """A valid command id sent bare (no surrounding whitespace or quotes) is itself."""
    if check_command_id(key) is not None or key != key.strip(" \t") or '"' in (key[0], key[-1]):
        return
    assert idempotency_key({"Idempotency-Key": key}) == key
    assert idempotency_key([(b"Idempotency-Key", key.encode())]) == key


# --- problem() --------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_each_error_gets_its_status_headers_and_body(row: Row) -> None:
    """The status table: status, Retry-After where due, an RFC 9457 body with a stable code,
    and the command id where the error knows it."""
    exc = row.make()
    answer = problem(exc)
    assert answer is not None
    assert (answer.status, answer.headers) == (row.status, row.headers)
    expected = {
        "type": "about:blank",
        "title": HTTPStatus(row.status).phrase,
        "status": row.status,
        "code": row.code,
    }
    if row.command_id is not None:
        expected["command_id"] = row.command_id
    assert {k: v for k, v in answer.body.items() if k != "detail"} == expected
    assert isinstance(answer.body["detail"], str) and answer.body["detail"]
    assert (answer.body["detail"] == str(exc)) is row.own_text
    assert answer.media_type == "application/problem+json"
    assert msgspec.json.decode(answer.to_json()) == answer.body


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_no_answer_repeats_what_a_store_or_driver_said(row: Row) -> None:
    """A DSN, host or path in an error's message never reaches the client."""
    answer = problem(row.make())
    assert answer is not None
    assert b"hunter2" not in answer.to_json() and b"db.internal" not in answer.to_json()
    assert SECRET not in repr(answer)


def test_the_detail_of_a_state_the_store_refuses_names_reason_and_path() -> None:
    """A refused state is the client's doing: the detail says what and where."""
    answer = problem(next(row for row in ROWS if row.name == "InvalidStateError").make())
    assert answer is not None
    assert answer.body["detail"] == (
        "the command would store a state this service cannot keep: "
        "Expected `str`, got `int` (at `$.items[0]`)"
    )


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("x"),
        KeyError("x"),
        RuntimeError("x"),
        ConnectionError("x"),  # retried by default, but not the library's error
        asyncio.CancelledError(),
        KeyboardInterrupt(),
    ],
    ids=repr,
)
def test_other_exceptions_get_no_answer(exc: BaseException) -> None:
    """Anything the table does not name is None: the app or the framework answers it."""
    assert problem(exc) is None


def test_the_most_specific_row_wins() -> None:
    """An error with several bases takes the row of the first of its classes the table has."""
    reuse = IdempotencyKeyReuseError("k", "o1")  # a StoreError (500) and a ValueError
    assert answer_to(reuse).status == 422
    timed_out = CommandTimeoutError("late")  # a CqrsResilienceError (500) and a TimeoutError
    assert answer_to(timed_out).status == 504

    class GatewayDown(TransientError):
        pass

    class LateStore(StoreError, TimeoutError):
        pass

    class LibraryTimeout(CqrsResilienceError, TimeoutError):
        pass

    assert answer_to(GatewayDown("x", retry_after=9.5)).headers == {"Retry-After": "10"}
    assert answer_to(LateStore("x")).status == 500
    assert answer_to(LibraryTimeout("x")).status == 504


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (0.0, "1"),
        (0.001, "1"),
        (1.0, "1"),
        (1.0000001, "2"),
        (59.5, "60"),
        (3, "3"),
        (1e300, "2147483648"),  # RFC 9111's cap on delta-seconds
    ],
)
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(seconds: float, header: str) -> None:
    """Retry-After: the error's retry_after rounded up to whole seconds, never 0."""
    for exc in (
        BrokenCircuitError(seconds),
        TransientError(retry_after=seconds),
        CommandInProgressError("k", retry_after=seconds),
    ):
        assert answer_to(exc).headers == {"Retry-After": header}


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -1.0, "3", True])
def test_a_retry_after_that_is_no_number_of_seconds_sends_no_header(seconds: Any) -> None:
    """An unusable retry_after (set after construction, say) is left out, not sent broken."""
    exc = TransientError("down")
    exc.retry_after = seconds
    assert answer_to(exc).headers == {}


def test_a_command_id_no_command_could_carry_is_left_out() -> None:
    """The body only repeats a command id that is a valid one, so it always encodes."""
    for bad in ("", "\x00", "\udc80", "k" * 256):
        answer = problem(CommandInProgressError(bad))
        assert answer is not None and "command_id" not in answer.body
        msgspec.json.encode(answer.body)


def test_a_long_detail_is_cut() -> None:
    """A client's own input quoted in a detail is cut to a few hundred characters."""
    answer = problem(InvalidIdempotencyKeyError("x" * 10_000 + "\udc80"))
    assert answer is not None
    assert len(answer.body["detail"]) == 300 and answer.body["detail"].endswith("...")
    lone_surrogate = answer_to(InvalidIdempotencyKeyError("a\udc80b"))
    assert lone_surrogate.to_json() == answer_to(InvalidIdempotencyKeyError("a?b")).to_json()


def test_an_error_that_cannot_print_itself_still_gets_its_answer() -> None:
    """An error whose message fails to build is answered with a generic detail."""

    class Unprintable(InvalidIdempotencyKeyError):
        def __str__(self) -> str:
            raise RuntimeError("broken __str__")

    answer = answer_to(Unprintable())
    assert (answer.status, answer.body["detail"]) == (400, "the request failed")


def test_problem_is_a_frozen_struct() -> None:
    """A Problem is a frozen msgspec Struct: it cannot be changed after it is made."""
    answer = Problem(status=500)
    assert (answer.headers, answer.body) == ({}, {})
    with pytest.raises(AttributeError):
        answer.status = 200  # type: ignore[misc]


def library_errors() -> list[type[BaseException]]:
    """Every exception class the library defines, found by walking the subclasses."""
    found: list[type[BaseException]] = []
    pending: list[type[BaseException]] = [CqrsResilienceError]
    while pending:
        klass = pending.pop()
        if klass.__module__.startswith("cqrs_resilience") and klass not in found:
            found.append(klass)
        pending.extend(klass.__subclasses__())
    return sorted(found, key=lambda klass: klass.__qualname__)


def test_every_library_error_has_an_example_row() -> None:
    """The table's examples name every error the library exports (a new one needs a row)."""
    exported = {
        name
        for name in cqrs_resilience.__all__
        if isinstance(getattr(cqrs_resilience, name), type)
        and issubclass(getattr(cqrs_resilience, name), CqrsResilienceError)
    }
    named = {row.name.split(" ")[0] for row in ROWS}
    assert exported <= named
    assert {klass.__name__ for klass in library_errors()} >= exported


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary())


@given(
    klass=st.sampled_from([*library_errors(), TimeoutError, msgspec.ValidationError]),
    args=st.lists(ANY_VALUE, max_size=3),
    attributes=st.dictionaries(
        st.sampled_from(["command_id", "retry_after", "reason", "path", "aggregate_id"]),
        ANY_VALUE,
    ),
)
def test_every_library_error_gets_an_answer_that_encodes(
    klass: type[BaseException], args: list[Any], attributes: dict[str, Any]
) -> None:
    """Every error type the library has, however it was built (even oddly: any arguments,
    any attributes), gets a 4xx or 5xx answer whose body encodes as JSON."""
    exc = klass.__new__(klass, *args)
    exc.args = tuple(args)
    for name, value in attributes.items():
        with contextlib.suppress(AttributeError):  # read-only: BrokenCircuitError.retry_after
            setattr(exc, name, value)
    answer = problem(exc)
    assert answer is not None
    assert 400 <= answer.status < 600 and answer.body["status"] == answer.status
    assert msgspec.json.decode(answer.to_json()) == answer.body
    assert set(answer.headers) <= {"Retry-After"}
    if "Retry-After" in answer.headers:
        assert re.fullmatch(r"[1-9][0-9]*", answer.headers["Retry-After"])
    if "command_id" in answer.body:
        assert check_command_id(answer.body["command_id"]) is None


# --- The HTTP page's table -----------------------------------------------------------------------


def readme_table() -> list[tuple[list[str], int, str, str]]:
    """(errors, status, code, headers) per row of the status table in docs/how-to/http.md."""
    text = HTTP_PAGE.read_text()
    start = text.index("| error | status | `code` | headers |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        errors, status, code, headers, _why = (cell.strip() for cell in line.strip("|").split("|"))
        names = re.findall(r"`([\w.]+)`", errors)
        rows.append((names, int(status), code.strip("`"), headers))
    return rows


def test_the_readme_table_is_what_problem_answers() -> None:
    """Every row of the status table in docs/how-to/http.md holds for the errors it names, and every
    example error is in the table."""
    examples = {row.name: row for row in ROWS}
    documented: set[str] = set()
    for names, status, code, headers in readme_table():
        for name in names:
            documented.add(name)
            row = examples[name]
            assert (row.status, row.code) == (status, code), name
            answer = problem(row.make())
            assert answer is not None and (answer.status, answer.body["code"]) == (status, code)
            assert ("Retry-After" in headers) is ("Retry-After" in answer.headers) or (
                "when" in headers
            ), name
    assert documented == {row.name.split(" ")[0] for row in ROWS}
