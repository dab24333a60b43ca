"""The record API (batchflip.numbers) and the one reader (batchflip.records.read_records)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from batchflip.errors import InputError
from batchflip.numbers import (
    REFUSED_AT,
    direction,
    load,
    load_numbers,
    not_estimable,
    proportion,
    proportion_or_none,
    ratio,
)
from batchflip.records import read_records


def test_direction_follows_the_threshold_both_ways_and_skips_null_scores():
    base = [1.0, 0.0, 1.0, 0.5, 0.49, 0.5, np.nan, 1.0]
    cond = [0.0, 1.0, 0.6, 0.0, 0.5, 0.5, 0.0, np.nan]
    # by hand: refused = score >= 0.5 on both sides
    assert direction(np.array(base), np.array(cond)).tolist() == [
        "to_unsafe", "to_safe", "none", "to_unsafe", "to_safe", "none", "none", "none"]
    assert REFUSED_AT == 0.5


def test_not_estimable_and_proportion_or_none():
    rec = not_estimable("n = 0", "d", ["f"], ["s"], model="m")
    assert rec == {"value": None, "definition": "d", "inputs": ["f"], "stack_ids": ["s"],
                   "note": "not estimable: n = 0", "model": "m"}
    assert proportion_or_none(0, 0, "d", [], [], "empty") == not_estimable("empty", "d", [], [])
    assert proportion_or_none(0, 0, "d", [], [], "empty", zero_n=True)["n"] == 0
    rec = proportion_or_none(3, 4, "d", [], [], "empty", zero_n=True)
    assert rec == proportion(3, 4, "d", [], [])
    assert (rec["k"], rec["n"], rec["value"]) == (3, 4, 0.75) and "note" not in rec


def test_ratio_is_null_with_the_reason_when_the_denominator_is_zero():
    assert ratio(0.3, 0.1, "d", [], [], "zero")["value"] == pytest.approx(3.0)
    rec = ratio(0.3, 0.0, "d", [], [], "capability flip rate is 0", model="all")
    assert rec["value"] is None and rec["model"] == "all"
    assert rec["note"] == "not estimable: capability flip rate is 0"
    assert not any(isinstance(v, float) and math.isnan(v) for v in rec.values())


def test_load_reads_numbers_and_names_a_file_that_is_not_one(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"study": "a", "numbers": {"a/x": {"value": 1}}}))
    b.write_text(json.dumps({"study": "b", "numbers": {"b/y": {"value": None}}}))
    assert load(a) == {"a/x": {"value": 1}}
    assert load_numbers([a, b]) == {"a/x": {"value": 1}, "b/y": {"value": None}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"study": "a"}))
    with pytest.raises(InputError, match=r"bad\.json, field 'numbers': not a numbers file"):
        load(bad)


def test_read_records_reads_needed_then_optional_columns_once(tmp_path):
    path = tmp_path / "s.parquet"
    pd.DataFrame({"model": ["m"], "error": [""], "score": [1.0], "other": [2]}).to_parquet(
        path, index=False)
    df = read_records(path, ["score", "error"], ["error", "model", "finish_reason"])
    assert df.columns.tolist() == ["score", "error", "model"]
    with pytest.raises(InputError, match=r"s\.parquet, field 'prompt_id': missing column"):
        read_records(path, ["score", "prompt_id"])
