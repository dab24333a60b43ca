"""Study D (kind ``ablation``): kernel-mode ablation of a discovery study's label flips.

The candidates are the conditioned rows of a *source* discovery study whose label flipped
(``flip == True`` in ``results/flips/{source}/{model}.parquet``). Each is re-run *alone*
and *in group* (its original group, reconstructed exactly from the generation records)
under one kernel mode (a wildcard: ``standard`` or ``batch_invariant``), with the source's
engine, seed, dtype, max tokens, threads and prompt format. Per candidate and mode: label
flip = scores differ by more than 0.01, text change = responses not byte-identical. Failed
reruns are left out of every rate and pair; a share above ``--max-error-share`` fails the
numbers job, writing nothing. Numbers hold no timings and reproduce byte for byte.

Actions of ``batchflip ablation`` (the rules in ``workflow/rules/study_ablation.smk`` call them)::

    candidates --flips F --generations G... --baseline sync_b1 [--dispatch-baseline list=list_b1]
               --out results/ablation/{study}/{model}/candidates.parquet
    generate   --candidates C --battery B --params JSON --model-dir D --kernel-mode M
               --out results/ablation/{study}/{model}/{M}/{key}.parquet --stack-out ...
               [--key KEY --reuse]
    numbers    --study d --source a --candidates C... --runs R... --stacks S... --battery B
               --versions JSON --out results/numbers/{study}.json --rows-out rows.parquet
    figure     --numbers N --png P --pdf Q

Reruns and number ids: docs/studies/d.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from batchflip.cli import figure_arguments
from batchflip.errors import BatchflipError, InputError
from batchflip.failures import DEFAULT_MAX_SHARE, error_numbers
from batchflip.flips import FLIP_TOL
from batchflip.io import write_json, write_parquet
from batchflip.numbers import (
    REFUSED_AT,
    Record,
    load,
    not_estimable,
    proportion_or_none,
    scalar,
)
from batchflip.records import BATTERY_COLUMNS, read_records
from batchflip.settings import KERNEL_MODES, GenerationSettings
from batchflip.stats import mcnemar_exact, paired_counts
from batchflip.studies.ablation_runs import (
    CANDIDATE_COLUMNS,
    CANDIDATE_SETS,
    FLIP_NEEDED,
    GEN_NEEDED,
    MIN_LABEL_FLIPS,
    RUN_COLUMNS,
    RUNS,
    RerunStats,
    alone_condition,
    compare_runs,
    condition_of,
    members_of,
    reconstruct_group,
    rerun_candidates,
    run_mode,
    score_runs,
    select_candidates,
)

__all__ = [
    "CANDIDATE_COLUMNS", "CANDIDATE_SETS", "FACETS", "FLIP_NEEDED", "GEN_NEEDED",
    "MIN_LABEL_FLIPS", "MODES",
    "RUNS", "RUN_COLUMNS", "RerunStats", "ablation_figure", "ablation_numbers",
    "alone_condition", "compare_runs", "condition_of", "configure", "main", "mcnemar_block",
    "members_of", "mode_block", "reconstruct_group", "rerun_candidates", "run_mode",
    "score_runs", "select_candidates",
]

FACETS = ("domain", "task", "dispatch", "direction")
MODES = KERNEL_MODES  # in figure and table order


# --------------------------------------------------------------------------- numbers


def mode_block(rows: pd.DataFrame, prefix: str, label: str, inputs: list[str],
               stacks: list[str], empty: str, meta: dict[str, Any],
               full: bool = True) -> dict[str, Record]:
    """Label flip and text change rates of one slice (one mode); with ``full`` also the
    directions and the reproduction shares."""
    n = len(rows)
    out = {
        f"{prefix}/label_flip_rate": proportion_or_none(
            int(rows["label_flip"].sum()), n, f"share of candidates whose label differs "
            f"(score difference > {FLIP_TOL}) between the alone and the in-group rerun, "
            f"{label}", inputs, stacks, empty, zero_n=True, **meta),
        f"{prefix}/text_change_rate": proportion_or_none(
            int(rows["text_change"].sum()), n, "share of candidates whose in-group response "
            f"is not byte-identical to the alone response, {label}", inputs, stacks, empty,
            zero_n=True, **meta),
    }
    if not full:
        return out
    for way in ("to_unsafe", "to_safe"):
        out[f"{prefix}/label_{way}"] = scalar(
            int((rows["label_flip"] & (rows["ablation_direction"] == way)).sum()),
            f"count of candidate label flips {way.replace('_', ' ')} (alone score >= "
            f"{REFUSED_AT} and in-group < {REFUSED_AT} for to unsafe; the reverse for to safe), "
            f"{label}", inputs, stacks, n=n, **meta)
    out[f"{prefix}/group_reproduces_source"] = proportion_or_none(
        int(rows["group_reproduces_source"].sum()), n, "share of candidates whose in-group "
        "rerun text is byte-identical to the source condition's text, " + label, inputs,
        stacks, empty, zero_n=True, **meta)
    known = rows[rows["alone_reproduces_baseline"].notna()]
    out[f"{prefix}/alone_reproduces_baseline"] = proportion_or_none(
        int(known["alone_reproduces_baseline"].astype(bool).sum()), len(known),
        "share of candidates whose alone rerun text is byte-identical to the source "
        "baseline's text, " + label, inputs, stacks,
        empty if n == 0 else "no source baseline text was given", zero_n=True, **meta)
    return out


def mcnemar_block(rows: pd.DataFrame, prefix: str, m1: str, m2: str, label: str,
                  inputs: list[str], stacks: list[str], empty: str,
                  meta: dict[str, Any]) -> dict[str, Record]:
    """Exact McNemar between two modes, paired on candidates, for labels and for text."""
    pair_on = ["model", "candidate_id"]
    a = rows[rows["kernel_mode"] == m1].set_index(pair_on).sort_index()
    b = rows[rows["kernel_mode"] == m2].set_index(pair_on).sort_index()
    common = a.index.intersection(b.index)  # a candidate failed under one mode has no pair
    a, b = a.loc[common], b.loc[common]
    out: dict[str, Record] = {}
    for what, col in (("label", "label_flip"), ("text", "text_change")):
        definition = (f"exact McNemar p (two-sided binomial on discordant candidates) of "
                      f"{col.replace('_', ' ')} under {m1} vs {m2}; b = only under {m1}, "
                      f"c = only under {m2}; {label}")
        key = f"{prefix}/{m1}_vs_{m2}/{what}_mcnemar_p"
        if len(a) == 0:
            out[key] = not_estimable(empty, definition, inputs, stacks, n=0, **meta)
            continue
        pc = paired_counts(a[col].to_numpy(bool), b.loc[a.index, col].to_numpy(bool))
        test = mcnemar_exact(pc.b, pc.c)
        out[key] = scalar(test.p_value, definition, inputs, stacks, b=pc.b, c=pc.c, n=pc.n,
                          statistic=test.statistic, **meta)
    return out


def ablation_numbers(candidates: pd.DataFrame, compared: pd.DataFrame, study: str,
                     modes: list[str], inputs: list[str], stacks: dict[tuple[str, str], str],
                     source_study: str = "") -> dict[str, Record]:
    """Every Study D number from the compared rows (``compare_runs``).

    ``stacks`` maps (model, kernel mode) to the run file's stack id; ``inputs`` are the
    candidate and run files. Models with no candidates still get their records (n = 0).
    Rows marked ``failed`` (a failed rerun) are left out.
    """
    numbers: dict[str, Record] = {}
    if "failed" in compared.columns:
        compared = compared[~compared["failed"].astype(bool)]
    models = sorted({m for m, _ in stacks} | set(candidates["model"].astype(str)))
    for model in [*models, "all"]:
        who = "pooled over models" if model == "all" else f"model {model}"
        cands = candidates if model == "all" else candidates[candidates["model"] == model]
        rows = compared if model == "all" else compared[compared["model"] == model]
        mine = {k: v for k, v in stacks.items() if model in ("all", k[0])}
        every = sorted(set(mine.values()))
        empty = (f"no candidates (source study '{source_study}' has no label flips"
                 f"{'' if model == 'all' else ' for model ' + model})")
        n = len(cands)
        numbers[f"{study}/{model}/n_candidates"] = scalar(
            n, f"candidate rows: label flips of source study '{source_study}', {who}", inputs,
            every, note=empty if n == 0 else None, n=n, model=model,
            by_dispatch={str(k): int(v) for k, v in cands["dispatch"].value_counts().items()},
            by_domain={str(k): int(v) for k, v in cands["domain"].value_counts().items()})
        for mode in modes:
            part = rows[rows["kernel_mode"] == mode]
            st = sorted({v for k, v in mine.items() if k[1] == mode})
            meta = {"model": model, "kernel_mode": mode}
            numbers |= mode_block(part, f"{study}/{model}/{mode}", f"kernel mode {mode}, {who}",
                                  inputs, st, empty, meta)
            if model != "all":
                continue
            for facet in FACETS:
                for level in sorted(cands[facet].astype(str).unique()):
                    sl = part[part[facet].astype(str) == level]
                    numbers |= mode_block(
                        sl, f"{study}/all/{mode}/by_{facet}/{level}",
                        f"kernel mode {mode}, {facet} {level}, {who}", inputs, st, empty,
                        meta | {"facet": facet, "level": level}, full=False)
        for m1, m2 in combinations(modes, 2):
            numbers |= mcnemar_block(rows, f"{study}/{model}", m1, m2, who, inputs, every,
                                     empty, {"model": model, "modes": [m1, m2]})
    return numbers


# --------------------------------------------------------------------------- figure


def ablation_figure(numbers: dict[str, Record], png: str | Path, pdf: str | Path) -> None:
    """Label flips and text changes (%) per kernel mode, pooled, Wilson 95% CI and k/n."""
    from batchflip.plotting import legend_or_note, plt, save

    metrics = [("label_flip_rate", "label flips"), ("text_change_rate", "text changes")]
    modes = [k for k in MODES if any(r.get("kernel_mode") == k for r in numbers.values())]
    modes += sorted({r["kernel_mode"] for r in numbers.values() if r.get("kernel_mode")}
                    - set(modes))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    width = 0.8 / max(len(modes), 1)
    colors = {"standard": "#b2182b", "batch_invariant": "#2166ac"}
    drawn = False
    for i, mode in enumerate(modes):
        for j, (metric, _) in enumerate(metrics):
            rec = next((r for nid, r in numbers.items() if nid.endswith(f"/all/{mode}/{metric}")),
                       None)
            if rec is None or rec.get("value") is None:
                continue
            x = j + (i - (len(modes) - 1) / 2) * width
            y = 100 * rec["value"]
            err = [[y - 100 * rec["ci_low"]], [100 * rec["ci_high"] - y]]
            ax.bar(x, y, width * 0.9, color=colors.get(mode, "#777777"),
                   label=mode if j == 0 else None)
            ax.errorbar(x, y, yerr=err, color="black", capsize=3, linestyle="none")
            ax.annotate(f"{rec['k']}/{rec['n']}", (x, 100 * rec["ci_high"]), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            drawn = True
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m[1] for m in metrics])
    ax.set_ylim(0, 110)
    ax.set_ylabel("candidates, alone vs in group (%)")
    ax.set_title("Kernel ablation of label-flip rows (Wilson 95% CI)")
    legend_or_note(ax, drawn, "no candidates (n = 0)")
    save(fig, png, pdf)


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip ablation {candidates,generate,numbers,figure} ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("candidates", help="label flips with their reconstructed groups")
    c.add_argument("--flips", required=True)
    c.add_argument("--generations", nargs="+", required=True)
    c.add_argument("--baseline", required=True)
    c.add_argument("--dispatch-baseline", action="append", default=[],
                   metavar="DISPATCH=CONDITION")
    c.add_argument("--dispatch", action="append", default=None, metavar="DISPATCH",
                   help="keep only flips of this dispatch mode (repeat; default: all)")
    c.add_argument("--candidates", default="label_flips", choices=CANDIDATE_SETS,
                   help="label_flips (Study D proper), text_changes (every changed text) or "
                        "label_flips_else_text_changes")
    c.add_argument("--min-label-flips", type=int, default=MIN_LABEL_FLIPS,
                   help="label_flips_else_text_changes: fewer label flips than this rerun "
                        "the text changes too (default %(default)s)")
    c.add_argument("--out", required=True)
    g = sub.add_parser("generate", help="rerun candidates alone and in group, one kernel mode")
    g.add_argument("--candidates", required=True)
    g.add_argument("--battery", required=True)
    g.add_argument("--params", required=True, help="source generation settings as JSON")
    g.add_argument("--model-dir", required=True)
    g.add_argument("--kernel-mode", required=True, choices=MODES)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--stack-out", required=True, type=Path)
    g.add_argument("--control-stack", type=Path,
                   help="the standard job's stack fingerprint (the invariance probe's "
                        "negative control, for --kernel-mode batch_invariant)")
    g.add_argument("--key", help="the candidates' content key this job is for (batchflip.keyed)")
    g.add_argument("--reuse", action="store_true",
                   help="copy reruns that earlier keyed files beside --out hold")
    n = sub.add_parser("numbers", help="Study D numbers")
    n.add_argument("--study", required=True)
    n.add_argument("--source", help="the source study (default: from the candidates)")
    n.add_argument("--candidates", nargs="+", required=True)
    n.add_argument("--runs", nargs="+", required=True)
    n.add_argument("--stacks", nargs="+", required=True, help="one per --runs, same order")
    n.add_argument("--battery", required=True)
    n.add_argument("--versions", required=True, help='scorer versions, e.g. {"refusal": 2}')
    n.add_argument("--patterns", help="refusal lexicon (default: the shipped one)")
    n.add_argument("--out", required=True)
    n.add_argument("--rows-out", help="per candidate and mode comparison (parquet)")
    n.add_argument("--max-error-share", type=float, default=DEFAULT_MAX_SHARE,
                   help="fail when a run file's share of failed reruns is above this")
    figure_arguments(sub.add_parser("figure", help="label flips and text changes per kernel "
                                    "mode"))


def _numbers_main(args: argparse.Namespace) -> int:
    if len(args.runs) != len(args.stacks):
        raise BatchflipError("give one --stacks file per --runs file")
    candidates = pd.concat([read_records(p, CANDIDATE_COLUMNS) for p in args.candidates],
                           ignore_index=True)
    battery = read_records(args.battery, BATTERY_COLUMNS)
    versions = json.loads(args.versions)
    scored, stacks, modes, run_frames = [], {}, [], {}
    for run_path, stack_path in zip(args.runs, args.stacks, strict=True):
        runs = read_records(run_path, RUN_COLUMNS)
        run_frames[run_path] = runs
        stack = json.loads(Path(stack_path).read_text())
        mode, sid = stack.get("kernel_mode"), stack.get("stack_id")
        if mode not in MODES or not sid:
            raise InputError(stack_path, "no valid kernel_mode / stack_id", field="kernel_mode")
        if len(runs) and (set(runs["kernel_mode"]) != {mode} or set(runs["stack_id"]) != {sid}):
            raise InputError(run_path, f"rows do not match {stack_path} (kernel mode {mode}, "
                             f"stack {sid})", field="kernel_mode")
        models = sorted(set(runs["model"].astype(str))) or _model_from_path(run_path)
        for model in models:
            stacks[(model, mode)] = sid
        modes += [mode] if mode not in modes else []
        scored.append(score_runs(runs, battery, versions, args.patterns, source=run_path))
    failures = error_numbers(run_frames, args.study, args.max_error_share, key="kernel_mode",
                             unit="candidate reruns (alone and in group)")
    runs_all = pd.concat(scored, ignore_index=True)
    ordered = [m for m in MODES if m in modes]
    compared = compare_runs(candidates, runs_all, ordered, source=", ".join(args.runs))
    src = args.source or ", ".join(sorted(set(candidates["source_study"].astype(str)))) or "?"
    numbers = failures | ablation_numbers(candidates, compared, args.study, ordered,
                                          sorted([*args.candidates, *args.runs]), stacks, src)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    if args.rows_out:
        write_parquet(compared, args.rows_out)
    print(f"{args.out}: {len(numbers)} numbers from {len(candidates)} candidates")
    return 0


def _model_from_path(path: str) -> list[str]:
    """``results/ablation/{study}/{model}/{mode}.parquet`` → [model] (empty run files)."""
    return [Path(path).parent.name]


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "candidates": _candidates_main, "generate": _generate_main,
        "numbers": _numbers_main, "figure": _figure_main,
    }
    return actions[args.action](args)


def _candidates_main(args: argparse.Namespace) -> int:
    flips = read_records(args.flips, FLIP_NEEDED, ["text_changed"])
    gens = {p: read_records(p, GEN_NEEDED) for p in args.generations}
    own = dict(x.split("=", 1) for x in args.dispatch_baseline)
    cands = select_candidates(flips, gens, args.baseline, own, flips_path=args.flips,
                              dispatches=args.dispatch, candidates=args.candidates,
                              min_label_flips=args.min_label_flips)
    write_parquet(cands, args.out)
    print(f"{args.out}: {len(cands)} candidates")
    return 0


def _generate_main(args: argparse.Namespace) -> int:
    from batchflip.gpu_lease import lease_for  # only the rerun job leases a GPU
    from batchflip.invariance_probe import control_outcome
    from batchflip.keyed import candidates_key
    from batchflip.model import check_model_dir  # the generation env's (gguf, torch)

    cands = read_records(args.candidates, CANDIDATE_COLUMNS)
    if args.key and candidates_key(cands) != args.key:
        raise BatchflipError(f"{args.candidates}: content key {candidates_key(cands)}, but this "
                             f"job is for {args.key} (the candidates changed; run again)")
    settings = GenerationSettings.from_json(args.params)
    check_model_dir(args.model_dir, settings.model)
    # a GPU job holds its own device (batchflip.gpu_lease)
    control = None
    if args.control_stack is not None:
        control = control_outcome(json.loads(args.control_stack.read_text()),
                                  args.control_stack)
    with lease_for(settings.replace(kernel_mode=args.kernel_mode)):
        runs, stats = run_mode(cands, read_records(args.battery, BATTERY_COLUMNS), settings,
                               args.model_dir, args.kernel_mode, args.out, args.stack_out,
                               source=args.candidates, control=control,
                               reuse=args.reuse)
    rate = stats.tokens / stats.seconds if stats.seconds else 0.0
    print(f"{args.out}: {len(runs)} runs of {len(cands)} candidates; {stats.groups} "
          f"executions, {stats.tokens} tokens in {stats.seconds:.1f} s ({rate:.1f} tokens/s)")
    return 0


def _figure_main(args: argparse.Namespace) -> int:
    numbers = load(args.numbers)
    ablation_figure(numbers, args.png, args.pdf)
    print(f"{args.png}, {args.pdf}")
    return 0
