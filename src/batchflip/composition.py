"""Study C: continuous-batch composition numbers and figure.

Each safety prompt is a *target* served at one batch size under several compositions
(``cobatch_b8_<pool>``: solo, benign, jailbreak, mixed, refusal fillers) and, optionally,
with the fillers staggered in time (``stagger_b8_<pool>_<m|p><ms>``). Every condition is
compared with the baseline composition (``cobatch_b8_solo`` by default), paired on
``prompt_id`` within a model.

What is counted
---------------
- Rows: the targets of the scored files (one row per target), restricted to ``--domain``
  (default ``safety``; capability controls are left out of refusal numbers). A target is
  *refused* when ``score >= 0.5`` (1.0 = refused for refusal tasks; for BBQ/TruthfulQA
  0.5 and 1 count as the safe side, as in the paper's flip direction).
- Pairs: for a model and a condition, the prompts present under both the condition and
  the baseline. ``b`` = refused under the baseline, complied under the condition
  (``to_unsafe``); ``c`` = complied under the baseline, refused under the condition
  (``to_safe``).
- *Compositions* are the baseline and every ``cobatch`` condition. The aggregate tests
  (Cochran's Q, the pooled Mantel-Haenszel odds ratio, the minimum detectable effect) use
  the compositions only; ``stagger`` conditions (the temporal-overlap phase) get the
  pairwise numbers (McNemar in the Holm family, TOST, their own MH) and enter the pooled
  flip direction, which pools every pair of the study.

Numbers (``<s>`` = study, ``<m>`` = model, ``<c>`` = condition; ``all`` = pooled over
models). Each record carries ``model``, ``condition``, ``pool``, ``batch_size``,
``dispatch``, ``stagger_ms`` and ``baseline`` where they apply.

- ``<s>/<m>/<c>/refusal_rate`` (also ``<s>/all/<c>/...``): refused targets / targets,
  Wilson 95% interval.
- ``<s>/<m>/<c>/mcnemar_p``: exact McNemar (two-sided binomial on the discordant pairs)
  with ``b``, ``c``, ``n``; ``<s>/<m>/<c>/mcnemar_p_holm``: Holm-adjusted over all
  (model, condition) pairs of the study that have paired rows.
- ``<s>/<m>/<c>/to_unsafe``, ``/to_safe``, ``/paired_n``: the counts behind them.
- ``<s>/<m>/<c>/tost_p`` (also ``<s>/all/<c>/tost_p``, pairs pooled over models): paired
  TOST (Tango score) of refusal(condition) - refusal(baseline) within +-margin (default
  3 pp); ``estimate_pp``, ``margin_pp``, ``p_lower``, ``p_upper``, ``equivalent``.
- ``<s>/<m>/cochran_q_p`` and ``<s>/all/cochran_q_p``: Cochran's Q across the
  compositions, subjects = (model,) prompts present under every composition;
  ``statistic``, ``df``, ``n_subjects``.
- ``<s>/all/<c>/mh_odds_ratio`` and ``<s>/all/mh_odds_ratio`` (with ``<s>/all/mh_p``):
  Mantel-Haenszel pooled odds ratio, strata = models, Robins-Breslow-Greenland interval in
  ``low``/``high``, CMH test p. Table per stratum (orientation)::

                       refused   not refused
        condition        a           b
        baseline         c           d

  so OR > 1 means higher odds of refusal with fillers than without. For one condition the
  rows are its paired targets and their baseline rows; for the pooled number the
  condition arm holds every non-baseline composition's paired targets and the baseline arm
  the baseline rows of the prompts paired with any of them. The design is paired, but MH
  here treats the two arms as independent samples, as the paper did; McNemar and TOST
  are the paired analyses.
- ``<s>/all/mde_pp`` (and ``<s>/all/<c>/mde_pp``): ``(1.96 + 0.842) * sqrt(2 p (1 - p) /
  n)`` in percentage points, ``p`` = pooled baseline refusal rate, ``n`` = paired rows per
  comparison pooled over models (for the study-level number the smallest such ``n`` of
  the non-baseline compositions, i.e. the least sensitive comparison).
- ``<s>/all/direction_to_unsafe``, ``/direction_to_safe``, ``/direction_unsafe_share``
  (Wilson), ``/direction_binom_p`` (exact binomial against 0.5): discordant pairs pooled
  over every (model, condition) pair; the same with ``direction_significant_`` for the
  pairs whose unadjusted McNemar p < alpha (the paper's "28/31 in the three significant
  conditions").
- ``<s>/<m>/<c>/cobatch_verified_rate``, ``<s>/all/<c>/...`` and
  ``<s>/all/cobatch_verified_rate``: from the generation files, the share of targets
  whose decode interval ``[t_first, t_done]`` overlaps (closed intervals) the interval of
  every filler of its group. Groups without fillers (solo) are excluded; stagger groups
  are included. A filler with a recorded ``error`` never overlaps; a failed target is left
  out (it has no decode interval). These records carry
  ``timing: true``: they come from wall-clock timings, so two runs with identical texts can
  give different values (every other number is a function of the texts).

Failed requests (``batchflip.failures``: ``finish_reason "error"``, null score) are no
answers: they are left out of every rate and pair above, counted per (model, condition) over
all domains in ``<s>/<m>/<c>/error_count`` and ``/error_share``, and a condition whose share
is above ``--max-error-share`` (config ``errors.max_share``) fails the job, writing nothing.

A statistic that cannot be estimated is a record with ``value: null`` and a ``note``
starting "not estimable:" — never NaN, never a crash.

CLI (one subcommand, two actions)::

    batchflip composition numbers --study c --scored S... --generations G... \\
        --baseline cobatch_b8_solo --out results/numbers/c.json \\
        [--margin 0.03] [--alpha 0.05] [--domain safety] [--max-error-share 0.01]
    batchflip composition figure --numbers results/numbers/c.json \\
        --png results/figures/c_composition.png --pdf results/figures/c_composition.pdf
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.cli import figure_arguments
from batchflip.conditions import POOLS, parse_condition
from batchflip.errors import BatchflipError
from batchflip.failures import DEFAULT_MAX_SHARE, answered, error_numbers, failed_mask
from batchflip.io import write_json
from batchflip.numbers import (
    REFUSED_AT,
    Record,
    load,
    not_estimable,
    proportion,
    proportion_or_none,
    scalar,
)
from batchflip.records import read_records, require_columns
from batchflip.stats import (
    binomial_test,
    cochrans_q,
    holm,
    mantel_haenszel,
    mcnemar_exact,
    minimum_detectable_effect,
    tost_paired,
)

SCORED_NEEDED = ["model", "condition", "batch_size", "dispatch", "prompt_id", "domain",
                 "score", "stack_id"]
GEN_NEEDED = ["model", "condition", "group_id", "role", "prompt_id", "t_first", "t_done",
              "stack_id"]
GEN_OPTIONAL = ["error", "finish_reason"]
SCORED_ERROR = ["error"]  # needed by the CLI; hand-built frames without it have no failures
DEFAULT_BASELINE = "cobatch_b8_solo"


# --------------------------------------------------------------------------- loading


def _path_index(frames: dict[str, pd.DataFrame]) -> dict[tuple[str, str], list[str]]:
    """(model, condition) -> the input paths that hold its rows."""
    out: dict[tuple[str, str], set[str]] = {}
    for path, df in frames.items():
        for key in df[["model", "condition"]].drop_duplicates().itertuples(index=False):
            out.setdefault((str(key[0]), str(key[1])), set()).add(str(path))
    return {k: sorted(v) for k, v in out.items()}


def _concat(frames: dict[str, pd.DataFrame], needed: list[str]) -> pd.DataFrame:
    """Every frame (path -> frame) in one, each checked for ``needed`` columns."""
    for path, df in frames.items():
        require_columns(df, needed, path)
    if not frames:
        return pd.DataFrame(columns=needed)
    return pd.concat(frames.values(), ignore_index=True)


# --------------------------------------------------------------------------- helpers


def _meta(model: str, condition: str | None, baseline: str,
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


def _union(mapping: dict[Any, list[str]], keys: Iterable[Any]) -> list[str]:
    out: set[str] = set()
    for key in keys:
        out.update(mapping.get(key, []))
    return sorted(out)


def _condition_key(name: str) -> tuple[Any, ...]:
    """Display order: cobatch before stagger, pools in conditions.POOLS order, then delay."""
    try:
        c = parse_condition(name)
    except BatchflipError:
        return (9, 99, 0, name)
    rank = {"cobatch": 0, "stagger": 1}.get(c.dispatch, 2)
    pool = POOLS.index(c.pool) if c.pool in POOLS else 98
    return (rank, pool, c.stagger_ms, name)


def _sanitize(numbers: dict[str, Record]) -> dict[str, Record]:
    """Last guard: no NaN/inf and no numpy scalars reach the JSON file."""
    def clean(v: Any) -> Any:
        if isinstance(v, (np.bool_,)):
            return bool(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(float(v)) else None
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    out = {}
    for nid, rec in numbers.items():
        new = {k: clean(v) for k, v in rec.items()}
        value = rec.get("value")
        if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
            new["note"] = "not estimable: the statistic is not finite"
        out[nid] = new
    return out


# --------------------------------------------------------------------------- verification


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


# --------------------------------------------------------------------------- numbers


Pair = tuple[str, str]  # (model, condition)
Counts = tuple[int, int, int]  # (b = to unsafe, c = to safe, paired n)


@dataclass(frozen=True)
class _Study:
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
        return _union(self.spaths, keys + [(m, self.baseline) for m, _ in keys]) or \
            self.every_input

    def sts(self, keys: Iterable[Pair]) -> list[str]:
        """Stack ids of ``keys`` and of their models' baselines."""
        keys = list(keys)
        return _union(self.stacks, keys + [(m, self.baseline) for m, _ in keys])

    def meta(self, model: str, condition: str | None, batch_size: int | None = None
             ) -> dict[str, Any]:
        """Record metadata against this study's baseline."""
        return _meta(model, condition, self.baseline, batch_size)


