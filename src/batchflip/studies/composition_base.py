"""Study C's shared pieces: the input columns, path and stack indexes of the input frames,
the metadata every record carries and the display order of conditions (used by
:mod:`batchflip.studies.composition` and its stats and verification modules)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from batchflip.conditions import POOLS, parse_condition
from batchflip.errors import BatchflipError
from batchflip.records import require_columns

SCORED_NEEDED = ["model", "condition", "batch_size", "dispatch", "prompt_id", "domain",
                 "score", "stack_id"]
GEN_NEEDED = ["model", "condition", "group_id", "role", "prompt_id", "t_first", "t_done",
              "stack_id"]
GEN_OPTIONAL = ["error", "finish_reason", "t_submit"]  # t_submit: stagger overlap
SCORED_OPTIONAL = ["position"]  # the target's slot (position ANOVA); absent: not estimable
SCORED_ERROR = ["error"]  # needed by the CLI; hand-built frames without it have no failures
DEFAULT_BASELINE = "cobatch_b8_solo"

Pair = tuple[str, str]  # (model, condition)
Counts = tuple[int, int, int]  # (b = to unsafe, c = to safe, paired n)


def path_index(frames: dict[str, pd.DataFrame]) -> dict[tuple[str, str], list[str]]:
    """(model, condition) -> the input paths that hold its rows."""
    out: dict[tuple[str, str], set[str]] = {}
    for path, df in frames.items():
        for key in df[["model", "condition"]].drop_duplicates().itertuples(index=False):
            out.setdefault((str(key[0]), str(key[1])), set()).add(str(path))
    return {k: sorted(v) for k, v in out.items()}


def concat_frames(frames: dict[str, pd.DataFrame], needed: list[str]) -> pd.DataFrame:
    """Every frame (path -> frame) in one, each checked for ``needed`` columns."""
    for path, df in frames.items():
        require_columns(df, needed, path)
    if not frames:
        return pd.DataFrame(columns=needed)
    return pd.concat(frames.values(), ignore_index=True)


def record_meta(model: str, condition: str | None, baseline: str,
                batch_size: int | None = None) -> dict[str, Any]:
    """Metadata every record carries, so figures and tables can select it."""
    meta: dict[str, Any] = {"model": model, "baseline": baseline}
    if condition is None:
        return meta
    meta["condition"] = condition
    try:
        cond = parse_condition(condition)
        meta |= {"pool": cond.pool, "batch_size": cond.batch_size, "dispatch": cond.dispatch,
                 "stagger_ms": cond.stagger_ms}
    except BatchflipError:
        meta |= {"pool": None, "batch_size": batch_size, "dispatch": None, "stagger_ms": 0}
    return meta


def union_of(mapping: dict[Any, list[str]], keys: Iterable[Any]) -> list[str]:
    out: set[str] = set()
    for key in keys:
        out.update(mapping.get(key, []))
    return sorted(out)


def condition_key(name: str) -> tuple[Any, ...]:
    """Display order: untagged before phase-tagged conditions (by tag), then cobatch before
    stagger before list, pools in conditions.POOLS order, then delay."""
    try:
        c = parse_condition(name)
    except BatchflipError:
        return ("~", 9, 99, 0, name)
    rank = {"cobatch": 0, "stagger": 1}.get(c.dispatch, 2)
    pool = POOLS.index(c.pool) if c.pool in POOLS else 98
    return (c.phase or "", rank, pool, c.stagger_ms, name)


def is_cobatch(name: str) -> bool:
    try:
        return parse_condition(name).dispatch == "cobatch"
    except BatchflipError:
        return False


def is_tagged(name: str) -> bool:
    """A later-phase condition (``_ph<tag>``): compared with its phase's reference only."""
    try:
        return parse_condition(name).phase is not None
    except BatchflipError:
        return False
