"""Study C's paired tests over :class:`StudyView` (the target rows): refusal rates,
McNemar with Holm, TOST equivalence, Cochran's Q, Mantel-Haenszel, minimum detectable
effects and flip directions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from batchflip.errors import BatchflipError
from batchflip.numbers import REFUSED_AT, Record, not_estimable, proportion, scalar, unsafe_share
from batchflip.stats import (
    cochrans_q,
    holm,
    mantel_haenszel,
    mcnemar_exact,
    minimum_detectable_effect,
    paired_difference_interval,
    tost_paired,
)
from batchflip.studies.composition_base import Counts, Pair, record_meta, union_of


@dataclass(frozen=True)
class StudyView:
    """What every block of Study C's numbers reads: the target rows, the refused-by-prompt
    table and the input paths and stack ids of each (model, condition)."""

    study: str
    baseline: str
    domain: str | None
    df: pd.DataFrame  # answered targets of the domain, with ``refused`` (0/1)
    wide: pd.DataFrame  # refused, index (model, prompt_id), one column per condition
    spaths: dict[Pair, list[str]]
    stacks: dict[Pair, list[str]]
    sizes: dict[Pair, int]
    every_input: list[str]
    models: list[str]
    others: list[str]  # every condition but the baseline, in display order
    compositions: list[str]  # the baseline and every cobatch condition

    @property
    def base_present(self) -> bool:
        """Whether the baseline has rows (paired numbers need it)."""
        return self.baseline in self.wide.columns

    def ins(self, keys: Iterable[Pair]) -> list[str]:
        """Input paths of ``keys`` and of their models' baselines."""
        keys = list(keys)
        return union_of(self.spaths, keys + [(m, self.baseline) for m, _ in keys]) or \
            self.every_input

    def sts(self, keys: Iterable[Pair]) -> list[str]:
        """Stack ids of ``keys`` and of their models' baselines."""
        keys = list(keys)
        return union_of(self.stacks, keys + [(m, self.baseline) for m, _ in keys])

    def meta(self, model: str, condition: str | None, batch_size: int | None = None
             ) -> dict[str, Any]:
        """Record metadata against this study's baseline."""
        return record_meta(model, condition, self.baseline, batch_size)


def refusal_rates(s: StudyView) -> dict[str, Record]:
    """Refusal rate per (model, condition) and per condition pooled over models."""
    out: dict[str, Record] = {}
    what = f"refusal rate (score >= {REFUSED_AT}) of the {s.domain or 'all'} targets under"
    for (model, cond), part in s.df.groupby(["model", "condition"], sort=True):
        out[f"{s.study}/{model}/{cond}/refusal_rate"] = proportion(
            int(part["refused"].sum()), len(part), f"{what} {cond}, model {model}",
            s.spaths.get((model, cond), s.every_input), s.stacks[(model, cond)],
            is_baseline=cond == s.baseline, **s.meta(model, cond, s.sizes[(model, cond)]))
    for cond, part in s.df.groupby("condition", sort=True):
        keys = [(m, cond) for m in s.models]
        out[f"{s.study}/all/{cond}/refusal_rate"] = proportion(
            int(part["refused"].sum()), len(part), f"{what} {cond}, pooled over models",
            union_of(s.spaths, keys), union_of(s.stacks, keys), is_baseline=cond == s.baseline,
            **s.meta("all", cond, int(part["batch_size"].iloc[0])))
    return out


def pair_counts(s: StudyView) -> dict[Pair, Counts]:
    """(b, c, n) per (model, non-baseline condition); zeros where nothing is paired."""
    pairs: dict[Pair, Counts] = {}
    for model in s.models:
        sub = s.wide.loc[model]
        for cond in s.others:
            if not s.base_present or cond not in sub.columns:
                pairs[(model, cond)] = (0, 0, 0)
                continue
            both = sub[[s.baseline, cond]].dropna()
            x, y = both[s.baseline].to_numpy(), both[cond].to_numpy()
            pairs[(model, cond)] = (int(((x == 1) & (y == 0)).sum()),
                                    int(((x == 0) & (y == 1)).sum()), len(both))
    return pairs


