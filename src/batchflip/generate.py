"""Generate stage: one job per (study, model, condition).

Builds the groups a condition dispatches, runs them through an engine and writes the
generation records (DESIGN.md, Records) plus the stack fingerprint. Work is checkpointed
group by group to ``<out>.partial.jsonl``, so a killed job resumes where it stopped: the
finished groups are read back, never regenerated or duplicated. The parquet appears only
when every group is done (written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.checkpoint import Checkpoint, checkpoint_path
from batchflip.conditions import BATCHED_DISPATCHES, CONC, Condition, parse_condition
from batchflip.design import select_subset
from batchflip.engines import Engine, Group, Member, Result, StreamEngine
from batchflip.engines.replicas import one_in_flight
from batchflip.errors import BatchflipError
from batchflip.gpu_lease import lease_for
from batchflip.io import read_parquet, write_json, write_parquet
from batchflip.layout import SERVER_ENGINES, launch_key
from batchflip.model import check_model_dir, model_fingerprint
from batchflip.prompts import format_prompts
from batchflip.records import GENERATION_COLUMNS, LOGPROB_COLUMNS
from batchflip.settings import GenerationSettings


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded by the study seed and stable string keys (crc32, not hash())."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def pool_ids(battery: pd.DataFrame, pools: Mapping[str, Any], name: str) -> list[str]:
    """Prompt ids of a filler pool defined by tasks (``{tasks: [...]}``)."""
    spec = pools.get(name)
    if spec is None or "tasks" not in spec:
        raise BatchflipError(f"filler pool '{name}' is not defined by tasks in filler_pools")
    ids = battery.loc[battery["task"].isin(spec["tasks"]), "prompt_id"].tolist()
    if not ids:
        raise BatchflipError(f"filler pool '{name}': no battery prompts in tasks {spec['tasks']}")
    return ids


def build_groups(battery: pd.DataFrame, cond: Condition, settings: GenerationSettings
                 ) -> list[Group]:
    """The groups a condition dispatches, in order; prompts are the battery's ``sent`` text."""
    sent = dict(zip(battery["prompt_id"], battery["sent"], strict=True))
    ids = battery["prompt_id"].tolist()
    seed = settings.seed
    groups: list[Group] = []
    if cond.dispatch == CONC:  # one group per prompt, streamed by the engine (conditions)
        return [Group(gid, (Member(0, "target", pid, sent[pid]),))
                for gid, pid in enumerate(ids)]
    if not cond.composition:
        b = cond.batch_size
        for gid, start in enumerate(range(0, len(ids), b)):
            chunk = ids[start:start + b]
            fill = [i for i in ids if i not in chunk][: b - len(chunk)]
            members = [Member(p, "target", pid, sent[pid]) for p, pid in enumerate(chunk)]
            members += [Member(len(chunk) + k, "filler", pid, sent[pid])
                        for k, pid in enumerate(fill)]
            groups.append(Group(gid, tuple(members)))
        return groups
    tasks = list(settings.cobatch_targets or [])
    targets = battery.loc[battery["task"].isin(tasks), "prompt_id"].tolist()
    if not targets:
        raise BatchflipError(f"condition '{cond.name}': no targets in tasks {tasks}")
    pools = settings.filler_pools or {}
    for gid, target in enumerate(targets):
        if cond.pool == "solo":
            groups.append(Group(gid, (Member(0, "target", target, sent[target]),)))
            continue
        fillers, pos = draw_group(seed, battery, pools, cond.pool, target, cond.batch_size)
        order = fillers[:pos] + [target] + fillers[pos:]
        groups.append(Group(gid, tuple(
            Member(p, "target" if p == pos else "filler", pid, sent[pid])
            for p, pid in enumerate(order))))
    return groups


