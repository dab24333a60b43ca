"""Study D's reruns: candidate selection with groups reconstructed from the generation
records, the alone and in-group reruns under one kernel mode, and their scoring and
comparison (see :mod:`batchflip.studies.ablation`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.checkpoint import Checkpoint
from batchflip.conditions import Condition, parse_condition
from batchflip.engines import Engine, Group, Member, Result
from batchflip.errors import BatchflipError, InputError
from batchflip.failures import failed_mask
from batchflip.flips import FLIP_TOL
from batchflip.invariance_probe import attest, probe_settings
from batchflip.io import write_json, write_parquet
from batchflip.numbers import direction
from batchflip.records import require_columns
from batchflip.repeat import without_repeats
from batchflip.settings import GenerationSettings

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
# which source rows Study D reruns (config key `candidates`)
CANDIDATE_SETS = ("label_flips", "text_changes", "label_flips_else_text_changes")
# label_flips_else_text_changes: below this many label flips, text changes are rerun too
MIN_LABEL_FLIPS = 10


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
                      candidates: str = "label_flips",
                      min_label_flips: int = MIN_LABEL_FLIPS) -> pd.DataFrame:
    """Label-flip rows of ``flips`` with their original groups (``CANDIDATE_COLUMNS``).

    ``candidates="text_changes"`` takes every row whose text changed (label flips
    included), for models that change text under batching but rarely flip a label.
    ``"label_flips_else_text_changes"`` takes the label flips when there are at least
    ``min_label_flips`` of them (counted after ``dispatches``), else every text change.

    ``generations`` maps a generation file's path to its frame (one condition per file).
    The baseline text comes from ``dispatch_baselines[dispatch]`` or ``baseline`` when its
    file is given (else it is left empty and the reproduction number says so).
    ``dispatches``, when given, keeps only flips of those dispatch modes (the paper's Study
    D took its source's synchronized and prompt-list flips). A repeat control's rows
    (``*_repeat``, :mod:`batchflip.repeat`) are never candidates: they measure a rerun.
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
    kept = (flips["dispatch"].astype(str).isin(list(dispatches)) if dispatches is not None
            else pd.Series(True, index=flips.index))
    # a repeat's changes are the noise floor, never candidates
    kept = kept & flips.index.isin(without_repeats(flips).index)
    if candidates == "label_flips_else_text_changes":
        n_flips = int((chosen & kept).sum())
        candidates = "label_flips" if n_flips >= min_label_flips else "text_changes"
        print(f"candidates: {n_flips} label flips (threshold {min_label_flips}): rerunning "
              f"{candidates.replace('_', ' ')}")
    if candidates == "text_changes":
        require_columns(flips, ["text_changed"], flips_path)
        chosen = chosen | flips["text_changed"].astype(bool)
    flipped = flips[chosen & kept]
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
    if dispatch == "conc":
        return parse_condition("conc_c1")
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


def probe_prompts(candidates: pd.DataFrame, sent: dict[str, str], n: int
                  ) -> list[tuple[str, str]]:
    """The invariance probe's prompts: the candidates' own prompts (in candidate order,
    each once), then the battery's in order, ``n`` in all."""
    ids = list(dict.fromkeys(str(p) for p in candidates.get("prompt_id", [])))
    ids += [p for p in sent if p not in ids]
    return [(p, sent[p]) for p in ids[:n] if p in sent]


def candidate_signature(cand: pd.Series, sent: dict[str, str], source: object = "candidates"
                        ) -> str:
    """What a candidate's two reruns depend on, besides the settings: its id, condition,
    group id and position, and the exact strings sent for it and every member of its group."""
    from batchflip.keyed import digest

    pid = str(cand["prompt_id"])
    members = members_of(cand, source)
    return digest([str(cand["candidate_id"]), str(cand["dispatch"]), str(cand["condition"]),
                   int(cand["group_id"]), int(cand["position"]), sent.get(pid),
                   [[int(m["position"]), str(m["role"]), sent.get(str(m["prompt_id"]))]
                    for m in members]])


def reuse_path(out: Path) -> Path:
    """The record beside a keyed run file of what it holds (settings key, signatures)."""
    return out.with_name(out.name.removesuffix(".parquet") + ".reuse.json")


def _prior_runs(out: Path, settings_key: str) -> dict[str, tuple[pd.DataFrame, Path]]:
    """Reruns earlier keyed files beside ``out`` hold under the same settings: signature ->
    (that candidate's rows, the file's stack fingerprint)."""
    found: dict[str, tuple[pd.DataFrame, Path]] = {}
    for rec_path in sorted(out.parent.glob("*.reuse.json")):
        run_path = rec_path.with_name(rec_path.name.removesuffix(".reuse.json") + ".parquet")
        stack_file = Path(str(run_path).removesuffix(".parquet") + ".stack.json")
        if run_path == out or not run_path.is_file() or not stack_file.is_file():
            continue
        rec = json.loads(rec_path.read_text())
        if rec.get("settings_key") != settings_key:
            continue
        runs = pd.read_parquet(run_path)
        for cid, sig in rec.get("signatures", {}).items():
            rows = runs[runs["candidate_id"] == cid]
            if sig not in found and len(rows) == len(RUNS):
                found[sig] = (rows, stack_file)
    return found


def run_mode(candidates: pd.DataFrame, battery: pd.DataFrame, settings: GenerationSettings,
             model_dir: str, kernel_mode: str, out: Path, stack_out: Path,
             engine: Engine | None = None, source: object = "candidates",
             control: dict[str, Any] | None = None,
             reuse: bool = False) -> tuple[pd.DataFrame, RerunStats]:
    """Rerun the candidates under one kernel mode; write the run records and the stack.

    With ``settings.invariance_probe`` the served stack is probed first
    (:mod:`batchflip.invariance_probe`; ``control`` is the standard job's outcome) and the
    verdict goes into the fingerprint; a failed batch-invariant probe stops the job.

    ``settings`` are the source study's serving settings (engine, dtype, max_new_tokens,
    seed, threads, prompt_format, system_prompt) plus ``study`` and ``model``; the kernel
    mode given here overrides any in ``settings``. With no candidates the engine is still
    built, so the stack fingerprint is real, and an empty run file is written.

    With ``reuse`` (content-keyed run files, :mod:`batchflip.keyed`), a candidate whose
    signature an earlier keyed file beside ``out`` holds under the same settings is copied
    from it, not rerun; when every candidate is copied no engine starts and that file's
    stack fingerprint is kept. A fresh engine on another stack reruns them all. The record
    beside ``out`` (:func:`reuse_path`) names what was reused and what was generated.
    """
    from batchflip.generate import job_key, make_engine, settings_facts, stack_fingerprint
    from batchflip.keyed import digest
    from batchflip.prompts import format_prompts

    settings = settings.replace(kernel_mode=kernel_mode)
    sent = dict(zip(battery["prompt_id"], format_prompts(
        battery["prompt"].tolist(), settings.prompt_format, model_dir,
        settings.system_prompt), strict=True))
    model_json = Path(model_dir) / "model.json"
    settings_key = digest([settings.as_dict(), model_dir,
                           model_json.read_text() if model_json.is_file() else None])
    sigs = {str(c["candidate_id"]): candidate_signature(c, sent, source)
            for _, c in candidates.iterrows()}
    prior = _prior_runs(Path(out), settings_key) if reuse else {}
    copied = {cid: prior[sig] for cid, sig in sigs.items() if sig in prior}
    prior_stacks = {str(p) for _, p in copied.values()}
    todo = candidates[~candidates["candidate_id"].astype(str).isin(list(copied))]
    stats = RerunStats()
    if copied and todo.empty and len(prior_stacks) == 1:
        stack = json.loads(Path(prior_stacks.pop()).read_text())
        fresh = pd.DataFrame(columns=RUN_COLUMNS)
    else:
        own = engine is None
        engine = engine or make_engine(settings, model_dir)
        try:
            stack = stack_fingerprint(engine, model_dir, {
                **settings_facts(settings), "kernel_mode": kernel_mode})
            probe = probe_settings(settings.invariance_probe)
            if probe:  # before anything is measured
                stack["invariance_probe"] = attest(
                    engine, probe_prompts(candidates, sent, probe["prompts"]), probe,
                    kernel_mode, control)
                print(f"invariance probe ({kernel_mode}): {stack['invariance_probe']['verdict']}")
            if any(set(rows["stack_id"]) != {stack["stack_id"]} for rows, _ in copied.values()):
                copied, todo = {}, candidates  # another stack: nothing carries over
            src = sorted(set(candidates["source_study"])) if len(candidates) else []
            base = {"study": settings.study, "source_study": src[0] if src else "",
                    "model": settings.model, "kernel_mode": kernel_mode,
                    "seed": settings.seed, "stack_id": stack["stack_id"]}
            inputs = hashlib.sha256(json.dumps(
                [todo[["candidate_id", "members"]].to_numpy().tolist(), sent],
                sort_keys=True).encode()).hexdigest()
            with Checkpoint(out, job_key(settings, kernel_mode, inputs,
                                         stack["stack_id"])) as ckpt:
                fresh, stats = rerun_candidates(todo, sent, engine, base, source, ckpt)
        finally:
            if own:
                engine.close()
        ckpt.remove()
    order = {cid: i for i, cid in enumerate(candidates["candidate_id"].astype(str))}
    parts = [fresh] + [rows for rows, _ in copied.values()]
    runs = pd.concat([p for p in parts if len(p)] or [fresh], ignore_index=True)
    if len(runs):
        runs = runs.assign(_o=runs["candidate_id"].map(order),
                           _r=runs["run"].map({r: i for i, r in enumerate(RUNS)}))
        runs = runs.sort_values(["_o", "_r"], kind="stable").drop(columns=["_o", "_r"])
    runs = runs[RUN_COLUMNS].reset_index(drop=True)
    write_json(stack, stack_out)
    write_parquet(runs, out)
    if reuse:
        write_json({"settings_key": settings_key, "signatures": sigs,
                    "reused": sorted(copied), "generated": sorted(
                        set(todo["candidate_id"].astype(str)))}, reuse_path(Path(out)))
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
