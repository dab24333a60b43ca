"""Tests of batchflip.stats: published values, independent computations, edge cases.

Independent references: scipy's own interval code (binomtest.proportion_ci), brute-force
enumeration of binomial / hypergeometric probabilities with exact fractions, hand-written
formulas (Holm, Cochran's Q, RBG variance, coincidence matrix), and numerical maximum
likelihood for the restricted estimates behind the score TOSTs.
"""

from __future__ import annotations

import inspect
import itertools
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from scipy import optimize
from scipy import stats as sps
from statsmodels.stats import contingency_tables as smct
from statsmodels.stats.proportion import tost_proportions_2indep

from batchflip import stats
from batchflip.errors import BatchflipError

RNG_SEED = 20260527

# Study B per-model safety flip rate (%) and alignment type, as printed in PAPER.md.
STUDY_B = [
    ("phi-2", 2.39, "SFT"),
    ("smollm3-3b", 1.54, "DPO"),
    ("deepseek-r1-distill-1.5b", 1.24, "Distilled"),
    ("phi-3.5-mini", 1.11, "SFT"),
    ("qwen2.5-1.5b", 0.98, "RLHF"),
    ("qwen2.5-3b", 0.68, "RLHF"),
    ("smollm2-360m", 0.64, "Distilled"),
    ("llama3.2-1b", 0.47, "RLHF"),
    ("olmo-2-1b-dpo", 0.47, "DPO"),
    ("llama3.2-3b", 0.43, "RLHF"),
    ("smollm2-1.7b", 0.38, "Distilled"),
    ("stablelm-2-zephyr", 0.38, "DPO"),
    ("stablelm-zephyr-3b", 0.34, "DPO"),
    ("olmo-2-1b-sft", 0.17, "SFT"),
    ("tinyllama-1.1b-chat", 0.00, "SFT"),
]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def binom_pmf_exact(i: int, m: int) -> Fraction:
    """P(X = i) for X ~ Binomial(m, 1/2), as an exact fraction."""
    return Fraction(math.comb(m, i), 2**m)


# --------------------------------------------------------------------------- published


@pytest.mark.parametrize(
    ("k", "n", "low_pct", "high_pct"),
    [(28, 31, "75.1", "96.7"), (22, 55, "28.1", "53.2"), (0, 55, "0.0", "6.5")],
)
def test_wilson_published(k, n, low_pct, high_pct):
    iv = stats.wilson_interval(k, n)
    assert f"{100 * iv.low:.1f}" == low_pct
    assert f"{100 * iv.high:.1f}" == high_pct


def test_adjudication_share_published():
    # 17 of 63 candidates genuine -> 27% (paper); the Wilson interval must contain it
    iv = stats.wilson_interval(17, 63)
    cp = stats.clopper_pearson_interval(17, 63)
    assert round(100 * 17 / 63) == 27
    assert iv.low < 17 / 63 < iv.high
    # Clopper-Pearson is never narrower than Wilson at this size
    assert cp.low < iv.low and cp.high > iv.high


def test_mcnemar_published():
    assert stats.mcnemar_exact(22, 0).p_value == pytest.approx(2 * 0.5**22, rel=1e-12)
    assert f"{stats.mcnemar_exact(22, 0).p_value:.2e}" == "4.77e-07"
    assert f"{stats.mcnemar_exact(25, 0).p_value:.2e}" == "5.96e-08"
    # symmetric in b and c
    assert stats.mcnemar_exact(0, 25).p_value == stats.mcnemar_exact(25, 0).p_value


def test_anova_published():
    values = [r for _, r, _ in STUDY_B]
    labels = [a for _, _, a in STUDY_B]
    res = stats.anova_by_group(values, labels)
    assert f"{res.statistic:.3f}" == "0.127"
    assert f"{res.p_value:.3f}" == "0.942"
    assert f"{res.eta_squared:.3f}" == "0.033"
    assert (res.df_between, res.df_within) == (3, 11)


def test_mde_published():
    mde = stats.minimum_detectable_effect(0.737, 1404)
    assert f"{100 * mde:.1f}" == "4.7"
    assert f"{100 * mde:.2f}" == "4.66"
    exact_z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert stats.minimum_detectable_effect(0.737, 1404, exact_z, 0.0) == pytest.approx(
        mde * exact_z / 2.802
    )


def test_krippendorff_reference_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers x 12
    # units with missing values; nominal alpha = 0.743.
    obs = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = np.array(obs, dtype=object).T
    res = stats.krippendorff_alpha_nominal(units)
    assert round(res.alpha, 3) == 0.743
    assert res.n_units == 11  # unit 12 has a single rating


# --------------------------------------------------------------------------- intervals


def test_wilson_matches_scipy_and_score_inversion(rng):
    n = rng.integers(1, 300, size=200)
    k = rng.binomial(n, rng.uniform(0, 1, size=200))
    iv = stats.wilson_interval_array(k, n, confidence=0.9)
    z = sps.norm.ppf(0.95)
    for i in range(len(n)):
        ref = sps.binomtest(int(k[i]), int(n[i])).proportion_ci(0.9, method="wilson")
        assert iv.low[i] == pytest.approx(ref.low, abs=1e-12)
        assert iv.high[i] == pytest.approx(ref.high, abs=1e-12)
        # the ends solve |k - n p| = z sqrt(n p (1 - p)) (score-test inversion)
        for p in (iv.low[i], iv.high[i]):
            if 0 < p < 1:
                assert abs(k[i] - n[i] * p) == pytest.approx(
                    z * math.sqrt(n[i] * p * (1 - p)), rel=1e-9
                )


