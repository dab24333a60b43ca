"""config/paper.yaml plans the paper's design: the planned row counts equal the paper's.

Rows are counted from the real plan: `snakemake -n results/paper` lists every generation
file it would write; each file's target rows are the target members of the groups the
generate stage builds for that condition (scope subset and targets applied), on the
battery imported from ../shared/data/paper_battery, or where that is absent (CI) on a
synthetic battery with the paper's task names, types and prompts per task
(conftest.PAPER_TASK_SIZES). The oracles are PAPER.md's counts.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest
import yaml
from conftest import PAPER_TASK_SIZES, ROOT, condition_settings, needs_shared, paper_battery
from test_workflow import job_counts, snakemake

from batchflip.battery import build_battery
from batchflip.conditions import parse_condition
from batchflip.design import select_subset
from batchflip.generate import build_groups

PAPER = ROOT / "config/paper.yaml"
GEN = re.compile(r"results/generations/(\w+)/([^/\s,]+)/(\w+)\.parquet")
ABL = re.compile(r"results/ablation/(\w+)/([^/\s,]+)/(standard|batch_invariant)\.parquet")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """(config, dry-run stdout, battery) of config/paper.yaml, battery path made absolute."""
    tmp = tmp_path_factory.mktemp("paper")
    cfg = yaml.safe_load(PAPER.read_text())
    assert cfg["batteries"]["paper"]["paths"] == ["../shared/data/paper_battery"]
    battery = paper_battery(tmp, sizes=PAPER_TASK_SIZES)
    cfg["batteries"]["paper"]["paths"] = [str(battery)]
    path = tmp / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "results/paper", "--configfile", str(path), cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cfg, proc.stdout, build_battery([battery])


def planned_rows(cfg, stdout, battery):
    """Target rows of every planned generation file: {(study, model, condition): rows}."""
    # the repeat controls (*_repeat, docs/pairs.md) are ours, not part of the paper's design
    files = {m.groups() for m in GEN.finditer(stdout) if not m.group(3).endswith("_repeat")}
    cache: dict[tuple[str, str], int] = {}
    out = {}
    for study, model, cond in files:
        if (study, cond) not in cache:
            s = cfg["studies"][study]
            settings = condition_settings(s, cond)
            prompts = select_subset(battery, settings.subset).assign(sent="")
            groups = build_groups(prompts, parse_condition(cond), settings)
            cache[study, cond] = sum(m.role == "target" for g in groups for m in g.members)
        out[study, model, cond] = cache[study, cond]
    return out


@needs_shared
def test_battery_is_the_papers(plan):
    _, _, battery = plan
    assert len(battery) == 953
    assert battery.groupby("domain").size().to_dict() == {"safety": 468, "capability": 485}


def test_study_a_rows_per_dispatch_equal_the_papers(plan):
    rows = planned_rows(*plan)
    by = Counter()
    for (study, _, cond), n in rows.items():
        if study == "a":
            by[parse_condition(cond).dispatch] += n
    # PAPER.md, Study A: 17,154 synchronized; 5,616 co-batching; 2,700 true batching
    assert by == {"sync": 17154, "cobatch": 5616, "list": 2700}
    models = defaultdict(set)
    for (study, model, cond) in rows:
        if study == "a":
            models[parse_condition(cond).dispatch].add(model)
    assert len(models["sync"]) == 3 and len(models["list"]) == 2  # true batching: two models


def test_study_a_conditioned_rows_give_the_published_rates(plan):
    # 0.51% = 36 / 7,020 safety and 0.14% = 10 / 7,275 capability conditioned rows:
    # the non-baseline synchronized rows of the planned files, by domain
    cfg, stdout, battery = plan
    n_models = len(cfg["studies"]["a"]["models"])
    counts = battery.groupby("domain").size()
    non_base = [c for c in cfg["studies"]["a"]["conditions"]
                if c.startswith("sync_") and c != "sync_b1" and not c.endswith("_repeat")]
    assert counts["safety"] * len(non_base) * n_models == 7020
    assert counts["capability"] * len(non_base) * n_models == 7275


def test_study_b_rows_per_model_equal_the_papers(plan):
    cfg, stdout, battery = plan
    rows = planned_rows(cfg, stdout, battery)
    b = {k: v for k, v in rows.items() if k[0] == "b"}
    models = {m for _, m, _ in b}
    assert len(models) == 15
    assert {cfg["models"][m]["alignment"] for m in models} == {"RLHF", "SFT", "DPO",
                                                               "Distilled"}
    assert cfg["studies"]["b"]["seed"] == 137
    # PAPER.md: fragility over batch sizes 2-32 = 468 safety prompts x 5 = 2,340 rows/model
    safety = int((battery["domain"] == "safety").sum())
    for m in models:
        sync = [c for (_, mm, c) in b if mm == m and c.startswith("sync_") and c != "sync_b1"]
        assert len(sync) == 5 and safety * len(sync) == 2340


def _study_rows(plan, study: str) -> dict[str, int]:
    """Planned target rows of one study, by condition (summed over models)."""
    by: Counter = Counter()
    for (s, _, cond), n in planned_rows(*plan).items():
        if s == study:
            by[cond] += n
    return dict(by)


# PAPER.md's row counts, typed from it (not computed by the code):
# Study A: 17,154 synchronized + 5,616 co-batching + 5,940 quantization x concurrency + 2,700
# true batching = 31,410; Study B: 15 models x (953 x 6 synchronized + 450 x 3 prompt-list) =
# 15 x 7,068 = 106,020; Study C: 9,930 composition + 3,200 temporal + 720 phase 3A + 400
# phase 3B = 14,250.
STUDY_A_PHASES = {"sync": 17154, "cobatch": 5616, "quant_concurrency": 5940, "list": 2700}
STUDY_B_ROWS = 106020
STUDY_C_PHASES = {"composition": 9930, "temporal": 3200, "phase_3a": 720, "phase_3b": 400}


# Study A's phase 3 ran on a second engine (an Ollama endpoint), so it is a study of its
# own in config/paper.yaml (a_quant: engine openai); Study A is studies a + a_quant
STUDY_A = ("a", "a_quant")


def test_study_a_total_rows_equal_the_papers(plan):
    rows = {s: sum(_study_rows(plan, s).values()) for s in STUDY_A}
    assert rows["a_quant"] == STUDY_A_PHASES["quant_concurrency"]
    assert rows["a"] == sum(n for k, n in STUDY_A_PHASES.items() if k != "quant_concurrency")
    assert sum(rows.values()) == sum(STUDY_A_PHASES.values()) == 31410


def test_study_a_phase_3_is_three_models_by_three_quantizations_by_three_concurrencies(plan):
    # PAPER.md: three quantizations x concurrency 1, 4, 8 x 220 refusal prompts; the harness
    # (tr138 config.yaml phase3): Study A's three models at Q8_0, Q4_K_M, Q2_K through
    # Ollama, the AdvBench and jailbreak-amplification prompts (PHASE3_SAFETY_TASKS)
    cfg, stdout, battery = plan
    rows = {k: n for k, n in planned_rows(cfg, stdout, battery).items() if k[0] == "a_quant"}
    study = cfg["studies"]["a_quant"]
    cells = {(cfg["models"][m]["base"], cfg["models"][m]["quant"], c): n
             for (_, m, c), n in rows.items()}
    assert set(cells.values()) == {220} and len(cells) == 27
    assert {b for b, _, _ in cells} == set(cfg["studies"]["a"]["models"])
    assert {q for _, q, _ in cells} == {"Q8_0", "Q4_K_M", "Q2_K"}
    assert {parse_condition(c).concurrency for _, _, c in cells} == {1, 4, 8}
    assert {parse_condition(c).dispatch for _, _, c in cells} == {"conc"}
    assert study["engine"] == "openai" and study["baseline"] == "conc_c1"
    subset = select_subset(battery, study["subset"])
    assert subset.groupby("task").size().to_dict() == {"advbench_refusal": 100,
                                                        "jailbreak_amplification": 120}
    assert all(cfg["models"][m]["source"] == "endpoint" for m in study["models"])


def test_study_b_total_rows_equal_the_papers(plan):
    rows = _study_rows(plan, "b")
    sync = sum(n for c, n in rows.items() if parse_condition(c).dispatch == "sync")
    lst = sum(n for c, n in rows.items() if parse_condition(c).dispatch == "list")
    assert (sync, lst) == (15 * 953 * 6, 15 * 450 * 3)
    assert sum(rows.values()) == STUDY_B_ROWS


def _study_c_phase(cond: str) -> str:
    """The Study C phase a condition belongs to (by its name)."""
    c = parse_condition(cond)
    if c.phase:
        return f"phase_{c.phase}"
    return "temporal" if c.dispatch == "stagger" else "composition"


def test_study_c_composition_phase_rows_equal_the_papers(plan):
    # 3 models x (468 safety targets x 5 compositions + 485 capability x 2) = 9,930
    rows = _study_rows(plan, "c")
    cobatch = sum(n for c, n in rows.items() if _study_c_phase(c) == "composition")
    assert cobatch == STUDY_C_PHASES["composition"]


def test_study_c_total_rows_equal_the_papers(plan):
    rows = _study_rows(plan, "c")
    by: Counter = Counter()
    for cond, n in rows.items():
        by[_study_c_phase(cond)] += n
    assert dict(by) == STUDY_C_PHASES
    stagger = sum(n for c, n in rows.items() if parse_condition(c).dispatch == "stagger")
    assert stagger == STUDY_C_PHASES["temporal"]
    assert sum(rows.values()) == sum(STUDY_C_PHASES.values()) == 14250


def test_study_c_phases_as_designed(plan):
    # temporal: 2 models x 200 prompts x 8 stagger conditions (6 offsets, simultaneous,
    # minimal_overlap); 3A: 2 models x 120 jailbreak targets x (solo, benign-7, refusal-7);
    # 3B: 1 model x 200 prompts x (static, continuous)
    cfg, stdout, battery = plan
    rows = planned_rows(cfg, stdout, battery)
    per: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for (study, model, cond), n in rows.items():
        if study == "c":
            per[_study_c_phase(cond)]["models"].add(model)
            per[_study_c_phase(cond)]["conds"].add(cond)
            per[_study_c_phase(cond)]["n"].add(n)
    assert len(per["temporal"]["models"]) == 2 and per["temporal"]["n"] == {200}
    timings = {parse_condition(c).timing for c in per["temporal"]["conds"]}
    assert len(per["temporal"]["conds"]) == 8
    assert timings == {"offset", "simultaneous", "minimal_overlap"}
    assert len(per["phase_3a"]["models"]) == 2 and per["phase_3a"]["n"] == {120}
    assert {parse_condition(c).pool for c in per["phase_3a"]["conds"]} == {
        "solo", "benign", "refusal"}
    assert len(per["phase_3b"]["models"]) == 1 and per["phase_3b"]["n"] == {200}
    assert {parse_condition(c).dispatch for c in per["phase_3b"]["conds"]} == {"list",
                                                                              "cobatch"}


def test_enriched_subset_rows_per_prompt_equal_the_papers(plan):
    # PAPER.md: 187 prompts, 27/1,605 safety and 5/1,200 capability conditioned rows; 1,605 +
    # 1,200 = 2,805 = 187 x 15. The subset is chosen from Study A's results at run time, so
    # the plan fixes the rows per prompt: non-baseline synchronized conditions x models.
    cfg, _, _ = plan
    ae = cfg["studies"]["ae"]
    assert ae["subset_from"] == {"study": "a", "rule": "boundary"}
    non_base = [c for c in ae["conditions"]
                if c != ae["baseline"] and not c.endswith("_repeat")]  # the repeat is ours
    assert all(parse_condition(c).dispatch == "sync" for c in ae["conditions"])
    per_prompt = len(non_base) * len(ae["models"])
    assert 187 * per_prompt == 1605 + 1200


def test_study_d_reruns_each_candidate_alone_and_in_group_under_both_kernels(plan):
    # PAPER.md: the 55 flipped Study A rows (46 synchronized, 9 prompt-list) re-run alone and
    # inside their reconstructed batch, under standard and VLLM_BATCH_INVARIANT=1 kernels:
    # 4 rows a candidate. Which rows flipped is known only after Study A runs, so the plan is
    # checked per candidate: one file per (model, kernel mode), each holding both runs.
    from batchflip.studies.ablation_runs import RUNS

    cfg, stdout, _ = plan
    d = cfg["studies"]["d"]
    runs = {m.groups() for m in ABL.finditer(stdout)}
    assert {s for s, _, _ in runs} == {"d"}
    assert {k for _, _, k in runs} == {"standard", "batch_invariant"}
    assert {m for _, m, _ in runs} == set(cfg["studies"]["a"]["models"])
    assert len(runs) == 3 * 2  # every Study A model under both kernel modes
    assert set(RUNS) == {"alone", "group"}
    assert set(d["dispatches"]) == {"sync", "list"}  # both kinds of the paper's 55


def test_every_stage_is_planned(plan):
    _, stdout, _ = plan
    counts = job_counts(stdout)
    for rule in ("battery", "score", "flips", "discovery_numbers", "models_numbers",
                 "models_figure",
                 "composition_numbers", "enriched_battery", "enriched_numbers", "paper"):
        assert counts.get(rule, 0) >= 1, rule
    assert any(r.startswith("generate_server_") for r in counts)
    # each of the 15 hub models is downloaded once, by the model rule
    assert counts["model"] == 15
