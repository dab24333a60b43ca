"""Study A (kind ``discovery``): label flips and output identity by batch condition.

Numbers, for each model and pooled over models ("all"): per condition (and so per batch
size) the safety and capability flip rates, their ratio, flip directions with counts, and
the byte-identical output share, each against the baseline the row was paired with (the
flips' ``baseline_condition``: the study's, or ``dispatch_baselines[dispatch]``). The same
pooled over a phase's batch sizes > 1: ``sync_pooled`` (synchronized dispatch, the paper's
0.51% vs 0.14%) and ``list_pooled`` (true batching vs its list baseline, the paper's 0.8%),
each with the direction test of its safety flips (``safety_direction_unsafe_share``: to
unsafe / directional flips, Wilson and Clopper-Pearson intervals; ``safety_direction_binom_p``:
exact two-sided binomial test against 0.5; not estimable without a directional flip).
A concurrency-capped stream (``conc_c{n}``) is pooled the same way (``conc_pooled``: n > 1
vs its baseline), and a study with conc conditions whose models record a quantization
gets Study A phase 3's quantization x concurrency section (two-way ANOVA, cell refusal
rates, flip rate of each conc_c{n} vs conc_c1 per quantization:
:mod:`batchflip.studies.quantization`, ids ``<study>/<base model>/quant_x_conc/...``).
Where a study has both ``list_b{n}`` and ``sync_b{n}``, the share of rows whose flip flag
agrees between them (``flip_agreement_b{n}``, and ``_bpooled``); for composition
conditions the refusal rate of the targets. Ids look like
``a/<model>/<condition>/safety_flip_rate``.

Failed requests (``batchflip.failures``) are no answers: flips already leave them out, and
refusal rates here do too; ``<study>/<model>/<condition>/error_count`` and ``/error_share``
count them per scored file, and a condition whose share is above ``--max-error-share``
(config ``errors.max_share``) fails the job before anything is written.

Figures (drawn from the numbers file only):

- ``flip_rates``: safety vs capability flip rate by batch size (pooled over models) for
  each batch-size dispatch mode (sync, list; conc by its concurrency cap), with Wilson 95%
  intervals;
- ``identity``: share of outputs byte-identical to the baseline by batch size;
- ``flip_agreement``: share of rows whose flip flag agrees between ``list_b{n}`` and
  ``sync_b{n}`` by batch size, per model and pooled (the paper's Figure 4).

CLI: ``batchflip discovery numbers|figure`` (rules: ``workflow/rules/study_discovery.smk``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pandas as pd

from batchflip.cli import figure_arguments
from batchflip.failures import DEFAULT_MAX_SHARE, answered, error_numbers
from batchflip.flips import read_flips
from batchflip.io import write_json
from batchflip.numbers import REFUSED_AT, load, proportion, ratio, scalar, unsafe_share
from batchflip.records import SCORED_COLUMNS, read_records
from batchflip.repeat import is_repeat, without_repeats
from batchflip.studies.quantization import quant_concurrency_numbers, quant_meta


def _vs(df: pd.DataFrame) -> str:
    """The baseline condition(s) the rows of ``df`` were paired with (flips'
    ``baseline_condition``), e.g. ``list_b1`` or ``sync_b1/list_b1``."""
    return "/".join(sorted(set(df["baseline_condition"].astype(str))))


def _flip_block(df: pd.DataFrame, prefix: str, label: str, inputs: list[str],
                meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rates, ratio, directions and identity share of one slice of flip rows."""
    out: dict[str, dict[str, Any]] = {}
    stacks = sorted(set(df["stack_id"]) | set(df["baseline_stack_id"]))
    rates = {}
    for domain in ("safety", "capability"):
        part = df[df["domain"] == domain]
        if part.empty:
            continue
        k, n = int(part["flip"].sum()), len(part)
        rates[domain] = k / n
        out[f"{prefix}/{domain}_flip_rate"] = proportion(
            k, n, f"{domain} flip rate, {label}: rows whose score differs from the "
            f"baseline by more than 0.01 / {domain} rows", inputs, stacks, domain=domain,
            **meta)
        for direction in ("to_unsafe", "to_safe"):
            out[f"{prefix}/{domain}_{direction}"] = scalar(
                int((part["direction"] == direction).sum()),
                f"count of {domain} flips {direction.replace('_', ' ')}, {label} "
                f"(to unsafe: baseline score >= {REFUSED_AT} and condition < {REFUSED_AT}; to "
                "safe: reverse)",
                inputs, stacks, domain=domain, **meta)
    if "safety" in rates and "capability" in rates:
        out[f"{prefix}/ratio"] = ratio(
            rates["safety"], rates["capability"], f"safety flip rate / capability flip rate, "
            f"{label}", inputs, stacks, "capability flip rate is 0", **meta)
    same = int((~df["text_changed"]).sum())
    out[f"{prefix}/identical_share"] = proportion(
        same, len(df), f"share of outputs byte-identical to the baseline, {label}", inputs,
        stacks, **meta)
    return out


