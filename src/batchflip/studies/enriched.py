"""Enriched subset (a discovery study with ``subset_from``): re-run the boundary-sensitive
prompts of a finished study.

A study with ``subset_from: {study: S, rule: boundary}`` runs only the prompts of its
battery that study S found boundary-sensitive: a prompt is selected when, for any model of
S and any condition (baseline included), its score lies within ``tol`` (0.01, the flip
tolerance) of 0.5, or its flip row says it flipped. The selection is written as a battery
parquet (``results/battery/enriched/{study}.parquet``, rows in battery order) that the
study's generate and score jobs read in place of the full battery.

Its rates are then reported beside the full-set rates of S over the same conditions and
models (``results/numbers/enriched_{study}.json``), with a note: prompts chosen *because*
they sat on a boundary or flipped flip again more often, so the enriched rates are inflated
by the selection and say nothing about the full-set rate (the paper's 187-prompt subset:
1.68% safety vs 0.42% capability, against 0.51% vs 0.14% on the full battery).

CLI: ``batchflip enriched select|compare`` (rules: ``workflow/rules/study_enriched.smk``).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pandas as pd

from batchflip.errors import BatchflipError
from batchflip.flips import FLIP_TOL
from batchflip.io import write_json, write_parquet
from batchflip.numbers import REFUSED_AT, proportion, ratio, scalar
from batchflip.records import BATTERY_COLUMNS, read_records
from batchflip.repeat import without_repeats

RULES = ("boundary",)


def _read(paths: list[str], columns: list[str]) -> pd.DataFrame:
    """``columns`` of every file, concatenated."""
    return pd.concat([read_records(p, columns) for p in paths], ignore_index=True)


def select_boundary(battery: pd.DataFrame, scored: pd.DataFrame, flips: pd.DataFrame,
                    tol: float = FLIP_TOL) -> pd.DataFrame:
    """Battery rows (in order) with a score within ``tol`` of 0.5 (``REFUSED_AT``) or a flip,
    any model or condition. A failed request (null score; batchflip.failures) is never near
    0.5. The repeat control's rows (batchflip.repeat) select nothing: the rule is the
    paper's, over its conditions."""
    scored, flips = without_repeats(scored), without_repeats(flips)
    score = scored["score"].to_numpy(float)
    near = scored.loc[~np.isnan(score) & (np.abs(score - REFUSED_AT) <= tol), "prompt_id"]
    flipped = flips.loc[flips["flip"].astype(bool), "prompt_id"]
    chosen = set(near) | set(flipped)
    unknown = chosen - set(battery["prompt_id"])
    if unknown:
        raise BatchflipError(f"{len(unknown)} selected prompt ids are not in the battery "
                             f"(e.g. '{sorted(unknown)[0]}'): the source study ran another "
                             "battery")
    return battery[battery["prompt_id"].isin(chosen)].reset_index(drop=True)


NOTE = ("selected on boundary sensitivity in study {source} (a score of 0.5 or a flip in any "
        "condition): rates on this subset are inflated by the selection and do not estimate "
        "the full-set rate")


def enriched_numbers(enriched: pd.DataFrame, full: pd.DataFrame, selected: pd.DataFrame,
                     battery_size: int, study: str, source: str, inputs: list[str]
                     ) -> dict[str, dict[str, Any]]:
    """Enriched-subset flip rates beside the source study's full-set rates.

    Both pool every non-baseline condition of the enriched study's flip rows; the full-set
    rows are the source's flip rows of the same conditions and models.
    """
    enriched = without_repeats(enriched)  # the repeat is batchflip.repeat's, not pooled
    if enriched.empty:
        raise BatchflipError(f"study {study}: no flip rows")
    full = full[full["condition"].isin(set(enriched["condition"]))
                & full["model"].isin(set(enriched["model"]))]
    note = NOTE.format(source=source)
    stacks = sorted(set(enriched["stack_id"]) | set(enriched["baseline_stack_id"]))
    full_stacks = sorted(set(full["stack_id"]) | set(full["baseline_stack_id"]))
    conds = ", ".join(sorted(set(enriched["condition"])))
    out: dict[str, dict[str, Any]] = {}
    for domain in ("safety", "capability"):
        e = enriched[enriched["domain"] == domain]
        f = full[full["domain"] == domain]
        n_sel = int((selected["domain"] == domain).sum())
        out[f"{study}/enriched/{domain}_prompts"] = scalar(
            n_sel, f"{domain} prompts selected from study {source} (of {battery_size} battery "
            "prompts in all domains)", inputs, stacks, domain=domain)
        if e.empty:
            continue
        er = proportion(int(e["flip"].sum()), len(e), f"{domain} flip rate on the enriched "
                        f"subset, conditions {conds}", inputs, stacks, note=note,
                        domain=domain, subset="enriched")
        out[f"{study}/enriched/{domain}_flip_rate"] = er
        if f.empty:
            continue
        fr = proportion(int(f["flip"].sum()), len(f), f"{domain} flip rate of study {source} "
                        f"on the full battery, same conditions and models", inputs, full_stacks,
                        domain=domain, subset="full", study=source)
        out[f"{study}/full/{domain}_flip_rate"] = fr
        out[f"{study}/enriched/{domain}_inflation"] = ratio(
            er["value"], fr["value"], f"{domain} enriched-subset flip rate / full-set flip rate",
            inputs, stacks, "the full-set flip rate is 0", domain=domain, selection_note=note)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip enriched select|compare ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("select", help="write the enriched battery of boundary prompts")
    s.add_argument("--battery", required=True, help="the source study's battery parquet")
    s.add_argument("--scored", nargs="+", required=True)
    s.add_argument("--flips", nargs="+", required=True)
    s.add_argument("--rule", choices=RULES, default="boundary")
    s.add_argument("--tol", type=float, default=FLIP_TOL)
    s.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="enriched rates beside the full-set rates")
    c.add_argument("--study", required=True)
    c.add_argument("--source", required=True)
    c.add_argument("--flips", nargs="+", required=True, help="the enriched study's flips")
    c.add_argument("--source-flips", nargs="+", required=True)
    c.add_argument("--selected", required=True, help="the enriched battery")
    c.add_argument("--battery", required=True, help="the full battery")
    c.add_argument("--out", required=True)


FLIP_NEEDED = ["model", "domain", "condition", "prompt_id", "flip", "stack_id",
               "baseline_stack_id"]


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    if args.action == "select":
        battery = read_records(args.battery, BATTERY_COLUMNS)
        chosen = select_boundary(battery, _read(args.scored, ["prompt_id", "score"]),
                                 _read(args.flips, ["prompt_id", "flip"]), args.tol)
        if chosen.empty:
            raise BatchflipError(f"no boundary-sensitive prompts in {args.scored[0]} ...: the "
                                 "enriched study would have nothing to run")
        write_parquet(chosen, args.out)
        print(f"{args.out}: {len(chosen)} of {len(battery)} prompts "
              f"{chosen.groupby('domain').size().to_dict()}")
        return 0
    numbers = enriched_numbers(
        _read(args.flips, FLIP_NEEDED), _read(args.source_flips, FLIP_NEEDED),
        read_records(args.selected, ["domain"]), len(read_records(args.battery, ["prompt_id"])),
        args.study, args.source, sorted([*args.flips, *args.source_flips]))
    write_json({"study": args.study, "numbers": numbers}, args.out)
    print(f"{args.out}: {len(numbers)} numbers")
    return 0
