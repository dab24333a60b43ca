"""Server engines ``vllm`` and ``openai``: vLLM server lifecycle plus the streaming client.

``make_server_engine(params, model_dir)`` returns a :class:`ServerEngine`:

- engine ``vllm`` launches ``python -m vllm.entrypoints.openai.api_server`` on loopback
  (a free port unless one is configured), waits for ``GET /health`` to answer 200, sends
  3 unrecorded warm-up requests and then serves ``run_group`` through
  :mod:`batchflip.engines.openai_client`. With ``server.base_url`` it uses that running
  server instead and launches nothing.
- engine ``openai`` never launches; it needs ``server.base_url`` of any OpenAI-compatible
  endpoint (vLLM, SGLang, TGI, llama.cpp, Ollama) and records what ``/v1/models`` and
  ``/version`` say about it.

Settings: ``params["server"]`` (all optional; defaults in :data:`SERVER_DEFAULTS`)
-------------------------------------------------------------------------------------
=========================  ======================  =========================================
key                        default                 meaning
=========================  ======================  =========================================
``base_url``               None                    use this running server (required for
                                                   ``openai``); e.g. http://127.0.0.1:8000
``model``                  None                    model name sent with requests; None: the
                                                   first id listed by ``/v1/models``
``api_key_env``            ``"OPENAI_API_KEY"``    env var holding a bearer token, sent when set
``python``                 None                    interpreter that runs vLLM (None: this one)
``command``                None                    argv prefix that launches the server instead
                                                   of ``[python, -m, vllm.entrypoints.openai.
                                                   api_server]`` (a wrapper, ``vllm serve``)
``host``                   ``"127.0.0.1"``         address the launched server binds
``port``                   None                    None: a free port picked at launch
``max_model_len``          2048                    ``--max-model-len`` (the paper's value)
``gpu_memory_utilization`` None                    ``--gpu-memory-utilization``; None: 0.3 on
                                                   CPU builds (there it is the share of RAM for
                                                   the KV cache), vLLM's own default on GPU
                                                   (the paper's Studies A and C: 0.80)
``kv_cache_space_gib``     None                    CPU builds: ``VLLM_CPU_KVCACHE_SPACE``
``enforce_eager``          None                    ``--enforce-eager``; None: on for CPU
                                                   (start-up 25-40 s instead of minutes), off
                                                   on GPU (vLLM's default, CUDA graphs); the
                                                   paper's Studies A and C ran eager
``enable_prefix_caching``  False                   False: ``--no-enable-prefix-caching``; True:
                                                   ``--enable-prefix-caching`` (vLLM's default
                                                   is on; see below why measurement is off)
``attention_backend``      None                    e.g. FLASH_ATTN: ``--attention-backend`` on
                                                   vLLM builds whose EngineArgs have it, else
                                                   the ``VLLM_ATTENTION_BACKEND`` env var
``extra_args``             []                      more server flags, appended verbatim
``extra_env``              {}                      more server environment variables
``startup_timeout_s``      600                     wait this long for ``/health``
``stop_grace_s``           20                      SIGTERM, then SIGKILL after this long
``request_timeout_s``      300                     wall-clock limit of one streamed request
``max_retries``            2                       retries after the first attempt
``retry_backoff_s``        1.0                     first retry delay (doubles, max 30 s)
``warmup_requests``        3                       unrecorded requests before measuring
``log_dir``                ``"results/logs/vllm"`` server logs, one file per launch
=========================  ======================  =========================================

The remaining study settings used here: ``dtype`` (``--dtype``), ``seed`` (``--seed`` and the
per-request ``seed``), ``max_new_tokens`` (``max_tokens``) and ``kernel_mode``:
``standard`` launches with ``VLLM_BATCH_INVARIANT=0``, ``batch_invariant`` with
``VLLM_BATCH_INVARIANT=1``. vLLM's batch-invariant kernels are Triton kernels, and the CPU
build (``vllm-cpu``) has no Triton backend, so ``batch_invariant`` on a CPU build fails
*before* launch with a message saying so (the ``hf`` engine has a CPU batch-invariant path).
``batch_invariant`` is also refused before launch on a GPU of compute capability below 9.0
(vLLM documents the mode for Hopper and newer) and on a vLLM that does not know the
variable. After start-up and warm-up the server log must show that the mode is active
(:data:`BATCH_INVARIANT_SIGNS`; on vLLM 0.2x torch's warning ``new kernel: registered at
.../model_executor/layers/batch_invariant.py``); a server without any sign is stopped and the
job fails with a message naming the log and the patterns, and a ``standard`` server that
shows one fails the same way. The matched sign is recorded as ``batch_invariant_verified``.
For a server this engine did not launch the kernel mode cannot be checked; the fingerprint
marks it ``declared``.

Prefix caching is off unless ``enable_prefix_caching`` is true: vLLM's automatic prefix
caching (on by default) serves a prompt's prefill from KV blocks an earlier request
computed, e.g. the same prompt in the ``sync_b1`` baseline, so a later condition would reuse
the baseline's prefill instead of computing its own in the new batch shape, hiding exactly
the batch effects being measured (and making results depend on condition order).

Lifecycle guarantees for a launched server: it runs in its own session (process group, so a
terminal's Ctrl-C reaches only the job, which then stops it in order) and is stopped by
``close()``, when start-up fails or times out (the error carries the last 30 lines of the
server log), when the job gets SIGTERM / SIGINT / SIGHUP (the handler unwinds the job, so
``finally: engine.close()`` closes the client's connections and then stops the server; a
default SIGTERM exits with status 143, SIGINT raises KeyboardInterrupt) and at interpreter
exit (atexit). Stopping = SIGTERM to the API server (vLLM shuts its engine core and workers
down and its resource tracker unlinks shared memory), SIGKILL after ``stop_grace_s``, then
SIGTERM/SIGKILL to whatever is left in the group or below the server. Killing the whole group
at once is avoided: a SIGKILLed vLLM leaves ~400 MB of ``/dev/shm`` segments behind when its
resource tracker dies with it. A SIGKILLed job cannot clean up, so a small watchdog process
(own session) notices that the job is gone and runs the same sequence; on Linux the server
also gets SIGTERM from ``PR_SET_PDEATHSIG``. vLLM 0.32 ignores SIGTERM while it is loading
the model and its HTTP shutdown waits for open client streams, hence the escalation.

Fingerprint (``.stack.json``): vLLM version (``/version``, else package metadata) and
distribution (``vllm`` or ``vllm-cpu``), torch and transformers of the server's interpreter,
device, compute capability, dtype, attention backend (from the server log: ``Using X
attention backend`` / ``Using X backend``; vLLM 0.32 does not log the CPU choice, which is
always ``CPU_ATTN`` for non-MLA models), kernel mode with its env flags and
``batch_invariant_verified``, ``server_settings`` (max model length, GPU memory share,
eager, prefix caching, attention backend asked for, CPU KV space; CPU/GPU defaults
resolved), the server flags (host, port and model path left out: the model files are hashed
separately), the ``VLLM_*``, ``OMP_*`` and ISA-override environment, ``host``
(:func:`batchflip.platform_facts.host_facts` run in the server's interpreter: CPU model and
vector ISA flags, ATen's CPU capability; on GPU the card, compute capability, driver, CUDA
runtime and cuDNN; torch, vLLM, triton and flash-attn versions), ``flash_attn`` (vLLM's
vendored flash-attention: FA2/FA3 availability and the version vLLM picks by default),
vLLM's ``system_fingerprint`` (a hash of its engine config) and how token ids were obtained.
Nothing run-specific (port, pid, log path, time, free memory) is included, so a resumed job
gets the same stack id.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx

from batchflip import platform_facts
from batchflip.conditions import Condition
from batchflip.engines import Group, Result
from batchflip.engines.openai_client import ClientSettings, CompletionClient
from batchflip.errors import BatchflipError

SERVER_DEFAULTS: dict[str, Any] = {
    "base_url": None,
    "model": None,
    "api_key_env": "OPENAI_API_KEY",
    "python": None,
    "command": None,
    "host": "127.0.0.1",
    "port": None,
    "max_model_len": 2048,
    "gpu_memory_utilization": None,
    "kv_cache_space_gib": None,
    "enforce_eager": None,
    "enable_prefix_caching": False,
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
}
KERNEL_MODES = ("standard", "batch_invariant")
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


def server_settings(params: dict[str, Any]) -> dict[str, Any]:
    """``params["server"]`` over the defaults; unknown keys are an error (typos)."""
    given = params.get("server") or {}
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


def _capability(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


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
    cap = _capability(probe.get("compute_capability"))
    if probe.get("device_type") == "cuda" and cap is not None and cap < MIN_BATCH_INVARIANT_CC:
        raise BatchflipError(
            f"kernel_mode batch_invariant: vLLM documents its batch-invariant mode for GPUs "
            f"of compute capability >= {'.'.join(map(str, MIN_BATCH_INVARIANT_CC))} (H100, "
            f"H200, B200); this one, {probe.get('device')}, has "
            f"{probe.get('compute_capability')}. Run Study D on a Hopper or newer GPU.")


def launch_settings(params: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    """The server settings a launch uses, with the CPU/GPU defaults resolved (these go into
    the stack fingerprint as ``server_settings``)."""
    cfg = server_settings(params)
    cpu = probe.get("device_type") == "cpu"
    util = cfg["gpu_memory_utilization"]
    if util is None and cpu:
        util = CPU_GPU_MEMORY_UTILIZATION
    eager = cfg["enforce_eager"] if cfg["enforce_eager"] is not None else cpu
    return {"max_model_len": cfg["max_model_len"],
            "gpu_memory_utilization": util if util is not None else "vLLM default",
            "enforce_eager": bool(eager),
            "enable_prefix_caching": bool(cfg["enable_prefix_caching"]),
            "attention_backend": cfg["attention_backend"],
            "kv_cache_space_gib": cfg["kv_cache_space_gib"]}


def server_environ(env: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``env`` applied (a None value unsets the variable)."""
    full = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return full