def test_clopper_pearson_matches_definition(rng):
    n = rng.integers(1, 200, size=100)
    k = rng.binomial(n, rng.uniform(0, 1, size=100))
    iv = stats.clopper_pearson_interval_array(k, n)
    for i in range(len(n)):
        ki, ni = int(k[i]), int(n[i])
        ref = sps.binomtest(ki, ni).proportion_ci(0.95, method="exact")
        assert iv.low[i] == pytest.approx(ref.low, abs=1e-10)
        assert iv.high[i] == pytest.approx(ref.high, abs=1e-10)
        if ki > 0:
            assert sps.binom.sf(ki - 1, ni, iv.low[i]) == pytest.approx(0.025, rel=1e-6)
        else:
            assert iv.low[i] == 0.0
        if ki < ni:
            assert sps.binom.cdf(ki, ni, iv.high[i]) == pytest.approx(0.025, rel=1e-6)
        else:
            assert iv.high[i] == 1.0


def test_interval_array_equals_scalar_and_broadcasts():
    k = np.array([0, 1, 5, 10])
    iv = stats.wilson_interval_array(k, 10)
    assert iv.low.shape == (4,)
    for i, ki in enumerate(k):
        s = stats.wilson_interval(int(ki), 10)
        assert (iv.low[i], iv.high[i]) == pytest.approx((s.low, s.high))
    assert stats.wilson_interval(10, 10).high == 1.0
    assert stats.wilson_interval(0, 10).low == 0.0


# --------------------------------------------------------------------------- binomial


def test_binomial_test_vs_enumeration(rng):
    for _ in range(30):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(0, n + 1))
        p0 = float(rng.choice([0.5, 0.3, 0.8]))
        pmf = sps.binom.pmf(np.arange(n + 1), n, p0)
        brute = pmf[pmf <= pmf[k] * (1 + 1e-7)].sum()
        assert stats.binomial_test(k, n, p0).p_value == pytest.approx(min(brute, 1.0), rel=1e-9)
    assert stats.binomial_test(28, 31, alternative="greater").p_value == pytest.approx(
        sum(binom_pmf_exact(i, 31) for i in range(28, 32)), rel=1e-12
    )


# --------------------------------------------------------------------------- McNemar


def _mcnemar_brute(b: int, c: int, mid: bool) -> float:
    m, lo = b + c, min(b, c)
    tail = sum(binom_pmf_exact(i, m) for i in range(lo + 1))
    p = 2 * tail - (binom_pmf_exact(lo, m) if mid else 0)
    return float(min(p, Fraction(1)))


def test_mcnemar_vs_enumeration(rng):
    b = rng.integers(0, 40, size=300)
    c = rng.integers(0, 40, size=300)
    exact = stats.mcnemar_exact_array(b, c)
    mid = stats.mcnemar_exact_array(b, c, mid_p=True)
    for i in range(len(b)):
        bi, ci = int(b[i]), int(c[i])
        assert exact[i] == pytest.approx(_mcnemar_brute(bi, ci, False), rel=1e-10)
        assert mid[i] == pytest.approx(_mcnemar_brute(bi, ci, True), rel=1e-10)
        assert mid[i] <= exact[i]
    # the same as statsmodels' exact McNemar on a full 2x2 table
    for bi, ci in [(3, 9), (22, 0), (7, 7), (0, 1)]:
        ref = smct.mcnemar([[5, bi], [ci, 8]], exact=True).pvalue
        assert stats.mcnemar_exact(bi, ci).p_value == pytest.approx(ref, rel=1e-12)


def test_mcnemar_edge_cases():
    assert stats.mcnemar_exact(0, 0).p_value == 1.0
    assert stats.mcnemar_midp(0, 0).p_value == 1.0
    assert stats.mcnemar_exact(5, 5).p_value == 1.0
    assert stats.mcnemar_midp(22, 0).p_value == pytest.approx(0.5**22, rel=1e-12)
    assert stats.mcnemar_exact(1, 0).p_value == 1.0


def test_paired_counts():
    x = [1, 1, 0, 0, 1, True]
    y = [0, 1, 1, 0, 0, False]
    assert stats.paired_counts(x, y) == stats.PairedCounts(b=3, c=1, n=6)


# --------------------------------------------------------------------------- 2x2


def _random_tables(rng, count, low=0, high=30):
    for _ in range(count):
        t = rng.integers(low, high, size=(2, 2))
        if (t.sum(0) > 0).all() and (t.sum(1) > 0).all():
            yield t


