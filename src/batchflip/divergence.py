"""Divergence: where and why a batch condition's greedy path leaves the baseline's.

Batching perturbs the logits by a tiny amount; greedy decoding changes path at the first
step where the top two tokens were nearly tied. With a study's ``logprobs: k`` (k >= 2)
every generated token carries its log-probability and the top k
(``batchflip.records.LOGPROB_COLUMNS``), and this module measures that mechanism per
(study, model, condition) against the baseline:

- **margin** of a token: top-1 minus top-2 log-probability at that step (0 = a tie; NaN
  when fewer than two alternatives were recorded).
- **divergence index** of a pair: the first token index where the condition's token ids
  differ from the baseline's; when one sequence is a prefix of the other, the shorter
  one's length; none when the ids are identical.
- **divergence margin**: the baseline's margin at the divergence index (NaN when the
  baseline has no token there).
- **noise**: at every index before the divergence (same prefix, same token), the absolute
  difference of the chosen token's log-probability between condition and baseline.

``pair_table`` builds one row per pair of the flips file (failed requests are already left
out there; target rows only); ``numbers`` turns pair tables into a numbers file and
``figure`` draws the divergence margins against the margins of every baseline token. The
screen that ranks prompts from the baseline alone is ``batchflip.screen``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from batchflip.errors import BatchflipError
from batchflip.failures import answered
from batchflip.io import read_parquet, write_json, write_parquet
from batchflip.numbers import Record, not_estimable, proportion, scalar
from batchflip.records import LOGPROB_COLUMNS, read_records
from batchflip.screen import NEAR_TIE_MARGIN, margins, path_margins, screen_numbers

PAIR_COLUMNS = [
    "model", "condition", "baseline_condition", "batch_size", "dispatch", "prompt_id",
    "flip", "text_changed", "tokens_changed", "diverge_index", "baseline_margin",
    "condition_margin", "baseline_len", "condition_len", "noise", "stack_id",
    "baseline_stack_id",
]
GEN_READ = ["model", "condition", "prompt_id", "role", "token_ids", "stack_id", "error",
            "finish_reason", "text"]


def first_divergence(base_ids: Sequence[int], cond_ids: Sequence[int]) -> int | None:
    """First index where the token ids differ; the shorter length when one is a prefix of
    the other; None when they are identical."""
    a, b = np.asarray(base_ids, dtype=np.int64), np.asarray(cond_ids, dtype=np.int64)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    if len(diff):
        return int(diff[0])
    return None if len(a) == len(b) else n


def prefix_noise(base_lp: Sequence[float], cond_lp: Sequence[float], upto: int) -> np.ndarray:
    """|condition - baseline| chosen-token log-probability at indices < ``upto``."""
    n = min(upto, len(base_lp), len(cond_lp))
    return np.abs(np.asarray(cond_lp[:n], dtype=float) - np.asarray(base_lp[:n], dtype=float))


def _at(values: np.ndarray, i: int | None) -> float:
    return float(values[i]) if i is not None and i < len(values) else float("nan")


def pair_row(base: pd.Series, cond: pd.Series) -> dict[str, Any]:
    """The divergence facts of one (baseline row, condition row) pair."""
    b_ids, c_ids = list(base["token_ids"]), list(cond["token_ids"])
    div = first_divergence(b_ids, c_ids)
    upto = min(len(b_ids), len(c_ids)) if div is None else div
    noise = prefix_noise(list(base["token_logprobs"]), list(cond["token_logprobs"]), upto)
    return {"tokens_changed": div is not None, "diverge_index": -1 if div is None else div,
            "baseline_margin": _at(margins(list(base["top_logprobs"])), div),
            "condition_margin": _at(margins(list(cond["top_logprobs"])), div),
            "baseline_len": len(b_ids), "condition_len": len(c_ids), "noise": noise.tolist()}


def pair_table(gens: pd.DataFrame, flips: pd.DataFrame, baseline: str,
               dispatch_baselines: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per pair of ``flips`` (PAIR_COLUMNS), with the token facts of both sides.

    ``gens`` are one model's generation rows with LOGPROB_COLUMNS; failed requests and
    filler rows are dropped. A pair's baseline is its dispatch's own baseline
    (``dispatch_baselines``), else ``baseline``, as in the flips stage.
    """
    missing = [c for c in LOGPROB_COLUMNS if c not in gens.columns]
    if missing:
        raise BatchflipError(f"generation rows lack {missing}: the study needs logprobs: 2")
    own = dict(dispatch_baselines or {})
    rows = answered(gens[gens["role"] == "target"])
    by = {k: g.set_index("prompt_id") for k, g in rows.groupby(["model", "condition"])}
    out = []
    for rec in flips.itertuples(index=False):
        base_cond = own.get(rec.dispatch, baseline)
        base, cond = by.get((rec.model, base_cond)), by.get((rec.model, rec.condition))
        if base is None or cond is None or rec.prompt_id not in base.index \
                or rec.prompt_id not in cond.index:
            raise BatchflipError(f"{rec.model}/{rec.condition}/{rec.prompt_id}: no answered "
                                 f"generation row for the pair (baseline {base_cond})")
        out.append({"model": rec.model, "condition": rec.condition,
                    "baseline_condition": base_cond, "batch_size": rec.batch_size,
                    "dispatch": rec.dispatch, "prompt_id": rec.prompt_id,
                    "flip": bool(rec.flip), "text_changed": bool(rec.text_changed),
                    **pair_row(base.loc[rec.prompt_id], cond.loc[rec.prompt_id]),
                    "stack_id": rec.stack_id, "baseline_stack_id": rec.baseline_stack_id})
    return pd.DataFrame(out, columns=PAIR_COLUMNS)


