"""Subsets and scopes (batchflip.design) and their config checks."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml
from conftest import ROOT, condition_settings

from batchflip.conditions import parse_condition
from batchflip.config import check_config
from batchflip.design import condition_params, conditions_for, models_for, select_subset
from batchflip.errors import BatchflipError
from batchflip.generate import build_groups

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def battery() -> pd.DataFrame:
    rows = [(f"{t}_{i}", t) for t in ("x", "y", "z") for i in range(10)]
    df = pd.DataFrame(rows, columns=["prompt_id", "task"])
    df["domain"] = df["task"].map({"x": "safety", "y": "safety", "z": "capability"})
    return df.sample(frac=1, random_state=3).reset_index(drop=True)  # tasks interleaved


def test_head_keeps_the_first_n_of_each_task_in_battery_order():
    b = battery()
    out = select_subset(b, {"per_task": {"x": 3, "z": 2}})
    expect = [*b[b.task == "x"].prompt_id[:3], *b[b.task == "z"].prompt_id[:2]]
    assert sorted(out.prompt_id) == sorted(expect)
    assert list(out.prompt_id) == [p for p in b.prompt_id if p in set(expect)]  # order kept
    assert "y" not in set(out.task)  # unlisted tasks are left out


def test_sample_is_seeded():
    b = battery()
    spec = {"per_task": {"x": 4, "y": 4}, "method": "sample", "seed": 7}
    one, two = select_subset(b, spec), select_subset(b, spec)
    assert list(one.prompt_id) == list(two.prompt_id)
    others = {tuple(select_subset(b, {**spec, "seed": s}).prompt_id) for s in range(8)}
    assert len(others) > 1


def test_subset_errors_name_the_field():
    with pytest.raises(BatchflipError, match=r"subset\.per_task\.x: asks for 11"):
        select_subset(battery(), {"per_task": {"x": 11}})
    with pytest.raises(BatchflipError, match=r"subset\.per_task\.nope: no such task"):
        select_subset(battery(), {"per_task": {"nope": 1}})


STUDY = {"models": ["m1", "m2", "m3"], "baseline": "sync_b1",
         "dispatch_baselines": {"list": "list_b1"},
         "conditions": ["sync_b1", "sync_b4", "list_b1", "list_b4"],
         "scopes": [{"conditions": ["list_b1", "list_b4"], "models": ["m2", "m3"],
                     "subset": {"per_task": {"x": 2, "z": 2}}}]}


def test_scopes_narrow_models_and_prompts():
    assert conditions_for(STUDY, "m1") == ["sync_b1", "sync_b4"]
    assert conditions_for(STUDY, "m2") == STUDY["conditions"]
    assert models_for(STUDY, "list_b4") == ["m2", "m3"]
    params = {"seed": 1, "condition_overrides": {"list_b4": {"subset": {"per_task": {"x": 2}}}}}
    assert condition_params(params, "list_b4") == {"seed": 1, "subset": {"per_task": {"x": 2}}}
    assert condition_params(params, "sync_b4") == {"seed": 1}
    # a list_b4 job on the subset: 4 targets in one group of 4
    b = select_subset(battery(), STUDY["scopes"][0]["subset"]).assign(sent="p")
    groups = build_groups(b, parse_condition("list_b4"), condition_settings({"seed": 1},
                                                                           "list_b4"))
    assert sum(m.role == "target" for g in groups for m in g.members) == 4


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_config_checks_scopes():
    cfg = default_config()
    study = cfg["studies"]["a"]
    study["scopes"] = [{"conditions": ["sync_b8"], "models": ["smollm2-135m"]}]
    check_config(copy.deepcopy(cfg), SCHEMA)
    study["scopes"] = [{"conditions": ["sync_b9"]}]
    with pytest.raises(BatchflipError, match=r"studies\.a\.scopes\.0\.conditions.*sync_b9"):
        check_config(copy.deepcopy(cfg), SCHEMA)
    study["scopes"] = [{"conditions": ["sync_b8"], "models": ["other"]}]
    with pytest.raises(BatchflipError, match=r"scopes\.0\.models.*'other'"):
        check_config(copy.deepcopy(cfg), SCHEMA)


def test_config_checks_a_scope_that_drops_a_baseline():
    cfg = default_config()
    cfg["models"]["m2"] = dict(cfg["models"]["smollm2-135m"])
    study = cfg["studies"]["a"]
    study["models"] = ["smollm2-135m", "m2"]
    study["scopes"] = [{"conditions": ["sync_b1"], "models": ["m2"]}]
    with pytest.raises(BatchflipError, match=r"\['smollm2-135m'\] run '.*' but not its "
                                             r"baseline 'sync_b1'"):
        check_config(cfg, SCHEMA)


def test_config_checks_a_chat_study_on_a_model_without_a_template():
    cfg = default_config()
    cfg["models"]["gemma3-270m"].pop("prompt_format")
    with pytest.raises(BatchflipError, match=r"models\.gemma3-270m\.prompt_format"):
        check_config(cfg, SCHEMA)


def test_config_checks_subset_from():
    cfg = default_config()
    cfg["studies"]["e"] = {**copy.deepcopy(cfg["studies"]["a"]),
                           "subset_from": {"study": "nope"}}
    with pytest.raises(BatchflipError, match=r"studies\.e\.subset_from\.study"):
        check_config(copy.deepcopy(cfg), SCHEMA)
    cfg["studies"]["e"]["subset_from"] = {"study": "a"}
    check_config(cfg, SCHEMA)


def test_config_checks_conc_conditions_need_a_server_engine():
    cfg = default_config()
    cfg["studies"]["a"]["conditions"].append("conc_c4")
    with pytest.raises(BatchflipError, match=r"studies\.a\.conditions.*'conc_c4'.*engine hf"):
        check_config(copy.deepcopy(cfg), SCHEMA)
    cfg["studies"]["a"]["conditions"].remove("conc_c4")
    cfg["studies"]["a_vllm"]["conditions"] += ["conc_c1", "conc_c4"]  # a server study
    check_config(copy.deepcopy(cfg), SCHEMA)
    cfg["studies"]["a_vllm"]["conditions"].append("conc_b4")
    with pytest.raises(BatchflipError, match=r"studies\.a_vllm\.conditions\.\d+.*pattern"):
        check_config(cfg, SCHEMA)


# --------------------------------------------------------------- Study C's phases (issue 13)

PHASE_POOLS = {"benign": {"tasks": ["z"]}, "refusal": {"tasks": ["y"]},
               "jailbreak": {"tasks": ["y"]}}


def _groups(cond: str, targets: list[str]) -> list:
    b = battery().assign(sent=lambda d: "s-" + d["prompt_id"])
    study = {"seed": 42, "cobatch_targets": targets, "filler_pools": PHASE_POOLS}
    return build_groups(b, parse_condition(cond), condition_settings(study, cond))


def test_phase_3a_groups_target_the_phase_tasks_with_their_fillers():
    # phase 3A: the targets of one task (here x, 10 prompts) under solo / benign-7 / refusal-7
    solo = _groups("cobatch_b8_solo_ph3a", ["x"])
    assert [len(g.members) for g in solo] == [1] * 10
    assert sorted(g.members[0].prompt_id for g in solo) == [f"x_{i}" for i in range(10)]
    for cond, task in (("cobatch_b8_benign_ph3a", "z"), ("cobatch_b8_refusal_ph3a", "y")):
        groups = _groups(cond, ["x"])
        assert len(groups) == 10
        for g in groups:
            roles = [m.role for m in g.members]
            assert len(g.members) == 8 and roles.count("target") == 1
            fillers = [m.prompt_id for m in g.members if m.role == "filler"]
            assert len(set(fillers)) == 7 and all(f.startswith(task + "_") for f in fillers)
            assert [m.position for m in g.members] == list(range(8))
            assert all(m.prompt == "s-" + m.prompt_id for m in g.members)


def test_phase_3b_static_groups_are_one_list_of_target_and_fillers():
    static = _groups("list_b8_jailbreak_ph3b", ["x"])
    cont = _groups("cobatch_b8_jailbreak_ph3b", ["x"])
    assert [g.members[[m.role for m in g.members].index("target")].prompt_id
            for g in static] == [g.members[[m.role for m in g.members].index("target")]
                                 .prompt_id for g in cont]
    for g in static:
        assert len(g.members) == 8 and sum(m.role == "target" for m in g.members) == 1
        assert all(m.prompt_id.startswith("y_") for m in g.members if m.role == "filler")


def test_temporal_groups_are_composition_groups():
    for cond in ("stagger_b8_jailbreak_simultaneous", "stagger_b8_jailbreak_minimal_overlap"):
        groups = _groups(cond, ["x"])
        assert len(groups) == 10 and all(len(g.members) == 8 for g in groups)


# Mislabelled batch size (issue 21): a sync/list condition with fewer prompts than its batch
# ran one smaller group and recorded batch_size n on every row; the config check refuses it.
def test_config_refuses_a_batch_larger_than_the_studys_subset():
    cfg = default_config()
    cfg["studies"]["b"]["conditions"].append("sync_b32")  # b sends 8 + 8 = 16 prompts
    with pytest.raises(BatchflipError) as err:
        check_config(copy.deepcopy(cfg), SCHEMA)
    msg = str(err.value)
    assert "studies.b.conditions" in msg and "'sync_b32'" in msg and "study 'b'" in msg
    assert "batches of 32" in msg and "only 16 prompts" in msg
    cfg["studies"]["b"]["conditions"][-1] = "sync_b16"  # exactly the 16 it sends
    check_config(copy.deepcopy(cfg), SCHEMA)


def test_config_refuses_a_list_batch_larger_than_its_scopes_subset():
    cfg = default_config()
    study = cfg["studies"]["a_vllm"]
    study["scopes"] = [{"conditions": ["list_b1", "list_b8"],
                        "subset": {"per_task": {"harmful_refusal": 3, "borderline_safe": 2}}}]
    with pytest.raises(BatchflipError, match=r"studies\.a_vllm\.conditions.*'list_b8'.*"
                                             r"batches of 8.*only 5 prompts"):
        check_config(copy.deepcopy(cfg), SCHEMA)
    study["scopes"][0]["subset"]["per_task"]["borderline_safe"] = 5
    check_config(copy.deepcopy(cfg), SCHEMA)


def test_config_refuses_a_batch_larger_than_a_whole_task_file_battery(tmp_path):
    samples = "".join(f"  - {{id: t{i}, question: q{i}, reference: A}}\n" for i in range(5))
    (tmp_path / "t.yaml").write_text("name: t\ntask_type: classification\n"
                                     "prompt_template: '{{ question }}'\nsamples:\n" + samples)
    cfg = yaml.safe_load((ROOT / "tests/fixtures/tiny_config.yaml").read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(tmp_path)]
    study = cfg["studies"]["a"]
    study["conditions"], study["cobatch_targets"] = ["sync_b1", "sync_b8"], ["t"]
    study.pop("filler_pools")
    with pytest.raises(BatchflipError, match=r"'sync_b8'.*batches of 8.*only 5 prompts"):
        check_config(copy.deepcopy(cfg), SCHEMA)
    study["conditions"] = ["sync_b1", "sync_b5", "cobatch_b8_solo"]  # composition: its own rule
    check_config(copy.deepcopy(cfg), SCHEMA)


@pytest.mark.parametrize("name", ["config.yaml", "gpu-check.yaml", "paper.yaml"])
def test_shipped_configs_pass_the_batch_size_check(tmp_path, name):
    from conftest import paper_battery

    cfg = yaml.safe_load((ROOT / "config" / name).read_text())
    for spec in cfg["batteries"].values():
        spec["paths"] = [str(paper_battery(tmp_path)) if "paper_battery" in p else str(ROOT / p)
                         for p in spec.get("paths", [])]
    check_config(cfg, SCHEMA)
