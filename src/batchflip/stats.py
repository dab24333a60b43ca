"""Statistics behind every number of the paper: small, pure, typed functions.

Each function states its inputs, its output, the exact method, and the scipy or statsmodels
call that stands behind it. Where those libraries implement the method, we call them and
only validate input and shape the result; we write the closed form ourselves only where
they lack the method or misbehave at the boundaries this project meets (zero counts).

Conventions
-----------
- Counts are non-negative integers (Python ints, numpy integers, or integer-valued floats).
  Invalid input (``n = 0``, ``k > n``, negative or fractional counts, empty or degenerate
  tables, NaN) raises :class:`batchflip.errors.BatchflipError` with a message naming the
  argument. No function returns NaN: where a statistic is undefined for the given data
  (for example kappa when both raters use a single category) it raises instead.
- Intervals are two-sided at ``confidence`` (default 0.95) and clipped to [0, 1] for
  proportions.
- Functions whose name ends in ``_array`` take numpy arrays (broadcast against each
  other) and return arrays; they are meant for one call over millions of flip rows.
- Results are frozen dataclasses; ``dataclasses.asdict`` turns them into JSON-ready dicts
  (values are plain Python floats and ints).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import optimize
from scipy import stats as sps
from statsmodels.stats import contingency_tables as smct
from statsmodels.stats import inter_rater as smir
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from batchflip.errors import BatchflipError

__all__ = [
    "AlphaResult",
    "AnovaEffect",
    "AnovaResult",
    "CorrelationResult",
    "Interval",
    "IntervalArray",
    "KappaResult",
    "MantelHaenszelResult",
    "OddsRatio",
    "PairedCounts",
    "TOSTResult",
    "TwoWayAnovaResult",
    "TestResult",
    "anova_by_group",
    "binomial_test",
    "bonferroni",
    "chi_square_2x2",
    "clopper_pearson_interval",
    "clopper_pearson_interval_array",
    "cochrans_q",
    "cohens_kappa",
    "fisher_exact_2x2",
    "fleiss_kappa",
    "holm",
    "krippendorff_alpha_nominal",
    "mantel_haenszel",
    "mcnemar_exact",
    "mcnemar_exact_array",
    "mcnemar_midp",
    "minimum_detectable_effect",
    "odds_ratio_woolf",
    "one_way_anova",
    "paired_counts",
    "paired_difference_interval",
    "pearson_bootstrap",
    "pearson_bootstrap_units",
    "tost_paired",
    "tost_paired_from_pairs",
    "tost_two_proportions",
    "two_way_anova",
    "wilson_interval",
    "wilson_interval_array",
]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Interval:
    """A two-sided interval ``[low, high]``."""

    low: float
    high: float


@dataclass(frozen=True, slots=True)
class IntervalArray:
    """Element-wise intervals: ``low[i] <= high[i]``, arrays of the broadcast input shape."""

    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True, slots=True)
class TestResult:
    """A test statistic and its p value; ``df`` where the reference distribution has one."""

    __test__ = False  # not a pytest test class

    statistic: float
    p_value: float
    method: str
    df: float | None = None


@dataclass(frozen=True, slots=True)
class PairedCounts:
    """Discordant counts of a paired binary design with ``n`` pairs.

    ``b`` = pairs with x = 1 and y = 0, ``c`` = pairs with x = 0 and y = 1.
    """

    b: int
    c: int
    n: int


@dataclass(frozen=True, slots=True)
class OddsRatio:
    """Sample odds ratio ``ad / bc`` with a Woolf (log) interval.

    ``corrected`` is True when 0.5 was added to every cell (Haldane-Anscombe) because the
    table had a zero cell.
    """

    estimate: float
    low: float
    high: float
    corrected: bool


@dataclass(frozen=True, slots=True)
class MantelHaenszelResult:
    """Mantel-Haenszel pooled odds ratio, its Robins-Breslow-Greenland interval, and the
    Cochran-Mantel-Haenszel test of a common odds ratio of 1 (no continuity correction)."""

    odds_ratio: float
    low: float
    high: float
    statistic: float
    p_value: float
    n_strata: int


@dataclass(frozen=True, slots=True)
class TOSTResult:
    """Two one-sided tests for equivalence of two proportions within ``+-margin``.

    ``estimate`` is the difference p_x - p_y (paired) or p1 - p2 (unpaired).
    ``p_lower`` tests H0: diff <= -margin; ``p_upper`` tests H0: diff >= +margin;
    ``p_value = max(p_lower, p_upper)``; equivalence is shown at level alpha when
    ``p_value < alpha``.
    """

    estimate: float
    margin: float
    statistic_lower: float
    p_lower: float
    statistic_upper: float
    p_upper: float
    p_value: float
    method: str


@dataclass(frozen=True, slots=True)
class AnovaResult:
    """One-way ANOVA: F, its p value, degrees of freedom and eta^2 = SS_between / SS_total."""

    statistic: float
    p_value: float
    df_between: int
    df_within: int
    eta_squared: float


@dataclass(frozen=True, slots=True)
class AnovaEffect:
    """One effect of a two-way ANOVA: Type II sum of squares, its degrees of freedom, F
    against the residual mean square, p, and eta^2 = SS_effect / SS_total."""

    ss: float
    df: int
    statistic: float
    p_value: float
    eta_squared: float


@dataclass(frozen=True, slots=True)
class TwoWayAnovaResult:
    """Two-way ANOVA with interaction: the effects of factors a and b and of a x b, the
    residual sum of squares and degrees of freedom, the total sum of squares, n."""

    a: AnovaEffect
    b: AnovaEffect
    interaction: AnovaEffect
    ss_residual: float
    df_residual: int
    ss_total: float
    n: int


@dataclass(frozen=True, slots=True)
class CorrelationResult:
    """Pearson r with its t-test p value and a percentile bootstrap interval over units.

    ``n_degenerate`` counts resamples dropped because x or y was constant in them (r is
    undefined there); the interval uses the ``n_resamples - n_degenerate`` others.
    """

    r: float
    p_value: float
    low: float
    high: float
    n_units: int
    n_resamples: int
    n_degenerate: int
    seed: int


@dataclass(frozen=True, slots=True)
class KappaResult:
    """A kappa coefficient with observed and chance agreement (proportions)."""

    kappa: float
    p_observed: float
    p_expected: float
    n_subjects: int


@dataclass(frozen=True, slots=True)
class AlphaResult:
    """Krippendorff's alpha = 1 - D_o / D_e, with the observed and expected disagreement,
    the number of pairable units (>= 2 ratings) and of pairable values."""

    alpha: float
    d_observed: float
    d_expected: float
    n_units: int
    n_values: int


# --------------------------------------------------------------------------- validation


def _fail(message: str) -> BatchflipError:
    return BatchflipError(message)


def _as_count(value: Any, name: str) -> int:
    """Return ``value`` as a Python int if it is a non-negative integer count."""
    if isinstance(value, (bool, np.bool_)):
        raise _fail(f"{name} must be an integer count, got a boolean ({value!r})")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise _fail(f"{name} must be an integer count, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise _fail(f"{name} must be an integer count, got {value!r}")
    if f < 0:
        raise _fail(f"{name} must be non-negative, got {value!r}")
    return int(f)


def _as_count_array(value: npt.ArrayLike, name: str) -> np.ndarray:
    """Return ``value`` as an int64 array of non-negative integer counts."""
    a = np.asarray(value)
    if a.size == 0:
        raise _fail(f"{name} is empty")
    if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
        raise _fail(f"{name} must hold integer counts, got dtype {a.dtype}")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = int(np.flatnonzero(bad.ravel())[0])
            raise _fail(f"{name} must hold integer counts; element {i} is {a.ravel()[i]!r}")
    neg = a < 0
    if neg.any():
        i = int(np.flatnonzero(neg.ravel())[0])
        raise _fail(f"{name} must be non-negative; element {i} is {a.ravel()[i]!r}")
    return a.astype(np.int64, copy=False)


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise _fail(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
    return c


def _check_k_n_arrays(k: npt.ArrayLike, n: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ka = _as_count_array(k, "k")
    na = _as_count_array(n, "n")
    try:
        ka, na = np.broadcast_arrays(ka, na)
    except ValueError:
        raise _fail(f"k and n have incompatible shapes {ka.shape} and {na.shape}") from None
    zero = na == 0
    if zero.any():
        i = int(np.flatnonzero(zero.ravel())[0])
        raise _fail(f"n must be positive; element {i} is 0 (a proportion of nothing)")
    over = ka > na
    if over.any():
        i = int(np.flatnonzero(over.ravel())[0])
        raise _fail(f"k must not exceed n; element {i} has k={ka.ravel()[i]} > n={na.ravel()[i]}")
    return ka, na


def _check_k_n(k: Any, n: Any) -> tuple[int, int]:
    ki, ni = _as_count(k, "k"), _as_count(n, "n")
    if ni == 0:
        raise _fail("n must be positive, got 0 (a proportion of nothing)")
    if ki > ni:
        raise _fail(f"k must not exceed n, got k={ki} > n={ni}")
    return ki, ni


def _table_2x2(table: npt.ArrayLike) -> np.ndarray:
    t = _as_count_array(table, "table")
    if t.shape != (2, 2):
        raise _fail(f"table must be 2x2, got shape {t.shape}")
    if t.sum() == 0:
        raise _fail("table is empty (all four cells are 0)")
    return t


def _finite_float_array(values: npt.ArrayLike, name: str) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(f"{name} must be numeric") from None
    if a.size == 0:
        raise _fail(f"{name} is empty")
    if not np.isfinite(a).all():
        raise _fail(f"{name} contains NaN or infinite values")
    return a


def _binary_array(values: npt.ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.size == 0:
        raise _fail(f"{name} is empty")
    if a.dtype.kind == "b":
        return a.astype(np.int8)
    if a.dtype.kind not in "iuf":
        raise _fail(f"{name} must hold 0/1 values, got dtype {a.dtype}")
    if not np.isin(a, (0, 1)).all():
        raise _fail(f"{name} must hold only 0 and 1")
    return a.astype(np.int8)


# --------------------------------------------------------------------------- proportions


def wilson_interval_array(
    k: npt.ArrayLike, n: npt.ArrayLike, confidence: float = 0.95
) -> IntervalArray:
    """Wilson score interval for k successes out of n, element-wise over arrays.

    Inputs: integer arrays (or scalars) ``k`` and ``n`` that broadcast, ``0 <= k <= n``,
    ``n >= 1``. Output: :class:`IntervalArray` of floats in [0, 1].
    Method: the score interval (Wilson 1927), ``(k + z^2/2) / (n + z^2) +-
    z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)`` with ``z = Phi^-1(1 - (1 - confidence)/2)``;
    computed by ``statsmodels.stats.proportion.proportion_confint(k, n, alpha,
    method="wilson")``, which is vectorised numpy; the ends are set to exactly 0 when
    k = 0 and 1 when k = n.
    """
    ka, na = _check_k_n_arrays(k, n)
    conf = _check_confidence(confidence)
    low, high = proportion_confint(ka, na, alpha=1.0 - conf, method="wilson")
    # the closed form leaves rounding residue (~1e-16) where the exact end is 0 or 1
    low = np.where(ka == 0, 0.0, low)
    high = np.where(ka == na, 1.0, high)
    return IntervalArray(np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for one proportion k/n; see :func:`wilson_interval_array`.

    Example: ``wilson_interval(28, 31)`` gives ``Interval(0.751, 0.967)`` (rounded).
    """
    ki, ni = _check_k_n(k, n)
    iv = wilson_interval_array(ki, ni, confidence)
    return Interval(float(iv.low), float(iv.high))