def quartiles(values: np.ndarray) -> dict[str, float] | None:
    """Median and quartiles of the finite values (None when there are none)."""
    v = values[np.isfinite(values)]
    if not len(v):
        return None
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "n": int(len(v))}


def _dist(prefix: str, what: str, values: np.ndarray, inputs: list[str],
          stacks: list[str]) -> dict[str, Record]:
    q = quartiles(values)
    if q is None:
        return {f"{prefix}_median": not_estimable(f"no {what}", f"median {what}", inputs,
                                                  stacks)}
    return {f"{prefix}_median": scalar(q["median"], f"median {what} (nats)", inputs, stacks,
                                       low=q["q1"], high=q["q3"], n=q["n"],
                                       interval="interquartile range")}


RANK_DEFINITION = ("share of all baseline tokens whose margin is at or below the median "
                   "divergence margin (small: divergences happen at near-ties)")


def numbers(pairs: pd.DataFrame, base_margins: dict[str, np.ndarray], study: str,
            inputs: list[str]) -> dict[str, Record]:
    """Items 2 and 3 of the mechanism per (model, condition): divergence margins, the share
    of text changes at a near-tie, and the pre-divergence noise (median, 99th pct)."""
    out: dict[str, Record] = {}
    for model, part in pairs.groupby("model", sort=True):
        allm = base_margins.get(str(model), np.array([]))
        bstacks = sorted(set(part["baseline_stack_id"]))
        out |= _dist(f"{study}/{model}/baseline_token_margin", "top-1/top-2 margin of every "
                     "baseline token", allm, inputs, bstacks)
        for cond, p in part.groupby("condition", sort=True):
            key, stacks = f"{study}/{model}/{cond}/divergence", sorted(
                set(p["stack_id"]) | set(p["baseline_stack_id"]))
            changed = p[p["text_changed"]]
            out[f"{key}_token_changes"] = proportion(
                int(p["tokens_changed"].sum()), len(p), "share of pairs whose token ids "
                "differ from the baseline's", inputs, stacks)
            out |= _dist(f"{key}_margin", f"baseline margin at the divergence index, pairs "
                         f"whose text changed ({cond})", changed["baseline_margin"].to_numpy(
                             dtype=float), inputs, stacks)
            flipped = changed[changed["flip"]]
            out |= _dist(f"{key}_flip_margin", f"baseline margin at the divergence index, "
                         f"label flips ({cond})", flipped["baseline_margin"].to_numpy(
                             dtype=float), inputs, stacks)
            if len(allm[np.isfinite(allm)]) and len(changed):
                m = changed["baseline_margin"].to_numpy(dtype=float)
                m = m[np.isfinite(m)]
                below = float(np.mean(allm[np.isfinite(allm)] <= np.median(m))) if len(m) \
                    else None
                out[f"{key}_margin_rank"] = scalar(
                    below, RANK_DEFINITION, inputs, stacks,
                    note=None if below is not None else "not estimable")
            else:  # the number is there whatever the data: no value without changes
                out[f"{key}_margin_rank"] = not_estimable(
                    "no pair whose text changed" if not len(changed) else
                    "no baseline token margin", RANK_DEFINITION, inputs, stacks)
            noise = np.concatenate([np.asarray(x, dtype=float) for x in p["noise"]]) \
                if len(p) else np.array([])
            out |= noise_numbers(f"{key}_noise", noise, cond, inputs, stacks)
    return out