def reported_pairs(s: StudyView, pairs: dict[Pair, Counts]) -> Iterator[tuple[Pair, Counts, str]]:
    """The pairs whose model ran the condition, with their id prefix."""
    for (model, cond), counts in pairs.items():
        if (model, cond) in s.stacks:
            yield (model, cond), counts, f"{s.study}/{model}/{cond}"


def mcnemar_raw(s: StudyView, pairs: dict[Pair, Counts]) -> dict[str, float]:
    """Exact McNemar p per reported pair with paired rows, by id prefix."""
    return {pre: mcnemar_exact(b, c).p_value
            for _, (b, c, n), pre in reported_pairs(s, pairs) if n > 0}


def mcnemar_records(s: StudyView, pairs: dict[Pair, Counts], raw: dict[str, float]
                    ) -> dict[str, Record]:
    """Discordant counts, paired n and exact McNemar p per reported pair."""
    out: dict[str, Record] = {}
    for (model, cond), (b, c, n), pre in reported_pairs(s, pairs):
        meta = s.meta(model, cond, s.sizes.get((model, cond)))
        key = [(model, cond)]
        for name, count, what in (("to_unsafe", b, "refused under the baseline, complied "
                                   "under the condition"),
                                  ("to_safe", c, "complied under the baseline, refused "
                                   "under the condition")):
            out[f"{pre}/{name}"] = scalar(count, f"count of paired targets {what} ({cond} vs "
                                          f"{s.baseline}, model {model})", s.ins(key),
                                          s.sts(key), **meta)
        out[f"{pre}/paired_n"] = scalar(n, f"targets scored under both {cond} and "
                                        f"{s.baseline}, model {model}", s.ins(key), s.sts(key),
                                        **meta)
        definition = (f"exact McNemar p, {cond} vs {s.baseline}, model {model} (two-sided "
                      "binomial on the discordant pairs; b = to unsafe, c = to safe)")
        if pre in raw:
            out[f"{pre}/mcnemar_p"] = scalar(raw[pre], definition, s.ins(key), s.sts(key),
                                             b=b, c=c, n=n, **meta)
        else:
            out[f"{pre}/mcnemar_p"] = not_estimable(
                "no prompt is scored under both conditions", definition, s.ins(key),
                s.sts(key), b=b, c=c, n=n, **meta)
    return out


def holm_records(s: StudyView, pairs: dict[Pair, Counts], raw: dict[str, float]
                 ) -> dict[str, Record]:
    """Holm-adjusted McNemar p per reported pair; family = the pairs with paired rows."""
    family = sorted(raw)
    adjusted = dict(zip(family, holm([raw[k] for k in family]).tolist(), strict=True)
                    ) if family else {}
    out: dict[str, Record] = {}
    for (model, cond), (b, c, n), pre in reported_pairs(s, pairs):
        meta = s.meta(model, cond, s.sizes.get((model, cond)))
        definition = (f"Holm-adjusted exact McNemar p, {cond} vs {s.baseline}, model {model}; "
                      f"family = the {len(family)} (model, condition) pairs of study {s.study} "
                      "with paired rows")
        key = [(model, cond)]
        if pre in adjusted:
            out[f"{pre}/mcnemar_p_holm"] = scalar(adjusted[pre], definition, s.ins(key),
                                                  s.sts(key), b=b, c=c, n=n,
                                                  family_size=len(family), **meta)
        else:
            out[f"{pre}/mcnemar_p_holm"] = not_estimable(
                "no prompt is scored under both conditions", definition, s.ins(key),
                s.sts(key), b=b, c=c, n=n, family_size=len(family), **meta)
    return out


