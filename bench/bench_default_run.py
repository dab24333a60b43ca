"""Time the default run as a newcomer starts it: a fresh clone, an empty results/, models
built by the run itself.

Each run clones the repository's HEAD into a temporary directory and times
``snakemake --cores all results/paper`` there (batchflip imported from the clone; the
installed environment is the one this interpreter has: run ``envs/install-cpu.sh`` first).
It then reads the run's ``benchmark:`` files (``results/benchmarks/**.tsv``, one per job of
the heavy rules) into a per-job table. Prints one line per run and a JSON summary: the wall
time of each run and their median, the CPU model and count, and the per-job seconds of the
last run (largest first) with their sum per rule family. ``--from-run DIR`` summarises the
benchmark files of a run that already happened instead (no timing).

    python3 bench/bench_default_run.py --runs 1 --out bench-default-run.json

Run it on a quiet machine: the generation jobs are memory-bound on 2 cores, and another
process with its own OpenMP threads slows them many times over (oversubscription).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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


def one_run(keep: bool, cores: str) -> tuple[float, Path]:
    """Seconds the default run took in a fresh clone; the clone's path."""
    root = Path(tempfile.mkdtemp(prefix="bench-default-run-"))
    clone = root / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone / "src")}
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
    args = ap.parse_args()
    summary: dict[str, object] = {"cpu": cpu_model(), "cpus": os.cpu_count()}
    if args.from_run:
        summary.update(summarise(job_table(args.from_run / "results")))
    else:
        walls, clone = [], None
        for i in range(args.runs):
            s, clone = one_run(args.keep, args.cores)
            walls.append(round(s, 1))
            print(f"run {i + 1}: {s:.1f} s ({clone})", flush=True)
        summary.update(runs_s=walls, median_s=statistics.median(walls))
        assert clone is not None
        summary.update(summarise(job_table(clone / "results")))
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
