"""Shared plot helpers for the studies' figures (``batchflip.studies.*``).

Figures are drawn from a numbers file (never from raw records, so they cannot disagree)
and written as PNG and PDF with fixed metadata, so reruns give the same bytes. The
studies import this module inside their figure functions, so a numbers command never
imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from batchflip.io import atomic_path  # noqa: E402

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
