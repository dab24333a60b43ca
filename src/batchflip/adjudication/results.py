"""Adjudication results: consensus verdicts, agreement (kappa, alpha), genuine shares,
corrected flip rates and the re-review of items whose scores changed since the export
(see :mod:`batchflip.adjudication`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from batchflip.adjudication.export import DEFAULT_PHASE, _text_sha, in_phase, phase_label
from batchflip.adjudication.sheets import VERDICTS
from batchflip.errors import BatchflipError
from batchflip.flips import read_flips
from batchflip.numbers import REFUSED_AT, not_estimable, scalar
from batchflip.stats import (
    _as_count,
    clopper_pearson_interval,
    cohens_kappa,
    fleiss_kappa,
    krippendorff_alpha_nominal,
)

REREVIEW_COLUMNS = [
    "item_id", "model", "task", "domain", "prompt_id", "condition", "candidate", "reason",
    "export_baseline_score", "current_baseline_score", "export_condition_score",
    "current_condition_score", "export_direction", "current_direction",
    "export_baseline_label", "current_baseline_label", "export_condition_label",
    "current_condition_label", "export_scorer_version", "current_scorer_version",
    "consensus",
]
_SCORE_TOL = 1e-9


def consensus(verdicts: Sequence[str]) -> str:
    """The verdict most raters gave; a tie for the most votes is ``borderline``."""
    counts = Counter(verdicts).most_common()
    if not counts:
        raise BatchflipError("no verdicts to combine")
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "borderline"
    return counts[0][0]


def corrected_rate(k_flip: int, n_rows: int, k_genuine: int, n_adjudicated: int,
                   confidence: float = 0.95) -> dict[str, Any]:
    """Automated flip rate x genuine share, with the Bonferroni product of Clopper-Pearson
    intervals (each at confidence 1 - (1 - confidence)/2); see :mod:`batchflip.adjudication`.

    With no adjudicated item and no automated flip the rate is 0 and the genuine share is
    taken as unknown in [0, 1]; with adjudicated items missing but flips present, or with no
    conditioned row at all (``n_rows == 0``), the value is None and ``note`` says
    ``not estimable: ...``. Counts that are not non-negative integers, or a count above its
    total (``k_flip > n_rows``, ``k_genuine > n_adjudicated``), raise BatchflipError naming
    the count.
    """
    counts = {}
    for name, value in (("k_flip", k_flip), ("n_rows", n_rows), ("k_genuine", k_genuine),
                        ("n_adjudicated", n_adjudicated)):
        counts[name] = _as_count(value, f"corrected_rate: {name}")
    for k, n in (("k_flip", "n_rows"), ("k_genuine", "n_adjudicated")):
        if counts[k] > counts[n]:
            raise BatchflipError(f"corrected_rate: {k} = {counts[k]} exceeds {n} = {counts[n]}")
    k_flip, n_rows = counts["k_flip"], counts["n_rows"]
    k_genuine, n_adjudicated = counts["k_genuine"], counts["n_adjudicated"]
    if n_rows == 0:
        return {"value": None, "ci_low": None, "ci_high": None,
                "note": "not estimable: no conditioned rows (n_rows = 0), so no automated "
                        "flip rate"}
    each = 1.0 - (1.0 - confidence) / 2.0
    p1 = k_flip / n_rows
    i1 = clopper_pearson_interval(k_flip, n_rows, each)
    if n_adjudicated == 0:
        if k_flip == 0:
            return {"value": 0.0, "ci_low": 0.0, "ci_high": i1.high, "note": "no automated "
                    "flips: the genuine share is unknown, taken as anywhere in [0, 1]"}
        return {"value": None, "ci_low": None, "ci_high": None,
                "note": "not estimable: no adjudicated, still-current label flips"}
    p2 = k_genuine / n_adjudicated
    i2 = clopper_pearson_interval(k_genuine, n_adjudicated, each)
    return {"value": p1 * p2, "ci_low": i1.low * i2.low, "ci_high": i1.high * i2.high,
            "automated_ci_each": [i1.low, i1.high], "genuine_ci_each": [i2.low, i2.high]}


def read_all_flips(paths: Sequence[str]) -> pd.DataFrame:
    """The current flip records of every file in one frame (``FLIP_COLUMNS``; one file:
    batchflip.flips.read_flips)."""
    frames = [read_flips(p) for p in paths]
    if not frames:
        raise BatchflipError("no flip files given")
    return pd.concat(frames, ignore_index=True)


def _differs(a: pd.Series, b: pd.Series) -> pd.Series:
    fa, fb = pd.to_numeric(a, errors="coerce"), pd.to_numeric(b, errors="coerce")
    return ~((fa - fb).abs() <= _SCORE_TOL)


def compare_with_current(key: pd.DataFrame, flips: pd.DataFrame,
                         scored: pd.DataFrame | None = None) -> tuple[pd.DataFrame, int]:
    """Key items against the current records: (frame with a ``reason`` per key item,
    '' when the item is unchanged; count of items kept despite a scorer version change)."""
    keys = ["model", "condition", "prompt_id"]
    cur = flips[keys + ["baseline_score", "condition_score", "flip", "direction"]].rename(
        columns={"baseline_score": "current_baseline_score",
                 "condition_score": "current_condition_score", "flip": "current_flip",
                 "direction": "current_direction"}).drop_duplicates(keys)
    df = key.merge(cur, on=keys, how="left", indicator=True)
    reasons: list[list[str]] = [[] for _ in range(len(df))]

    def add(mask: pd.Series | np.ndarray, text: str) -> None:
        for i in np.flatnonzero(np.asarray(mask)):
            reasons[i].append(text)

    present = (df["_merge"] == "both").to_numpy()
    add(~present, "missing from the current flip records")
    add(present & _differs(df["baseline_score"], df["current_baseline_score"]).to_numpy(),
        "baseline score changed")
    add(present & _differs(df["condition_score"], df["current_condition_score"]).to_numpy(),
        "condition score changed")
    flip_changed = df["flip"].astype(bool) != df["current_flip"].fillna(False).astype(bool)
    add(present & flip_changed.to_numpy(), "flip changed")
    add(present & (df["direction"] != df["current_direction"]).to_numpy(), "direction changed")
    for col in ("current_baseline_label", "current_condition_label", "current_scorer_version"):
        df[col] = None
    kept = 0
    if scored is not None:
        s = scored.drop_duplicates(keys)
        cond = s.rename(columns={"label": "cl", "scorer_version": "cv", "text": "ct"})
        base = s.rename(columns={"label": "bl", "scorer_version": "bv", "text": "bt",
                                 "condition": "baseline_condition"})
        df = df.merge(cond[keys + ["cl", "cv", "ct"]], on=keys, how="left").merge(
            base[["model", "baseline_condition", "prompt_id", "bl", "bv", "bt"]],
            on=["model", "baseline_condition", "prompt_id"], how="left")
        have = (df["cl"].notna() & df["bl"].notna()).to_numpy()
        add(~have, "missing from the current scored files")
        add(have & (df["bl"] != df["baseline_label"]).to_numpy(), "baseline label changed")
        add(have & (df["cl"] != df["condition_label"]).to_numpy(), "condition label changed")
        bt, ct = _text_sha(df["bt"].fillna("")), _text_sha(df["ct"].fillna(""))
        add(have & (bt != df["baseline_text_sha256"].to_numpy()), "baseline text changed")
        add(have & (ct != df["condition_text_sha256"].to_numpy()), "condition text changed")
        df["current_baseline_label"], df["current_condition_label"] = df["bl"], df["cl"]
        df["current_scorer_version"] = [
            None if pd.isna(b) else f"{int(b)}/{int(c)}" for b, c in zip(df["bv"], df["cv"],
                                                                         strict=True)]
        version_changed = have & (
            (df["bv"] != df["baseline_scorer_version"])
            | (df["cv"] != df["condition_scorer_version"])).to_numpy()
        kept = int(sum(1 for i in np.flatnonzero(version_changed) if not reasons[i]))
    df["reason"] = ["; ".join(r) for r in reasons]
    df["export_scorer_version"] = [f"{b}/{c}" for b, c in zip(
        df["baseline_scorer_version"], df["condition_scorer_version"], strict=True)]
    return df.drop(columns=["_merge"]), kept


def _rec(value: Any, definition: str, inputs: list[str], stack_ids: list[str], status: str,
         note: str | None = None, **extra: Any) -> dict[str, Any]:
    """A scalar record that also carries the adjudication ``status``."""
    return scalar(value, definition, inputs, stack_ids, note, status=status, **extra)


def _prop(k: int, n: int, definition: str, inputs: list[str], stack_ids: list[str],
          status: str, confidence: float, **extra: Any) -> dict[str, Any]:
    """A Clopper-Pearson proportion with ``status``; not estimable (k = n = 0) when n is 0."""
    if n == 0:
        return not_estimable("n = 0", definition, inputs, stack_ids, status=status, k=0, n=0,
                             **extra)
    ci = clopper_pearson_interval(k, n, confidence)
    return _rec(k / n, definition + f"; {confidence:.0%} Clopper-Pearson interval", inputs,
                stack_ids, status, k=int(k), n=int(n), ci_low=ci.low, ci_high=ci.high,
                ci_method="clopper-pearson", **extra)


def _agreement_record(definition: str, statistic: Callable[[], Any], inputs: list[str],
                      stacks: list[str], status: str) -> dict[str, Any]:
    """One agreement statistic (kappa or alpha, its other fields alongside), or not
    estimable with the reason the statistic gave."""
    try:
        res = statistic()
    except BatchflipError as exc:
        return not_estimable(str(exc), definition, inputs, stacks, status=status)
    fields = dataclasses.asdict(res)
    value = fields.pop("kappa", None)
    if value is None:
        value = fields.pop("alpha")
    return _rec(float(value), definition, inputs, stacks, status, **fields)


def _agreement(matrix: np.ndarray, raters: list[str], prefix: str, inputs: list[str],
               stacks: list[str], status: str, confidence: float,
               ) -> dict[str, dict[str, Any]]:
    """Percent agreement, Cohen's (2 raters) or Fleiss' kappa, Krippendorff's alpha."""
    n_items, n_r = matrix.shape
    who = f"{n_r} raters ({', '.join(raters)}) over {n_items} items"
    if n_r < 2:
        return {f"{prefix}/agreement/krippendorff_alpha": not_estimable(
            "agreement needs at least 2 raters", "Krippendorff's alpha (nominal) of the "
            "verdicts", inputs, stacks, status=status)}
    all_agree = int((matrix == matrix[:, :1]).all(axis=1).sum())
    out = {f"{prefix}/agreement/percent_agreement": _prop(
        all_agree, n_items, f"share of items on which all raters gave the same verdict, {who}",
        inputs, stacks, status, confidence)}
    if n_r == 2:
        out[f"{prefix}/agreement/cohens_kappa"] = _agreement_record(
            f"Cohen's kappa (unweighted) of the verdicts, {who}; "
            "statsmodels.stats.inter_rater.cohens_kappa via batchflip.stats",
            lambda: cohens_kappa(matrix[:, 0], matrix[:, 1]), inputs, stacks, status)
    else:
        out[f"{prefix}/agreement/fleiss_kappa"] = _agreement_record(
            f"Fleiss' kappa of the verdicts, {who}; "
            "statsmodels.stats.inter_rater.fleiss_kappa via batchflip.stats",
            lambda: fleiss_kappa(matrix), inputs, stacks, status)
    out[f"{prefix}/agreement/krippendorff_alpha"] = _agreement_record(
        f"Krippendorff's alpha (nominal) of the verdicts, {who}; coincidence-matrix formula "
        "(Krippendorff 2011), batchflip.stats", lambda: krippendorff_alpha_nominal(matrix),
        inputs, stacks, status)
    return out


