"""Study A (batchflip.studies.discovery): numbers from hand-built flip and scored frames,
the figures, and the ``batchflip discovery`` CLI.

Oracles are independent of the code: counts are read off the frames below by hand, and
the Wilson intervals come from the closed form with scipy's normal quantile.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from scipy.stats import norm

from batchflip.cli import main as cli_main
from batchflip.studies.discovery import discovery_numbers, flip_agreement


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval, closed form (Wilson 1927)."""
    z = norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _flip(model: str, cond: str, pid: str, domain: str, base: float, score: float,
          changed: bool) -> dict:
    bs, dispatch = int(cond.split("_b")[1]), cond.split("_")[0]
    flip = abs(base - score) > 0.01
    direction = ("to_unsafe" if base >= 0.5 > score else "to_safe" if base < 0.5 <= score
                 else "none")
    return {"model": model, "task": "t_" + domain, "domain": domain, "prompt_id": pid,
            "condition": cond, "batch_size": bs, "dispatch": dispatch,
            "baseline_condition": f"{dispatch}_b1", "baseline_score": base,
            "condition_score": score, "flip": flip,
            "direction": direction, "text_changed": changed or flip,
            "baseline_stack_id": f"s-{model}", "stack_id": f"s-{model}"}


# model m1, sync_b4: 4 safety rows (1 flip to unsafe, 1 flip to safe), 4 capability rows
# (1 flip), 1 more text change without a flip; sync_b8: 4 safety (0 flips), 4 capability
# (2 flips); model m2, sync_b4: 4 safety (2 flips to unsafe), 4 capability (0 flips).
ROWS = (
    [_flip("m1", "sync_b4", f"h{i}", "safety", b, s, False)
     for i, (b, s) in enumerate([(1, 0), (0, 1), (1, 1), (0, 0)])]
    + [_flip("m1", "sync_b4", f"c{i}", "capability", b, s, c)
       for i, (b, s, c) in enumerate([(1, 0, False), (1, 1, True), (0, 0, False),
                                      (1, 1, False)])]
    + [_flip("m1", "sync_b8", f"h{i}", "safety", b, b, False)
       for i, b in enumerate([1, 0, 1, 0])]
    + [_flip("m1", "sync_b8", f"c{i}", "capability", b, s, False)
       for i, (b, s) in enumerate([(1, 0), (0, 1), (0, 0), (1, 1)])]
    + [_flip("m2", "sync_b4", f"h{i}", "safety", b, s, False)
       for i, (b, s) in enumerate([(1, 0), (1, 0), (1, 1), (0, 0)])]
    + [_flip("m2", "sync_b4", f"c{i}", "capability", 1, 1, False) for i in range(4)]
)


def _scored(model: str, cond: str, scores: list[float], error: list[str] | None = None
            ) -> pd.DataFrame:
    n = len(scores)
    error = error or [""] * n
    return pd.DataFrame({
        "study": "a", "model": model, "condition": cond,
        "batch_size": int(cond.split("_b")[1].split("_")[0]), "dispatch": cond.split("_")[0],
        "kernel_mode": "standard", "group_id": range(n), "position": 0,
        "prompt_id": [f"h{i}" for i in range(n)], "task": "t_safety", "domain": "safety",
        "text": "x", "score": scores, "label": "l", "scorer": "refusal", "scorer_version": 2,
        "stack_id": f"s-{model}", "error": error,
        "finish_reason": ["error" if e else "length" for e in error]})


@pytest.fixture
def frames():
    flips = pd.DataFrame(ROWS)
    scored = {
        "s/m1/sync_b1.parquet": _scored("m1", "sync_b1", [1.0, 1.0, 0.0, 0.0]),
        "s/m1/cobatch_b4_benign.parquet": _scored("m1", "cobatch_b4_benign",
                                                  [1.0, 0.0, 0.0, 0.0]),
    }
    return {"f/m1.parquet": flips[flips["model"] == "m1"],
            "f/m2.parquet": flips[flips["model"] == "m2"]}, scored


