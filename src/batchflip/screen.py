"""The margin screen: which prompts will batching change, from one batch-1 run.

A prompt's **minimum margin** is the smallest top-1 minus top-2 log-probability along its
greedy path in a run with ``logprobs: k`` (k >= 2; ``batchflip.divergence.margins``). The
lower it is, the smaller the logit perturbation that changes the path. ``rank`` orders a
run's prompts by it (lowest first): ``batchflip screen`` writes that list for any engine.

``screen_numbers`` checks the screen against a study's pairs (``batchflip.divergence``),
per model and condition:

- **AUROC** of the baseline's minimum margin (lower = more likely) for predicting a text
  change and a label flip, with a percentile bootstrap 95% interval (resampled prompts,
  fixed seed). 0.5 = no better than chance; ties count one half (Mann-Whitney U).
- **near-tie count** (a second one-run predictor): how many tokens of the baseline's
  greedy path have a margin below ``near_tie`` (config ``divergence.near_tie``, default
  0.1 nats), ties between equal counts broken by the minimum margin (lower = riskier). A
  path with several near-ties offers several chances for a perturbation to win, which the
  minimum alone does not see. Its AUROC (with the same bootstrap interval) is reported
  beside the minimum margin's, with a paired bootstrap interval of the difference
  (near-tie minus minimum margin, the same resampled prompts for both).
- **capture**: the share of all label flips (and text changes) among the lowest-margin
  10% and 25% of prompts.
- **expected counts**: with the condition's pre-divergence noise ε (the empirical
  distribution of |Δ log p|), a prompt changes with probability
  1 - Π_t P(ε <= m_t) over its baseline margins m_t; the sum over prompts is the expected
  number of text changes (beside the observed one). Expected label flips multiply each
  prompt's change probability by the model's share of text changes that flip a label
  (pooled over its conditions), a crude estimate: the noise says when the path changes,
  not whether the label does.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from batchflip.errors import BatchflipError
from batchflip.failures import answered
from batchflip.io import write_text
from batchflip.numbers import Record, not_estimable, proportion, scalar
from batchflip.records import LOGPROB_COLUMNS, read_records

# below this top-1/top-2 margin (nats) a token counts as a near-tie (divergence.near_tie)
NEAR_TIE_MARGIN = 0.1
RANK_COLUMNS = ["rank", "prompt_id", "min_margin", "min_index", "n_tokens", "condition",
                "model", "stack_id"]


def margins(top_logprobs: Sequence[Sequence[float]]) -> np.ndarray:
    """Top-1 minus top-2 log-probability per token (NaN where fewer than two are known)."""
    out = np.full(len(top_logprobs), np.nan)
    for i, top in enumerate(top_logprobs):
        if top is not None and len(top) >= 2:
            out[i] = float(top[0]) - float(top[1])
    return out


def min_margins(gens: pd.DataFrame) -> pd.DataFrame:
    """Per answered target row: its minimum margin (NaN when no token has two
    alternatives), the index where it occurs (-1 then) and its token count."""
    rows = answered(gens[gens["role"] == "target"]).reset_index(drop=True)
    mins, where = [], []
    for top in rows["top_logprobs"]:
        m = margins(list(top))
        ok = np.isfinite(m)
        i = int(np.flatnonzero(ok)[np.argmin(m[ok])]) if ok.any() else -1
        mins.append(float(m[i]) if i >= 0 else float("nan"))
        where.append(i)
    out = rows[["model", "condition", "prompt_id", "stack_id"]].copy()
    out["min_margin"], out["min_index"] = mins, where
    out["n_tokens"] = [len(t) for t in rows["token_ids"]]
    return out


def rank(gens: pd.DataFrame) -> pd.DataFrame:
    """The screen: prompts of a run by minimum margin, lowest first (NaN last; ties by
    prompt id), ranks from 1."""
    mm = min_margins(gens).sort_values(["min_margin", "prompt_id"], na_position="last",
                                       kind="stable").reset_index(drop=True)
    mm["rank"] = np.arange(1, len(mm) + 1)
    return mm[RANK_COLUMNS]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` (higher = positive) for boolean ``labels``
    (Mann-Whitney U / (n1 n0), ties one half); None without both classes."""
    y = np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return None
    r = rankdata(np.asarray(scores, dtype=float))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auroc(scores: np.ndarray, labels: np.ndarray, n_boot: int,
                    seed: int) -> tuple[float, float] | None:
    """Percentile 95% interval of the AUROC over prompts resampled with replacement
    (resamples without both classes are skipped); None when fewer than 100 count."""
    rng = np.random.default_rng(seed)
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(s), len(s))
        a = auroc(s[idx], y[idx])
        if a is not None:
            vals.append(a)
    if len(vals) < min(100, n_boot):
        return None
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def near_ties(path: np.ndarray, near_tie: float) -> int:
    """Tokens of a greedy path whose top-1/top-2 margin is below ``near_tie`` (tokens
    without a margin do not count)."""
    m = np.asarray(path, dtype=float)
    return int((m[np.isfinite(m)] < near_tie).sum())