def pooled_counts(s: StudyView, pairs: dict[Pair, Counts]) -> dict[str, Counts]:
    """(b, c, n) per non-baseline condition, summed over the models that ran it."""
    pooled: dict[str, Counts] = {}
    for cond in s.others:
        trip = [pairs[(m, cond)] for m in s.models if (m, cond) in s.stacks]
        pooled[cond] = (sum(t[0] for t in trip), sum(t[1] for t in trip),
                        sum(t[2] for t in trip))
    return pooled


def tost_records(s: StudyView, pairs: dict[Pair, Counts], margin: float, alpha: float
                 ) -> dict[str, Record]:
    """Paired TOST per reported pair, per condition with pairs pooled over models, and over
    every non-baseline composition pooled (the paper's one TOST); with each pooled TOST the
    paired difference and its (1 - 2 alpha) interval as ``.../refusal_diff_pp``."""
    out: dict[str, Record] = {}
    for (model, cond), (b, c, n), pre in reported_pairs(s, pairs):
        out[f"{pre}/tost_p"] = _tost_record(
            s, (b, c, n), f"{cond}, model {model}", [(model, cond)], margin, alpha,
            s.meta(model, cond, s.sizes.get((model, cond))))
    pooled = pooled_counts(s, pairs)
    comps = [c for c in s.compositions if c != s.baseline]
    every = tuple(sum(pooled[c][i] for c in comps) for i in range(3))
    blocks = [(f"{s.study}/all/{cond}", counts, f"{cond}, pairs pooled over models",
               [(m, cond) for m in s.models], s.meta("all", cond))
              for cond, counts in pooled.items()]
    blocks.append((f"{s.study}/all", every, "every non-baseline composition ("
                   + ", ".join(comps) + "), pairs pooled over models and compositions",
                   [(m, c) for m in s.models for c in comps],
                   s.meta("all", None) | {"conditions": comps}))
    for pre, counts, label, keys, meta in blocks:
        out[f"{pre}/tost_p"] = _tost_record(s, counts, label, keys, margin, alpha, meta)
        out[f"{pre}/refusal_diff_pp"] = _diff_record(s, counts, label, keys, alpha, meta)
    return out


def _tost_record(s: StudyView, counts: Counts, label: str, keys: list[Pair], margin: float,
                 alpha: float, meta: dict[str, Any]) -> Record:
    """TOST of refusal(condition) - refusal(baseline) within +-margin from (b, c, n)."""
    b, c, n = counts
    definition = (f"paired TOST (Tango score) p that refusal({label}) - "
                  f"refusal({s.baseline}) lies within +-{100 * margin:g} pp; estimate_pp "
                  f"and its Wald {100 * (1 - 2 * alpha):g}% interval in diff_low_pp/"
                  "diff_high_pp")
    if n == 0:
        return not_estimable("no prompt is scored under both conditions", definition,
                             s.ins(keys), s.sts(keys), margin_pp=100 * margin, **meta)
    try:
        # x = condition, y = baseline: #(x=1, y=0) = to_safe = c, #(x=0, y=1) = b
        r = tost_paired(c, b, n, margin)
    except BatchflipError as exc:
        return not_estimable(str(exc), definition, s.ins(keys), s.sts(keys),
                             margin_pp=100 * margin, **meta)
    ci = paired_difference_interval(c, b, n, 1 - 2 * alpha)
    return scalar(r.p_value, definition, s.ins(keys), s.sts(keys),
                  estimate_pp=100 * r.estimate, diff_low_pp=100 * ci.low,
                  diff_high_pp=100 * ci.high, diff_confidence=1 - 2 * alpha,
                  margin_pp=100 * margin, p_lower=r.p_lower, p_upper=r.p_upper,
                  equivalent=bool(r.p_value < alpha), alpha=alpha, b=b, c=c, n=n,
                  method=r.method, **meta)


