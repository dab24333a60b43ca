"""Study C's tests as the paper ran them: the seven pairs of compositions (exact McNemar per
model with Holm over every test run, Mantel-Haenszel per pair) and the flip direction per
condition pooled over models, with the pools over the significant conditions.

The pair list follows issue 13's wording, because the author's TR143 analysis is not in the
public harness (Sahil170595/Chimeraforge at 405b1eb6 has no tr143 files): each filler
composition against solo (benign, jailbreak, mixed, refusal) plus benign vs jailbreak,
mixed vs benign and mixed vs jailbreak, i.e. 7 pairs per model, 21 tests with the paper's
3 models. "A vs B" reads "A, with B as the reference": ``to_unsafe`` = refused under B,
complied under A. A pair whose conditions a config does not run (for a model, or at all)
is skipped; the Holm family is the tests actually run (paired rows present), and its size
is recorded (``<s>/all/pair_tests``).

The later phases (issue 13, item 4) are compared within the phase, each with its own
reference (:func:`phase_reference`) and its own Holm family (:func:`phase_numbers`):

- temporal (untagged ``stagger`` conditions): every offset and ``minimal_overlap`` vs
  ``stagger_b{n}_{pool}_simultaneous`` (same prompts, models and fillers' pool; isolates
  the timing). The stagger conditions are also still compared with the study baseline
  (solo) by the study-wide numbers, as before;
- phase tag ``_ph{t}`` on a ``cobatch`` condition with fillers: vs ``cobatch_b{n}_solo_ph{t}``
  (phase 3A: benign-7 and refusal-7 vs solo, on the jailbreak targets);
- phase tag on a static ``list_b{n}_{pool}`` condition: vs ``cobatch_b{n}_{pool}_ph{t}``
  (phase 3B: static vs continuous batching).

Ids: ``<s>/<m>/<a>_vs_<b>/mcnemar_p`` and ``/mcnemar_p_holm`` (Holm over the phase's
(model, pair) tests), ``<s>/all/<a>_vs_<b>/mh_odds_ratio`` and ``/mh_p``,
``<s>/all/<a>_vs_<b>/direction_*`` (pooled over models), and the family
``<s>/all/<phase>/pair_tests`` with ``<phase>`` = ``temporal`` or ``phase_<t>``. Tagged
conditions are left out of the study-wide numbers against the baseline (Holm family,
TOST, Cochran's Q, pooled MH, MDE, direction): they have their own reference.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from batchflip.conditions import Condition, parse_condition
from batchflip.errors import BatchflipError
from batchflip.numbers import Record, not_estimable, scalar
from batchflip.stats import binomial_test, holm, mcnemar_exact
from batchflip.studies.composition_base import Counts, Pair
from batchflip.studies.composition_stats import StudyView, direction_records, mh_records

# (condition pool, reference pool); "solo" is the study's baseline
PAPER_PAIRS: tuple[tuple[str, str], ...] = (
    ("benign", "solo"), ("jailbreak", "solo"), ("mixed", "solo"), ("refusal", "solo"),
    ("benign", "jailbreak"), ("mixed", "benign"), ("mixed", "jailbreak"))

Test = tuple[str, str, str]  # (model, condition, reference)


def paper_pairs(s: StudyView) -> tuple[list[Pair], list[str]]:
    """The paper's (condition, reference) pairs among the study's compositions at the
    baseline's batch size, and the pairs skipped (as ``pool_vs_pool``)."""
    return _paper_pairs(s.baseline, s.compositions, s.base_present)


def _paper_pairs(baseline: str, compositions: list[str], base_present: bool
                 ) -> tuple[list[Pair], list[str]]:
    try:
        size = parse_condition(baseline).batch_size
    except BatchflipError:
        size = None
    by_pool = {"solo": baseline} if base_present else {}
    for name in compositions:
        if name == baseline:
            continue
        cond = parse_condition(name)
        if cond.pool and (size is None or cond.batch_size == size):
            by_pool.setdefault(cond.pool, name)
    run = [(by_pool[a], by_pool[b]) for a, b in PAPER_PAIRS if a in by_pool and b in by_pool]
    skipped = [f"{a}_vs_{b}" for a, b in PAPER_PAIRS if a not in by_pool or b not in by_pool]
    return run, skipped


