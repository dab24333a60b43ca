"""Sound pairs (issue 22): the arms of every contrast Study C's numbers compute hold the same
fillers, in the same order, at the same target position, unless their pools differ by
design (batchflip.studies.composition_pairs.differ_by_design).

The contrasts are the module's own list (each condition vs the baseline, the paper's 7
pairs, temporal, 3A, 3B, the repeat); the groups are the generate stage's
(batchflip.generate.build_groups) with each condition's scope settings, on a synthetic
battery and on the paper battery with config/paper.yaml's Study C."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from conftest import ROOT, SHARED, condition_settings, needs_shared

from batchflip.battery import build_battery
from batchflip.conditions import parse_condition
from batchflip.design import select_subset
from batchflip.generate import build_groups
from batchflip.studies.composition_pairs import contrasts, differ_by_design

# config/paper.yaml's Study C conditions with a repeat: every family of contrasts
STUDY_C = ["cobatch_b8_solo", "cobatch_b8_benign", "cobatch_b8_jailbreak", "cobatch_b8_mixed",
           "cobatch_b8_refusal", "stagger_b8_jailbreak_m250", "stagger_b8_jailbreak_p250",
           "stagger_b8_jailbreak_simultaneous", "stagger_b8_jailbreak_minimal_overlap",
           "cobatch_b8_solo_ph3a", "cobatch_b8_benign_ph3a", "cobatch_b8_refusal_ph3a",
           "list_b8_jailbreak_ph3b", "cobatch_b8_jailbreak_ph3b", "cobatch_b8_solo_repeat"]


def layouts(battery: pd.DataFrame, study: dict, cond: str) -> dict[str, tuple]:
    """target -> (member ids in slot order, target position) of one condition's groups."""
    settings = condition_settings(study, cond)
    prompts = select_subset(battery, settings.subset).assign(sent="")
    out = {}
    for g in build_groups(prompts, parse_condition(cond), settings):
        target = next(m for m in g.members if m.role == "target")
        out[target.prompt_id] = (tuple(m.prompt_id for m in g.members), target.position)
    return out


def check_contrasts(battery: pd.DataFrame, study: dict) -> dict[str, int]:
    """Assert the rule for every contrast; return the contrasts checked per family."""
    cache: dict[str, dict[str, tuple]] = {}
    checked: dict[str, int] = {}
    for a, b, family in contrasts(study["conditions"], study["baseline"]):
        for c in (a, b):
            if c not in cache:
                cache[c] = layouts(battery, study, c)
        common = sorted(set(cache[a]) & set(cache[b]))
        assert common, f"{a} vs {b}: no common target"
        reason = differ_by_design(a, b)
        for t in common:
            (ids_a, pos_a), (ids_b, pos_b) = cache[a][t], cache[b][t]
            if reason is None:
                assert (ids_a, pos_a) == (ids_b, pos_b), f"{family}: {a} vs {b}, target {t}"
            elif len(ids_a) > 1 and len(ids_b) > 1:  # two filler pools: the same slot
                assert pos_a == pos_b, f"{family}: {a} vs {b}, target {t}"
        checked[family] = checked.get(family, 0) + 1
    return checked


def synthetic() -> pd.DataFrame:
    rows = [(f"{t}_{i:02d}", t) for t, n in (("harm", 12), ("jb", 14), ("mc", 16), ("bord", 9))
            for i in range(n)]
    df = pd.DataFrame(rows, columns=["prompt_id", "task"])
    return df.sample(frac=1, random_state=5).reset_index(drop=True)  # tasks interleaved


SYNTHETIC_STUDY = {
    "baseline": "cobatch_b8_solo", "conditions": STUDY_C, "seed": 42,
    "models": ["m"], "cobatch_targets": ["harm", "jb"],
    "filler_pools": {"benign": {"tasks": ["mc", "bord"]}, "jailbreak": {"tasks": ["jb"]},
                     "refusal": {"tasks": ["harm"]}, "mixed": {"mix": {"benign": 4,
                                                                       "jailbreak": 3}}},
    "scopes": [{"conditions": [c for c in STUDY_C if c.startswith("stagger")],
                "subset": {"per_task": {"harm": 8, "jb": 10, "mc": 16, "bord": 9},
                           "method": "sample", "seed": 1}},
               {"conditions": ["cobatch_b8_solo_ph3a", "cobatch_b8_benign_ph3a",
                               "cobatch_b8_refusal_ph3a"], "cobatch_targets": ["jb"]},
               {"conditions": ["list_b8_jailbreak_ph3b", "cobatch_b8_jailbreak_ph3b"],
                "subset": {"per_task": {"harm": 8, "jb": 10, "mc": 16, "bord": 9},
                           "method": "sample", "seed": 1}}]}


def test_every_contrast_of_a_synthetic_study_compares_like_with_like():
    checked = check_contrasts(synthetic(), SYNTHETIC_STUDY)
    # 14 vs the baseline... (every untagged non-repeat condition), the 7 paper pairs, the
    # temporal phase's 3 (m250, p250, minimal_overlap vs simultaneous), 3A's 2, 3B's 1
    assert checked == {"baseline": 8, "paper_pairs": 7, "temporal": 3, "phase_3a": 2,
                       "phase_3b": 1, "repeat": 1}


def test_the_draw_ignores_the_condition_name_but_not_pool_size_or_seed():
    battery, study = synthetic(), SYNTHETIC_STUDY
    same = [layouts(battery, {**study, "scopes": []}, c) for c in (
        "cobatch_b8_jailbreak", "stagger_b8_jailbreak_m250", "stagger_b8_jailbreak_p1000",
        "stagger_b8_jailbreak_minimal_overlap", "list_b8_jailbreak_ph3b",
        "cobatch_b8_jailbreak_ph9")]
    assert all(x == same[0] for x in same)
    # the pool changes the fillers but not the position; the size and seed change both
    benign = layouts(battery, study, "cobatch_b8_benign")
    assert all(benign[t][1] == same[0][t][1] and set(benign[t][0]) != set(same[0][t][0])
               for t in benign)
    b4 = layouts(battery, study, "cobatch_b4_jailbreak")
    assert any(b4[t][1] != same[0][t][1] for t in b4)
    other_seed = layouts(battery, {**study, "seed": 7}, "cobatch_b8_jailbreak")
    assert other_seed != same[0]
    # positions still vary over targets, and each target keeps 7 distinct other prompts
    assert len({pos for _, pos in same[0].values()}) > 3
    assert all(len(set(ids)) == 8 and ids[pos] == t for t, (ids, pos) in same[0].items())


@pytest.fixture(scope="module")
def paper_battery_frame():
    return build_battery([SHARED / "paper_battery"])


@needs_shared
def test_every_contrast_of_the_paper_study_c_compares_like_with_like(paper_battery_frame):
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    study = cfg["studies"]["c"]
    assert "cobatch_b8_solo_repeat" in study["conditions"]
    checked = check_contrasts(paper_battery_frame, study)
    assert checked == {"baseline": 12, "paper_pairs": 7, "temporal": 7, "phase_3a": 2,
                       "phase_3b": 1, "repeat": 1}