def composition_numbers(scored: dict[str, pd.DataFrame],
                        generations: dict[str, pd.DataFrame], study: str,
                        baseline: str = DEFAULT_BASELINE, margin: float = 0.03,
                        alpha: float = 0.05, domain: str | None = "safety",
                        max_error_share: float = DEFAULT_MAX_SHARE,
                        ) -> dict[str, Record]:
    """All Study C numbers.

    ``scored`` and ``generations`` map an input path to its frame (the paths become each
    record's ``inputs``). ``domain=None`` keeps every scored row. Raises BatchflipError
    when a (model, condition)'s share of failed requests is above ``max_error_share``.
    """
    df = _concat(scored, SCORED_NEEDED)
    numbers: dict[str, Record] = dict(error_numbers(scored, study, max_error_share)
                                      if scored else {})
    s = _study(scored, _target_rows(df, domain), study, baseline, domain)
    numbers |= _refusal_rates(s)
    if not s.base_present:
        numbers[f"{study}/all/baseline_missing"] = not_estimable(
            f"baseline condition '{baseline}' has no scored {domain or ''} rows",
            "paired comparisons against the baseline", s.every_input, [],
            **s.meta("all", None))
    pairs = _paired_counts(s)
    raw = _mcnemar_raw(s, pairs)
    numbers |= _mcnemar_records(s, pairs, raw) | _holm_records(s, pairs, raw)
    numbers |= _tost_records(s, pairs, margin, alpha)
    numbers |= _cochran_records(s) | _mh_numbers(s)
    numbers |= _mde_numbers(s, _pooled_counts(s, pairs))
    numbers |= _direction_numbers(s, pairs, raw, alpha)
    numbers |= verification_numbers(generations, study, baseline)
    return _sanitize(numbers)