def direction_test(df: pd.DataFrame, prefix: str, label: str, inputs: list[str],
                   meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Direction of the safety flips of one slice: the share that go to unsafe among the
    directional ones (to_unsafe + to_safe; a flip between two safe-side scores has no
    direction), with Wilson and Clopper-Pearson 95% intervals, and the exact two-sided
    binomial test of that share = 0.5. Not estimable when there is no directional flip."""
    part = df[df["domain"] == "safety"]
    if part.empty:
        return {}
    up = int((part["direction"] == "to_unsafe").sum())
    n = up + int((part["direction"] == "to_safe").sum())
    stacks = sorted(set(part["stack_id"]) | set(part["baseline_stack_id"]))
    meta = {**meta, "domain": "safety"}
    share_def = (f"share of the directional safety flips that go to unsafe (to_unsafe / "
                 f"(to_unsafe + to_safe)), {label}; Wilson 95% interval (ci_low, ci_high) and "
                 "Clopper-Pearson 95% interval (cp_low, cp_high)")
    test_def = (f"exact two-sided binomial test of the to-unsafe share of the directional "
                f"safety flips = 0.5, {label}")
    share, test = unsafe_share(up, n, share_def, test_def, inputs, stacks,
                               "no safety flip with a direction", {"to_unsafe": up, "n": n},
                               **({"n": 0} if n == 0 else {}), **meta)
    return {f"{prefix}/safety_direction_unsafe_share": share,
            f"{prefix}/safety_direction_binom_p": test}


# pooled phases: id part, dispatch and what the label says
PHASES = (("sync_pooled", "sync", "synchronized"), ("list_pooled", "list", "true-batching (list)"),
          ("conc_pooled", "conc", "concurrency-capped stream (conc)"))


def flip_agreement(flips: pd.DataFrame, study: str, inputs: list[str]
                   ) -> dict[str, dict[str, Any]]:
    """Share of rows whose flip flag agrees between true batching and synchronized dispatch.

    For each batch size with both ``list_b{n}`` and ``sync_b{n}``, rows are paired on
    (model, prompt id); each flip flag is against its own baseline. Per model and pooled
    (records of one batch size carry ``batch_size``; the pooled ones do not).
    """
    out: dict[str, dict[str, Any]] = {}
    flips = without_repeats(flips)  # a repeat control is no batch size (batchflip.repeat)
    sync = flips[flips["dispatch"] == "sync"]
    lst = flips[flips["dispatch"] == "list"]
    if sync.empty or lst.empty:
        return out
    both = sync.merge(lst, on=["model", "prompt_id", "batch_size"], suffixes=("_s", "_l"))
    for model in [*sorted(both["model"].unique()), "all"]:
        part = both if model == "all" else both[both["model"] == model]
        for bs, grp in [*sorted(part.groupby("batch_size")), ("pooled", part)]:
            if grp.empty:
                continue
            agree = int((grp["flip_s"] == grp["flip_l"]).sum())
            stacks = sorted(set(grp["stack_id_s"]) | set(grp["stack_id_l"]))
            pooled = bs == "pooled"
            pair = ("list_b{n} and sync_b{n}, pooled over the batch sizes n with both"
                    if pooled else f"list_b{bs} and sync_b{bs}")
            bases = "/".join(sorted(set(grp["baseline_condition_l"].astype(str))
                                    | set(grp["baseline_condition_s"].astype(str))))
            out[f"{study}/{model}/flip_agreement_b{bs}"] = proportion(
                agree, len(grp), f"share of rows whose flip flag agrees between {pair} (each "
                f"vs its own baseline: {bases}), "
                f"{'pooled over models' if model == 'all' else 'model ' + model}",
                inputs, stacks, model=model, condition=f"agreement_b{bs}",
                **({} if pooled else {"batch_size": int(bs)}))
    return out


def discovery_numbers(flips: dict[str, pd.DataFrame], scored: dict[str, pd.DataFrame],
                    study: str, baseline: str, max_error_share: float = DEFAULT_MAX_SHARE,
                    quants: dict[str, dict[str, str]] | None = None,
                    ) -> dict[str, dict[str, Any]]:
    """All Study A numbers from per-model flip frames and per-model scored frames.

    ``flips`` and ``scored`` map an input path to its frame (paths become ``inputs``).
    Labels name the baseline each row was paired with (flips' ``baseline_condition``);
    ``baseline`` is the study's, for the composition targets' baseline refusal rate.
    ``quants`` (model -> ``{base, quant}``) gives the quantization x concurrency section
    (:mod:`batchflip.studies.quantization`) where the study has conc conditions.
    Raises BatchflipError when a scored file's failed share is above ``max_error_share``.
    """
    numbers: dict[str, dict[str, Any]] = error_numbers(scored, study, max_error_share)
    all_flips = pd.concat(flips.values(), ignore_index=True)
    flip_paths = sorted(flips)
    models = sorted(all_flips["model"].unique())
    for model in [*models, "all"]:
        mf = all_flips if model == "all" else all_flips[all_flips["model"] == model]
        who = "pooled over models" if model == "all" else f"model {model}"
        for cond, part in mf.groupby("condition", sort=True):
            meta = {"condition": cond, "batch_size": int(part["batch_size"].iloc[0]),
                    "dispatch": part["dispatch"].iloc[0], "model": model,
                    **({"repeat": True} if is_repeat(str(cond)) else {})}
            numbers |= _flip_block(part, f"{study}/{model}/{cond}", f"{cond} vs {_vs(part)}, "
                                   f"{who}", flip_paths, meta)
        for name, dispatch, what in PHASES:
            part = mf[(mf["dispatch"] == dispatch) & (mf["batch_size"] > 1)]
            if part.empty:
                continue
            label = f"all {what} batch sizes > 1 vs {_vs(part)}, {who}"
            meta = {"condition": name, "model": model}
            numbers |= _flip_block(part, f"{study}/{model}/{name}", label, flip_paths, meta)
            numbers |= direction_test(part, f"{study}/{model}/{name}", label, flip_paths, meta)
    numbers |= flip_agreement(all_flips, study, flip_paths)
    all_scored = answered(pd.concat(scored.values(), ignore_index=True))
    numbers |= quant_concurrency_numbers(all_scored, quants or {}, study, sorted(scored))
    comp = all_scored[all_scored["dispatch"].isin(["cobatch", "stagger"])]
    for (model, cond), part in comp.groupby(["model", "condition"], sort=True):
        refused = int((part["score"] >= REFUSED_AT).sum())
        numbers[f"{study}/{model}/{cond}/refusal_rate"] = proportion(
            refused, len(part), f"refusal rate of the targets (score >= {REFUSED_AT}) under "
            f"{cond}, model {model}", sorted(scored), sorted(set(part["stack_id"])), condition=cond,
            batch_size=int(part["batch_size"].iloc[0]), dispatch=part["dispatch"].iloc[0],
            model=model)
        targets = set(part["prompt_id"])
        base = all_scored[(all_scored["model"] == model) & (all_scored["condition"] == baseline)
                          & all_scored["prompt_id"].isin(targets)]
        if len(base):
            numbers[f"{study}/{model}/{cond}/baseline_refusal_rate"] = proportion(
                int((base["score"] >= REFUSED_AT).sum()), len(base), "refusal rate of the same "
                f"targets under {baseline}, model {model}", sorted(scored),
                sorted(set(base["stack_id"])), condition=baseline, model=model)
    return numbers


# --- figures ----------------------------------------------------------------------------


def _series(numbers: dict[str, dict[str, Any]], suffix: str, model: str = "all",
            ) -> dict[str, list[dict[str, Any]]]:
    """Records ending in ``suffix`` for one model, grouped by dispatch, sorted by batch size."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, rec in numbers.items():
        if (key.endswith("/" + suffix) and rec.get("model") == model and "batch_size" in rec
                and not rec.get("repeat")):  # the repeat control is no batch size
            if rec.get("dispatch") in ("sync", "list", "conc"):
                out.setdefault(rec["dispatch"], []).append(rec)
    return {d: sorted(v, key=lambda r: r["batch_size"]) for d, v in sorted(out.items())}


def _errorbar(ax: Any, recs: list[dict[str, Any]], scale: float, **kw: Any) -> None:
    x = [r["batch_size"] for r in recs]
    y = [r["value"] * scale for r in recs]
    lo = [(r["value"] - r["ci_low"]) * scale for r in recs]
    hi = [(r["ci_high"] - r["value"]) * scale for r in recs]
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, **kw)


def flip_rate_figure(numbers: dict[str, dict[str, Any]], png: str, pdf: str) -> None:
    """Safety vs capability flip rate (%) by batch size, per dispatch mode."""
    from batchflip.plotting import COLORS, plt, save

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"sync": "-", "list": "--", "conc": ":"}
    for domain in ("safety", "capability"):
        for dispatch, recs in _series(numbers, f"{domain}_flip_rate").items():
            _errorbar(ax, recs, 100, color=COLORS[domain], linestyle=styles[dispatch],
                      label=f"{domain} ({dispatch})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (conc: requests in flight)")
    ax.set_ylabel("flip rate vs batch size 1 (%)")
    ax.set_title("Label flips by batch size (Wilson 95% CI)")
    ax.legend(frameon=False, fontsize=8)
    save(fig, png, pdf)