def build_launch(params: dict[str, Any], model_dir: str, port: int, probe: dict[str, Any]
                 ) -> tuple[list[str], dict[str, str | None], list[str]]:
    """The server argv, the environment variables it sets (None: unsets), and the flags
    worth recording.

    The recorded flags leave out ``--host``, ``--port`` and ``--model`` (run-specific or
    hashed separately) and the launcher prefix.
    """
    cfg = server_settings(params)
    eff = launch_settings(params, probe)
    cpu = probe.get("device_type") == "cpu"
    kernel_mode = params.get("kernel_mode", "standard")
    python = cfg["python"] or sys.executable
    prefix = list(cfg["command"]) if cfg["command"] else [
        python, "-m", "vllm.entrypoints.openai.api_server"]
    flags = ["--dtype", str(params["dtype"]), "--max-model-len", str(cfg["max_model_len"]),
             "--seed", str(int(params["seed"]))]
    if eff["gpu_memory_utilization"] != "vLLM default":
        flags += ["--gpu-memory-utilization", str(eff["gpu_memory_utilization"])]
    if eff["enforce_eager"]:
        flags.append("--enforce-eager")
    # vLLM turns automatic prefix caching on by default; it would let later conditions reuse
    # the KV cache an earlier request computed, hiding batch effects in the prefill.
    flags.append("--enable-prefix-caching" if eff["enable_prefix_caching"]
                 else "--no-enable-prefix-caching")
    env: dict[str, str | None] = {
        "VLLM_BATCH_INVARIANT": "1" if kernel_mode == "batch_invariant" else "0",
        "PYTHONUNBUFFERED": "1"}
    if cpu:
        # vLLM's CPU worker pins itself to the cores it binds (VLLM_CPU_OMP_THREADS_BIND) and
        # sizes its OpenMP pool to them; a thread count inherited from the job (Snakemake
        # exports OMP_NUM_THREADS=<threads>) puts several spinning threads on one pinned
        # core: measured 0.5 instead of ~200 tokens/s on 2 cores. None = unset.
        env.update({k: None for k in INHERITED_THREAD_VARS if k in os.environ})
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