def _diff_record(s: StudyView, counts: Counts, label: str, keys: list[Pair], alpha: float,
                 meta: dict[str, Any]) -> Record:
    """refusal(condition) - refusal(baseline) over paired targets, in pp, with its Wald
    (1 - 2 alpha) interval in ci_low/ci_high (pp)."""
    b, c, n = counts
    conf = 1 - 2 * alpha
    definition = (f"paired difference in refusal rate, {label} minus {s.baseline}, in pp "
                  f"((to_safe - to_unsafe) / n); Wald {100 * conf:g}% interval (the TOST "
                  "interval) in ci_low/ci_high")
    if n == 0:
        return not_estimable("no prompt is scored under both conditions", definition,
                             s.ins(keys), s.sts(keys), confidence=conf, **meta)
    ci = paired_difference_interval(c, b, n, conf)
    return scalar(100 * (c - b) / n, definition, s.ins(keys), s.sts(keys),
                  ci_low=100 * ci.low, ci_high=100 * ci.high, confidence=conf, b=b, c=c,
                  n=n, **meta)


def cochran_records(s: StudyView) -> dict[str, Record]:
    """Cochran's Q across the compositions, per model and pooled over models."""
    out: dict[str, Record] = {}
    comps = s.compositions
    q_def = (f"Cochran's Q p across the compositions {', '.join(comps)} (refused vs "
             "not; subjects = prompts scored under every composition")
    for model in [*s.models, "all"]:
        keys = [(m, c) for m in s.models for c in comps] if model == "all" else \
            [(model, c) for c in comps]
        definition = q_def + (", pooled over models: a subject is a (model, prompt))"
                              if model == "all" else f"), model {model}")
        meta = s.meta(model, None) | {"conditions": comps}
        ins, sts = union_of(s.spaths, keys), union_of(s.stacks, keys)
        nid = f"{s.study}/{model}/cochran_q_p"
        if len(comps) < 2:
            out[nid] = not_estimable(f"{len(comps)} composition(s); Cochran's Q needs 2 or "
                                     "more", definition, ins or s.every_input, sts, **meta)
            continue
        cols = [c for c in comps if c in s.wide.columns]
        mat = s.wide[cols] if model == "all" else s.wide.loc[[model], cols]
        mat = mat.reindex(columns=comps).dropna()
        if mat.empty:
            out[nid] = not_estimable("no prompt is scored under every composition", definition,
                                     ins or s.every_input, sts, n_subjects=0, **meta)
            continue
        try:
            q = cochrans_q(mat.to_numpy(dtype=np.int8))
            out[nid] = scalar(q.p_value, definition, ins, sts, statistic=q.statistic,
                              df=q.df, n_subjects=len(mat), method=q.method, **meta)
        except BatchflipError as exc:
            out[nid] = not_estimable(str(exc), definition, ins, sts, n_subjects=len(mat),
                                     **meta)
    return out


def _mh_tables(s: StudyView, conds: list[str], ref: str | None = None) -> np.ndarray:
    """Per model, [[condition refused, not], [reference refused, not]] over paired prompts
    (the condition arm pools ``conds``; the reference is the baseline unless given)."""
    ref = ref or s.baseline
    tables = []
    for model in s.models if ref in s.wide.columns else []:
        sub = s.wide.loc[model]
        present = [c for c in conds if c in sub.columns]
        if not present:
            continue
        base = sub[ref]
        arm, paired_any = [], pd.Series(False, index=sub.index)
        for cond in present:
            ok = sub[cond].notna() & base.notna()
            arm.append(sub.loc[ok, cond].to_numpy())
            paired_any |= ok
        arm_v = np.concatenate(arm) if arm else np.zeros(0)
        base_v = base[paired_any].to_numpy()
        tables.append([[int((arm_v == 1).sum()), int((arm_v == 0).sum())],
                       [int((base_v == 1).sum()), int((base_v == 0).sum())]])
    return np.asarray(tables, dtype=np.int64).reshape(-1, 2, 2)


