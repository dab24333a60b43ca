"""Figures drawn from a numbers file (never from raw records, so they cannot disagree).

- ``flip_rates``: safety vs capability flip rate by batch size (pooled over models) for
  each batch-size dispatch mode (sync, list), with Wilson 95% intervals.
- ``identity``: share of outputs byte-identical to the baseline by batch size.

Each is written as PNG and PDF with fixed metadata, so reruns give the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from batchflip.cli import figure_arguments  # noqa: E402
from batchflip.io import atomic_path  # noqa: E402
from batchflip.numbers import load  # noqa: E402

_META_PDF = {"CreationDate": None, "ModDate": None, "Producer": "batchflip"}
_META_PNG = {"Software": "batchflip"}
COLORS = {"safety": "#b2182b", "capability": "#2166ac"}


def save(fig: plt.Figure, png: str | Path, pdf: str | Path) -> None:
    """Write a figure to PNG and PDF atomically with reproducible metadata."""
    for path, fmt, meta in ((png, "png", _META_PNG), (pdf, "pdf", _META_PDF)):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta, dpi=150, bbox_inches="tight")
    plt.close(fig)


def legend_or_note(ax: plt.Axes, drawn: bool, note: str) -> None:
    """The legend when something was drawn, else ``note`` in the middle of the axes."""
    if drawn:
        ax.legend(frameon=False, fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def _series(numbers: dict[str, dict[str, Any]], suffix: str, model: str = "all",
            ) -> dict[str, list[dict[str, Any]]]:
    """Records ending in ``suffix`` for one model, grouped by dispatch, sorted by batch size."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, rec in numbers.items():
        if key.endswith("/" + suffix) and rec.get("model") == model and "batch_size" in rec:
            if rec.get("dispatch") in ("sync", "list"):
                out.setdefault(rec["dispatch"], []).append(rec)
    return {d: sorted(v, key=lambda r: r["batch_size"]) for d, v in sorted(out.items())}


def _errorbar(ax: plt.Axes, recs: list[dict[str, Any]], scale: float, **kw: Any) -> None:
    x = [r["batch_size"] for r in recs]
    y = [r["value"] * scale for r in recs]
    lo = [(r["value"] - r["ci_low"]) * scale for r in recs]
    hi = [(r["ci_high"] - r["value"]) * scale for r in recs]
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, **kw)


def flip_rate_figure(numbers: dict[str, dict[str, Any]], png: str, pdf: str) -> None:
    """Safety vs capability flip rate (%) by batch size, per dispatch mode."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {"sync": "-", "list": "--"}
    for domain in ("safety", "capability"):
        for dispatch, recs in _series(numbers, f"{domain}_flip_rate").items():
            _errorbar(ax, recs, 100, color=COLORS[domain], linestyle=styles[dispatch],
                      label=f"{domain} ({dispatch})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("flip rate vs batch size 1 (%)")
    ax.set_title("Label flips by batch size (Wilson 95% CI)")
    ax.legend(frameon=False, fontsize=8)
    save(fig, png, pdf)


def identity_figure(numbers: dict[str, dict[str, Any]], png: str, pdf: str) -> None:
    """Share (%) of outputs byte-identical to batch size 1, by batch size."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for dispatch, recs in _series(numbers, "identical_share").items():
        _errorbar(ax, recs, 100, label=dispatch)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 105)
    ax.set_xlabel("batch size")
    ax.set_ylabel("byte-identical outputs (%)")
    ax.set_title("Output identity with batch size 1 (Wilson 95% CI)")
    ax.legend(frameon=False, fontsize=8)
    save(fig, png, pdf)


FIGURES = {"flip_rates": flip_rate_figure, "identity": identity_figure}


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip figures --numbers N --name flip_rates --png P --pdf Q``."""
    figure_arguments(parser)
    parser.add_argument("--name", required=True, choices=sorted(FIGURES))


def main(args: argparse.Namespace) -> int:
    """Draw one figure."""
    numbers = load(args.numbers)
    FIGURES[args.name](numbers, args.png, args.pdf)
    return 0
