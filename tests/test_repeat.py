"""The repeat control's numbers (batchflip.repeat) on hand-built scored frames.

Oracles: counts written out by hand, and scipy.stats.binomtest for the exact McNemar p
(two-sided binomial on the discordant prompts, p = 1/2)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from scipy import stats as sps

from batchflip.cli import main as cli_main
from batchflip.records import SCORED_COLUMNS
from batchflip.repeat import repeat_numbers, without_repeats

N = 30


def _rows(model: str, cond: str, texts: list[str], scores: list[float],
          domains: list[str] | None = None) -> list[dict]:
    dispatch = "list" if cond.startswith("list") else "sync"
    size = int(cond.split("_b")[1].split("_")[0])
    return [{"study": "a", "model": model, "condition": cond, "batch_size": size,
             "dispatch": dispatch, "kernel_mode": "standard", "group_id": i, "position": 0,
             "prompt_id": f"p{i:02d}", "task": "t", "domain": (domains or ["safety"] * N)[i],
             "text": t, "score": s, "label": "x", "scorer": "refusal", "scorer_version": 2,
             "stack_id": f"st-{cond}", "error": ""}
            for i, (t, s) in enumerate(zip(texts, scores, strict=True))]


def _frames() -> dict[str, pd.DataFrame]:
    base_t, base_s = [f"text {i}" for i in range(N)], [1.0] * 20 + [0.0] * 10
    dom = ["safety"] * 20 + ["capability"] * 10
    # sync_b8 changes the text of prompts 0-11 (12), flips labels of 0-4 (5)
    b8_t = [t + (" changed" if i < 12 else "") for i, t in enumerate(base_t)]
    b8_s = [0.0 if i < 5 else s for i, s in enumerate(base_s)]
    # the repeat changes the text of prompts 10-12 (3), flips the label of prompt 4 (1)
    rep_t = [t + (" again" if 10 <= i <= 12 else "") for i, t in enumerate(base_t)]
    rep_s = [0.0 if i == 4 else s for i, s in enumerate(base_s)]
    rows = (_rows("m", "sync_b1", base_t, base_s, dom) + _rows("m", "sync_b8", b8_t, b8_s, dom)
            + _rows("m", "sync_b1_repeat", rep_t, rep_s, dom)
            # true batching against its own baseline list_b1 (= sync_b1 here), same repeat
            + _rows("m", "list_b1", base_t, base_s, dom) + _rows("m", "list_b4", base_t,
                                                                  base_s, dom))
    df = pd.DataFrame(rows)[SCORED_COLUMNS]
    return {f"results/scored/a/m/{c}.parquet": p.reset_index(drop=True)
            for c, p in df.groupby("condition")}


def test_condition_beside_repeat_with_the_exact_test():
    nums = repeat_numbers(_frames(), "a", "sync_b1", {"list": "list_b1"})
    pre = "a/m/sync_b8/vs_repeat/any"
    assert (nums[f"{pre}/text_change_rate"]["k"], nums[f"{pre}/text_change_rate"]["n"]) == (12, N)
    assert nums[f"{pre}/repeat_text_change_rate"]["k"] == 3
    # discordant: changed under sync_b8 only = 0-9 (10), under the repeat only = 12 (1);
    # 10 and 11 changed under both
    p = nums[f"{pre}/text_change_vs_repeat_p"]
    assert (p["b"], p["c"], p["n"]) == (10, 1, N)
    assert p["value"] == pytest.approx(sps.binomtest(1, 11, 0.5).pvalue)
    assert p["value"] == pytest.approx(2 * (1 + 11) / 2 ** 11)  # by hand: 0.01171875
    f = nums[f"{pre}/flip_vs_repeat_p"]
    assert (f["b"], f["c"], f["condition_k"], f["repeat_k"]) == (4, 0, 5, 1)
    assert f["value"] == pytest.approx(sps.binomtest(4, 4, 0.5).pvalue)  # 0.125
    # per domain: the safety rows are prompts 0-19 (every change), capability 20-29 (none)
    s = nums["a/m/sync_b8/vs_repeat/safety/text_change_vs_repeat_p"]
    assert (s["b"], s["c"], s["n"]) == (10, 1, 20)
    c = nums["a/m/sync_b8/vs_repeat/capability/text_change_vs_repeat_p"]
    assert (c["b"], c["c"], c["n"], c["value"]) == (0, 0, 10, 1.0)
    # the repeat's own rates against the baseline; pooled over models = the one model
    assert nums["a/m/sync_b1_repeat/repeat/any/text_change_rate"]["k"] == 3
    assert nums["a/m/sync_b1_repeat/repeat/any/flip_rate"]["k"] == 1
    assert nums["a/all/sync_b8/vs_repeat/any/flip_rate"]["k"] == 5
    # list_b4 is paired with list_b1, which has no repeat: beside sync_b1's repeat
    lst = nums["a/m/list_b4/vs_repeat/any/text_change_vs_repeat_p"]
    assert (lst["b"], lst["c"], lst["baseline"], lst["repeat"]) == (0, 3, "list_b1",
                                                                    "sync_b1_repeat")
    assert lst["value"] == pytest.approx(0.25)  # all 3 discordant the repeat's: 2 / 2^3
    assert "a/m/list_b1/vs_repeat/any/text_change_rate" not in nums  # a baseline
    assert "a/m/sync_b1/vs_repeat/any/text_change_rate" not in nums
    assert all(r["section"] == "repeat_control" for r in nums.values())


def test_without_a_repeat_the_study_says_so():
    frames = {k: v for k, v in _frames().items() if "repeat" not in k}
    nums = repeat_numbers(frames, "a", "sync_b1", {"list": "list_b1"})
    assert list(nums) == ["a/all/repeat_control"]
    assert nums["a/all/repeat_control"]["note"].startswith("not estimable:")


def test_without_repeats_drops_only_repeat_rows():
    df = pd.DataFrame({"condition": ["sync_b1", "sync_b1_repeat", "conc_c1_repeat", "x"]})
    assert without_repeats(df)["condition"].tolist() == ["sync_b1", "x"]


def test_cli_writes_the_numbers(tmp_path, capsys):
    paths = []
    for name, df in _frames().items():
        p = tmp_path / name.rsplit("/", 1)[1]
        df.to_parquet(p)
        paths.append(str(p))
    out = tmp_path / "repeat_a.json"
    assert cli_main(["repeat", "numbers", "--study", "a", "--baseline", "sync_b1",
                     "--dispatch-baseline", "list=list_b1", "--scored", *paths,
                     "--out", str(out)]) == 0
    nums = json.loads(out.read_text())["numbers"]
    assert nums["a/m/sync_b8/vs_repeat/any/flip_vs_repeat_p"]["b"] == 4