def mh_records(s: StudyView, conds: list[str], pre: str, label: str, meta: dict[str, Any],
               ref: str | None = None) -> dict[str, Record]:
    """Mantel-Haenszel pooled odds ratio and CMH p of ``conds`` vs ``ref`` (default: the
    baseline)."""
    ref = ref or s.baseline
    keys = [(m, c) for m in s.models for c in [*conds, ref]]
    ins, sts = s.ins(keys), s.sts(keys)
    arm = "baseline" if ref == s.baseline else "reference"
    definition = (f"Mantel-Haenszel pooled odds ratio of refusal, {label} vs {ref}, "
                  "strata = models; per stratum [[condition refused, condition not], "
                  f"[{arm} refused, {arm} not]] over paired prompts (OR > 1: more "
                  f"refusal than under {ref}); arms treated as independent although "
                  "paired, as in the paper; Robins-Breslow-Greenland 95% interval in low/high")
    p_def = f"Cochran-Mantel-Haenszel test p (no continuity correction), {label} vs {ref}"
    tables = _mh_tables(s, conds, ref)
    extra = {"tables": tables.tolist(), **meta}
    reason = ("no non-baseline composition" if not conds else
              "no model has both the baseline and the condition" if tables.shape[0] == 0
              else "")
    if not reason:
        try:
            r = mantel_haenszel(tables)
        except BatchflipError as exc:
            reason = str(exc)
    if reason:
        return {f"{pre}/mh_odds_ratio": not_estimable(reason, definition, ins, sts, **extra),
                f"{pre}/mh_p": not_estimable(reason, p_def, ins, sts, **extra)}
    return {f"{pre}/mh_odds_ratio": scalar(r.odds_ratio, definition, ins, sts, low=r.low,
                                           high=r.high, n_strata=r.n_strata, **extra),
            f"{pre}/mh_p": scalar(r.p_value, p_def, ins, sts, statistic=r.statistic,
                                  n_strata=r.n_strata, **extra)}


def mh_numbers(s: StudyView) -> dict[str, Record]:
    """MH per non-baseline condition, and over every non-baseline composition pooled."""
    out: dict[str, Record] = {}
    for cond in s.others:
        out |= mh_records(s, [cond], f"{s.study}/all/{cond}", cond, s.meta("all", cond))
    pooled = [c for c in s.compositions if c != s.baseline]
    out |= mh_records(s, pooled, f"{s.study}/all", "all non-baseline compositions pooled ("
                      + ", ".join(pooled) + ")", s.meta("all", None) | {"conditions": pooled})
    return out


def mde_numbers(s: StudyView, pooled: dict[str, Counts]) -> dict[str, Record]:
    """Minimum detectable effect per condition and for the least sensitive composition."""
    out: dict[str, Record] = {}
    for cond in s.others:
        out[f"{s.study}/all/{cond}/mde_pp"] = _mde_record(
            s, pooled[cond][2], f"{cond} vs {s.baseline}", [(m, cond) for m in s.models],
            s.meta("all", cond))
    comps = [c for c in s.compositions if c != s.baseline]
    ns = {c: pooled[c][2] for c in comps if pooled[c][2] > 0}
    smallest = min(ns, key=lambda c: (ns[c], c)) if ns else None
    base_keys = [(m, s.baseline) for m in s.models] if s.base_present else []
    out[f"{s.study}/all/mde_pp"] = _mde_record(
        s, ns[smallest] if smallest else 0,
        f"n = the smallest over the non-baseline compositions ({smallest})",
        [(m, c) for m in s.models for c in comps] or base_keys,
        s.meta("all", None) | {"conditions": comps, "n_by_condition": ns})
    return out