def test_chi_square_vs_formula(rng):
    for t in _random_tables(rng, 50, 1):
        (a, b), (c, d) = t.astype(float)
        n = a + b + c + d
        den = (a + b) * (c + d) * (a + c) * (b + d)
        plain = n * (a * d - b * c) ** 2 / den
        yates = n * max(abs(a * d - b * c) - n / 2, 0) ** 2 / den
        assert stats.chi_square_2x2(t, correction=False).statistic == pytest.approx(plain)
        res = stats.chi_square_2x2(t)
        assert res.statistic == pytest.approx(yates, abs=1e-9)
        assert res.p_value == pytest.approx(sps.chi2.sf(yates, 1), abs=1e-9)
        assert res.df == 1


def test_fisher_vs_hypergeometric_enumeration(rng):
    for t in _random_tables(rng, 40):
        (a, b), (c, d) = (int(v) for v in t.ravel()[:2]), (int(v) for v in t.ravel()[2:])
        r1, c1, n = a + b, a + c, a + b + c + d
        lo, hi = max(0, c1 - (n - r1)), min(r1, c1)

        def prob(x, r1=r1, c1=c1, n=n):
            return Fraction(math.comb(c1, x) * math.comb(n - c1, r1 - x), math.comb(n, r1))

        p_obs = prob(a)
        brute = sum(prob(x) for x in range(lo, hi + 1) if prob(x) <= p_obs * (1 + 1e-7))
        res = stats.fisher_exact_2x2(t)
        assert res.p_value == pytest.approx(min(float(brute), 1.0), rel=1e-9)


def test_odds_ratio_woolf(rng):
    for t in _random_tables(rng, 40):
        res = stats.odds_ratio_woolf(t)
        f = t.astype(float) + (0.5 if (t == 0).any() else 0.0)
        (a, b), (c, d) = f
        se = math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
        assert res.corrected == bool((t == 0).any())
        assert res.estimate == pytest.approx(a * d / (b * c))
        assert math.log(res.low) == pytest.approx(math.log(a * d / (b * c)) - 1.959964 * se)
        assert math.log(res.high) == pytest.approx(math.log(a * d / (b * c)) + 1.959964 * se)
        if not (t == 0).any():
            ref = smct.Table2x2(t.astype(float)).oddsratio_confint()
            assert (res.low, res.high) == pytest.approx(ref)


# --------------------------------------------------------------------------- multiplicity


def _holm_by_hand(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_and_bonferroni(rng):
    for _ in range(30):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 12))).tolist()
        assert stats.holm(p) == pytest.approx(_holm_by_hand(p))
        assert stats.bonferroni(p) == pytest.approx([min(1.0, len(p) * x) for x in p])
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


# --------------------------------------------------------------------------- Cochran's Q


def test_cochrans_q_vs_formula(rng):
    for _ in range(30):
        n, k = int(rng.integers(5, 60)), int(rng.integers(2, 6))
        x = (rng.uniform(size=(n, k)) < rng.uniform(0.1, 0.9, size=k)).astype(int)
        row, col, total = x.sum(1), x.sum(0), x.sum()
        den = k * total - (row**2).sum()
        res = stats.cochrans_q(x)
        if den == 0:
            assert (res.statistic, res.p_value) == (0.0, 1.0)
            continue
        q = (k - 1) * (k * (col**2).sum() - total**2) / den
        assert res.statistic == pytest.approx(q)
        assert res.p_value == pytest.approx(sps.chi2.sf(q, k - 1))
        assert res.df == k - 1


def test_cochrans_q_two_columns_is_mcnemar_chi2(rng):
    x = rng.integers(0, 2, size=(80, 2))
    pc = stats.paired_counts(x[:, 0], x[:, 1])
    assert stats.cochrans_q(x).statistic == pytest.approx((pc.b - pc.c) ** 2 / (pc.b + pc.c))


def test_cochrans_q_no_variation():
    x = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    res = stats.cochrans_q(x)
    assert (res.statistic, res.p_value) == (0.0, 1.0)


# --------------------------------------------------------------------------- Mantel-Haenszel


def _rbg_by_hand(tables):
    r = s = pr = ps_qr = qs = 0.0
    num = var = 0.0
    for t in tables:
        (a, b), (c, d) = t.astype(float)
        n = a + b + c + d
        if n < 2:
            continue
        p_, q_ = (a + d) / n, (b + c) / n
        r_, s_ = a * d / n, b * c / n
        r, s = r + r_, s + s_
        pr += p_ * r_
        ps_qr += p_ * s_ + q_ * r_
        qs += q_ * s_
        num += a - (a + b) * (a + c) / n
        var += (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1))
    v = pr / (2 * r * r) + ps_qr / (2 * r * s) + qs / (2 * s * s)
    or_mh = r / s
    half = 1.959963984540054 * math.sqrt(v)
    return or_mh, math.exp(math.log(or_mh) - half), math.exp(math.log(or_mh) + half), num**2 / var


def test_mantel_haenszel_vs_rbg_by_hand(rng):
    for _ in range(25):
        k = int(rng.integers(2, 8))
        tables = rng.integers(0, 25, size=(k, 2, 2))
        tables[0] = [[5, 3], [2, 7]]  # guarantee a*d > 0 and b*c > 0 somewhere
        res = stats.mantel_haenszel(tables)
        or_mh, low, high, chi2 = _rbg_by_hand(tables)
        assert res.odds_ratio == pytest.approx(or_mh)
        assert (res.low, res.high) == pytest.approx((low, high))
        assert res.statistic == pytest.approx(chi2)
        assert res.p_value == pytest.approx(sps.chi2.sf(chi2, 1))


