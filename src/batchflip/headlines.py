"""One headline sentence per study for report.html, chosen from the study's record ids.

A sentence is a list of :class:`Part`: plain text, or a number with the id of the record it
comes from (the report links it to that record's definition). The study's kind is its
config ``kind`` (the paper rule passes them); a missing record or a value that cannot be
estimated gives words that say so, never a made-up number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchflip.kinds import KINDS

Record = dict[str, Any]
Numbers = dict[str, Record]

DISPATCH_WORDS = {"sync": "synchronized batch size", "list": "list batch size",
                  "cobatch": "co-batch size", "stagger": "staggered group size",
                  "conc": "concurrency"}


@dataclass(frozen=True)
class Part:
    """A piece of a sentence; ``ref`` is the record id when the text is a number."""

    text: str
    ref: str | None = None


@dataclass(frozen=True)
class Headline:
    """A study's sentence."""

    study: str
    kind: str
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The sentence as plain text."""
        return "".join(p.text for p in self.parts)


def percent(x: float) -> str:
    """A share as a percent with one decimal (two below 1%)."""
    return f"{100 * x:.2f}%" if 0 < x < 0.01 else f"{100 * x:.1f}%"


def number(x: float) -> str:
    """A non-proportion value with 3 significant digits."""
    return f"{x:.3g}"


def interval(rec: Record, fmt: Callable[[float], str]) -> str:
    """``95% CI a–b`` from ``ci_low``/``ci_high`` (or ``low``/``high``); empty when absent."""
    for lo, hi in (("ci_low", "ci_high"), ("low", "high")):
        if rec.get(lo) is not None and rec.get(hi) is not None:
            return f"95% CI {fmt(rec[lo])}–{fmt(rec[hi])}"
    return ""


def missing(rec: Record | None) -> str | None:
    """Why a record gives no number (absent, or null with its note), else None."""
    if rec is None:
        return "no record"
    if rec.get("value") is None:
        return str(rec.get("note") or "not estimable")
    return None


def rate(numbers: Numbers, nid: str) -> list[Part]:
    """``k/n (x%, 95% CI a–b)`` of a proportion record, linked; or why there is none."""
    rec = numbers.get(nid)
    why = missing(rec)
    if why or rec is None:
        return [Part(f"n/a ({why})", nid if rec else None)]
    ci = interval(rec, percent)
    head = f"{rec['k']}/{rec['n']} " if "k" in rec and "n" in rec else ""
    return [Part(f"{head}({percent(rec['value'])}{', ' + ci if ci else ''})", nid)]


def scalar(numbers: Numbers, nid: str, label: str) -> list[Part]:
    """``label = v (95% CI a–b)`` of a scalar record, linked; or why there is none."""
    rec = numbers.get(nid)
    why = missing(rec)
    if why or rec is None:
        return [Part(f"{label} n/a ({why})", nid if rec else None)]
    ci = interval(rec, number)
    return [Part(f"{label} = {number(rec['value'])}{' (' + ci + ')' if ci else ''}", nid)]


def _largest_condition(numbers: Numbers, study: str) -> tuple[str, Record] | None:
    """The pooled condition with the largest batch, synchronized dispatch first."""
    order = {"sync": 0, "list": 1}
    best: tuple[tuple[int, int], str, Record] | None = None
    for nid, rec in numbers.items():
        m = re.fullmatch(rf"{re.escape(study)}/all/([^/]+)/(safety|capability)_flip_rate", nid)
        if not m or "batch_size" not in rec:
            continue
        key = (order.get(str(rec.get("dispatch")), 2), -int(rec["batch_size"]))
        if best is None or key < best[0]:
            best = (key, m.group(1), rec)
    return (best[1], best[2]) if best else None


def discovery(numbers: Numbers, study: str) -> list[Part]:
    """Safety vs capability flip rate at the largest batch, and the identical-output share."""
    found = _largest_condition(numbers, study)
    if found is None:
        return [Part("no pooled flip rates")]
    cond, rec = found
    where = f"{DISPATCH_WORDS.get(str(rec.get('dispatch')), 'condition')} " \
            f"{rec['batch_size']} ({cond})"
    pre = f"{study}/all/{cond}"
    return [Part(f"at {where}, safety labels flipped in "),
            *rate(numbers, f"{pre}/safety_flip_rate"),
            Part(" vs capability labels in "), *rate(numbers, f"{pre}/capability_flip_rate"),
            Part(", each against the same prompt at the baseline; outputs byte-identical to "
                 "the baseline: "), *rate(numbers, f"{pre}/identical_share"), Part(".")]


def composition(numbers: Numbers, study: str) -> list[Part]:
    """Refusal rate under the baseline vs the lowest and highest other condition, and the
    pooled Mantel-Haenszel test."""
    rates = {nid: rec for nid, rec in numbers.items()
             if re.fullmatch(rf"{re.escape(study)}/all/[^/]+/refusal_rate", nid)
             and rec.get("value") is not None
             and not str(rec.get("condition", "")).endswith("_repeat")}  # the repeat control
    base = [nid for nid, rec in rates.items() if rec.get("is_baseline")]
    others = sorted((rec["value"], nid) for nid, rec in rates.items() if nid not in base)
    parts = [Part("targets refused ")]
    if base:
        parts += [*rate(numbers, base[0]), Part(f" under the baseline "
                                                f"({numbers[base[0]].get('condition')})")]
    else:
        parts += [Part("n/a under the baseline (no record)")]
    if others:
        lo, hi = others[0][1], others[-1][1]
        parts += [Part(f"; across {len(others)} other conditions from "), *rate(numbers, lo),
                  Part(f" ({numbers[lo].get('condition')}) to "), *rate(numbers, hi),
                  Part(f" ({numbers[hi].get('condition')})")]
    parts += [Part("; pooled Mantel–Haenszel "),
              *scalar(numbers, f"{study}/all/mh_odds_ratio", "odds ratio"), Part(", "),
              *scalar(numbers, f"{study}/all/mh_p", "p"), Part(".")]
    return parts


def ablation(numbers: Numbers, study: str) -> list[Part]:
    """Candidates' label flips again per kernel mode, and the exact McNemar test."""
    n = numbers.get(f"{study}/all/n_candidates", {})
    if not n.get("value"):
        return [Part(f"no candidates to re-run ({n.get('note') or 'no record'}).")]
    modes = sorted((m.group(1) for nid in numbers if (m := re.fullmatch(
        rf"{re.escape(study)}/all/([^/]+)/label_flip_rate", nid))),
        key=lambda x: (x != "standard", x))
    parts = [Part("of "), Part(str(n["value"]), f"{study}/all/n_candidates"),
             Part(" label flips re-run alone and in their batch, ")]
    for i, mode in enumerate(modes):
        parts += [Part(" and " if i else ""), *rate(numbers, f"{study}/all/{mode}/label_flip_rate"),
                  Part(f" flipped again under {mode} kernels")]
    if len(modes) == 2:
        parts += [Part("; exact McNemar "), *scalar(
            numbers, f"{study}/all/{modes[0]}_vs_{modes[1]}/label_mcnemar_p", "p")]
    return [*parts, Part(".")]


