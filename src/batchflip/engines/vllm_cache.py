"""vLLM's compile caches in a folder the workflow owns (``server.cache_dir``).

A GPU start-up of vLLM spends most of its time compiling: Dynamo traces the model, Inductor
compiles the graph pieces (Triton kernels among them), then CUDA graphs are captured. vLLM
keeps the compiled graphs under ``VLLM_CACHE_ROOT`` (``torch_compile_cache/<hash of the
config and code>/``, with the Inductor artefacts inside) and a later start with the same
model, settings and vLLM loads them ("Directly load the compiled graph(s) ... from the
cache"). Triton's own kernel cache (``TRITON_CACHE_DIR``, e.g. the batch-invariant
kernels) and Inductor's default cache (``TORCHINDUCTOR_CACHE_DIR``, used by anything
compiled outside vLLM's own folder) would otherwise live in ``~/.triton`` and ``/tmp``.
:func:`cache_env` points all three into ``cache_dir`` (default ``resources/vllm-cache``):
``vllm/``, ``triton/`` and ``inductor/``. CUDA graphs are not stored on disk by vLLM: they
are captured again at every start (seconds for a small model).

A cached graph is the graph that would have been compiled (vLLM's cache key covers the
model config, the compilation settings, the vLLM source and the ``VLLM_*`` environment,
``VLLM_CACHE_ROOT`` excepted), so ``cache_dir`` changes no row (``layout.SERVER_NOT_ROWS``)
and whether the cache was warm is a fact of the run, not of the stack: it is recorded in the
fingerprint's ``startup`` block (:func:`startup_facts`), which the stack id leaves out
(``generate.RUN_FACTS``), so a resumed job keeps its id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# environment variable -> subfolder of cache_dir
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TRITON_CACHE_DIR": "triton",
              "TORCHINDUCTOR_CACHE_DIR": "inductor"}
# vLLM's log lines when it loads compiled graphs from the cache / compiles them (vLLM
# 0.10-0.32 spell the shape part "dynamic shape", "shape ..." or "compile range ...")
_LOADED = re.compile(r"Directly load (?:the compiled graph|AOT compilation)")
_COMPILED = re.compile(r"Compiling a graph for (?:dynamic shape|compile range|shape)")


def cache_env(cache_dir: str | os.PathLike[str] | None) -> dict[str, str]:
    """The environment that puts the compile caches under ``cache_dir`` (absolute paths;
    the folders are created). None: nothing set (vLLM's defaults)."""
    if cache_dir is None:
        return {}
    root = Path(cache_dir).resolve()
    env = {}
    for var, sub in CACHE_VARS.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    return env


def count_files(cache_dir: str | os.PathLike[str] | None) -> int:
    """Files under ``cache_dir`` (0 when it is None or absent)."""
    if cache_dir is None or not Path(cache_dir).is_dir():
        return 0
    return sum(len(files) for _, _, files in os.walk(cache_dir))


def compile_outcome(log_text: str) -> str:
    """What the server log says about compilation: ``loaded from cache`` (a load line and
    no compile line), ``compiled`` (a compile line and no load line), ``partly cached``
    (both), or ``not logged`` (eager mode, a CPU build, or a vLLM that says neither).
    batchflip's own header lines (``# ...``: the launch command) are skipped."""
    text = "\n".join(ln for ln in log_text.splitlines() if not ln.startswith("# "))
    loaded, compiled = bool(_LOADED.search(text)), bool(_COMPILED.search(text))
    if loaded and compiled:
        return "partly cached"
    if loaded:
        return "loaded from cache"
    if compiled:
        return "compiled"
    return "not logged"


def startup_facts(cache_dir: str | os.PathLike[str] | None, files_before: int,
                  log_text: str, startup_s: float | None) -> dict[str, Any]:
    """The fingerprint's ``startup`` block of one launch: where the caches were, how many
    files they held before it (``warm``: any), what the log says about compilation and how
    long the start-up took (seconds to the first healthy ``/health``)."""
    return {"cache_dir": None if cache_dir is None else str(cache_dir),
            "cache_files_before": int(files_before),
            "cache": "vLLM default location" if cache_dir is None
            else ("warm" if files_before else "cold"),
            "compile": compile_outcome(log_text),
            "startup_s": None if startup_s is None else round(float(startup_s), 1)}
