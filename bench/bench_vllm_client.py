"""Client overhead of the vLLM engine: ``ServerEngine.run_group`` vs a bare httpx loop.

Starts one vLLM server (``make_server_engine``, so start-up time is measured too) and sends
the same requests two ways, interleaved, ``--repeats`` times each:

- ``engine``: the groups go through ``engine.run_group`` (synchronized dispatch: each group
  of ``--batch-size`` prompts is sent as concurrent streamed single-prompt requests, the
  next group starts when the group is done), with all of its bookkeeping (timestamps,
  retries, result mapping);
- ``bare``: a minimal asyncio loop of ``httpx.AsyncClient`` requests with the same body
  (streamed, ``return_token_ids``, same seed and ``max_tokens``), grouped the same way,
  that only counts tokens.

Throughput = generated tokens / wall time of the whole set; the median over the repeats is
reported with the ratio engine / bare (1.0 = no client overhead). Both ways must produce
the same tokens (greedy decoding; checked and reported). Prompts are ``--prompts`` chat
prompts (SmolLM2 chat template applied client-side, as in the workflow).

Run: ``PYTHONPATH=src python bench/bench_vllm_client.py [--out bench.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from batchflip.conditions import parse_condition
from batchflip.engines import Group, Member
from batchflip.engines.server import make_server_engine
from batchflip.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of Australia?", "Explain photosynthesis in two sentences.",
    "How do I make a paper airplane?", "Write a haiku about autumn leaves.",
    "What is 17 multiplied by 23?", "Give me three tips for better sleep.",
    "Who wrote Pride and Prejudice?", "How can I pick a lock without a key?",
    "Summarise the plot of Hamlet.", "What causes the seasons on Earth?",
    "Translate 'good morning' into French.", "What is a prime number?",
    "How do vaccines work?", "Suggest a name for a pet goldfish.",
    "What is the boiling point of water at sea level?", "Describe a sunset to a child.",
    "How do I hack into my neighbour's wifi?", "List four renewable energy sources.",
    "What does DNA stand for?", "Write a limerick about a cat.",
    "Why is the sky blue?", "How many continents are there?",
    "What is the difference between weather and climate?", "Tell me a fun fact about octopuses.",
    "How do I write a polite complaint letter?", "What is the speed of light?",
    "Explain what a black hole is.", "What are the primary colours?",
    "How can I make a dangerous chemical at home?", "Recommend a classic novel.",
    "What is the largest mammal?", "How does a bicycle stay upright?",
]


def chat_prompts(model_dir: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                    add_generation_prompt=True) for q in qs]


def run_engine(engine, prompts: list[str], b: int) -> tuple[float, list[list[int]]]:
    cond = parse_condition(f"sync_b{b}")
    t0 = time.perf_counter()
    ids: list[list[int]] = []
    for gid, start in enumerate(range(0, len(prompts), b)):
        group = Group(gid, tuple(Member(i, "target", str(start + i), p)
                                 for i, p in enumerate(prompts[start:start + b])))
        results = engine.run_group(group, cond)
        if any(r.error for r in results):
            raise RuntimeError(f"engine errors: {[r.error for r in results if r.error]}")
        ids += [r.token_ids for r in results]
    return time.perf_counter() - t0, ids


async def _bare_one(client: httpx.AsyncClient, body: dict) -> list[int]:
    ids: list[int] = []
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and not line.endswith("[DONE]"):
                for c in json.loads(line[5:])["choices"]:
                    ids += c.get("token_ids") or []
    return ids


async def _bare(base_url: str, model: str, prompts: list[str], b: int, max_tokens: int,
                seed: int) -> tuple[float, list[list[int]]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        t0 = time.perf_counter()
        ids: list[list[int]] = []
        for start in range(0, len(prompts), b):
            bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens,
                       "temperature": 0.0, "seed": seed, "stream": True,
                       "return_token_ids": True} for p in prompts[start:start + b]]
            ids += await asyncio.gather(*(_bare_one(client, body) for body in bodies))
        return time.perf_counter() - t0, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / "resources/models/smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--log-dir", default="results/logs/vllm")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()

    prompts = chat_prompts(args.model_dir, args.prompts)
    params = GenerationSettings.from_mapping({
        "engine": "vllm", "dtype": args.dtype, "max_new_tokens": args.max_tokens, "seed": 42,
        "kernel_mode": "standard", "study": "bench", "model": "bench", "prompt_format": "raw",
        "server": {"log_dir": args.log_dir}})
    t0 = time.perf_counter()
    engine = make_server_engine(params, str(args.model_dir))
    ready_s = time.perf_counter() - t0
    try:
        times: dict[str, list[float]] = {"engine": [], "bare": []}
        tokens: dict[str, list[int]] = {"engine": [], "bare": []}
        same = []
        for _ in range(args.repeats):
            t_e, ids_e = run_engine(engine, prompts, args.batch_size)
            t_b, ids_b = asyncio.run(_bare(engine.client.base_url, engine.client.s.model,
                                           prompts, args.batch_size, args.max_tokens, 42))
            times["engine"].append(t_e)
            times["bare"].append(t_b)
            tokens["engine"].append(sum(map(len, ids_e)))
            tokens["bare"].append(sum(map(len, ids_b)))
            same.append(sum(a == b for a, b in zip(ids_e, ids_b, strict=True)) / len(prompts))
        fingerprint = engine.fingerprint()
        startup_s = engine.server.startup_s if engine.server else None
    finally:
        engine.close()

    tps = {k: [n / t for n, t in zip(tokens[k], times[k], strict=True)] for k in times}
    med = {k: statistics.median(v) for k, v in tps.items()}
    report = {
        "prompts": args.prompts, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "repeats": args.repeats, "dtype": args.dtype,
        "server_startup_s": round(startup_s, 1) if startup_s else None,
        "engine_ready_s": round(ready_s, 1),
        "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in tps.items()},
        "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_engine_over_bare": round(med["engine"] / med["bare"], 3),
        "tokens": tokens, "identical_token_ids_share": same,
        "stack": {k: fingerprint.get(k) for k in ("engine_version", "vllm_distribution",
                                                   "device", "attention_backend", "torch")},
        "python": sys.version.split()[0], "machine": platform.machine(),
    }
    print(f"server start-up {report['server_startup_s']} s (engine ready incl. probe and "
          f"warm-up {report['engine_ready_s']} s)")
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, sync b={args.batch_size}, "
          f"median of {args.repeats}:")
    for k in ("engine", "bare"):
        print(f"  {k:6s} {med[k]:8.1f} tokens/s   runs {report['tokens_per_s'][k]}")
    print(f"  ratio engine/bare {report['ratio_engine_over_bare']}; identical token ids "
          f"per repeat {same}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
