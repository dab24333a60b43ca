"""The pieces of report.html that paper.py does not hold: build date, run facts, headlines,
figures with captions, and the split of published-input values from reproduced ones.

The build date is the only thing in report.html that changes between runs of the same
inputs: it is ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else the time of the
build, in UTC. It never goes into numbers.json or numbers.tex.

Published-input values are the fidelity records (:mod:`batchflip.fidelity`): recomputed
from counts the paper publishes (``batchflip/data/fidelity/published.yaml``), not from this
run's generations. The report shows them in a section of their own.
"""

from __future__ import annotations

import base64
import os
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchflip import __version__, headlines, stacks

LOOK = "What to look at:"


def built_at(env: Mapping[str, str] = os.environ) -> datetime:
    """``SOURCE_DATE_EPOCH`` (seconds) when set, else now; in UTC."""
    epoch = env.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), tz=timezone.utc)
    return datetime.now(tz=timezone.utc)


def is_published(rec: Mapping[str, Any]) -> bool:
    """True for a record recomputed from the paper's published inputs (a fidelity record)."""
    return "recipe" in rec and "published" in rec


def split_numbers(numbers: Mapping[str, dict[str, Any]]
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(this run's records, records recomputed from published inputs), each sorted by id."""
    reproduced = {k: numbers[k] for k in sorted(numbers) if not is_published(numbers[k])}
    recomputed = {k: numbers[k] for k in sorted(numbers) if is_published(numbers[k])}
    return reproduced, recomputed


def published_summary(numbers: Mapping[str, Mapping[str, Any]]) -> str:
    """``m of n printed values reproduced`` over the independent published-input records
    (``oracle: independent``), and how many are circular (no match claimed)."""
    if not any(is_published(r) for r in numbers.values()):
        return "No published-input values in this bundle."
    checked = [r for r in numbers.values()
               if is_published(r) and r.get("oracle") == "independent"]
    circular = sum(1 for r in numbers.values()
                   if is_published(r) and r.get("oracle") == "circular")
    bad = sum(1 for r in checked if r.get("match") is not True)
    line = (f"{len(checked) - bad} of {len(checked)} printed values reproduced from "
            "independent published inputs")
    line += f" ({bad} mismatched)" if bad else ""
    if circular:
        line += (f"; {circular} circular (an input was derived from the printed value, or "
                 "the value compared with is not printed): no match claimed")
    return line + "."


def study_of(stem: str, studies: set[str]) -> tuple[str, str]:
    """(study, figure kind) of a figure file stem ``{study}_{kind}``: the longest study
    name that prefixes it; ("", stem) when none does."""
    for study in sorted(studies, key=len, reverse=True):
        if stem.startswith(study + "_"):
            return study, stem[len(study) + 1:]
    return "", stem


def figure_items(paths: list[str], captions: Mapping[str, str], studies: set[str]
                 ) -> list[dict[str, str]]:
    """The PNG figures, numbered, with title, caption, what to look at and data URI."""
    items = []
    for path in sorted(p for p in paths if p.endswith(".png")):
        stem = Path(path).stem
        study, kind = study_of(stem, studies)
        text = captions.get(stem, "")
        caption, _, look = text.partition(LOOK)
        items.append({
            "id": f"fig-{stem}", "number": str(len(items) + 1), "name": stem,
            "title": f"Study {study}: {kind.replace('_', ' ')}" if study else stem,
            "caption": " ".join(caption.split()), "look": " ".join(look.split()),
            "src": "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()})
    return items


def run_facts(stack_paths: list[str], built: datetime) -> dict[str, Any]:
    """What was run (one row per study) and with which versions, from the stack files."""
    loaded = stacks.load_stacks(stack_paths)
    return {
        "studies": stacks.study_rows(loaded),
        "versions": stacks.versions(loaded),
        "stacks": stacks.stack_table(loaded),
        "built": built.strftime("%Y-%m-%d %H:%M UTC"),
        "batchflip": __version__,
        "python": platform.python_version(),
    }


def _kn(rec: Mapping[str, Any] | None) -> str:
    if not rec or "k" not in rec:
        return "n/a"
    return f"{rec['k']} / {rec['n']} ({100 * rec['value']:.1f}%)"


def repeat_table(numbers: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """The repeat control beside every condition (:mod:`batchflip.repeat`), over every
    domain: one row per (study, model, condition) with its text-change and flip counts,
    the repeat's on the same prompts and the exact McNemar p of condition vs repeat; the
    repeat's own rows first (its changes against the baseline)."""
    out = []
    for nid in sorted(numbers):
        rec = numbers[nid]
        if rec.get("section") != "repeat_control" or rec.get("domain") != "any":
            continue
        own = nid.endswith("/repeat/any/text_change_rate")
        if not (own or nid.endswith("/vs_repeat/any/text_change_vs_repeat_p")):
            continue
        stem = nid.rsplit("/", 1)[0]
        study = nid.split("/", 1)[0]
        if own:
            row = {"text": _kn(rec), "text_repeat": "", "text_p": "",
                   "flip": _kn(numbers.get(f"{stem}/flip_rate")), "flip_repeat": "",
                   "flip_p": ""}
        else:
            flip_p = numbers.get(f"{stem}/flip_vs_repeat_p", {})
            row = {"text": _kn(numbers.get(f"{stem}/text_change_rate")),
                   "text_repeat": _kn(numbers.get(f"{stem}/repeat_text_change_rate")),
                   "text_p": f"{rec['value']:.3g}",
                   "flip": _kn(numbers.get(f"{stem}/flip_rate")),
                   "flip_repeat": _kn(numbers.get(f"{stem}/repeat_flip_rate")),
                   "flip_p": f"{flip_p['value']:.3g}" if flip_p.get("value") is not None
                   else "n/a"}
        out.append({"study": study, "model": str(rec.get("model")),
                    "condition": str(rec.get("condition")), "repeat": str(rec.get("repeat")),
                    "baseline": str(rec.get("baseline")), "own": own,
                    "anchor": f"def-{nid}", **row})
    return sorted(out, key=lambda r: (r["study"], r["model"], not r["own"], r["condition"]))


def context(numbers: Mapping[str, dict[str, Any]], figures: list[str],
            captions: Mapping[str, str], stack_paths: list[str], built: datetime,
            kinds: Mapping[str, str]) -> dict[str, Any]:
    """Everything report.html.j2 needs beyond the number rows and failure summary;
    ``kinds`` maps each paper study to its config ``kind``."""
    return {
        "run": run_facts(stack_paths, built),
        "headlines": headlines.headlines(split_numbers(numbers)[0], kinds),
        "figures": figure_items(figures, captions, set(kinds)),
        "repeats": repeat_table(split_numbers(numbers)[0]),
        "published_line": published_summary(numbers),
        "counts": {"reproduced": sum(not is_published(r) for r in numbers.values()),
                   "published": sum(is_published(r) for r in numbers.values())},
    }
