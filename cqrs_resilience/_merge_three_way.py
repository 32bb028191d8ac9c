"""`three_way_merge`: keep what each side changed since `base`; report what both changed.

It walks the keys of current and incoming, and below them only where the two differ; a value
changed on one side only is taken whole from that side without being looked at. NaN counts as
equal to NaN wherever a difference would drop a value (see `_merge_equality`).
"""

from __future__ import annotations

from typing import Any, Final

from ._merge_engine import (
    MISSING,
    OnMergeConflict,
    Path,
    Run,
    checked_identity_key,
    checked_on_conflict,
    execute,
    identities,
    require_dicts,
)

_EMPTY_DICT: Final[dict[Any, Any]] = {}  # stands in for a base that has no dict at a path
_EMPTY_LIST: Final[list[Any]] = []


def three_way_merge(
    base: dict[str, Any],
    current: dict[str, Any],
    incoming: dict[str, Any],
    *,
    list_identity_key: str | None = None,
    on_conflict: OnMergeConflict | str = OnMergeConflict.RAISE,
) -> dict[str, Any]:
    """Merge the changes `current` and `incoming` each made to `base`.

    A path changed on one side only keeps that side's value (a deletion included); the same
    change on both sides is kept once; dicts merge key by key, and lists of dicts merge item by
    item when `list_identity_key` names the field identifying an item (other lists are single
    values). Paths changed differently on both sides are conflicts: with RAISE they are all
    reported in one MergeConflictError (a side that deleted the value shows None), otherwise
    current's or incoming's value is taken. Conflict paths inside lists use the item's index
    in current, or in incoming for an item current no longer has.
    """
    require_dicts(base=base, current=current, incoming=incoming)
    return execute(
        _merge3,
        (base, current, incoming, None),
        current,
        (("base", base), ("current", current), ("incoming", incoming)),
        key=checked_identity_key(list_identity_key),
        on_conflict=checked_on_conflict(on_conflict),
    )


def _merge3(
    b: dict[Any, Any],
    c: dict[Any, Any],
    i: dict[Any, Any],
    path: Path,
    depth: int,
    run: Run,
) -> dict[Any, Any]:
    if depth >= run.limit:
        return run.defer(_merge3, (b, c, i, path), {})
    canon = run.canon
    out = None
    added = 0  # keys only incoming has; the rest of len(i) are keys current has too
    for k, iv in i.items():
        try:
            cv = c[k]
        except KeyError:
            cv = MISSING
            added += 1
        else:
            if iv is cv:
                continue
            try:
                if iv == cv if canon is None else canon.equal(iv, cv):
                    continue  # unchanged, or the same change on both sides
            except RecursionError:
                if run.equal(iv, cv):
                    continue
        bv = b.get(k, MISSING)
        if run.same(iv, bv):  # only current changed it (or deleted it)
            continue
        nv: Any
        if run.same(cv, bv):  # only incoming changed it
            nv = iv
        elif isinstance(cv, dict) and isinstance(iv, dict):
            nv = _merge3(
                bv if isinstance(bv, dict) else _EMPTY_DICT, cv, iv, (path, k), depth + 1, run
            )
        elif run.key is not None and isinstance(cv, list) and isinstance(iv, list):
            base_list = bv if isinstance(bv, list) else _EMPTY_LIST
            nv = _merge3_keyed(base_list, cv, iv, (path, k), depth + 1, run)
        elif run.same_nan(iv, bv) or run.same_nan(iv, cv):  # NaN alone told them apart
            continue
        elif run.same_nan(cv, bv):
            nv = iv
        else:
            nv = run.conflict((path, k), bv, cv, iv)
        if nv is cv:
            continue
        if out is None:
            out = dict(c)
        out[k] = nv
    if len(i) - added < len(c):  # keys incoming lacks: deleted by it, or added by current
        for k, cv in c.items():
            if k in i:
                continue
            bv = b.get(k, MISSING)
            if bv is MISSING:
                continue
            gone = run.same_nan(cv, bv)
            if gone or run.conflict((path, k), bv, cv, MISSING) is MISSING:
                if out is None:
                    out = dict(c)
                del out[k]
    return c if out is None else out