def draw_group(seed: int, battery: pd.DataFrame, pools: Mapping[str, Any], pool: str,
               target: str, batch_size: int) -> tuple[list[str], int]:
    """A target's fillers (in order) and its position in a group of ``batch_size``.

    The draw rule (:data:`batchflip.conditions.GROUPING`): the fillers are drawn with a
    generator keyed by (study seed, pool, batch size, target) and the position with one
    keyed by (study seed, batch size, target). Nothing of the condition's name enters:
    every condition of a study with the same pool and size (cobatch, list, any stagger
    timing, any phase tag, a repeat) gives the target the same fillers in the same order at
    the same position, and conditions that differ only in the pool share the position.
    """
    size = str(batch_size)
    fillers = _draw_fillers(_rng(seed, "fillers", pool, size, target), battery, pools, pool,
                            target, batch_size - 1)
    pos = int(_rng(seed, "position", size, target).integers(0, batch_size))
    return fillers, pos


def _draw_fillers(rng: np.random.Generator, battery: pd.DataFrame, pools: Mapping[str, Any],
                  pool: str, target: str, n: int) -> list[str]:
    """Seeded draw without replacement; a ``mix`` pool draws from several pools."""
    spec = pools.get(pool)
    if spec is None:
        raise BatchflipError(f"filler pool '{pool}' is not defined in filler_pools")
    parts = spec["mix"] if "mix" in spec else {pool: n}
    if sum(parts.values()) != n:
        raise BatchflipError(f"filler pool '{pool}': mix sums to {sum(parts.values())}, "
                             f"the batch needs {n} fillers")
    out: list[str] = []
    for name, k in parts.items():
        cands = [i for i in pool_ids(battery, pools, name) if i != target and i not in out]
        if len(cands) < k:
            raise BatchflipError(f"filler pool '{name}': {len(cands)} prompts, need {k}")
        out += [cands[j] for j in rng.choice(len(cands), size=k, replace=False)]
    rng.shuffle(out)
    return out


