"""Benchmark: the hf engine's overhead against a bare transformers generate loop.

Both sides run the same groups (the first N prompts of the default battery, chat format,
batch size B, greedy, max_new_tokens T) on the same loaded model, interleaved, R repeats;
reports median seconds per pass and the ratio engine / bare (target <= 1.05).

    python bench/bench_hf_engine.py [--model-dir resources/models/smollm2-135m] [--out x.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from batchflip.battery import build_battery
from batchflip.conditions import parse_condition
from batchflip.engines.hf import HFEngine
from batchflip.generate import build_groups
from batchflip.prompts import format_prompts
from batchflip.settings import GenerationSettings


def bare_pass(engine: HFEngine, groups: list, max_new_tokens: int) -> list[str]:
    """What a user would write: tokenize, generate, decode — nothing else."""
    tok, model, out_texts = engine.tokenizer, engine.model, []
    for g in groups:
        enc = tok([m.prompt for m in g.members], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                                 top_k=None)
        out_texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                      skip_special_tokens=True)
    return out_texts


def engine_pass(engine: HFEngine, groups: list, cond) -> list[str]:
    return [r.text for g in groups for r in engine.run_group(g, cond)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="resources/models/smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out")
    args = ap.parse_args()
    bat = build_battery(["resources/battery/default"]).iloc[: args.prompts].copy()
    bat["sent"] = format_prompts(bat["prompt"].tolist(), "chat", args.model_dir, None)
    cond = parse_condition(f"sync_b{args.batch_size}")
    groups = build_groups(bat, cond, GenerationSettings.from_mapping({
        "study": "bench", "model": "bench", "engine": "hf", "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens, "seed": 42, "prompt_format": "chat"}))
    engine = HFEngine(args.model_dir, args.dtype, args.max_new_tokens, 42)
    engine_pass(engine, groups[:1], cond)  # warm-up
    t_engine, t_bare = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        a = engine_pass(engine, groups, cond)
        t_engine.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = bare_pass(engine, groups, args.max_new_tokens)
        t_bare.append(time.perf_counter() - t)
    res = {"prompts": args.prompts, "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
           "engine_median_s": round(statistics.median(t_engine), 3),
           "bare_median_s": round(statistics.median(t_bare), 3),
           "ratio_engine_over_bare": round(statistics.median(t_engine)
                                           / statistics.median(t_bare), 4),
           "same_texts": a == b, "threads": torch.get_num_threads()}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