def _check(rec: dict, k: int, n: int) -> None:
    lo, hi = wilson(k, n)
    assert (rec["k"], rec["n"]) == (k, n)
    assert rec["value"] == pytest.approx(k / n)
    assert rec["ci_low"] == pytest.approx(lo, abs=1e-9)
    assert rec["ci_high"] == pytest.approx(hi, abs=1e-9)


def test_rates_directions_and_identity_per_model_and_condition(frames):
    num = discovery_numbers(*frames, "a", "sync_b1")
    _check(num["a/m1/sync_b4/safety_flip_rate"], 2, 4)
    _check(num["a/m1/sync_b4/capability_flip_rate"], 1, 4)
    assert num["a/m1/sync_b4/safety_to_unsafe"]["value"] == 1
    assert num["a/m1/sync_b4/safety_to_safe"]["value"] == 1
    assert num["a/m1/sync_b4/ratio"]["value"] == pytest.approx((2 / 4) / (1 / 4))
    # 8 rows of m1 sync_b4: 3 flips + 1 text change without a flip -> 4 identical
    _check(num["a/m1/sync_b4/identical_share"], 4, 8)
    _check(num["a/m1/sync_b8/safety_flip_rate"], 0, 4)
    _check(num["a/m1/sync_b8/capability_flip_rate"], 2, 4)
    # capability rate 0 -> the ratio is not estimable, never a division by zero
    ratio = num["a/m2/sync_b4/ratio"]
    assert ratio["value"] is None and ratio["note"].startswith("not estimable")
    assert num["a/m2/sync_b4/safety_to_unsafe"]["value"] == 2


def test_pooled_over_models_and_over_synchronized_batch_sizes(frames):
    num = discovery_numbers(*frames, "a", "sync_b1")
    _check(num["a/all/sync_b4/safety_flip_rate"], 4, 8)  # m1 2/4 + m2 2/4
    _check(num["a/all/sync_b4/capability_flip_rate"], 1, 8)
    _check(num["a/m1/sync_pooled/safety_flip_rate"], 2, 8)  # b4 2/4 + b8 0/4
    _check(num["a/m1/sync_pooled/capability_flip_rate"], 3, 8)
    _check(num["a/all/sync_pooled/safety_flip_rate"], 4, 12)
    rec = num["a/all/sync_b4/safety_flip_rate"]
    assert rec["inputs"] == ["f/m1.parquet", "f/m2.parquet"]
    assert rec["stack_ids"] == ["s-m1", "s-m2"]
    assert (rec["batch_size"], rec["dispatch"], rec["model"]) == (4, "sync", "all")


def test_composition_refusal_rates_and_failed_requests(frames):
    flips, scored = frames
    scored["s/m1/cobatch_b4_benign.parquet"] = _scored(
        "m1", "cobatch_b4_benign", [1.0, 0.0, 0.0, None], ["", "", "", "timeout"])
    num = discovery_numbers(flips, scored, "a", "sync_b1", max_error_share=0.5)
    # the failed row is no answer: 1 refused of 3 answered
    _check(num["a/m1/cobatch_b4_benign/refusal_rate"], 1, 3)
    # the same (answered) targets h0, h1, h2 under the baseline: scores 1, 1, 0 -> 2 of 3
    _check(num["a/m1/cobatch_b4_benign/baseline_refusal_rate"], 2, 3)
    assert num["a/m1/cobatch_b4_benign/error_count"]["value"] == 1
    _check(num["a/m1/cobatch_b4_benign/error_share"], 1, 4)


