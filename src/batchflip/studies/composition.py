"""Study C (kind ``composition``): continuous-batch composition numbers and figure.

Each safety prompt is a *target* served at one batch size under several compositions
(``cobatch_b8_<pool>``) and, optionally, with staggered fillers
(``stagger_b8_<pool>_<m|p><ms>``). Every condition is compared with the baseline
composition (``cobatch_b8_solo`` by default), paired on ``prompt_id`` within a model; a
target is refused when ``score >= 0.5``. Phase-tagged (``_ph<t>``) conditions are compared
with their phase's reference (:mod:`batchflip.studies.composition_pairs`); the repeat
control's comparisons are the repeat numbers (:mod:`batchflip.repeat`); both stay out of
the numbers against the baseline.

``numbers`` writes one JSON of records keyed ``<s>/<m>/<c>/...`` (``all`` = pooled over
models), each with ``model``, ``condition``, ``pool``, ``batch_size``, ``dispatch``,
``stagger_ms`` and ``baseline`` where they apply. Records from wall-clock timings carry
``timing: true``; every other number is a function of the texts. Failed requests are left
out of every rate and pair and counted in ``error_count``/``error_share``; a condition
above ``--max-error-share`` fails the job, writing nothing. A statistic that cannot be
estimated is ``value: null`` with a ``note`` starting "not estimable:", never NaN.

CLI::

    batchflip composition numbers --study c --scored S... --generations G... \\
        --baseline cobatch_b8_solo --out results/numbers/c.json \\
        [--margin 0.03] [--alpha 0.05] [--domain safety] [--max-error-share 0.01]
    batchflip composition figure --numbers results/numbers/c.json \\
        --png results/figures/c_composition.png --pdf results/figures/c_composition.pdf

Number ids and counting rules: docs/studies/c.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.cli import figure_arguments
from batchflip.conditions import parse_condition
from batchflip.errors import BatchflipError
from batchflip.failures import DEFAULT_MAX_SHARE, answered, error_numbers
from batchflip.io import write_json
from batchflip.numbers import REFUSED_AT, Record, load, not_estimable
from batchflip.records import read_records
from batchflip.repeat import is_repeat
from batchflip.studies.composition_base import (
    DEFAULT_BASELINE,
    GEN_NEEDED,
    GEN_OPTIONAL,
    SCORED_ERROR,
    SCORED_NEEDED,
    SCORED_OPTIONAL,
    concat_frames,
    condition_key,
    is_cobatch,
    is_tagged,
    path_index,
)
from batchflip.studies.composition_pairs import pair_numbers, phase_numbers
from batchflip.studies.composition_rows import capability_numbers, position_numbers
from batchflip.studies.composition_stats import (
    StudyView,
    cochran_records,
    direction_numbers,
    holm_records,
    mcnemar_raw,
    mcnemar_records,
    mde_numbers,
    mh_numbers,
    pair_counts,
    pooled_counts,
    refusal_rates,
    tost_records,
)
from batchflip.studies.composition_verify import cobatch_verification as cobatch_verification
from batchflip.studies.composition_verify import verification_numbers


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
    df = concat_frames(scored, SCORED_NEEDED)
    numbers: dict[str, Record] = dict(error_numbers(scored, study, max_error_share)
                                      if scored else {})
    s = _study(scored, _target_rows(df, domain), study, baseline, domain)
    numbers |= refusal_rates(s)
    if not s.base_present:
        numbers[f"{study}/all/baseline_missing"] = not_estimable(
            f"baseline condition '{baseline}' has no scored {domain or ''} rows",
            "paired comparisons against the baseline", s.every_input, [],
            **s.meta("all", None))
    pairs = pair_counts(s)
    raw = mcnemar_raw(s, pairs)
    numbers |= mcnemar_records(s, pairs, raw) | holm_records(s, pairs, raw)
    numbers |= tost_records(s, pairs, margin, alpha)
    numbers |= cochran_records(s) | mh_numbers(s)
    numbers |= mde_numbers(s, pooled_counts(s, pairs))
    numbers |= direction_numbers(s, pairs, raw, alpha) | pair_numbers(s, pairs, alpha)
    numbers |= phase_numbers(s, alpha)
    numbers |= position_numbers(s)
    cap = _target_rows(df, "capability")
    numbers |= capability_numbers(
        _study(scored, cap, study, baseline, "capability") if len(cap) else None, study,
        s.every_input)
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
           domain: str | None) -> StudyView:
    """The shared view of the target rows that every block reads."""
    by_pair = df.groupby(["model", "condition"], sort=True)
    conditions = sorted(df["condition"].unique(), key=condition_key)
    return StudyView(
        study=study, baseline=baseline, domain=domain, df=df,
        wide=df.pivot(index=["model", "prompt_id"], columns="condition", values="refused"),
        spaths=path_index(scored) if scored else {},
        stacks={k: sorted(map(str, v.unique())) for k, v in by_pair["stack_id"]},
        sizes={k: int(v.iloc[0]) for k, v in by_pair["batch_size"]},
        every_input=sorted(set(scored)), models=sorted(df["model"].unique()),
        others=[c for c in conditions
                if c != baseline and not is_tagged(c) and not is_repeat(c)],
        compositions=[c for c in conditions if c == baseline
                      or (is_cobatch(c) and not is_tagged(c) and not is_repeat(c))])


# --------------------------------------------------------------------------- figure


def composition_figure(numbers: dict[str, Record], png: str | Path, pdf: str | Path) -> None:
    """Refusal rate (%) per composition with Wilson 95% intervals, one series per model."""
    from batchflip.plotting import legend_or_note, plt, save

    recs = [r for nid, r in numbers.items() if nid.endswith("/refusal_rate")
            and r.get("model") not in (None, "all") and r.get("condition")
            and r.get("value") is not None]
    conds = sorted({r["condition"] for r in recs},
                   key=lambda c: (not any(r.get("is_baseline") for r in recs
                                          if r["condition"] == c), condition_key(c)))
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
        label = f"{c.pool} {c.stagger_ms:+d} ms" if c.timing == "offset" else \
            f"{c.pool} {c.timing}"
    else:
        label = f"{c.pool} static" if c.dispatch == "list" else c.pool or name
    return f"{label} ({c.phase})" if c.phase else label


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
    scored = {p: read_records(p, SCORED_NEEDED + SCORED_ERROR, SCORED_OPTIONAL)
              for p in args.scored}
    gens = {p: read_records(p, GEN_NEEDED, GEN_OPTIONAL) for p in args.generations}
    numbers = composition_numbers(scored, gens, args.study, args.baseline, args.margin,
                                  args.alpha, None if args.domain == "all" else args.domain,
                                  args.max_error_share)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    n_null = sum(r["value"] is None for r in numbers.values())
    print(f"{args.out}: {len(numbers)} numbers ({n_null} not estimable)")
    return 0