def job_key(settings: GenerationSettings, condition: str, battery_sha: str, stack_id: str
            ) -> str:
    """Identity of a generation job: resume only continues a job with the same key."""
    blob = json.dumps([settings.as_dict(), condition, battery_sha, stack_id], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# fingerprint blocks that describe one run, not the stack: left out of the stack id, so a
# resumed job keeps its id (startup: compile-cache state and start-up seconds of each
# launch, batchflip.engines.vllm_cache; invariance_probe: batchflip.invariance_probe)
RUN_FACTS = ("stack_id", "startup", "invariance_probe")


def settings_facts(settings: GenerationSettings) -> dict[str, Any]:
    """The job settings every stack fingerprint records: prompt format, new tokens, seed,
    and the host profile that chose the settings (``cpu_profile``, when one did)."""
    out: dict[str, Any] = {"prompt_format": settings.prompt_format,
                           "max_new_tokens": settings.max_new_tokens, "seed": settings.seed}
    if settings.cpu_profile:
        out["cpu_profile"] = settings.cpu_profile
    return out


def stack_fingerprint(engine: Engine, model_dir: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The engine's facts plus the model files and the job's own settings; with its id
    (computed without :data:`RUN_FACTS`)."""
    stack = {**engine.fingerprint(), "model": model_fingerprint(model_dir), **extra}
    stack["stack_id"] = hashlib.sha256(
        json.dumps({k: v for k, v in stack.items() if k not in RUN_FACTS}, sort_keys=True,
                   default=str).encode()).hexdigest()[:12]
    return stack


def make_engine(settings: GenerationSettings, model_dir: str) -> Engine:
    """Construct the engine the settings name."""
    if settings.engine == "hf":
        from batchflip.engines.hf import HFEngine

        return HFEngine.from_settings(settings, model_dir)
    from batchflip.engines.server import make_server_engine

    return make_server_engine(settings, model_dir)


def stream_engine(engine: Engine, condition: str) -> StreamEngine:
    """The engine, if it serves request streams (``conc`` conditions); else an error."""
    if not isinstance(engine, StreamEngine):
        raise BatchflipError(f"condition '{condition}' is a stream of single-prompt requests "
                             f"with a concurrency cap; engine '{engine.name}' serves no "
                             "requests (use engine vllm or openai)")
    return engine


def _rows(group: Group, results: list[Result], base: dict[str, Any],
          logprobs: bool = False) -> list[dict[str, Any]]:
    if len(results) != len(group.members):
        raise BatchflipError(f"group {group.group_id}: engine returned {len(results)} results "
                             f"for {len(group.members)} prompts")
    rows = []
    for m, r in zip(group.members, results, strict=True):
        rec = asdict(r)
        rec.pop("extra")
        for col in LOGPROB_COLUMNS:  # present only when the study asks for them
            value = rec.pop(col)
            if logprobs:
                rec[col] = value or []
        rows.append({**base, "group_id": group.group_id, "position": m.position,
                     "role": m.role, "prompt_id": m.prompt_id, **rec})
    return rows


def run_job(battery: pd.DataFrame, settings: GenerationSettings, condition: str, model_dir: str,
            out: Path, stack_out: Path, engine: Engine | None = None,
            progress: bool = True, keep_checkpoint: bool = False) -> pd.DataFrame:
    """Generate every group of ``condition`` (resuming), write records and fingerprint.

    ``keep_checkpoint`` leaves the finished checkpoint in place: a job that runs several
    conditions removes them only once all are written, because Snakemake deletes every
    output of a failed job and the next try must not regenerate conditions already done.

    The condition's scope settings (``condition_overrides``) are merged into ``settings``
    and a ``subset`` narrows the battery first (batchflip.design).
    """
    from tqdm import tqdm

    cond = parse_condition(condition)
    settings = settings.for_condition(condition)
    battery = select_subset(battery, settings.subset).copy()
    if (cond.dispatch in BATCHED_DISPATCHES and not cond.composition
            and cond.batch_size > len(battery)):
        raise BatchflipError(
            f"study '{settings.study}', condition '{condition}': batches of "
            f"{cond.batch_size} prompts, but the study sends only {len(battery)} prompts in it "
            f"(after subset and scopes); its one group would be recorded as batch_size "
            f"{cond.batch_size}")
    battery["sent"] = format_prompts(battery["prompt"].tolist(), settings.prompt_format,
                                     model_dir, settings.system_prompt)
    groups = build_groups(battery, cond, settings)
    own_engine = engine is None
    engine = engine or make_engine(settings, model_dir)
    try:
        logprobs = settings.logprobs
        stack = stack_fingerprint(engine, model_dir, {
            **settings_facts(settings), **({"logprobs": logprobs} if logprobs else {})})
        battery_sha = hashlib.sha256(
            pd.util.hash_pandas_object(battery[["prompt_id", "sent"]], index=False)
            .values.tobytes()).hexdigest()
        key = job_key(settings, condition, battery_sha, stack["stack_id"])
        ckpt = Checkpoint(out, key)
        done = ckpt.done
        base = {"study": settings.study, "model": settings.model, "condition": condition,
                "batch_size": cond.batch_size, "dispatch": cond.dispatch,
                "kernel_mode": settings.kernel_mode, "seed": settings.seed,
                "stack_id": stack["stack_id"]}
        todo = [g for g in groups if g.group_id not in done]
        if done:
            print(f"resuming {out}: {len(done)} of {len(groups)} groups already done",
                  file=sys.stderr)
        with ckpt:
            bar = tqdm(total=len(todo), desc=f"{settings.model}/{condition}", unit="group",
                       disable=not progress, file=sys.stderr)

            def finished(group: Group, results: list[Result]) -> None:
                ckpt.add(group.group_id, _rows(group, results, base, bool(logprobs)))
                bar.update()

            if getattr(engine, "replica_count", 1) > 1 and one_in_flight(cond):
                # server.replicas: batch-1 groups over k servers, merged in group order
                engine.run_replicated(todo, cond, finished)  # type: ignore[attr-defined]
            elif cond.dispatch == CONC:
                stream_engine(engine, condition).run_stream(todo, cond, finished)
            else:
                for group in todo:
                    finished(group, engine.run_group(group, cond))
            bar.close()
    finally:
        if own_engine:
            engine.close()
    columns = GENERATION_COLUMNS + (LOGPROB_COLUMNS if logprobs else [])
    df = pd.DataFrame([r for g in sorted(done) for r in done[g]], columns=columns)
    if getattr(engine, "startup", None):  # replicas started during this job: list them too
        stack["startup"] = list(engine.startup)  # type: ignore[attr-defined]
    write_json(stack, stack_out)
    write_parquet(df, out)
    if not keep_checkpoint:
        ckpt.remove()
    return df


class _PartOf(argparse.Action):
    """Appends the value with the index of the ``--params`` given before it, so a job's
    conditions say which study's settings (and battery) they belong to."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        owner = len(getattr(namespace, "params", None) or []) - 1
        if owner < 0:
            parser.error(f"{option_string} must follow a --params")
        items = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*items, (values, owner)])


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``batchflip generate``: one or more parts, each ``--battery`` and
    ``--params`` followed by its conditions (each with its ``--out`` and ``--stack-out``).
    Several parts share one engine: the studies of a shared server job (layout.server_jobs)."""
    parser.add_argument("--battery", required=True, action="append", help="battery parquet")
    parser.add_argument("--params", required=True, action="append",
                        help="study settings as JSON")
    parser.add_argument("--model-dir", required=True, help="model directory or hub id")
    parser.add_argument("--condition", required=True, action=_PartOf)
    parser.add_argument("--out", required=True, type=Path, action="append")
    parser.add_argument("--stack-out", required=True, type=Path, action="append")
    parser.add_argument("--no-progress", action="store_true")


def _check_parts(parts: list[GenerationSettings]) -> None:
    """Parts share one engine only on a server engine and with the same launch settings."""
    if len(parts) < 2:
        return
    first = parts[0]
    if first.engine not in SERVER_ENGINES:
        raise BatchflipError(f"engine '{first.engine}': only server engines (vllm, openai) "
                             "run several studies in one job")
    for p in parts[1:]:
        if launch_key(p.as_dict()) != launch_key(first.as_dict()):
            raise BatchflipError(f"study '{p.study}' cannot share the server of study "
                                 f"'{first.study}': their launch settings differ")


def main(args: argparse.Namespace) -> int:
    """Run generation jobs; several conditions (of one or more studies) share one engine
    (one server start)."""
    if not len(args.condition) == len(args.out) == len(args.stack_out):
        raise BatchflipError("give one --out and one --stack-out per --condition")
    if len(args.battery) != len(args.params):
        raise BatchflipError("give one --battery per --params")
    parts = [GenerationSettings.from_json(p) for p in args.params]
    _check_parts(parts)
    check_model_dir(args.model_dir, parts[0].model)
    batteries = [read_parquet(b) for b in args.battery]
    from batchflip.engines.server import ServerEngine

    with lease_for(parts[0]):  # a GPU job holds its own device (batchflip.gpu_lease)
        engine = make_engine(parts[0], args.model_dir)
        try:
            for (cond, i), out, stack_out in zip(args.condition, args.out, args.stack_out,
                                                 strict=True):
                if isinstance(engine, ServerEngine):
                    engine.use_request_settings(parts[i])
                df = run_job(batteries[i], parts[i], cond, args.model_dir, out, stack_out,
                             engine=engine, progress=not args.no_progress, keep_checkpoint=True)
                print(f"{out}: {len(df)} rows ({int((df['role'] == 'target').sum())} targets)")
        finally:
            engine.close()
    for out in args.out:  # every condition is written: the checkpoints have done their job
        checkpoint_path(out).unlink(missing_ok=True)
    return 0
