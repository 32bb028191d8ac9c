"""How fast the merge strategies are next to a plain recursive merge and deepmerge+deepcopy.

Run: ``python benchmarks/bench_merge.py`` (``--quick`` for a smoke run). Each case merges
documents of N top-level keys, each holding a small nested dict three levels deep with eight
leaves; 10% of all leaves, picked at random, differ. Two-way: `current` is the original and
`incoming` the original with 10% of leaves changed. Three-way: `base` is the original,
`current` and `incoming` each change a different 10%. The baselines are two-way merges of the
same `current` and `incoming` (neither does a three-way merge). Every document is built
separately (no shared subtrees), as states decoded from a database and a command would be.

Times are the best of several runs with the garbage collector paused, as `timeit` does.
Targets: within 2x of the plain recursive merge, at least 20x faster than deepmerge+deepcopy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from deepmerge import always_merger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqrs_resilience._merge import DeepMergeStrategy, three_way_merge

Doc = dict[str, Any]


def plain_merge(a: Doc, b: Doc) -> Doc:
    """The straightforward recursive merge: incoming wins, dicts merge, nothing else."""
    out = dict(a)
    for k, v in b.items():
        out[k] = plain_merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def deepmerge_with_copy(current: Doc, incoming: Doc) -> Doc:
    return always_merger.merge(copy.deepcopy(current), incoming)  # type: ignore[no-any-return]


def entry(j: int) -> Doc:
    return {
        "status": "open",
        "qty": j,
        "customer": {"name": f"customer-{j}", "address": {"city": "Berlin", "zip": f"{j:05}"}},
        "totals": {"net": float(j), "tax": 0.19},
        "version": 1,
    }


def document(n: int) -> Doc:
    return {f"order-{j}": entry(j) for j in range(n)}


def leaf_paths(doc: Doc, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for k, v in doc.items():
        if isinstance(v, dict):
            paths.extend(leaf_paths(v, (*prefix, k)))
        else:
            paths.append((*prefix, k))
    return paths


def changed(doc: Doc, paths: list[tuple[str, ...]], tag: str) -> Doc:
    """A separately built copy of `doc` with the leaves at `paths` set to new values."""
    out = copy.deepcopy(doc)
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = f"{tag}:{node[path[-1]]}"
    return out


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return min(times)


def measure(
    name: str, ours: Callable[[], object], current: Doc, incoming: Doc, n: int, repeats: int
) -> tuple[str, int, float, float, float]:
    """Best times of `ours`, the plain merge and deepmerge+deepcopy on the same states."""
    t_ours = best_time(ours, repeats)
    t_plain = best_time(partial(plain_merge, current, incoming), repeats)
    t_deepmerge = best_time(partial(deepmerge_with_copy, current, incoming), max(3, repeats // 3))
    return name, n, t_ours, t_plain, t_deepmerge


def shown(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    sizes = (200, 2_000) if args.quick else (2_000, 20_000)
    repeats = 3 if args.quick else 15
    rng = random.Random(2024)
    deep = DeepMergeStrategy()

    rows = []
    for n in sizes:
        base = document(n)
        paths = leaf_paths(base)
        rng.shuffle(paths)
        tenth = len(paths) // 10
        current_paths, incoming_paths = paths[:tenth], paths[tenth : 2 * tenth]

        # Two-way: current is the original, incoming changed 10% of leaves.
        current, incoming = document(n), changed(base, incoming_paths, "incoming")
        assert deep.merge(current, incoming) == plain_merge(current, incoming)
        rows.append(
            measure(
                "DeepMergeStrategy().merge",
                partial(deep.merge, current, incoming),
                current,
                incoming,
                n,
                repeats,
            )
        )

        # Three-way: both sides changed a different 10%.
        current3 = changed(base, current_paths, "current")
        incoming3 = changed(base, incoming_paths, "incoming")
        expected = changed(current3, incoming_paths, "incoming")
        assert three_way_merge(base, current3, incoming3) == expected
        rows.append(
            measure(
                "three_way_merge",
                partial(three_way_merge, base, current3, incoming3),
                current3,
                incoming3,
                n,
                repeats,
            )
        )

    print(f"Python {sys.version.split()[0]}; best of {repeats} runs, GC paused\n")
    print(
        "| case | top-level keys | per merge | plain recursive | ratio vs plain "
        "| deepmerge+deepcopy | speed-up vs deepmerge | (plain's speed-up vs deepmerge) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, t_ours, t_plain, t_deepmerge in rows:
        print(
            f"| {name} | {n:,} | {shown(t_ours)} | {shown(t_plain)} | {t_ours / t_plain:.2f}x "
            f"| {shown(t_deepmerge)} | {t_deepmerge / t_ours:.1f}x "
            f"| ({t_deepmerge / t_plain:.1f}x) |"
        )
    within = all(t_ours <= 2 * t_plain for _, _, t_ours, t_plain, _ in rows)
    faster = all(t_deep >= 20 * t_ours for _, _, t_ours, _, t_deep in rows)
    print(f"\nwithin 2x of plain recursive: {'yes' if within else 'NO'}")
    print(f"at least 20x faster than deepmerge+deepcopy: {'yes' if faster else 'NO'}")


if __name__ == "__main__":
    main()
