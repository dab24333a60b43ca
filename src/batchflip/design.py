"""Which prompts and models each condition of a study runs on.

By default every model of a study runs every condition on the whole battery. Two config keys
narrow that, as the paper's design needs:

- ``subset`` (on a study, or on a scope): a per-task prompt subset of the battery,
  ``{per_task: {task: n, ...}, method: head | sample, seed: s}``. Tasks not listed are left
  out. ``head`` keeps the first n prompts of each task in battery order (the paper's rule
  for its 450-prompt true-batching subset: AdvBench 60, jailbreak 80, BBQ 80, TruthfulQA 30,
  MMLU 100, ARC 100); ``sample`` draws n without replacement with
  ``numpy.random.default_rng([seed, crc32(task)])`` and keeps battery order.
- ``scopes`` (on a study): a list of ``{conditions, models?, subset?, cobatch_targets?}``.
  The listed conditions run only on ``models`` (default: all of the study's), on
  ``subset`` (default: the study's prompts) and with ``cobatch_targets`` (default: the
  study's). Study A's true batching (list_b1/4/8 on two models and 450 prompts) is a scope.
  A repeat control (``<base>_repeat``, :mod:`batchflip.conditions`) that no scope names
  runs in the scope of its base condition.

Scope settings reach the generate job as ``condition_overrides`` (condition -> settings) in
its params; :func:`condition_params` merges them, so only the conditions a scope names see
them and changing a scope reruns only those jobs (hf engine) or that model's server job.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from batchflip.conditions import REPEAT
from batchflip.errors import BatchflipError

SCOPE_OVERRIDES = ("subset", "cobatch_targets")


def scope_of(study: Mapping[str, Any], condition: str) -> dict[str, Any] | None:
    """The scope naming ``condition`` (None when the condition is unscoped); a repeat
    control (``<base>_repeat``) that no scope names runs in its base condition's scope."""
    for scope in study.get("scopes") or []:
        if condition in scope["conditions"]:
            return dict(scope)
    if condition.endswith(REPEAT):
        return scope_of(study, condition[: -len(REPEAT)])
    return None


def conditions_for(study: Mapping[str, Any], model: str) -> list[str]:
    """The conditions ``model`` runs in a study, in the study's order."""
    out = []
    for cond in study["conditions"]:
        scope = scope_of(study, cond)
        if scope is None or model in scope.get("models", study["models"]):
            out.append(cond)
    return out


def models_for(study: Mapping[str, Any], condition: str) -> list[str]:
    """The models that run ``condition``."""
    scope = scope_of(study, condition) or {}
    return [m for m in study["models"] if m in scope.get("models", study["models"])]


def overrides(study: Mapping[str, Any], condition: str) -> dict[str, Any]:
    """The settings a scope sets for ``condition`` (empty when none)."""
    scope = scope_of(study, condition) or {}
    return {k: scope[k] for k in SCOPE_OVERRIDES if k in scope}


def condition_params(params: Mapping[str, Any], condition: str) -> dict[str, Any]:
    """A generate job's params for one condition: ``condition_overrides`` merged in."""
    out = {k: v for k, v in params.items() if k != "condition_overrides"}
    out.update((params.get("condition_overrides") or {}).get(condition, {}))
    return out


def select_subset(battery: pd.DataFrame, spec: Mapping[str, Any] | None,
                  where: str = "subset") -> pd.DataFrame:
    """The battery rows a subset spec keeps (all rows when ``spec`` is None), in order.

    Raises naming ``where.per_task.<task>`` when a task is not in the battery or has fewer
    prompts than asked.
    """
    if not spec:
        return battery
    method = spec.get("method", "head")
    if method not in ("head", "sample"):
        raise BatchflipError(f"{where}.method: '{method}' must be head or sample")
    keep = np.zeros(len(battery), dtype=bool)
    tasks = battery["task"].to_numpy()
    for task, n in spec["per_task"].items():
        idx = np.flatnonzero(tasks == task)
        if idx.size == 0:
            raise BatchflipError(f"{where}.per_task.{task}: no such task in the battery "
                                 f"(tasks: {', '.join(sorted(set(tasks)))})")
        if n > idx.size:
            raise BatchflipError(f"{where}.per_task.{task}: asks for {n} prompts, the battery "
                                 f"has {idx.size}")
        if method == "head":
            chosen = idx[:n]
        else:
            rng = np.random.default_rng([int(spec.get("seed", 0)), zlib.crc32(task.encode())])
            chosen = np.sort(rng.choice(idx, size=n, replace=False))
        keep[chosen] = True
    return battery[keep].reset_index(drop=True)



def target_spec(study: Mapping[str, Any], condition: str) -> dict[str, Any]:
    """Which battery prompts ``condition`` of a study sends as targets: its ``subset`` and,
    for a composition condition, its ``cobatch_targets`` (scope settings first); the
    score stage checks a generation file against it (:func:`expected_targets`)."""
    params = {**{k: study[k] for k in SCOPE_OVERRIDES if study.get(k)}, **overrides(study,
                                                                                 condition)}
    from batchflip.conditions import parse_condition

    spec: dict[str, Any] = {"subset": params.get("subset")}
    if parse_condition(condition).composition:
        spec["cobatch_targets"] = params.get("cobatch_targets") or []
    return spec


def expected_targets(battery: pd.DataFrame, spec: Mapping[str, Any]) -> list[str]:
    """The prompt ids a generation file must hold as targets under ``spec``
    (:func:`target_spec`), in battery order."""
    rows = select_subset(battery, spec.get("subset"))
    if "cobatch_targets" in spec:
        rows = rows[rows["task"].isin(spec["cobatch_targets"])]
    return rows["prompt_id"].astype(str).tolist()
