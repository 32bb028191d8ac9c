"""The two-way deep merge behind `DeepMergeStrategy`: incoming's values win, dicts merge.

It walks incoming's keys, and below them only the values that differ from current's; keys only
current has, and values equal on both sides, stay current's objects without being looked at.
"""

from __future__ import annotations

from typing import Any

from ._merge_engine import MISSING, Run, execute, identities


def deep_merge(
    current: dict[str, Any],
    incoming: dict[str, Any],
    *,
    append_lists: bool = False,
    list_identity_key: str | None = None,
) -> dict[str, Any]:
    """Current with incoming merged in (options as in `DeepMergeStrategy`); inputs unchanged."""
    return execute(
        _merge2,
        (current, incoming),
        current,
        (("current", current), ("incoming", incoming)),
        key=list_identity_key,
        append=append_lists,
    )


def _merge2(c: dict[Any, Any], i: dict[Any, Any], depth: int, run: Run) -> dict[Any, Any]:
    if depth >= run.limit:
        return run.defer(_merge2, (c, i), {})
    canon = run.canon
    out = None
    for k, iv in i.items():
        try:
            cv = c[k]
        except KeyError:
            pass
        else:
            if iv is cv:
                continue
            try:
                same = iv == cv if canon is None else canon.equal(iv, cv)
            except RecursionError:
                same = run.equal(iv, cv)
            if same:
                continue
            if isinstance(iv, dict) and isinstance(cv, dict):  # from here on, iv is what to keep
                iv = _merge2(cv, iv, depth + 1, run)
            elif (
                isinstance(iv, list)
                and isinstance(cv, list)
                and (run.key is not None or run.append)
            ):
                iv = _merge_list2(cv, iv, depth + 1, run)
            if iv is cv:
                continue
        if out is None:
            out = dict(c)
        out[k] = iv
    return c if out is None else out


def _merge_list2(cl: list[Any], il: list[Any], depth: int, run: Run) -> list[Any]:
    if depth >= run.limit:
        return run.defer(_merge_list2, (cl, il), [])
    return _merge_keyed2(cl, il, depth, run) if run.key is not None else _append_new(cl, il, run)


def _append_new(cl: list[Any], il: list[Any], run: Run) -> list[Any]:
    """Current's items, then incoming's items not already there (keying every item once)."""
    seen = {run.item_key(item) for item in cl}
    out = None
    for item in il:
        k = run.item_key(item)
        if k not in seen:
            seen.add(k)
            if out is None:
                out = list(cl)
            out.append(item)
    return cl if out is None else out


def _merge_keyed2(cl: list[Any], il: list[Any], depth: int, run: Run) -> list[Any]:
    """Items with the same identity merge in place; new ones are appended."""
    assert run.key is not None
    c_ids, c_index, _ = identities(cl, run.key)
    i_ids = identities(il, run.key)[0]
    out = None
    seen: set[Any] | None = None  # keys of the items without identity, built on first need
    for item, ident in zip(il, i_ids, strict=True):
        if ident is MISSING:
            if seen is None:
                seen = {run.item_key(x) for x, d in zip(cl, c_ids, strict=True) if d is MISSING}
            k = run.item_key(item)
            if k in seen:
                continue
            seen.add(k)
        else:
            pos = c_index.get(ident)
            if pos is not None:
                current_item = cl[pos]
                if run.same(item, current_item):
                    continue
                merged = _merge2(current_item, item, depth + 1, run)
                if merged is current_item:
                    continue
                if out is None:
                    out = list(cl)
                out[pos] = merged
                continue
        if out is None:
            out = list(cl)
        out.append(item)
    return cl if out is None else out