def _target_rows(df: pd.DataFrame, domain: str | None) -> pd.DataFrame:
    """Answered rows of ``domain`` (all when None), each (model, condition, prompt) once and
    scored, with ``refused`` = score >= REFUSED_AT."""
    df = answered(df)
    if domain is not None:
        df = df[df["domain"] == domain]
    if df["score"].isna().any():
        bad = df.loc[df["score"].isna()].iloc[0]
        raise BatchflipError(f"scored rows: prompt '{bad['prompt_id']}' of model "
                             f"'{bad['model']}' under '{bad['condition']}' has no score")
    dups = df.duplicated(["model", "condition", "prompt_id"])
    if dups.any():
        d = df.loc[dups].iloc[0]
        raise BatchflipError(f"scored rows: prompt '{d['prompt_id']}' appears twice for "
                             f"model '{d['model']}' under '{d['condition']}'")
    return df.assign(refused=(df["score"].to_numpy(float) >= REFUSED_AT).astype(np.int8),
                     model=df["model"].astype(str), condition=df["condition"].astype(str))


def _study(scored: dict[str, pd.DataFrame], df: pd.DataFrame, study: str, baseline: str,
           domain: str | None) -> _Study:
    """The shared view of the target rows that every block reads."""
    by_pair = df.groupby(["model", "condition"], sort=True)
    conditions = sorted(df["condition"].unique(), key=_condition_key)
    return _Study(
        study=study, baseline=baseline, domain=domain, df=df,
        wide=df.pivot(index=["model", "prompt_id"], columns="condition", values="refused"),
        spaths=_path_index(scored) if scored else {},
        stacks={k: sorted(map(str, v.unique())) for k, v in by_pair["stack_id"]},
        sizes={k: int(v.iloc[0]) for k, v in by_pair["batch_size"]},
        every_input=sorted(set(scored)), models=sorted(df["model"].unique()),
        others=[c for c in conditions if c != baseline],
        compositions=[c for c in conditions if c == baseline or _is_cobatch(c)])