def _proc_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every process, from /proc (empty off Linux)."""
    rows = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return rows
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        rows.append((int(entry), int(fields[1]), int(fields[2]), fields[0]))
    return rows


def process_tree(root: int) -> set[int]:
    """Live (non-zombie) processes in ``root``'s process group or descending from it."""
    table = [r for r in _proc_table() if r[3] != "Z"]
    found = {pid for pid, _, pgrp, _ in table if pgrp == root}
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    alive = {pid for pid, _, _, _ in table}
    stack = [root] if root in alive else []
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


# A separate process (own session) that outlives a SIGKILLed job: once its parent (the job)
# is gone it stops the server like VLLMServer.stop (SIGTERM to the API server, SIGKILL after
# the grace period, then the rest of the group); it exits by itself once the group is gone.
# vLLM does not always act on the SIGTERM that PR_SET_PDEATHSIG sends while it is still
# loading, so this is what guarantees the stop.
_WATCHDOG = r"""
import os, signal, sys, time
parent, leader, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)
def alive(group):
    try:
        (os.killpg if group else os.kill)(leader, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def send(sig, group):
    try:
        (os.killpg if group else os.kill)(leader, sig)
    except OSError:
        pass
def wait(group, timeout):
    deadline = time.time() + timeout
    while alive(group) and time.time() < deadline:
        time.sleep(0.2)
while alive(True) and os.getppid() == parent:
    time.sleep(0.5)
if not alive(True):
    sys.exit(0)
send(signal.SIGTERM, False)
wait(False, grace)
send(signal.SIGKILL, False)
wait(True, min(10.0, grace))
send(signal.SIGTERM, True)
wait(True, 3.0)
send(signal.SIGKILL, True)
"""

