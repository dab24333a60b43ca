"""Time the default run as a newcomer starts it: a fresh clone, an empty results/, models
built by the run itself.

Each run clones the repository's HEAD into a temporary directory and times
``snakemake --cores all results/paper`` there (batchflip imported from the clone; the
installed environment is the one this interpreter has: run ``envs/install-cpu.sh`` first).
Per run it also counts, per study, model and condition, the target texts that differ from
the baseline's (``text_changes``), and records the ``cpu_profile`` the jobs ran with.
It then reads the run's ``benchmark:`` files (``results/benchmarks/**.tsv``, one per job of
the heavy rules) into a per-job table. Prints one line per run and a JSON summary: the wall
time of each run and their median, the CPU model and count, and the per-job seconds of the
last run (largest first) with their sum per rule family. ``--from-run DIR`` summarises the
benchmark files of a run that already happened instead (no timing).

    python3 bench/bench_default_run.py --runs 1 --out bench-default-run.json
    python3 bench/bench_default_run.py --runs 1 --emulate-avx2   # an AVX2-only CPU

Run it on a quiet machine: the generation jobs are memory-bound on 2 cores, and another
process with its own OpenMP threads slows them many times over (oversubscription).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from batchflip.conditions import parse_condition  # noqa: E402
from batchflip.platform_facts import cpu_facts  # noqa: E402


def job_table(results: Path) -> list[dict[str, object]]:
    """One row per benchmark file: the job (its path under results/benchmarks), its rule
    family (the first directory) and the wall seconds Snakemake measured."""
    rows = []
    root = results / "benchmarks"
    for tsv in sorted(root.rglob("*.tsv")):
        with tsv.open() as fh:
            last = list(csv.DictReader(fh, delimiter="\t"))[-1]
        job = str(tsv.relative_to(root))[: -len(".tsv")]
        rows.append({"job": job, "family": job.split("/", 1)[0], "s": round(float(last["s"]), 1),
                     "cpu_time": round(float(last.get("cpu_time") or 0.0), 1)})
    return sorted(rows, key=lambda r: -float(r["s"]))  # type: ignore[arg-type]


def timeline(log: str) -> list[dict[str, object]]:
    """Start and end (seconds from the first job) of every job in a Snakemake log: a
    ``[date]`` line, then ``rule``/``localrule``/``checkpoint NAME:`` and ``jobid: N`` start
    a job, and a ``[date]`` line, then ``Finished jobid: N`` ends it."""
    stamp, t0 = None, None
    starts: dict[str, tuple[str, float]] = {}
    jobs: list[dict[str, object]] = []
    rule = None
    for line in log.splitlines():
        text = line.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                stamp = time.mktime(time.strptime(text[1:-1], "%a %b %d %H:%M:%S %Y"))
            except ValueError:
                continue
            t0 = stamp if t0 is None else t0
        elif text.endswith(":") and text.split(" ")[0] in ("rule", "localrule", "checkpoint",
                                                            "localcheckpoint"):
            rule = text.split(" ", 1)[1][:-1]
        elif text.startswith("jobid:") and rule is not None and stamp is not None:
            starts[text.split(":", 1)[1].strip()] = (rule, stamp)
            rule = None
        elif text.startswith("Finished jobid:") and stamp is not None and t0 is not None:
            jobid = text.split(":", 1)[1].split("(")[0].strip()
            if jobid in starts:
                name, begun = starts.pop(jobid)
                jobs.append({"rule": name, "jobid": int(jobid), "start": begun - t0,
                             "end": stamp - t0})
    return sorted(jobs, key=lambda j: j["start"])  # type: ignore[arg-type,return-value]


def occupancy(jobs: list[dict[str, object]]) -> dict[str, float]:
    """Seconds of the run with 0, 1, 2, ... jobs running (from :func:`timeline`)."""
    edges = sorted({float(j["start"]) for j in jobs} | {float(j["end"]) for j in jobs})  # type: ignore[arg-type]
    seconds: dict[str, float] = {}
    for lo, hi in zip(edges, edges[1:], strict=False):
        mid = (lo + hi) / 2
        running = sum(1 for j in jobs if float(j["start"]) <= mid < float(j["end"]))  # type: ignore[arg-type]
        seconds[str(running)] = seconds.get(str(running), 0.0) + hi - lo
    return {k: round(v, 1) for k, v in sorted(seconds.items())}


# An AVX2-only x86 CPU, emulated for every job: oneDNN and ATen capped by their own
# variables, and what vLLM's CPU build reads (torch.cpu.get_capabilities) by
# bench/isa_cap/sitecustomize.py. The clocks, caches and memory stay this machine's.
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
            "BATCHFLIP_ISA_CAP": "avx2"}


def one_run(keep: bool, cores: str, emulate_avx2: bool = False) -> tuple[float, Path]:
    """Seconds the default run took in a fresh clone; the clone's path."""
    root = Path(tempfile.mkdtemp(prefix="bench-default-run-"))
    clone = root / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone / "src")}
    if emulate_avx2:
        env.update(AVX2_ENV, PYTHONPATH=f"{clone / 'bench/isa_cap'}:{clone / 'src'}")
    t0 = time.perf_counter()
    proc = subprocess.run(["snakemake", "--cores", cores, "results/paper"], cwd=clone, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (root / "snakemake.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the default run failed (log: {root / 'snakemake.log'}):\n"
                         f"{proc.stderr[-3000:]}")
    if not keep:
        subprocess.run(["rm", "-rf", str(clone / "resources" / "models")], check=True)
    return seconds, clone


def cpu_profile_of(results: Path) -> str | None:
    """The ``cpu_profile`` the run's stack fingerprints record (None: no profile applied)."""
    seen = {json.loads(f.read_text()).get("cpu_profile")
            for f in (results / "generations").glob("*/*/*.stack.json")}
    return ",".join(sorted(str(p) for p in seen)) if seen - {None} else None


def baseline_of(condition: str, study: dict[str, Any]) -> str | None:
    """The condition a condition's texts are compared with, as the study's flips pair them:
    a repeat with the condition it repeats, a dispatch with its own baseline
    (``dispatch_baselines``), anything else with the study's ``baseline``; None for a
    baseline itself."""
    cond = parse_condition(condition)
    if cond.repeat:
        return cond.base
    base = (study.get("dispatch_baselines") or {}).get(cond.dispatch, study["baseline"])
    return None if base == condition else base


def text_changes(checkout: Path) -> dict[str, dict[str, str]]:
    """Per study/model and condition, how many target texts differ from the baseline's
    (``changed/paired``), read from the run's generation parquet files; the baselines are
    the checkout's ``config/config.yaml``'s."""
    import pandas as pd

    studies = yaml.safe_load((checkout / "config/config.yaml").read_text())["studies"]
    out: dict[str, dict[str, str]] = {}
    for model_dir in sorted((checkout / "results/generations").glob("*/*")):
        texts = {}
        for f in sorted(model_dir.glob("*.parquet")):
            df = pd.read_parquet(f, columns=["prompt_id", "role", "text"])
            df = df[df["role"] == "target"]
            texts[f.stem] = dict(zip(df["prompt_id"], df["text"], strict=True))
        row = {}
        for cond, got in texts.items():
            base = baseline_of(cond, studies[model_dir.parent.name])
            if base is None or base not in texts:
                continue
            common = sorted(set(got) & set(texts[base]))
            row[cond] = f"{sum(got[p] != texts[base][p] for p in common)}/{len(common)}"
        out[f"{model_dir.parent.name}/{model_dir.name}"] = row
    return out


def summarise(rows: list[dict[str, object]]) -> dict[str, object]:
    """Per-job rows plus their sum per rule family."""
    families: dict[str, float] = {}
    for r in rows:
        families[str(r["family"])] = families.get(str(r["family"]), 0.0) + float(r["s"])  # type: ignore[arg-type]
    return {"jobs": rows, "family_s": {k: round(v, 1) for k, v in
                                      sorted(families.items(), key=lambda kv: -kv[1])}}


def main() -> int:
    """Run the timings (or read a finished run) and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--cores", default="all")
    ap.add_argument("--keep", action="store_true", help="keep the models in the clones")
    ap.add_argument("--from-run", type=Path, help="summarise this checkout's results/ only")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="cap every job at AVX2 (oneDNN, ATen and vLLM's CPU kernels)")
    args = ap.parse_args()
    if args.emulate_avx2:
        os.environ.update(AVX2_ENV)  # so the summary's cpu facts record the caps
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    cpu = cpu_facts()  # isa_env: ISA caps such as ONEDNN_MAX_CPU_ISA (an emulated older CPU)
    summary: dict[str, object] = {"cpu": cpu["cpu_model"], "cpus": os.cpu_count(),
                                  "commit": commit, "isa_env": cpu.get("isa_env", {})}
    if args.from_run:
        summary.update(summarise(job_table(args.from_run / "results")))
    else:
        walls, clone, changes = [], None, []
        for i in range(args.runs):
            s, clone = one_run(args.keep, args.cores, args.emulate_avx2)
            walls.append(round(s, 1))
            changes.append(text_changes(clone))
            print(f"run {i + 1}: {s:.1f} s ({clone})", flush=True)
        summary.update(runs_s=walls, median_s=statistics.median(walls),
                       cpu_profile=cpu_profile_of(clone / "results"),
                       text_changes=changes)
        assert clone is not None
        summary.update(summarise(job_table(clone / "results")))
        jobs = timeline((clone.parent / "snakemake.log").read_text())
        summary["jobs_running_s"] = occupancy(jobs)  # seconds with 0, 1, 2, ... jobs running
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
