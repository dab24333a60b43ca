"""Study C as the paper analysed it (batchflip.studies.composition_pairs, composition_rows)
on a hand-built frame with known discordant counts per model and composition.

Oracles: scipy.stats.binomtest (exact McNemar = binomial on the discordant pairs, and the
direction test), statsmodels multipletests (Holm), StratifiedTable (Mantel-Haenszel),
proportion_confint (Wilson, Clopper-Pearson), scipy f_oneway (position ANOVA), a hand
computation of the paired difference's 90% interval, and the paper's published 28/31 with
Wilson 95% [75.1%, 96.7%].
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from batchflip.errors import BatchflipError
from batchflip.stats import paired_difference_interval, tost_paired
from batchflip.studies.composition import composition_numbers

MODELS = ["m1", "m2", "m3"]
POOLS = ["solo", "benign", "jailbreak", "mixed", "refusal"]
C = {p: f"cobatch_b8_{p}" for p in POOLS}
SOLO = C["solo"]
N = 60  # safety prompts per model: 0..39 refused alone, 40..59 complied
# per pool: (to_unsafe per model, to_safe per model). Pooled over models: benign 8/9,
# jailbreak 9/10, mixed 11/12 (the paper's three significant conditions), refusal 1/2.
FLIPS = {"benign": ((3, 3, 2), (1, 0, 0)), "jailbreak": ((3, 3, 3), (0, 1, 0)),
         "mixed": ((4, 4, 3), (0, 0, 1)), "refusal": ((1, 0, 0), (0, 0, 1))}
# disjoint prompt blocks per pool, so that the pools' flips never touch the same prompt
OFFSET = {"benign": 0, "jailbreak": 5, "mixed": 10, "refusal": 15}
PAIRS = [("benign", "solo"), ("jailbreak", "solo"), ("mixed", "solo"), ("refusal", "solo"),
         ("benign", "jailbreak"), ("mixed", "benign"), ("mixed", "jailbreak")]
# capability: 10 prompts per model, 0..6 correct alone; (to_wrong, to_correct) under jailbreak
CAP = {"m1": (2, 1), "m2": (0, 0), "m3": (3, 0)}


def _labels() -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for mi, model in enumerate(MODELS):
        solo = (np.arange(N) < 40).astype(float)
        out[(model, "solo")] = solo
        for pool, (unsafe, safe) in FLIPS.items():
            lab = solo.copy()
            o = OFFSET[pool]
            lab[o:o + unsafe[mi]] = 0.0  # refused alone -> complied
            lab[40 + o:40 + o + safe[mi]] = 1.0  # complied alone -> refused
            out[(model, pool)] = lab
    return out


def _frame(pools: list[str] = POOLS, position: bool = True) -> pd.DataFrame:
    rows = []
    for (model, pool), lab in _labels().items():
        if pool not in pools:
            continue
        for i, s in enumerate(lab):
            # filler compositions: the target's slot cycles 0..7; refused more often at 0
            pos = 0 if pool == "solo" else (i * 3 + POOLS.index(pool)) % 8
            rows.append({"model": model, "condition": C[pool], "batch_size": 8,
                         "dispatch": "cobatch", "prompt_id": f"p{i:02d}", "domain": "safety",
                         "score": float(s), "stack_id": f"st-{model}", "position": pos})
    for model, (to_wrong, to_correct) in CAP.items():
        solo = (np.arange(10) < 7).astype(float)
        jb = solo.copy()
        jb[:to_wrong] = 0.0
        jb[7:7 + to_correct] = 1.0
        for pool, lab in (("solo", solo), ("jailbreak", jb)):
            if pool not in pools:
                continue
            rows += [{"model": model, "condition": C[pool], "batch_size": 8,
                      "dispatch": "cobatch", "prompt_id": f"cap{i}", "domain": "capability",
                      "score": float(s), "stack_id": f"st-{model}", "position": i % 8}
                     for i, s in enumerate(lab)]
    df = pd.DataFrame(rows)
    return df if position else df.drop(columns="position")


def _files(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {f"results/scored/c/{m}/{c}.parquet": part.reset_index(drop=True)
            for (m, c), part in df.groupby(["model", "condition"])}


def _discordant(model: str, a: str, b: str) -> tuple[int, int, int]:
    """(refused under b and complied under a, the reverse, n) from the label arrays."""
    lab = _labels()
    x, y = lab[(model, b)] == 1, lab[(model, a)] == 1
    return int((x & ~y).sum()), int((~x & y).sum()), N


@pytest.fixture(scope="module")
def nums() -> dict:
    out = composition_numbers(_files(_frame()), {}, "c", SOLO)
    json.dumps(out, allow_nan=False)
    return out


def test_mcnemar_per_model_and_pair_with_holm_over_21(nums):
    tests = [(m, a, b) for a, b in PAIRS for m in MODELS]
    raw = []
    for m, a, b in tests:
        bb, cc, n = _discordant(m, a, b)
        rec = nums[f"c/{m}/{C[a]}_vs_{C[b]}/mcnemar_p"]
        assert (rec["b"], rec["c"], rec["n"]) == (bb, cc, n)
        assert rec["reference"] == C[b] and rec["condition"] == C[a]
        p = sps.binomtest(bb, bb + cc, 0.5).pvalue if bb + cc else 1.0
        assert rec["value"] == pytest.approx(p, rel=1e-12)
        raw.append(p)
    assert nums["c/all/pair_tests"]["value"] == 21
    assert nums["c/all/pair_tests"]["skipped"] == []
    expected = multipletests(raw, method="holm")[1]
    for (m, a, b), p in zip(tests, expected, strict=True):
        rec = nums[f"c/{m}/{C[a]}_vs_{C[b]}/mcnemar_p_holm"]
        assert rec["value"] == pytest.approx(p, rel=1e-12)
        assert rec["family_size"] == 21 and rec["significant"] == (p < 0.05)
    # the between-filler pairs carry their own counts: benign vs jailbreak for m1
    assert _discordant("m1", "benign", "jailbreak") == (3, 4, N)


def test_mantel_haenszel_per_pair_including_benign_vs_jailbreak(nums):
    lab = _labels()
    for a, b in PAIRS:
        tables = [np.array([[lab[(m, a)].sum(), N - lab[(m, a)].sum()],
                            [lab[(m, b)].sum(), N - lab[(m, b)].sum()]]) for m in MODELS]
        st = StratifiedTable(tables)
        rec = nums[f"c/all/{C[a]}_vs_{C[b]}/mh_odds_ratio"]
        assert rec["value"] == pytest.approx(st.oddsratio_pooled, rel=1e-10)
        assert (rec["low"], rec["high"]) == pytest.approx(st.oddsratio_pooled_confint())
        p = nums[f"c/all/{C[a]}_vs_{C[b]}/mh_p"]["value"]
        assert p == pytest.approx(st.test_null_odds(correction=False).pvalue, rel=1e-10)
        if b == "solo":  # same number as the per-condition MH against the baseline
            assert rec["value"] == pytest.approx(nums[f"c/all/{C[a]}/mh_odds_ratio"]["value"])


def test_direction_per_condition_and_the_papers_28_of_31(nums):
    for pool, (unsafe, safe) in FLIPS.items():
        b, c = sum(unsafe), sum(safe)
        share = nums[f"c/all/{C[pool]}/direction_unsafe_share"]
        assert (share["k"], share["n"]) == (b, b + c)
        wl, wh = proportion_confint(b, b + c, method="wilson")
        cl, ch = proportion_confint(b, b + c, method="beta")
        assert (share["ci_low"], share["ci_high"]) == pytest.approx((wl, wh), abs=1e-12)
        assert (share["cp_low"], share["cp_high"]) == pytest.approx((cl, ch), abs=1e-12)
        assert nums[f"c/all/{C[pool]}/direction_binom_p"]["value"] == pytest.approx(
            sps.binomtest(b, b + c).pvalue, rel=1e-12)
        assert nums[f"c/all/{C[pool]}/direction_to_unsafe"]["value"] == b
    sig = nums["c/all/direction_condition_significant_unsafe_share"]
    assert sig["significant_conditions"] == [C["benign"], C["jailbreak"], C["mixed"]]
    assert (sig["k"], sig["n"]) == (28, 31)
    # the paper's published interval: 28/31, Wilson 95% [75.1%, 96.7%]
    assert (round(100 * sig["ci_low"], 1), round(100 * sig["ci_high"], 1)) == (75.1, 96.7)
    assert nums["c/all/direction_condition_significant_binom_p"]["value"] == pytest.approx(
        sps.binomtest(28, 31).pvalue, rel=1e-12)
    # none of 21 per-model tests survives Holm with so few flips (as in the paper)
    holm_sig = nums["c/all/direction_holm_significant_unsafe_share"]
    assert holm_sig["value"] is None and holm_sig["note"].startswith("not estimable:")
    assert nums["c/all/direction_holm_significant_to_unsafe"]["family_size"] == 21


def test_holm_significant_pool_when_flips_are_many():
    # m1 under jailbreak: 30 prompts refused alone comply -> Holm-significant
    df = _frame()
    hit = (df["model"] == "m1") & (df["condition"] == C["jailbreak"]) & \
        (df["domain"] == "safety") & df["prompt_id"].isin([f"p{i:02d}" for i in range(30)])
    df.loc[hit, "score"] = 0.0
    out = composition_numbers(_files(df), {}, "c", SOLO)
    rec = out["c/all/direction_holm_significant_unsafe_share"]
    assert rec["pairs"] == [f"m1/{C['jailbreak']}"]
    assert (rec["k"], rec["n"]) == (30, 30)


def _wald90(b: int, c: int, n: int) -> tuple[float, float, float]:
    """condition - solo over n pairs, b = to unsafe, c = to safe, by hand from the
    per-pair differences."""
    d = np.array([-1.0] * b + [1.0] * c + [0.0] * (n - b - c))
    z = sps.norm.ppf(0.95)
    half = z * d.std(ddof=0) / math.sqrt(n)
    return d.mean(), d.mean() - half, d.mean() + half


def test_tost_with_the_paired_difference_and_its_90_interval(nums):
    b = sum(sum(u) for u, _ in FLIPS.values())
    c = sum(sum(s) for _, s in FLIPS.values())
    n = 4 * 3 * N
    diff, lo, hi = _wald90(b, c, n)
    rec = nums["c/all/refusal_diff_pp"]
    assert (rec["b"], rec["c"], rec["n"]) == (b, c, n) == (29, 4, 720)
    assert rec["value"] == pytest.approx(100 * diff)
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx((100 * lo, 100 * hi))
    assert rec["confidence"] == pytest.approx(0.90)
    tost = nums["c/all/tost_p"]
    assert tost["value"] == pytest.approx(tost_paired(c, b, n, 0.03).p_value)
    assert (tost["diff_low_pp"], tost["diff_high_pp"]) == pytest.approx((100 * lo, 100 * hi))
    assert tost["estimate_pp"] == pytest.approx(100 * diff)
    for pool, (unsafe, safe) in FLIPS.items():
        d, lo, hi = _wald90(sum(unsafe), sum(safe), 3 * N)
        rec = nums[f"c/all/{C[pool]}/refusal_diff_pp"]
        assert (rec["value"], rec["ci_low"], rec["ci_high"]) == pytest.approx(
            (100 * d, 100 * lo, 100 * hi))
    # the margin is a parameter
    wide = composition_numbers(_files(_frame()), {}, "c", SOLO, margin=0.05)
    assert wide["c/all/tost_p"]["margin_pp"] == pytest.approx(5.0)
    assert wide["c/all/tost_p"]["value"] == pytest.approx(tost_paired(c, b, n, 0.05).p_value)


def test_paired_difference_interval_hand_and_edges():
    for b, c, n in [(82, 54, 5616), (28, 0, 5616), (3, 4, 60), (0, 0, 10)]:
        d, lo, hi = _wald90(c, b, n)  # x - y: b = #(x=1, y=0) counts +1
        iv = paired_difference_interval(b, c, n)
        assert (iv.low, iv.high) == pytest.approx((lo, hi), abs=1e-15)
    # the paper's TOST interval cannot be recomputed from printed inputs (no discordant
    # counts, no method): fidelity marks it so instead of back-solving counts for it
    from batchflip.bundled import PUBLISHED, bundled_path
    from batchflip.fidelity import NOT_REPRODUCIBLE, compute_fidelity, load_published

    doc = compute_fidelity(load_published(bundled_path(PUBLISHED)))
    tost = doc["not_reproducible"]["studyC_tost_interval_pp"]
    assert tost["oracle"] == NOT_REPRODUCIBLE and tost["match"] is None
    assert "studyC_tost_interval_pp" not in doc["numbers"]
    with pytest.raises(BatchflipError):
        paired_difference_interval(1, 1, 0)
    with pytest.raises(BatchflipError):
        paired_difference_interval(3, 3, 5)


def test_capability_rows(nums):
    raw = []
    for model, (to_wrong, to_correct) in CAP.items():
        rec = nums[f"c/{model}/{C['jailbreak']}/capability_mcnemar_p"]
        assert (rec["to_wrong"], rec["to_correct"], rec["n"]) == (to_wrong, to_correct, 10)
        p = sps.binomtest(to_wrong, to_wrong + to_correct).pvalue if to_wrong + to_correct \
            else 1.0
        assert rec["value"] == pytest.approx(p, rel=1e-12)
        raw.append(p)
    for model, p in zip(CAP, multipletests(raw, method="holm")[1], strict=True):
        rec = nums[f"c/{model}/{C['jailbreak']}/capability_mcnemar_p_holm"]
        assert rec["value"] == pytest.approx(p) and rec["family_size"] == 3
    k = sum(7 - w + r for w, r in CAP.values())
    rate = nums[f"c/all/{C['jailbreak']}/capability_correct_rate"]
    assert (rate["k"], rate["n"]) == (k, 30)
    assert (rate["cp_low"], rate["cp_high"]) == pytest.approx(
        proportion_confint(k, 30, method="beta"), abs=1e-12)
    assert nums[f"c/all/{SOLO}/capability_correct_rate"]["k"] == 21
    flips = nums[f"c/all/{C['jailbreak']}/capability_flip_rate"]
    assert (flips["k"], flips["n"]) == (6, 30)
    assert nums[f"c/all/{C['jailbreak']}/capability_mcnemar_p"]["value"] == pytest.approx(
        sps.binomtest(5, 6).pvalue)
    # capability rows never enter the safety numbers, and only solo/jailbreak have them
    assert nums[f"c/m1/{SOLO}/refusal_rate"]["n"] == N
    assert f"c/m1/{C['benign']}/capability_mcnemar_p" not in nums
    no_cap = composition_numbers(_files(_frame()[lambda d: d["domain"] == "safety"]), {}, "c",
                                 SOLO)
    assert no_cap["c/all/capability_missing"]["note"].startswith("not estimable:")


def test_position_anova_matches_scipy(nums):
    df = _frame()
    safety = df[(df["domain"] == "safety") & (df["condition"] != SOLO)]
    for nid, part in (("c/all/position_anova_p", safety),
                      ("c/m2/position_anova_p", safety[safety["model"] == "m2"]),
                      (f"c/all/{C['mixed']}/position_anova_p",
                       safety[safety["condition"] == C["mixed"]])):
        groups = [g["score"].to_numpy() for _, g in part.groupby("position")]
        ref = sps.f_oneway(*groups)
        rec = nums[nid]
        assert rec["value"] == pytest.approx(ref.pvalue, rel=1e-10)
        assert rec["statistic"] == pytest.approx(ref.statistic, rel=1e-10)
        assert rec["n"] == len(part) and rec["df_between"] == 7
        assert sorted(rec["by_position"]) == [str(p) for p in range(8)]


def test_position_anova_not_estimable():
    df = _frame()
    flat = df.assign(score=1.0)
    out = composition_numbers(_files(flat), {}, "c", SOLO)
    assert out["c/all/position_anova_p"]["note"].startswith("not estimable:")
    no_pos = composition_numbers(_files(_frame(position=False)), {}, "c", SOLO)
    assert "no position column" in no_pos["c/all/position_anova_p"]["note"]
    json.dumps(out, allow_nan=False)


def test_pairs_a_config_does_not_run_are_skipped():
    out = composition_numbers(_files(_frame(["solo", "benign", "jailbreak"])), {}, "c", SOLO)
    fam = out["c/all/pair_tests"]
    assert fam["value"] == 9  # 3 pairs x 3 models
    assert fam["skipped"] == ["mixed_vs_solo", "refusal_vs_solo", "mixed_vs_benign",
                              "mixed_vs_jailbreak"]
    assert out[f"c/m1/{C['benign']}_vs_{C['jailbreak']}/mcnemar_p_holm"]["family_size"] == 9
    assert not any("mixed" in k for k in out)
    # a model that did not run a condition has no test of its pairs
    df = _frame(["solo", "benign", "jailbreak"])
    df = df[~((df["model"] == "m3") & (df["condition"] == C["jailbreak"]))]
    out = composition_numbers(_files(df), {}, "c", SOLO)
    assert out["c/all/pair_tests"]["value"] == 7
    assert not any(k.startswith(f"c/m3/{C['jailbreak']}") or
                   k.startswith(f"c/m3/{C['benign']}_vs_{C['jailbreak']}") for k in out)


# ------------------------------------------------- later phases: temporal, 3A, 3B (issue 13)

SIM = "stagger_b8_jailbreak_simultaneous"
# condition -> (reference, {model: (to_unsafe, to_safe)}); 20 prompts, 0..11 refused under
# the reference; the phase conditions run on m1 and m2 (3B on m1 only), as in paper.yaml
PHASE = {
    "cobatch_b8_benign_ph3a": ("cobatch_b8_solo_ph3a", {"m1": (4, 0), "m2": (1, 2)}),
    "cobatch_b8_refusal_ph3a": ("cobatch_b8_solo_ph3a", {"m1": (0, 3), "m2": (0, 0)}),
    "list_b8_jailbreak_ph3b": ("cobatch_b8_jailbreak_ph3b", {"m1": (5, 1)}),
    "stagger_b8_jailbreak_m250": (SIM, {"m1": (2, 0), "m2": (6, 0)}),
    "stagger_b8_jailbreak_minimal_overlap": (SIM, {"m1": (0, 1), "m2": (1, 1)}),
}
FAMILIES = {"phase_3a": ["cobatch_b8_benign_ph3a", "cobatch_b8_refusal_ph3a"],
            "phase_3b": ["list_b8_jailbreak_ph3b"],
            "temporal": ["stagger_b8_jailbreak_m250", "stagger_b8_jailbreak_minimal_overlap"]}


def _phase_frame() -> pd.DataFrame:
    rows = []

    def add(model: str, cond: str, lab: np.ndarray) -> None:
        rows.extend({"model": model, "condition": cond, "batch_size": 8,
                     "dispatch": cond.split("_")[0], "prompt_id": f"q{i:02d}",
                     "domain": "safety", "score": float(s), "stack_id": f"st-{model}",
                     "position": i % 8} for i, s in enumerate(lab))

    ref_lab = (np.arange(20) < 12).astype(float)
    refs = {ref for ref, _ in PHASE.values()}
    for cond, (_ref, flips) in PHASE.items():
        for model, (unsafe, safe) in flips.items():
            lab = ref_lab.copy()
            lab[:unsafe] = 0.0
            lab[12:12 + safe] = 1.0
            add(model, cond, lab)
    for ref in refs:
        for model in ("m1",) if ref.endswith("_ph3b") else ("m1", "m2"):
            add(model, ref, ref_lab)
    return pd.concat([_frame(), pd.DataFrame(rows)], ignore_index=True)


@pytest.fixture(scope="module")
def phase_nums() -> dict:
    out = composition_numbers(_files(_phase_frame()), {}, "c", SOLO)
    json.dumps(out, allow_nan=False)
    return out


def test_phase_pairs_mcnemar_against_their_references_with_holm_per_phase(phase_nums):
    for phase, conds in FAMILIES.items():
        tests = [(m, a, PHASE[a][0]) for a in conds for m in sorted(PHASE[a][1])]
        fam = phase_nums[f"c/all/{phase}/pair_tests"]
        assert fam["value"] == len(tests) and fam["phase"] == phase
        raw = []
        for m, a, ref in tests:
            b, c = PHASE[a][1][m]
            rec = phase_nums[f"c/{m}/{a}_vs_{ref}/mcnemar_p"]
            p = sps.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
            assert rec["value"] == pytest.approx(p)
            assert (rec["b"], rec["c"], rec["n"], rec["reference"]) == (b, c, 20, ref)
            raw.append(p)
        holm = multipletests(raw, method="holm")[1]
        for (m, a, ref), h in zip(tests, holm, strict=True):
            rec = phase_nums[f"c/{m}/{a}_vs_{ref}/mcnemar_p_holm"]
            assert rec["value"] == pytest.approx(h) and rec["family_size"] == len(tests)
            assert rec["phase"] == phase


def test_phase_3b_static_vs_continuous_hand_numbers(phase_nums):
    # m1: 5 to unsafe, 1 to safe of 20 paired targets: exact McNemar p = binomtest(5, 6)
    pre = "c/m1/list_b8_jailbreak_ph3b_vs_cobatch_b8_jailbreak_ph3b"
    assert phase_nums[f"{pre}/mcnemar_p"]["value"] == pytest.approx(
        sps.binomtest(5, 6, 0.5).pvalue) == pytest.approx(0.21875)
    d = "c/all/list_b8_jailbreak_ph3b_vs_cobatch_b8_jailbreak_ph3b/direction"
    assert (phase_nums[f"{d}_to_unsafe"]["value"],
            phase_nums[f"{d}_to_safe"]["value"]) == (5, 1)
    assert phase_nums[f"{d}_binom_p"]["value"] == pytest.approx(0.21875)
    mh = phase_nums["c/all/list_b8_jailbreak_ph3b_vs_cobatch_b8_jailbreak_ph3b/mh_odds_ratio"]
    # static: 12 - 5 + 1 = 8 refused of 20 (models without the phase give empty strata)
    assert [t for t in mh["tables"] if np.sum(t)] == [[[8, 12], [12, 8]]]


def test_phase_3a_pooled_direction_and_rates(phase_nums):
    d = "c/all/cobatch_b8_benign_ph3a_vs_cobatch_b8_solo_ph3a/direction"
    assert (phase_nums[f"{d}_to_unsafe"]["value"],
            phase_nums[f"{d}_to_safe"]["value"]) == (5, 2)
    assert phase_nums[f"{d}_binom_p"]["value"] == pytest.approx(sps.binomtest(5, 7).pvalue)
    rate = phase_nums["c/m1/cobatch_b8_benign_ph3a/refusal_rate"]
    assert rate["value"] == pytest.approx(8 / 20)


def test_tagged_conditions_stay_out_of_the_study_wide_numbers(phase_nums, nums):
    # the composition phase's numbers are unchanged by the tagged phases' rows
    for nid in ("c/all/pair_tests", "c/all/cochran_q_p", "c/all/mh_odds_ratio", "c/all/tost_p",
                "c/all/direction_unsafe_share", "c/m1/cobatch_b8_benign/mcnemar_p_holm"):
        assert phase_nums[nid]["value"] == pytest.approx(nums[nid]["value"]), nid
    assert "c/m1/cobatch_b8_benign_ph3a/mcnemar_p" not in phase_nums
    assert "c/m1/list_b8_jailbreak_ph3b/mcnemar_p" not in phase_nums
    # untagged stagger conditions are still compared with solo as well
    assert "c/m1/stagger_b8_jailbreak_m250/mcnemar_p" in phase_nums
