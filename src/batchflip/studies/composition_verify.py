"""Study C's co-batch verification: whether each target's decode interval overlapped every
filler of its group, from the generation timings, and its rates; and for every stagger
group its measured overlap and whether it met its condition's timing rule
(:func:`stagger_overlap`, :data:`TIMING_RULES`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from batchflip.conditions import parse_condition
from batchflip.errors import BatchflipError
from batchflip.failures import failed_mask
from batchflip.numbers import Record, not_estimable, proportion, proportion_or_none, scalar
from batchflip.studies.composition_base import (
    DEFAULT_BASELINE,
    GEN_NEEDED,
    concat_frames,
    path_index,
    record_meta,
    union_of,
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
    gen = concat_frames(generations, GEN_NEEDED)
    gpaths = path_index(generations) if generations else {}
    definition = ("share of targets whose decode interval [t_first, t_done] overlaps that "
                  "of every filler of its group (groups without fillers excluded); measured "
                  "from wall-clock request timings, so it varies between runs that give "
                  "identical texts")
    if gen.empty:
        numbers[f"{study}/all/cobatch_verified_rate"] = not_estimable(
            "no generation rows given", definition, sorted(generations), [], timing=True,
            **record_meta("all", None, baseline))
        return numbers
    gen = gen.assign(model=gen["model"].astype(str), condition=gen["condition"].astype(str))
    stacks = {k: sorted(map(str, v.unique())) for k, v in
              gen.groupby(["model", "condition"], sort=True)["stack_id"]}
    ver = cobatch_verification(gen)
    for (model, cond), part in ver.groupby(["model", "condition"], sort=True):
        numbers[f"{study}/{model}/{cond}/cobatch_verified_rate"] = proportion(
            int(part["verified"].sum()), len(part), f"{definition}; {cond}, model {model}",
            gpaths[(model, cond)], stacks[(model, cond)], timing=True,
            **record_meta(model, cond, baseline))
    for cond, part in ver.groupby("condition", sort=True):
        keys = sorted({(m, cond) for m in part["model"]})
        numbers[f"{study}/all/{cond}/cobatch_verified_rate"] = proportion(
            int(part["verified"].sum()), len(part), f"{definition}; {cond}, pooled over "
            "models", union_of(gpaths, keys), union_of(stacks, keys), timing=True,
            **record_meta("all", cond, baseline))
    numbers |= timing_numbers(gen, study, baseline, gpaths, stacks)
    keys = sorted({(str(m), str(c)) for m, c in ver[["model", "condition"]].itertuples(
        index=False)})
    numbers[f"{study}/all/cobatch_verified_rate"] = proportion_or_none(
        int(ver["verified"].sum()), len(ver), f"{definition}; every non-solo composition and "
        "stagger condition, pooled over models", union_of(gpaths, keys) or sorted(generations),
        union_of(stacks, keys), "no target shares a group with a filler (only solo groups)",
        timing=True, **record_meta("all", None, baseline))
    return numbers


# each stagger timing's rule, as the numbers state it (times: the generation records')
TIMING_RULES = {
    "simultaneous": "every filler submitted before the target's first token (they could "
                    "join its prefill)",
    "minimal_overlap": "the first filler submitted after the target's first token and before "
                       "its last (the target's prefill ran without the fillers, they joined "
                       "its decode)",
    "before": "every filler submitted at least the offset before the target, and some "
              "filler still running at the target's first token",
    "after": "the first filler submitted at least the offset after the target, and before "
             "the target's last token",
}
SLACK_S = 0.005  # clock slack on a measured offset (the client sleeps the offset itself)
OVERLAP_COLUMNS = ["model", "condition", "group_id", "prompt_id", "timing", "stagger_ms",
                   "offset_ms", "filler_after_first_ms", "target_done_after_filler_ms",
                   "met"]


def _rule(timing: str | None, ms: int) -> str:
    if timing == "offset":
        return "before" if ms < 0 else "after"
    return str(timing)


def stagger_overlap(gen: pd.DataFrame) -> pd.DataFrame:
    """One row per stagger group whose target answered: its measured overlap and whether it
    met its condition's rule (:data:`TIMING_RULES`).

    ``offset_ms`` = first filler submit - target submit (negative: fillers first);
    ``filler_after_first_ms`` = first filler submit - target first token;
    ``target_done_after_filler_ms`` = target last token - first filler submit (all in ms,
    from ``t_submit``, ``t_first``, ``t_done``). Columns: :data:`OVERLAP_COLUMNS`.
    """
    if gen.empty or "t_submit" not in gen.columns:
        return pd.DataFrame(columns=OVERLAP_COLUMNS)
    key = ["model", "condition", "group_id"]
    conds = {c: parse_condition(c) for c in gen["condition"].astype(str).unique()
             if _is_stagger(c)}
    gen = gen[gen["condition"].astype(str).isin(list(conds))]
    tgt = gen.loc[(gen["role"] == "target").to_numpy() & ~failed_mask(gen),
                  key + ["prompt_id", "t_submit", "t_first", "t_done"]]
    fil = gen[gen["role"] == "filler"]
    if tgt.empty or fil.empty:
        return pd.DataFrame(columns=OVERLAP_COLUMNS)
    f = fil.groupby(key, sort=True).agg(f_first=("t_submit", "min"), f_last=("t_submit", "max"),
                                        f_done=("t_done", "max")).reset_index()
    df = tgt.merge(f, on=key, how="inner")
    rows = []
    for r in df.itertuples(index=False):
        c = conds[str(r.condition)]
        rule, gap = _rule(c.timing, c.stagger_ms), abs(c.stagger_ms) / 1000.0
        met = {"simultaneous": r.f_last <= r.t_first,
               "minimal_overlap": r.t_first <= r.f_first <= r.t_done,
               "before": r.t_submit - r.f_last >= gap - SLACK_S and r.f_done >= r.t_first,
               "after": r.f_first - r.t_submit >= gap - SLACK_S and r.f_first <= r.t_done
               }[rule]
        rows.append((str(r.model), str(r.condition), int(r.group_id), str(r.prompt_id),
                     str(c.timing), c.stagger_ms, 1000 * (r.f_first - r.t_submit),
                     1000 * (r.f_first - r.t_first), 1000 * (r.t_done - r.f_first), bool(met)))
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)


def _is_stagger(name: str) -> bool:
    try:
        return parse_condition(name).dispatch == "stagger"
    except BatchflipError:
        return False


def timing_numbers(gen: pd.DataFrame, study: str, baseline: str,
                   gpaths: dict[tuple[str, str], list[str]],
                   stacks: dict[tuple[str, str], list[str]]) -> dict[str, Record]:
    """Per stagger condition (per model and pooled): the share of groups that met its
    timing rule, and the median measured overlap, beside the co-batch verification rate."""
    ov = stagger_overlap(gen)
    out: dict[str, Record] = {}
    parts = [((m, c), p) for (m, c), p in ov.groupby(["model", "condition"], sort=True)]
    parts += [(("all", c), p) for c, p in ov.groupby("condition", sort=True)]
    for (model, cond), part in parts:
        keys = sorted({(str(m), cond) for m in part["model"]})
        ins, sts = union_of(gpaths, keys), union_of(stacks, keys)
        who = "pooled over models" if model == "all" else f"model {model}"
        rule = TIMING_RULES[_rule(part["timing"].iloc[0], int(part["stagger_ms"].iloc[0]))]
        meta = {**record_meta(model, cond, baseline), "timing": True, "rule": rule}
        pre = f"{study}/{model}/{cond}"
        out[f"{pre}/timing_rule_rate"] = proportion(
            int(part["met"].sum()), len(part), f"share of {cond} groups (target answered) "
            f"that met the condition's timing rule: {rule}; {who}; measured from wall-clock "
            "request timings (batchflip.studies.composition_verify.stagger_overlap)", ins,
            sts, **meta)
        for col, what in (("filler_after_first_ms", "first filler submit minus the target's "
                           "first token"), ("target_done_after_filler_ms", "the target's last "
                           "token minus the first filler submit"),
                          ("offset_ms", "first filler submit minus the target's submit")):
            out[f"{pre}/{col.removesuffix('_ms')}_median_ms"] = scalar(
                float(part[col].median()), f"median over the {cond} groups of {what} (ms; "
                f"the measured overlap), {who}", ins, sts, n=len(part), **meta)
    return out