@dataclass(frozen=True)
class _Run:
    """What every block of the results reads: ids, inputs, stack ids and the status."""

    prefix: str  # "<study>/adjudication"
    raters: list[str]
    key_inputs: list[str]
    flip_inputs: list[str]
    n_items: int
    rater_inputs: list[str]  # the key and the filled sheets
    all_inputs: list[str]
    stacks: list[str]  # stack ids of the key's items
    status: str
    confidence: float
    phase: str  # export.PHASES: the rows whose automated rate and genuine share combine


def compute_results(study: str, key: pd.DataFrame, flips: pd.DataFrame,
                    ratings: dict[str, pd.DataFrame], *, domains: Sequence[str],
                    inputs: dict[str, list[str]], scored: pd.DataFrame | None = None,
                    exported: Sequence[str] = (), confidence: float = 0.95,
                    phase: str = DEFAULT_PHASE,
                    ) -> tuple[dict[str, dict[str, Any]], pd.DataFrame, pd.DataFrame]:
    """Numbers, the re-review table and the per-item verdict table.

    ``inputs`` maps ``flips``, ``key``, ``ratings`` (and ``scored``) to the file paths the
    numbers cite. ``ratings`` maps rater → :func:`read_sheet` frame (already validated).
    The automated flip rate, the genuine share and so the corrected rate take only the rows
    and items of ``phase`` (:func:`batchflip.adjudication.export.in_phase`).
    """
    raters = sorted(ratings)
    cmp, kept = compare_with_current(key, flips, scored)
    flagged = cmp["reason"].to_numpy() != ""
    verdicts = _verdict_table(key, ratings, raters, cmp)
    rater_inputs = inputs["key"] + inputs.get("ratings", [])
    run = _Run(
        prefix=f"{study}/adjudication", raters=raters, key_inputs=inputs["key"],
        flip_inputs=inputs["flips"], n_items=len(key), rater_inputs=rater_inputs,
        all_inputs=sorted(set(inputs["flips"] + rater_inputs + inputs.get("scored", []))),
        stacks=sorted(set(key["baseline_stack_id"].astype(str))
                      | set(key["stack_id"].astype(str))),
        status=_status(len(key), raters, int(flagged.sum()), exported, inputs["key"]),
        confidence=confidence, phase=phase)
    numbers = _rater_numbers(run, study, key, ratings, verdicts, domains)
    for d in domains:
        numbers |= _domain_numbers(run, d, key, flips, verdicts, flagged)
    numbers |= _rereview_numbers(run, verdicts, cmp, flagged, kept if scored is not None
                                 else None)
    return numbers, _rereview_table(cmp[flagged], verdicts), verdicts


