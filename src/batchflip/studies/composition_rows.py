"""Study C's analyses of other rows: the capability controls (the paper's "capability
prompts under solo and 7 jailbreak") and the refusal score by target position.

Capability: the capability-domain targets, each condition paired with the baseline on
``prompt_id`` within a model, exactly as the safety targets; a target is *correct* when
``score >= 0.5``. ``to_wrong`` = correct under the baseline, wrong under the condition;
``to_correct`` the reverse.

Position: one-way ANOVA of the target's score (the refusal score of the study's domain)
by its slot in the batch (``position``, 0-7 at batch 8), over the compositions that have
fillers (solo has no slot to vary). Rows are treated as independent, as a one-way ANOVA
does, although a prompt appears once in every composition pooled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchflip.conditions import parse_condition
from batchflip.errors import BatchflipError
from batchflip.numbers import Record, not_estimable, proportion, scalar
from batchflip.stats import clopper_pearson_interval, holm, mcnemar_exact, one_way_anova
from batchflip.studies.composition_base import is_cobatch, union_of
from batchflip.studies.composition_stats import (
    StudyView,
    mcnemar_raw,
    pair_counts,
    pooled_counts,
    reported_pairs,
)


def _cp(k: int, n: int) -> dict[str, float]:
    ci = clopper_pearson_interval(k, n)
    return {"cp_low": ci.low, "cp_high": ci.high}


def capability_numbers(cap: StudyView | None, study: str, every_input: list[str]
                       ) -> dict[str, Record]:
    """Correct rates, exact McNemar per model (Holm over the capability tests) and pooled
    over models, and the flip rate, of the capability targets vs the baseline."""
    if cap is None or cap.df.empty:
        return {f"{study}/all/capability_missing": not_estimable(
            "no capability targets were scored (the config's cobatch_targets have none)",
            "capability controls under the compositions", every_input, [],
            model="all")}
    out = _capability_rates(cap)
    pairs = pair_counts(cap)
    raw = mcnemar_raw(cap, pairs)
    family = sorted(raw)
    adjusted = dict(zip(family, holm([raw[k] for k in family]).tolist(), strict=True)
                    ) if family else {}
    for (model, cond), (b, c, n), pre in reported_pairs(cap, pairs):
        key = [(model, cond)]
        meta = cap.meta(model, cond, cap.sizes.get((model, cond))) | {
            "b": b, "c": c, "n": n, "to_wrong": b, "to_correct": c, "family_size": len(family)}
        what = (f"capability targets, {cond} vs {cap.baseline}, model {model} (b = to_wrong: "
                f"correct under {cap.baseline}, wrong under {cond}; c = to_correct)")
        p_def, h_def = (f"exact McNemar p, {what}", f"Holm-adjusted exact McNemar p, {what}; "
                        f"family = the {len(family)} capability tests with paired rows")
        for nid, value, definition in ((f"{pre}/capability_mcnemar_p", raw.get(pre), p_def),
                                       (f"{pre}/capability_mcnemar_p_holm", adjusted.get(pre),
                                        h_def)):
            out[nid] = scalar(value, definition, cap.ins(key), cap.sts(key), **meta) \
                if value is not None else not_estimable(
                    "no prompt is scored under both conditions", definition, cap.ins(key),
                    cap.sts(key), **meta)
    for cond, (b, c, n) in pooled_counts(cap, pairs).items():
        out |= _capability_pooled(cap, cond, b, c, n)
    return out


def _capability_rates(cap: StudyView) -> dict[str, Record]:
    """Correct share per (model, condition) and pooled over models (Wilson, CP)."""
    out: dict[str, Record] = {}
    what = "share of capability targets answered correctly (score >= 0.5) under"
    groups = [((m, c), part) for (m, c), part in cap.df.groupby(["model", "condition"])]
    groups += [(("all", c), part) for c, part in cap.df.groupby("condition")]
    for (model, cond), part in groups:
        keys = [(model, cond)] if model != "all" else [(m, cond) for m in cap.models]
        k, n = int(part["refused"].sum()), len(part)
        out[f"{cap.study}/{model}/{cond}/capability_correct_rate"] = proportion(
            k, n, f"{what} {cond}, {'pooled over models' if model == 'all' else model} "
            "(Wilson 95%; Clopper-Pearson in cp_low/cp_high)", union_of(cap.spaths, keys),
            union_of(cap.stacks, keys), is_baseline=cond == cap.baseline, **_cp(k, n),
            **cap.meta(model, cond, int(part["batch_size"].iloc[0])))
    return out


def _capability_pooled(cap: StudyView, cond: str, b: int, c: int, n: int) -> dict[str, Record]:
    """Flip rate and exact McNemar of the capability pairs pooled over models."""
    keys = [(m, cond) for m in cap.models]
    ins, sts = cap.ins(keys), cap.sts(keys)
    meta = cap.meta("all", cond) | {"b": b, "c": c, "to_wrong": b, "to_correct": c}
    pre = f"{cap.study}/all/{cond}"
    rate_def = (f"capability flip rate, {cond} vs {cap.baseline}, pairs pooled over models: "
                "discordant pairs / paired targets (Wilson 95%; Clopper-Pearson in "
                "cp_low/cp_high)")
    p_def = (f"exact McNemar p of the capability pairs pooled over models, {cond} vs "
             f"{cap.baseline}")
    if n == 0:
        why = "no capability prompt is scored under both conditions"
        return {f"{pre}/capability_flip_rate": not_estimable(why, rate_def, ins, sts, **meta),
                f"{pre}/capability_mcnemar_p": not_estimable(why, p_def, ins, sts, **meta)}
    return {f"{pre}/capability_flip_rate": proportion(b + c, n, rate_def, ins, sts,
                                                      **_cp(b + c, n), **meta),
            f"{pre}/capability_mcnemar_p": scalar(mcnemar_exact(b, c).p_value, p_def, ins,
                                                  sts, n=n, **meta)}


def position_numbers(s: StudyView) -> dict[str, Record]:
    """One-way ANOVA of the target score by position: per model and pooled over models
    (over every filler composition), and per filler composition pooled over models."""
    fill = [c for c in s.compositions if c != s.baseline and is_cobatch(c)
            and parse_condition(c).pool != "solo"]
    blocks: list[tuple[str, str, list[str], list[str], dict[str, Any]]] = [
        (f"{s.study}/{m}", f"model {m}, pooled over {', '.join(fill)}", [m], fill,
         s.meta(m, None) | {"conditions": fill}) for m in s.models]
    blocks.append((f"{s.study}/all", f"pooled over models and {', '.join(fill)}", s.models,
                   fill, s.meta("all", None) | {"conditions": fill}))
    blocks += [(f"{s.study}/all/{c}", f"{c}, pooled over models", s.models, [c],
                s.meta("all", c)) for c in fill]
    return {f"{pre}/position_anova_p": _position_record(s, label, models, conds, meta)
            for pre, label, models, conds, meta in blocks}


def _position_record(s: StudyView, label: str, models: list[str], conds: list[str],
                     meta: dict[str, Any]) -> Record:
    keys = [(m, c) for m in models for c in conds]
    ins, sts = union_of(s.spaths, keys) or s.every_input, union_of(s.stacks, keys)
    definition = (f"one-way ANOVA p of the {s.domain or 'all'} targets' score by target "
                  f"position in the batch, {label}; F in statistic, eta_squared, per "
                  "position [n, mean score] in by_position")
    if not conds:
        return not_estimable("no composition with fillers", definition, ins, sts, **meta)
    if "position" not in s.df.columns:
        return not_estimable("the scored rows have no position column", definition, ins,
                             sts, **meta)
    rows = s.df[s.df["model"].isin(models) & s.df["condition"].isin(conds)]
    rows = rows[rows["position"].notna()]
    groups = {int(p): g["score"].to_numpy(float) for p, g in rows.groupby("position")}
    by_position = {str(p): [len(v), float(np.mean(v))] for p, v in sorted(groups.items())}
    try:
        r = one_way_anova([groups[p] for p in sorted(groups)])
    except BatchflipError as exc:
        return not_estimable(str(exc), definition, ins, sts, n=len(rows),
                             by_position=by_position, **meta)
    return scalar(r.p_value, definition, ins, sts, statistic=r.statistic,
                  df_between=r.df_between, df_within=r.df_within,
                  eta_squared=r.eta_squared, n=len(rows), by_position=by_position, **meta)
