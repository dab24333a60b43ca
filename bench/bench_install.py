"""Time the CPU set-up as a newcomer runs it: a fresh clone, a fresh venv, empty caches.

Each run clones the repository's HEAD into a temporary directory, creates a venv, and runs
``envs/install-cpu.sh`` with ``PYTHON`` set to the venv's interpreter and empty pip and uv
caches (``PIP_CACHE_DIR``, ``UV_CACHE_DIR``), as on a machine that never installed it. Then
it checks that the venv imports vllm and batchflip (from the clone). Prints one line per
run and a JSON summary: the median wall time per installer (``uv``, the default, and
``pip``, the fallback) and their ratio.

    python3 bench/bench_install.py --runs 3 --installers uv pip --out bench-install.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = "import vllm, batchflip, sys; print(vllm.__version__, batchflip.__file__)"


def one_run(installer: str, keep: bool) -> float:
    """Seconds that ``install-cpu.sh`` took in a fresh clone and venv with empty caches."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-install-{installer}-"))
    clone, venv = root / "clone", root / "venv"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {**os.environ, "PYTHON": py, "BATCHFLIP_INSTALLER": installer,
           "PIP_CACHE_DIR": str(root / "pip-cache"), "UV_CACHE_DIR": str(root / "uv-cache")}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    subprocess.run(["bash", "envs/install-cpu.sh"], cwd=clone, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    out = subprocess.run([py, "-c", CHECK], cwd=root, env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    if str(clone) not in out:
        raise SystemExit(f"batchflip was not imported from the clone: {out}")
    if not keep:
        subprocess.run(["rm", "-rf", str(root)], check=True)
    return seconds


def main() -> int:
    """Run the timings and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--installers", nargs="+", default=["uv", "pip"], choices=["uv", "pip"])
    ap.add_argument("--keep", action="store_true", help="keep the temporary clones and venvs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    times: dict[str, list[float]] = {}
    for installer in args.installers:
        for i in range(args.runs):
            s = one_run(installer, args.keep)
            times.setdefault(installer, []).append(round(s, 1))
            print(f"{installer} run {i + 1}: {s:.1f} s", flush=True)
    summary = {"runs": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
               "cpus": os.cpu_count()}
    if {"uv", "pip"} <= set(times):
        summary["pip_over_uv"] = round(summary["median_s"]["pip"] / summary["median_s"]["uv"], 2)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