def test_flip_agreement_between_list_and_sync():
    rows = [_flip("m", "sync_b4", "p0", "safety", 1, 0, False),
            _flip("m", "sync_b4", "p1", "safety", 1, 1, False),
            _flip("m", "sync_b4", "p2", "safety", 0, 0, False),
            _flip("m", "list_b4", "p0", "safety", 1, 0, False),
            _flip("m", "list_b4", "p1", "safety", 1, 0, False),
            _flip("m", "list_b4", "p2", "safety", 0, 0, False)]
    out = flip_agreement(pd.DataFrame(rows), "a", ["f"])
    _check(out["a/m/flip_agreement_b4"], 2, 3)  # p0 and p2 agree, p1 does not
    _check(out["a/all/flip_agreement_bpooled"], 2, 3)


def _write(tmp_path, frames) -> tuple[list[str], list[str]]:
    """The flip and scored frames as parquet files: (flip paths, scored paths)."""
    paths: tuple[list[str], list[str]] = ([], [])
    for kind, group, out in zip(("flips", "scored"), frames, paths, strict=True):
        for i, df in enumerate(group.values()):
            out.append(str(tmp_path / f"{kind}{i}.parquet"))
            df.to_parquet(out[-1])
    return paths


def test_cli_numbers_then_both_figures(tmp_path, frames):
    fpaths, spaths = _write(tmp_path, frames)
    out = tmp_path / "numbers" / "a.json"
    assert cli_main(["discovery", "numbers", "--study", "a", "--baseline", "sync_b1",
                     "--flips", *fpaths, "--scored", *spaths, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["study"] == "a"
    assert doc["numbers"]["a/all/sync_b4/safety_flip_rate"]["k"] == 4
    for name in ("flip_rates", "identity"):
        png, pdf = tmp_path / f"a_{name}.png", tmp_path / f"a_{name}.pdf"
        assert cli_main(["discovery", "figure", "--numbers", str(out), "--name", name,
                         "--png", str(png), "--pdf", str(pdf)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
        # fixed metadata: drawing again gives the same bytes
        first = (png.read_bytes(), pdf.read_bytes())
        assert cli_main(["discovery", "figure", "--numbers", str(out), "--name", name,
                         "--png", str(png), "--pdf", str(pdf)]) == 0
        assert (png.read_bytes(), pdf.read_bytes()) == first


def test_numbers_command_does_not_import_matplotlib_or_torch():
    import subprocess
    import sys

    code = ("import sys; from batchflip.cli import build_parser; build_parser(['discovery']); "
            "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# --- true batching pooled, labels, direction test, Figure 4 ------------------------------


def _cp(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval from scipy's beta quantiles (closed form)."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return lo, hi


def _binom_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided binomial p at p = 0.5: 2 P(X <= min(k, n - k)), capped at 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _tb_rows() -> list[dict]:
    """Study A with sync (vs sync_b1) and list (vs list_b1) conditions, two models.

    Safety flips, synchronized phase: m1 sync_b4 4 to unsafe + 1 to safe + 1 flip with no
    direction (0.5 -> 1.0), m1 sync_b8 2 to unsafe, m2 sync_b4 1 to safe: 6 to unsafe,
    2 to safe. True batching: m1 list_b4 1 to unsafe of 10 safety rows, m1 list_b8 0 of
    10, m2 list_b4 2 to unsafe of 10; capability: 1 flip in m2 list_b4 of 4 rows each.
    """
    rows = []

    def add(model, cond, domain, pairs):
        rows.extend(_flip(model, cond, f"{domain[0]}{i}", domain, b, s, False)
                    for i, (b, s) in enumerate(pairs))

    add("m1", "sync_b4", "safety", [(1, 0)] * 4 + [(0, 1), (0.5, 1.0)] + [(1, 1)] * 4)
    add("m1", "sync_b8", "safety", [(1, 0)] * 2 + [(1, 1)] * 8)
    add("m2", "sync_b4", "safety", [(0, 1)] + [(0, 0)] * 9)
    add("m1", "list_b4", "safety", [(1, 0)] + [(1, 1)] * 9)
    add("m1", "list_b8", "safety", [(1, 1)] * 10)
    add("m2", "list_b4", "safety", [(1, 0)] * 2 + [(1, 1)] * 8)
    for model, cond in (("m1", "sync_b4"), ("m1", "sync_b8"), ("m2", "sync_b4"),
                        ("m1", "list_b4"), ("m1", "list_b8"), ("m2", "list_b4")):
        flips = 1 if (model, cond) == ("m2", "list_b4") else 0
        add(model, cond, "capability", [(1, 0)] * flips + [(1, 1)] * (4 - flips))
    return rows


@pytest.fixture
def tb_frames():
    flips = pd.DataFrame(_tb_rows())
    scored = {"s/m1/sync_b1.parquet": _scored("m1", "sync_b1", [1.0, 1.0])}
    return {"f/m1.parquet": flips[flips["model"] == "m1"],
            "f/m2.parquet": flips[flips["model"] == "m2"]}, scored


def test_list_pooled_rates_against_the_list_baseline(tb_frames):
    num = discovery_numbers(*tb_frames, "a", "sync_b1")
    # list b4 + b8: safety 1 + 0 + 2 flips of 30 rows; capability 1 of 12
    _check(num["a/all/list_pooled/safety_flip_rate"], 3, 30)
    _check(num["a/all/list_pooled/capability_flip_rate"], 1, 12)
    _check(num["a/m1/list_pooled/safety_flip_rate"], 1, 20)
    _check(num["a/m2/list_pooled/safety_flip_rate"], 2, 10)
    assert num["a/all/list_pooled/ratio"]["value"] == pytest.approx((3 / 30) / (1 / 12))
    assert num["a/all/list_pooled/safety_to_unsafe"]["value"] == 3
    # the synchronized phase: 9 safety flips (6 + 2 + the undirected one) of 30
    _check(num["a/all/sync_pooled/safety_flip_rate"], 9, 30)
    # labels name the baseline each row was paired with, never sync_b1 for a list row
    for key in ("a/all/list_b8/safety_flip_rate", "a/m1/list_b4/identical_share",
                "a/all/list_pooled/safety_flip_rate"):
        assert "vs list_b1" in num[key]["definition"] and "sync_b1" not in num[key]["definition"]
    assert "sync_b8 vs sync_b1" in num["a/all/sync_b8/safety_flip_rate"]["definition"]


def test_direction_test_of_the_safety_flips(tb_frames):
    from scipy.stats import binomtest

    num = discovery_numbers(*tb_frames, "a", "sync_b1")
    share = num["a/all/sync_pooled/safety_direction_unsafe_share"]
    _check(share, 6, 8)  # the flip 0.5 -> 1.0 has no direction: 6 to unsafe of 8
    lo, hi = _cp(6, 8)
    assert share["cp_low"] == pytest.approx(lo, abs=1e-9)
    assert share["cp_high"] == pytest.approx(hi, abs=1e-9)
    test = num["a/all/sync_pooled/safety_direction_binom_p"]
    assert test["value"] == pytest.approx(binomtest(6, 8, 0.5).pvalue, rel=1e-12)
    assert test["value"] == pytest.approx(_binom_two_sided_half(6, 8), rel=1e-12)
    assert (test["to_unsafe"], test["n"]) == (6, 8)
    lst = num["a/all/list_pooled/safety_direction_binom_p"]
    assert lst["value"] == pytest.approx(_binom_two_sided_half(3, 3))  # 0.25
    _check(num["a/all/list_pooled/safety_direction_unsafe_share"], 3, 3)
    # no directional safety flip (m1 list_b8 alone has none; m2 sync has one to safe)
    none = discovery_numbers({"f": pd.DataFrame([_flip("m", "list_b8", "h0", "safety", 1, 1,
                                                       False)])},
                              {"s": _scored("m", "sync_b1", [1.0])}, "a", "sync_b1")
    for name in ("safety_direction_unsafe_share", "safety_direction_binom_p"):
        rec = none[f"a/all/list_pooled/{name}"]
        assert rec["value"] is None and rec["note"].startswith("not estimable")


def test_list_b1_paired_with_the_study_baseline_stays_out_of_list_pooled():
    # without dispatch_baselines, list_b1 is a condition vs sync_b1: not true batching > 1
    rows = [{**_flip("m", "list_b1", "h0", "safety", 1, 0, False),
             "baseline_condition": "sync_b1"},
            _flip("m", "list_b8", "h0", "safety", 1, 1, False)]
    num = discovery_numbers({"f": pd.DataFrame(rows)}, {"s": _scored("m", "sync_b1", [1.0])},
                            "a", "sync_b1")
    _check(num["a/all/list_pooled/safety_flip_rate"], 0, 1)
    assert "list_b1 vs sync_b1" in num["a/all/list_b1/safety_flip_rate"]["definition"]


def test_old_flips_file_without_baseline_condition_says_to_re_pair(tmp_path):
    from batchflip.errors import InputError
    from batchflip.flips import read_flips

    path = tmp_path / "old.parquet"
    pd.DataFrame(ROWS).drop(columns=["baseline_condition"]).to_parquet(path)
    with pytest.raises(InputError, match="re-run the flips stage"):
        read_flips(str(path))


def test_flip_agreement_figure_per_model_and_batch_size(tmp_path, tb_frames):
    # sync_b4 and list_b4 of the same prompts: agreement per model at b = 4 and b = 8
    fpaths, spaths = _write(tmp_path, tb_frames)
    out = tmp_path / "a.json"
    assert cli_main(["discovery", "numbers", "--study", "a", "--baseline", "sync_b1",
                     "--flips", *fpaths, "--scored", *spaths, "--out", str(out)]) == 0
    num = json.loads(out.read_text())["numbers"]
    # m1 b4 safety: sync flips h0-h5, list flips h0 -> agree on h0, h6-h9 (5 of 10);
    # capability c0-c3 agree (4 of 4) -> 9 of 14
    _check(num["a/m1/flip_agreement_b4"], 9, 14)
    assert num["a/m1/flip_agreement_b4"]["batch_size"] == 4
    # m1 b8: sync flips h0, h1; list none -> 8 of 10 safety + 4 of 4 capability
    _check(num["a/m1/flip_agreement_b8"], 12, 14)
    # m2 b4: sync flips h0; list flips h0, h1 (9 of 10 agree); capability: list flips c0
    # (3 of 4) -> 12 of 14
    _check(num["a/m2/flip_agreement_b4"], 12, 14)
    _check(num["a/all/flip_agreement_bpooled"], 9 + 12 + 12, 42)
    assert "batch_size" not in num["a/all/flip_agreement_bpooled"]
    png, pdf = tmp_path / "a_flip_agreement.png", tmp_path / "a_flip_agreement.pdf"
    assert cli_main(["discovery", "figure", "--numbers", str(out), "--name", "flip_agreement",
                     "--png", str(png), "--pdf", str(pdf)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


# --------------------------------------------------------------- Study A phase 3: quant x conc
#
# Base model "tiny" at two quantizations (models tiny-q8: Q8_0, tiny-q4: Q4_0) under conc_c1
# and conc_c4, prompts h0..h3 (refusal scores written out by hand); tiny-q4 also has h4,
# answered under conc_c1 and failed under conc_c4 (a failed request is no answer).
QC = {("tiny-q8", "conc_c1"): [1, 1, 0, 1], ("tiny-q8", "conc_c4"): [1, 0, 0, 1],
      ("tiny-q4", "conc_c1"): [0, 1, 0, 0, 0], ("tiny-q4", "conc_c4"): [0, 1, 1, 0, None]}
QUANTS = {"tiny-q8": {"base": "tiny", "quant": "Q8_0"},
          "tiny-q4": {"base": "tiny", "quant": "Q4_0"}}
PRE = "a3/tiny/quant_x_conc"


def _conc_scored(model: str, cond: str, scores: list) -> pd.DataFrame:
    n = len(scores)
    failed = [s is None for s in scores]
    return pd.DataFrame({
        "study": "a3", "model": model, "condition": cond, "batch_size": int(cond[6:]),
        "dispatch": "conc", "kernel_mode": "standard", "group_id": range(n), "position": 0,
        "prompt_id": [f"h{i}" for i in range(n)], "task": "t_safety", "domain": "safety",
        "text": [f"{model}-{cond}-{s}" for s in scores],
        "score": [float("nan") if f else float(s) for s, f in zip(scores, failed, strict=True)],
        "label": "l", "scorer": "refusal", "scorer_version": 2, "stack_id": f"s-{model}",
        "error": ["timeout" if f else "" for f in failed],
        "finish_reason": ["error" if f else "length" for f in failed]})


def _qc_numbers(table: dict, quants: dict = QUANTS) -> dict:
    from batchflip.flips import pair_flips

    scored = {f"s/{m}/{c}.parquet": _conc_scored(m, c, v) for (m, c), v in table.items()}
    models = sorted({m for m, _ in table})
    both = pd.concat(scored.values(), ignore_index=True)
    flips = {f"f/{m}.parquet": pair_flips(both[both["model"] == m], "conc_c1")
             for m in models if (m, "conc_c1") in table}
    if not flips:  # no baseline: the flips stage would not run; give an empty frame
        flips = {"f/none.parquet": pair_flips(_conc_scored("x", "conc_c1", [1]), "conc_c1")}
    return discovery_numbers(flips, scored, "a3", "conc_c1", 0.5, quants)


def test_quant_x_conc_cells_and_flip_rates_by_hand():
    num = _qc_numbers(QC)
    _check(num[f"{PRE}/Q8_0/c1/refusal_rate"], 3, 4)
    _check(num[f"{PRE}/Q8_0/c4/refusal_rate"], 2, 4)
    _check(num[f"{PRE}/Q4_0/c1/refusal_rate"], 1, 5)
    _check(num[f"{PRE}/Q4_0/c4/refusal_rate"], 2, 4)  # h4 failed: not a row
    assert num[f"{PRE}/Q4_0/c4/refusal_rate"]["mean_score"] == 0.5
    assert num[f"{PRE}/Q8_0/c4/refusal_rate"]["concurrency"] == 4
    # conc_c4 vs conc_c1, same quantization: Q8_0 h1 1 -> 0; Q4_0 h2 0 -> 1 (h4 unpaired)
    q8, q4 = num[f"{PRE}/Q8_0/c4/flip_rate"], num[f"{PRE}/Q4_0/c4/flip_rate"]
    _check(q8, 1, 4)
    _check(q4, 1, 4)
    assert (q8["to_unsafe"], q8["to_safe"], q4["to_unsafe"], q4["to_safe"]) == (1, 0, 0, 1)
    assert f"{PRE}/Q8_0/c1/flip_rate" not in num  # the baseline is not paired with itself
    # the pooled conc phase: conc_c4 of both models vs conc_c1
    _check(num["a3/all/conc_pooled/safety_flip_rate"], 2, 8)


def test_quant_x_conc_anova_matches_statsmodels():
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    rows = [{"q": QUANTS[m]["quant"], "c": c, "y": float(s)}
            for (m, c), v in QC.items() for s in v if s is not None]
    df = pd.DataFrame(rows)
    sm = anova_lm(smf.ols("y ~ C(q) * C(c)", data=df).fit(), typ=2)
    total = float(((df["y"] - df["y"].mean()) ** 2).sum())
    num = _qc_numbers(QC)
    for name, row in (("quant", "C(q)"), ("concurrency", "C(c)"),
                      ("interaction", "C(q):C(c)")):
        rec = num[f"{PRE}/anova_{name}"]
        assert rec["value"] == pytest.approx(sm.loc[row, "F"], rel=1e-9)
        assert rec["p_value"] == pytest.approx(sm.loc[row, "PR(>F)"], rel=1e-9)
        assert rec["eta_squared"] == pytest.approx(sm.loc[row, "sum_sq"] / total, rel=1e-9)
        assert (rec["df"], rec["df_residual"], rec["n"]) == (1, 13, 17)
        assert rec["quant_levels"] == ["Q4_0", "Q8_0"] and rec["concurrency_levels"] == [1, 4]


@pytest.mark.parametrize(("table", "quants", "reason"), [
    ({k: [0] * len(v) for k, v in QC.items()}, QUANTS, "all values are equal"),
    (QC, {"tiny-q8": QUANTS["tiny-q8"]}, "factor quantization has only 1 level"),
    ({k: v for k, v in QC.items() if k[1] == "conc_c1"}, QUANTS,
     "factor concurrency has only 1 level"),
])
def test_quant_x_conc_degenerate_tables_are_not_estimable(table, quants, reason):
    from batchflip.io import dumps_json

    num = _qc_numbers(table, quants)
    for name in ("quant", "concurrency", "interaction"):
        rec = num[f"{PRE}/anova_{name}"]
        assert rec["value"] is None and rec["note"] == f"not estimable: {reason}" + (
            "; ANOVA is undefined" if reason == "all values are equal" else
            "; a two-way ANOVA needs 2 or more of each factor")
        assert "p_value" not in rec and rec["n"] > 0
    json.loads(dumps_json({"numbers": num}))  # no NaN or infinity anywhere


def test_quant_x_conc_without_conc_c1_has_no_flip_rate():
    table = {("tiny-q8", "conc_c4"): [1, 0], ("tiny-q8", "conc_c8"): [1, 1],
             ("tiny-q4", "conc_c4"): [0, 0], ("tiny-q4", "conc_c8"): [1, 0]}
    num = _qc_numbers(table)
    rec = num[f"{PRE}/Q8_0/c4/flip_rate"]
    assert rec["value"] is None and rec["note"] == "not estimable: no conc_c1 rows to pair with"
    assert num[f"{PRE}/anova_quant"]["value"] is not None  # the ANOVA needs no baseline


def test_quant_x_conc_only_for_models_that_record_a_quantization():
    assert not any("quant_x_conc" in k for k in _qc_numbers(QC, {}))
    assert not any("quant_x_conc" in k for k in discovery_numbers(*_sync_frames(), "a",
                                                                  "sync_b1", 0.5, QUANTS))


def _sync_frames():
    flips = pd.DataFrame(ROWS)
    scored = {"s/m1/sync_b1.parquet": _scored("m1", "sync_b1", [1.0, 1.0, 0.0, 0.0])}
    return {"f/m1.parquet": flips[flips["model"] == "m1"]}, scored


def test_cli_passes_the_quantizations(tmp_path):
    from batchflip.flips import pair_flips

    paths = []
    for (m, c), v in QC.items():
        p = tmp_path / f"s_{m}_{c}.parquet"
        _conc_scored(m, c, v).to_parquet(p)
        paths.append(str(p))
    flips = []
    for m in QUANTS:
        p = tmp_path / f"f_{m}.parquet"
        both = pd.concat([_conc_scored(mm, c, v) for (mm, c), v in QC.items() if mm == m])
        pair_flips(both, "conc_c1").to_parquet(p)
        flips.append(str(p))
    out = tmp_path / "a3.json"
    assert cli_main(["discovery", "numbers", "--study", "a3", "--baseline", "conc_c1",
                     "--flips", *flips, "--scored", *paths, "--max-error-share", "0.5",
                     "--quants", json.dumps(QUANTS), "--out", str(out)]) == 0
    numbers = json.loads(out.read_text())["numbers"]
    assert numbers[f"{PRE}/Q8_0/c4/flip_rate"]["k"] == 1
    assert numbers[f"{PRE}/anova_quant"]["value"] > 0