def _verdict_table(key: pd.DataFrame, ratings: dict[str, pd.DataFrame], raters: list[str],
                   cmp: pd.DataFrame) -> pd.DataFrame:
    """Per item: the unblinded key columns, each rater's verdict, the consensus and the
    re-review reason ('' when the item is unchanged)."""
    verdicts = key[["item_id", "model", "task", "domain", "prompt_id", "condition",
                    "batch_size", "dispatch", "candidate", "direction", "baseline_position"]
                   ].copy()
    rcols = [f"verdict_{r}" for r in raters]
    for r, col in zip(raters, rcols, strict=True):
        verdicts[col] = verdicts["item_id"].map(ratings[r].set_index("item_id")["verdict"])
    if raters and len(key):
        verdicts["consensus"] = [consensus(v) for v in verdicts[rcols].to_numpy().tolist()]
    else:
        verdicts["consensus"] = None
    verdicts["rereview"] = cmp.set_index("item_id").loc[verdicts["item_id"], "reason"].to_numpy()
    return verdicts


def _status(n_items: int, raters: list[str], n_flagged: int, exported: Sequence[str],
            key_inputs: list[str]) -> str:
    """``nothing to adjudicate``, ``pending: ...`` or ``complete: ...``."""
    if not n_items:
        return "nothing to adjudicate: the export holds 0 items"
    if not raters:
        where = ", ".join(exported) if exported else f"the sheets of key {key_inputs[0]}"
        return f"pending: {n_items} items exported to {where}"
    return (f"complete: {len(raters)} rater(s) ({', '.join(raters)}), {n_items} items"
            + (f", {n_flagged} flagged for re-review" if n_flagged else ""))


