"""Benchmark: score -> flips -> numbers on synthetic generation records.

Builds N synthetic generation rows (default 1.3 million, 10x the paper) over a synthetic
953-prompt battery with the paper's task mix (refusal 220, BBQ 198, TruthfulQA 50, MMLU 285,
ARC 200), 7 conditions and as many models as needed, then times each analysis stage
in one process and reports wall time and peak resident memory (ru_maxrss).

    python bench/bench_analysis.py [--rows 1300000] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pandas as pd

from batchflip.flips import pair_flips
from batchflip.scoring import score_frame
from batchflip.studies.discovery import discovery_numbers

TASKS = [("refusal", "safety", "refusal", 220), ("bbq", "safety", "bbq", 198),
         ("tqa", "safety", "truthfulqa", 50), ("mmlu", "capability", "mc_letter", 285),
         ("arc", "capability", "mc_letter", 200)]
CONDITIONS = ["sync_b1", "sync_b2", "sync_b4", "sync_b8", "sync_b16", "sync_b32", "list_b8"]
TEXTS = {
    "refusal": ["I'm sorry, but I can't help with that.", "Sure, here is how you do it: first",
                "I can\u2019t assist with this request.", "Here's a detailed plan. Step 1"],
    "bbq": ["Unknown", "B) The old man", "C) The boy", "It cannot be determined."],
    "tqa": ["Nothing happens if you swallow gum.", "It stays in your stomach for seven years.",
            "Purple."],
    "mmlu": ["A", "B", "The answer is C.", "(D) because", "I think"],
    "arc": ["A", "B) water", "C", "answer is D"],
}


def battery() -> pd.DataFrame:
    rows = []
    for task, domain, scorer, n in TASKS:
        for i in range(n):
            meta = {"filters": ["strip_whitespace", "truncate_at_newline"]}
            if scorer == "bbq":
                meta |= {"answer_choice_0": "Unknown", "answer_choice_1": "The old man",
                         "answer_choice_2": "The boy", "stereotyped_idx": 1}
            if scorer == "truthfulqa":
                meta |= {"correct_answers": ["Nothing happens if you swallow gum"],
                         "incorrect_answers": ["Gum stays in your stomach for seven years"]}
            rows.append({"prompt_id": f"{task}_{i}", "task": task, "domain": domain,
                         "scorer": scorer, "prompt": "p", "reference": "B",
                         "meta": json.dumps(meta)})
    return pd.DataFrame(rows)


def generations(bat: pd.DataFrame, n_rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    per_model = len(bat) * len(CONDITIONS)
    n_models = -(-n_rows // per_model)
    reps = n_models * len(CONDITIONS)
    pid = np.tile(bat["prompt_id"].to_numpy(), reps)
    task = np.tile(bat["task"].to_numpy(), reps)
    cond = np.tile(np.repeat(CONDITIONS, len(bat)), n_models)
    model = np.repeat([f"m{i:03d}" for i in range(n_models)], per_model)
    text = np.empty(len(pid), dtype=object)
    for t, options in TEXTS.items():
        idx = np.flatnonzero(task == t)
        # mostly the first option (stable), sometimes another: realistic low flip rates
        pick = np.where(rng.random(len(idx)) < 0.97, 0, rng.integers(0, len(options), len(idx)))
        text[idx] = np.asarray(options, dtype=object)[pick]
    df = pd.DataFrame({"study": "a", "model": model, "condition": cond,
                       "batch_size": 0,
                       "dispatch": "sync", "kernel_mode": "standard", "group_id": 0,
                       "position": 0, "role": "target", "prompt_id": pid, "text": text,
                       "stack_id": "bench"})
    bs = pd.Series(cond).str.extract(r"_b(\d+)")[0].astype(int).to_numpy()
    df["batch_size"] = bs
    df.loc[df["condition"].str.startswith("list"), "dispatch"] = "list"
    return df.iloc[:n_rows].reset_index(drop=True)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_300_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    bat = battery()
    gen = generations(bat, args.rows)
    base_mb = peak_mb()
    t0 = time.perf_counter()
    scored = score_frame(gen, bat, {"refusal": 2})
    t1 = time.perf_counter()
    flips = pair_flips(scored, "sync_b1")
    t2 = time.perf_counter()
    numbers = discovery_numbers({"flips.parquet": flips}, {"scored.parquet": scored}, "a",
                              "sync_b1")
    t3 = time.perf_counter()
    res = {"rows": len(gen), "score_s": round(t1 - t0, 2), "flips_s": round(t2 - t1, 2),
           "numbers_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
           "n_numbers": len(numbers), "n_flip_rows": len(flips),
           "peak_rss_mb": round(peak_mb(), 1), "rss_after_synthesis_mb": round(base_mb, 1)}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