def _refusal_rates(s: _Study) -> dict[str, Record]:
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
            _union(s.spaths, keys), _union(s.stacks, keys), is_baseline=cond == s.baseline,
            **s.meta("all", cond, int(part["batch_size"].iloc[0])))
    return out


def _paired_counts(s: _Study) -> dict[Pair, Counts]:
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


def _reported(s: _Study, pairs: dict[Pair, Counts]) -> Iterator[tuple[Pair, Counts, str]]:
    """The pairs whose model ran the condition, with their id prefix."""
    for (model, cond), counts in pairs.items():
        if (model, cond) in s.stacks:
            yield (model, cond), counts, f"{s.study}/{model}/{cond}"


def _mcnemar_raw(s: _Study, pairs: dict[Pair, Counts]) -> dict[str, float]:
    """Exact McNemar p per reported pair with paired rows, by id prefix."""
    return {pre: mcnemar_exact(b, c).p_value
            for _, (b, c, n), pre in _reported(s, pairs) if n > 0}


def _mcnemar_records(s: _Study, pairs: dict[Pair, Counts], raw: dict[str, float]
                     ) -> dict[str, Record]:
    """Discordant counts, paired n and exact McNemar p per reported pair."""
    out: dict[str, Record] = {}
    for (model, cond), (b, c, n), pre in _reported(s, pairs):
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


def _holm_records(s: _Study, pairs: dict[Pair, Counts], raw: dict[str, float]
                  ) -> dict[str, Record]:
    """Holm-adjusted McNemar p per reported pair; family = the pairs with paired rows."""
    family = sorted(raw)
    adjusted = dict(zip(family, holm([raw[k] for k in family]).tolist(), strict=True)
                    ) if family else {}
    out: dict[str, Record] = {}
    for (model, cond), (b, c, n), pre in _reported(s, pairs):
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


