"""config/gpu-full.yaml and config/gpu-window.yaml (issue 24): what each job would run with.
Their dry runs are in test_documented_commands.py (the header commands)."""

from __future__ import annotations

import yaml
from conftest import ROOT

from batchflip import layout
from batchflip.config import check_references, check_schema, fill_defaults
from batchflip.engines.vllm_launch import launch_settings
from batchflip.settings import GenerationSettings

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
FP16, BF16 = "qwen2.5-coder-0.5b-fp16", "qwen2.5-coder-0.5b-bf16"


def _load(name: str) -> dict:
    cfg = yaml.safe_load((ROOT / "config" / name).read_text())
    check_schema(cfg, SCHEMA)
    fill_defaults(cfg, yaml.safe_load(SCHEMA.read_text()))
    check_references(cfg)
    return cfg


def test_full_config_runs_both_dtypes_of_one_model_on_replicated_servers():
    cfg = _load("gpu-full.yaml")
    a = cfg["studies"]["a"]
    assert a["max_new_tokens"] == 256 and a["seed"] == 42 and a["logprobs"] == 2
    assert a["prompt_format"] == "raw" and a["models"] == [FP16, BF16]
    # the same weights (model stage spec without dtype), two dtypes
    spec = {m: {k: v for k, v in cfg["models"][m].items() if k != "dtype"} for m in (FP16, BF16)}
    assert spec[FP16] == spec[BF16]
    dtypes = {m: layout.generation_settings(cfg, "a", m, ["sync_b1"])["dtype"]
              for m in (FP16, BF16)}
    assert dtypes == {FP16: "float16", BF16: "bfloat16"}
    # A and C share one server per model: two server jobs, each with both studies
    jobs = layout.server_jobs(cfg)
    # per model one A+C server and one fresh start for the repeat controls (issue 22)
    assert sorted(j.models for j in jobs) == [[BF16], [BF16], [FP16], [FP16]]
    assert all([s for s, _ in j.parts] == ["a", "c"] for j in jobs)
    repeats = [c for j in jobs for _, conds in j.parts for c in conds if "repeat" in c]
    assert sorted(repeats) == sorted(["sync_b1_repeat", "cobatch_b8_solo_repeat"] * 2)
    # two replicas, each with half of the paper's 0.80
    eff = launch_settings(GenerationSettings.from_mapping(
        layout.generation_settings(cfg, "a", FP16, ["sync_b1"])), {"device_type": "cuda"})
    assert eff["replicas"] == 2 and eff["gpu_memory_utilization"] == 0.4
    # Study D: the source's settings (bf16 stays bf16), the probe, the candidate rule
    d = layout.ablation_settings(cfg, "d", BF16, "batch_invariant")
    assert d["dtype"] == "bfloat16" and d["invariance_probe"]["batch"] == 8
    assert cfg["studies"]["d"]["candidates"] == "label_flips_else_text_changes"
    assert cfg["studies"]["d"]["min_label_flips"] == 10
    assert layout.probe_control_stack(cfg, "d", BF16, "batch_invariant") == [
        layout.stack_path(layout.ablation_run_path("d", BF16, "standard"))]
    conds = layout.conditions_of(cfg, "a", FP16)
    assert conds[:6] == ["sync_b1", "sync_b2", "sync_b4", "sync_b8", "sync_b16", "sync_b32"]
    assert {"cobatch_b8_solo", "cobatch_b8_benign", "cobatch_b8_adversarial", "list_b1",
            "list_b8"} <= set(conds)
    assert "sync_b1_repeat" in conds


def test_window_config_is_the_fp16_cut_with_one_server():
    cfg = _load("gpu-window.yaml")
    a, c = cfg["studies"]["a"], cfg["studies"]["c"]
    assert a["models"] == c["models"] == [FP16]
    assert a["conditions"] == ["sync_b1", "sync_b8", "sync_b32", "sync_b1_repeat"]
    assert sum(a["subset"]["per_task"].values()) == 192
    assert sum(c["subset"]["per_task"][t] for t in c["cobatch_targets"]) == 32
    eff = launch_settings(GenerationSettings.from_mapping(
        layout.generation_settings(cfg, "a", FP16, ["sync_b1"])), {"device_type": "cuda"})
    assert "replicas" not in eff and eff["gpu_memory_utilization"] == 0.8
    assert cfg["studies"]["d"]["dispatches"] == ["sync"]
    assert len(layout.server_jobs(cfg)) == 2  # A+C, and the repeats' fresh start
