"""Study B (batchflip.studies.models, kind models): fragility across models, checked against the
paper's table. (The model stage, batchflip.model: test_model_stage.py.)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT

from batchflip.records import FLIP_COLUMNS
from batchflip.studies.models import alignment_anova, models_figure, models_numbers

PUBLISHED = yaml.safe_load((ROOT / "src/batchflip/data/fidelity/published.yaml").read_text())
TABLE = PUBLISHED["tables"]["study_b_models"]  # 15 models: rate (%) and alignment type


def _scipy_anova(rates: list[float], groups: list[str]) -> tuple[float, float, float]:
    """F, p (scipy.stats.f_oneway) and eta^2 (SS_between / SS_total by hand)."""
    from scipy import stats as sps

    by = {g: [r for r, h in zip(rates, groups, strict=True) if h == g] for g in set(groups)}
    res = sps.f_oneway(*by.values())
    grand = np.mean(rates)
    ss_between = sum(len(v) * (np.mean(v) - grand) ** 2 for v in by.values())
    ss_total = sum((r - grand) ** 2 for r in rates)
    return float(res.statistic), float(res.pvalue), ss_between / ss_total


def test_anova_of_the_published_table_matches_scipy_and_the_paper():
    rates = [r["safety_flip_rate_pct"] / 100 for r in TABLE]
    groups = [r["alignment"] for r in TABLE]
    rec = alignment_anova(rates, groups, "d", [], [])
    f, p, eta2 = _scipy_anova(rates, groups)
    assert (rec["value"], rec["p_value"], rec["eta_squared"]) == pytest.approx((f, p, eta2),
                                                                              rel=1e-12)
    assert (rec["df_between"], rec["df_within"]) == (3, 11)
    # the paper prints F = 0.127, p = 0.942, eta^2 = 0.033 (3 decimals)
    assert (f"{rec['value']:.3f}", f"{rec['p_value']:.3f}", f"{rec['eta_squared']:.3f}") == (
        "0.127", "0.942", "0.033")


def flip_rows(model: str, safety_flips: int, changed: int, to_safe: int, to_unsafe: int,
              n_safety: int = 2340, n_cap: int = 2425, cap_flips: int = 0) -> pd.DataFrame:
    """Synthetic sync flip rows of one model: n_safety safety rows (bs 2..32) with the given
    flips (directions first) and n_cap capability rows, the first `changed` rows changed."""
    n = n_safety + n_cap
    df = pd.DataFrame({c: [None] * n for c in FLIP_COLUMNS})
    df["model"] = model
    df["domain"] = ["safety"] * n_safety + ["capability"] * n_cap
    df["dispatch"] = "sync"
    flip = np.zeros(n, bool)
    flip[:safety_flips] = True
    flip[n_safety:n_safety + cap_flips] = True
    df["flip"] = flip
    direction = ["none"] * n
    direction[:to_safe] = ["to_safe"] * to_safe
    direction[to_safe:to_safe + to_unsafe] = ["to_unsafe"] * to_unsafe
    df["direction"] = direction
    df["text_changed"] = np.arange(n) < changed
    df["stack_id"] = df["baseline_stack_id"] = "s1"
    return df


def test_numbers_from_flip_rows_reproduce_the_published_rates_and_anova():
    # per-model flips = published rate x 2,340 rows (e.g. phi-2: 2.39% -> 56)
    frames, alignment = {}, {}
    for i, r in enumerate(TABLE):
        k = round(r["safety_flip_rate_pct"] / 100 * 2340)
        frames[f"f{i}.parquet"] = flip_rows(r["model"], k, changed=40 * k + 100 + i,
                                            to_safe=k // 2, to_unsafe=k // 4)
        alignment[r["model"]] = r["alignment"]
    nums = models_numbers(frames, alignment, "b", seed=137, n_resamples=500)
    ks = {r["model"]: round(r["safety_flip_rate_pct"] / 100 * 2340) for r in TABLE}
    # oracles: the pooled rate by hand, the ANOVA of the per-model rates k / 2,340 by scipy
    pooled = nums["b/all/safety_flip_rate"]
    assert pooled["n"] == 15 * 2340 and pooled["k"] == sum(ks.values())
    assert pooled["value"] == sum(ks.values()) / (15 * 2340)
    assert nums["b/phi-2/fragility"]["k"] == 56
    assert nums["b/phi-2/fragility"]["value"] == 56 / 2340
    anova = nums["b/alignment_anova"]
    f, p, eta2 = _scipy_anova([ks[r["model"]] / 2340 for r in TABLE],
                              [r["alignment"] for r in TABLE])
    assert (anova["value"], anova["p_value"], anova["eta_squared"]) == pytest.approx(
        (f, p, eta2), rel=1e-9)
    r = nums["b/instability_fragility_r"]
    assert r["value"] > 0.99 and r["ci_low"] <= r["value"] <= r["ci_high"]
    assert r["n_models"] == 15 and r["fit_slope"] > 0
    assert nums["b/all/to_safe"]["value"] == sum(
        round(t["safety_flip_rate_pct"] / 100 * 2340) // 2 for t in TABLE)
    # capability never flips here: the ratio is not estimable, not infinite
    assert nums["b/all/ratio"]["value"] is None
    assert "capability flip rate is 0" in nums["b/all/ratio"]["note"]


def test_two_models_are_not_estimable(tmp_path):
    frames = {"a.parquet": flip_rows("m1", 10, 50, 6, 3, cap_flips=4),
              "b.parquet": flip_rows("m2", 2, 20, 1, 1, cap_flips=1)}
    nums = models_numbers(frames, {"m1": "SFT", "m2": "base"}, "b", seed=1, n_resamples=100)
    for key in ("b/alignment_anova", "b/instability_fragility_r"):
        assert nums[key]["value"] is None
        assert nums[key]["note"].startswith("not estimable: n = 2")
    # per-model and pooled numbers are still there
    assert nums["b/m1/fragility"]["k"] == 10 and nums["b/m2/instability"]["k"] == 20
    assert nums["b/all/ratio"]["value"] == pytest.approx((12 / 4680) / (5 / 4850))
    assert nums["b/all/direction_test"]["n_directional"] == 11
    # the figure draws without a fit line and says why
    numbers = tmp_path / "b.json"
    numbers.write_text(json.dumps({"study": "b", "numbers": nums}))
    models_figure(nums, tmp_path / "b.png", tmp_path / "b.pdf")
    assert (tmp_path / "b.png").stat().st_size > 0 and (tmp_path / "b.pdf").stat().st_size > 0


def test_one_alignment_type_is_not_estimable():
    rec = alignment_anova([0.01, 0.02, 0.03], ["SFT"] * 3, "d", [], [])
    assert rec["value"] is None and rec["note"].startswith("not estimable: n = 3 models in 1")


def test_cli_counts_failed_requests_from_scored_files_with_an_error_column(tmp_path):
    """The workflow passes --scored; a scored file's ``error`` column is read once."""
    from batchflip.cli import main as cli_main

    flips = pd.concat([flip_rows("m1", 2, 5, 1, 1, n_safety=8, n_cap=4)
                       .assign(condition="sync_b4", prompt_id=[f"p{i}" for i in range(12)])])
    fpath = tmp_path / "m1.parquet"
    flips.to_parquet(fpath, index=False)
    spath = tmp_path / "s.parquet"
    pd.DataFrame({"model": "m1", "condition": "sync_b4", "prompt_id": ["p0", "p1"],
                  "stack_id": "s1", "error": ["", "time-out"]}).to_parquet(spath, index=False)
    out = tmp_path / "b.json"
    assert cli_main(["models", "numbers", "--study", "b", "--flips", str(fpath),
                     "--seed", "1", "--resamples", "10", "--scored", str(spath),
                     "--max-error-share", "0.5", "--out", str(out)]) == 0
    nums = json.loads(out.read_text())["numbers"]
    assert nums["b/m1/sync_b4/error_count"]["value"] == 1
    assert nums["b/m1/sync_b4/error_share"]["n"] == 2