def noise_numbers(prefix: str, noise: np.ndarray, cond: str, inputs: list[str],
                  stacks: list[str]) -> dict[str, Record]:
    """Median and 99th percentile of the pre-divergence |log-probability| differences."""
    if not len(noise):
        return {f"{prefix}_median": not_estimable("no shared token before a divergence",
                                                  "median pre-divergence noise", inputs,
                                                  stacks)}
    what = (f"|log p(condition) - log p(baseline)| of the chosen token at indices before "
            f"the divergence ({cond}; nats)")
    return {f"{prefix}_median": scalar(float(np.median(noise)), "median " + what, inputs,
                                       stacks, n=int(len(noise))),
            f"{prefix}_p99": scalar(float(np.quantile(noise, 0.99)), "99th percentile "
                                    + what, inputs, stacks, n=int(len(noise))),
            f"{prefix}_zero": proportion(int((noise == 0).sum()), int(len(noise)),
                                         "share of exactly equal log-probabilities before "
                                         "the divergence", inputs, stacks)}


def figure(pairs: pd.DataFrame, base_margins: np.ndarray, title: str, png: str,
           pdf: str) -> None:
    """ECDFs: the margin of every baseline token, and the baseline margin at the
    divergence index of each condition's text changes (symlog x axis: ties sit at 0)."""
    import matplotlib.pyplot as plt

    from batchflip.plotting import legend_or_note, save

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for label, values, style in [("all baseline tokens", base_margins, dict(color="0.5",
                                                                            lw=2.5))] + [
            (f"{c} (n={int(p['text_changed'].sum())})",
             p.loc[p["text_changed"], "baseline_margin"].to_numpy(dtype=float),
             dict(marker="o", ms=4))
            for c, p in pairs.groupby("condition", sort=True)]:
        v = np.sort(values[np.isfinite(values)])
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label, **style)
            drawn = True
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("top-1 minus top-2 log-probability of the baseline (nats)")
    ax.set_ylabel("cumulative share")
    ax.set_title(title)
    legend_or_note(ax, drawn, "no logprobs recorded")
    save(fig, png, pdf)
    plt.close(fig)


def read_generations(paths: Sequence[str]) -> pd.DataFrame:
    """Generation rows with the token log-probability columns."""
    frames = [read_records(p, GEN_READ + LOGPROB_COLUMNS) for p in paths]
    if not frames:
        raise BatchflipError("no generation files")
    return pd.concat(frames, ignore_index=True)


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip divergence pairs|numbers`` (see the module docstring)."""
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("pairs", help="one model's pairs with their divergence facts")
    p.add_argument("generations", nargs="+")
    p.add_argument("--flips", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--dispatch-baseline", action="append", default=[],
                   metavar="DISPATCH=CONDITION")
    p.add_argument("--out", required=True)
    n = sub.add_parser("numbers", help="a study's divergence, noise and screen numbers")
    n.add_argument("pairs", nargs="+")
    n.add_argument("--screens", nargs="+", required=True,
                   help="ranked lists of the baseline runs (batchflip screen)")
    n.add_argument("--generations", nargs="+", required=True, help="baseline files")
    n.add_argument("--study", required=True)
    n.add_argument("--bootstrap", type=int, default=1000)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--near-tie", type=float, default=NEAR_TIE_MARGIN,
                   help="margin (nats) below which a token is a near-tie (screen)")
    n.add_argument("--out", required=True)
    n.add_argument("--png", required=True)
    n.add_argument("--pdf", required=True)


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    if args.action == "pairs":
        gens = read_generations(args.generations)
        flips = read_parquet(args.flips)
        own = dict(x.split("=", 1) for x in args.dispatch_baseline)
        pairs = pair_table(gens, flips, args.baseline, own)
        write_parquet(pairs, args.out)
        print(f"{args.out}: {len(pairs)} pairs, {int(pairs['tokens_changed'].sum())} with "
              "different tokens")
        return 0
    pairs = pd.concat([read_parquet(p) for p in args.pairs], ignore_index=True)
    base = read_generations(args.generations)
    ranked = pd.concat([pd.read_csv(p, dtype={"prompt_id": str}) for p in args.screens],
                       ignore_index=True)
    inputs = sorted(args.pairs) + sorted(args.screens) + sorted(args.generations)
    paths = path_margins(base)
    all_m: dict[str, list[np.ndarray]] = {}
    for (model, _, _), m in paths.items():
        all_m.setdefault(str(model), []).append(m)
    all_m = {k: np.concatenate(v) for k, v in all_m.items()}
    out = numbers(pairs, all_m, args.study, inputs)
    out |= screen_numbers(pairs, ranked, paths, args.study, inputs, args.bootstrap, args.seed,
                          args.near_tie)
    write_json({"study": f"divergence_{args.study}", "numbers": out}, args.out)
    pooled = np.concatenate(list(all_m.values())) if all_m else np.array([])
    figure(pairs, pooled, f"Study {args.study}: where greedy paths diverge", args.png,
           args.pdf)
    print(f"{args.out}: {len(out)} numbers")
    return 0