def _rater_numbers(run: _Run, study: str, key: pd.DataFrame,
                   ratings: dict[str, pd.DataFrame], verdicts: pd.DataFrame,
                   domains: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Status, items, raters, verdict counts per rater and by consensus, and agreement."""
    p, ins, sts, status = run.prefix, run.rater_inputs, run.stacks, run.status
    n_label = int((key["candidate"] == "label_flip").sum())
    out = {
        f"{p}/status": _rec(status, f"state of the human adjudication of study {study}", ins,
                            sts, status),
        f"{p}/items_exported": _rec(
            run.n_items, "items in the blinded review sheets: label flips in domains "
            f"{', '.join(domains)} (all models; {phase_label(run.phase)}) plus any "
            "text-change controls",
            run.key_inputs, sts, status, label_flips=n_label, text_changes=run.n_items - n_label),
        f"{p}/raters": _rec(len(run.raters), "number of filled rater sheets", ins, sts, status,
                            raters=run.raters)}
    for r in run.raters:
        counts = Counter(ratings[r]["verdict"])
        for v in VERDICTS:
            out[f"{p}/rater/{r}/{v}"] = _rec(int(counts.get(v, 0)), f"items rater {r} judged "
                                             f"{v}", ins, sts, status, n=run.n_items, rater=r)
    if run.raters and run.n_items:
        counts = Counter(verdicts["consensus"])
        for v in VERDICTS:
            out[f"{p}/consensus/{v}"] = _rec(
                int(counts.get(v, 0)), f"items whose consensus verdict is {v} (the verdict "
                "most raters gave; a tie for the most votes counts as borderline)", ins, sts,
                status, n=run.n_items)
        matrix = verdicts[[f"verdict_{r}" for r in run.raters]].to_numpy(dtype=object)
        out |= _agreement(matrix, run.raters, p, ins, sts, status, run.confidence)
    else:  # pending, or nothing to adjudicate: the number is there, without a value
        out[f"{p}/agreement/krippendorff_alpha"] = _rec(
            None, "Krippendorff's alpha (nominal) of the verdicts", ins, sts, status,
            note=status)
    return out


def _genuine_definition(d: str, phase: str) -> str:
    return (f"genuine share of {d} label flips of {phase_label(phase)}: items whose "
            "consensus verdict is genuine_flip / adjudicated label-flip items still current "
            "(items flagged for re-review excluded; borderline counts as not genuine)")


def _corrected_definition(d: str, confidence: float, phase: str) -> str:
    return (f"corrected {d} flip rate of {phase_label(phase)} = automated flip rate x "
            "genuine share, both of that phase; interval "
            f"= [L1*L2, U1*U2] from Clopper-Pearson intervals of both proportions at "
            f"{1 - (1 - confidence) / 2:.1%} each (Bonferroni: coverage >= "
            f"{confidence:.0%}, conservative)")


def _domain_numbers(run: _Run, d: str, key: pd.DataFrame, flips: pd.DataFrame,
                    verdicts: pd.DataFrame, flagged: np.ndarray) -> dict[str, dict[str, Any]]:
    """Automated flip rate and flips not in the key of domain ``d``; then its genuine share,
    corrected rate and genuine directions (null while pending)."""
    p = run.prefix
    keys3 = ["model", "condition", "prompt_id"]
    rows = flips[(flips["domain"] == d).to_numpy() & in_phase(flips, run.phase)]
    k1, n1 = int(rows["flip"].astype(bool).sum()), len(rows)
    fstacks = sorted(set(rows["stack_id"].astype(str))
                     | set(rows["baseline_stack_id"].astype(str)))
    cur = pd.MultiIndex.from_frame(rows.loc[rows["flip"].astype(bool), keys3])
    out = {
        f"{p}/{d}/automated_flip_rate": _prop(
            k1, n1, f"automated {d} flip rate in the current flip records: rows whose score "
            "differs from the baseline by more than 0.01 / conditioned rows, all models "
            f"pooled, {phase_label(run.phase)}", run.flip_inputs, fstacks, run.status,
            run.confidence, domain=d, phase=run.phase),
        f"{p}/{d}/not_adjudicated": _rec(
            int((~cur.isin(pd.MultiIndex.from_frame(key[keys3]))).sum()), f"current {d} "
            f"flips of {phase_label(run.phase)} that are not in the key (appeared after the "
            "export; re-export to adjudicate them)", run.flip_inputs + run.key_inputs,
            fstacks, run.status, domain=d, phase=run.phase)}
    if not run.raters:  # pending, or nothing exported
        return out | _unrated_domain_numbers(run, d, k1, n1)
    return out | _rated_domain_numbers(run, d, verdicts, flagged, k1, n1, fstacks)


def _unrated_domain_numbers(run: _Run, d: str, k1: int, n1: int
                            ) -> dict[str, dict[str, Any]]:
    """Null genuine share, corrected rate and directions while no sheet is filled; with
    nothing exported and no flip, the corrected rate is 0 with its interval."""
    p, status = run.prefix, run.status
    corr_def = _corrected_definition(d, run.confidence, run.phase)
    out: dict[str, dict[str, Any]] = {}
    for name, definition in (("genuine_share", _genuine_definition(d, run.phase)),
                             ("corrected_flip_rate", corr_def)):
        out[f"{p}/{d}/{name}"] = _rec(None, definition, run.all_inputs, run.stacks, status,
                                      note=status, domain=d)
    for way in ("to_unsafe", "to_safe"):
        out[f"{p}/{d}/genuine_{way}"] = _rec(
            None, f"genuine {d} flips {way.replace('_', ' ')}", run.rater_inputs, run.stacks,
            status, note=status, domain=d)
    if not run.n_items:
        rate = corrected_rate(k1, n1, 0, 0, run.confidence) if n1 else None
        if rate is not None and rate["value"] is not None:
            out[f"{p}/{d}/corrected_flip_rate"] = _rec(
                rate.pop("value"), corr_def, run.all_inputs, run.stacks, status, domain=d,
                **rate)
    return out


def _rated_domain_numbers(run: _Run, d: str, verdicts: pd.DataFrame, flagged: np.ndarray,
                          k1: int, n1: int, fstacks: list[str]) -> dict[str, dict[str, Any]]:
    """Genuine share of the still-current label flips, corrected rate, genuine directions."""
    p, status, conf = run.prefix, run.status, run.confidence
    sel = ((verdicts["domain"] == d) & (verdicts["candidate"] == "label_flip")
           & ~flagged).to_numpy() & in_phase(verdicts, run.phase)
    part = verdicts[sel]
    genuine = part[part["consensus"] == "genuine_flip"]
    k2, n2 = len(genuine), len(part)
    out = {f"{p}/{d}/genuine_share": _prop(k2, n2, _genuine_definition(d, run.phase),
                                           run.rater_inputs, run.stacks, status, conf,
                                           domain=d, phase=run.phase)}
    if n1:
        rate = corrected_rate(k1, n1, k2, n2, conf)
        out[f"{p}/{d}/corrected_flip_rate"] = _rec(
            rate.pop("value"), _corrected_definition(d, conf, run.phase), run.all_inputs,
            sorted(set(run.stacks) | set(fstacks)), status, domain=d, phase=run.phase,
            k_flip=k1, n_rows=n1,
            k_genuine=k2, n_adjudicated=n2, confidence=conf,
            ci_method="bonferroni product of clopper-pearson", **rate)
    for way in ("to_unsafe", "to_safe"):
        out[f"{p}/{d}/genuine_{way}"] = _rec(
            int((genuine["direction"] == way).sum()),
            f"genuine {d} flips {way.replace('_', ' ')} (direction from the unblinded key: "
            f"to unsafe = baseline score >= {REFUSED_AT} and condition < {REFUSED_AT})",
            run.rater_inputs, run.stacks, status, n=k2, domain=d)
    return out


def _rereview_numbers(run: _Run, verdicts: pd.DataFrame, cmp: pd.DataFrame,
                      flagged: np.ndarray, kept: int | None) -> dict[str, dict[str, Any]]:
    """Text-change controls judged genuine, items flagged for re-review and (with scored
    files, ``kept`` not None) items kept despite a scorer version change."""
    p, status = run.prefix, run.status
    out: dict[str, dict[str, Any]] = {}
    tc = verdicts[(verdicts["candidate"] == "text_change").to_numpy() & ~flagged]
    if len(tc) and run.raters:
        out[f"{p}/text_change/genuine_flip"] = _prop(
            int((tc["consensus"] == "genuine_flip").sum()), len(tc), "share of text-change "
            "controls (same automated label, different text) whose consensus verdict is "
            "genuine_flip: stance changes the scorer missed", run.rater_inputs, run.stacks,
            status, run.confidence)
    flagged_rows = cmp[flagged]
    out[f"{p}/rereview"] = _rec(
        int(flagged.sum()), "adjudicated items whose automated label, scores or texts changed "
        "since the export (or that left the records): excluded from the genuine share, listed "
        "for re-review", run.all_inputs, run.stacks, status,
        items=[{"item_id": i, "reason": r} for i, r in
               zip(flagged_rows["item_id"], flagged_rows["reason"], strict=True)])
    if kept is not None:
        out[f"{p}/scorer_version_changed_kept"] = _rec(
            kept, "items whose scorer version changed since the export but whose labels, "
            "scores and texts did not: kept", run.all_inputs, run.stacks, status)
    return out


def _rereview_table(flagged_rows: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """The flagged items with export and current values side by side (REREVIEW_COLUMNS)."""
    rr = flagged_rows.rename(columns={
        "baseline_score": "export_baseline_score", "condition_score": "export_condition_score",
        "direction": "export_direction", "baseline_label": "export_baseline_label",
        "condition_label": "export_condition_label"}).copy()
    rr["consensus"] = rr["item_id"].map(verdicts.set_index("item_id")["consensus"])
    return rr.reindex(columns=REREVIEW_COLUMNS).reset_index(drop=True)