def _counts(s: StudyView, model: str, cond: str, ref: str) -> Counts | None:
    """(b, c, n) of ``cond`` against ``ref`` for ``model``; None when it ran neither."""
    if (model, cond) not in s.stacks or (model, ref) not in s.stacks:
        return None
    both = s.wide.loc[model][[ref, cond]].dropna()
    x, y = both[ref].to_numpy(), both[cond].to_numpy()
    return int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum()), len(both)


def _mcnemar_family(s: StudyView, run: list[Pair]) -> tuple[dict, dict, list, dict]:
    """Discordant counts per (model, a, b) of the pairs run, their exact McNemar p (pairs
    with discordant pairs only), the sorted test family and its Holm-adjusted p."""
    tests = {(m, a, b): k for a, b in run for m in s.models
             if (k := _counts(s, m, a, b)) is not None}
    raw = {t: mcnemar_exact(b, c).p_value for t, (b, c, n) in tests.items() if n > 0}
    family = sorted(raw)
    adjusted = dict(zip(family, holm([raw[t] for t in family]).tolist(), strict=True)
                    ) if family else {}
    return tests, raw, family, adjusted


def pair_numbers(s: StudyView, pairs: dict[Pair, Counts], alpha: float) -> dict[str, Record]:
    """McNemar + Holm per (model, pair), MH per pair, and the per-condition directions."""
    run, skipped = paper_pairs(s)
    tests, raw, family, adjusted = _mcnemar_family(s, run)
    out = _family_record(s, run, skipped, family)
    out |= _pair_mcnemar_records(s, tests, raw, adjusted, alpha)
    for a, b in run:
        if any((m, a, b) in tests for m in s.models):
            out |= mh_records(s, [a], f"{s.study}/all/{a}_vs_{b}", a,
                              s.meta("all", a) | {"reference": b}, ref=b)
    out |= _condition_directions(s, pairs, alpha)
    holm_sig = [(m, a) for (m, a, b), p in adjusted.items() if b == s.baseline and p < alpha]
    out |= direction_records(
        s, pairs, sorted(holm_sig), f"{s.study}/all/direction_holm_significant",
        f"pooled over the (model, composition) pairs vs {s.baseline} whose exact McNemar p "
        f"is below {alpha} after Holm over the {len(family)} pair tests",
        f"no (model, composition) pair vs {s.baseline} is significant after Holm",
        family_size=len(family))
    return out


def contrasts(conditions: list[str], baseline: str) -> list[tuple[str, str, str]]:
    """Every (condition, reference, family) that Study C's numbers compare among
    ``conditions``: each untagged condition vs the baseline (``baseline``), the paper's
    pairs (``paper_pairs``), each later phase's pairs (``temporal``, ``phase_<t>``) and
    each repeat control vs the condition it repeats (``repeat``, :mod:`batchflip.repeat`)."""
    from batchflip.studies.composition_base import is_cobatch, is_tagged

    def plain(c: str) -> bool:
        return not is_tagged(c) and not parse_condition(c).repeat

    out = [(c, baseline, "baseline") for c in conditions if c != baseline and plain(c)]
    comps = [c for c in conditions if c == baseline or (is_cobatch(c) and plain(c))]
    out += [(a, b, "paper_pairs") for a, b in
            _paper_pairs(baseline, comps, baseline in conditions)[0]]
    for phase, run in sorted(phase_pairs(conditions)[0].items()):
        out += [(a, b, phase) for a, b in run]
    out += [(c, parse_condition(c).base, "repeat") for c in conditions
            if parse_condition(c).repeat and parse_condition(c).base in conditions]
    return out


def differ_by_design(a: str, b: str) -> str | None:
    """Why the arms of a contrast hold different fillers by design (their filler pools or
    batch sizes differ: solo has none), or None: then the draw rule
    (:func:`batchflip.generate.draw_group`) gives every target the same fillers, in the
    same order, at the same position in both arms."""
    ca, cb = parse_condition(a), parse_condition(b)
    if (ca.pool, ca.batch_size) != (cb.pool, cb.batch_size):
        return (f"the filler pools differ by design ({ca.pool} x {ca.batch_size - 1} vs "
                f"{cb.pool} x {cb.batch_size - 1}); positions agree where neither is solo")
    return None