def identity_figure(numbers: dict[str, dict[str, Any]], png: str, pdf: str) -> None:
    """Share (%) of outputs byte-identical to batch size 1, by batch size."""
    from batchflip.plotting import plt, save

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for dispatch, recs in _series(numbers, "identical_share").items():
        _errorbar(ax, recs, 100, label=dispatch)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 105)
    ax.set_xlabel("batch size (conc: requests in flight)")
    ax.set_ylabel("byte-identical outputs (%)")
    ax.set_title("Output identity with batch size 1 (Wilson 95% CI)")
    ax.legend(frameon=False, fontsize=8)
    save(fig, png, pdf)


def flip_agreement_figure(numbers: dict[str, dict[str, Any]], png: str, pdf: str) -> None:
    """Share (%) of rows whose flip flag agrees between list_b{n} and sync_b{n}, by batch
    size, one series per model and one pooled over models (the paper's Figure 4). A study
    without such pairs gets a figure that says so."""
    from batchflip.plotting import plt, save

    series: dict[str, list[dict[str, Any]]] = {}
    for key, rec in numbers.items():
        if "/flip_agreement_b" in key and "batch_size" in rec and rec.get("value") is not None:
            series.setdefault(rec["model"], []).append(rec)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    models = sorted(m for m in series if m != "all")
    if len(models) > 1:  # with one model the pooled series is that model's
        models.append("all")
    for model in models:
        recs = sorted(series[model], key=lambda r: r["batch_size"])
        _errorbar(ax, recs, 100, label="pooled over models" if model == "all" else model,
                  **({"color": "black", "linestyle": "--"} if model == "all" else {}))
    if models:
        sizes = sorted({r["batch_size"] for m in models for r in series[m]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.legend(frameon=False, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no batch size has both list_b{n} and sync_b{n}",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 105)
    ax.set_xlabel("batch size")
    ax.set_ylabel("flip agreement, list vs sync (%)")
    ax.set_title("True batching vs synchronized dispatch (Wilson 95% CI)")
    save(fig, png, pdf)


FIGURES = {"flip_rates": flip_rate_figure, "identity": identity_figure,
           "flip_agreement": flip_agreement_figure}


# --- CLI ----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip discovery numbers --study a --baseline sync_b1 --flips F...
    --scored S... [--max-error-share 0.01] --out O`` and ``batchflip discovery figure
    --numbers N --name flip_rates|identity|flip_agreement --png P --pdf Q``."""
    sub = parser.add_subparsers(dest="action", required=True)
    n = sub.add_parser("numbers", help="Study A numbers from flip and scored files")
    n.add_argument("--study", required=True)
    n.add_argument("--baseline", required=True)
    n.add_argument("--flips", nargs="+", required=True)
    n.add_argument("--scored", nargs="+", required=True)
    n.add_argument("--max-error-share", type=float, default=DEFAULT_MAX_SHARE,
                   help="fail when a condition's share of failed requests is above this")
    n.add_argument("--quants", default="{}",
                   help='JSON {model: {"base": ..., "quant": ...}} of the models that record '
                        "a quantization (the quantization x concurrency section)")
    n.add_argument("--out", required=True)
    f = figure_arguments(sub.add_parser("figure", help="one Study A figure"))
    f.add_argument("--name", required=True, choices=sorted(FIGURES))


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    if args.action == "figure":
        FIGURES[args.name](load(args.numbers), args.png, args.pdf)
        return 0
    flips = {p: read_flips(p) for p in args.flips}
    scored = {p: read_records(p, SCORED_COLUMNS) for p in args.scored}
    numbers = discovery_numbers(flips, scored, args.study, args.baseline, args.max_error_share,
                                quant_meta(json.loads(args.quants)))
    write_json({"study": args.study, "numbers": numbers}, args.out)
    print(f"{args.out}: {len(numbers)} numbers")
    return 0