def _merge3_keyed(
    bl: list[Any],
    cl: list[Any],
    il: list[Any],
    path: Path,
    depth: int,
    run: Run,
) -> list[Any]:
    """Three-way per item identity; items without one are added or removed as a set."""
    if depth >= run.limit:
        return run.defer(_merge3_keyed, (bl, cl, il, path), [])
    assert run.key is not None
    start = _shared_start(bl, cl, il, run.key)
    if not start:
        return _merge_items(bl, cl, il, 0, path, depth, run)
    current_tail = cl[start:]
    tail = _merge_items(_EMPTY_LIST, current_tail, il[start:], start, path, depth, run)
    return cl if tail is current_tail else cl[:start] + tail


def _shared_start(bl: list[Any], cl: list[Any], il: list[Any], key: str) -> int:
    """len(bl) when both sides only appended to base, else 0.

    Then the base items are unchanged on every side, and as they stand in the same order in
    all three lists, items match across the lists exactly as their tails match alone (repeats
    of an identity shift by the same count everywhere). Only items without an identity would
    match across the boundary (they merge as a set), so base must have none. The checks run in
    C, so a merge of appends to a long list costs what was appended.
    """
    n = len(bl)
    if not n or len(cl) < n or len(il) < n:
        return 0
    try:
        if set(map(type, bl)) != {dict} or cl[:n] != bl or il[:n] != bl:
            return 0
        hash(tuple([item[key] for item in bl]))  # every base item has a hashable identity
    except (KeyError, TypeError, RecursionError):  # no identity, unhashable, too deep for ==
        return 0
    return n


def _merge_items(
    bl: list[Any],
    cl: list[Any],
    il: list[Any],
    offset: int,
    path: Path,
    depth: int,
    run: Run,
) -> list[Any]:
    """The per-item merge; `offset` is where `cl` and `il` start in the lists being merged."""
    assert run.key is not None
    b_ids, b_index, b_loose = identities(bl, run.key)
    c_ids, c_index, c_loose = identities(cl, run.key)
    i_ids, i_index, i_loose = identities(il, run.key)

    def loose_keys(items: list[Any], ids: list[Any], count: int) -> set[Any]:
        if not count:
            return set()
        return {run.item_key(x) for x, d in zip(items, ids, strict=True) if d is MISSING}

    b_keys, c_keys, i_keys = (
        loose_keys(bl, b_ids, b_loose),
        loose_keys(cl, c_ids, c_loose),
        loose_keys(il, i_ids, i_loose),
    )
    merged: list[Any] = []
    changed = False
    for pos, (item, ident) in enumerate(zip(cl, c_ids, strict=True)):
        if ident is MISSING:
            k = run.item_key(item)
            if k in b_keys and k not in i_keys:  # incoming removed it
                changed = True
            else:
                merged.append(item)
            continue
        i_pos, b_pos = i_index.get(ident), b_index.get(ident)
        base_item = MISSING if b_pos is None else bl[b_pos]
        if i_pos is None:
            if b_pos is not None:  # incoming removed it
                gone = run.same_nan(item, base_item)
                if gone or run.conflict((path, offset + pos), base_item, item, MISSING) is MISSING:
                    changed = True
                    continue
            merged.append(item)
            continue
        incoming_item = il[i_pos]
        if run.same(item, incoming_item) or run.same(incoming_item, base_item):
            merged.append(item)
        elif run.same(item, base_item):
            merged.append(incoming_item)
            changed = True
        else:
            base = base_item if isinstance(base_item, dict) else _EMPTY_DICT
            both = _merge3(base, item, incoming_item, (path, offset + pos), depth + 1, run)
            merged.append(both)
            changed = changed or both is not item
    for pos, (item, ident) in enumerate(zip(il, i_ids, strict=True)):
        if ident is MISSING:
            k = run.item_key(item)
            if k not in b_keys and k not in c_keys:  # incoming added it
                c_keys.add(k)
                merged.append(item)
                changed = True
        elif ident not in c_index:
            b_pos = b_index.get(ident)
            if b_pos is not None:  # current removed it
                base_item = bl[b_pos]
                if run.same_nan(item, base_item):
                    continue
                if run.conflict((path, offset + pos), base_item, MISSING, item) is MISSING:
                    continue
            merged.append(item)
            changed = True
    return merged if changed else cl
