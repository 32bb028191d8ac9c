"""Walking nested values without recursion: where a cycle closes, where a bad value sits.

States come from outside (queues, HTTP bodies) and may be cyclic or nested deeper than
Python's recursion limit, so everything here walks with an explicit stack. Paths use msgspec's
notation (`$.items[0].name`, `$.payload['key']`), so an error names the place a user can find.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

CONTAINERS = (dict, list, tuple)
REPORTED_DEPTH = 900
"""The depth `cycle_or_depth` reports for a value that failed to encode even on a fresh stack
(`_stack`), without a cycle: about where Python's default recursion limit stops msgspec."""


def entries(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key, child) pairs of a dict, list or tuple."""
    return iter(node.items()) if isinstance(node, dict) else enumerate(node)


def find_cycle(root: Any) -> tuple[Any, ...] | None:
    """The path at which `root` first holds one of its own ancestors, or None; any depth."""
    if not isinstance(root, CONTAINERS):
        return None
    done: set[int] = set()
    active = {id(root)}
    path: list[Any] = []
    stack = [(root, entries(root))]
    while stack:
        node, children = stack[-1]
        for key, child in children:
            if isinstance(child, CONTAINERS):
                if id(child) in active:
                    return (*path, key)
                if id(child) not in done:
                    active.add(id(child))
                    path.append(key)
                    stack.append((child, entries(child)))
                    break
        else:
            stack.pop()
            active.discard(id(node))
            done.add(id(node))
            if path and stack:
                path.pop()
    return None


# --- values of any shape: Structs, dicts, sequences, sets ------------------------------------


def _children(node: Any) -> Iterator[tuple[str, Any]]:
    """(path step, child) pairs of a Struct, dataclass, dict, list, tuple, set or frozenset;
    dict keys come after the values, so a bad key is blamed only when no value is."""
    if isinstance(node, msgspec.Struct):
        for name in node.__struct_fields__:
            yield f".{name}", getattr(node, name)
    elif _is_dataclass(node):
        for field in dataclasses.fields(node):
            yield f".{field.name}", getattr(node, field.name)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield _key_step(key), value
        for key in node:
            yield f"{_key_step(key)} (the key)", key
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield f"[{index}]", value
    elif isinstance(node, set | frozenset):
        for value in node:
            yield "[...]", value


def _key_step(key: Any) -> str:
    shown = repr(key)
    return f"[{shown if len(shown) <= 40 else shown[:37] + '...'}]"


def path_to(root: Any, bad: Callable[[Any], bool]) -> str:
    """The path of the innermost value under `root` that is `bad`, given that `root` is.

    `bad` must hold for every container around a bad value (as "fails to encode" does), so
    the walk goes straight down: it costs the depth of the bad value, not the size of root.
    Stops on a cycle, naming where it closes.
    """
    steps = ["$"]
    node, seen = root, {id(root)}
    while True:
        for step, child in _children(node):
            if bad(child):
                steps.append(step)
                if id(child) in seen:
                    return "".join(steps)
                seen.add(id(child))
                node = child
                break
        else:
            return "".join(steps)


def _shown(link: Any, depth: int) -> str:
    steps: list[str] = []
    while link is not None:
        link, step = link
        steps.append(step)
    steps.reverse()
    if len(steps) > 12:
        return "$" + "".join(steps[:10]) + f"... ({depth} levels down)"
    return "$" + "".join(steps)


def cycle_or_depth(root: Any, limit: int) -> tuple[str, str] | None:
    """Why `root` cannot be nested data: ("cycle", path where it closes) or ("depth", path to a
    value more than `limit` levels down); None when neither. Iterative; Structs and
    dataclasses included."""
    active = {id(root)}
    done: set[int] = set()
    stack: list[tuple[Any, Iterator[tuple[str, Any]], Any]] = [(root, _children(root), None)]
    while stack:
        node, children, link = stack[-1]
        for step, child in children:
            if not (isinstance(child, _NESTED) or _is_dataclass(child)):
                continue
            if id(child) in active:
                return "cycle", _shown((link, step), len(stack))
            if id(child) in done:
                continue
            if len(stack) >= limit:
                return "depth", _shown((link, step), len(stack) + 1)
            active.add(id(child))
            stack.append((child, _children(child), (link, step)))
            break
        else:
            stack.pop()
            active.discard(id(node))
            done.add(id(node))
    return None


def too_deep(name: str, value: Any, consequence: str) -> TypeError:
    """The error for `value` (`name`: "command Deposit") that msgspec could not walk even on a
    fresh stack: where a cycle in it closes, or that it is nested too deeply."""
    found = cycle_or_depth(value, REPORTED_DEPTH)
    if found is not None and found[0] == "cycle":
        why = f"contains a cycle (a value that contains itself) at `{found[1]}`"
    else:
        why = "is nested too deeply" + (f" (at `{found[1]}`)" if found is not None else "")
    return TypeError(f"{name} {why}: {consequence}")


_NESTED = (msgspec.Struct, dict, list, tuple, set, frozenset)


def _is_dataclass(value: Any) -> bool:
    """A dataclass instance (msgspec encodes those as it does Structs), not the class."""
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
