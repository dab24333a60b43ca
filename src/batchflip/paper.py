"""Paper stage: the bundle ``results/paper/`` built from numbers files and figures.

Holds ``numbers.json``, ``numbers.tex`` (one LaTeX macro per number, rendered with jinja2),
``report.html``, ``figures/`` and ``MANIFEST.tsv``
(path, sha256, size of every other file). The bundle is assembled in a temporary directory
and renamed into place, so a failed build leaves no half-written bundle.

report.html is one self-contained file for a reviewer (figures as data: URIs, no script,
no external resource). Its first screen says what was run (per study: models and their
weights, engine, device, dtype, kernels; library versions; from the stack fingerprints
given with ``--stacks``) and when the report was built, and gives one headline sentence
per study (:mod:`batchflip.headlines`); each number there links to its row in the
definitions table (anchor ``def-<id>``). Then the figures with captions that say what to
look at, the failed requests per (study, model, condition) from the ``error_count``
records (``batchflip.failures``), this run's numbers, and apart from them the values
recomputed from the paper's published inputs (:mod:`batchflip.report`). The build date is
in report.html only (``SOURCE_DATE_EPOCH`` fixes it), so numbers.json and numbers.tex stay
byte-identical across runs of the same generations; report.html and MANIFEST.tsv do not.

Published numbers never pass for reproduced ones: ``numbers.json`` is
``{"reproduced": {id: record}, "recomputed_from_published": {id: record}}`` (each sorted by
id): this run's numbers, and apart from them the fidelity records recomputed from the
paper's published inputs (:mod:`batchflip.fidelity`; their ``oracle`` and ``match`` say
whether the printed value could test them). ``numbers.tex`` has the two in two labelled
sections, the second with macros ``\bfPublished...``; report.html has them in two sections.
A NaN or infinity anywhere refuses the build (:func:`batchflip.io.dumps_json`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from batchflip.errors import BatchflipError
from batchflip.io import dumps_json, sha256_file
from batchflip.numbers import load_numbers
from batchflip.report import built_at, context, is_published, split_numbers

_DIGITS = "Zero One Two Three Four Five Six Seven Eight Nine".split()
_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}"}


PUBLISHED_MACRO_PREFIX = "bfPublished"  # macros of values recomputed from published inputs


def macro_name(number_id: str, published: bool = False) -> str:
    """A LaTeX-safe macro name for an id: letters only, CamelCase, digits spelled out;
    ``\bfPublished...`` for a value recomputed from the paper's published inputs."""
    words = re.split(r"[^A-Za-z0-9]+", number_id)
    name = "".join(w[:1].upper() + w[1:] for w in words if w)
    prefix = PUBLISHED_MACRO_PREFIX if published else "bf"
    return prefix + re.sub(r"[0-9]", lambda m: _DIGITS[int(m.group())], name)


def format_value(rec: dict[str, Any]) -> str:
    """Human text of a value: percent for proportions, 3 significant digits for floats."""
    v = rec.get("value")
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if "k" in rec and "n" in rec:
        return f"{100 * v:.2f}%"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    return f"{v:.3g}"


def interval_text(rec: dict[str, Any]) -> str:
    """``[low, high]`` of a record's 95% interval (``ci_low``/``ci_high``, else ``low``/
    ``high``): percent for proportions, 3 significant digits otherwise; "" when none."""
    for lo, hi in (("ci_low", "ci_high"), ("low", "high")):
        a, b = rec.get(lo), rec.get(hi)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if "k" in rec and "n" in rec:
                return f"[{100 * a:.1f}%, {100 * b:.1f}%]"
            return f"[{a:.3g}, {b:.3g}]"
    return ""


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters."""
    return "".join(_TEX_ESCAPE.get(c, c) for c in text)


def rows(numbers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows for the templates; macro name collisions are an error."""
    out, seen = [], {}
    for nid in sorted(numbers):
        rec = numbers[nid]
        macro = macro_name(nid, is_published(rec))
        if macro in seen:
            raise BatchflipError(f"numbers '{nid}' and '{seen[macro]}' share macro \\{macro}")
        seen[macro] = nid
        text = format_value(rec)
        ci = interval_text(rec)
        out.append({"id": nid, "anchor": f"def-{nid}", "published": is_published(rec),
                    "macro": macro, "text": text, "tex": tex_escape(text),
                    "ci": ci, "kn": f"{rec['k']} / {rec['n']}" if "k" in rec else "",
                    "definition": rec.get("definition", ""), "note": rec.get("note"),
                    "fidelity": fidelity_cells(rec) if is_published(rec) else None})
    return out


def fidelity_cells(rec: dict[str, Any]) -> dict[str, Any]:
    """The published-input table's cells of a fidelity record (batchflip.fidelity)."""
    unit = str(rec.get("unit") or "")
    unit = unit if unit in ("", "%") else " " + unit
    oracle = rec.get("oracle", "")
    if rec.get("match") is True:
        verdict = "yes"
    elif rec.get("match") is False:
        verdict = "NO"
    elif oracle == "circular":
        verdict = "no claim: circular"
    else:
        verdict = "not printed"
    return {"formatted": rec.get("formatted", ""), "unit": unit,
            "printed": rec.get("printed"), "match": rec.get("match"), "verdict": verdict,
            "oracle": oracle, "oracle_note": rec.get("oracle_note", ""),
            "source": rec.get("source", ""), "inputs": ", ".join(rec.get("inputs", []))}