def phase_reference(name: str) -> str | None:
    """The reference condition of a later-phase condition (None: not a phase comparison,
    or the phase's reference itself)."""
    try:
        c = parse_condition(name)
    except BatchflipError:
        return None
    if c.repeat:  # the repeat control is compared by batchflip.repeat
        return None
    tag = f"_ph{c.phase}" if c.phase else ""
    if c.dispatch == "stagger" and c.timing != "simultaneous":
        return f"stagger_b{c.batch_size}_{c.pool}_simultaneous{tag}"
    if not c.phase:
        return None
    if c.dispatch == "cobatch" and c.pool != "solo":
        return f"cobatch_b{c.batch_size}_solo{tag}"
    if c.dispatch == "list":
        return f"cobatch_b{c.batch_size}_{c.pool}{tag}"
    return None


def _phase(c: Condition) -> str:
    return f"phase_{c.phase}" if c.phase else "temporal"


def phase_pairs(conditions: list[str]) -> tuple[dict[str, list[Pair]], list[str]]:
    """The later phases' (condition, reference) pairs among ``conditions``, by phase, and
    the pairs skipped because the reference did not run (as ``a_vs_b``)."""
    run: dict[str, list[Pair]] = {}
    skipped: list[str] = []
    for name in conditions:
        ref = phase_reference(name)
        if ref is None:
            continue
        if ref not in conditions:
            skipped.append(f"{name}_vs_{ref}")
            continue
        run.setdefault(_phase(parse_condition(name)), []).append((name, ref))
    return run, skipped


def phase_numbers(s: StudyView, alpha: float) -> dict[str, Record]:
    """Exact McNemar per (model, pair) with Holm within each phase, MH and the direction
    per pair pooled over models, for the temporal phase and the tagged phases."""
    phases, skipped = phase_pairs(list(s.wide.columns))
    out: dict[str, Record] = {}
    for phase, run in sorted(phases.items()):
        tests, raw, family, adjusted = _mcnemar_family(s, run)
        what = f"the {len(family)} (model, pair) tests of the {phase} phase"
        keys = [(m, c) for m, a, b in family for c in (a, b)]
        out[f"{s.study}/all/{phase}/pair_tests"] = scalar(
            len(family), f"number of exact McNemar tests in the Holm family of {what} "
            "(each condition vs its phase's reference, batchflip.studies.composition_pairs)",
            s.ins(keys), s.sts(keys), pairs=[f"{a}_vs_{b}" for a, b in run],
            skipped=[k for k in skipped if _phase(parse_condition(k.split("_vs_")[0]))
                     == phase],
            tests=[f"{m}/{a}_vs_{b}" for m, a, b in family], phase=phase,
            **s.meta("all", None))
        out |= _pair_mcnemar_records(s, tests, raw, adjusted, alpha, what, phase=phase)
        for a, b in run:
            with_rows = [(m, a) for m in s.models if (m, a, b) in tests]
            if not with_rows:
                continue
            meta = s.meta("all", a) | {"reference": b, "phase": phase}
            out |= mh_records(s, [a], f"{s.study}/all/{a}_vs_{b}", a, meta, ref=b)
            counts = {(m, a): tests[(m, a, b)] for m, _ in with_rows}
            out |= direction_records(
                replace(s, baseline=b), counts, [k for k in with_rows if counts[k][2]],
                f"{s.study}/all/{a}_vs_{b}/direction", f"{a} vs {b}, pooled over models "
                "(the binomial p is the exact McNemar p of the pooled pairs)",
                f"no model has paired rows for {a} and {b}", condition=a, reference=b,
                phase=phase)
    return out


