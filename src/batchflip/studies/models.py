"""Study B (kind ``models``): per-model fragility and output instability across models.

From each model's flip rows (``results/flips/{study}/{model}.parquet``), synchronized
dispatch only (every batch size above the baseline, the paper's 2..32):

- ``{study}/{model}/fragility``: safety flip rate = safety flips / safety rows;
- ``{study}/{model}/instability``: share of outputs not byte-identical to the baseline
  (all domains);
- ``{study}/{model}/capability_flip_rate``;
- ``{study}/all/{safety,capability}_flip_rate`` pooled over models, and their ``ratio``;
  the same for true batching (``list_`` prefix) when the study has list conditions;
- ``{study}/alignment_anova``: one-way ANOVA of per-model fragility by alignment type
  (``models.<m>.alignment``), F with p, eta^2 and degrees of freedom;
- ``{study}/instability_fragility_r``: Pearson r over models with a seeded percentile
  bootstrap interval (resampling models) and the least-squares fit line
  fragility = intercept + slope x instability drawn in the figure;
- ``{study}/all/to_safe`` and ``to_unsafe`` (safety flips toward refusal / toward
  compliance) and ``{study}/all/direction_test``: exact two-sided binomial test of
  to_safe out of all directional flips against 1/2.

Failed requests never reach these numbers: the flips stage leaves them out of every pair.
With ``--scored`` the job also counts them per (model, condition)
(``{study}/{model}/{condition}/error_count``, ``/error_share``; ``batchflip.failures``)
and fails, writing nothing, when a share is above ``--max-error-share`` (config
``errors.max_share``).

A statistic that needs more units than the config has is ``null`` with the note
``not estimable: n = k ...`` (never a number from too few units, never NaN). The figure
(``{study}_models``) is drawn from the numbers file only.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.cli import figure_arguments
from batchflip.errors import BatchflipError
from batchflip.failures import DEFAULT_MAX_SHARE, error_numbers
from batchflip.io import write_json
from batchflip.numbers import REFUSED_AT, load, not_estimable, proportion, ratio, scalar
from batchflip.records import read_records
from batchflip.repeat import without_repeats
from batchflip.stats import anova_by_group, binomial_test, pearson_bootstrap

NEEDED = ["model", "domain", "dispatch", "flip", "direction", "text_changed", "stack_id",
          "baseline_stack_id"]
UNSPECIFIED = "unspecified"
SCORED_NEEDED = ["model", "condition", "prompt_id", "stack_id", "error"]


def flips_by_path(paths: list[str]) -> dict[str, pd.DataFrame]:
    """Flip files by path, with the columns Study B needs (InputError naming a missing one;
    one file with every column: batchflip.flips.read_flips)."""
    return {p: read_records(p, NEEDED) for p in paths}


def model_table(flips: pd.DataFrame, dispatch: str = "sync") -> pd.DataFrame:
    """Per-model counts over one dispatch's flip rows: safety/capability flips and rows,
    changed outputs and rows (index: model, sorted)."""
    df = without_repeats(flips[flips["dispatch"] == dispatch])  # repeat: batchflip.repeat
    safety = df["domain"] == "safety"
    cap = df["domain"] == "capability"
    parts = pd.DataFrame({
        "model": df["model"], "safety_rows": safety, "safety_flips": safety & df["flip"],
        "capability_rows": cap, "capability_flips": cap & df["flip"],
        "rows": True, "changed": df["text_changed"].astype(bool),
        "to_safe": safety & (df["direction"] == "to_safe"),
        "to_unsafe": safety & (df["direction"] == "to_unsafe"),
    })
    return parts.groupby("model", sort=True).sum().astype(int)


def alignment_anova(rates: list[float], groups: list[str], definition: str,
                    inputs: list[str], stacks: list[str]) -> dict[str, Any]:
    """ANOVA record of per-model rates by alignment type, or not estimable with n = k."""
    n, types = len(rates), sorted(set(groups))
    sizes = {t: groups.count(t) for t in types}
    if len(types) < 2 or n <= len(types):
        return not_estimable(f"n = {n} models in {len(types)} alignment type(s); one-way "
                             "ANOVA needs at least 2 types and more models than types",
                             definition, inputs, stacks, n_models=n, group_sizes=sizes)
    try:
        res = anova_by_group(rates, groups)
    except BatchflipError as exc:
        return not_estimable(f"n = {n} models; {exc}", definition, inputs, stacks, n_models=n,
                             group_sizes=sizes)
    return scalar(res.statistic, definition, inputs, stacks, p_value=res.p_value,
                  eta_squared=res.eta_squared, df_between=res.df_between,
                  df_within=res.df_within, n_models=n, group_sizes=sizes)


def instability_fragility(x: list[float], y: list[float], seed: int, n_resamples: int,
                          definition: str, inputs: list[str], stacks: list[str]
                          ) -> dict[str, Any]:
    """Pearson r record (with bootstrap CI and fit line), or not estimable with n = k."""
    n = len(x)
    if n < 3:
        return not_estimable(f"n = {n} models; Pearson r with a bootstrap interval needs at "
                             "least 3", definition, inputs, stacks, n_models=n)
    try:
        res = pearson_bootstrap(x, y, n_resamples=n_resamples, seed=seed)
    except BatchflipError as exc:
        return not_estimable(f"n = {n} models; {exc}", definition, inputs, stacks, n_models=n)
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return scalar(res.r, definition, inputs, stacks, p_value=res.p_value, ci_low=res.low,
                  ci_high=res.high, n_models=n, n_resamples=res.n_resamples,
                  n_degenerate=res.n_degenerate, seed=res.seed, fit_slope=float(slope),
                  fit_intercept=float(intercept))


def _pooled(table: pd.DataFrame, study: str, prefix: str, label: str, inputs: list[str],
            stacks: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    rates = {}
    for domain in ("safety", "capability"):
        k, n = int(table[f"{domain}_flips"].sum()), int(table[f"{domain}_rows"].sum())
        if n == 0:
            continue
        rates[domain] = k / n
        out[f"{study}/all/{prefix}{domain}_flip_rate"] = proportion(
            k, n, f"{domain} flip rate pooled over models, {label}", inputs, stacks,
            domain=domain, model="all")
    if len(rates) == 2:
        out[f"{study}/all/{prefix}ratio"] = ratio(
            rates["safety"], rates["capability"], f"safety flip rate / capability flip rate, "
            f"{label}", inputs, stacks, "capability flip rate is 0", model="all")
    return out


def models_numbers(flips: Mapping[str, pd.DataFrame], alignment: Mapping[str, str],
                    study: str, seed: int, n_resamples: int = 2000
                    ) -> dict[str, dict[str, Any]]:
    """Every Study B number from per-model flip frames (keyed by input path)."""
    inputs = sorted(flips)
    df = pd.concat(flips.values(), ignore_index=True)
    stacks = sorted(set(df["stack_id"]) | set(df["baseline_stack_id"]))
    table = model_table(df, "sync")
    if table.empty:
        raise BatchflipError(f"study {study}: no synchronized-dispatch flip rows in {inputs}")
    label = "synchronized dispatch, every batch size above the baseline"
    numbers: dict[str, dict[str, Any]] = {}
    for model, row in table.to_dict("index").items():
        row = {k: int(v) for k, v in row.items()}
        meta = {"model": model, "alignment": alignment.get(model, UNSPECIFIED)}
        if row["safety_rows"] == 0:
            raise BatchflipError(f"study {study}: model {model} has no safety rows")
        numbers[f"{study}/{model}/fragility"] = proportion(
            row["safety_flips"], row["safety_rows"], f"fragility of {model}: safety flip rate, "
            f"{label}", inputs, stacks, **meta)
        numbers[f"{study}/{model}/instability"] = proportion(
            row["changed"], row["rows"], f"output instability of {model}: share of outputs not "
            f"byte-identical to the baseline, {label}", inputs, stacks, **meta)
        if row["capability_rows"]:
            numbers[f"{study}/{model}/capability_flip_rate"] = proportion(
                row["capability_flips"], row["capability_rows"], f"capability flip rate of "
                f"{model}, {label}", inputs, stacks, **meta)
    numbers |= _pooled(table, study, "", label, inputs, stacks)
    lists = model_table(df, "list")
    if not lists.empty:
        numbers |= _pooled(lists, study, "list_", "true batching (prompt lists) vs its own "
                           "baseline", inputs, stacks)
    fragility = (table["safety_flips"] / table["safety_rows"]).tolist()
    instability = (table["changed"] / table["rows"]).tolist()
    groups = [alignment.get(m, UNSPECIFIED) for m in table.index]
    numbers[f"{study}/alignment_anova"] = alignment_anova(
        fragility, groups, "one-way ANOVA F of per-model fragility by alignment type "
        "(p_value, eta_squared, df_between, df_within alongside)", inputs, stacks)
    numbers[f"{study}/instability_fragility_r"] = instability_fragility(
        instability, fragility, seed, n_resamples, "Pearson r of per-model output instability "
        f"vs fragility; percentile bootstrap 95% interval over models ({n_resamples} "
        f"resamples, seed {seed}); least-squares fit line", inputs, stacks)
    to_safe, to_unsafe = int(table["to_safe"].sum()), int(table["to_unsafe"].sum())
    at = REFUSED_AT
    for name, count, words in (("to_safe", to_safe, f"toward refusal (baseline < {at}, "
                                f"condition >= {at})"),
                               ("to_unsafe", to_unsafe, f"toward compliance (baseline >= {at}, "
                                f"condition < {at})")):
        numbers[f"{study}/all/{name}"] = scalar(count, f"safety flips {words}, {label}, "
                                                "summed over models", inputs, stacks,
                                                model="all")
    n_dir = to_safe + to_unsafe
    definition = ("exact two-sided binomial test of flips toward refusal out of all "
                  "directional safety flips against 1/2 (p value)")
    if n_dir == 0:
        numbers[f"{study}/all/direction_test"] = not_estimable(
            "n = 0 directional flips", definition, inputs, stacks, model="all")
    else:
        res = binomial_test(to_safe, n_dir)
        numbers[f"{study}/all/direction_test"] = scalar(
            res.p_value, definition, inputs, stacks, k=to_safe, n_directional=n_dir,
            model="all")
    return numbers


def models_figure(numbers: Mapping[str, dict[str, Any]], png: str | Path, pdf: str | Path
                  ) -> None:
    """Instability (x, %) vs fragility (y, %) per model, coloured by alignment type, with
    the least-squares fit line when r is estimable (its value and CI in the title)."""
    from batchflip.plotting import plt, save

    points = {}
    for key, rec in numbers.items():
        for kind in ("instability", "fragility"):
            if key.endswith(f"/{kind}") and rec.get("model"):
                points.setdefault(rec["model"], {"alignment": rec.get("alignment")})[kind] = rec
    r_rec = next((v for k, v in numbers.items() if k.endswith("/instability_fragility_r")), {})
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    types = sorted({p["alignment"] or UNSPECIFIED for p in points.values()})
    cmap = plt.get_cmap("tab10")
    for i, t in enumerate(types):
        sel = [(m, p) for m, p in sorted(points.items()) if (p["alignment"] or UNSPECIFIED) == t]
        xs = [100 * p["instability"]["value"] for _, p in sel]
        ys = [100 * p["fragility"]["value"] for _, p in sel]
        yerr = [[100 * (p["fragility"]["value"] - p["fragility"]["ci_low"]) for _, p in sel],
                [100 * (p["fragility"]["ci_high"] - p["fragility"]["value"]) for _, p in sel]]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o", capsize=2, color=cmap(i % 10), label=t)
        for (m, _), x, y in zip(sel, xs, ys, strict=True):
            ax.annotate(m, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if r_rec.get("value") is not None:
        xs = np.linspace(0, max(100 * p["instability"]["value"] for p in points.values()), 50)
        ax.plot(xs, r_rec["fit_intercept"] + r_rec["fit_slope"] * xs, "k--", linewidth=1,
                label="least-squares fit")
        title = (f"r = {r_rec['value']:.3f}, 95% CI [{r_rec['ci_low']:.2f}, "
                 f"{r_rec['ci_high']:.2f}] (bootstrap over models)")
    else:
        title = f"r {r_rec.get('note', 'not estimable')}"
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("output instability: not byte-identical to baseline (%)")
    ax.set_ylabel("fragility: safety flip rate (%)")
    ax.legend(frameon=False, fontsize=7, title="alignment", title_fontsize=7)
    save(fig, png, pdf)


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip models numbers|figure ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    n = sub.add_parser("numbers", help="Study B numbers from per-model flip files")
    n.add_argument("--study", required=True)
    n.add_argument("--flips", nargs="+", required=True)
    n.add_argument("--alignment", action="append", default=[], metavar="MODEL=TYPE")
    n.add_argument("--seed", type=int, required=True, help="bootstrap seed")
    n.add_argument("--resamples", type=int, default=2000)
    n.add_argument("--scored", nargs="*", default=[],
                   help="the study's scored files (to count failed requests)")
    n.add_argument("--max-error-share", type=float, default=DEFAULT_MAX_SHARE,
                   help="fail when a condition's share of failed requests is above this")
    n.add_argument("--out", required=True)
    figure_arguments(sub.add_parser("figure", help="instability vs fragility scatter"))


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    if args.action == "figure":
        models_figure(load(args.numbers), args.png, args.pdf)
        return 0
    alignment = dict(a.split("=", 1) for a in args.alignment)
    scored = {p: read_records(p, SCORED_NEEDED, ["finish_reason"]) for p in args.scored}
    failures = error_numbers(scored, args.study, args.max_error_share)
    numbers = failures | models_numbers(flips_by_path(args.flips), alignment, args.study,
                                         args.seed, args.resamples)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    print(f"{args.out}: {len(numbers)} numbers")
    return 0
