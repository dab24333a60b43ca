"""Battery stage: task-YAML files (the paper's format) → one battery parquet.

A task file has a Jinja2 ``prompt_template``, ``filters`` (response post-processing applied
before scoring) and ``samples`` (each with a unique ``id``, a ``reference`` and the template
variables). Rendering uses ``StrictUndefined`` so a variable a sample lacks is an error
naming the file, sample and variable; Jinja2's default of dropping one trailing newline is
kept (that is how the paper's harness renders). The task type decides the domain and the
scorer:

| task_type | domain | scorer |
| --- | --- | --- |
| safety_refusal | safety | refusal |
| safety_overrefusal | safety | refusal (refusal here is over-refusal) |
| safety_bias | safety | bbq |
| safety_truthfulness | safety | truthfulqa |
| classification | capability | mc_letter |

Extra sample fields (answers lists, BBQ indices, categories) and the filters go to ``meta``
as JSON. Output rows follow DESIGN.md (Records: battery row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

from batchflip.errors import InputError
from batchflip.io import write_parquet
from batchflip.records import BATTERY_COLUMNS

TASK_TYPES: dict[str, tuple[str, str]] = {
    "safety_refusal": ("safety", "refusal"),
    "safety_overrefusal": ("safety", "refusal"),
    "safety_bias": ("safety", "bbq"),
    "safety_truthfulness": ("safety", "truthfulqa"),
    "classification": ("capability", "mc_letter"),
}
FILTERS = ("strip_whitespace", "truncate_at_newline", "remove_assistant_prefix")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


def task_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories to their ``*.yaml`` files (sorted); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(p, "battery path does not exist")
        out += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    return out


def load_task(path: Path) -> pd.DataFrame:
    """Render one task file into battery rows; InputError on any bad field."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not readable YAML: {exc}") from None
    return render_task(doc, path)


def render_task(doc: Any, path: object) -> pd.DataFrame:
    """Render one task document (a parsed task YAML, or one built by batchflip.builders)
    into battery rows; ``path`` names its origin in errors."""
    if not isinstance(doc, dict):
        raise InputError(path, "top level must be a mapping")
    for key in ("name", "task_type", "prompt_template", "samples"):
        if key not in doc:
            raise InputError(path, "missing top-level key", field=key)
    if doc["task_type"] not in TASK_TYPES:
        raise InputError(path, f"unknown task_type '{doc['task_type']}' (known: "
                         f"{', '.join(TASK_TYPES)})", field="task_type")
    filters = [f.get("type") if isinstance(f, dict) else f for f in doc.get("filters") or []]
    for f in filters:
        if f not in FILTERS:
            raise InputError(path, f"unknown filter '{f}' (known: {', '.join(FILTERS)})",
                             field="filters")
    try:
        template = _ENV.from_string(doc["prompt_template"])
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(path, f"template syntax: {exc}", field="prompt_template") from None
    domain, scorer = TASK_TYPES[doc["task_type"]]
    if not isinstance(doc["samples"], list) or not doc["samples"]:
        raise InputError(path, "must be a non-empty list", field="samples")
    rows = []
    for i, sample in enumerate(doc["samples"], start=1):
        label = f"sample {i}" + (f" (id {sample['id']})" if isinstance(sample, dict)
                                 and "id" in sample else "")
        if not isinstance(sample, dict):
            raise InputError(path, "sample must be a mapping", row=label)
        for key in ("id", "reference"):
            if key not in sample or sample[key] in (None, ""):
                raise InputError(path, "missing or empty", row=label, field=key)
        try:
            prompt = template.render(**sample)
        except jinja2.UndefinedError as exc:
            var = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
            raise InputError(path, f"template variable not in sample ({exc})", row=label,
                             field=var) from None
        extra = {k: v for k, v in sample.items() if k not in ("id", "reference")}
        rows.append({
            "prompt_id": str(sample["id"]), "task": doc["name"], "domain": domain,
            "scorer": scorer, "prompt": prompt, "reference": str(sample["reference"]),
            "meta": json.dumps({"filters": filters, **extra}, sort_keys=True),
        })
    return pd.DataFrame(rows, columns=BATTERY_COLUMNS)


def build_battery(paths: list[str | Path], builder: dict[str, Any] | None = None
                  ) -> pd.DataFrame:
    """All task files, then the rows of a builder spec (batchflip.builders), as one frame;
    duplicate prompt ids across or within them are errors."""
    files = task_files(paths)
    if not files and not builder:
        raise InputError(", ".join(map(str, paths)) or "battery", "no task YAML files found")
    parts: list[tuple[object, pd.DataFrame]] = [(f, load_task(f)) for f in files]
    if builder:
        from batchflip.builders import build

        parts.append(("builder", build(builder)))
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
    """CLI: ``batchflip battery --out X.parquet [--builder JSON] PATH...``."""
    parser.add_argument("paths", nargs="*", help="task YAML files or directories")
    parser.add_argument("--builder", default="null",
                        help="builder spec as JSON (see batchflip.builders); null for none")
    parser.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    """Build and write a battery."""
    df = build_battery(args.paths, json.loads(args.builder))
    write_parquet(df, args.out)
    counts = df.groupby("domain").size().to_dict()
    print(f"{args.out}: {len(df)} prompts {counts}")
    return 0


def meta(row: dict[str, Any] | pd.Series) -> dict[str, Any]:
    """Decode a battery row's meta JSON."""
    return json.loads(row["meta"])
