"""``batchflip adjudicate {export,validate,results}``: the CLI of the adjudication stage
(see :mod:`batchflip.adjudication`)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pandas as pd

from batchflip.adjudication.export import (
    DEFAULT_DOMAINS,
    DEFAULT_PHASE,
    DEFAULT_RATERS,
    KEY_COLUMNS,
    PHASES,
    _read_scored,
    build_export,
    neutralise_frame,
    render_sheet,
    write_bytes,
)
from batchflip.adjudication.results import compute_results, read_all_flips
from batchflip.adjudication.sheets import VERDICTS, load_schema, read_ratings
from batchflip.bundled import ADJUDICATION_SCHEMA
from batchflip.errors import BatchflipError
from batchflip.io import atomic_path, write_json
from batchflip.records import read_records

SCHEMA_HELP = ("sheet row schema (YAML; "
               f"default: the bundled batchflip/data/{ADJUDICATION_SCHEMA})")
PHASE_HELP = ("rows adjudicated and giving the automated flip rate: sync = synchronized "
              "dispatch at batch size > 1 (the paper's), all = every condition pooled")


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip adjudicate {export,validate,results} ...`` (see each ``--help``)."""
    sub = parser.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="write blinded rater sheets and the unblinding key")
    ex.add_argument("--study", required=True)
    ex.add_argument("--flips", nargs="+", required=True, help="flip parquet files")
    ex.add_argument("--scored", nargs="+", required=True,
                    help="scored parquet files holding the baseline and candidate conditions")
    ex.add_argument("--battery", required=True, help="battery parquet (prompt texts)")
    ex.add_argument("--out-dir", required=True,
                    help="writes sheet_{rater}.csv for each rater and key.parquet here")
    ex.add_argument("--raters", nargs="+", default=list(DEFAULT_RATERS))
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS))
    ex.add_argument("--phase", choices=PHASES, default=DEFAULT_PHASE, help=PHASE_HELP)
    ex.add_argument("--include-text-changes", action="store_true",
                    help="also send rows whose label held but whose text changed")
    ex.add_argument("--text-change-limit", type=int, default=None,
                    help="seeded sample of at most this many text changes")

    va = sub.add_parser("validate", help="check filled sheets against the key (writes nothing)")
    va.add_argument("--key", required=True)
    va.add_argument("--schema", default=None, help=SCHEMA_HELP)
    va.add_argument("ratings", nargs="+", help="filled sheets; the rater is the file stem")

    re_ = sub.add_parser("results", help="agreement, consensus and corrected flip rates")
    re_.add_argument("--study", required=True)
    re_.add_argument("--key", required=True)
    re_.add_argument("--flips", nargs="+", required=True, help="current flip parquet files")
    re_.add_argument("--scored", nargs="*", default=[],
                     help="current scored files (labels, scorer versions, texts) [optional]")
    re_.add_argument("--ratings", nargs="*", default=[], help="filled sheets (may be none)")
    re_.add_argument("--exported", nargs="*", default=[],
                     help="the blank exported sheets (named in the pending status)")
    re_.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS))
    re_.add_argument("--phase", choices=PHASES, default=DEFAULT_PHASE, help=PHASE_HELP)
    re_.add_argument("--confidence", type=float, default=0.95)
    re_.add_argument("--schema", default=None, help=SCHEMA_HELP)
    re_.add_argument("--out", required=True, help="numbers JSON")
    re_.add_argument("--rereview", required=True, help="re-review CSV")
    re_.add_argument("--verdicts", required=True, help="unblinded per-item verdict CSV")


def _write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """A results CSV with every text cell neutralised (export.neutralise_frame)."""
    with atomic_path(path) as tmp:
        neutralise_frame(df).to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n")


def _export(args: argparse.Namespace) -> int:
    if len(set(args.raters)) != len(args.raters):
        raise BatchflipError(f"--raters names a rater twice: {args.raters}")
    flips = read_all_flips(args.flips)
    battery = read_records(args.battery, ["prompt_id", "prompt"])
    key, texts = build_export(flips, args.scored, battery, args.study, args.seed,
                              args.domains, args.include_text_changes,
                              args.text_change_limit, args.phase)
    out = Path(args.out_dir)
    sheets = {r: render_sheet(texts, r, args.study, args.seed) for r in args.raters}
    for r, data in sheets.items():
        write_bytes(data, out / f"sheet_{r}.csv")
    with atomic_path(out / "key.parquet") as tmp:
        key.to_parquet(tmp, index=False)
    n_label = int((key["candidate"] == "label_flip").sum())
    print(f"{out}: {len(key)} items ({n_label} label flips, {len(key) - n_label} text "
          f"changes) for raters {', '.join(args.raters)}; key in {out / 'key.parquet'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    key = read_records(args.key, KEY_COLUMNS)
    ratings = read_ratings(args.ratings, key, load_schema(args.schema))
    for r, df in ratings.items():
        counts = Counter(df["verdict"])
        print(f"{r}: ok, {len(df)} items: "
              + ", ".join(f"{v} {counts.get(v, 0)}" for v in VERDICTS))
    return 0


def _results(args: argparse.Namespace) -> int:
    key = read_records(args.key, KEY_COLUMNS)
    ratings = read_ratings(args.ratings, key, load_schema(args.schema))
    flips = read_all_flips(args.flips)
    scored = None
    if args.scored:
        scored = _read_scored(args.scored, pd.concat([
            key[["model", "condition", "prompt_id"]],
            key[["model", "baseline_condition", "prompt_id"]].rename(
                columns={"baseline_condition": "condition"})]).drop_duplicates())
    inputs = {"flips": sorted(args.flips), "key": [args.key],
              "ratings": sorted(str(p) for p in args.ratings), "scored": sorted(args.scored)}
    numbers, rereview, verdicts = compute_results(
        args.study, key, flips, ratings, domains=args.domains, inputs=inputs, scored=scored,
        exported=args.exported, confidence=args.confidence, phase=args.phase)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    _write_csv(rereview, args.rereview)
    _write_csv(verdicts, args.verdicts)
    print(f"{args.out}: {numbers[f'{args.study}/adjudication/status']['value']}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run one sub-action."""
    return {"export": _export, "validate": _validate, "results": _results}[args.action](args)