def test_mantel_haenszel_drops_tiny_strata_and_rejects_degenerate():
    base = [[[5, 3], [2, 7]], [[4, 4], [1, 6]]]
    with_empty = base + [[[0, 0], [0, 0]], [[1, 0], [0, 0]]]
    a, b = stats.mantel_haenszel(base), stats.mantel_haenszel(with_empty)
    assert a == b and b.n_strata == 2
    with pytest.raises(BatchflipError, match="pooled odds ratio"):
        stats.mantel_haenszel([[[3, 0], [2, 4]], [[0, 1], [0, 5]]])  # no b*c anywhere
    with pytest.raises(BatchflipError):
        stats.mantel_haenszel(np.zeros((3, 2, 2), dtype=int))


# --------------------------------------------------------------------------- TOST


def _restricted_mle_numeric(loglik, lo, hi):
    res = optimize.minimize_scalar(
        lambda q: -loglik(q), bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}
    )
    # compare with the end points, where the maximum lies when a count is 0
    cands = [res.x, lo, hi]
    return max(cands, key=loglik)


def _xlogy(x, y):
    return 0.0 if x == 0 else x * math.log(y) if y > 0 else -math.inf


def _tango_numeric(b, c, n, d0):
    """Score z of H0: q10 - q01 = d0 with the restricted MLE found numerically."""
    if d0 >= 0:

        def ll(q):  # q = q01, q10 = q + d0
            return _xlogy(b, q + d0) + _xlogy(c, q) + _xlogy(n - b - c, 1 - 2 * q - d0)

        q = _restricted_mle_numeric(ll, 0.0, (1 - d0) / 2)
        q10, q01 = q + d0, q
    else:

        def ll(q):  # q = q10, q01 = q - d0
            return _xlogy(b, q) + _xlogy(c, q - d0) + _xlogy(n - b - c, 1 - 2 * q + d0)

        q = _restricted_mle_numeric(ll, 0.0, (1 + d0) / 2)
        q10, q01 = q, q - d0
    var = (q10 + q01 - d0 * d0) / n
    return ((b - c) / n - d0) / math.sqrt(var)


