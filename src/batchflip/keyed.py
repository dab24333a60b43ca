"""Content-keyed generation downstream of scoring.

Study D's reruns and an enriched study's generations depend on what scoring chose (the
candidate list, the boundary-sensitive subset). A scorer change re-scores and rewrites those
files; were they plain inputs of the generation jobs, file times would rerun every such job.
Instead each of these jobs writes under the *content key* of what it generates
(``.../<key>/...``); a cheap pick job copies the file of the current key to the fixed path
the rest of the workflow reads. An unchanged selection keeps its key, so no generation job
runs; a changed one gets a new key, and Study D's job reuses, per candidate, the reruns an
earlier key already holds (same settings, same prompt and group texts).

``batchflip keyed pick --src A.. --dst B..`` copies; ``batchflip keyed check --file F
--kind K --key KEY`` fails when F no longer has that key (a stale job).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from batchflip.errors import BatchflipError
from batchflip.io import atomic_path

KEY_LEN = 16
KEY_PATTERN = f"[0-9a-f]{{{KEY_LEN}}}"

# the candidate columns a rerun depends on (scores and directions do not change what runs)
CANDIDATE_GENERATION_COLUMNS = ("candidate_id", "prompt_id", "dispatch", "condition",
                                "batch_size", "group_id", "position", "members")


def digest(obj: Any) -> str:
    """The key of a JSON-able object (sha256 of its sorted-key JSON, first 16 hex digits)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                          ).hexdigest()[:KEY_LEN]


def battery_key(path: str | Path) -> str:
    """Key of a battery parquet: every column of every row, in order (order forms groups)."""
    df = pd.read_parquet(path)
    return digest([list(df.columns), json.loads(df.to_json(orient="values"))])


def candidates_key(df: pd.DataFrame) -> str:
    """Key of a candidate list: the columns that decide what is rerun, rows by id."""
    missing = [c for c in CANDIDATE_GENERATION_COLUMNS if c not in df.columns]
    if missing:
        raise BatchflipError(f"candidate list lacks {missing}")
    rows = df[list(CANDIDATE_GENERATION_COLUMNS)].astype(str).sort_values("candidate_id")
    return digest(rows.to_numpy().tolist())


def file_key(path: str | Path, kind: str) -> str:
    """Key of a file: ``kind`` battery or candidates."""
    if kind == "battery":
        return battery_key(path)
    if kind == "candidates":
        return candidates_key(pd.read_parquet(path))
    raise BatchflipError(f"unknown key kind '{kind}' (battery, candidates)")


def combined_key(keys: list[str]) -> str:
    """One key for a job that generates from several keyed inputs (a key alone is itself)."""
    return keys[0] if len(keys) == 1 else digest(keys)


def pick(src: list[str], dst: list[str]) -> None:
    """Copy each keyed file to its fixed path (atomically, contents unchanged)."""
    if len(src) != len(dst):
        raise BatchflipError(f"pick: {len(src)} sources for {len(dst)} destinations")
    for s, d in zip(src, dst, strict=True):
        if not Path(s).is_file():
            raise BatchflipError(f"pick: {s} does not exist")
        Path(d).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(d) as tmp:
            shutil.copyfile(s, tmp)


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip keyed {pick,check}``."""
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("pick", help="copy keyed files to their fixed paths")
    p.add_argument("--src", nargs="+", required=True)
    p.add_argument("--dst", nargs="+", required=True)
    c = sub.add_parser("check", help="fail unless a file still has the given content key")
    c.add_argument("--file", action="append", required=True)
    c.add_argument("--kind", required=True, choices=["battery", "candidates"])
    c.add_argument("--key", required=True)


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    if args.action == "pick":
        pick(args.src, args.dst)
        return 0
    got = combined_key([file_key(f, args.kind) for f in args.file])
    if got != args.key:
        raise BatchflipError(f"{', '.join(args.file)}: content key {got}, but this job is for "
                             f"{args.key} (the file changed after the plan; run again)")
    return 0