_LIVE: dict[int, VLLMServer] = {}
_PREVIOUS: dict[int, Any] = {}
_HOOKS_INSTALLED = False


def stop_all_servers() -> None:
    """Stop every server this process launched and still runs (atexit)."""
    for server in list(_LIVE.values()):
        server.stop()


def _on_signal(signum: int, frame: Any) -> None:
    """Hand over to the previous handler, or exit; ``close()``/atexit then stop the server.

    Raising here (KeyboardInterrupt from Python's SIGINT handler, SystemExit(128 + signum)
    for a default SIGTERM/SIGHUP) unwinds through ``finally: engine.close()``, which closes
    the client's connections *before* stopping the server, so vLLM shuts down without
    waiting for in-flight streams. A previous handler that returns keeps the run going.
    """
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    """atexit always; signal handlers when called from the main thread (ignored signals stay
    ignored, e.g. SIGINT of a background job)."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(stop_all_servers)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        with contextlib.suppress(ValueError, OSError):
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue
            _PREVIOUS[sig] = previous
            signal.signal(sig, _on_signal)


def _wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


class VLLMServer:
    """One launched server process group with its log file."""

    def __init__(self, argv: list[str], env: dict[str, str | None], log_path: Path, host: str,
                 port: int, startup_timeout_s: float, stop_grace_s: float) -> None:
        self.argv, self.env, self.log_path = argv, env, log_path
        self.base_url = f"http://{host}:{port}"
        self.startup_timeout_s, self.stop_grace_s = startup_timeout_s, stop_grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self.startup_s: float | None = None
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Launch in a new session; then wait for health (stopping it on any failure)."""
        _install_hooks()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"# batchflip launch: {' '.join(self.argv)}\n# env: "
                        f"{json.dumps(self.env, sort_keys=True)}\n".encode())
        self._log.flush()
        t0 = time.time()
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=server_environ(self.env), start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
        except OSError as exc:
            self._log.close()
            raise BatchflipError(f"could not launch the vLLM server ({self.argv[0]}): "
                                 f"{exc}") from exc
        _LIVE[id(self)] = self
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.proc.pid),
                 str(self.stop_grace_s)], stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - t0

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                assert self.proc is not None
                rc = self.proc.poll()
                if rc is not None:
                    raise BatchflipError(self._failure(
                        f"the vLLM server exited with status {rc} before it became healthy"))
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise BatchflipError(self._failure(
                        f"the vLLM server did not become healthy within "
                        f"{self.startup_timeout_s:g} s"))
                time.sleep(0.5)

    def _failure(self, what: str) -> str:
        if self._log:
            self._log.flush()
        return (f"{what} (log: {self.log_path}); last {LOG_TAIL_LINES} log lines:\n"
                f"{log_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and everything it started (safe to call again, also mid-stop).

        1. SIGTERM to the API server (vLLM then shuts its engine core and workers down);
           SIGKILL it if it is still running after ``stop_grace_s``.
        2. The rest of the group gets up to 10 s to exit by itself (the engine core notices;
           multiprocessing's resource tracker unlinks the shared memory left behind).
        3. SIGTERM, then 3 s later SIGKILL, to whatever is left in the group or below it.
        """
        proc = self.proc
        if proc is None or self._stopped:
            return
        leader = proc.pid  # leads its own session and process group
        members = process_tree(leader)
        _signal(leader, signal.SIGTERM)
        if not _wait_for(lambda: proc.poll() is not None, self.stop_grace_s):
            _signal(leader, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

        def rest() -> set[int]:
            return process_tree(leader) | _alive(members)

        if not _wait_for(lambda: not rest(), min(10.0, self.stop_grace_s)):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                _signal(leader, sig, group=True)
                for pid in rest():
                    _signal(pid, sig)
                if _wait_for(lambda: not rest(), 3.0):
                    break
        if self.watchdog is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.watchdog.kill()
                self.watchdog.wait(timeout=5)
        self._stopped = True
        _LIVE.pop(id(self), None)
        if self._log:
            with contextlib.suppress(OSError):
                self._log.write(f"# batchflip: server stopped (status {proc.returncode})\n"
                                .encode())
                self._log.close()


def _alive(pids: set[int]) -> set[int]:
    live = {pid for pid, _, _, state in _proc_table() if state != "Z"}
    return pids & live


# ---- the engine --------------------------------------------------------------------------

class ServerEngine:
    """Engine ``vllm`` or ``openai``: an optional launched server plus the client."""

    def __init__(self, name: str, client: CompletionClient, facts: dict[str, Any],
                 server: VLLMServer | None = None) -> None:
        self.name, self.client, self.facts, self.server = name, client, facts, server

    def fingerprint(self) -> dict[str, Any]:
        """Stack facts for .stack.json (nothing run-specific, so resume keeps its id)."""
        return {**self.facts, "system_fingerprint": self.client.system_fingerprint,
                "token_ids_source": self.client.token_ids_source,
                "client": {"endpoint": "/v1/completions", "stream": True,
                           "temperature": 0.0,
                           "return_token_ids": self.client.return_token_ids}}

    def run_group(self, group: Group, condition: Condition) -> list[Result]:
        """Dispatch one group; a dead launched server or unreachable endpoint is an error."""
        self._check_server()
        results = self.client.run_group(group, condition)
        if any(r.error for r in results):
            self._check_server()
            if all(r.extra.get("connect_error") for r in results):
                raise BatchflipError(f"{self.client.base_url} refused every connection for "
                                     f"group {group.group_id}: {results[0].error}")
        return results

    def _check_server(self) -> None:
        if self.server is not None and not self.server.alive():
            raise BatchflipError(self.server._failure("the vLLM server died during the run"))

    def close(self) -> None:
        """Close the client and stop the server this engine launched (idempotent)."""
        try:
            self.client.close()
        finally:
            if self.server is not None:
                self.server.stop()


def _log_name(params: dict[str, Any], kernel_mode: str) -> str:
    parts = [str(params.get("study", "study")), str(params.get("model", "model")), kernel_mode,
             time.strftime("%Y%m%d-%H%M%S"), str(os.getpid())]
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts) + ".log"


def _recorded_env(env: dict[str, str | None]) -> dict[str, str]:
    full = server_environ(env)
    return {k: full[k] for k in sorted(full)
            if (k.startswith(_RECORDED_ENV_PREFIXES) or k in platform_facts.ISA_ENV_VARS)
            and not _SECRET.search(k)}


def _client_for(params: dict[str, Any], cfg: dict[str, Any], base_url: str,
                model_dir: str) -> CompletionClient:
    def load_tokenizer() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    key = os.environ.get(cfg["api_key_env"]) if cfg["api_key_env"] else None
    settings = ClientSettings(
        base_url=base_url, model=cfg["model"], max_tokens=int(params["max_new_tokens"]),
        seed=int(params["seed"]), request_timeout_s=float(cfg["request_timeout_s"]),
        max_retries=int(cfg["max_retries"]), retry_backoff_s=float(cfg["retry_backoff_s"]),
        api_key=key or None)
    return CompletionClient(settings, tokenizer_loader=load_tokenizer)


def _models_summary(models: Any) -> list[dict[str, Any]]:
    """/v1/models without the per-call fields (timestamps, permission ids)."""
    data = models.get("data", []) if isinstance(models, dict) else []
    keep = ("id", "root", "owned_by", "max_model_len", "parent")
    return [{k: m.get(k) for k in keep if k in m} for m in data if isinstance(m, dict)]


def _prepare_client(client: CompletionClient, cfg: dict[str, Any], base_url: str) -> Any:
    models = client.get_json("/v1/models")
    if client.s.model is None:
        summary = _models_summary(models)
        if not summary:
            raise BatchflipError(f"{base_url}/v1/models lists no model; set server.model")
        client.s.model = summary[0]["id"]
    client.warmup(int(cfg["warmup_requests"]))
    return models


def make_server_engine(params: dict[str, Any], model_dir: str) -> ServerEngine:
    """Engine ``vllm`` (launch or ``base_url``) or ``openai`` (``base_url`` only)."""
    name = params["engine"]
    cfg = server_settings(params)
    kernel_mode = params.get("kernel_mode", "standard")
    if name == "openai" or (name == "vllm" and cfg["base_url"]):
        if not cfg["base_url"]:
            raise BatchflipError("engine openai needs server.base_url (e.g. "
                                 "http://127.0.0.1:8000)")
        if kernel_mode not in KERNEL_MODES:
            raise BatchflipError(f"kernel_mode '{kernel_mode}': must be one of {KERNEL_MODES}")
        client = _client_for(params, cfg, cfg["base_url"], model_dir)
        try:
            models = _prepare_client(client, cfg, cfg["base_url"])
            version = client.get_json("/version")
        except BaseException:
            client.close()
            raise
        facts = {"engine": name,
                 "engine_version": version.get("version") if isinstance(version, dict) else None,
                 "base_url": cfg["base_url"].rstrip("/"), "served_model": client.s.model,
                 "server_models": _models_summary(models), "server_version": version,
                 "launched": False, "dtype": params.get("dtype"), "dtype_source": "declared",
                 "kernel_mode": kernel_mode, "kernel_mode_source": "declared",
                 "device": None, "attention_backend": None}
        return ServerEngine(name, client, facts)
    if name != "vllm":
        raise BatchflipError(f"engine '{name}': make_server_engine serves vllm and openai")

    python = cfg["python"] or sys.executable
    probe = probe_vllm(python)
    check_kernel_mode(kernel_mode, probe)
    port = int(cfg["port"]) if cfg["port"] else free_port(cfg["host"])
    argv, env, flags = build_launch(params, model_dir, port, probe)
    log_path = Path(cfg["log_dir"]) / _log_name(params, kernel_mode)
    server = VLLMServer(argv, env, log_path, cfg["host"], port, float(cfg["startup_timeout_s"]),
                        float(cfg["stop_grace_s"]))
    server.start()
    client = _client_for(params, cfg, server.base_url, model_dir)
    try:
        _prepare_client(client, cfg, server.base_url)
        version = client.get_json("/version")
        log = server.log_text()
        backend = parse_attention_backend(log)
        source = "server log"
        if backend is None and cfg["attention_backend"]:
            backend, source = str(cfg["attention_backend"]), "config"
        elif backend is None and probe.get("device_type") == "cpu":
            backend, source = "CPU_ATTN", "vLLM CPU platform default (not logged)"
        elif backend is None:
            source = "unknown"
        verified = check_batch_invariant_log(kernel_mode, log, server.log_path)
    except BaseException:
        client.close()
        server.stop()
        raise
    facts = {
        "engine": "vllm",
        "engine_version": (version.get("version") if isinstance(version, dict) else None)
        or probe.get("vllm_version"),
        "vllm_distribution": probe.get("distribution"),
        "torch": probe.get("torch"), "transformers": probe.get("transformers"),
        "device": probe.get("device"), "device_type": probe.get("device_type"),
        "compute_capability": probe.get("compute_capability"),
        "dtype": params.get("dtype"),
        "attention_backend": backend, "attention_backend_source": source,
        "kernel_mode": kernel_mode,
        "kernel_flags": {"VLLM_BATCH_INVARIANT": env["VLLM_BATCH_INVARIANT"]},
        "batch_invariant_verified": verified,
        "server_settings": launch_settings(params, probe),
        "server_flags": flags, "server_env": _recorded_env(env), "launched": True,
        "host": probe.get("host"), "flash_attn": probe.get("flash_attn"),
    }
    return ServerEngine("vllm", client, facts, server)
