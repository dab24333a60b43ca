"""Where the model runs in a vLLM CPU server (``server.executor``): ``mp`` vs ``uni``.

Starts one vLLM CPU server per executor, one after the other (``make_server_engine``, the
launch the workflow uses, ``threads: 1``), and sends the same chat prompts as synchronized
groups of 1 and of 8 (``sync_b1``, ``sync_b8``), ``--repeats`` times, while a one-thread
CPU job runs beside the server (a process doing 256x256 float32 matmuls, standing in for
the hf generation job Snakemake runs on the other core). Reports per executor and batch
size the median wall time, the CPU seconds of the server's process tree, the competitor's
matmuls per second, and whether the token ids equal the other executor's (greedy decoding:
they must).

    PYTHONPATH=src python bench/bench_vllm_executor.py --model-dir resources/models/smollm2-135m

Run it on a quiet machine (the competitor must be the only other job).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm_client import chat_prompts, run_engine  # noqa: E402

from batchflip.engines.server import make_server_engine  # noqa: E402
from batchflip.engines.supervise import process_tree  # noqa: E402
from batchflip.settings import GenerationSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def competitor(stop: mp.synchronize.Event, count: mp.sharedctypes.Synchronized) -> None:
    """One-thread float32 matmuls until told to stop; the count goes to ``count``."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    n = 0
    while not stop.is_set():
        a @ a
        n += 1
    count.value = n


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server's processes (supervise.process_tree)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            t = psutil.Process(p).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(executor: str, model_dir: str, prompts: list[str], repeats: int, dtype: str
            ) -> dict[str, object]:
    """One server start; every batch size ``repeats`` times beside the competitor."""
    params = GenerationSettings.from_mapping({
        "engine": "vllm", "dtype": dtype, "max_new_tokens": 16, "seed": 42,
        "kernel_mode": "standard", "threads": 1, "study": "bench", "model": "bench",
        "prompt_format": "raw",
        "server": {"executor": executor, "log_dir": str(ROOT / "results/logs/vllm")}})
    engine = make_server_engine(params, model_dir)
    out: dict[str, object] = {"server_flags": engine.fingerprint().get("server_flags")}
    try:
        pid = engine.server.proc.pid  # type: ignore[union-attr]
        for b in (1, 8):
            walls, cpus, rates, ids = [], [], [], None
            for _ in range(repeats):
                stop, count = mp.Event(), mp.Value("l", 0)
                job = mp.Process(target=competitor, args=(stop, count))
                job.start()
                time.sleep(1.0)
                cpu0, t0 = tree_cpu_s(pid), time.perf_counter()
                _, ids = run_engine(engine, prompts, b)
                wall = time.perf_counter() - t0
                cpus.append(tree_cpu_s(pid) - cpu0)
                stop.set()
                job.join()
                walls.append(wall)
                rates.append(count.value / (time.perf_counter() - t0 + 1.0))
            out[f"b{b}"] = {"wall_s": round(statistics.median(walls), 2),
                            "server_cpu_s": round(statistics.median(cpus), 2),
                            "server_cores": round(statistics.median(
                                c / w for c, w in zip(cpus, walls, strict=True)), 2),
                            "competitor_matmul_per_s": round(statistics.median(rates)),
                            "token_ids": ids}
    finally:
        engine.close()
    return out


def main() -> int:
    """Measure both executors and print the comparison as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / "resources/models/smollm2-135m"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    prompts = chat_prompts(Path(args.model_dir), args.prompts)
    res = {ex: measure(ex, args.model_dir, prompts, args.repeats, args.dtype)
           for ex in ("mp", "uni")}
    for b in ("b1", "b8"):
        same = res["mp"][b]["token_ids"] == res["uni"][b]["token_ids"]  # type: ignore[index]
        for ex in res:
            res[ex][b]["same_token_ids_as_other"] = same  # type: ignore[index]
            del res[ex][b]["token_ids"]  # type: ignore[attr-defined]
    summary = {"prompts": args.prompts, "max_tokens": 16, "repeats": args.repeats,
               "dtype": args.dtype, "cpu": psutil.cpu_count(), **res}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