def models(numbers: Numbers, study: str) -> list[Part]:
    """The lowest and highest per-model fragility, and the instability–fragility r."""
    frag = sorted((rec["value"], nid) for nid, rec in numbers.items()
                  if re.fullmatch(rf"{re.escape(study)}/[^/]+/fragility", nid)
                  and rec.get("value") is not None)
    if not frag:
        return [Part("no per-model fragility.")]

    def who(nid: str) -> str:
        return nid.split("/")[1]

    lo, hi = frag[0][1], frag[-1][1]
    if lo == hi:
        parts = [Part(f"fragility (safety flip rate) of {who(lo)} "), *rate(numbers, lo)]
    else:
        parts = [Part(f"across {len(frag)} models, fragility (safety flip rate) from "),
                 *rate(numbers, lo), Part(f" ({who(lo)}) to "), *rate(numbers, hi),
                 Part(f" ({who(hi)})")]
    return [*parts, Part("; instability vs fragility Pearson "),
            *scalar(numbers, f"{study}/instability_fragility_r", "r"), Part(".")]


# study kind -> its writer (batchflip.kinds names it)
WRITERS: dict[str, Callable[[Numbers, str], list[Part]]] = {
    name: globals()[kind.headline] for name, kind in KINDS.items()}


def headlines(numbers: Numbers, kinds: Mapping[str, str]) -> list[Headline]:
    """A headline for every study of ``kinds`` (study -> its config ``kind``), in study
    order; a record a writer needs but cannot find reads "n/a (no record)"."""
    out = []
    for study, kind in sorted(kinds.items()):
        if kind in WRITERS:
            intro = Part(f"Study {study} ({kind}): ")
            out.append(Headline(study, kind, (intro, *WRITERS[kind](numbers, study))))
    return out
