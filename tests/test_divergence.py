"""Margins, divergence indices, noise and the screen's statistics on hand-built tokens."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from batchflip.divergence import first_divergence, margins, pair_table, prefix_noise
from batchflip.errors import BatchflipError
from batchflip.screen import (
    auroc,
    bootstrap_auroc,
    capture,
    change_probability,
    min_margins,
    path_margins,
    rank,
    screen_numbers,
)


def test_margins_ties_and_missing() -> None:
    m = margins([[-0.1, -2.1], [-0.7, -0.7], [-0.5], []])
    assert m[0] == pytest.approx(2.0)
    assert m[1] == 0.0  # an exact tie
    assert math.isnan(m[2]) and math.isnan(m[3])


@pytest.mark.parametrize(("a", "b", "want"), [
    ([5, 6, 7], [5, 6, 7], None),       # identical
    ([5, 6, 7], [9, 6, 7], 0),          # divergence at token 0
    ([5, 6, 7], [5, 6, 8], 2),
    ([5, 6, 7], [5, 6], 2),             # unequal lengths, one a prefix of the other
    ([5, 6], [5, 6, 7, 8], 2),
    ([5, 1, 7], [5, 6], 1),             # unequal lengths, a real difference first
    ([], [], None),
    ([], [3], 0),
])
def test_first_divergence(a: list[int], b: list[int], want: int | None) -> None:
    assert first_divergence(a, b) == want


def test_prefix_noise() -> None:
    n = prefix_noise([-0.1, -0.2, -0.3], [-0.15, -0.2, -9.0], 2)
    assert n.tolist() == pytest.approx([0.05, 0.0])
    assert prefix_noise([-0.1], [-0.2, -0.3], 5).tolist() == pytest.approx([0.1])


def _gen(cond: str, pid: str, ids: list[int], lps: list[float], tops: list[list[float]],
         error: str = "", role: str = "target") -> dict:
    return {"model": "m", "condition": cond, "prompt_id": pid, "role": role,
            "token_ids": ids, "token_logprobs": lps, "top_ids": [[0, 1]] * len(ids),
            "top_logprobs": tops, "stack_id": f"s_{cond}", "error": error,
            "finish_reason": "error" if error else "stop", "text": str(ids)}


def _flip(cond: str, pid: str, flip: bool, changed: bool) -> dict:
    return {"model": "m", "condition": cond, "prompt_id": pid, "batch_size": 2,
            "dispatch": "sync", "flip": flip, "text_changed": changed,
            "stack_id": f"s_{cond}", "baseline_stack_id": "s_sync_b1"}


GENS = pd.DataFrame([
    # p1: tie at index 1, the condition takes the other token there
    _gen("sync_b1", "p1", [1, 2, 3], [-0.1, -0.69, -0.2], [[-0.1, -3], [-0.69, -0.69],
                                                          [-0.2, -2]]),
    _gen("sync_b2", "p1", [1, 4, 5], [-0.12, -0.7, -0.3], [[-0.12, -3], [-0.7, -0.7],
                                                          [-0.3, -2]]),
    # p2: identical ids
    _gen("sync_b1", "p2", [7, 8], [-0.01, -0.02], [[-0.01, -5], [-0.02, -4]]),
    _gen("sync_b2", "p2", [7, 8], [-0.01, -0.03], [[-0.01, -5], [-0.03, -4]]),
    # p3: divergence at token 0 (baseline margin 0.5)
    _gen("sync_b1", "p3", [9, 9], [-0.4, -0.1], [[-0.4, -0.9], [-0.1, -3]]),
    _gen("sync_b2", "p3", [8], [-0.45], [[-0.45, -0.5]]),
    # p4: failed on the condition side: no pair in the flips file, no row here
    _gen("sync_b1", "p4", [1], [-0.1], [[-0.1, -2]]),
    _gen("sync_b2", "p4", [], [], [], error="timeout"),
    _gen("sync_b2", "p9", [1], [-0.1], [[-0.1, -2]], role="filler"),
])
FLIPS = pd.DataFrame([_flip("sync_b2", "p1", True, True), _flip("sync_b2", "p2", False, False),
                      _flip("sync_b2", "p3", False, True)])


def test_pair_table() -> None:
    pairs = pair_table(GENS, FLIPS, "sync_b1").set_index("prompt_id")
    assert pairs.loc["p1", "diverge_index"] == 1
    assert pairs.loc["p1", "baseline_margin"] == 0.0
    assert pairs.loc["p1", "noise"] == pytest.approx([0.02])
    assert pairs.loc["p2", "diverge_index"] == -1 and not pairs.loc["p2", "tokens_changed"]
    assert math.isnan(pairs.loc["p2", "baseline_margin"])
    assert pairs.loc["p2", "noise"] == pytest.approx([0.0, 0.01])
    assert pairs.loc["p3", "diverge_index"] == 0
    assert pairs.loc["p3", "baseline_margin"] == pytest.approx(0.5)
    assert pairs.loc["p3", "condition_margin"] == pytest.approx(0.05)
    assert pairs.loc["p3", "noise"] == [] and pairs.loc["p3", "condition_len"] == 1


def test_pair_table_refuses_a_pair_with_an_error_row() -> None:
    flips = pd.concat([FLIPS, pd.DataFrame([_flip("sync_b2", "p4", False, True)])])
    with pytest.raises(BatchflipError, match="p4"):
        pair_table(GENS, flips, "sync_b1")


def test_pair_table_needs_logprobs() -> None:
    with pytest.raises(BatchflipError, match="logprobs"):
        pair_table(GENS.drop(columns=["top_logprobs"]), FLIPS, "sync_b1")


def test_min_margins_and_rank() -> None:
    base = GENS[GENS["condition"] == "sync_b1"]
    mm = min_margins(base).set_index("prompt_id")
    assert "p4" in mm.index and "p9" not in mm.index
    assert mm.loc["p1", "min_margin"] == 0.0 and mm.loc["p1", "min_index"] == 1
    assert mm.loc["p3", "min_margin"] == pytest.approx(0.5)
    r = rank(base)
    assert r["prompt_id"].tolist()[:2] == ["p1", "p3"] and r["rank"].tolist() == [1, 2, 3, 4]
    errs = GENS[GENS["condition"] == "sync_b2"]
    assert "p4" not in set(min_margins(errs)["prompt_id"])  # error rows excluded


def test_auroc_hand_example() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4 -> pairs won: (0.9: 3) + (0.4: 1 + tie 0.5)
    a = auroc(np.array([0.9, 0.4, 0.5, 0.1, 0.4]), np.array([1, 1, 0, 0, 0], dtype=bool))
    assert a == pytest.approx((3 + 1.5) / 6)
    assert auroc(np.array([1.0, 2.0]), np.array([True, True])) is None
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([True, False, False])) == 1.0


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=60), rng.random(60) < 0.3
    lo, hi = bootstrap_auroc(s, y, 300, 7)
    assert (lo, hi) == bootstrap_auroc(s, y, 300, 7)
    assert lo <= auroc(s, y) <= hi


def test_capture_and_change_probability() -> None:
    assert capture(np.array([0.0, 5.0, 0.1, 3.0]), np.array([1, 1, 0, 0], bool), 0.25) == (1, 2)
    assert change_probability(np.array([0.0, 1.0]), np.array([0.0, 0.0])) == 0.0
    # half the noise is > 0.05: a margin of 0.05 changes with p 0.5; two such steps 0.75
    assert change_probability(np.array([0.05, 0.05, np.nan]),
                              np.array([0.0, 0.1])) == pytest.approx(0.75)


def test_screen_numbers() -> None:
    pairs = pair_table(GENS, FLIPS, "sync_b1").assign(baseline_condition="sync_b1")
    base = GENS[GENS["condition"] == "sync_b1"]
    out = screen_numbers(pairs, rank(base), path_margins(base), "a", ["x"], 200, 0)
    assert out["a/m/sync_b2/screen_auroc_flip"]["value"] == 1.0  # p1 has the lowest margin
    assert out["a/m/sync_b2/screen_auroc_text"]["value"] == 1.0
    assert out["a/m/sync_b2/screen_expected_text_changes"]["observed"] == 2


def test_near_ties_count_and_tie_break_by_hand() -> None:
    from batchflip.screen import near_tie_scores, near_ties

    assert near_ties(np.array([0.05, 0.2, np.nan, 0.0, 0.1]), 0.1) == 2  # 0.1 is not < 0.1
    assert near_ties(np.array([np.nan]), 0.1) == 0
    # counts 2, 0, 2, 1 with minimum margins 0.3, 0.01, 0.02, 0.5: the two 2s are ordered by
    # margin (0.02 riskier than 0.3), and every count stays ahead of any lower count
    s = near_tie_scores(np.array([2, 0, 2, 1]), np.array([0.3, 0.01, 0.02, 0.5]))
    assert list(np.argsort(-s)) == [2, 0, 3, 1]
    assert np.all(np.floor(s) == [2, 0, 2, 1])


def test_auroc_agrees_with_scipy_mann_whitney() -> None:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=80), 1)  # rounded: many ties
    y = rng.random(80) < 0.35
    u = mannwhitneyu(s[y], s[~y], alternative="two-sided").statistic
    assert auroc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()), abs=1e-12)


def test_auroc_difference_interval_is_paired() -> None:
    from batchflip.screen import bootstrap_auroc_diff

    rng = np.random.default_rng(5)
    y = rng.random(120) < 0.3
    good = y + rng.normal(scale=0.5, size=120)  # informative
    noise = rng.normal(size=120)  # uninformative
    lo, hi = bootstrap_auroc_diff(good, noise, y, 400, 1)
    assert 0 < lo <= auroc(good, y) - auroc(noise, y) <= hi  # clearly better
    # a predictor against itself: every resample gives exactly 0
    assert bootstrap_auroc_diff(good, good, y, 200, 1) == (0.0, 0.0)
    assert bootstrap_auroc_diff(good, noise, np.zeros(120, bool), 200, 1) is None


def test_screen_numbers_report_the_near_tie_predictor_beside_the_margin() -> None:
    pairs = pair_table(GENS, FLIPS, "sync_b1").assign(baseline_condition="sync_b1")
    base = GENS[GENS["condition"] == "sync_b1"]
    paths = path_margins(base)
    out = screen_numbers(pairs, rank(base), paths, "a", ["x"], 200, 0, near_tie=0.6)
    key = "a/m/sync_b2/screen"
    for what in ("text", "flip"):
        margin = out[f"{key}_auroc_{what}"]["value"]
        ties = out[f"{key}_near_ties_auroc_{what}"]
        assert "margins < 0.6" in ties["definition"]
        diff = out[f"{key}_near_ties_minus_margin_auroc_{what}"]
        assert diff["value"] == pytest.approx(ties["value"] - margin)
    # by hand: baseline margins p1 [2.9, 0, 1.8], p2 [4.99, 3.98], p3 [0.5, 2.9] -> counts
    # below 0.6: 1, 0, 1; scores p1 > p3 (margin 0 < 0.5) > p2; text changed: p1, p3 -> 1.0
    from batchflip.screen import near_ties

    assert {k[2]: near_ties(v, 0.6) for k, v in paths.items()} == {
        "p1": 1, "p2": 0, "p3": 1, "p4": 0}
    assert out[f"{key}_near_ties_auroc_text"]["value"] == 1.0
    assert out[f"{key}_near_ties_auroc_flip"]["value"] == 1.0  # only p1 flipped
    assert out[f"{key}_near_ties_minus_margin_auroc_text"]["value"] == 0.0


def test_margin_rank_is_there_without_a_text_change() -> None:
    """The set of numbers does not depend on the data: a condition whose texts all held
    reports its margin rank as not estimable instead of leaving it out."""
    from batchflip.divergence import numbers as divergence_numbers

    pairs = pair_table(GENS, FLIPS, "sync_b1")
    held = pairs[pairs["prompt_id"] == "p2"].assign(condition="sync_b4")
    both = pd.concat([pairs, held], ignore_index=True)
    base = {"m": np.array([0.0, 0.5, 2.9, 4.9])}
    out = divergence_numbers(both, base, "a", ["x"])
    changed = out["a/m/sync_b2/divergence_margin_rank"]
    # the changed pairs p1, p3 diverge at margins 0.0 and 0.5 (median 0.25); of the 4
    # baseline margins only 0.0 is at or below it
    assert changed["value"] == pytest.approx(0.25)
    held_rank = out["a/m/sync_b4/divergence_margin_rank"]
    assert held_rank["value"] is None
    assert held_rank["note"] == "not estimable: no pair whose text changed"
