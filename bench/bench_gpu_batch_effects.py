"""Which offline model shows batch effects on this GPU? vLLM text changes per batch setting.

For each ``--model NAME=DIR`` and each ``--dtype``, the package's own vLLM engine
(``batchflip.engines.server.make_server_engine``: one launched server) runs the paper's
battery (raw prompts, first ``--per-task`` prompts of each task) under ``sync_b1`` (the
baseline), ``sync_b8``, ``sync_b32``, ``list_b1`` and ``list_b8`` through
``batchflip.generate.run_job``, and counts target rows whose text differs from the
baseline's (sync conditions against ``sync_b1``, list conditions against ``list_b1``, as
the workflow pairs them). Also records the server start-up time and generated tokens per
second of each condition, and the stack fingerprint of each server.

Prefix caching is off (``--no-enable-prefix-caching``): a cached baseline prefill would be
reused by later conditions and hide batch effects in the prefill. ``--eager`` launches with
``--enforce-eager`` (the paper's Studies A and C), otherwise CUDA graphs are captured.

Example (on the GPU machine, after the gpu-kit's env.sh)::

    python bench/bench_gpu_batch_effects.py --battery ../shared/data/paper_battery \\
        --model gemma3-270m=resources/models/gemma3-270m --dtype float16 bfloat16 \\
        --per-task 20 --new-tokens 128 --out /tmp/screen
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from batchflip.battery import build_battery
from batchflip.generate import run_job
from batchflip.settings import GenerationSettings

CONDITIONS = ("sync_b1", "sync_b8", "sync_b32", "list_b1", "list_b8")
BASELINE = {"sync": "sync_b1", "list": "list_b1"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def head_per_task(battery: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` prompts of every task, in battery order."""
    return battery.groupby("task", sort=False).head(n).reset_index(drop=True)


def text_changes(gens: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Per condition: target rows compared with the dispatch's baseline, and how many differ."""
    out: dict[str, dict[str, int]] = {}
    for cond, df in gens.items():
        base_name = BASELINE[cond.split("_")[0]]
        base_name = base_name if base_name in gens else BASELINE["sync"]
        if cond == base_name:
            continue
        base = gens[base_name]
        base = base[base["role"] == "target"].set_index("prompt_id")["text"]
        rows = df[df["role"] == "target"].set_index("prompt_id")["text"]
        both = rows.index.intersection(base.index)
        out[cond] = {"n": int(len(both)),
                     "changed": int((rows.loc[both] != base.loc[both]).sum()),
                     "vs": base_name}
    return out


def screen(name: str, model_dir: str, dtype: str, battery: pd.DataFrame,
           args: argparse.Namespace) -> dict[str, Any]:
    """One server start; every condition; text changes and speed."""
    from batchflip.engines.server import make_server_engine

    server: dict[str, Any] = {"max_model_len": 2048,
                              "extra_args": ["--no-enable-prefix-caching"],
                              "enforce_eager": bool(args.eager)}
    if args.gpu_memory_utilization:
        server["gpu_memory_utilization"] = args.gpu_memory_utilization
    params = GenerationSettings.from_mapping({
        "study": "screen", "model": name, "engine": "vllm", "dtype": dtype,
        "max_new_tokens": args.new_tokens, "seed": args.seed, "prompt_format": "raw",
        "kernel_mode": args.kernel_mode, "server": server})
    t0 = time.perf_counter()
    engine = make_server_engine(params, model_dir)
    startup = round(time.perf_counter() - t0, 1)
    _log(f"{name} {dtype}: server ready in {startup} s")
    gens: dict[str, pd.DataFrame] = {}
    speed: dict[str, float] = {}
    out = args.out / f"{name}_{dtype}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        for cond in args.conditions:
            t1 = time.perf_counter()
            df = run_job(battery, params, cond, model_dir, out / f"{cond}.parquet",
                         out / f"{cond}.stack.json", engine=engine, progress=False)
            secs = time.perf_counter() - t1
            speed[cond] = round(float(df["n_tokens"].sum()) / secs, 1)
            errors = int((df["finish_reason"] == "error").sum())
            _log(f"  {cond}: {len(df)} rows, {speed[cond]} tok/s, {errors} errors")
            gens[cond] = df
    finally:
        engine.close()
    stack = json.loads((out / "sync_b1.stack.json").read_text())
    return {"model": name, "dtype": dtype, "startup_s": startup, "tokens_per_s": speed,
            "text_changes": text_changes(gens), "stack_id": stack.get("stack_id"),
            "stack": {k: stack.get(k) for k in ("engine_version", "device", "torch",
                                                "attention_backend", "server_flags",
                                                "compute_capability", "kernel_mode")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--battery", required=True, help="task-YAML folder of the paper battery")
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS),
                    help="sync_b1 first; list conditions compare with list_b1 if run, "
                         "else with sync_b1")
    ap.add_argument("--per-task", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--kernel-mode", default="standard")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no CUDA graphs)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    battery = head_per_task(build_battery([args.battery]), args.per_task)
    _log(f"{len(battery)} prompts, {args.new_tokens} new tokens")
    results = []
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        for dtype in args.dtype:
            try:
                results.append(screen(name, model_dir, dtype, battery, args))
            except Exception as exc:  # keep screening the others; report the failure
                import traceback

                results.append({"model": name, "dtype": dtype, "error": repr(exc)[-2000:],
                                "traceback": traceback.format_exc()[-3000:]})
                _log(f"{name} {dtype}: FAILED {exc!r}"[:2000])
            (args.out / "screen.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "stack"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