def clopper_pearson_interval_array(
    k: npt.ArrayLike, n: npt.ArrayLike, confidence: float = 0.95
) -> IntervalArray:
    """Clopper-Pearson ("exact") interval for k/n, element-wise over arrays.

    Inputs as :func:`wilson_interval_array`. Method: the beta-quantile form,
    ``low = Beta^-1(alpha/2; k, n - k + 1)`` (0 when k = 0) and
    ``high = Beta^-1(1 - alpha/2; k + 1, n - k)`` (1 when k = n); computed by
    ``statsmodels.stats.proportion.proportion_confint(k, n, alpha, method="beta")``.
    """
    ka, na = _check_k_n_arrays(k, n)
    conf = _check_confidence(confidence)
    low, high = proportion_confint(ka, na, alpha=1.0 - conf, method="beta")
    low = np.where(ka == 0, 0.0, low)
    high = np.where(ka == na, 1.0, high)
    return IntervalArray(np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0))


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Clopper-Pearson interval for one proportion; see :func:`clopper_pearson_interval_array`."""
    ki, ni = _check_k_n(k, n)
    iv = clopper_pearson_interval_array(ki, ni, confidence)
    return Interval(float(iv.low), float(iv.high))


def binomial_test(k: int, n: int, p: float = 0.5, alternative: str = "two-sided") -> TestResult:
    """Exact binomial test of H0: success probability = ``p``.

    Inputs: counts ``0 <= k <= n``, ``n >= 1``; ``p`` in (0, 1); ``alternative`` one of
    "two-sided", "greater", "less". Output: ``TestResult(statistic=k, p_value)``.
    Method: ``scipy.stats.binomtest(k, n, p, alternative)``; the two-sided p value sums the
    probabilities of all outcomes no more likely than the observed one (for p = 0.5 this is
    ``min(1, 2 * P(X <= min(k, n - k)))``). Used as the direction test for flips
    (to_unsafe out of all directional flips).
    """
    ki, ni = _check_k_n(k, n)
    if not 0.0 < float(p) < 1.0:
        raise _fail(f"p must lie strictly between 0 and 1, got {p!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise _fail(f"alternative must be two-sided, greater or less, got {alternative!r}")
    res = sps.binomtest(ki, ni, float(p), alternative=alternative)
    return TestResult(float(ki), float(res.pvalue), f"exact binomial ({alternative}), p0={p}")


def minimum_detectable_effect(
    p: float, n: int, z_alpha: float = 1.96, z_power: float = 0.842
) -> float:
    """Minimum detectable difference of two proportions, ``(z_alpha + z_power) *
    sqrt(2 p (1 - p) / n)``, as a proportion (multiply by 100 for percentage points).

    Inputs: baseline proportion ``p`` in [0, 1]; per-arm sample size ``n >= 1``. The
    defaults are the paper's constants (two-sided alpha 0.05, power 0.80, rounded z);
    pass ``scipy.stats.norm.ppf`` values for unrounded ones. The paper's Study C value is
    ``minimum_detectable_effect(0.737, 1404)`` = 0.0466 (printed "4.7pp").
    No library call: this is the normal-approximation formula itself.
    """
    pf = float(p)
    if not 0.0 <= pf <= 1.0 or not math.isfinite(pf):
        raise _fail(f"p must lie in [0, 1], got {p!r}")
    ni = _as_count(n, "n")
    if ni == 0:
        raise _fail("n must be positive, got 0")
    return (float(z_alpha) + float(z_power)) * math.sqrt(2.0 * pf * (1.0 - pf) / ni)


# --------------------------------------------------------------------------- paired tests


def paired_counts(x: npt.ArrayLike, y: npt.ArrayLike) -> PairedCounts:
    """Discordant counts of two paired 0/1 vectors of equal length.

    Output: ``PairedCounts(b, c, n)`` with b = #(x=1, y=0), c = #(x=0, y=1), n = len(x).
    Booleans are accepted. No library call.
    """
    xa, ya = _binary_array(x, "x"), _binary_array(y, "y")
    if xa.ndim != 1 or xa.shape != ya.shape:
        raise _fail(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    b = int(np.count_nonzero((xa == 1) & (ya == 0)))
    c = int(np.count_nonzero((xa == 0) & (ya == 1)))
    return PairedCounts(b, c, int(xa.size))


def mcnemar_exact_array(b: npt.ArrayLike, c: npt.ArrayLike, mid_p: bool = False) -> np.ndarray:
    """Exact McNemar p values element-wise from discordant counts.

    Inputs: non-negative integer arrays ``b`` and ``c`` that broadcast. Output: float array
    of two-sided p values in (0, 1].
    Method: conditional on m = b + c discordant pairs, min(b, c) ~ Binomial(m, 1/2) under
    H0, so ``p = min(1, 2 * P(X <= min(b, c)))`` (1 when m = 0). With ``mid_p=True`` the
    mid-p variant ``p = 2 * P(X <= min) - P(X = min)``, capped at 1 (Fagerland, Lydersen
    and Laake 2013). Computed with ``scipy.stats.binom.cdf`` / ``.pmf`` (vectorised); the
    exact p equals ``statsmodels.stats.contingency_tables.mcnemar(table, exact=True)``.
    """
    ba = _as_count_array(b, "b")
    ca = _as_count_array(c, "c")
    try:
        ba, ca = np.broadcast_arrays(ba, ca)
    except ValueError:
        raise _fail(f"b and c have incompatible shapes {ba.shape} and {ca.shape}") from None
    m = ba + ca
    lo = np.minimum(ba, ca)
    p = 2.0 * sps.binom.cdf(lo, m, 0.5)
    if mid_p:
        p = p - sps.binom.pmf(lo, m, 0.5)
    return np.minimum(p, 1.0)


def mcnemar_exact(b: int, c: int) -> TestResult:
    """Exact (binomial) McNemar test from discordant counts b and c.

    Output: ``TestResult(statistic=min(b, c), p_value)``. Example: b = 22, c = 0 gives
    ``p = 2 * 0.5**22 = 4.77e-7``; b = c = 0 gives p = 1. See :func:`mcnemar_exact_array`.
    """
    bi, ci = _as_count(b, "b"), _as_count(c, "c")
    p = float(mcnemar_exact_array(bi, ci))
    return TestResult(float(min(bi, ci)), p, "exact McNemar (two-sided binomial, discordant)")


def mcnemar_midp(b: int, c: int) -> TestResult:
    """Mid-p McNemar test from discordant counts; see :func:`mcnemar_exact_array`."""
    bi, ci = _as_count(b, "b"), _as_count(c, "c")
    p = float(mcnemar_exact_array(bi, ci, mid_p=True))
    return TestResult(float(min(bi, ci)), p, "mid-p McNemar (two-sided)")


# --------------------------------------------------------------------------- 2x2 tables


def chi_square_2x2(table: npt.ArrayLike, correction: bool = True) -> TestResult:
    """Pearson chi-square test of independence for a 2x2 table of counts.

    Inputs: 2x2 non-negative integer counts with no empty row or column; ``correction``
    applies Yates' continuity correction (the scipy default). Output: ``TestResult(chi2,
    p_value, df=1)``. Method: ``scipy.stats.chi2_contingency(table, correction)``.
    """
    t = _table_2x2(table)
    if (t.sum(axis=0) == 0).any() or (t.sum(axis=1) == 0).any():
        raise _fail(f"table has an empty row or column, chi-square undefined: {t.tolist()}")
    res = sps.chi2_contingency(t, correction=bool(correction))
    method = "chi-square 2x2" + (" (Yates)" if correction else "")
    return TestResult(float(res.statistic), float(res.pvalue), method, df=float(res.dof))


def fisher_exact_2x2(table: npt.ArrayLike, alternative: str = "two-sided") -> TestResult:
    """Fisher's exact test for a 2x2 table ``[[a, b], [c, d]]``.

    Output: ``TestResult(statistic=sample odds ratio ad/bc, p_value)``; the statistic is
    0 or +inf when a cell is zero (use :func:`odds_ratio_woolf` for a finite estimate).
    A table with an empty row or column raises (the odds ratio is 0/0).
    Method: ``scipy.stats.fisher_exact(table, alternative)`` (two-sided p sums the
    hypergeometric probabilities no larger than the observed one).
    """
    t = _table_2x2(table)
    if (t.sum(axis=0) == 0).any() or (t.sum(axis=1) == 0).any():
        raise _fail(f"table has an empty row or column, odds ratio undefined: {t.tolist()}")
    if alternative not in ("two-sided", "greater", "less"):
        raise _fail(f"alternative must be two-sided, greater or less, got {alternative!r}")
    res = sps.fisher_exact(t, alternative=alternative)
    return TestResult(float(res.statistic), float(res.pvalue), f"Fisher exact ({alternative})")


def odds_ratio_woolf(table: npt.ArrayLike, confidence: float = 0.95) -> OddsRatio:
    """Odds ratio ``ad / bc`` of ``[[a, b], [c, d]]`` with Woolf's logit interval.

    Method: ``exp(log OR +- z * sqrt(1/a + 1/b + 1/c + 1/d))``. When any cell is zero,
    0.5 is added to every cell first (Haldane-Anscombe) and ``corrected`` is True.
    Written here because ``statsmodels...Table2x2(shift_zeros=True)`` replaces only the
    zero cells by 0.5, which is not the Haldane-Anscombe estimator; without a zero cell
    the result equals ``Table2x2(t).oddsratio`` / ``.oddsratio_confint()``.
    A table with an empty row or column raises.
    """
    t = _table_2x2(table).astype(np.float64)
    if (t.sum(axis=0) == 0).any() or (t.sum(axis=1) == 0).any():
        raise _fail(f"table has an empty row or column, odds ratio undefined: {t.tolist()}")
    conf = _check_confidence(confidence)
    corrected = bool((t == 0).any())
    if corrected:
        t = t + 0.5
    (a, b), (c, d) = t
    log_or = math.log(a * d / (b * c))
    se = math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    z = float(sps.norm.ppf(0.5 + conf / 2))
    return OddsRatio(
        math.exp(log_or), math.exp(log_or - z * se), math.exp(log_or + z * se), corrected
    )


# --------------------------------------------------------------------------- multiplicity


def _p_values(p_values: npt.ArrayLike) -> np.ndarray:
    p = _finite_float_array(p_values, "p_values")
    if p.ndim != 1:
        raise _fail(f"p_values must be 1-D, got shape {p.shape}")
    if ((p < 0) | (p > 1)).any():
        raise _fail("p_values must lie in [0, 1]")
    return p


def holm(p_values: npt.ArrayLike) -> np.ndarray:
    """Holm (step-down Bonferroni) adjusted p values, in the input order.

    Method: sort ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``;
    computed by ``statsmodels.stats.multitest.multipletests(p, method="holm")``.
    """
    p = _p_values(p_values)
    return np.asarray(multipletests(p, method="holm")[1], dtype=np.float64)


def bonferroni(p_values: npt.ArrayLike) -> np.ndarray:
    """Bonferroni adjusted p values ``min(1, m p)``, by
    ``statsmodels.stats.multitest.multipletests(p, method="bonferroni")``."""
    p = _p_values(p_values)
    return np.asarray(multipletests(p, method="bonferroni")[1], dtype=np.float64)


# --------------------------------------------------------------------------- k samples


def cochrans_q(x: npt.ArrayLike) -> TestResult:
    """Cochran's Q test that k related binary samples share one success probability.

    Input: an n x k 0/1 matrix (rows = subjects, e.g. prompts; columns = conditions),
    n >= 1, k >= 2. Output: ``TestResult(Q, p_value, df=k-1)``.
    Method: ``Q = (k - 1) (k sum_j C_j^2 - N^2) / (k N - sum_i R_i^2)`` referred to
    chi-square(k - 1); computed by
    ``statsmodels.stats.contingency_tables.cochrans_q(x)``.
    When every row is constant (all 0 or all 1) the denominator is 0 and there is no
    within-subject variation: we return Q = 0, p = 1 rather than statsmodels' NaN.
    For k = 2, Q equals the McNemar chi-square ``(b - c)^2 / (b + c)`` without correction.
    """
    a = _binary_array(x, "x")
    if a.ndim != 2 or a.shape[1] < 2:
        raise _fail(f"x must be an n x k matrix with k >= 2, got shape {a.shape}")
    n_rows, k = a.shape
    row = a.sum(axis=1)
    if int((row * (k - row)).sum()) == 0:
        return TestResult(0.0, 1.0, "Cochran's Q (no within-subject variation)", df=float(k - 1))
    res = smct.cochrans_q(a)
    return TestResult(float(res.statistic), float(res.pvalue), "Cochran's Q", df=float(res.df))


def mantel_haenszel(tables: npt.ArrayLike, confidence: float = 0.95) -> MantelHaenszelResult:
    """Mantel-Haenszel pooled odds ratio across 2x2 strata with the
    Robins-Breslow-Greenland (1986) interval and the Cochran-Mantel-Haenszel test.

    Input: counts of shape (K, 2, 2), one ``[[a, b], [c, d]]`` per stratum. Strata with
    fewer than 2 observations carry no information for the estimate, its variance or the
    test and are dropped (``n_strata`` counts those kept).
    Method: ``OR_MH = sum(a d / n) / sum(b c / n)``; RBG variance of log OR_MH; CMH
    chi-square (1 df, no continuity correction). Computed by
    ``statsmodels.stats.contingency_tables.StratifiedTable``: ``oddsratio_pooled``,
    ``oddsratio_pooled_confint`` (RBG standard error) and ``test_null_odds``.
    Raises when ``sum(a d / n)`` or ``sum(b c / n)`` is 0 (pooled OR 0 or infinite, no
    log interval) or when every stratum has a fixed margin (test variance 0).
    """
    t = _as_count_array(tables, "tables")
    if t.ndim != 3 or t.shape[1:] != (2, 2):
        raise _fail(f"tables must have shape (K, 2, 2), got {t.shape}")
    t = t[t.sum(axis=(1, 2)) >= 2]
    if t.shape[0] == 0:
        raise _fail("no stratum has 2 or more observations")
    conf = _check_confidence(confidence)
    n = t.sum(axis=(1, 2)).astype(np.float64)
    r = (t[:, 0, 0] * t[:, 1, 1] / n).sum()
    s = (t[:, 0, 1] * t[:, 1, 0] / n).sum()
    if r == 0 or s == 0:
        raise _fail(
            "pooled odds ratio is 0 or infinite (no a*d or no b*c in any stratum); "
            "the Robins-Breslow-Greenland interval is undefined"
        )
    row1, row2 = t[:, 0].sum(axis=1), t[:, 1].sum(axis=1)
    col1, col2 = t[:, :, 0].sum(axis=1), t[:, :, 1].sum(axis=1)
    if float((row1 * row2 * col1 * col2).sum()) == 0:
        raise _fail("every stratum has an empty row or column; the CMH test is undefined")
    st = smct.StratifiedTable([tbl.astype(np.float64) for tbl in t])
    low, high = st.oddsratio_pooled_confint(alpha=1.0 - conf)
    test = st.test_null_odds(correction=False)
    return MantelHaenszelResult(
        float(st.oddsratio_pooled),
        float(low),
        float(high),
        float(test.statistic),
        float(test.pvalue),
        int(t.shape[0]),
    )


# --------------------------------------------------------------------------- equivalence


def _check_margin(margin: float) -> float:
    m = float(margin)
    if not 0.0 < m < 1.0:
        raise _fail(f"margin must lie strictly between 0 and 1 (a proportion), got {margin!r}")
    return m


def _tango_q01(b: int, c: int, n: int, delta: float) -> float:
    """Restricted MLE of P(x=0, y=1) under H0: P(x=1,y=0) - P(x=0,y=1) = delta > 0.

    Root of ``2n q^2 + B q + C = 0`` with ``B = -(b + c) + delta (2n - b + c)`` and
    ``C = -c delta (1 - delta)`` (the score equation of the multinomial likelihood under
    the constraint; Tango 1998). C <= 0, so the non-negative root is unique.
    """
    a_ = 2.0 * n
    b_ = -(b + c) + delta * (2.0 * n - b + c)
    c_ = -c * delta * (1.0 - delta)
    disc = max(b_ * b_ - 4.0 * a_ * c_, 0.0)
    return max((-b_ + math.sqrt(disc)) / (2.0 * a_), 0.0)


def tost_paired(b: int, c: int, n: int, margin: float, method: str = "score") -> TOSTResult:
    """TOST equivalence of two paired proportions within ``+-margin``.

    Inputs: discordant counts ``b`` = #(x=1, y=0), ``c`` = #(x=0, y=1) out of ``n`` pairs
    (``b + c <= n``); ``margin`` as a proportion (0.03 for 3 percentage points).
    The difference is ``p_x - p_y = (b - c) / n``.
    Methods (statsmodels has no paired-proportion equivalence test, so this is written
    here):
      - "score" (default): Tango's (1998) score statistic
        ``z = (b - c - n d0) / sqrt(n (2 q~ + d0 - d0^2))`` with ``q~`` the restricted MLE
        of the smaller discordant cell under H0 (see ``_tango_q01``). It stays defined with
        zero discordant pairs, which is the common case for rare flips.
      - "wald": ``z = (diff - d0) / se`` with ``se = sqrt(((b + c)/n - diff^2) / n)``;
        raises when se = 0.
    One-sided p values: ``p_lower = 1 - Phi(z_lower)`` for H0: diff <= -margin and
    ``p_upper = Phi(z_upper)`` for H0: diff >= +margin; TOST p = max of the two.
    """
    bi, ci, ni = _as_count(b, "b"), _as_count(c, "c"), _as_count(n, "n")
    if ni == 0:
        raise _fail("n must be positive, got 0 pairs")
    if bi + ci > ni:
        raise _fail(f"b + c must not exceed n, got b={bi}, c={ci}, n={ni}")
    m = _check_margin(margin)
    diff = (bi - ci) / ni
    if method == "score":
        # H0 upper: diff = +m (q10 = q01 + m); H0 lower: diff = -m, by symmetry swap b, c.
        q_up = _tango_q01(bi, ci, ni, m)
        q_lo = _tango_q01(ci, bi, ni, m)
        z_up = (bi - ci - ni * m) / math.sqrt(ni * (2 * q_up + m - m * m))
        z_lo = (bi - ci + ni * m) / math.sqrt(ni * (2 * q_lo + m - m * m))
        label = "paired TOST, Tango score"
    elif method == "wald":
        var = ((bi + ci) / ni - diff * diff) / ni
        if var <= 0:
            raise _fail("Wald standard error is 0 (no discordant pairs); use method='score'")
        se = math.sqrt(var)
        z_up, z_lo = (diff - m) / se, (diff + m) / se
        label = "paired TOST, Wald"
    else:
        raise _fail(f"method must be 'score' or 'wald', got {method!r}")
    p_lo, p_up = float(sps.norm.sf(z_lo)), float(sps.norm.cdf(z_up))
    return TOSTResult(diff, m, float(z_lo), p_lo, float(z_up), p_up, max(p_lo, p_up), label)


def paired_difference_interval(b: int, c: int, n: int, confidence: float = 0.90) -> Interval:
    """Wald interval of the paired difference ``p_x - p_y = (b - c) / n``.

    Inputs as :func:`tost_paired` (``b`` = #(x=1, y=0), ``c`` = #(x=0, y=1) of ``n``
    pairs). Output: :class:`Interval` ``diff -+ z se`` with ``z = Phi^-1((1 + confidence)
    / 2)`` and ``se = sqrt(((b + c) / n - diff^2) / n)`` (the multinomial variance of the
    per-pair difference; clipped to [-1, 1]). At ``confidence = 1 - 2 alpha`` (0.90 for
    alpha = 0.05) it is the interval that goes with TOST: equivalence within ``+-margin``
    at level alpha when it lies inside ``(-margin, margin)`` (Wald version). With no
    discordant pairs ``se = 0`` and the interval is the point ``[0, 0]``.
    """
    bi, ci, ni = _as_count(b, "b"), _as_count(c, "c"), _as_count(n, "n")
    if ni == 0:
        raise _fail("n must be positive, got 0 pairs")
    if bi + ci > ni:
        raise _fail(f"b + c must not exceed n, got b={bi}, c={ci}, n={ni}")
    z = float(sps.norm.ppf(0.5 + _check_confidence(confidence) / 2))
    diff = (bi - ci) / ni
    se = math.sqrt(max((bi + ci) / ni - diff * diff, 0.0) / ni)
    return Interval(max(-1.0, diff - z * se), min(1.0, diff + z * se))


def tost_paired_from_pairs(
    x: npt.ArrayLike, y: npt.ArrayLike, margin: float, method: str = "score"
) -> TOSTResult:
    """Paired TOST from two 0/1 vectors (same subjects, two conditions); see
    :func:`tost_paired` and :func:`paired_counts`."""
    pc = paired_counts(x, y)
    return tost_paired(pc.b, pc.c, pc.n, margin, method)


def _fm_restricted_p1(k1: int, n1: int, k2: int, n2: int, delta: float) -> float:
    """Restricted MLE of p1 under H0: p1 - p2 = delta (Farrington-Manning).

    Maximises ``k1 log p1 + (n1-k1) log(1-p1) + k2 log p2 + (n2-k2) log(1-p2)`` with
    ``p2 = p1 - delta`` over ``p1 in [max(0, delta), min(1, 1 + delta)]``. The function is
    concave there, so the maximiser is the root of the score (brentq) or an end point.
    Solved numerically (brentq to machine precision) rather than by the closed-form
    cubic, which is easy to get wrong (see :func:`tost_two_proportions`) and loses
    accuracy on the boundary when counts are zero.
    """
    lo, hi = max(0.0, delta), min(1.0, 1.0 + delta)

    def score(p1: float) -> float:
        p2 = p1 - delta
        s = 0.0
        if k1:
            s += k1 / p1
        if n1 - k1:
            s -= (n1 - k1) / (1.0 - p1)
        if k2:
            s += k2 / p2
        if n2 - k2:
            s -= (n2 - k2) / (1.0 - p2)
        return s

    eps = 1e-15
    a, b_ = lo + eps, hi - eps
    fa, fb = score(a), score(b_)
    if fa <= 0:
        return lo
    if fb >= 0:
        return hi
    return float(optimize.brentq(score, a, b_, xtol=1e-15, rtol=4 * np.finfo(float).eps))


def tost_two_proportions(
    k1: int, n1: int, k2: int, n2: int, margin: float, method: str = "score"
) -> TOSTResult:
    """TOST equivalence of two independent proportions k1/n1 and k2/n2 within ``+-margin``.

    The difference is ``p1 - p2``. Methods:
      - "score" (default): Farrington-Manning score statistic ``z = (diff - d0) /
        sqrt(p1~(1-p1~)/n1 + p2~(1-p2~)/n2)`` with the restricted MLE under
        ``p1 - p2 = d0`` (no n/(n-1) correction). This is the statistic that
        ``statsmodels.stats.proportion.tost_proportions_2indep(..., method="score",
        correction=False)`` intends, but we solve the restricted MLE ourselves: the
        statsmodels cubic has a wrong linear coefficient (``count0`` for ``nobs0``;
        statsmodels issue #10269, open, present in 0.14.x and 0.15.0), so its null
        proportions do not maximise the restricted likelihood, and at zero counts it
        returns an infeasible negative proportion.
      - "wald": ``se = sqrt(p1(1-p1)/n1 + p2(1-p2)/n2)`` at the sample proportions; this
        equals ``tost_proportions_2indep(..., method="wald", correction=False)``; raises
        when se = 0.
    One-sided p values as in :func:`tost_paired`.
    """
    k1i, n1i = _check_k_n(k1, n1)
    k2i, n2i = _check_k_n(k2, n2)
    m = _check_margin(margin)
    p1, p2 = k1i / n1i, k2i / n2i
    diff = p1 - p2
    if method == "score":

        def z_at(d0: float) -> float:
            r1 = _fm_restricted_p1(k1i, n1i, k2i, n2i, d0)
            r2 = r1 - d0
            var = r1 * (1 - r1) / n1i + r2 * (1 - r2) / n2i
            return (diff - d0) / math.sqrt(var)

        z_lo, z_up = z_at(-m), z_at(m)
        label = "two-proportion TOST, Farrington-Manning score"
    elif method == "wald":
        var = p1 * (1 - p1) / n1i + p2 * (1 - p2) / n2i
        if var <= 0:
            raise _fail("Wald standard error is 0 (both proportions are 0 or 1); use 'score'")
        se = math.sqrt(var)
        z_lo, z_up = (diff + m) / se, (diff - m) / se
        label = "two-proportion TOST, Wald"
    else:
        raise _fail(f"method must be 'score' or 'wald', got {method!r}")
    p_lo, p_up = float(sps.norm.sf(z_lo)), float(sps.norm.cdf(z_up))
    return TOSTResult(diff, m, float(z_lo), p_lo, float(z_up), p_up, max(p_lo, p_up), label)


# --------------------------------------------------------------------------- ANOVA, r


def one_way_anova(groups: Sequence[npt.ArrayLike]) -> AnovaResult:
    """One-way ANOVA across groups, with eta^2.

    Input: two or more groups of finite values, each non-empty, with more values than
    groups. Output: :class:`AnovaResult`. Method: ``scipy.stats.f_oneway(*groups)`` for F
    and p; ``eta^2 = SS_between / SS_total`` computed here (scipy does not report it).
    Not estimable (raises :class:`BatchflipError`, never returns inf or NaN) when all
    values are equal, or every group is constant (within-group variance 0: F undefined).
    Constancy is tested exactly on the values (``numpy.ptp`` of each group is 0), not on
    the floating sums of squares, which rounding leaves at e.g. 5.8e-34 for
    ``[[.1] * 3, [.7] * 3]``; any other non-finite F or p raises too.
    """
    if len(groups) < 2:
        raise _fail(f"need at least 2 groups, got {len(groups)}")
    arrays = [_finite_float_array(g, f"group {i}").ravel() for i, g in enumerate(groups)]
    for i, a in enumerate(arrays):
        if a.size == 0:
            raise _fail(f"group {i} is empty")
    allv = np.concatenate(arrays)
    k, n_total = len(arrays), allv.size
    if n_total <= k:
        raise _fail(f"need more values ({n_total}) than groups ({k})")
    if np.ptp(allv) == 0:
        raise _fail("all values are equal; ANOVA is undefined")
    if all(np.ptp(a) == 0 for a in arrays):
        raise _fail("every group is constant (within-group variance 0); F is undefined")
    grand = allv.mean()
    ss_total = float(((allv - grand) ** 2).sum())
    ss_within = float(sum(((a - a.mean()) ** 2).sum() for a in arrays))
    res = sps.f_oneway(*arrays)
    statistic, p_value = float(res.statistic), float(res.pvalue)
    if not (math.isfinite(statistic) and math.isfinite(p_value) and ss_total > 0):
        raise _fail(f"F = {statistic}, p = {p_value} is not finite (degenerate groups)")
    return AnovaResult(
        statistic,
        p_value,
        k - 1,
        n_total - k,
        (ss_total - ss_within) / ss_total,
    )


def anova_by_group(values: npt.ArrayLike, labels: Sequence[Hashable]) -> AnovaResult:
    """One-way ANOVA of ``values`` grouped by ``labels`` (groups in order of first
    appearance); see :func:`one_way_anova`. Used for per-model fragility by alignment type."""
    v = _finite_float_array(values, "values").ravel()
    lab = list(labels)
    if len(lab) != v.size:
        raise _fail(f"values ({v.size}) and labels ({len(lab)}) differ in length")
    order: dict[Hashable, list[float]] = {}
    for value, label in zip(v.tolist(), lab, strict=True):
        order.setdefault(label, []).append(value)
    return one_way_anova([np.asarray(g) for g in order.values()])


def _rss(y: np.ndarray, columns: list[np.ndarray]) -> float:
    """Residual sum of squares of the least-squares fit of ``y`` on the columns."""
    x = np.column_stack(columns)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(((y - x @ beta) ** 2).sum())


def two_way_anova(values: npt.ArrayLike, a: Sequence[Hashable], b: Sequence[Hashable],
                  names: tuple[str, str] = ("a", "b")) -> TwoWayAnovaResult:
    """Two-way ANOVA of ``values`` by factors ``a`` and ``b`` with their interaction, Type II
    sums of squares, and eta^2 = SS_effect / SS_total for each effect.

    Input: finite values with one level of each factor per value (``names`` name the
    factors in error messages). Output:
    :class:`TwoWayAnovaResult`. Method: least squares on treatment-coded dummies (numpy);
    SS(a) = RSS(b) - RSS(a + b), SS(b) = RSS(a) - RSS(a + b), SS(a x b) = RSS(a + b) -
    RSS(a x b), the residual is the within-cell sum of squares with n - cells degrees of
    freedom, F = MS_effect / MS_residual, p from the F distribution (``scipy.stats.f.sf``).
    This is what ``statsmodels.formula.api.ols("y ~ C(a) * C(b)")`` with
    ``anova_lm(typ=2)`` reports (the tests check it); for a balanced table Type I, II and III
    agree, and they are the harness's marginal-means sums of squares (analyze.py, pass 10).
    Not estimable (raises :class:`BatchflipError`, never returns inf or NaN) when a factor
    has one level, a level pair (cell) has no value, there is no residual degree of freedom
    (one value per cell), all values are equal, or every cell is constant (residual
    variance 0: F undefined); constancy is tested exactly on the values, as in
    :func:`one_way_anova`.
    """
    y = _finite_float_array(values, "values").ravel()
    fa, fb = list(a), list(b)
    if not len(fa) == len(fb) == y.size:
        raise _fail(f"values ({y.size}), factor {names[0]} ({len(fa)}) and factor "
                    f"{names[1]} ({len(fb)}) differ in length")
    levels_a, levels_b = list(dict.fromkeys(fa)), list(dict.fromkeys(fb))
    for name, levels in zip(names, (levels_a, levels_b), strict=True):
        if len(levels) < 2:
            raise _fail(f"factor {name} has only {len(levels)} level; a two-way ANOVA needs 2 "
                        "or more of each factor")
    cells: dict[tuple[Hashable, Hashable], list[float]] = {}
    for v, la, lb in zip(y.tolist(), fa, fb, strict=True):
        cells.setdefault((la, lb), []).append(v)
    missing = [(la, lb) for la in levels_a for lb in levels_b if (la, lb) not in cells]
    if missing:
        raise _fail(f"cell {missing[0]} has no value; every level pair needs values")
    n, k = y.size, len(cells)
    if n <= k:
        raise _fail(f"{n} values in {k} cells: no residual degree of freedom")
    if np.ptp(y) == 0:
        raise _fail("all values are equal; ANOVA is undefined")
    if all(np.ptp(np.asarray(v)) == 0 for v in cells.values()):
        raise _fail("every cell is constant (residual variance 0); F is undefined")
    da = [np.array([x == la for x in fa], float) for la in levels_a[1:]]
    db = [np.array([x == lb for x in fb], float) for lb in levels_b[1:]]
    ones = [np.ones(n)]
    rss_a, rss_b = _rss(y, ones + da), _rss(y, ones + db)
    rss_ab = _rss(y, ones + da + db)
    ss_res = float(sum(((np.asarray(v) - np.mean(v)) ** 2).sum() for v in cells.values()))
    ss_total = float(((y - y.mean()) ** 2).sum())
    df_res = n - k
    ms_res = ss_res / df_res

    def effect(ss: float, df: int) -> AnovaEffect:
        ss = max(ss, 0.0)  # rounding can leave -1e-17 for an effect of size 0
        f = (ss / df) / ms_res
        p = float(sps.f.sf(f, df, df_res))
        if not (math.isfinite(f) and math.isfinite(p)):
            raise _fail(f"F = {f}, p = {p} is not finite (degenerate cells)")
        return AnovaEffect(ss, df, f, p, ss / ss_total)

    ka, kb = len(levels_a), len(levels_b)
    return TwoWayAnovaResult(
        effect(rss_b - rss_ab, ka - 1), effect(rss_a - rss_ab, kb - 1),
        effect(rss_ab - ss_res, (ka - 1) * (kb - 1)), ss_res, df_res, ss_total, n)


def pearson_bootstrap(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CorrelationResult:
    """Pearson r between per-unit values with a seeded percentile bootstrap interval.

    Inputs: equal-length 1-D arrays, one entry per *unit* (e.g. per model), at least 3
    units, neither constant. Each resample draws units with replacement
    (``numpy.random.default_rng(seed).integers``), keeping each unit's (x, y) together.
    Output: :class:`CorrelationResult`; r and its two-sided t-test p value from
    ``scipy.stats.pearsonr``; interval = the ``(1 - confidence)/2`` and
    ``(1 + confidence)/2`` quantiles (``numpy.quantile``, linear) of the resampled r.
    Resamples where x or y is constant are dropped and counted. This is the percentile
    method of ``scipy.stats.bootstrap(..., paired=True, method="percentile")``, written
    vectorised here so that degenerate resamples are handled explicitly and the stream of
    draws is fixed by ``seed`` alone. For generation rows, use
    :func:`pearson_bootstrap_units`, which averages to units first.
    """
    xa = _finite_float_array(x, "x").ravel()
    ya = _finite_float_array(y, "y").ravel()
    if xa.size != ya.size:
        raise _fail(f"x ({xa.size}) and y ({ya.size}) differ in length")
    if xa.size < 3:
        raise _fail(f"need at least 3 units for a correlation, got {xa.size}")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        raise _fail("x or y is constant; Pearson r is undefined")
    b = _as_count(n_resamples, "n_resamples")
    if b < 1:
        raise _fail("n_resamples must be at least 1")
    conf = _check_confidence(confidence)
    res = sps.pearsonr(xa, ya)
    rng = np.random.default_rng(int(seed))
    idx = rng.integers(0, xa.size, size=(b, xa.size))
    xs, ys = xa[idx], ya[idx]
    xs = xs - xs.mean(axis=1, keepdims=True)
    ys = ys - ys.mean(axis=1, keepdims=True)
    sxx, syy = (xs * xs).sum(axis=1), (ys * ys).sum(axis=1)
    # constant resamples: tiny rounding residue relative to the data's own spread
    tol_x = 1e-12 * float(((xa - xa.mean()) ** 2).sum())
    tol_y = 1e-12 * float(((ya - ya.mean()) ** 2).sum())
    ok = (sxx > tol_x) & (syy > tol_y)
    n_ok = int(ok.sum())
    if n_ok == 0:
        raise _fail("every bootstrap resample was degenerate (x or y constant)")
    r_boot = (xs[ok] * ys[ok]).sum(axis=1) / np.sqrt(sxx[ok] * syy[ok])
    r_boot = np.clip(r_boot, -1.0, 1.0)
    alpha = 1.0 - conf
    low, high = np.quantile(r_boot, [alpha / 2, 1 - alpha / 2])
    return CorrelationResult(
        float(res.statistic),
        float(res.pvalue),
        float(low),
        float(high),
        int(xa.size),
        b,
        b - n_ok,
        int(seed),
    )


def pearson_bootstrap_units(
    rows: pd.DataFrame,
    x: str,
    y: str,
    unit: str,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CorrelationResult:
    """Pearson r with a unit-level bootstrap from a long table.

    ``rows`` may hold one row per unit or many (e.g. generation rows); columns ``x`` and
    ``y`` are first averaged per ``unit`` (units sorted by name), then
    :func:`pearson_bootstrap` resamples those units, never individual rows.
    """
    missing = [c for c in (x, y, unit) if c not in rows.columns]
    if missing:
        raise _fail(f"table lacks column(s) {missing}")
    if rows.empty:
        raise _fail("table is empty")
    per_unit = rows.groupby(unit, sort=True)[[x, y]].mean()
    return pearson_bootstrap(
        per_unit[x].to_numpy(), per_unit[y].to_numpy(), n_resamples, confidence, seed
    )


# --------------------------------------------------------------------------- agreement


def _labels_matrix(ratings: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (codes, present) for a units x raters label matrix; codes index categories
    in sorted order of their string form, present marks non-missing (None / NaN) cells."""
    a = np.asarray(ratings, dtype=object)
    if a.ndim != 2 or a.size == 0:
        raise _fail(f"{name} must be a non-empty 2-D units x raters matrix, got shape {a.shape}")
    present = ~pd.isna(a)
    values = a[present]
    cats = sorted({v for v in values.tolist()}, key=lambda v: (str(type(v)), str(v)))
    index = {v: i for i, v in enumerate(cats)}
    codes = np.full(a.shape, -1, dtype=np.int64)
    codes[present] = [index[v] for v in values.tolist()]
    return codes, present


def cohens_kappa(rater1: Sequence[Hashable], rater2: Sequence[Hashable]) -> KappaResult:
    """Cohen's (unweighted) kappa of two raters' nominal labels for the same subjects.

    Inputs: two equal-length label sequences without missing values. Output:
    :class:`KappaResult` with ``kappa = (p_o - p_e) / (1 - p_e)``, p_o the observed
    agreement, p_e the chance agreement from the raters' marginals.
    Method: ``statsmodels.stats.inter_rater.cohens_kappa(table)`` on the square
    contingency table over the union of categories. Raises when p_e = 1 (both raters used
    one and the same category; kappa is 0/0).
    """
    r1, r2 = list(rater1), list(rater2)
    if len(r1) != len(r2):
        raise _fail(f"raters rated different numbers of subjects: {len(r1)} vs {len(r2)}")
    if not r1:
        raise _fail("no subjects rated")
    codes, present = _labels_matrix(np.array([r1, r2], dtype=object).T, "ratings")
    if not present.all():
        raise _fail("Cohen's kappa needs complete pairs; use Krippendorff's alpha for missing")
    k = int(codes.max()) + 1
    table = np.zeros((k, k), dtype=np.float64)
    np.add.at(table, (codes[:, 0], codes[:, 1]), 1.0)
    n = table.sum()
    p_o = float(np.trace(table) / n)
    p_e = float((table.sum(axis=1) * table.sum(axis=0)).sum() / (n * n))
    if p_e >= 1.0:
        raise _fail("both raters used a single, identical category; kappa is undefined")
    res = smir.cohens_kappa(table)
    return KappaResult(float(res.kappa), p_o, p_e, int(n))


def fleiss_kappa(ratings: Any) -> KappaResult:
    """Fleiss' kappa for a fixed number of raters per subject.

    Input: subjects x raters label matrix (no missing values, >= 2 raters). Output:
    :class:`KappaResult` with ``p_observed`` = mean per-subject agreement P-bar and
    ``p_expected`` = sum of squared category shares.
    Method: ``statsmodels.stats.inter_rater.aggregate_raters`` then
    ``fleiss_kappa(table, method="fleiss")``. Raises when p_e = 1 (one category used).
    """
    codes, present = _labels_matrix(ratings, "ratings")
    if not present.all():
        raise _fail("Fleiss' kappa needs every rater on every subject; use Krippendorff's alpha")
    n_sub, n_rat = codes.shape
    if n_rat < 2:
        raise _fail(f"need at least 2 raters, got {n_rat}")
    counts, _ = smir.aggregate_raters(codes, n_cat=int(codes.max()) + 1)
    counts = counts.astype(np.float64)
    shares = counts.sum(axis=0) / (n_sub * n_rat)
    p_e = float((shares**2).sum())
    if p_e >= 1.0:
        raise _fail("all ratings fall in one category; Fleiss' kappa is undefined")
    p_o = float(((counts * (counts - 1)).sum(axis=1) / (n_rat * (n_rat - 1))).mean())
    kappa = float(smir.fleiss_kappa(counts, method="fleiss"))
    return KappaResult(kappa, p_o, p_e, int(n_sub))


def krippendorff_alpha_nominal(ratings: Any) -> AlphaResult:
    """Krippendorff's alpha for nominal data, allowing missing ratings.

    Input: units x raters label matrix; missing ratings are ``None`` or NaN. Units with
    fewer than 2 ratings are not pairable and are ignored. Output: :class:`AlphaResult`.
    Method (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"): the
    coincidence matrix ``o_ck = sum_u n_uc (n_uk - [c = k]) / (m_u - 1)`` over units u
    with m_u >= 2 ratings; ``n_c = sum_k o_ck``, ``n = sum_c n_c``;
    ``D_o = sum_{c != k} o_ck / n``, ``D_e = sum_{c != k} n_c n_k / (n (n - 1))``;
    ``alpha = 1 - D_o / D_e``. Neither scipy nor statsmodels implements it.
    Raises when no unit is pairable or all pairable values share one category (D_e = 0).
    """
    codes, present = _labels_matrix(ratings, "ratings")
    m_u = present.sum(axis=1)
    keep = m_u >= 2
    if not keep.any():
        raise _fail("no unit has 2 or more ratings; alpha is undefined")
    codes, present, m_u = codes[keep], present[keep], m_u[keep]
    n_cat = int(codes[present].max()) + 1
    n_uc = np.zeros((codes.shape[0], n_cat), dtype=np.float64)
    rows = np.nonzero(present)[0]
    np.add.at(n_uc, (rows, codes[present]), 1.0)
    w = 1.0 / (m_u - 1.0)
    o = np.einsum("u,uc,uk->ck", w, n_uc, n_uc) - np.diag((w[:, None] * n_uc).sum(axis=0))
    n_c = o.sum(axis=1)
    n = float(n_c.sum())
    disagree_o = n - float(np.trace(o))
    disagree_e = n * n - float((n_c**2).sum())
    if disagree_e <= 0:
        raise _fail("all pairable ratings fall in one category; alpha is undefined")
    d_o = disagree_o / n
    d_e = disagree_e / (n * (n - 1.0))
    return AlphaResult(1.0 - d_o / d_e, d_o, d_e, int(keep.sum()), int(round(n)))