def _pooled_counts(s: _Study, pairs: dict[Pair, Counts]) -> dict[str, Counts]:
    """(b, c, n) per non-baseline condition, summed over the models that ran it."""
    pooled: dict[str, Counts] = {}
    for cond in s.others:
        trip = [pairs[(m, cond)] for m in s.models if (m, cond) in s.stacks]
        pooled[cond] = (sum(t[0] for t in trip), sum(t[1] for t in trip),
                        sum(t[2] for t in trip))
    return pooled


def _tost_records(s: _Study, pairs: dict[Pair, Counts], margin: float, alpha: float
                  ) -> dict[str, Record]:
    """Paired TOST per reported pair and per condition with pairs pooled over models."""
    out: dict[str, Record] = {}
    for (model, cond), (b, c, n), pre in _reported(s, pairs):
        out[f"{pre}/tost_p"] = _tost_record(
            s, (b, c, n), f"{cond}, model {model}", [(model, cond)], margin, alpha,
            s.meta(model, cond, s.sizes.get((model, cond))))
    for cond, counts in _pooled_counts(s, pairs).items():
        out[f"{s.study}/all/{cond}/tost_p"] = _tost_record(
            s, counts, f"{cond}, pairs pooled over models", [(m, cond) for m in s.models],
            margin, alpha, s.meta("all", cond))
    return out


def _tost_record(s: _Study, counts: Counts, label: str, keys: list[Pair], margin: float,
                 alpha: float, meta: dict[str, Any]) -> Record:
    """TOST of refusal(condition) - refusal(baseline) within +-margin from (b, c, n)."""
    b, c, n = counts
    definition = (f"paired TOST (Tango score) p that refusal({label}) - "
                  f"refusal({s.baseline}) lies within +-{100 * margin:g} pp")
    if n == 0:
        return not_estimable("no prompt is scored under both conditions", definition,
                             s.ins(keys), s.sts(keys), margin_pp=100 * margin, **meta)
    try:
        # x = condition, y = baseline: #(x=1, y=0) = to_safe = c, #(x=0, y=1) = b
        r = tost_paired(c, b, n, margin)
    except BatchflipError as exc:
        return not_estimable(str(exc), definition, s.ins(keys), s.sts(keys),
                             margin_pp=100 * margin, **meta)
    return scalar(r.p_value, definition, s.ins(keys), s.sts(keys),
                  estimate_pp=100 * r.estimate, margin_pp=100 * margin, p_lower=r.p_lower,
                  p_upper=r.p_upper, equivalent=bool(r.p_value < alpha), alpha=alpha, b=b,
                  c=c, n=n, method=r.method, **meta)


def _cochran_records(s: _Study) -> dict[str, Record]:
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
        ins, sts = _union(s.spaths, keys), _union(s.stacks, keys)
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


def _mh_tables(s: _Study, conds: list[str]) -> np.ndarray:
    """Per model, [[condition refused, not], [baseline refused, not]] over paired prompts
    (the condition arm pools ``conds``)."""
    tables = []
    for model in s.models if s.base_present else []:
        sub = s.wide.loc[model]
        present = [c for c in conds if c in sub.columns]
        if not present:
            continue
        base = sub[s.baseline]
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