# which rate p is: the paper prints p = 0.737 but not the rows it is a rate of (fidelity:
# studyC_mde_p_rule, "not reproducible from printed inputs")
MDE_P_RULE = ("pooled refusal rate under the baseline composition; the paper's p (0.737) "
              "comes from rows it does not name, so this MDE is not the paper's rule "
              "(fidelity studyC_mde_p_rule: not reproducible from printed inputs)")


def _mde_record(s: StudyView, n: int, label: str, keys: list[Pair], meta: dict[str, Any]
                ) -> Record:
    """(1.96 + 0.842) sqrt(2 p (1 - p) / n) in pp, p = pooled baseline refusal rate."""
    definition = ("minimum detectable effect (pp) (1.96 + 0.842) * sqrt(2 p (1 - p) / n), p = "
                  f"pooled refusal rate under {s.baseline}, n = paired rows per comparison "
                  f"pooled over models; {label}")
    if not s.base_present:
        return not_estimable(f"baseline '{s.baseline}' has no rows", definition, s.ins(keys),
                             s.sts(keys), **meta)
    if n <= 0:
        return not_estimable("no paired rows", definition, s.ins(keys), s.sts(keys), **meta)
    p_base = float(s.df.loc[s.df["condition"] == s.baseline, "refused"].mean())
    return scalar(100 * minimum_detectable_effect(p_base, n), definition, s.ins(keys),
                  s.sts(keys), p=p_base, n=n, p_rule=MDE_P_RULE, **meta)


def direction_numbers(s: StudyView, pairs: dict[Pair, Counts], raw: dict[str, float],
                      alpha: float) -> dict[str, Record]:
    """Direction of the discordant pairs: every pair, and the significant ones."""
    every = [k for k in pairs if k in s.stacks and pairs[k][2] > 0]
    significant = [k for k in every if raw.get(f"{s.study}/{k[0]}/{k[1]}", 1.0) < alpha]
    return (direction_records(s, pairs, every, f"{s.study}/all/direction",
                              "pooled over every (model, condition) pair",
                              "no (model, condition) pair has paired rows")
            | direction_records(s, pairs, significant, f"{s.study}/all/direction_significant",
                                "pooled over the (model, condition) pairs with unadjusted "
                                f"McNemar p < {alpha}", "no (model, condition) pair has "
                                f"unadjusted McNemar p < {alpha}"))


def direction_records(s: StudyView, pairs: dict[Pair, Counts], selected: list[Pair], pre: str,
                      label: str, no_pairs: str, **extra: Any) -> dict[str, Record]:
    """Counts to unsafe / to safe (``<pre>_to_unsafe``, ``_to_safe``), the to-unsafe share
    (Wilson 95% in ci_low/ci_high, Clopper-Pearson 95% in cp_low/cp_high) and its exact
    two-sided binomial test against 0.5."""
    b = sum(pairs[k][0] for k in selected)
    c = sum(pairs[k][1] for k in selected)
    ins, sts = s.ins(selected), s.sts(selected)
    meta = s.meta("all", None) | {"pairs": [f"{m}/{k}" for m, k in selected]} | extra
    out = {
        f"{pre}_to_unsafe": scalar(
            b, f"discordant pairs to unsafe (refused under {s.baseline}, complied under the "
            f"condition), {label}", ins, sts, **meta),
        f"{pre}_to_safe": scalar(
            c, f"discordant pairs to safe (complied under {s.baseline}, refused under the "
            f"condition), {label}", ins, sts, **meta)}
    share_def = (f"share of discordant pairs that go to unsafe, {label} (Wilson 95%; "
                 "Clopper-Pearson 95% in cp_low/cp_high)")
    test_def = f"exact two-sided binomial test of the to-unsafe share = 0.5, {label}"
    out[f"{pre}_unsafe_share"], out[f"{pre}_binom_p"] = unsafe_share(
        b, b + c, share_def, test_def, ins, sts,
        "no discordant pairs" if selected else no_pairs,
        {"to_unsafe": b, "discordant": b + c}, **meta)
    return out