def test_tost_paired_score_vs_numeric_mle(rng):
    for _ in range(40):
        n = int(rng.integers(20, 600))
        b = int(rng.integers(0, max(1, n // 10)))
        c = int(rng.integers(0, max(1, n // 10)))
        m = float(rng.choice([0.01, 0.03, 0.05]))
        res = stats.tost_paired(b, c, n, m)
        z_lo, z_up = _tango_numeric(b, c, n, -m), _tango_numeric(b, c, n, m)
        assert res.statistic_lower == pytest.approx(z_lo, rel=1e-5, abs=1e-6)
        assert res.statistic_upper == pytest.approx(z_up, rel=1e-5, abs=1e-6)
        assert res.p_lower == pytest.approx(sps.norm.sf(z_lo), rel=1e-4, abs=1e-9)
        assert res.p_value == max(res.p_lower, res.p_upper)
        assert res.estimate == pytest.approx((b - c) / n)


def test_tost_paired_zero_discordant_and_wald():
    res = stats.tost_paired(0, 0, 468, 0.03)
    assert res.p_lower == pytest.approx(res.p_upper)  # symmetric problem
    assert 0 < res.p_value < 0.05  # 468 identical pairs: equivalent within 3 pp
    # Wald by hand
    b, c, n, m = 12, 5, 300, 0.03
    d = (b - c) / n
    se = math.sqrt(((b + c) / n - d * d) / n)
    w = stats.tost_paired(b, c, n, m, method="wald")
    assert w.p_lower == pytest.approx(sps.norm.sf((d + m) / se))
    assert w.p_upper == pytest.approx(sps.norm.cdf((d - m) / se))
    with pytest.raises(BatchflipError, match="score"):
        stats.tost_paired(0, 0, 100, 0.03, method="wald")
    x = [1] * 12 + [0] * 5 + [1] * 20 + [0] * 263
    y = [0] * 12 + [1] * 5 + [1] * 20 + [0] * 263
    assert stats.tost_paired_from_pairs(x, y, m, method="wald") == w


def _fm_z_numeric(k1, n1, k2, n2, d0):
    """Farrington-Manning z with the restricted MLE found by bounded numerical search."""

    def ll(p1):
        p2 = p1 - d0
        return _xlogy(k1, p1) + _xlogy(n1 - k1, 1 - p1) + _xlogy(k2, p2) + _xlogy(n2 - k2, 1 - p2)

    p1 = _restricted_mle_numeric(ll, max(0.0, d0), min(1.0, 1 + d0))
    p2 = p1 - d0
    return (k1 / n1 - k2 / n2 - d0) / math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def test_tost_two_proportions_score_vs_numeric_mle(rng):
    # not compared with statsmodels' score test: its restricted-MLE cubic has a wrong
    # coefficient (statsmodels issue #10269), off by ~1e-3 in z
    for _ in range(30):
        n1, n2 = int(rng.integers(50, 2000)), int(rng.integers(50, 2000))
        k1 = int(rng.binomial(n1, rng.uniform(0.01, 0.6)))
        k2 = int(rng.binomial(n2, rng.uniform(0.01, 0.6)))
        m = float(rng.choice([0.03, 0.05, 0.1]))
        res = stats.tost_two_proportions(k1, n1, k2, n2, m)
        z_lo, z_up = _fm_z_numeric(k1, n1, k2, n2, -m), _fm_z_numeric(k1, n1, k2, n2, m)
        assert res.statistic_lower == pytest.approx(z_lo, rel=1e-6, abs=1e-7)
        assert res.statistic_upper == pytest.approx(z_up, rel=1e-6, abs=1e-7)
        assert res.p_value == pytest.approx(max(sps.norm.sf(z_lo), sps.norm.cdf(z_up)), rel=1e-5)


def test_tost_two_proportions_wald_vs_statsmodels(rng):
    for _ in range(30):
        n1, n2 = int(rng.integers(50, 2000)), int(rng.integers(50, 2000))
        k1, k2 = int(rng.binomial(n1, 0.3)), int(rng.binomial(n2, 0.3))
        m = 0.05
        w = stats.tost_two_proportions(k1, n1, k2, n2, m, method="wald")
        ref = tost_proportions_2indep(k1, n1, k2, n2, -m, m, method="wald", correction=False)
        assert w.p_lower == pytest.approx(ref.results_larger.pvalue, rel=1e-9)
        assert w.p_upper == pytest.approx(ref.results_smaller.pvalue, rel=1e-9)
        assert w.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_tost_two_proportions_zero_counts_vs_numeric_mle():
    # both arms without a single flip: the restricted MLE sits on the boundary p = 0
    k1, n1, k2, n2, m = 0, 1404, 0, 1404, 0.03
    res = stats.tost_two_proportions(k1, n1, k2, n2, m)
    z_expected = m / math.sqrt(m * (1 - m) / n2)  # p1~ = 0, p2~ = m
    assert res.statistic_lower == pytest.approx(z_expected, rel=1e-9)
    assert res.p_lower == pytest.approx(res.p_upper, rel=1e-12)

    for k1, n1, k2, n2 in [(0, 300, 4, 280), (3, 400, 0, 500), (1, 50, 1, 60)]:
        res = stats.tost_two_proportions(k1, n1, k2, n2, m)
        assert res.statistic_lower == pytest.approx(_fm_z_numeric(k1, n1, k2, n2, -m), rel=1e-5)
        assert res.statistic_upper == pytest.approx(_fm_z_numeric(k1, n1, k2, n2, m), rel=1e-5)


# --------------------------------------------------------------------------- ANOVA


def test_anova_vs_formula(rng):
    for _ in range(20):
        groups = [rng.normal(rng.normal(), 1, size=int(rng.integers(2, 9))) for _ in range(4)]
        allv = np.concatenate(groups)
        ssb = sum(len(g) * (g.mean() - allv.mean()) ** 2 for g in groups)
        ssw = sum(((g - g.mean()) ** 2).sum() for g in groups)
        dfb, dfw = len(groups) - 1, len(allv) - len(groups)
        f = (ssb / dfb) / (ssw / dfw)
        res = stats.one_way_anova(groups)
        assert res.statistic == pytest.approx(f)
        assert res.p_value == pytest.approx(sps.f.sf(f, dfb, dfw))
        assert res.eta_squared == pytest.approx(ssb / (ssb + ssw))
        assert res.eta_squared == pytest.approx(f * dfb / (f * dfb + dfw))


# Study A phase 3's table: 3 quantizations x concurrency 1, 4, 8, 4 rows a cell (refusal
# scores 0 / 0.5 / 1, as the harness's per-row score), written by hand; balanced
QC_TABLE = {
    ("Q8_0", "1"): [1, 1, 0, 1], ("Q8_0", "4"): [1, 0, 1, 1], ("Q8_0", "8"): [1, 1, 1, 0.5],
    ("Q4_K_M", "1"): [1, 0, 0, 1], ("Q4_K_M", "4"): [0, 0, 1, 0.5], ("Q4_K_M", "8"): [1, 0, 0, 0],
    ("Q2_K", "1"): [0, 0, 1, 0], ("Q2_K", "4"): [0, 0, 0, 0.5], ("Q2_K", "8"): [0, 1, 0, 0],
}


def _qc_frame(table: dict) -> pd.DataFrame:
    return pd.DataFrame([{"quant": q, "conc": c, "score": float(v)}
                         for (q, c), vs in table.items() for v in vs])


def _statsmodels_typ2(df: pd.DataFrame) -> pd.DataFrame:
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    return anova_lm(smf.ols("score ~ C(quant) * C(conc)", data=df).fit(), typ=2)


@pytest.mark.parametrize("drop", [[], [0, 5, 9, 20, 30]])  # balanced; then unbalanced
def test_two_way_anova_matches_statsmodels_type_2(drop):
    df = _qc_frame(QC_TABLE).drop(index=drop).reset_index(drop=True)
    res = stats.two_way_anova(df["score"], df["quant"], df["conc"])
    sm = _statsmodels_typ2(df)
    total = float(((df["score"] - df["score"].mean()) ** 2).sum())
    for effect, row in ((res.a, "C(quant)"), (res.b, "C(conc)"),
                        (res.interaction, "C(quant):C(conc)")):
        assert effect.ss == pytest.approx(sm.loc[row, "sum_sq"], rel=1e-9, abs=1e-12)
        assert effect.df == sm.loc[row, "df"]
        assert effect.statistic == pytest.approx(sm.loc[row, "F"], rel=1e-9)
        assert effect.p_value == pytest.approx(sm.loc[row, "PR(>F)"], rel=1e-9)
        assert effect.eta_squared == pytest.approx(sm.loc[row, "sum_sq"] / total, rel=1e-9)
    assert res.ss_residual == pytest.approx(sm.loc["Residual", "sum_sq"], rel=1e-9)
    assert res.df_residual == sm.loc["Residual", "df"] == len(df) - 9 == 27 - len(drop)
    assert (res.ss_total, res.n) == (pytest.approx(total), len(df))


def test_two_way_anova_balanced_by_hand():
    # balanced: the Type II sums of squares are the marginal-means ones (the harness's)
    df = _qc_frame(QC_TABLE)
    grand = df["score"].mean()
    ss = {f: float(sum(len(g) * (g.mean() - grand) ** 2 for _, g in df.groupby(f)["score"]))
          for f in ("quant", "conc")}
    cells = df.groupby(["quant", "conc"])["score"]
    ss_cells = float(sum(len(g) * (g.mean() - grand) ** 2 for _, g in cells))
    ss_within = float(sum(((g - g.mean()) ** 2).sum() for _, g in cells))
    res = stats.two_way_anova(df["score"], df["quant"], df["conc"])
    assert res.a.ss == pytest.approx(ss["quant"]) and res.b.ss == pytest.approx(ss["conc"])
    assert res.interaction.ss == pytest.approx(ss_cells - ss["quant"] - ss["conc"])
    assert res.a.statistic == pytest.approx((ss["quant"] / 2) / (ss_within / 27))


@pytest.mark.parametrize(("table", "message"), [
    ({k: [1.0] * 4 for k in QC_TABLE}, "all values are equal"),
    ({k: [float(k[0] == "Q8_0")] * 4 for k in QC_TABLE}, "every cell is constant"),
    ({k: v for k, v in QC_TABLE.items() if k[0] == "Q8_0"}, "factor a has only 1 level"),
    ({k: v for k, v in QC_TABLE.items() if k[1] == "1"}, "factor b has only 1 level"),
    ({k: v[:1] for k, v in QC_TABLE.items()}, "no residual degree of freedom"),
    ({k: v for k, v in QC_TABLE.items() if k != ("Q2_K", "8")}, r"cell \('Q2_K', '8'\)"),
])
def test_two_way_anova_degenerate_tables_raise(table, message):
    df = _qc_frame(table)
    with pytest.raises(BatchflipError, match=message):
        stats.two_way_anova(df["score"], df["quant"], df["conc"])


# --------------------------------------------------------------------------- correlation


def _pearson_last_axis(u, v, axis=-1):
    u = u - u.mean(axis=-1, keepdims=True)
    v = v - v.mean(axis=-1, keepdims=True)
    return (u * v).sum(-1) / np.sqrt((u * u).sum(-1) * (v * v).sum(-1))


def test_pearson_bootstrap_seeded_and_close_to_scipy(rng):
    x = rng.normal(size=15)
    y = 0.8 * x + rng.normal(scale=0.5, size=15)
    a = stats.pearson_bootstrap(x, y, n_resamples=4000, seed=7)
    assert a == stats.pearson_bootstrap(x, y, n_resamples=4000, seed=7)
    assert a != stats.pearson_bootstrap(x, y, n_resamples=4000, seed=8)
    assert a.r == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert a.low < a.r < a.high
    kwargs = {
        "rng"
        if "rng" in inspect.signature(sps.bootstrap).parameters
        else "random_state": np.random.default_rng(1)
    }
    ref = sps.bootstrap(
        (x, y),
        _pearson_last_axis,
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=4000,
        **kwargs,
    ).confidence_interval
    # two independent Monte-Carlo streams: agree to Monte-Carlo error
    assert a.low == pytest.approx(ref.low, abs=0.05)
    assert a.high == pytest.approx(ref.high, abs=0.03)


def test_pearson_bootstrap_resamples_units_not_rows(rng):
    units = [f"m{i}" for i in range(15)]
    ux = rng.uniform(0, 10, size=15)
    uy = ux + rng.normal(size=15)
    # unit 0 has 500 generation rows, the others 3 each; row-level resampling would weight
    # unit 0 heavily, unit-level resampling must not
    rows = []
    for i, u in enumerate(units):
        reps = 500 if i == 0 else 3
        rows += [{"unit": u, "x": ux[i], "y": uy[i]}] * reps
    long = pd.DataFrame(rows).sample(frac=1.0, random_state=3)
    res = stats.pearson_bootstrap_units(long, "x", "y", "unit", n_resamples=500, seed=11)
    order = np.argsort(units)  # units are taken in name order
    direct = stats.pearson_bootstrap(ux[order], uy[order], n_resamples=500, seed=11)
    # same draws of units; equal up to the rounding of the per-unit means
    assert (res.r, res.low, res.high) == pytest.approx((direct.r, direct.low, direct.high))
    assert res.n_units == 15 and res.n_degenerate == direct.n_degenerate


def test_pearson_bootstrap_degenerate_resamples_are_counted():
    x, y = [0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]
    res = stats.pearson_bootstrap(x, y, n_resamples=2000, seed=0)
    # P(no draw of unit 3 in 4 draws) = (3/4)^4 = 0.316
    assert 0.25 < res.n_degenerate / 2000 < 0.39
    assert -1.0 <= res.low <= res.high <= 1.0


# --------------------------------------------------------------------------- agreement


def _cohen_by_hand(r1, r2):
    n = len(r1)
    cats = set(r1) | set(r2)
    po = sum(a == b for a, b in zip(r1, r2, strict=True)) / n
    pe = sum((r1.count(c) / n) * (r2.count(c) / n) for c in cats)
    return (po - pe) / (1 - pe)


def test_cohens_kappa_vs_hand(rng):
    for _ in range(30):
        n = int(rng.integers(5, 80))
        r1 = rng.choice(["genuine", "artifact", "unclear"], size=n).tolist()
        r2 = [a if rng.uniform() < 0.6 else rng.choice(["genuine", "artifact"]) for a in r1]
        r2 = [str(v) for v in r2]
        if len(set(r1) | set(r2)) < 2:
            continue
        assert stats.cohens_kappa(r1, r2).kappa == pytest.approx(_cohen_by_hand(r1, r2))


def _fleiss_by_hand(matrix):
    cats = sorted({v for row in matrix for v in row})
    n_sub, n_rat = len(matrix), len(matrix[0])
    counts = [[row.count(c) for c in cats] for row in matrix]
    p_i = [(sum(x * x for x in cnt) - n_rat) / (n_rat * (n_rat - 1)) for cnt in counts]
    p_bar = sum(p_i) / n_sub
    p_j = [sum(cnt[j] for cnt in counts) / (n_sub * n_rat) for j in range(len(cats))]
    p_e = sum(p * p for p in p_j)
    return (p_bar - p_e) / (1 - p_e)


def test_fleiss_kappa_vs_hand(rng):
    for _ in range(30):
        n_sub, n_rat = int(rng.integers(3, 40)), int(rng.integers(2, 6))
        truth = rng.integers(0, 3, size=n_sub)
        m = [
            [int(t) if rng.uniform() < 0.7 else int(rng.integers(0, 3)) for _ in range(n_rat)]
            for t in truth
        ]
        if len({v for row in m for v in row}) < 2:
            continue
        assert stats.fleiss_kappa(m).kappa == pytest.approx(_fleiss_by_hand(m))


def _alpha_by_pairs(matrix):
    """Nominal alpha from an explicitly enumerated coincidence matrix."""
    o: dict[tuple, float] = {}
    for row in matrix:
        vals = [v for v in row if v is not None]
        m = len(vals)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            key = (vals[i], vals[j])
            o[key] = o.get(key, 0.0) + 1.0 / (m - 1)
    cats = sorted({c for c, _ in o})
    n_c = {c: sum(v for (a, _), v in o.items() if a == c) for c in cats}
    n = sum(n_c.values())
    d_o = sum(v for (a, b), v in o.items() if a != b)
    d_e = sum(n_c[a] * n_c[b] for a in cats for b in cats if a != b) / (n - 1)
    return 1 - d_o / d_e


def test_krippendorff_vs_hand_coincidences(rng):
    for _ in range(30):
        n_units, n_rat = int(rng.integers(4, 30)), int(rng.integers(2, 5))
        truth = rng.integers(0, 3, size=n_units)
        m = []
        for t in truth:
            row = []
            for _ in range(n_rat):
                if rng.uniform() < 0.25:
                    row.append(None)
                else:
                    row.append(int(t) if rng.uniform() < 0.7 else int(rng.integers(0, 3)))
            m.append(row)
        try:
            expected = _alpha_by_pairs(m)
        except ZeroDivisionError:
            continue
        assert stats.krippendorff_alpha_nominal(m).alpha == pytest.approx(expected)


def test_krippendorff_nan_missing_and_two_raters():
    with_nan = np.array([[1.0, 1.0], [2.0, np.nan], [2.0, 2.0], [1.0, 2.0]])
    with_none = [[1, 1], [2, None], [2, 2], [1, 2]]
    a = stats.krippendorff_alpha_nominal(with_nan)
    assert a.alpha == pytest.approx(stats.krippendorff_alpha_nominal(with_none).alpha)
    assert a.n_units == 3
    perfect = stats.krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["a", "a"]])
    assert perfect.alpha == pytest.approx(1.0)


# --------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "call",
    [
        lambda: stats.wilson_interval(0, 0),
        lambda: stats.wilson_interval(5, 4),
        lambda: stats.wilson_interval(-1, 4),
        lambda: stats.wilson_interval(1.5, 4),
        lambda: stats.wilson_interval_array([1, 2], [3, 0]),
        lambda: stats.wilson_interval_array([], []),
        lambda: stats.clopper_pearson_interval_array([1, 5], [3, 4]),
        lambda: stats.wilson_interval(1, 4, confidence=1.0),
        lambda: stats.binomial_test(0, 0),
        lambda: stats.mcnemar_exact(-1, 3),
        lambda: stats.mcnemar_exact_array([1, np.nan], [0, 0]),
        lambda: stats.chi_square_2x2([[0, 0], [0, 0]]),
        lambda: stats.chi_square_2x2([[0, 0], [3, 4]]),
        lambda: stats.fisher_exact_2x2([[1, 2, 3], [4, 5, 6]]),
        lambda: stats.odds_ratio_woolf([[0, 5], [0, 3]]),
        lambda: stats.holm([]),
        lambda: stats.holm([0.2, float("nan")]),
        lambda: stats.bonferroni([1.5]),
        lambda: stats.cochrans_q([[1], [0]]),
        lambda: stats.cochrans_q([[1, 2], [0, 1]]),
        lambda: stats.tost_paired(3, 3, 5, 0.03),
        lambda: stats.tost_paired(1, 1, 0, 0.03),
        lambda: stats.tost_paired(1, 1, 10, 0.0),
        lambda: stats.tost_two_proportions(1, 0, 1, 10, 0.03),
        lambda: stats.one_way_anova([[1.0, 2.0]]),
        lambda: stats.one_way_anova([[1.0, 1.0], [1.0, 1.0]]),
        lambda: stats.one_way_anova([[1.0], []]),
        lambda: stats.pearson_bootstrap([1, 2], [3, 4]),
        lambda: stats.pearson_bootstrap([1, 1, 1], [3, 4, 5]),
        lambda: stats.minimum_detectable_effect(0.5, 0),
        lambda: stats.minimum_detectable_effect(1.5, 10),
        lambda: stats.cohens_kappa(["a", "a"], ["a", "a"]),
        lambda: stats.cohens_kappa(["a"], ["a", "b"]),
        lambda: stats.cohens_kappa([], []),
        lambda: stats.fleiss_kappa([["a", None], ["b", "b"]]),
        lambda: stats.krippendorff_alpha_nominal([["a", None], [None, "b"]]),
        lambda: stats.krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]),
        lambda: stats.paired_counts([1, 0], [1]),
        lambda: stats.paired_counts([1, 2], [1, 0]),
    ],
)
def test_invalid_input_raises_batchflip_error(call):
    with pytest.raises(BatchflipError):
        call()


def test_error_messages_name_the_problem():
    with pytest.raises(BatchflipError, match="n must be positive"):
        stats.wilson_interval(0, 0)
    with pytest.raises(BatchflipError, match="k must not exceed n"):
        stats.clopper_pearson_interval(5, 4)
    with pytest.raises(BatchflipError, match="element 1"):
        stats.mcnemar_exact_array([0, -2], [0, 0])


def test_no_nan_in_results_at_boundaries():
    results = [
        stats.wilson_interval(0, 1),
        stats.clopper_pearson_interval(1, 1),
        stats.mcnemar_midp(0, 0),
        stats.tost_paired(0, 0, 1, 0.03),
        stats.tost_two_proportions(0, 1, 1, 1, 0.5),
        stats.cochrans_q([[0, 0], [1, 1]]),
        stats.odds_ratio_woolf([[0, 3], [4, 0]]),
    ]
    for r in results:
        for v in r.__dataclass_fields__:
            val = getattr(r, v)
            if isinstance(val, float):
                assert not math.isnan(val), (r, v)


@pytest.mark.parametrize(
    "groups",
    [
        [[0.1] * 3, [0.7] * 3],  # float sums of squares leave SS_within at ~5.8e-34, not 0
        [[0.1] * 3, [0.7] * 2, [0.3] * 4],
        [[0.2] * 3, [0.2] * 3],
        [[1e-300, 1e-300], [2e-300, 3e-300]],  # scipy underflows to F = nan
    ],
)
def test_anova_of_constant_groups_is_not_estimable_never_inf_or_nan(groups):
    # every group constant: within-group variance is exactly 0, so F = MS_b / 0 is undefined
    with pytest.raises(BatchflipError, match="constant|all values are equal|not finite"):
        stats.one_way_anova(groups)


def test_anova_with_one_constant_group_is_still_estimable():
    # hand-computed: groups [.1,.1,.1] and [.7,.7,.8]; grand mean 2.5/6; SS_b = 3(.1-m)^2 +
    # 3(.7333-m)^2 = 0.6016.., SS_w = 2 x (0.0333..)^2 + (0.0666..)^2 = 0.00666..; F = SS_b /
    # (SS_w / 4)
    g1, g2 = [0.1, 0.1, 0.1], [0.7, 0.7, 0.8]
    m, m2 = 2.5 / 6, 2.2 / 3
    ss_b = 3 * (0.1 - m) ** 2 + 3 * (m2 - m) ** 2
    ss_w = sum((x - m2) ** 2 for x in g2)
    res = stats.one_way_anova([g1, g2])
    assert res.statistic == pytest.approx(ss_b / (ss_w / 4), rel=1e-9)
    assert res.statistic == pytest.approx(361.0, rel=1e-9)
    assert math.isfinite(res.p_value) and res.eta_squared == pytest.approx(ss_b / (ss_b + ss_w))