def _mh_records(s: _Study, conds: list[str], pre: str, label: str, meta: dict[str, Any]
                ) -> dict[str, Record]:
    """Mantel-Haenszel pooled odds ratio and CMH p of ``conds`` vs the baseline."""
    keys = [(m, c) for m in s.models for c in conds]
    ins, sts = s.ins(keys), s.sts(keys)
    definition = (f"Mantel-Haenszel pooled odds ratio of refusal, {label} vs {s.baseline}, "
                  "strata = models; per stratum [[condition refused, condition not], "
                  "[baseline refused, baseline not]] over paired prompts (OR > 1: more "
                  "refusal with fillers); arms treated as independent although paired, "
                  "as in the paper; Robins-Breslow-Greenland 95% interval in low/high")
    p_def = f"Cochran-Mantel-Haenszel test p (no continuity correction), {label}"
    tables = _mh_tables(s, conds)
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


def _mh_numbers(s: _Study) -> dict[str, Record]:
    """MH per non-baseline condition, and over every non-baseline composition pooled."""
    out: dict[str, Record] = {}
    for cond in s.others:
        out |= _mh_records(s, [cond], f"{s.study}/all/{cond}", cond, s.meta("all", cond))
    pooled = [c for c in s.compositions if c != s.baseline]
    out |= _mh_records(s, pooled, f"{s.study}/all", "all non-baseline compositions pooled ("
                       + ", ".join(pooled) + ")", s.meta("all", None) | {"conditions": pooled})
    return out


def _mde_numbers(s: _Study, pooled: dict[str, Counts]) -> dict[str, Record]:
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


def _mde_record(s: _Study, n: int, label: str, keys: list[Pair], meta: dict[str, Any]
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
                  s.sts(keys), p=p_base, n=n, **meta)


def _direction_numbers(s: _Study, pairs: dict[Pair, Counts], raw: dict[str, float],
                       alpha: float) -> dict[str, Record]:
    """Direction of the discordant pairs: every pair, and the significant ones."""
    every = [k for k in pairs if k in s.stacks and pairs[k][2] > 0]
    significant = [k for k in every if raw.get(f"{s.study}/{k[0]}/{k[1]}", 1.0) < alpha]
    return (_direction_records(s, pairs, every, "", "pooled over every (model, condition) "
                               "pair", "no (model, condition) pair has paired rows")
            | _direction_records(s, pairs, significant, "_significant", "pooled over the "
                                 f"(model, condition) pairs with unadjusted McNemar p < {alpha}",
                                 "no (model, condition) pair has unadjusted McNemar p < "
                                 f"{alpha}"))


def _direction_records(s: _Study, pairs: dict[Pair, Counts], selected: list[Pair], tag: str,
                       label: str, no_pairs: str) -> dict[str, Record]:
    """Counts to unsafe / to safe, the to-unsafe share and its binomial test."""
    b = sum(pairs[k][0] for k in selected)
    c = sum(pairs[k][1] for k in selected)
    ins, sts = s.ins(selected), s.sts(selected)
    meta = s.meta("all", None) | {"pairs": [f"{m}/{k}" for m, k in selected]}
    pre = f"{s.study}/all/direction{tag}"
    out = {
        f"{pre}_to_unsafe": scalar(
            b, f"discordant pairs to unsafe (refused under {s.baseline}, complied under the "
            f"condition), {label}", ins, sts, **meta),
        f"{pre}_to_safe": scalar(
            c, f"discordant pairs to safe (complied under {s.baseline}, refused under the "
            f"condition), {label}", ins, sts, **meta)}
    share_def = f"share of discordant pairs that go to unsafe, {label} (Wilson 95%)"
    test_def = f"exact two-sided binomial test of the to-unsafe share = 0.5, {label}"
    if b + c == 0:
        why = "no discordant pairs" if selected else no_pairs
        out[f"{pre}_unsafe_share"] = not_estimable(why, share_def, ins, sts, **meta)
        out[f"{pre}_binom_p"] = not_estimable(why, test_def, ins, sts, **meta)
        return out
    out[f"{pre}_unsafe_share"] = proportion(b, b + c, share_def, ins, sts, **meta)
    out[f"{pre}_binom_p"] = scalar(binomial_test(b, b + c).p_value, test_def, ins, sts,
                                   to_unsafe=b, discordant=b + c, **meta)
    return out


