"""Where an hf generation job's time goes, per dtype and vector ISA (issue: the default on
an AVX2-only CPU).

Loads the default battery, takes study ``a``'s prompts as sent (chat template and system
prompt), and times greedy generation of the first ``--groups`` groups of ``--batch`` prompts
with the hf engine on one thread, for each ``--dtype``, in a fresh interpreter per dtype (so
an ISA cap in the environment applies from start-up: run it once natively and once with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 BATCHFLIP_ISA_CAP=avx2
PYTHONPATH=bench/isa_cap:src``). Prints one JSON line per dtype: the model load seconds, the
median seconds per group, the prompt tokens (mean, max) and the share of padding in the
groups, and the ATen capability the interpreter ran with.

    python3 bench/bench_hf_isa.py --model resources/models/smollm2-135m --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(model: str, dtype: str, batch: int, groups: int, tokens: int) -> dict[str, object]:
    """Time ``groups`` groups of ``batch`` prompts in this interpreter."""
    import torch
    import yaml

    from batchflip.battery import build_battery
    from batchflip.conditions import parse_condition
    from batchflip.design import select_subset
    from batchflip.engines.hf import HFEngine
    from batchflip.generate import build_groups
    from batchflip.prompts import format_prompts
    from batchflip.settings import GenerationSettings

    study = yaml.safe_load((REPO / "config/config.yaml").read_text())["studies"]["a"]
    battery = select_subset(build_battery([REPO / "resources/battery/default"]),
                            study["subset"])
    sent = format_prompts(battery["prompt"].tolist(), "chat", model, study["system_prompt"])
    t0 = time.perf_counter()
    engine = HFEngine(model, dtype, tokens, 42, threads=1)
    load = time.perf_counter() - t0
    lengths = [len(engine.tokenizer(s)["input_ids"]) for s in sent]
    cond = parse_condition(f"sync_b{batch}")
    battery = battery.assign(sent=sent)
    settings = GenerationSettings.from_mapping({
        "study": "a", "model": Path(model).name, "engine": "hf", "dtype": dtype,
        "max_new_tokens": tokens, "seed": 42, "prompt_format": "chat"})
    length = dict(zip(battery["prompt_id"], lengths, strict=True))
    times, pad = [], []
    for group in build_groups(battery, cond, settings)[:groups]:
        ls = [length[m.prompt_id] for m in group.members]
        pad.append(1 - sum(ls) / (max(ls) * len(ls)))
        t = time.perf_counter()
        engine.run_group(group, cond)
        times.append(time.perf_counter() - t)
    return {"dtype": engine.dtype, "aten": str(torch.backends.cpu.get_cpu_capability()),
            "isa_cap": os.environ.get("BATCHFLIP_ISA_CAP"), "load_s": round(load, 2),
            "batch": batch, "groups": groups, "s_per_group": round(statistics.median(times), 3),
            "prompt_tokens_mean": round(statistics.mean(lengths), 1),
            "prompt_tokens_max": max(lengths), "padding_share": round(statistics.mean(pad), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one, args.batch, args.groups, args.tokens)))
        return 0
    for dtype in args.dtype:
        subprocess.run([sys.executable, __file__, "--model", args.model, "--one", dtype,
                        "--batch", str(args.batch), "--groups", str(args.groups),
                        "--tokens", str(args.tokens)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
