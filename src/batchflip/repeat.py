"""The repeat control: every condition's changes set against a plain rerun's.

A study's repeat control is its baseline run a second time as a condition of its own
(``<baseline>_repeat``, :mod:`batchflip.conditions`; on server engines on a server start of
its own, :func:`batchflip.layout.server_jobs`). Paired with the baseline like any condition
(:func:`batchflip.flips.pair_flips`), it measures what nothing but rerunning changes: on
vLLM the scheduler's timing can change a text between two runs of the same requests. A
condition's text-change or flip rate is evidence about batching only to the extent that
it clears this noise floor.

Per model (and pooled over models, ``all``), for every condition ``c`` beside the repeat
``R`` of the baseline ``B`` it is paired with (``R = B_repeat``; when its baseline has no
repeat, as ``list_b4`` paired with ``list_b1``, the repeat of the study's baseline), over
the prompts paired under both ``c`` and ``R`` (same model), per domain and over every
domain (``any``):

- ``<s>/<m>/<c>/vs_repeat/<d>/text_change_rate`` and ``/repeat_text_change_rate``: the
  share of those prompts whose text under ``c`` (under ``R``) is not byte-identical to the
  baseline's; ``/flip_rate`` and ``/repeat_flip_rate`` the same for label flips (score
  moved by more than 0.01, :data:`batchflip.flips.FLIP_TOL`);
- ``/text_change_vs_repeat_p`` and ``/flip_vs_repeat_p``: exact McNemar p (two-sided
  binomial on the discordant prompts, :func:`batchflip.stats.mcnemar_exact`) of ``c``
  against ``R``. ``b`` = changed under ``c`` and not under ``R``, ``c`` = the reverse.

Why McNemar and not a two-sample test (Fisher, Boschloo): both rates are measured on the
same prompts (against the same baseline rows, but for a fallback), so the two outcomes of a
prompt are paired
(a prompt near a decision boundary tends to change under both); a two-sample test
treats them as independent samples and misstates the variance. The exact conditional
test on the discordant prompts is the paired analysis the paper uses for flips, and it
stays exact at the small counts a repeat gives (often 0).

The repeat's own rates against the baseline (all its paired prompts) are
``<s>/<m>/<R>/repeat/<d>/text_change_rate`` and ``/flip_rate``. Every record carries
``section: repeat_control``, ``condition``, ``repeat``, ``baseline``, ``model``, ``domain``.
Failed requests are no pairs (:func:`batchflip.failures.answered`, inside ``pair_flips``).
A study without a repeat condition gets one record saying so (not estimable).

CLI::

    batchflip repeat numbers --study a --baseline sync_b1 [--dispatch-baseline list=list_b1]
        --scored S... --out results/numbers/repeat_a.json
"""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from batchflip.conditions import REPEAT, parse_condition
from batchflip.errors import BatchflipError
from batchflip.flips import pair_flips
from batchflip.io import write_json
from batchflip.numbers import Record, not_estimable, proportion, scalar
from batchflip.records import SCORED_COLUMNS, read_records
from batchflip.stats import mcnemar_exact

SECTION = "repeat_control"
ANY = "any"  # the domain label of the numbers over every domain
MEASURES = (("text_changed", "text_change", "text not byte-identical to the baseline's"),
            ("flip", "flip", "label flip (score moved by more than 0.01 from the baseline's)"))


def is_repeat(name: str) -> bool:
    """Whether a condition name is a repeat control (``*_repeat``)."""
    return name.endswith(REPEAT)


