"""Study C numbers and figure (batchflip.studies.composition) on small hand-built frames.

Every statistic is checked against an independent computation: the Wilson closed form,
brute-force binomial enumeration for McNemar, statsmodels for Holm, Cochran's Q and
Mantel-Haenszel, scipy for the direction test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.stats.contingency_tables import cochrans_q as sm_cochrans_q
from statsmodels.stats.multitest import multipletests

from batchflip.cli import main as cli_main
from batchflip.records import GENERATION_COLUMNS, SCORED_COLUMNS
from batchflip.stats import tost_paired
from batchflip.studies.composition import cobatch_verification, composition_numbers
from batchflip.studies.composition_verify import stagger_overlap

MODELS = ["m1", "m2", "m3"]
SOLO, BENIGN, JAIL = "cobatch_b8_solo", "cobatch_b8_benign", "cobatch_b8_jailbreak"
CONDS = [SOLO, BENIGN, JAIL]
N_PROMPTS = 40


def _scored(seed: int = 7) -> pd.DataFrame:
    """3 models x 40 prompts x 3 compositions; each composition flips a few solo labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for mi, model in enumerate(MODELS):
        solo = (rng.random(N_PROMPTS) < 0.7).astype(float)
        labels = {SOLO: solo}
        for ci, cond in enumerate(CONDS[1:]):
            lab = solo.copy()
            n_flip = 3 + 4 * ci + mi  # 3..8 flips: some pairs strongly unbalanced
            idx = rng.choice(N_PROMPTS, size=n_flip, replace=False)
            lab[idx] = 1.0 - lab[idx]
            labels[cond] = lab
        for cond, lab in labels.items():
            for i, s in enumerate(lab):
                rows.append({"model": model, "condition": cond, "batch_size": 8,
                             "dispatch": "cobatch", "prompt_id": f"p{i:02d}",
                             "task": "harmful", "domain": "safety", "score": float(s),
                             "label": "refused" if s else "complied",
                             "stack_id": f"stack-{model}"})
    # a capability control under solo: must not enter refusal numbers
    rows.append({"model": "m1", "condition": SOLO, "batch_size": 8, "dispatch": "cobatch",
                 "prompt_id": "cap0", "task": "mmlu", "domain": "capability", "score": 0.0,
                 "label": "wrong", "stack_id": "stack-m1"})
    return pd.DataFrame(rows)


def _by_file(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {f"results/scored/c/{m}/{c}.parquet": part.reset_index(drop=True)
            for (m, c), part in df.groupby(["model", "condition"])}


def _wilson(k: int, n: int) -> tuple[float, float]:
    z = sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _pairs(df: pd.DataFrame, model: str, cond: str) -> tuple[int, int, int]:
    s = df[(df["domain"] == "safety") & (df["model"] == model)]
    base = s[s["condition"] == SOLO].set_index("prompt_id")["score"] >= 0.5
    other = s[s["condition"] == cond].set_index("prompt_id")["score"] >= 0.5
    base, other = base.align(other, join="inner")
    return int((base & ~other).sum()), int((~base & other).sum()), len(base)


def _brute_mcnemar(b: int, c: int) -> float:
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, dict]:
    df = _scored()
    return df, composition_numbers(_by_file(df), {}, "c", SOLO)


def test_refusal_rates_and_wilson_bounds(data):
    df, nums = data
    safety = df[df["domain"] == "safety"]
    for model in [*MODELS, "all"]:
        for cond in CONDS:
            part = safety[safety["condition"] == cond]
            if model != "all":
                part = part[part["model"] == model]
            k, n = int((part["score"] >= 0.5).sum()), len(part)
            rec = nums[f"c/{model}/{cond}/refusal_rate"]
            lo, hi = _wilson(k, n)
            assert (rec["k"], rec["n"]) == (k, n)
            assert rec["value"] == pytest.approx(k / n)
            assert rec["ci_low"] == pytest.approx(lo, abs=1e-12)
            assert rec["ci_high"] == pytest.approx(hi, abs=1e-12)
            assert rec["model"] == model and rec["condition"] == cond
            assert rec["pool"] == cond.rsplit("_", 1)[1] and rec["batch_size"] == 8
    assert nums["c/m1/cobatch_b8_solo/refusal_rate"]["n"] == N_PROMPTS  # capability left out
    assert nums["c/m2/cobatch_b8_benign/refusal_rate"]["inputs"] == [
        "results/scored/c/m2/cobatch_b8_benign.parquet"]
    assert nums["c/m2/cobatch_b8_benign/refusal_rate"]["stack_ids"] == ["stack-m2"]


