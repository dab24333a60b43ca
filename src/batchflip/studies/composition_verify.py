"""Study C's co-batch verification: whether each target's decode interval overlapped every
filler of its group, from the generation timings, and its rates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from batchflip.failures import failed_mask
from batchflip.numbers import Record, not_estimable, proportion, proportion_or_none
from batchflip.studies.composition_base import (
    DEFAULT_BASELINE,
    GEN_NEEDED,
    _concat,
    _meta,
    _path_index,
    _union,
)


def cobatch_verification(gen: pd.DataFrame) -> pd.DataFrame:
    """One row per target of a group with fillers: ``verified`` is True when the target's
    ``[t_first, t_done]`` overlaps every filler's (closed intervals; a failed filler
    never overlaps; a failed target has no row). Columns: model, condition, group_id,
    prompt_id, verified, n_fillers.
    """
    cols = ["model", "condition", "group_id", "prompt_id", "verified", "n_fillers"]
    if gen.empty:
        return pd.DataFrame(columns=cols)
    key = ["model", "condition", "group_id"]
    tgt = gen.loc[(gen["role"] == "target").to_numpy() & ~failed_mask(gen),
                  key + ["prompt_id", "t_first", "t_done"]]
    fil = gen.loc[gen["role"] == "filler", key + ["t_first", "t_done"]].copy()
    fil["failed"] = failed_mask(gen)[(gen["role"] == "filler").to_numpy()]
    if tgt.empty or fil.empty:
        return pd.DataFrame(columns=cols)
    pairs = tgt.merge(fil, on=key, suffixes=("", "_f"), how="inner")
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    t0, t1 = pairs["t_first"].to_numpy(float), pairs["t_done"].to_numpy(float)
    f0, f1 = pairs["t_first_f"].to_numpy(float), pairs["t_done_f"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        overlap = (t0 <= f1) & (f0 <= t1)  # NaN times compare False: not shown to overlap
    pairs["overlap"] = overlap & ~pairs["failed"].to_numpy(bool)
    out = (pairs.groupby(key + ["prompt_id"], sort=True)["overlap"]
           .agg(verified="all", n_fillers="size").reset_index())
    return out[cols]


def verification_numbers(generations: dict[str, pd.DataFrame], study: str,
                         baseline: str = DEFAULT_BASELINE) -> dict[str, Record]:
    """Co-batch verification rates from generation frames (path -> frame)."""
    numbers: dict[str, Record] = {}
    gen = _concat(generations, GEN_NEEDED)
    gpaths = _path_index(generations) if generations else {}
    definition = ("share of targets whose decode interval [t_first, t_done] overlaps that "
                  "of every filler of its group (groups without fillers excluded); measured "
                  "from wall-clock request timings, so it varies between runs that give "
                  "identical texts")
    if gen.empty:
        numbers[f"{study}/all/cobatch_verified_rate"] = not_estimable(
            "no generation rows given", definition, sorted(generations), [], timing=True,
            **_meta("all", None, baseline))
        return numbers
    gen = gen.assign(model=gen["model"].astype(str), condition=gen["condition"].astype(str))
    stacks = {k: sorted(map(str, v.unique())) for k, v in
              gen.groupby(["model", "condition"], sort=True)["stack_id"]}
    ver = cobatch_verification(gen)
    for (model, cond), part in ver.groupby(["model", "condition"], sort=True):
        numbers[f"{study}/{model}/{cond}/cobatch_verified_rate"] = proportion(
            int(part["verified"].sum()), len(part), f"{definition}; {cond}, model {model}",
            gpaths[(model, cond)], stacks[(model, cond)], timing=True,
            **_meta(model, cond, baseline))
    for cond, part in ver.groupby("condition", sort=True):
        keys = sorted({(m, cond) for m in part["model"]})
        numbers[f"{study}/all/{cond}/cobatch_verified_rate"] = proportion(
            int(part["verified"].sum()), len(part), f"{definition}; {cond}, pooled over "
            "models", _union(gpaths, keys), _union(stacks, keys), timing=True,
            **_meta("all", cond, baseline))
    keys = sorted({(str(m), str(c)) for m, c in ver[["model", "condition"]].itertuples(
        index=False)})
    numbers[f"{study}/all/cobatch_verified_rate"] = proportion_or_none(
        int(ver["verified"].sum()), len(ver), f"{definition}; every non-solo composition and "
        "stagger condition, pooled over models", _union(gpaths, keys) or sorted(generations),
        _union(stacks, keys), "no target shares a group with a filler (only solo groups)",
        timing=True, **_meta("all", None, baseline))
    return numbers