def _is_cobatch(name: str) -> bool:
    try:
        return parse_condition(name).dispatch == "cobatch"
    except BatchflipError:
        return False


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


# --------------------------------------------------------------------------- figure


def composition_figure(numbers: dict[str, Record], png: str | Path, pdf: str | Path) -> None:
    """Refusal rate (%) per composition with Wilson 95% intervals, one series per model."""
    from batchflip.figures import legend_or_note, plt, save

    recs = [r for nid, r in numbers.items() if nid.endswith("/refusal_rate")
            and r.get("model") not in (None, "all") and r.get("condition")
            and r.get("value") is not None]
    conds = sorted({r["condition"] for r in recs},
                   key=lambda c: (not any(r.get("is_baseline") for r in recs
                                          if r["condition"] == c), _condition_key(c)))
    models = sorted({r["model"] for r in recs})
    fig, ax = plt.subplots(figsize=(max(5.5, 1.0 * len(conds) + 2.5), 3.8))
    width = 0.6 / max(len(models), 1)
    for i, model in enumerate(models):
        mine = sorted((r for r in recs if r["model"] == model),
                      key=lambda r: conds.index(r["condition"]))
        x = [conds.index(r["condition"]) + (i - (len(models) - 1) / 2) * width for r in mine]
        y = [100 * r["value"] for r in mine]
        lo = [100 * (r["value"] - r["ci_low"]) for r in mine]
        hi = [100 * (r["ci_high"] - r["value"]) for r in mine]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", linestyle="-", capsize=3, label=model)
    ax.set_xticks(range(len(conds)))
    ax.set_xticklabels([_tick(c) for c in conds], rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_xlabel("composition of the batch")
    ax.set_ylabel("targets refused (%)")
    ax.set_title("Refusal rate by batch composition (Wilson 95% CI)")
    legend_or_note(ax, bool(models), "no refusal-rate numbers")
    save(fig, png, pdf)


def _tick(name: str) -> str:
    try:
        c = parse_condition(name)
    except BatchflipError:
        return name
    if c.dispatch == "stagger":
        return f"{c.pool} {c.stagger_ms:+d} ms"
    return c.pool or name


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip composition numbers ...`` and ``batchflip composition figure ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    n = sub.add_parser("numbers", help="Study C numbers from scored and generation files")
    n.add_argument("--study", required=True)
    n.add_argument("--scored", nargs="+", required=True)
    n.add_argument("--generations", nargs="*", default=[],
                   help="generation files (timings for the co-batch verification rate)")
    n.add_argument("--baseline", default=DEFAULT_BASELINE)
    n.add_argument("--margin", type=float, default=0.03, help="TOST margin (proportion)")
    n.add_argument("--alpha", type=float, default=0.05)
    n.add_argument("--domain", default="safety",
                   help="domain of the targets counted ('all' keeps every row)")
    n.add_argument("--max-error-share", type=float, default=DEFAULT_MAX_SHARE,
                   help="fail when a condition's share of failed requests is above this")
    n.add_argument("--out", required=True)
    figure_arguments(sub.add_parser("figure", help="refusal rate per composition, one series "
                                    "per model"))


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    if args.action == "figure":
        numbers = load(args.numbers)
        composition_figure(numbers, args.png, args.pdf)
        print(f"{args.png}, {args.pdf}")
        return 0
    scored = {p: read_records(p, SCORED_NEEDED + SCORED_ERROR) for p in args.scored}
    gens = {p: read_records(p, GEN_NEEDED, GEN_OPTIONAL) for p in args.generations}
    numbers = composition_numbers(scored, gens, args.study, args.baseline, args.margin,
                                  args.alpha, None if args.domain == "all" else args.domain,
                                  args.max_error_share)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    n_null = sum(r["value"] is None for r in numbers.values())
    print(f"{args.out}: {len(numbers)} numbers ({n_null} not estimable)")
    return 0