def test_mcnemar_matches_enumeration_and_holm_matches_statsmodels(data):
    df, nums = data
    ids, raw = [], []
    for model in MODELS:
        for cond in CONDS[1:]:
            b, c, n = _pairs(df, model, cond)
            rec = nums[f"c/{model}/{cond}/mcnemar_p"]
            assert (rec["b"], rec["c"], rec["n"]) == (b, c, n) == (b, c, N_PROMPTS)
            assert rec["value"] == pytest.approx(_brute_mcnemar(b, c), rel=1e-12)
            assert nums[f"c/{model}/{cond}/to_unsafe"]["value"] == b
            assert nums[f"c/{model}/{cond}/to_safe"]["value"] == c
            ids.append(f"c/{model}/{cond}")
            raw.append(_brute_mcnemar(b, c))
    expected = multipletests(raw, method="holm")[1]
    for nid, p in zip(ids, expected, strict=True):
        rec = nums[f"{nid}/mcnemar_p_holm"]
        assert rec["value"] == pytest.approx(p, rel=1e-12)
        assert rec["family_size"] == len(ids)
    assert any(p < 1 for p in expected)  # the fixture is not trivially null


def test_cochrans_q_matches_statsmodels(data):
    df, nums = data
    s = df[df["domain"] == "safety"].assign(r=lambda d: (d["score"] >= 0.5).astype(int))
    wide = s.pivot(index=["model", "prompt_id"], columns="condition", values="r")[CONDS]
    ref = sm_cochrans_q(wide.to_numpy())
    rec = nums["c/all/cochran_q_p"]
    assert rec["value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert rec["statistic"] == pytest.approx(ref.statistic, rel=1e-10)
    assert rec["n_subjects"] == 3 * N_PROMPTS and rec["df"] == 2
    one = sm_cochrans_q(wide.loc["m2"].to_numpy())
    assert nums["c/m2/cochran_q_p"]["value"] == pytest.approx(one.pvalue, rel=1e-10)


def _mh_tables(df: pd.DataFrame, conds: list[str]) -> list[np.ndarray]:
    s = df[df["domain"] == "safety"]
    tables = []
    for model in MODELS:
        m = s[s["model"] == model]
        arm = m[m["condition"].isin(conds)]["score"] >= 0.5
        base = m[m["condition"] == SOLO]["score"] >= 0.5
        tables.append(np.array([[arm.sum(), (~arm).sum()], [base.sum(), (~base).sum()]],
                               dtype=float))
    return tables


def test_mantel_haenszel_matches_statsmodels(data):
    df, nums = data
    for conds, nid in (([JAIL], f"c/all/{JAIL}/mh_odds_ratio"),
                       ([BENIGN, JAIL], "c/all/mh_odds_ratio")):
        st = StratifiedTable(_mh_tables(df, conds))
        rec = nums[nid]
        low, high = st.oddsratio_pooled_confint()
        assert rec["value"] == pytest.approx(st.oddsratio_pooled, rel=1e-10)
        assert (rec["low"], rec["high"]) == (pytest.approx(low), pytest.approx(high))
        assert rec["n_strata"] == 3 and "ci_low" not in rec  # not a proportion
        p = nums[nid.replace("mh_odds_ratio", "mh_p")]["value"]
        assert p == pytest.approx(st.test_null_odds(correction=False).pvalue, rel=1e-10)


def test_tost_mde_and_direction(data):
    df, nums = data
    solo = df[(df["domain"] == "safety") & (df["condition"] == SOLO)]
    p_solo = float((solo["score"] >= 0.5).mean())
    tot_b = tot_c = 0
    for cond in CONDS[1:]:
        trip = [_pairs(df, m, cond) for m in MODELS]
        b, c, n = (sum(t[i] for t in trip) for i in range(3))
        tot_b, tot_c = tot_b + b, tot_c + c
        rec = nums[f"c/all/{cond}/tost_p"]
        ref = tost_paired(c, b, n, 0.03)
        assert rec["value"] == pytest.approx(ref.p_value)
        rate = {k: nums[f"c/all/{k}/refusal_rate"]["value"] for k in (cond, SOLO)}
        assert rec["estimate_pp"] == pytest.approx(100 * (rate[cond] - rate[SOLO]))
        assert rec["margin_pp"] == pytest.approx(3.0)
        mde = 100 * (1.96 + 0.842) * math.sqrt(2 * p_solo * (1 - p_solo) / n)
        assert nums[f"c/all/{cond}/mde_pp"]["value"] == pytest.approx(mde)
    assert nums["c/all/mde_pp"]["n"] == 3 * N_PROMPTS
    assert nums["c/all/mde_pp"]["p"] == pytest.approx(p_solo)
    assert nums["c/all/direction_to_unsafe"]["value"] == tot_b
    assert nums["c/all/direction_to_safe"]["value"] == tot_c
    share = nums["c/all/direction_unsafe_share"]
    assert (share["k"], share["n"]) == (tot_b, tot_b + tot_c)
    assert (share["ci_low"], share["ci_high"]) == pytest.approx(_wilson(tot_b, tot_b + tot_c))
    assert nums["c/all/direction_binom_p"]["value"] == pytest.approx(
        sps.binomtest(tot_b, tot_b + tot_c, 0.5).pvalue)


def _gen_rows(model: str, cond: str, group: int, target: tuple[float, float],
              fillers: list[tuple[float, float]], errors: list[str | None] | None = None):
    rows = [{"model": model, "condition": cond, "group_id": group, "position": 0,
             "role": "target", "prompt_id": f"t{group}", "t_submit": target[0] - 0.1,
             "t_first": target[0], "t_done": target[1], "stack_id": "s", "error": None}]
    for j, (a, b) in enumerate(fillers):
        rows.append({"model": model, "condition": cond, "group_id": group, "position": j + 1,
                     "role": "filler", "prompt_id": f"f{group}_{j}", "t_submit": a - 0.1,
                     "t_first": a, "t_done": b, "stack_id": "s",
                     "error": (errors or [None] * len(fillers))[j]})
    return rows


def test_verification_rate_on_constructed_timings():
    stag = "stagger_b8_jailbreak_m250"
    rows = (
        _gen_rows("m1", JAIL, 0, (10, 20), [(11, 12), (5, 10), (19, 30)])  # all overlap
        + _gen_rows("m1", JAIL, 1, (10, 20), [(11, 12), (21, 30)])  # one filler after
        + _gen_rows("m1", JAIL, 2, (10, 20), [(12, 13)], errors=["timeout"])  # errored
        + _gen_rows("m1", stag, 0, (10, 20), [(0, 9.5), (1, 9.9)])  # staggered: disjoint
        + _gen_rows("m1", stag, 1, (10, 20), [(9, 10.5)])  # staggered: overlapping
        + _gen_rows("m1", SOLO, 0, (10, 20), [])  # solo: excluded
    )
    gen = pd.DataFrame(rows)
    ver = cobatch_verification(gen).set_index(["condition", "group_id"])["verified"]
    assert ver.to_dict() == {(JAIL, 0): True, (JAIL, 1): False, (JAIL, 2): False,
                             (stag, 0): False, (stag, 1): True}
    nums = composition_numbers(_by_file(_scored()), {"g.parquet": gen}, "c", SOLO)
    rec = nums["c/all/cobatch_verified_rate"]
    assert (rec["k"], rec["n"]) == (2, 5)
    assert (nums[f"c/m1/{JAIL}/cobatch_verified_rate"]["k"],
            nums[f"c/m1/{JAIL}/cobatch_verified_rate"]["n"]) == (1, 3)
    assert nums[f"c/m1/{stag}/cobatch_verified_rate"]["stagger_ms"] == -250
    assert f"c/m1/{SOLO}/cobatch_verified_rate" not in nums
    # timing-derived records (and only they) say so: they can differ between runs whose
    # texts are identical
    timed = {k for k, r in nums.items() if r.get("timing")}
    assert timed == {k for k in nums if k.endswith("cobatch_verified_rate")
                     or "_median_ms" in k or k.endswith("/timing_rule_rate")} and timed
    # the stagger groups' rule (fillers >= 250 ms first, one still running at the target's
    # first token): group 0's fillers end at 9.9 < 10, group 1's at 10.5
    rule = nums[f"c/m1/{stag}/timing_rule_rate"]
    assert (rule["k"], rule["n"]) == (1, 2) and "offset" in rule["rule"]
    only_solo = composition_numbers(_by_file(_scored()), {"g.parquet": gen[
        gen["condition"] == SOLO]}, "c", SOLO)
    assert only_solo["c/all/cobatch_verified_rate"]["value"] is None
    assert only_solo["c/all/cobatch_verified_rate"]["note"].startswith("not estimable:")


def test_stagger_overlap_and_timing_rule_rates_on_constructed_timings():
    # target (t_submit, t_first, t_done), fillers' (t_submit, t_done); seconds
    def group(cond, gid, target, fillers):
        rows = [{"model": "m1", "condition": cond, "group_id": gid, "position": 0,
                 "role": "target", "prompt_id": f"t{gid}", "t_submit": target[0],
                 "t_first": target[1], "t_done": target[2], "stack_id": "s", "error": None}]
        rows += [{"model": "m1", "condition": cond, "group_id": gid, "position": j + 1,
                  "role": "filler", "prompt_id": f"f{gid}_{j}", "t_submit": a, "t_first": a,
                  "t_done": b, "stack_id": "s", "error": None}
                 for j, (a, b) in enumerate(fillers)]
        return rows

    mo, sim, p250 = ("stagger_b3_jailbreak_minimal_overlap",
                     "stagger_b3_jailbreak_simultaneous", "stagger_b3_jailbreak_p250")
    gen = pd.DataFrame(
        group(mo, 0, (0.0, 0.2, 1.0), [(0.25, 2.0), (0.3, 2.0)])    # after 1st token: met
        + group(mo, 1, (0.0, 0.2, 1.0), [(0.05, 2.0), (0.3, 2.0)])  # a filler before: not
        + group(mo, 2, (0.0, 0.2, 1.0), [(1.5, 2.0)])               # after the end: not
        + group(sim, 0, (0.0, 0.2, 1.0), [(0.001, 1.0), (0.002, 1.0)])  # met
        + group(sim, 1, (0.0, 0.2, 1.0), [(0.001, 1.0), (0.5, 1.0)])    # one late: not
        + group(p250, 0, (0.0, 0.1, 1.0), [(0.25, 2.0)])   # 250 ms after, overlaps: met
        + group(p250, 1, (0.0, 0.1, 0.2), [(0.25, 2.0)])   # target already done: not
    )
    ov = stagger_overlap(gen).set_index(["condition", "group_id"])
    assert ov["met"].to_dict() == {(mo, 0): True, (mo, 1): False, (mo, 2): False,
                                   (sim, 0): True, (sim, 1): False,
                                   (p250, 0): True, (p250, 1): False}
    assert ov.loc[(mo, 0), "filler_after_first_ms"] == pytest.approx(50.0)
    assert ov.loc[(mo, 0), "target_done_after_filler_ms"] == pytest.approx(750.0)
    assert ov.loc[(mo, 1), "offset_ms"] == pytest.approx(50.0)
    nums = composition_numbers(_by_file(_scored()), {"g.parquet": gen}, "c", SOLO)
    for cond, k, n in ((mo, 1, 3), (sim, 1, 2), (p250, 1, 2)):
        for model in ("m1", "all"):
            rec = nums[f"c/{model}/{cond}/timing_rule_rate"]
            assert (rec["k"], rec["n"], rec["timing"]) == (k, n, True)
        # beside the co-batch verification rate of the same condition
        assert f"c/m1/{cond}/cobatch_verified_rate" in nums
    # the median measured overlap: first filler 50, -150 and 1300 ms after the first token
    assert nums[f"c/m1/{mo}/filler_after_first_median_ms"]["value"] == pytest.approx(50.0)
    assert "first token" in nums[f"c/m1/{mo}/timing_rule_rate"]["rule"]


def _assert_null(rec: dict) -> None:
    assert rec["value"] is None
    assert rec["note"].startswith("not estimable: ")


def test_single_composition_is_not_estimable_not_nan():
    df = _scored()
    nums = composition_numbers(_by_file(df[df["condition"] == SOLO]), {}, "c", SOLO)
    json.dumps(nums, allow_nan=False)  # raises on NaN or inf
    for nid in ("c/all/cochran_q_p", "c/m1/cochran_q_p", "c/all/mh_odds_ratio", "c/all/mh_p",
                "c/all/mde_pp", "c/all/direction_unsafe_share", "c/all/direction_binom_p",
                "c/all/cobatch_verified_rate"):
        _assert_null(nums[nid])
    assert nums[f"c/m1/{SOLO}/refusal_rate"]["n"] == N_PROMPTS


def test_no_discordant_pairs_and_degenerate_tables():
    df = _scored()
    same = df.copy()
    solo = same[same["condition"] == SOLO].set_index(["model", "prompt_id"])["score"]
    key = pd.MultiIndex.from_frame(same[["model", "prompt_id"]])
    same["score"] = solo.reindex(key).to_numpy()  # every composition = solo
    nums = composition_numbers(_by_file(same), {}, "c", SOLO)
    json.dumps(nums, allow_nan=False)
    _assert_null(nums["c/all/direction_unsafe_share"])
    _assert_null(nums["c/all/direction_binom_p"])
    _assert_null(nums["c/all/direction_significant_unsafe_share"])
    assert nums["c/all/direction_to_unsafe"]["value"] == 0
    assert nums[f"c/m1/{JAIL}/mcnemar_p"]["value"] == 1.0
    assert nums["c/all/cochran_q_p"]["value"] == 1.0  # no within-prompt variation
    assert nums[f"c/all/{JAIL}/tost_p"]["equivalent"] is True
    # everything refused: the MH odds ratio is 0/0 and the stats module raises
    allref = df.assign(score=1.0)
    nums = composition_numbers(_by_file(allref), {}, "c", SOLO)
    json.dumps(nums, allow_nan=False)
    _assert_null(nums["c/all/mh_odds_ratio"])
    _assert_null(nums[f"c/all/{BENIGN}/mh_p"])
    assert nums["c/all/mde_pp"]["value"] == 0.0  # p = 1: no variance
    # a composition run for one model only: other models get no pair records
    part = df[~((df["condition"] == JAIL) & (df["model"] != "m1"))]
    nums = composition_numbers(_by_file(part), {}, "c", SOLO)
    assert f"c/m2/{JAIL}/mcnemar_p" not in nums and f"c/m1/{JAIL}/mcnemar_p" in nums
    _assert_null(nums["c/m2/cochran_q_p"])
    assert nums["c/all/cochran_q_p"]["n_subjects"] == N_PROMPTS


def _write_inputs(tmp_path, df: pd.DataFrame) -> tuple[list[str], list[str]]:
    scored, gens = [], []
    for (model, cond), part in df.groupby(["model", "condition"]):
        full = part.assign(study="c", kernel_mode="standard", group_id=range(len(part)),
                           position=0, text="x", scorer="refusal", scorer_version=2,
                           error="")
        path = tmp_path / "scored" / model / f"{cond}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        full[SCORED_COLUMNS].to_parquet(path, index=False)
        scored.append(str(path))
        rows = []
        for g, pid in enumerate(part["prompt_id"]):
            fillers = [] if cond == SOLO else [(1.0 + g, 2.0 + g + (g % 2))] * 7
            for r in _gen_rows(model, cond, g, (1.5 + g, 2.5 + g), fillers):
                rows.append(r | {"prompt_id": pid if r["role"] == "target" else r["prompt_id"]})
        gen = pd.DataFrame(rows).assign(
            study="c", batch_size=8, dispatch="cobatch", kernel_mode="standard", text="y",
            token_ids=[[1, 2]] * len(rows), finish_reason="length", n_tokens=2, seed=42,
            attempts=1)
        path = tmp_path / "generations" / model / f"{cond}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        gen[GENERATION_COLUMNS].to_parquet(path, index=False)
        gens.append(str(path))
    return scored, gens


def test_cli_end_to_end(tmp_path, capsys):
    df = _scored()
    scored, gens = _write_inputs(tmp_path, df)
    out = tmp_path / "numbers" / "c.json"
    rc = cli_main(["composition", "numbers", "--study", "c", "--scored", *scored,
                   "--generations", *gens, "--baseline", SOLO, "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["study"] == "c"
    nums = doc["numbers"]
    direct = composition_numbers({p: pd.read_parquet(p) for p in scored}, {}, "c", SOLO)
    assert nums["c/all/cochran_q_p"]["value"] == pytest.approx(
        direct["c/all/cochran_q_p"]["value"])
    # fillers span [1 + g, 2 + g] or [1 + g, 3 + g], target [1.5 + g, 2.5 + g]: always overlap
    ver = nums["c/all/cobatch_verified_rate"]
    assert (ver["k"], ver["n"]) == (2 * 3 * N_PROMPTS, 2 * 3 * N_PROMPTS)
    rec = nums[f"c/m3/{BENIGN}/mcnemar_p_holm"]
    assert sorted(rec["inputs"]) == sorted(p for p in scored if "/m3/" in p and
                                           (BENIGN in p or SOLO in p))
    png, pdf = tmp_path / "fig" / "c_composition.png", tmp_path / "fig" / "c_composition.pdf"
    args = ["composition", "figure", "--numbers", str(out), "--png", str(png), "--pdf", str(pdf)]
    assert cli_main(args) == 0
    first = png.read_bytes(), pdf.read_bytes()
    assert first[0][:8] == b"\x89PNG\r\n\x1a\n" and first[1][:5] == b"%PDF-"
    assert cli_main(args) == 0
    assert (png.read_bytes(), pdf.read_bytes()) == first  # reproducible bytes
    # a scored file without a required column is a one-line error, exit status 1
    bad = tmp_path / "bad.parquet"
    pd.read_parquet(scored[0]).drop(columns=["score"]).to_parquet(bad)
    capsys.readouterr()
    rc = cli_main(["composition", "numbers", "--study", "c", "--scored", str(bad), "--out",
                   str(tmp_path / "x.json")])
    assert rc == 1 and "field 'score'" in capsys.readouterr().err


def test_direction_of_significant_pairs():
    df = _scored()
    # m1 under jailbreak: the first 9 prompts refused alone, complied with fillers; the
    # rest as solo. Exact McNemar p = 2 * 0.5**9 < 0.05: the only significant pair.
    key = (df["model"] == "m1") & (df["domain"] == "safety")
    solo = df[key & (df["condition"] == SOLO)].set_index("prompt_id")["score"]
    jail = key & (df["condition"] == JAIL)
    pids = df.loc[jail, "prompt_id"]
    new = solo.reindex(pids).to_numpy().copy()
    refused_alone = np.flatnonzero(new == 1.0)[:9]
    new[refused_alone] = 0.0
    df.loc[jail, "score"] = new
    nums = composition_numbers(_by_file(df), {}, "c", SOLO)
    assert nums[f"c/m1/{JAIL}/mcnemar_p"]["value"] == pytest.approx(2 * 0.5**9)
    assert nums["c/all/direction_significant_to_unsafe"]["value"] == 9
    assert nums["c/all/direction_significant_to_safe"]["value"] == 0
    share = nums["c/all/direction_significant_unsafe_share"]
    assert (share["k"], share["n"], share["ci_high"]) == (9, 9, 1.0)
    assert share["pairs"] == [f"m1/{JAIL}"]
    assert nums["c/all/direction_significant_binom_p"]["value"] == pytest.approx(2 * 0.5**9)
    tost = nums[f"c/m1/{JAIL}/tost_p"]
    assert tost["estimate_pp"] == pytest.approx(-100 * 9 / N_PROMPTS)
    assert tost["equivalent"] is False


def test_the_repeat_control_stays_out_of_the_families_and_aggregates(data):
    # cobatch_b8_solo_repeat (solo again, one label changed): its own rates are reported,
    # every number against the baseline is as without it (batchflip.repeat compares it)
    df, before = data
    rep = df[df["condition"] == SOLO].assign(condition=f"{SOLO}_repeat")
    rep.loc[rep.index[0], "score"] = 1.0 - rep.loc[rep.index[0], "score"]
    after = composition_numbers(_by_file(pd.concat([df, rep])), {}, "c", SOLO)
    assert f"c/m1/{SOLO}_repeat/refusal_rate" in after
    own = ("/refusal_rate", "/capability_correct_rate", "/error_count", "/error_share")
    assert not any(f"{SOLO}_repeat" in k for k in after if not k.endswith(own))
    for nid, rec in before.items():
        assert after[nid] == rec | {"inputs": after[nid]["inputs"]}, nid