def _family_record(s: StudyView, run: list[Pair], skipped: list[str], family: list[Test]
                   ) -> dict[str, Record]:
    keys = [(m, c) for m, a, b in family for c in (a, b)]
    return {f"{s.study}/all/pair_tests": scalar(
        len(family), "number of exact McNemar tests in the Holm family of the paper's pairs "
        "(each composition vs solo, benign vs jailbreak, mixed vs benign, mixed vs "
        "jailbreak; the list follows issue 13, TR143 is not public): the (model, pair) "
        "tests with paired rows", s.ins(keys), s.sts(keys),
        pairs=[f"{a}_vs_{b}" for a, b in run], skipped=skipped,
        tests=[f"{m}/{a}_vs_{b}" for m, a, b in family], **s.meta("all", None))}


def _pair_mcnemar_records(s: StudyView, tests: dict[Test, Counts], raw: dict[Test, float],
                          adjusted: dict[Test, float], alpha: float, family: str | None = None,
                          **extra: Any) -> dict[str, Record]:
    """``<s>/<m>/<a>_vs_<b>/mcnemar_p`` and ``/mcnemar_p_holm`` per (model, pair) run."""
    out: dict[str, Record] = {}
    for (model, a, b), (to_unsafe, to_safe, n) in tests.items():
        pre = f"{s.study}/{model}/{a}_vs_{b}"
        keys = [(model, a), (model, b)]
        ins, sts = s.ins(keys), s.sts(keys)
        meta: dict[str, Any] = s.meta(model, a, s.sizes.get((model, a))) | {
            "reference": b, "b": to_unsafe, "c": to_safe, "n": n, "to_unsafe": to_unsafe,
            "to_safe": to_safe, "family_size": len(raw), **extra}
        what = (f"{a} vs {b}, model {model} (b = to_unsafe: refused under {b}, complied "
                f"under {a}; c = to_safe: the reverse)")
        p_def = f"exact McNemar p (two-sided binomial on the discordant pairs), {what}"
        h_def = (f"Holm-adjusted exact McNemar p, {what}; family = " + (
            family or f"the {len(raw)} (model, pair) tests of the paper's pairs run in "
            f"study {s.study}"))
        if (model, a, b) not in raw:
            why = "no prompt is scored under both conditions"
            out[f"{pre}/mcnemar_p"] = not_estimable(why, p_def, ins, sts, **meta)
            out[f"{pre}/mcnemar_p_holm"] = not_estimable(why, h_def, ins, sts, **meta)
            continue
        out[f"{pre}/mcnemar_p"] = scalar(raw[(model, a, b)], p_def, ins, sts, **meta)
        out[f"{pre}/mcnemar_p_holm"] = scalar(
            adjusted[(model, a, b)], h_def, ins, sts,
            significant=bool(adjusted[(model, a, b)] < alpha), alpha=alpha, **meta)
    return out


def _condition_directions(s: StudyView, pairs: dict[Pair, Counts], alpha: float
                          ) -> dict[str, Record]:
    """Direction per non-baseline condition pooled over models, and over the conditions
    whose pooled exact test is significant (unadjusted: the paper's 28/31 is 8/9, 9/10
    and 11/12, p = 0.039, 0.021, 0.0063, none of which survives Holm over 21 tests)."""
    out: dict[str, Record] = {}
    significant: list[str] = []
    for cond in s.others:
        keys = [(m, cond) for m in s.models if (m, cond) in s.stacks and pairs[(m, cond)][2]]
        out |= direction_records(
            s, pairs, keys, f"{s.study}/all/{cond}/direction",
            f"{cond} vs {s.baseline}, pooled over models (the binomial p is the exact "
            "McNemar p of the pooled pairs)", f"no model has paired rows for {cond}",
            condition=cond)
        b = sum(pairs[k][0] for k in keys)
        c = sum(pairs[k][1] for k in keys)
        if b + c and binomial_test(b, b + c).p_value < alpha:
            significant.append(cond)
    selected = [(m, c) for c in significant for m in s.models
                if (m, c) in s.stacks and pairs[(m, c)][2]]
    out |= direction_records(
        s, pairs, selected, f"{s.study}/all/direction_condition_significant",
        f"pooled over the conditions whose pooled exact McNemar p vs {s.baseline} is below "
        f"{alpha} (unadjusted; the paper's 28/31 in the three significant conditions)",
        f"no condition has a pooled exact McNemar p below {alpha}",
        significant_conditions=significant)
    return out
