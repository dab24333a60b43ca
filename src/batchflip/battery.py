"""Battery stage: task-YAML files (the paper's format) and builder specs → one battery parquet.

Each task file is rendered by :mod:`batchflip.tasks` (format, task types, filters, meta);
a builder spec samples rows from public datasets (:mod:`batchflip.builders`). Prompt ids
must be unique across all of them. ``render`` (a battery's config key, a ``params:`` value of
the battery rule) picks the rendering: ``harness``, the paper harness's bytes (default), or
``jinja``, the trailing-newline-dropping rendering of batchflip before it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from batchflip.builders import build
from batchflip.errors import InputError
from batchflip.io import write_parquet
from batchflip.tasks import RENDERINGS, render_task


def task_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories to their ``*.yaml`` files (sorted); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(p, "battery path does not exist")
        out += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    return out


def load_task(path: Path, render: str = "harness") -> pd.DataFrame:
    """Render one task file into battery rows; InputError on any bad field."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not readable YAML: {exc}") from None
    return render_task(doc, path, render)


def build_battery(paths: list[str | Path], builder: dict[str, Any] | None = None,
                  render: str = "harness") -> pd.DataFrame:
    """All task files, then the rows of a builder spec (batchflip.builders), as one frame;
    duplicate prompt ids across or within them are errors."""
    files = task_files(paths)
    if not files and not builder:
        raise InputError(", ".join(map(str, paths)) or "battery", "no task YAML files found")
    parts: list[tuple[object, pd.DataFrame]] = [(f, load_task(f, render)) for f in files]
    if builder:
        parts.append(("builder", build(builder, render)))
    frames, seen = [], {}
    for f, df in parts:
        for i, pid in enumerate(df["prompt_id"], start=1):
            if pid in seen:
                raise InputError(f, f"duplicate prompt id '{pid}' (first in {seen[pid]})",
                                 row=f"sample {i}", field="id")
            seen[pid] = f
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip battery --out X.parquet [--builder JSON] [--render R] PATH...``."""
    parser.add_argument("paths", nargs="*", help="task YAML files or directories")
    parser.add_argument("--builder", default="null",
                        help="builder spec as JSON (see batchflip.builders); null for none")
    parser.add_argument("--render", choices=RENDERINGS, default="harness",
                        help="harness: the paper harness's bytes (template's trailing newline "
                        "kept); jinja: Jinja2's default (drops it), batchflip's rendering before")
    parser.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    """Build and write a battery."""
    df = build_battery(args.paths, json.loads(args.builder), args.render)
    write_parquet(df, args.out)
    counts = df.groupby("domain").size().to_dict()
    print(f"{args.out}: {len(df)} prompts {counts}")
    return 0

