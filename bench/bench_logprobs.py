"""Cost of recording token log-probabilities (``logprobs: 2``) in the generate stage.

Runs one condition of the default Study A setup (default battery, chat format with the
default system prompt, bf16, 16 new tokens) through ``generate.run_job`` with and without
logprobs, alternating off/on ``--repeats`` times in one process (same engine, same
warm state), and prints the median seconds of each and their ratio. ``--engine vllm``
launches one vLLM server and toggles the per-request ``logprobs`` on its client.

Example::

    python bench/bench_logprobs.py --engine hf --condition sync_b4 --repeats 2 --limit 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from batchflip import layout
from batchflip.battery import build_battery
from batchflip.design import select_subset
from batchflip.generate import make_engine, run_job
from batchflip.settings import GenerationSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--condition", default="sync_b4")
    ap.add_argument("--model", default="resources/models/smollm2-135m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    name = "a" if args.engine == "hf" else "a_vllm"
    given = layout.generation_settings(cfg, name, "smollm2-135m", [args.condition])
    battery = select_subset(build_battery(["resources/battery/default"]),
                            given.pop("subset", None))  # the study's own prompts
    params = GenerationSettings.from_mapping({**given, "study": "bench", "logprobs": 0})
    battery = battery.head(args.limit) if args.limit else battery
    engine = make_engine(params, args.model)
    times: dict[int, list[float]] = {0: [], 2: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                for k in (0, 2):
                    if args.engine == "hf":
                        engine.logprobs = k
                    else:
                        engine.use_request_settings(params.replace(logprobs=k))
                    out = Path(tmp) / f"{i}_{k}.parquet"
                    t0 = time.perf_counter()
                    run_job(battery, params.replace(logprobs=k), args.condition, args.model,
                            out, out.with_suffix(".stack.json"), engine=engine,
                            progress=False)
                    times[k].append(time.perf_counter() - t0)
    finally:
        engine.close()
    off, on = statistics.median(times[0]), statistics.median(times[2])
    print(json.dumps({"engine": args.engine, "condition": args.condition,
                      "rows": len(battery), "seconds_off": times[0], "seconds_on": times[2],
                      "median_off": off, "median_on": on, "ratio": on / off}, indent=1))


if __name__ == "__main__":
    main()
