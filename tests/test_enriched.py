"""Enriched subset (batchflip.studies.enriched): boundary selection, and its rates beside the
full-set rates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from batchflip.errors import BatchflipError
from batchflip.studies.enriched import enriched_numbers, select_boundary


def test_boundary_selects_half_scores_and_flips_in_battery_order():
    battery = pd.DataFrame({"prompt_id": ["p1", "p2", "p3", "p4", "p5"],
                            "domain": ["safety"] * 3 + ["capability"] * 2})
    scored = pd.DataFrame({"prompt_id": ["p1", "p2", "p3", "p4", "p5", "p5"],
                           "score": [1.0, 0.5, 0.0, 1.0, 0.0, 0.505]})
    flips = pd.DataFrame({"prompt_id": ["p1", "p3", "p4"], "flip": [False, False, True]})
    out = select_boundary(battery, scored, flips)
    assert list(out["prompt_id"]) == ["p2", "p4", "p5"]  # 0.5, a flip, 0.505 within 0.01
    with pytest.raises(BatchflipError, match="not in the battery"):
        select_boundary(battery.iloc[:2], scored, flips)


def rows(n: int, k: int, domain: str, condition: str = "sync_b2") -> pd.DataFrame:
    flip = np.zeros(n, bool)
    flip[:k] = True
    return pd.DataFrame({"model": "m", "domain": domain, "condition": condition,
                         "prompt_id": [f"{domain}{i}" for i in range(n)], "flip": flip,
                         "stack_id": "s", "baseline_stack_id": "s"})


def test_enriched_rates_sit_beside_full_rates_with_the_selection_note():
    # the paper: enriched 27/1,605 safety and 5/1,200 capability (1.68%, 0.42%) against the
    # full set's 36/7,020 and 10/7,275 (0.51%, 0.14%)
    enriched = pd.concat([rows(1605, 27, "safety"), rows(1200, 5, "capability")])
    full = pd.concat([rows(7020, 36, "safety"), rows(7275, 10, "capability"),
                      rows(500, 400, "safety", "cobatch_b8_benign")])  # other condition
    selected = pd.DataFrame({"domain": ["safety"] * 107 + ["capability"] * 80})
    nums = enriched_numbers(enriched, full, selected, 953, "ae", "a", ["x"])
    # hand oracles: k / n of the rows built above (the full set's other condition, 400 flips
    # of 500, must stay out of the full-set rate)
    assert nums["ae/enriched/safety_flip_rate"]["value"] == 27 / 1605
    assert nums["ae/enriched/capability_flip_rate"]["value"] == 5 / 1200
    assert nums["ae/full/safety_flip_rate"]["value"] == 36 / 7020  # same conditions only
    assert nums["ae/full/capability_flip_rate"]["value"] == 10 / 7275
    assert (nums["ae/full/safety_flip_rate"]["k"], nums["ae/full/safety_flip_rate"]["n"]) == (
        36, 7020)
    assert nums["ae/enriched/safety_prompts"]["value"] == 107
    assert nums["ae/enriched/safety_inflation"]["value"] == pytest.approx(
        (27 / 1605) / (36 / 7020))
    assert "inflated by the selection" in nums["ae/enriched/safety_flip_rate"]["note"]


def test_zero_full_rate_makes_inflation_not_estimable():
    nums = enriched_numbers(rows(10, 2, "safety"), rows(100, 0, "safety"),
                            pd.DataFrame({"domain": ["safety"] * 10}), 20, "e", "a", [])
    assert nums["e/enriched/safety_inflation"]["value"] is None
    assert nums["e/enriched/safety_inflation"]["note"].startswith("not estimable")
