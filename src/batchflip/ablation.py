"""Study D: kernel-mode ablation of a discovery study's label flips.

The candidates are the conditioned rows of a *source* discovery study whose label flipped
(``flip == True`` in ``results/flips/{source}/{model}.parquet``). Each is re-run twice under
one kernel mode (a wildcard: ``standard`` or ``batch_invariant``), with the source's engine,
seed, dtype, max tokens, threads and prompt format (system prompt included):

- *alone*: the candidate's prompt as a group of one (``{dispatch}_b1``; ``cobatch_b1_solo``
  for a composition candidate);
- *in group*: inside its original group, reconstructed exactly from the generation records
  of its condition (``results/generations/{source}/{model}/{condition}.parquet``): every
  member of the candidate's ``group_id`` with its recorded position, role and prompt id,
  fillers included, under the recorded dispatch and batch size. Nothing is re-derived from
  prompt order.

Per candidate and mode: *label flip* = the two scores differ by more than 0.01 (the flips
stage's rule), *text change* = the two responses are not byte-identical. Responses are
scored by ``batchflip.scoring`` with the workflow's scorer versions at the numbers step, so
a scorer change re-scores and never regenerates.

Actions of ``batchflip ablation`` (the rules in ``workflow/rules/ablation.smk`` call them)::

    candidates --flips F --generations G... --baseline sync_b1 [--dispatch-baseline list=list_b1]
               --out results/ablation/{study}/{model}/candidates.parquet
    generate   --candidates C --battery B --params JSON --model-dir D --kernel-mode M
               --out results/ablation/{study}/{model}/{M}.parquet --stack-out ....stack.json
    numbers    --study d --source a --candidates C... --runs R... --stacks S... --battery B
               --versions JSON --out results/numbers/{study}.json --rows-out rows.parquet
    figure     --numbers N --png P --pdf Q

Numbers (``<s>`` study, ``<m>`` model or ``all`` pooled over models, ``<k>`` kernel mode):

- ``<s>/<m>/n_candidates``: candidate rows (``note`` "no candidates ..." when 0);
- ``<s>/<m>/<k>/label_flip_rate`` and ``/text_change_rate``: Wilson 95% proportions over
  the candidates (``value: null``, ``n: 0`` and a note when there are none);
  ``/label_to_unsafe``, ``/label_to_safe``: counts of flips by direction (alone → group);
  ``/group_reproduces_source``: share of candidates whose in-group text is byte-identical
  to the source condition's text, ``/alone_reproduces_baseline``: alone text identical to
  the source baseline's (how well the rerun reproduces the source stack);
- ``<s>/<m>/<k1>_vs_<k2>/label_mcnemar_p`` and ``/text_mcnemar_p``: exact McNemar on the
  paired per-candidate indicators (``b`` = only under ``k1``, ``c`` = only under ``k2``);
- ``<s>/all/<k>/by_<facet>/<level>/label_flip_rate`` and ``/text_change_rate`` for the
  facets domain, task, dispatch and direction (the source flip's direction).

Failed requests (``batchflip.failures``; a server engine's reruns can fail) are never
answers: the flips they come from already leave failed rows out, so a failure never becomes
a candidate; a (candidate, mode) whose alone or group rerun failed is marked ``failed`` in
the compared rows and left out of every rate and McNemar pair. ``<s>/<m>/<k>/error_count``
and ``/error_share`` count the failed reruns per run file, and a share above
``--max-error-share`` (config ``errors.max_share``) fails the numbers job, writing nothing.

Generation timings are kept in the run records, not in the numbers (numbers reproduce byte
for byte on a rerun). Reruns are checkpointed execution by execution
(batchflip.checkpoint): a killed job resumes without running a finished one again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.checkpoint import Checkpoint
from batchflip.cli import figure_arguments
from batchflip.conditions import Condition, parse_condition
from batchflip.engines import Engine, Group, Member, Result
from batchflip.errors import BatchflipError, InputError
from batchflip.failures import DEFAULT_MAX_SHARE, error_numbers, failed_mask
from batchflip.flips import FLIP_TOL
from batchflip.gpu_lease import lease_for
from batchflip.io import write_json, write_parquet
from batchflip.numbers import (
    REFUSED_AT,
    Record,
    direction,
    load,
    not_estimable,
    proportion_or_none,
    scalar,
)
from batchflip.records import BATTERY_COLUMNS, read_records, require_columns
from batchflip.stats import mcnemar_exact, paired_counts

FLIP_NEEDED = ["model", "task", "domain", "prompt_id", "condition", "batch_size", "dispatch",
               "baseline_score", "condition_score", "flip", "direction", "stack_id"]
GEN_NEEDED = ["study", "model", "condition", "batch_size", "dispatch", "group_id", "position",
              "role", "prompt_id", "text", "stack_id"]
CANDIDATE_COLUMNS = [
    "candidate_id", "source_study", "model", "task", "domain", "prompt_id", "condition",
    "dispatch", "batch_size", "group_id", "position", "group_size", "members", "direction",
    "baseline_score", "condition_score", "source_text", "baseline_condition", "baseline_text",
    "source_stack_id",
]
RUN_COLUMNS = [
    "study", "source_study", "model", "kernel_mode", "candidate_id", "run", "condition",
    "batch_size", "dispatch", "group_id", "position", "group_size", "role", "prompt_id",
    "text", "token_ids", "finish_reason", "n_tokens", "t_submit", "t_first", "t_done",
    "seed", "stack_id", "error",
]
RUNS = ("alone", "group")
FACETS = ("domain", "task", "dispatch", "direction")
MODES = ("standard", "batch_invariant")
# which source rows Study D reruns (config key `candidates`)
CANDIDATE_SETS = ("label_flips", "text_changes")


# --------------------------------------------------------------------------- candidates


def condition_of(gen: pd.DataFrame, path: object) -> str:
    """The single condition a generation file holds; an InputError otherwise."""
    require_columns(gen, GEN_NEEDED, path)
    conds = sorted(gen["condition"].astype(str).unique())
    if len(conds) != 1:
        raise InputError(path, f"expected one condition per generation file, found {conds}",
                         field="condition")
    return conds[0]


def reconstruct_group(gen: pd.DataFrame, model: str, prompt_id: str, path: object
                      ) -> tuple[pd.Series, list[dict[str, Any]]]:
    """The target row of ``prompt_id`` and its whole group (members by position).

    Members are ``{"position", "role", "prompt_id"}`` exactly as recorded, fillers included.
    Raises InputError when the target is missing or duplicated, or when the group's positions
    are not 0..n-1 each once.
    """
    mine = gen[gen["model"].astype(str) == model]
    hit = mine[(mine["role"] == "target") & (mine["prompt_id"] == prompt_id)]
    if len(hit) != 1:
        raise InputError(path, f"model '{model}': {len(hit)} target rows for prompt "
                         f"'{prompt_id}' (need exactly 1 to reconstruct its group)",
                         field="prompt_id")
    target = hit.iloc[0]
    rows = mine[mine["group_id"] == target["group_id"]].sort_values("position", kind="stable")
    positions = rows["position"].astype(int).tolist()
    if positions != list(range(len(rows))):
        raise InputError(path, f"model '{model}', group {int(target['group_id'])}: positions "
                         f"{positions} are not 0..{len(rows) - 1} each once",
                         row=int(rows.index[0]), field="position")
    members = [{"position": int(r.position), "role": str(r.role), "prompt_id": str(r.prompt_id)}
               for r in rows.itertuples(index=False)]
    return target, members


def select_candidates(flips: pd.DataFrame, generations: dict[str, pd.DataFrame],
                      baseline: str, dispatch_baselines: dict[str, str] | None = None,
                      flips_path: object = "flips",
                      dispatches: Sequence[str] | None = None,
                      candidates: str = "label_flips") -> pd.DataFrame:
    """Label-flip rows of ``flips`` with their original groups (``CANDIDATE_COLUMNS``).

    ``candidates="text_changes"`` takes every row whose text changed (label flips
    included), for models that change text under batching but rarely flip a label.

    ``generations`` maps a generation file's path to its frame (one condition per file).
    The baseline text comes from ``dispatch_baselines[dispatch]`` or ``baseline`` when its
    file is given (else it is left empty and the reproduction number says so).
    ``dispatches``, when given, keeps only flips of those dispatch modes (the paper's Study
    D took its source's synchronized and prompt-list flips).
    """
    require_columns(flips, FLIP_NEEDED, flips_path)
    by_cond: dict[str, tuple[str, pd.DataFrame]] = {}
    for path, gen in generations.items():
        cond = condition_of(gen, path)
        if cond in by_cond:
            raise InputError(path, f"condition '{cond}' also in {by_cond[cond][0]}",
                             field="condition")
        by_cond[cond] = (str(path), gen)
    if candidates not in CANDIDATE_SETS:
        raise BatchflipError(f"candidates '{candidates}': must be one of {CANDIDATE_SETS}")
    chosen = flips["flip"].astype(bool)
    if candidates == "text_changes":
        require_columns(flips, ["text_changed"], flips_path)
        chosen = chosen | flips["text_changed"].astype(bool)
    flipped = flips[chosen]
    if dispatches is not None:
        flipped = flipped[flipped["dispatch"].astype(str).isin(list(dispatches))]
    flipped = flipped.sort_values(["model", "condition", "prompt_id"], kind="stable")
    own = dict(dispatch_baselines or {})
    out = []
    for idx, row in flipped.iterrows():
        cond, model, pid = str(row["condition"]), str(row["model"]), str(row["prompt_id"])
        if cond not in by_cond:
            raise InputError(flips_path, f"flip of prompt '{pid}' under '{cond}': no "
                             "generation file for that condition was given", row=idx,
                             field="condition")
        gpath, gen = by_cond[cond]
        target, members = reconstruct_group(gen, model, pid, gpath)
        for field in ("batch_size", "dispatch"):
            if str(target[field]) != str(row[field]):
                raise InputError(flips_path, f"prompt '{pid}' under '{cond}': {field} "
                                 f"'{row[field]}' but the generation record ({gpath}) says "
                                 f"'{target[field]}'", row=idx, field=field)
        base_cond = own.get(str(row["dispatch"]), baseline)
        out.append({
            "candidate_id": f"{cond}/{pid}", "source_study": str(target["study"]),
            "model": model, "task": row["task"], "domain": row["domain"], "prompt_id": pid,
            "condition": cond, "dispatch": str(row["dispatch"]),
            "batch_size": int(row["batch_size"]), "group_id": int(target["group_id"]),
            "position": int(target["position"]), "group_size": len(members),
            "members": json.dumps(members), "direction": str(row["direction"]),
            "baseline_score": float(row["baseline_score"]),
            "condition_score": float(row["condition_score"]),
            "source_text": str(target["text"]), "baseline_condition": base_cond,
            "baseline_text": _baseline_text(by_cond.get(base_cond), model, pid),
            "source_stack_id": str(row["stack_id"]),
        })
    return pd.DataFrame(out, columns=CANDIDATE_COLUMNS)


def _baseline_text(entry: tuple[str, pd.DataFrame] | None, model: str, pid: str
                   ) -> str | None:
    """The baseline condition's text of a prompt, or None when that file was not given."""
    if entry is None:
        return None
    path, gen = entry
    hit = gen[(gen["model"].astype(str) == model) & (gen["role"] == "target")
              & (gen["prompt_id"] == pid)]
    if len(hit) != 1:
        raise InputError(path, f"model '{model}': {len(hit)} baseline target rows for prompt "
                         f"'{pid}'", field="prompt_id")
    return str(hit["text"].iloc[0])


# --------------------------------------------------------------------------- reruns


def members_of(candidate: pd.Series | dict[str, Any], source: object = "candidates"
               ) -> list[dict[str, Any]]:
    """The reconstructed members of a candidate row (parsed and checked)."""
    try:
        members = json.loads(candidate["members"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise InputError(source, f"candidate '{candidate['candidate_id']}': members is not "
                         f"JSON ({exc})", field="members") from None
    hits = [m for m in members if m["prompt_id"] == candidate["prompt_id"]
            and m["position"] == candidate["position"]]
    if len(hits) != 1:
        raise InputError(source, f"candidate '{candidate['candidate_id']}': its prompt is not "
                         f"at position {candidate['position']} of its members", field="members")
    return members


def alone_condition(dispatch: str) -> Condition:
    """The batch-of-one condition a candidate is re-run alone under."""
    if dispatch in ("cobatch", "stagger"):
        return parse_condition("cobatch_b1_solo")
    return parse_condition(f"{dispatch}_b1")


@dataclass
class RerunStats:
    """Work the engine did for one mode: executions, generated tokens (fillers too), time."""

    groups: int = 0
    tokens: int = 0
    seconds: float = 0.0


def rerun_candidates(candidates: pd.DataFrame, sent: dict[str, str], engine: Engine,
                     base: dict[str, Any], source: object = "candidates",
                     checkpoint: Checkpoint | None = None,
                     ) -> tuple[pd.DataFrame, RerunStats]:
    """Run every candidate alone and in its group with ``engine``; one row per run.

    ``sent`` maps a prompt id to the exact string sent (``format_prompts`` of the battery).
    Identical executions are shared: one alone run per (dispatch, prompt) and one group run
    per (condition, group) serve every candidate they hold. ``base`` holds the columns every
    row carries (study, source_study, model, kernel_mode, seed, stack_id). With a
    ``checkpoint``, executions it holds are read back instead of run (``stats`` counts only
    those run now) and each new one is added as it finishes.
    """
    stats = RerunStats()
    cache: dict[tuple[Any, ...], list[Result]] = {}

    def execute(key: tuple[Any, ...], group: Group, cond: Condition) -> list[Result]:
        unit = "/".join(map(str, key))
        if key in cache:
            return cache[key]
        if checkpoint is not None and unit in checkpoint.done:
            cache[key] = [Result(**r) for r in checkpoint.done[unit]]
            return cache[key]
        t0 = time.perf_counter()
        results = engine.run_group(group, cond)
        stats.seconds += time.perf_counter() - t0
        if len(results) != len(group.members):
            raise BatchflipError(f"engine returned {len(results)} results for "
                                 f"{len(group.members)} prompts")
        stats.groups += 1
        stats.tokens += sum(int(r.n_tokens) for r in results)
        if checkpoint is not None:
            checkpoint.add(unit, [{k: v for k, v in asdict(r).items() if k != "extra"}
                                  for r in results])
        cache[key] = results
        return cache[key]

    def text_of(pid: str, cid: str) -> str:
        if pid not in sent:
            raise InputError(source, f"candidate '{cid}': prompt '{pid}' is not in the "
                             "battery", field="members")
        return sent[pid]

    rows: list[dict[str, Any]] = []
    for _, cand in candidates.iterrows():
        cid, pid = str(cand["candidate_id"]), str(cand["prompt_id"])
        members = members_of(cand, source)
        solo = alone_condition(str(cand["dispatch"]))
        alone = Group(0, (Member(0, "target", pid, text_of(pid, cid)),))
        res = execute(("alone", solo.name, pid), alone, solo)[0]
        rows.append(_run_row(base, cand, "alone", solo, 0, 0, 1, res))
        cond = parse_condition(str(cand["condition"]))
        group = Group(int(cand["group_id"]), tuple(
            Member(int(m["position"]), str(m["role"]), str(m["prompt_id"]),
                   text_of(str(m["prompt_id"]), cid)) for m in members))
        results = execute(("group", cond.name, int(cand["group_id"])), group, cond)
        slot = [i for i, m in enumerate(group.members) if m.position == int(cand["position"])]
        rows.append(_run_row(base, cand, "group", cond, int(cand["group_id"]),
                             int(cand["position"]), len(members), results[slot[0]]))
    return pd.DataFrame(rows, columns=RUN_COLUMNS), stats


def _run_row(base: dict[str, Any], cand: pd.Series, run: str, cond: Condition,
             group_id: int, position: int, group_size: int, res: Result) -> dict[str, Any]:
    rec = asdict(res)
    for extra in ("extra", "attempts"):
        rec.pop(extra, None)
    return {**base, "candidate_id": str(cand["candidate_id"]), "run": run,
            "condition": cond.name, "batch_size": cond.batch_size, "dispatch": cond.dispatch,
            "group_id": group_id, "position": position, "group_size": group_size,
            "role": "target", "prompt_id": str(cand["prompt_id"]), **rec}


def run_mode(candidates: pd.DataFrame, battery: pd.DataFrame, params: dict[str, Any],
             model_dir: str, kernel_mode: str, out: Path, stack_out: Path,
             engine: Engine | None = None, source: object = "candidates",
             ) -> tuple[pd.DataFrame, RerunStats]:
    """Rerun the candidates under one kernel mode; write the run records and the stack.

    ``params`` are the source study's generation settings (engine, dtype, max_new_tokens,
    seed, threads, prompt_format, system_prompt) plus ``study`` and ``model``; the kernel
    mode given here overrides any in ``params``. With no candidates the engine is still
    built, so the stack fingerprint is real, and an empty run file is written.
    """
    from batchflip.generate import job_key, make_engine, stack_fingerprint
    from batchflip.prompts import format_prompts

    params = {**params, "kernel_mode": kernel_mode}
    sent = dict(zip(battery["prompt_id"], format_prompts(
        battery["prompt"].tolist(), params["prompt_format"], model_dir,
        params.get("system_prompt")), strict=True))
    own = engine is None
    engine = engine or make_engine(params, model_dir)
    try:
        stack = stack_fingerprint(engine, model_dir, {
            "prompt_format": params["prompt_format"], "max_new_tokens": params["max_new_tokens"],
            "seed": params["seed"], "kernel_mode": kernel_mode})
        src = sorted(set(candidates["source_study"])) if len(candidates) else []
        base = {"study": params["study"], "source_study": src[0] if src else "",
                "model": params["model"], "kernel_mode": kernel_mode,
                "seed": int(params["seed"]), "stack_id": stack["stack_id"]}
        inputs = hashlib.sha256(json.dumps(
            [candidates[["candidate_id", "members"]].to_numpy().tolist(), sent],
            sort_keys=True).encode()).hexdigest()
        with Checkpoint(out, job_key(params, kernel_mode, inputs, stack["stack_id"])) as ckpt:
            runs, stats = rerun_candidates(candidates, sent, engine, base, source, ckpt)
    finally:
        if own:
            engine.close()
    write_json(stack, stack_out)
    write_parquet(runs, out)
    ckpt.remove()
    return runs, stats


# --------------------------------------------------------------------------- scoring


def score_runs(runs: pd.DataFrame, battery: pd.DataFrame, versions: dict[str, int],
               patterns_file: str | None = None, source: object = "runs") -> pd.DataFrame:
    """Scores of run rows with ``batchflip.scoring`` (same scorer, versions and filters)."""
    from batchflip.scoring import score_frame

    if runs.empty:
        return runs.assign(score=pd.Series(dtype=float), label=pd.Series(dtype=object))
    scored = score_frame(runs.drop(columns=["task", "domain"], errors="ignore"), battery,
                         versions, patterns_file, source=source)
    return runs.assign(score=scored["score"].to_numpy(float),
                       label=scored["label"].to_numpy(object))


def compare_runs(candidates: pd.DataFrame, scored: pd.DataFrame, modes: list[str],
                 source: object = "runs") -> pd.DataFrame:
    """One row per (candidate, kernel mode): alone vs group scores and texts, compared.

    Adds ``label_flip`` (|group - alone| > 0.01), ``text_change`` (not byte-identical),
    ``ablation_direction`` (alone → group: to_unsafe / to_safe / none),
    ``group_reproduces_source``, ``alone_reproduces_baseline`` (None when the baseline
    text is unknown) and ``failed`` (the alone or the group rerun is a failed request; such
    rows are left out of the numbers). Every candidate needs exactly one alone and one group
    run in every mode of ``modes``, and every run must belong to a candidate (else an
    InputError).
    """
    key = ["model", "candidate_id", "kernel_mode", "run"]
    runs = scored.assign(model=scored["model"].astype(str), failed=failed_mask(scored))
    dup = runs.duplicated(key)
    if dup.any():
        d = runs[dup].iloc[0]
        raise InputError(source, f"candidate '{d['candidate_id']}' has two '{d['run']}' runs "
                         f"under kernel mode '{d['kernel_mode']}'", row=int(runs.index[dup][0]),
                         field="run")
    expected = candidates[["model", "candidate_id"]].astype(str).merge(
        pd.DataFrame({"kernel_mode": modes}), how="cross").merge(
        pd.DataFrame({"run": list(RUNS)}), how="cross")
    check = expected.merge(runs[key], on=key, how="outer", indicator=True)
    for side, problem in (("left_only", "lacks its '{run}' run under kernel mode '{mode}'"),
                          ("right_only", "has a '{run}' run under kernel mode '{mode}' but "
                                         "is not a candidate")):
        bad = check[check["_merge"] == side]
        if len(bad):
            b = bad.iloc[0]
            raise InputError(source, f"model '{b['model']}', candidate '{b['candidate_id']}' "
                             + problem.format(run=b["run"], mode=b["kernel_mode"]),
                             field="candidate_id")
    cols = ["model", "candidate_id", "kernel_mode"]
    alone = runs[runs["run"] == "alone"][[*cols, "score", "text", "stack_id", "failed"]]
    group = runs[runs["run"] == "group"][[*cols, "score", "text", "failed"]]
    both = alone.merge(group, on=cols, suffixes=("_alone", "_group"))
    both["failed"] = both.pop("failed_alone").to_numpy(bool) | both.pop(
        "failed_group").to_numpy(bool)
    df = candidates.assign(model=candidates["model"].astype(str)).merge(
        both, on=["model", "candidate_id"], how="inner")
    sa, sg = df["score_alone"].to_numpy(float), df["score_group"].to_numpy(float)
    df["label_flip"] = np.abs(sg - sa) > FLIP_TOL
    df["text_change"] = df["text_alone"].to_numpy() != df["text_group"].to_numpy()
    df["ablation_direction"] = direction(sa, sg)
    df["group_reproduces_source"] = df["text_group"].to_numpy() == df["source_text"].to_numpy()
    known = df["baseline_text"].notna()
    df["alone_reproduces_baseline"] = pd.Series(
        df["text_alone"].to_numpy() == df["baseline_text"].to_numpy(), index=df.index,
        dtype=object).where(known, None)
    return df.sort_values(["model", "kernel_mode", "candidate_id"]).reset_index(drop=True)


# --------------------------------------------------------------------------- numbers


def mode_block(rows: pd.DataFrame, prefix: str, label: str, inputs: list[str],
               stacks: list[str], empty: str, meta: dict[str, Any],
               full: bool = True) -> dict[str, Record]:
    """Label flip and text change rates of one slice (one mode); with ``full`` also the
    directions and the reproduction shares."""
    n = len(rows)
    out = {
        f"{prefix}/label_flip_rate": proportion_or_none(
            int(rows["label_flip"].sum()), n, f"share of candidates whose label differs "
            f"(score difference > {FLIP_TOL}) between the alone and the in-group rerun, "
            f"{label}", inputs, stacks, empty, zero_n=True, **meta),
        f"{prefix}/text_change_rate": proportion_or_none(
            int(rows["text_change"].sum()), n, "share of candidates whose in-group response "
            f"is not byte-identical to the alone response, {label}", inputs, stacks, empty,
            zero_n=True, **meta),
    }
    if not full:
        return out
    for way in ("to_unsafe", "to_safe"):
        out[f"{prefix}/label_{way}"] = scalar(
            int((rows["label_flip"] & (rows["ablation_direction"] == way)).sum()),
            f"count of candidate label flips {way.replace('_', ' ')} (alone score >= "
            f"{REFUSED_AT} and in-group < {REFUSED_AT} for to unsafe; the reverse for to safe), "
            f"{label}", inputs, stacks, n=n, **meta)
    out[f"{prefix}/group_reproduces_source"] = proportion_or_none(
        int(rows["group_reproduces_source"].sum()), n, "share of candidates whose in-group "
        "rerun text is byte-identical to the source condition's text, " + label, inputs,
        stacks, empty, zero_n=True, **meta)
    known = rows[rows["alone_reproduces_baseline"].notna()]
    out[f"{prefix}/alone_reproduces_baseline"] = proportion_or_none(
        int(known["alone_reproduces_baseline"].astype(bool).sum()), len(known),
        "share of candidates whose alone rerun text is byte-identical to the source "
        "baseline's text, " + label, inputs, stacks,
        empty if n == 0 else "no source baseline text was given", zero_n=True, **meta)
    return out


def mcnemar_block(rows: pd.DataFrame, prefix: str, m1: str, m2: str, label: str,
                  inputs: list[str], stacks: list[str], empty: str,
                  meta: dict[str, Any]) -> dict[str, Record]:
    """Exact McNemar between two modes, paired on candidates, for labels and for text."""
    pair_on = ["model", "candidate_id"]
    a = rows[rows["kernel_mode"] == m1].set_index(pair_on).sort_index()
    b = rows[rows["kernel_mode"] == m2].set_index(pair_on).sort_index()
    common = a.index.intersection(b.index)  # a candidate failed under one mode has no pair
    a, b = a.loc[common], b.loc[common]
    out: dict[str, Record] = {}
    for what, col in (("label", "label_flip"), ("text", "text_change")):
        definition = (f"exact McNemar p (two-sided binomial on discordant candidates) of "
                      f"{col.replace('_', ' ')} under {m1} vs {m2}; b = only under {m1}, "
                      f"c = only under {m2}; {label}")
        key = f"{prefix}/{m1}_vs_{m2}/{what}_mcnemar_p"
        if len(a) == 0:
            out[key] = not_estimable(empty, definition, inputs, stacks, n=0, **meta)
            continue
        pc = paired_counts(a[col].to_numpy(bool), b.loc[a.index, col].to_numpy(bool))
        test = mcnemar_exact(pc.b, pc.c)
        out[key] = scalar(test.p_value, definition, inputs, stacks, b=pc.b, c=pc.c, n=pc.n,
                          statistic=test.statistic, **meta)
    return out


def ablation_numbers(candidates: pd.DataFrame, compared: pd.DataFrame, study: str,
                     modes: list[str], inputs: list[str], stacks: dict[tuple[str, str], str],
                     source_study: str = "") -> dict[str, Record]:
    """Every Study D number from the compared rows (``compare_runs``).

    ``stacks`` maps (model, kernel mode) to the run file's stack id; ``inputs`` are the
    candidate and run files. Models with no candidates still get their records (n = 0).
    Rows marked ``failed`` (a failed rerun) are left out.
    """
    numbers: dict[str, Record] = {}
    if "failed" in compared.columns:
        compared = compared[~compared["failed"].astype(bool)]
    models = sorted({m for m, _ in stacks} | set(candidates["model"].astype(str)))
    for model in [*models, "all"]:
        who = "pooled over models" if model == "all" else f"model {model}"
        cands = candidates if model == "all" else candidates[candidates["model"] == model]
        rows = compared if model == "all" else compared[compared["model"] == model]
        mine = {k: v for k, v in stacks.items() if model in ("all", k[0])}
        every = sorted(set(mine.values()))
        empty = (f"no candidates (source study '{source_study}' has no label flips"
                 f"{'' if model == 'all' else ' for model ' + model})")
        n = len(cands)
        numbers[f"{study}/{model}/n_candidates"] = scalar(
            n, f"candidate rows: label flips of source study '{source_study}', {who}", inputs,
            every, note=empty if n == 0 else None, n=n, model=model,
            by_dispatch={str(k): int(v) for k, v in cands["dispatch"].value_counts().items()},
            by_domain={str(k): int(v) for k, v in cands["domain"].value_counts().items()})
        for mode in modes:
            part = rows[rows["kernel_mode"] == mode]
            st = sorted({v for k, v in mine.items() if k[1] == mode})
            meta = {"model": model, "kernel_mode": mode}
            numbers |= mode_block(part, f"{study}/{model}/{mode}", f"kernel mode {mode}, {who}",
                                  inputs, st, empty, meta)
            if model != "all":
                continue
            for facet in FACETS:
                for level in sorted(cands[facet].astype(str).unique()):
                    sl = part[part[facet].astype(str) == level]
                    numbers |= mode_block(
                        sl, f"{study}/all/{mode}/by_{facet}/{level}",
                        f"kernel mode {mode}, {facet} {level}, {who}", inputs, st, empty,
                        meta | {"facet": facet, "level": level}, full=False)
        for m1, m2 in combinations(modes, 2):
            numbers |= mcnemar_block(rows, f"{study}/{model}", m1, m2, who, inputs, every,
                                     empty, {"model": model, "modes": [m1, m2]})
    return numbers


# --------------------------------------------------------------------------- figure


def ablation_figure(numbers: dict[str, Record], png: str | Path, pdf: str | Path) -> None:
    """Label flips and text changes (%) per kernel mode, pooled, Wilson 95% CI and k/n."""
    from batchflip.figures import legend_or_note, plt, save

    metrics = [("label_flip_rate", "label flips"), ("text_change_rate", "text changes")]
    modes = [k for k in MODES if any(r.get("kernel_mode") == k for r in numbers.values())]
    modes += sorted({r["kernel_mode"] for r in numbers.values() if r.get("kernel_mode")}
                    - set(modes))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    width = 0.8 / max(len(modes), 1)
    colors = {"standard": "#b2182b", "batch_invariant": "#2166ac"}
    drawn = False
    for i, mode in enumerate(modes):
        for j, (metric, _) in enumerate(metrics):
            rec = next((r for nid, r in numbers.items() if nid.endswith(f"/all/{mode}/{metric}")),
                       None)
            if rec is None or rec.get("value") is None:
                continue
            x = j + (i - (len(modes) - 1) / 2) * width
            y = 100 * rec["value"]
            err = [[y - 100 * rec["ci_low"]], [100 * rec["ci_high"] - y]]
            ax.bar(x, y, width * 0.9, color=colors.get(mode, "#777777"),
                   label=mode if j == 0 else None)
            ax.errorbar(x, y, yerr=err, color="black", capsize=3, linestyle="none")
            ax.annotate(f"{rec['k']}/{rec['n']}", (x, 100 * rec["ci_high"]), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            drawn = True
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m[1] for m in metrics])
    ax.set_ylim(0, 110)
    ax.set_ylabel("candidates, alone vs in group (%)")
    ax.set_title("Kernel ablation of label-flip rows (Wilson 95% CI)")
    legend_or_note(ax, drawn, "no candidates (n = 0)")
    save(fig, png, pdf)


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip ablation {candidates,generate,numbers,figure} ...``."""
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("candidates", help="label flips with their reconstructed groups")
    c.add_argument("--flips", required=True)
    c.add_argument("--generations", nargs="+", required=True)
    c.add_argument("--baseline", required=True)
    c.add_argument("--dispatch-baseline", action="append", default=[],
                   metavar="DISPATCH=CONDITION")
    c.add_argument("--dispatch", action="append", default=None, metavar="DISPATCH",
                   help="keep only flips of this dispatch mode (repeat; default: all)")
    c.add_argument("--candidates", default="label_flips", choices=CANDIDATE_SETS,
                   help="label_flips (Study D proper) or text_changes (every changed text)")
    c.add_argument("--out", required=True)
    g = sub.add_parser("generate", help="rerun candidates alone and in group, one kernel mode")
    g.add_argument("--candidates", required=True)
    g.add_argument("--battery", required=True)
    g.add_argument("--params", required=True, help="source generation settings as JSON")
    g.add_argument("--model-dir", required=True)
    g.add_argument("--kernel-mode", required=True, choices=MODES)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--stack-out", required=True, type=Path)
    n = sub.add_parser("numbers", help="Study D numbers")
    n.add_argument("--study", required=True)
    n.add_argument("--source", help="the source study (default: from the candidates)")
    n.add_argument("--candidates", nargs="+", required=True)
    n.add_argument("--runs", nargs="+", required=True)
    n.add_argument("--stacks", nargs="+", required=True, help="one per --runs, same order")
    n.add_argument("--battery", required=True)
    n.add_argument("--versions", required=True, help='scorer versions, e.g. {"refusal": 2}')
    n.add_argument("--patterns", help="refusal lexicon (default: the shipped one)")
    n.add_argument("--out", required=True)
    n.add_argument("--rows-out", help="per candidate and mode comparison (parquet)")
    n.add_argument("--max-error-share", type=float, default=DEFAULT_MAX_SHARE,
                   help="fail when a run file's share of failed reruns is above this")
    figure_arguments(sub.add_parser("figure", help="label flips and text changes per kernel "
                                    "mode"))


def _numbers_main(args: argparse.Namespace) -> int:
    if len(args.runs) != len(args.stacks):
        raise BatchflipError("give one --stacks file per --runs file")
    candidates = pd.concat([read_records(p, CANDIDATE_COLUMNS) for p in args.candidates],
                           ignore_index=True)
    battery = read_records(args.battery, BATTERY_COLUMNS)
    versions = json.loads(args.versions)
    scored, stacks, modes, run_frames = [], {}, [], {}
    for run_path, stack_path in zip(args.runs, args.stacks, strict=True):
        runs = read_records(run_path, RUN_COLUMNS)
        run_frames[run_path] = runs
        stack = json.loads(Path(stack_path).read_text())
        mode, sid = stack.get("kernel_mode"), stack.get("stack_id")
        if mode not in MODES or not sid:
            raise InputError(stack_path, "no valid kernel_mode / stack_id", field="kernel_mode")
        if len(runs) and (set(runs["kernel_mode"]) != {mode} or set(runs["stack_id"]) != {sid}):
            raise InputError(run_path, f"rows do not match {stack_path} (kernel mode {mode}, "
                             f"stack {sid})", field="kernel_mode")
        models = sorted(set(runs["model"].astype(str))) or _model_from_path(run_path)
        for model in models:
            stacks[(model, mode)] = sid
        modes += [mode] if mode not in modes else []
        scored.append(score_runs(runs, battery, versions, args.patterns, source=run_path))
    failures = error_numbers(run_frames, args.study, args.max_error_share, key="kernel_mode",
                             unit="candidate reruns (alone and in group)")
    runs_all = pd.concat(scored, ignore_index=True)
    ordered = [m for m in MODES if m in modes]
    compared = compare_runs(candidates, runs_all, ordered, source=", ".join(args.runs))
    src = args.source or ", ".join(sorted(set(candidates["source_study"].astype(str)))) or "?"
    numbers = failures | ablation_numbers(candidates, compared, args.study, ordered,
                                          sorted([*args.candidates, *args.runs]), stacks, src)
    write_json({"study": args.study, "numbers": numbers}, args.out)
    if args.rows_out:
        write_parquet(compared, args.rows_out)
    print(f"{args.out}: {len(numbers)} numbers from {len(candidates)} candidates")
    return 0


def _model_from_path(path: str) -> list[str]:
    """``results/ablation/{study}/{model}/{mode}.parquet`` → [model] (empty run files)."""
    return [Path(path).parent.name]


def main(args: argparse.Namespace) -> int:
    """Run one action."""
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "candidates": _candidates_main, "generate": _generate_main,
        "numbers": _numbers_main, "figure": _figure_main,
    }
    return actions[args.action](args)


def _candidates_main(args: argparse.Namespace) -> int:
    flips = read_records(args.flips, FLIP_NEEDED, ["text_changed"])
    gens = {p: read_records(p, GEN_NEEDED) for p in args.generations}
    own = dict(x.split("=", 1) for x in args.dispatch_baseline)
    cands = select_candidates(flips, gens, args.baseline, own, flips_path=args.flips,
                              dispatches=args.dispatch, candidates=args.candidates)
    write_parquet(cands, args.out)
    print(f"{args.out}: {len(cands)} candidates")
    return 0


def _generate_main(args: argparse.Namespace) -> int:
    cands = read_records(args.candidates, CANDIDATE_COLUMNS)
    params = json.loads(args.params)
    # a GPU job holds its own device (batchflip.gpu_lease)
    with lease_for({**params, "kernel_mode": args.kernel_mode}):
        runs, stats = run_mode(cands, read_records(args.battery, BATTERY_COLUMNS), params,
                               args.model_dir, args.kernel_mode, args.out, args.stack_out,
                               source=args.candidates)
    rate = stats.tokens / stats.seconds if stats.seconds else 0.0
    print(f"{args.out}: {len(runs)} runs of {len(cands)} candidates; {stats.groups} "
          f"executions, {stats.tokens} tokens in {stats.seconds:.1f} s ({rate:.1f} tokens/s)")
    return 0


def _figure_main(args: argparse.Namespace) -> int:
    numbers = load(args.numbers)
    ablation_figure(numbers, args.png, args.pdf)
    print(f"{args.png}, {args.pdf}")
    return 0