def near_tie_scores(counts: np.ndarray, min_margin: np.ndarray) -> np.ndarray:
    """The near-tie predictor's score (higher = riskier): the count, with equal counts
    ordered by the minimum margin (lower margin higher); the tie-break adds less than 1."""
    c = np.asarray(counts, dtype=float)
    if not len(c):
        return c
    tie_break = rankdata(-np.asarray(min_margin, dtype=float)) / (len(c) + 1)
    return c + tie_break


def bootstrap_auroc_diff(first: np.ndarray, second: np.ndarray, labels: np.ndarray,
                         n_boot: int, seed: int) -> tuple[float, float] | None:
    """Percentile 95% interval of AUROC(first) - AUROC(second), both on the same prompts
    resampled with replacement (resamples without both classes skipped); None when fewer
    than 100 count."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    y = np.asarray(labels, dtype=bool)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        x1, x2 = auroc(a[idx], y[idx]), auroc(b[idx], y[idx])
        if x1 is not None and x2 is not None:
            vals.append(x1 - x2)
    if len(vals) < min(100, n_boot):
        return None
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def capture(min_margin: np.ndarray, labels: np.ndarray, share: float) -> tuple[int, int]:
    """(positives among the ceil(share * n) lowest-margin prompts, all positives)."""
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(np.asarray(min_margin, dtype=float), kind="stable")
    top = order[: math.ceil(share * len(order))]
    return int(y[top].sum()), int(y.sum())


def change_probability(path_margins: np.ndarray, noise: np.ndarray) -> float:
    """1 - Π_t P(ε <= m_t): the chance that noise drawn from ``noise`` exceeds the margin
    at some step of the path (steps without a margin are skipped)."""
    m = path_margins[np.isfinite(path_margins)]
    if not len(noise) or not len(m):
        return 0.0
    eps = np.sort(np.asarray(noise, dtype=float))
    keep = np.searchsorted(eps, m, side="right") / len(eps)  # P(ε <= m_t)
    return float(1.0 - np.prod(keep))


def path_margins(gens: pd.DataFrame) -> dict[tuple[str, str, str], np.ndarray]:
    """Every answered target's margins along its greedy path, by (model, condition,
    prompt id)."""
    rows = answered(gens[gens["role"] == "target"])
    return {(m, c, p): margins(list(t)) for m, c, p, t in zip(
        rows["model"], rows["condition"], rows["prompt_id"], rows["top_logprobs"],
        strict=True)}


def screen_numbers(pairs: pd.DataFrame, ranked: pd.DataFrame,
                   paths: dict[tuple[str, str, str], np.ndarray], study: str,
                   inputs: list[str], n_boot: int, seed: int,
                   near_tie: float = NEAR_TIE_MARGIN) -> dict[str, Record]:
    """AUROCs (minimum margin and near-tie count), capture shares and expected counts per
    (model, condition): ``ranked`` are the baseline runs' screens (:func:`rank`), ``paths``
    their :func:`path_margins`."""
    mm = ranked.set_index(["model", "condition", "prompt_id"])
    out: dict[str, Record] = {}
    for model, part in pairs.groupby("model", sort=True):
        changed = part["text_changed"].sum()
        q = float(part["flip"].sum() / changed) if changed else 0.0
        for cond, p in part.groupby("condition", sort=True):
            keys = list(zip([model] * len(p), p["baseline_condition"], p["prompt_id"],
                            strict=True))
            m = mm.loc[keys, "min_margin"].to_numpy(dtype=float)
            ok = np.isfinite(m)
            stacks = sorted(set(p["stack_id"]) | set(p["baseline_stack_id"]))
            key = f"{study}/{model}/{cond}/screen"
            counts = np.array([near_ties(paths[k], near_tie) for k in keys])[ok]
            ties = near_tie_scores(counts, m[ok])
            for what, col in (("text", "text_changed"), ("flip", "flip")):
                y = p[col].to_numpy(dtype=bool)[ok]
                out |= _auroc_record(f"{key}_auroc_{what}", -m[ok], y, cond, col, inputs,
                                     stacks, n_boot, seed)
                out |= _auroc_record(
                    f"{key}_near_ties_auroc_{what}", ties, y, cond, col, inputs, stacks,
                    n_boot, seed, predictor=f"near-tie count (margins < {near_tie:g}, equal "
                    "counts ordered by the minimum margin; more = riskier)")
                out |= _diff_record(f"{key}_near_ties_minus_margin_auroc_{what}", ties,
                                    -m[ok], y, cond, col, inputs, stacks, n_boot, seed)
                for share in (0.10, 0.25):
                    k, n = capture(m[ok], y, share)
                    name = f"{key}_capture{int(share * 100)}_{what}"
                    out[name] = proportion(k, n, f"share of {col} pairs ({cond}) among the "
                                           f"lowest-margin {int(share * 100)}% of prompts",
                                           inputs, stacks) if n else not_estimable(
                        f"no {col} pairs", f"capture of {col} pairs", inputs, stacks)
            noise = np.concatenate([np.asarray(x, dtype=float) for x in p["noise"]])
            probs = np.array([change_probability(paths[k], noise) for k in keys])
            what = f"({cond}: Σ over prompts of 1 - Π_t P(noise <= baseline margin))"
            out[f"{key}_expected_text_changes"] = scalar(
                float(probs.sum()), "expected text changes from the noise " + what, inputs,
                stacks, observed=int(p["text_changed"].sum()), n=len(p))
            out[f"{key}_expected_flips"] = scalar(
                float(probs.sum() * q), "expected label flips: expected text changes × "
                "the model's share of text changes that flip a label " + what, inputs,
                stacks, observed=int(p["flip"].sum()), n=len(p))
    return out


def _diff_record(name: str, first: np.ndarray, second: np.ndarray, y: np.ndarray,
                 cond: str, col: str, inputs: list[str], stacks: list[str], n_boot: int,
                 seed: int) -> dict[str, Record]:
    what = (f"AUROC of the near-tie count minus AUROC of the minimum margin for predicting "
            f"{col} under {cond} (same prompts); paired bootstrap 95% interval")
    a, b = auroc(first, y), auroc(second, y)
    if a is None or b is None:
        return {name: not_estimable(f"{int(y.sum())} of {len(y)} pairs are {col}", what,
                                    inputs, stacks)}
    ci = bootstrap_auroc_diff(first, second, y, n_boot, seed)
    extra: dict[str, Any] = {"positives": int(y.sum()), "n": int(len(y))}
    if ci is not None:
        extra.update(ci_low=ci[0], ci_high=ci[1])
    return {name: scalar(a - b, what, inputs, stacks, **extra)}


def _auroc_record(name: str, score: np.ndarray, y: np.ndarray, cond: str, col: str,
                  inputs: list[str], stacks: list[str], n_boot: int, seed: int,
                  predictor: str = "minimum top-1/top-2 margin (lower = riskier)"
                  ) -> dict[str, Record]:
    what = (f"AUROC of the baseline's {predictor} for predicting {col} under {cond}; "
            f"bootstrap 95% interval over prompts")
    a = auroc(score, y)
    if a is None:
        return {name: not_estimable(f"{int(y.sum())} of {len(y)} pairs are {col}", what,
                                    inputs, stacks)}
    ci = bootstrap_auroc(score, y, n_boot, seed)
    extra: dict[str, Any] = {"positives": int(y.sum()), "n": int(len(y))}
    if ci is not None:
        extra.update(ci_low=ci[0], ci_high=ci[1])
    return {name: scalar(a, what, inputs, stacks, **extra)}


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip screen GENERATION --out ranked.csv`` (one batch-1 run)."""
    parser.add_argument("generation", help="a generation parquet recorded with logprobs: 2")
    parser.add_argument("--out", required=True, help="ranked prompt list (CSV)")


def main(args: argparse.Namespace) -> int:
    """Write the ranked prompt list of one run."""
    gens = read_records(args.generation, ["model", "condition", "prompt_id", "role",
                                          "token_ids", "stack_id", "error", "finish_reason",
                                          "text", *LOGPROB_COLUMNS])
    if gens.empty:
        raise BatchflipError(f"{args.generation}: no rows")
    ranked = rank(gens)
    write_text(ranked.to_csv(index=False), args.out)
    print(f"{args.out}: {len(ranked)} prompts ranked; lowest minimum margin "
          f"{ranked['min_margin'].iloc[0]:.4g}")
    return 0
