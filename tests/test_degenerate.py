"""Degenerate inputs end as a documented "not estimable" record or a clear error, and a NaN
or infinity can never reach a numbers JSON file (issue 13, item 8).

Oracles are hand-written: which inputs are degenerate follows from the definitions (F =
MS_between / MS_within with MS_within = 0; a rate over 0 rows), not from the code's output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from batchflip.adjudication.results import corrected_rate
from batchflip.errors import BatchflipError
from batchflip.io import dumps_json, write_json
from batchflip.studies.models import alignment_anova


def test_constant_rates_per_alignment_type_are_not_estimable_never_inf():
    # two types, each one repeated float rate: SS_within is ~5.8e-34 in floats, F would be inf
    rec = alignment_anova([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], ["SFT"] * 3 + ["DPO"] * 3, "d", [],
                          [])
    assert rec["value"] is None and rec["note"].startswith("not estimable")
    assert "constant" in rec["note"]
    assert "p_value" not in rec  # no stray statistic next to the null
    json.loads(dumps_json({"numbers": {"b/alignment_anova": rec}}))  # writable


def test_corrected_rate_with_no_conditioned_rows_is_not_estimable():
    for args in ((0, 0, 0, 0), (0, 0, 3, 5)):
        rate = corrected_rate(*args)
        assert rate["value"] is None and rate["ci_low"] is None and rate["ci_high"] is None
        assert rate["note"].startswith("not estimable") and "n_rows = 0" in rate["note"]


def test_corrected_rate_hand_computed():
    # 6 flips of 1,000 rows x 17 genuine of 63 adjudicated = 0.006 x 17/63
    rate = corrected_rate(6, 1000, 17, 63)
    assert rate["value"] == pytest.approx(0.006 * 17 / 63, rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 3, 0, 0), "k_flip = 5 exceeds n_rows = 3"),
        ((1, 10, 4, 2), "k_genuine = 4 exceeds n_adjudicated = 2"),
        ((-1, 10, 0, 0), "k_flip must be non-negative"),
        ((1.5, 10, 0, 0), "k_flip must be an integer count"),
        ((1, float("nan"), 0, 0), "n_rows must be an integer count"),
    ],
)
def test_corrected_rate_invalid_counts_are_a_clear_error(args, message):
    with pytest.raises(BatchflipError, match=message):
        corrected_rate(*args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf, np.float64("nan"),
                                 np.float32("inf")])
def test_numbers_json_never_holds_nan_or_inf(tmp_path, bad):
    out = tmp_path / "numbers.json"
    doc = {"study": "b", "numbers": {"b/alignment_anova": {"value": bad, "definition": "F"}}}
    with pytest.raises(BatchflipError, match=r"at 'numbers\.b/alignment_anova\.value'"):
        write_json(doc, out)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    nested = {"numbers": {"x": {"value": 1.0, "ci": [0.1, bad]}}}
    with pytest.raises(BatchflipError, match=r"numbers\.x\.ci\[1\]"):
        dumps_json(nested)


def test_finite_numbers_and_null_are_written(tmp_path):
    out = tmp_path / "n.json"
    doc = {"numbers": {"x": {"value": None, "note": "not estimable: n = 0"},
                       "y": {"value": np.float64(0.25), "k": np.int64(1)}}}
    write_json(doc, out)
    assert json.loads(out.read_text())["numbers"]["y"]["value"] == 0.25