def without_repeats(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` whose ``condition`` is not a repeat control: the study numbers
    that pool conditions (fragility, quantization cells, composition families) leave the
    repeat to this module. A frame without a ``condition`` column has no repeat rows."""
    if "condition" not in df.columns:
        return df
    return df[~df["condition"].astype(str).str.endswith(REPEAT)]


def repeat_numbers(scored: dict[str, pd.DataFrame], study: str, baseline: str,
                   dispatch_baselines: dict[str, str] | None = None) -> dict[str, Record]:
    """The repeat-control records of one study from its scored frames (path -> frame)."""
    inputs = sorted(scored)
    frame = pd.concat(scored.values(), ignore_index=True)
    flips = pair_flips(frame, baseline, dispatch_baselines)
    flips = flips.assign(model=flips["model"].astype(str),
                         condition=flips["condition"].astype(str))
    repeats = sorted(c for c in flips["condition"].unique() if is_repeat(c))
    out: dict[str, Record] = {}
    if not repeats:
        out[f"{study}/all/repeat_control"] = not_estimable(
            f"study {study} runs no repeat control (a condition <baseline>{REPEAT})",
            "the repeat control: the baseline generated a second time", inputs, [],
            section=SECTION, model="all")
        return out
    # each condition beside the repeat of the baseline it is paired with, else beside the
    # repeat of the study's baseline (e.g. list_b4, paired with list_b1, beside sync_b1's)
    own = flips.groupby("condition", sort=True)["baseline_condition"].first().to_dict()
    fallback = f"{baseline}{REPEAT}" if f"{baseline}{REPEAT}" in repeats else None
    beside = {c: r for c, b in own.items() if not is_repeat(c)
              and (r := f"{b}{REPEAT}" if f"{b}{REPEAT}" in repeats else fallback)}
    for model in [*sorted(flips["model"].unique()), "all"]:
        rows = flips if model == "all" else flips[flips["model"] == model]
        present = set(rows["condition"])
        for rep in repeats:
            if rep in present:
                out |= _repeat_rates(rows[rows["condition"] == rep], study, model, rep,
                                     own[rep], inputs)
        for cond, rep in sorted(beside.items()):
            if cond in present and rep in present:
                out |= _versus(rows, study, model, cond, rep, own[cond], inputs)
    return out


def _domains(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(ANY, rows), *((str(d), part) for d, part in rows.groupby("domain", sort=True))]


def _stacks(rows: pd.DataFrame) -> list[str]:
    return sorted(set(map(str, rows["stack_id"])) | set(map(str, rows["baseline_stack_id"])))


def _repeat_rates(rows: pd.DataFrame, study: str, model: str, rep: str, base: str,
                  inputs: list[str]) -> dict[str, Record]:
    """The repeat's own text-change and flip rates against the baseline."""
    out: dict[str, Record] = {}
    who = "pooled over models" if model == "all" else f"model {model}"
    for domain, part in _domains(rows):
        meta = _meta(model, rep, rep, base, domain)
        for col, name, what in MEASURES:
            out[f"{study}/{model}/{rep}/repeat/{domain}/{name}_rate"] = proportion(
                int(part[col].sum()), len(part), f"share of prompts with a {what} under the "
                f"repeat control {rep} (the baseline {base} run again), {domain} domain(s), "
                f"{who}", inputs, _stacks(part), **meta)
    return out


def _versus(rows: pd.DataFrame, study: str, model: str, cond: str, rep: str, base: str,
            inputs: list[str]) -> dict[str, Record]:
    """A condition's rates (against its own baseline ``base``) beside the repeat's on their
    common prompts, and the test."""
    keys = ["model", "prompt_id"]
    c_rows = rows[rows["condition"] == cond]
    r_rows = rows[rows["condition"] == rep]
    both = c_rows.merge(r_rows[keys + ["text_changed", "flip", "stack_id"]], on=keys,
                        suffixes=("", "_r"), validate="one_to_one")
    out: dict[str, Record] = {}
    who = "pooled over models" if model == "all" else f"model {model}"
    pre = f"{study}/{model}/{cond}/vs_repeat"
    for domain, part in _domains(both):
        meta = _meta(model, cond, rep, base, domain)
        stacks = sorted(set(_stacks(part)) | set(map(str, part["stack_id_r"])))
        where = (f"{domain} domain(s), {who}, over the {len(part)} prompts paired under "
                 f"both {cond} (with {base}) and {rep} (with {parse_condition(rep).base})")
        for col, name, what in MEASURES:
            x = part[col].to_numpy(bool)
            y = part[col + "_r"].to_numpy(bool)
            out[f"{pre}/{domain}/{name}_rate"] = proportion(
                int(x.sum()), len(part), f"share of prompts with a {what} under {cond}, "
                f"{where}", inputs, stacks, **meta)
            out[f"{pre}/{domain}/repeat_{name}_rate"] = proportion(
                int(y.sum()), len(part), f"share of prompts with a {what} under the repeat "
                f"control {rep}, {where}", inputs, stacks, **meta)
            b, c = int((x & ~y).sum()), int((~x & y).sum())
            p_def = (f"exact McNemar p (two-sided binomial on the discordant prompts) of the "
                     f"{name.replace('_', ' ')} under {cond} against the repeat control "
                     f"{rep}; b = {name.replace('_', ' ')} under {cond} only, c = under "
                     f"{rep} only; {where}")
            fields = {"b": b, "c": c, "n": len(part), "condition_k": int(x.sum()),
                      "repeat_k": int(y.sum()), **meta}
            if b + c == 0:
                out[f"{pre}/{domain}/{name}_vs_repeat_p"] = scalar(
                    1.0, p_def, inputs, stacks, note="no discordant prompt: p = 1", **fields)
            else:
                out[f"{pre}/{domain}/{name}_vs_repeat_p"] = scalar(
                    mcnemar_exact(b, c).p_value, p_def, inputs, stacks, **fields)
    return out


def _meta(model: str, cond: str, rep: str, base: str, domain: str) -> dict[str, Any]:
    return {"section": SECTION, "model": model, "condition": cond, "repeat": rep,
            "baseline": base, "domain": domain}


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip repeat numbers ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    n = sub.add_parser("numbers", help="each condition's text-change and flip rates beside "
                       "the repeat control's, with the exact test")
    n.add_argument("--study", required=True)
    n.add_argument("--baseline", required=True)
    n.add_argument("--dispatch-baseline", action="append", default=[],
                   metavar="DISPATCH=CONDITION")
    n.add_argument("--scored", nargs="+", required=True)
    n.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    """Write one study's repeat-control numbers."""
    own = dict(x.split("=", 1) for x in args.dispatch_baseline)
    scored = {p: read_records(p, SCORED_COLUMNS) for p in args.scored}
    if not scored:
        raise BatchflipError("give the study's scored files (--scored)")
    numbers = repeat_numbers(scored, args.study, args.baseline, own)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    print(f"{args.out}: {len(numbers)} numbers")
    return 0
