"""The host CPU profile (``cpu_profiles``, batchflip.config.apply_cpu_profile): which CPUs
get it, what it changes in the shipped default, that it reaches the jobs' params and stack
fingerprints, and that every study and condition of the default stays (issue 25)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from batchflip import layout
from batchflip.config import CPU_PROFILE_ENV, apply_cpu_profile, check_config, cpu_profile_for
from batchflip.errors import BatchflipError
from batchflip.generate import run_job
from batchflip.platform_facts import cpu_facts

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
# hand-built CPU facts (batchflip.platform_facts.cpu_facts's keys)
AVX2_ONLY = {"cpu_model": "AMD EPYC 7551", "arch": "x86_64", "isa": ["avx", "avx2", "fma"]}
SAPPHIRE = {"cpu_model": "Xeon", "arch": "x86_64",
            "isa": ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]}
SAPPHIRE_CAPPED = {**SAPPHIRE, "isa_env": {"BATCHFLIP_ISA_CAP": "avx2"}}


def _default() -> dict:
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


@pytest.mark.parametrize(("cpu", "want"), [(AVX2_ONLY, "no_native_bf16"), (SAPPHIRE, None),
                                           (SAPPHIRE_CAPPED, "no_native_bf16")])
def test_profile_follows_native_bf16_and_the_isa_caps(cpu, want):
    assert cpu_profile_for(cpu) == want


def test_native_bf16_cpu_keeps_the_config_as_written():
    config = _default()
    before = copy.deepcopy(config)
    assert apply_cpu_profile(config, SAPPHIRE) is None
    assert config == before


def test_avx2_cpu_takes_the_profile_in_the_named_studies_only():
    config = _default()
    before = copy.deepcopy(config)
    assert apply_cpu_profile(config, AVX2_ONLY) == "no_native_bf16"
    profile = before["cpu_profiles"]["no_native_bf16"]["studies"]
    for name, study in config["studies"].items():
        if name in profile:
            assert study == {**before["studies"][name], **profile[name],
                             "cpu_profile": "no_native_bf16"}
        else:
            assert study == before["studies"][name]  # d follows a through its source
    a = config["studies"]["a"]
    assert a["dtype"] == "bfloat16" and a["engine"] == "hf"
    assert config["studies"]["a_vllm"]["dtype"] == "auto"  # float32 there, by auto's rule


def test_pinned_profile_overrides_the_cpu_and_none_turns_it_off():
    config = _default()
    assert apply_cpu_profile(config, SAPPHIRE, "no_native_bf16") == "no_native_bf16"
    config = _default()
    before = copy.deepcopy(config)
    assert apply_cpu_profile(config, AVX2_ONLY, "none") is None
    assert config == before


def test_unknown_pinned_profile_and_unknown_study_are_errors_naming_them():
    with pytest.raises(BatchflipError, match=rf"{CPU_PROFILE_ENV}='fast'"):
        apply_cpu_profile(_default(), AVX2_ONLY, "fast")
    config = _default()
    config["cpu_profiles"]["no_native_bf16"]["studies"]["zz"] = {"dtype": "float32"}
    with pytest.raises(BatchflipError, match=r"'cpu_profiles\.no_native_bf16\.studies\.zz'"):
        apply_cpu_profile(config, AVX2_ONLY)
    config = _default()
    config["cpu_profiles"]["no_native_bf16"]["studies"]["a"] = ["bfloat16"]
    with pytest.raises(BatchflipError, match=r"studies\.a'.*expected a mapping"):
        apply_cpu_profile(config, AVX2_ONLY)


def test_config_without_profiles_is_left_alone_even_when_pinned():
    config = _default()
    del config["cpu_profiles"]
    before = copy.deepcopy(config)
    assert apply_cpu_profile(config, AVX2_ONLY, "no_native_bf16") is None
    assert config == before


def test_profiled_default_passes_every_config_check():
    config = _default()
    apply_cpu_profile(config, AVX2_ONLY)
    check_config(config, SCHEMA)  # schema, references, batch sizes, pools
    config = _default()
    config["studies"]["a"]["cpu_profile"] = "fast"  # only the profiles' names
    with pytest.raises(BatchflipError, match="cpu_profile"):
        check_config(config, SCHEMA)


def test_profile_reaches_job_params_and_study_d_reruns():
    config = _default()
    apply_cpu_profile(config, AVX2_ONLY)
    check_config(config, SCHEMA)
    a = layout.generation_settings(config, "a", "smollm2-135m", ["sync_b8"])
    assert a["cpu_profile"] == "no_native_bf16" and a["dtype"] == "bfloat16"
    assert a["subset"]["per_task"] == {"harmful_refusal": 8, "borderline_safe": 8,
                                       "mc_capability": 2}
    d = layout.ablation_settings(config, "d", "smollm2-135m", "standard")
    assert d["cpu_profile"] == "no_native_bf16" and d["dtype"] == "bfloat16"
    native = _default()
    check_config(native, SCHEMA)
    assert "cpu_profile" not in layout.generation_settings(native, "a", "smollm2-135m",
                                                           ["sync_b8"])


class EchoEngineDouble:
    """Test double: answers every prompt with its own text."""

    def fingerprint(self):
        return {"engine": "double", "dtype": "bfloat16"}

    def run_group(self, group, condition):
        from batchflip.engines import Result

        return [Result(m.prompt, [1], "length", 1, 0.0, 0.1, 0.2) for m in group.members]

    def close(self):
        pass


def test_stack_fingerprint_records_the_profile(tmp_path, monkeypatch):
    import pandas as pd

    from batchflip.settings import GenerationSettings

    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    battery = pd.DataFrame([{"prompt_id": f"h{i}", "task": "harm", "domain": "safety",
                             "scorer": "refusal", "prompt": f"p{i}", "reference": "R",
                             "meta": "{}"} for i in range(4)])
    base = {"study": "a", "model": "m", "engine": "hf", "dtype": "bfloat16", "seed": 1,
            "max_new_tokens": 2, "prompt_format": "raw"}
    ids = {}
    for profile in (None, "no_native_bf16"):
        given = {**base, **({"cpu_profile": profile} if profile else {})}
        stack = tmp_path / f"{profile}.stack.json"
        run_job(battery, GenerationSettings.from_mapping(given), "sync_b2", "m",
                tmp_path / f"{profile}.parquet", stack, engine=EchoEngineDouble(),
                progress=False)
        facts = json.loads(stack.read_text())
        assert facts.get("cpu_profile") == profile
        ids[profile] = facts["stack_id"]
    assert ids[None] != ids["no_native_bf16"]


def test_cpu_facts_without_torch_keep_the_isa_caps(monkeypatch):
    monkeypatch.setenv("BATCHFLIP_ISA_CAP", "avx2")
    facts = cpu_facts(with_torch=False)
    assert "aten_cpu_capability" not in facts
    assert facts["isa_env"]["BATCHFLIP_ISA_CAP"] == "avx2"
    assert cpu_profile_for(facts) == "no_native_bf16"


def _dry_run_jobs(profile: str) -> dict[str, int]:
    """Job counts per rule of a dry run of the default with the profile pinned."""
    env = {**os.environ, CPU_PROFILE_ENV: profile, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["snakemake", "results/paper", "-n", "--forceall", "--quiet", "rules"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    counts = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    assert counts, proc.stdout + proc.stderr
    return counts


def test_profiled_default_plans_the_same_jobs_as_the_native_one():
    assert _dry_run_jobs("no_native_bf16") == _dry_run_jobs("none")
