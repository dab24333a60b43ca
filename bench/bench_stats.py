"""Micro-benchmark of batchflip.stats at the scales the workflow meets.

- the unit bootstrap of Pearson r (2,000 resamples over 15 units, as for Study B's models);
- vectorised Wilson and Clopper-Pearson intervals over 1 million rows of synthetic flip
  counts (k flips out of n conditioned rows per row);
- vectorised exact and mid-p McNemar p values over 1 million rows of discordant counts.

Each case runs ``--repeats`` times after one warm-up; the median wall time is printed
(and written as JSON with ``--out``). Run: ``python bench/bench_stats.py [--out f.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy
import statsmodels
from statsmodels.stats.proportion import proportion_confint

from batchflip import stats


def time_median(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median and all wall times (seconds) of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def synthetic(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Flip-like data: n conditioned rows per cell (1..2,340), k ~ Binomial(n, 0.8%),
    discordant counts b, c ~ Poisson(1.5) and Poisson(0.8) (many zeros, as for rare flips)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 2341, size=rows)
    return {
        "k": rng.binomial(n, 0.008),
        "n": n,
        "b": rng.poisson(1.5, size=rows),
        "c": rng.poisson(0.8, size=rows),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--units", type=int, default=15)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = rng.uniform(0, 3, size=args.units)
    y = x + rng.normal(scale=0.5, size=args.units)
    d = synthetic(args.rows, args.seed)

    cases: dict[str, Callable[[], object]] = {
        f"pearson_bootstrap ({args.resamples} resamples, {args.units} units)": lambda: (
            stats.pearson_bootstrap(x, y, n_resamples=args.resamples, seed=1)
        ),
        f"wilson_interval_array ({args.rows:,} rows)": lambda: stats.wilson_interval_array(
            d["k"], d["n"]
        ),
        f"  statsmodels proportion_confint wilson alone ({args.rows:,} rows)": lambda: (
            proportion_confint(d["k"], d["n"], method="wilson")
        ),
        f"clopper_pearson_interval_array ({args.rows:,} rows)": lambda: (
            stats.clopper_pearson_interval_array(d["k"], d["n"])
        ),
        f"mcnemar_exact_array ({args.rows:,} rows)": lambda: stats.mcnemar_exact_array(
            d["b"], d["c"]
        ),
        f"mcnemar_exact_array mid_p ({args.rows:,} rows)": lambda: stats.mcnemar_exact_array(
            d["b"], d["c"], mid_p=True
        ),
        "mcnemar_exact scalar (one call)": lambda: stats.mcnemar_exact(22, 0),
    }
    results = {}
    width = max(len(k) for k in cases)
    print(f"{'case':<{width}}  median     (min..max over {args.repeats} repeats)")
    for name, fn in cases.items():
        med, times = time_median(fn, args.repeats)
        results[name.strip()] = {"median_s": med, "times_s": times}
        print(
            f"{name:<{width}}  {med * 1e3:8.2f} ms ({min(times) * 1e3:.2f}..{max(times) * 1e3:.2f})"
        )

    if args.out:
        meta = {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "statsmodels": statsmodels.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "rows": args.rows,
            "repeats": args.repeats,
        }
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
