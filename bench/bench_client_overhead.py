"""Generate jobs vs a bare client on the same server: generated tokens/s at batch 1, 8 and 32.

One vLLM server is launched through the package (``batchflip.generate.make_engine``) and
kept for the whole bench. For each ``--batch`` b, the same requests are sent two ways,
alternating which goes first, ``--repeats`` times:

- **job**: ``batchflip.generate.run_job`` of ``sync_b{b}`` (groups built by the generate
  stage, the package's streaming client, checkpoint per group, records, parquet and
  fingerprint written), timed around the whole call;
- **bare**: a minimal ``httpx.AsyncClient`` loop that sends the very same request bodies
  (the package client's ``_body`` for the same prompts, so the server does the same work),
  b concurrent streamed requests per group, groups one after another, and only counts the
  streamed tokens.

Prints and writes (``--out``) per batch the median tokens/s of each and the ratio job /
bare (target: >= 0.95). Tokens are the generated tokens of every member, fillers included.

On the GPU machine (after the gpu-kit's env.sh)::

    python bench/bench_client_overhead.py --battery ../shared/data/paper_battery \\
        --model resources/models/qwen2.5-coder-0.5b-fp16 --dtype float16 \\
        --gpu-memory-utilization 0.8 --per-task 16 --new-tokens 128 --out /tmp/client.json

A tiny CPU check::

    python bench/bench_client_overhead.py --battery resources/battery/default \\
        --model resources/models/smollm2-135m --dtype bfloat16 --per-task 2 \\
        --new-tokens 4 --batch 1 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _report import emit, server_block  # bench/_report.py: print and keep the summary

from batchflip.battery import build_battery
from batchflip.conditions import parse_condition
from batchflip.generate import build_groups, make_engine, run_job
from batchflip.prompts import format_prompts
from batchflip.settings import GenerationSettings


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _stream_tokens(http: httpx.AsyncClient, body: dict[str, Any]) -> int:
    """One streamed completion; the number of generated tokens it carried."""
    n = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:]).get("choices", []):
                ids = ch.get("token_ids")
                n += len(ids) if ids is not None else (1 if ch.get("text") else 0)
    return n


async def bare_run(base_url: str, bodies: list[list[dict[str, Any]]]) -> tuple[int, float]:
    """Groups of bodies, each group's requests at once, groups in turn: (tokens, seconds)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=512)) as http:
        t0 = time.perf_counter()
        tokens = 0
        for group in bodies:
            tokens += sum(await asyncio.gather(*(_stream_tokens(http, b) for b in group)))
        return tokens, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--battery", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--per-task", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--logprobs", type=int, default=0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    battery = build_battery([Path(args.battery)])
    battery = battery.groupby("task", sort=False).head(args.per_task).reset_index(drop=True)
    server = server_block(args)
    params = GenerationSettings.from_mapping({
        "study": "bench_client", "model": Path(args.model).name, "engine": "vllm",
        "dtype": args.dtype, "max_new_tokens": args.new_tokens, "seed": 42,
        "prompt_format": "raw", "kernel_mode": "standard", "server": server,
        **({"logprobs": args.logprobs} if args.logprobs else {})})
    sent = battery.assign(sent=format_prompts(battery["prompt"].tolist(), "raw", args.model,
                                              None))
    engine = make_engine(params, args.model)
    results = []
    try:
        client = engine.client  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory(prefix="bench_client_") as tmp:
            for b in args.batch:
                cond = parse_condition(f"sync_b{b}")
                groups = build_groups(sent, cond, params)
                bodies = [[client._body(m.prompt, args.new_tokens) for m in g.members]
                          for g in groups]
                job_rates, bare_rates = [], []
                for r in range(args.repeats):
                    order = ("job", "bare") if r % 2 == 0 else ("bare", "job")
                    for which in order:
                        if which == "job":
                            out = Path(tmp) / f"b{b}_r{r}.parquet"
                            t0 = time.perf_counter()
                            df = run_job(battery, params, cond.name, args.model, out,
                                         Path(tmp) / f"b{b}_r{r}.stack.json", engine=engine,
                                         progress=False)
                            secs = time.perf_counter() - t0
                            job_rates.append(int(df["n_tokens"].sum()) / secs)
                        else:
                            tokens, secs = asyncio.run(bare_run(client.base_url, bodies))
                            bare_rates.append(tokens / secs)
                    _log(f"batch {b} repeat {r}: job {job_rates[-1]:.1f}, bare "
                         f"{bare_rates[-1]:.1f} tokens/s")
                job, bare = statistics.median(job_rates), statistics.median(bare_rates)
                results.append({"batch": b, "groups": len(groups),
                                "job_tokens_per_s": round(job, 1),
                                "bare_tokens_per_s": round(bare, 1),
                                "ratio": round(job / bare, 3)})
    finally:
        engine.close()
    summary = {"model": args.model, "dtype": args.dtype, "prompts": len(battery),
               "new_tokens": args.new_tokens, "logprobs": args.logprobs, "results": results}
    return emit(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
