"""Study D end to end without Snakemake: discovery (sync_b1 vs sync_b8), flips, ablation.

Drives the package's own functions, so the measurement is the workflow's code path:
``batchflip.battery.build_battery`` → ``generate.run_job`` (hf engine, chat format with the
default config's system prompt) for ``sync_b1`` and ``sync_b8`` → ``scoring.score_frame`` →
``flips.pair_flips`` → ``ablation.select_candidates`` (groups reconstructed from the
generation records) → ``ablation.run_mode`` under ``standard`` and ``batch_invariant`` →
``ablation.score_runs`` / ``compare_runs`` / ``ablation_numbers``.

Reports label flips and text changes per mode, the exact McNemar p values, and the
throughput of each mode's reruns (generated tokens, fillers included, per second of engine
time; the same executions in both modes, so the ratio is the batch-invariant overhead).
Also reports the discovery step itself (sync_b8 vs sync_b1 text changes and flips).

A small model rarely flips a label, so by default the reruns also cover every row whose
text changed (a superset of the label flips); the report gives the numbers of both sets,
``label_flip_candidates`` (Study D proper) and ``text_change_candidates``.

Example (GPU or CPU)::

    python bench/bench_ablation_gpu.py --model resources/models/smollm2-135m \\
        --new-tokens 32 --out /tmp/abl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from batchflip.battery import build_battery
from batchflip.conditions import parse_condition
from batchflip.engines import Group, Member
from batchflip.engines.hf import HFEngine
from batchflip.flips import pair_flips
from batchflip.generate import run_job
from batchflip.io import write_parquet
from batchflip.scoring import score_frame
from batchflip.settings import GenerationSettings
from batchflip.studies import ablation

ROOT = Path(__file__).resolve().parents[1]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _engine(args: argparse.Namespace, mode: str) -> HFEngine:
    return HFEngine(str(args.model), args.dtype, args.new_tokens, args.seed, mode,
                    device=args.device, threads=args.threads)


def discovery(args: argparse.Namespace, battery: pd.DataFrame, params: GenerationSettings,
              engine: HFEngine, out: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame],
                                                    dict[str, Any]]:
    """Generate the source conditions, score them, pair flips; return flips and gens."""
    gens, scored, timing = {}, [], {}
    for cond in args.conditions:
        path = out / f"gen_{cond}.parquet"
        t0 = time.perf_counter()
        df = run_job(battery, params, cond, str(args.model), path,
                     out / f"gen_{cond}.stack.json", engine=engine, progress=False)
        timing[cond] = round(time.perf_counter() - t0, 2)
        _log(f"{cond}: {len(df)} rows in {timing[cond]} s")
        gens[str(path)] = df
        scored.append(score_frame(df, battery, {"refusal": 2}, source=path))
    flips = pair_flips(pd.concat(scored, ignore_index=True), args.conditions[0])
    summary = {"seconds": timing, "conditioned_rows": len(flips),
               "label_flips": int(flips["flip"].sum()),
               "text_changes": int(flips["text_changed"].sum()),
               "flips_by_domain": {str(k): int(v) for k, v in
                                   flips[flips["flip"]]["domain"].value_counts().items()}}
    return flips, gens, summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement; writes parquet/JSON files under ``args.out``."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())["studies"]["a"]
    battery = build_battery([ROOT / p for p in
                             yaml.safe_load((ROOT / "config/config.yaml").read_text())
                             ["batteries"]["default"]["paths"]])
    if args.limit:
        battery = battery.iloc[: args.limit].reset_index(drop=True)
    params = {"study": "a", "model": "smollm2-135m", "engine": "hf", "dtype": args.dtype,
              "max_new_tokens": args.new_tokens, "seed": args.seed,
              "prompt_format": "chat", "system_prompt": cfg["system_prompt"]}
    if args.threads:
        params["threads"] = args.threads
    std = _engine(args, "standard")
    report: dict[str, Any] = {"device": std.fingerprint()["device"], "torch": torch.__version__,
                              "params": params, "prompts": len(battery)}
    _log(f"device {report['device']}, {len(battery)} prompts, {args.new_tokens} new tokens")
    settings = GenerationSettings.from_mapping(params)
    flips, gens, report["discovery"] = discovery(args, battery, settings, std, out)
    _save(report, out)
    label = ablation.select_candidates(flips, gens, args.conditions[0])
    cands = label
    if args.text_changes:  # also every row whose text changed (label flips included)
        wider = flips.assign(flip=flips["flip"] | flips["text_changed"])
        cands = ablation.select_candidates(wider, gens, args.conditions[0])
    write_parquet(cands, out / "candidates.parquet")
    report["candidates"] = {"label_flips": len(label), "rerun": len(cands)}
    _log(f"{len(label)} label-flip candidates; rerunning {len(cands)}")
    engines = {"standard": std, "batch_invariant": _engine(args, "batch_invariant")}
    scored, stacks, throughput = [], {}, {}
    for mode, eng in engines.items():
        warm = Group(0, (Member(0, "target", "w", "Hello"),))
        eng.run_group(warm, parse_condition("sync_b1"))
        if args.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        runs, stats = ablation.run_mode(cands, battery, settings.replace(study="d"),
                                        str(args.model), mode, out / f"{mode}.parquet",
                                        out / f"{mode}.stack.json", engine=eng)
        stacks[("smollm2-135m", mode)] = runs["stack_id"].iloc[0] if len(runs) else "none"
        throughput[mode] = {"executions": stats.groups, "tokens": stats.tokens,
                            "seconds": round(stats.seconds, 3),
                            "tokens_per_s": round(stats.tokens / stats.seconds, 2)
                            if stats.seconds else None}
        _log(f"{mode}: {throughput[mode]}")
        scored.append(ablation.score_runs(runs, battery, {"refusal": 2}))
        report["throughput"] = throughput
        _save(report, out)
    compared = ablation.compare_runs(cands, pd.concat(scored, ignore_index=True),
                                     list(engines))
    write_parquet(compared, out / "rows.parquet")
    ts, ti = throughput["standard"]["tokens_per_s"], throughput["batch_invariant"]["tokens_per_s"]
    report["tokens_per_s_ratio_invariant_over_standard"] = round(ti / ts, 3) if ts and ti \
        else None
    sets = {"label_flip_candidates": label["candidate_id"]}
    if args.text_changes:
        sets["text_change_candidates"] = cands["candidate_id"]
    all_numbers = {}
    for name, ids in sets.items():
        sel = cands[cands["candidate_id"].isin(ids)]
        rows = compared[compared["candidate_id"].isin(ids)]
        numbers = ablation.ablation_numbers(sel, rows, "d", list(engines),
                                            ["candidates.parquet"], stacks, "a")
        all_numbers[name] = numbers
        report[name] = _summary(numbers, list(engines))
    (out / "numbers.json").write_text(json.dumps(all_numbers, indent=2, sort_keys=True,
                                                 default=str))
    report["stack"] = {m: json.loads((out / f"{m}.stack.json").read_text()) for m in engines}
    _save(report, out)
    return report


def _summary(numbers: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    """Counts per mode and the McNemar p values of one candidate set."""
    out: dict[str, Any] = {}
    for mode in modes:
        rec_l = numbers[f"d/all/{mode}/label_flip_rate"]
        out[mode] = {"n": rec_l["n"], "label_flips": rec_l.get("k", 0),
                     "text_changes": numbers[f"d/all/{mode}/text_change_rate"].get("k", 0),
                     "group_reproduces_source":
                         numbers[f"d/all/{mode}/group_reproduces_source"].get("k"),
                     "alone_reproduces_baseline":
                         numbers[f"d/all/{mode}/alone_reproduces_baseline"].get("k")}
    for what in ("label", "text"):
        rec = numbers[f"d/all/{modes[0]}_vs_{modes[1]}/{what}_mcnemar_p"]
        out[f"{what}_mcnemar"] = {"p": rec["value"], "b": rec.get("b"), "c": rec.get("c")}
    return out


def _save(report: dict[str, Any], out: Path) -> None:
    """Write the report so far (a run cut short still leaves its finished parts)."""
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True,
                                                default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "resources/models/smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--conditions", nargs="+", default=["sync_b1", "sync_b8"],
                    help="the first is the baseline")
    ap.add_argument("--limit", type=int, default=0, help="first N battery prompts (0 = all)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-text-changes", dest="text_changes", action="store_false",
                    help="rerun only the label flips (default: also every changed text)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    report = run(args)
    print(json.dumps({k: v for k, v in report.items() if k not in ("stack", "params")},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