def failure_summary(numbers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's failed-request section: one row per ``<study>/<model>/<level>/
    error_count`` record, the rows with failures, and a one-line summary."""
    entries = []
    for nid in sorted(numbers):
        rec = numbers[nid]
        parts = nid.split("/")
        if parts[-1] != "error_count" or not rec.get("errors") or len(parts) < 4:
            continue
        k, n = int(rec["value"]), int(rec.get("n", 0))
        entries.append({"study": parts[0], "model": parts[1], "condition": "/".join(parts[2:-1]),
                        "k": k, "n": n, "share": f"{100 * k / n:.2f}%" if n else "n/a",
                        "first_error": rec.get("first_error") or ""})
    failed = [e for e in entries if e["k"]]
    total, n_failed = sum(e["n"] for e in entries), sum(e["k"] for e in failed)
    limits = sorted({numbers[i]["max_share"] for i in numbers
                     if numbers[i].get("errors") and "max_share" in numbers[i]})
    limit = ", ".join(f"{100 * x:g}%" for x in limits) or "n/a"
    if not entries:
        line = "No numbers file counted failed requests."
    elif not failed:
        line = (f"No failed requests: all {total} requests of {len(entries)} (study, model, "
                "condition) were answered.")
    else:
        line = (f"{n_failed} of {total} requests failed, in {len(failed)} of {len(entries)} "
                f"(study, model, condition); failed requests are never scored, paired or "
                f"counted as answers (limit per condition: {limit}).")
    return {"entries": entries, "failed": failed, "line": line}


def build_bundle(numbers_files: list[str], figures: list[str], captions: dict[str, str],
                 out_dir: Path, stacks: list[str] | None = None,
                 built: datetime | None = None, kinds: Mapping[str, str] | None = None
                 ) -> None:
    """Assemble the bundle in a temporary directory, then rename it onto ``out_dir``.

    ``captions`` maps a figure's file stem to its caption; ``stacks`` are the stack
    fingerprint files behind the numbers; ``built`` defaults to :func:`built_at`; ``kinds``
    maps each study to its config ``kind`` (one headline each)."""
    numbers = load_numbers(numbers_files)
    reproduced, recomputed = split_numbers(numbers)
    numbers_json = dumps_json({"reproduced": reproduced,
                               "recomputed_from_published": recomputed})
    table = rows(numbers)
    env = jinja2.Environment(loader=jinja2.PackageLoader("batchflip", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]),
                             keep_trailing_newline=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        (tmp / "figures").mkdir()
        for f in sorted(figures):
            shutil.copyfile(f, tmp / "figures" / Path(f).name)
        (tmp / "numbers.json").write_text(numbers_json)
        (tmp / "numbers.tex").write_text(env.get_template("numbers.tex.j2").render(
            reproduced=[r for r in table if not r["published"]],
            published=[r for r in table if r["published"]], prefix=PUBLISHED_MACRO_PREFIX))
        extra = context(numbers, figures, captions, stacks or [], built or built_at(),
                        kinds or {})
        (tmp / "report.html").write_text(env.get_template("report.html.j2").render(
            numbers=table, failures=failure_summary(numbers), **extra))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = ["path\tsha256\tsize"] + [
            f"{p.relative_to(tmp)}\t{sha256_file(p)}\t{p.stat().st_size}" for p in files]
        (tmp / "MANIFEST.tsv").write_text("\n".join(manifest) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip paper --numbers N... --figures F... --stacks S... --captions-dir D
    --out DIR``."""
    parser.add_argument("--numbers", nargs="+", required=True)
    parser.add_argument("--figures", nargs="*", default=[])
    parser.add_argument("--stacks", nargs="*", default=[],
                        help="stack fingerprints (*.stack.json) for report.html's run facts")
    parser.add_argument("--captions-dir", help="folder of <figure kind>.rst captions")
    parser.add_argument("--kinds", required=True, type=json.loads,
                        help='each study\'s config kind as JSON, e.g. {"a": "discovery"}')
    parser.add_argument("--out", required=True, type=Path)


def main(args: argparse.Namespace) -> int:
    """Build the bundle."""
    captions: dict[str, str] = {}
    if args.captions_dir:
        kinds = {p.stem: p.read_text().strip() for p in Path(args.captions_dir).glob("*.rst")}
        for f in args.figures:
            stem = Path(f).stem
            captions[stem] = next((t for k, t in kinds.items() if stem.endswith("_" + k)), "")
    build_bundle(args.numbers, args.figures, captions, args.out, args.stacks,
                 kinds=args.kinds)
    print(f"{args.out}: bundle written")
    return 0
