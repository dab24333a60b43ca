"""The results layout, the generation-settings rule and the rules' shared arguments, in one
place.

Everything the workflow writes lives under ``results/`` at the paths below; the rules
(``workflow/rules/*.smk``, through thin wrappers in ``common.smk``) and ``batchflip archive``
both take them from here. A path function called with wildcard names (``"{study}"``) gives
the rule's output pattern.

A generation job's ``params`` (:func:`generation_settings`) is exactly the settings that
change the rows it writes, an *inclusion* list, so Snakemake's ``params`` trigger reruns a
job when, and only when, its rows could change. A server study's keys in
:data:`SERVER_NOT_ROWS` change no row and stay out of ``params``; :func:`command_params`
adds them back to the ``--params`` JSON a command gets. A server job's params cover every
condition it runs (:func:`server_job_settings`); its argument string
(:func:`server_job_args`) is a params value derived from its outputs, outside the trigger.
Study D's reruns (:func:`ablation_settings`) take the serving keys of their source.

Which settings rerun which jobs (the table): docs/architecture.md.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from batchflip.conditions import GROUPING, parse_condition
from batchflip.design import conditions_for, overrides
from batchflip.errors import BatchflipError
from batchflip.kinds import KINDS
from batchflip.settings import DEFAULT_KERNEL_MODE, DEFAULT_THREADS

Config = Mapping[str, Any]

# --- the settings rule ----------------------------------------------------------------------

# how each prompt is served: every generation job, and Study D's reruns
SERVING_KEYS = ("engine", "dtype", "max_new_tokens", "seed", "kernel_mode", "threads",
                "prompt_format", "system_prompt", "server",
                "served_model")  # the last from the model entry (generation_settings)
# which prompts a job sends: every generation job
PROMPT_KEYS = ("battery", "subset")
# which targets and fillers a composition condition (cobatch_*, stagger_*) groups
COMPOSITION_KEYS = ("cobatch_targets", "filler_pools")
# what each row records beyond the text: every generation job (not Study D's reruns)
RECORD_KEYS = ("logprobs",)
# which host profile chose the settings above (batchflip.config.apply_cpu_profile): every
# generation job of a study it touched, and Study D's reruns of one
PROFILE_KEYS = ("cpu_profile",)
# server settings that change no row: how long to wait at start and stop, where logs go
# (cache_dir: where compile caches live; a cached graph is the graph that would be compiled),
# where a launched server binds (host, port, expose_host: no fingerprint records them) and
# which variable holds the token sent to an endpoint (api_key_env)
SERVER_NOT_ROWS = ("log_dir", "startup_timeout_s", "stop_grace_s", "cache_dir", "host", "port",
                   "expose_host", "api_key_env")
# engines that read ``server`` (the hf engine runs in process and ignores it)
SERVER_ENGINES = ("vllm", "openai")


def _composition(conditions: Iterable[str]) -> bool:
    return any(parse_condition(c).composition for c in conditions)


def _with_fillers(conditions: Iterable[str]) -> bool:
    """Whether a job runs a composition with fillers (its groups follow GROUPING)."""
    return any((c := parse_condition(name)).composition and c.pool != "solo"
               for name in conditions)


def _scope_settings(study: Mapping[str, Any], condition: str) -> dict[str, Any]:
    """A scope's settings for one condition, less those that change none of its rows."""
    own = overrides(study, condition)
    if not _composition([condition]):
        own = {k: v for k, v in own.items() if k not in COMPOSITION_KEYS}
    return own


def generation_settings(config: Config, study: str, model: str,
                        conditions: Iterable[str]) -> dict[str, Any]:
    """The settings that change the rows of one generation job (docs/architecture.md).

    ``conditions`` are the job's: one for an hf job, a server job's several. Scope
    settings go in ``condition_overrides`` only when there are any, so unscoped jobs keep
    their params."""
    conditions = list(conditions)
    s = config["studies"][study]
    keys = (SERVING_KEYS + PROMPT_KEYS + PROFILE_KEYS
            + (COMPOSITION_KEYS if _composition(conditions) else ()))
    out = {k: s[k] for k in keys if k in s}
    out.update({k: s[k] for k in RECORD_KEYS if s.get(k)})
    if _with_fillers(conditions):
        out["grouping"] = GROUPING
    server = {k: v for k, v in out.pop("server", {}).items() if k not in SERVER_NOT_ROWS}
    if server and s["engine"] in SERVER_ENGINES:
        out["server"] = server
    served = config["models"][model].get("served_model")
    if served:  # the name an endpoint serves the model under: which weights answer
        out["served_model"] = served
    dtype = config["models"][model].get("dtype")
    if dtype:  # one set of weights at two dtypes: two model entries (a serving setting)
        out["dtype"] = dtype
    fmt = config["models"][model].get("prompt_format")
    if fmt and fmt != out["prompt_format"]:
        out["prompt_format"] = fmt
        if fmt == "raw":
            out.pop("system_prompt", None)
    scoped = {c: v for c in conditions if (v := _scope_settings(s, c))}
    if scoped:
        out["condition_overrides"] = scoped
    return {**out, "study": study, "model": model}


def _launch_only(config: Config, study: str) -> dict[str, Any]:
    """A server study's settings in :data:`SERVER_NOT_ROWS` ({} for other engines)."""
    s = config["studies"][study]
    if s["engine"] not in SERVER_ENGINES:
        return {}
    return {k: v for k, v in (s.get("server") or {}).items() if k in SERVER_NOT_ROWS}


def _with_launch_only(config: Config, study: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``study``'s launch-only server keys added back (module docstring)."""
    extra = _launch_only(config, study)
    if not extra:
        return settings
    return {**settings, "server": {**settings.get("server", {}), **extra}}


def command_params(config: Config, study: str, model: str,
                   conditions: Iterable[str]) -> dict[str, Any]:
    """The ``--params`` a generation command gets: :func:`generation_settings` plus the
    study's server keys that change no row (:data:`SERVER_NOT_ROWS`), which the launch
    needs but the params trigger must not see."""
    return _with_launch_only(config, study,
                             generation_settings(config, study, model, conditions))


def ablation_settings(config: Config, study: str, model: str,
                      kernel_mode: str) -> dict[str, Any]:
    """Study D's rerun settings: the serving keys of the source's settings for ``model``,
    with the ablation's study name, engine and this kernel mode."""
    source = ablation_source(config, study)
    src = generation_settings(config, source, model, conditions_of(config, source, model))
    out = {k: src[k] for k in SERVING_KEYS + PROFILE_KEYS if k in src}
    out.update(study=study, model=model, kernel_mode=kernel_mode,
               engine=config["studies"][study]["engine"])
    probe = config["studies"][study].get("invariance_probe")
    if probe:  # batchflip.invariance_probe: runs before the reruns measure
        out["invariance_probe"] = probe
    return out


def ablation_command_params(config: Config, study: str, model: str,
                            kernel_mode: str) -> dict[str, Any]:
    """The ``--params`` of a Study D rerun: :func:`ablation_settings` plus its source's
    server keys that change no row (as :func:`command_params`)."""
    return _with_launch_only(config, ablation_source(config, study),
                             ablation_settings(config, study, model, kernel_mode))


def probe_control_stack(config: Config, study: str, model: str, kernel_mode: str
                        ) -> list[str]:
    """The standard rerun's fingerprint, the invariance probe's negative control, for a
    batch_invariant rerun of an ablation with a probe and both kernel modes (else [])."""
    s = config["studies"][study]
    if (kernel_mode != "batch_invariant" or not s.get("invariance_probe")
            or "standard" not in s["kernel_modes"]):
        return []
    return [stack_path(ablation_run_path(study, model, "standard"))]


# --- rule arguments -------------------------------------------------------------------------

# a wildcard constraint that no value matches: the rules of a kind, engine or feature no
# configured study has stay inert
NEVER_MATCHES = "(?!x)x"

# the keys of a model entry its build reads (the model rule's params, so a change rebuilds
# it); every other key (alignment, chat, prompt_format, quant, base, served_model, dtype)
# describes the weights or how a study uses them and changes none
MODEL_BUILD_KEYS = ("source", "package", "version", "gguf", "sha256", "chunks", "requantize",
                    "path", "id", "revision", "allow_patterns")


def name_pattern(names: Iterable[str]) -> str:
    """A wildcard constraint matching exactly ``names`` (identifiers, joined with ``|``),
    :data:`NEVER_MATCHES` when there are none."""
    return "|".join(names) or NEVER_MATCHES


def dispatch_baselines(config: Config, study: str, model: str | None = None
                       ) -> dict[str, str]:
    """A study's ``dispatch_baselines`` (dispatch -> its own baseline condition) that apply:
    for ``model``, those whose baseline condition the model runs (a scope may leave a
    dispatch out); for the whole study (None), those some model of it runs."""
    own = config["studies"][study].get("dispatch_baselines", {})
    models = [model] if model else config["studies"][study]["models"]
    runs = {c for m in models for c in conditions_of(config, study, m)}
    return {d: c for d, c in sorted(own.items()) if c in runs}


def dispatch_baseline_args(config: Config, study: str, model: str | None = None
                           ) -> list[str]:
    """``--dispatch-baseline``, ``d=c`` for each of :func:`dispatch_baselines`: the
    arguments of the flips, divergence, repeat, verify and ablation-candidates commands, as
    a list (a shell line quotes each element with ``:q``)."""
    return [a for d, c in dispatch_baselines(config, study, model).items()
            for a in ("--dispatch-baseline", f"{d}={c}")]


def model_build_spec(config: Config, model: str) -> str:
    """The model rule's spec: the entry's :data:`MODEL_BUILD_KEYS`, as canonical JSON."""
    spec = config["models"][model]
    return json.dumps({k: v for k, v in spec.items() if k in MODEL_BUILD_KEYS},
                      sort_keys=True)


def server_job_settings(config: Config, job: ServerJob, model: str) -> str:
    """A server job's params trigger for ``model``: every part's
    :func:`generation_settings`, as canonical JSON, so a change in any part's rows reruns
    the job (its studies share the server) and nothing else does."""
    return json.dumps([generation_settings(config, study, model, conds)
                       for study, conds in job.parts], sort_keys=True)


def server_job_args(config: Config, job: ServerJob, model: str, gens: list[str],
                    stacks: list[str]) -> str:
    """The ``batchflip generate`` arguments of one server job for ``model``, each
    shell-quoted: per part ``--battery`` and ``--params`` (its :func:`command_params` as
    canonical JSON), then a ``--condition``/``--out``/``--stack-out`` triple per condition;
    ``gens`` and ``stacks`` are the job's outputs in part and condition order. A params
    value computed from the outputs, which Snakemake's params trigger leaves out: the
    trigger is :func:`server_job_settings`."""
    n = sum(len(conds) for _, conds in job.parts)
    if n != len(gens) or n != len(stacks):
        raise BatchflipError(f"server job {job.name}: {n} conditions but {len(gens)} "
                             f"outputs and {len(stacks)} stack files")
    args: list[str] = []
    i = 0
    for study, conds in job.parts:
        settings = json.dumps(command_params(config, study, model, conds), sort_keys=True)
        args += ["--battery", study_battery(config, study), "--params", settings]
        for c in conds:
            args += ["--condition", c, "--out", gens[i], "--stack-out", stacks[i]]
            i += 1
    return " ".join(shlex.quote(str(a)) for a in args)


# --- studies --------------------------------------------------------------------------------


def conditions_of(config: Config, study: str, model: str) -> list[str]:
    """The conditions a model runs in a study (scopes may leave some out)."""
    return conditions_for(config["studies"][study], model)


def ablation_source(config: Config, study: str) -> str:
    """The discovery study whose flips an ablation study reruns."""
    return config["studies"][study]["source"]


def ablation_models(config: Config, study: str) -> list[str]:
    """An ablation's models: its own ``models`` if given, else all of its source's."""
    s = config["studies"][study]
    return s.get("models") or config["studies"][ablation_source(config, study)]["models"]


def job_threads(study: Mapping[str, Any]) -> int:
    """Cores a generation job of a study asks Snakemake for (``threads``; when unset
    settings.DEFAULT_THREADS, and then the engine keeps its own thread default)."""
    return int(study.get("threads", DEFAULT_THREADS))


# what a launched server (or the endpoint a client keeps) depends on: studies whose
# settings agree on these for a model share one server job
LAUNCH_KEYS = ("engine", "dtype", "seed", "kernel_mode", "threads", "server")


class ServerJob(NamedTuple):
    """One server generate rule: its name, its models, and the (study, conditions) parts
    it runs against one server per model."""

    name: str
    models: list[str]
    parts: list[tuple[str, list[str]]]


def launch_key(settings: Mapping[str, Any]) -> str:
    """The launch-relevant part of a job's generation settings, as canonical JSON
    (``kernel_mode`` defaults to settings.DEFAULT_KERNEL_MODE, as the engines read it)."""
    key = {k: settings.get(k) for k in LAUNCH_KEYS}
    key["kernel_mode"] = key["kernel_mode"] or DEFAULT_KERNEL_MODE
    return json.dumps(key, sort_keys=True, default=str)


def _stage(config: Config, study: str) -> int:
    """0 for a study with its own battery; 1 + its source's for an enriched study (its
    battery comes from the source's results, so the two can never share a job)."""
    source = config["studies"][study].get("subset_from")
    return 0 if not source else 1 + _stage(config, source["study"])


def server_jobs(config: Config) -> list[ServerJob]:
    """The server generate rules (None when restoring).

    For each model, the server studies (not ablations) whose :func:`command_params` agree
    on :data:`LAUNCH_KEYS` share one job: one server start serves all their conditions, in
    config order; an enriched study (``subset_from``) never shares with its source. Their
    repeat controls (``*_repeat``) run in a job of their own, named with ``_repeat``: a
    fresh server start, never the one their baselines ran on. Models
    with the same parts and launch settings (scopes may give models different condition
    lists) share one rule. A rule is named ``generate_server_`` plus its studies joined by
    ``__``, with ``_<i>`` when several rules would get that name.
    """
    if config.get("restore"):
        return []
    # (model, launch key, stage) -> its parts; the stage keeps a study apart from its source
    # (model, launch key, stage, repeat) -> its parts; the stage keeps a study apart from
    # its source, the repeat flag the repeat controls apart from their baselines' server
    shared: dict[tuple[str, str, int, bool], list[tuple[str, tuple[str, ...]]]] = {}
    for study, s in config["studies"].items():
        if s["kind"] == "ablation" or s["engine"] not in SERVER_ENGINES:
            continue  # ablation reruns have rules of their own (study_ablation.smk)
        for m in s["models"]:
            conds = tuple(conditions_of(config, study, m))
            key = launch_key(command_params(config, study, m, conds))
            for repeat in (False, True):
                mine = tuple(c for c in conds if parse_condition(c).repeat == repeat)
                if mine:
                    shared.setdefault((m, key, _stage(config, study), repeat), []).append(
                        (study, mine))
    # models whose launch key and parts agree share one rule
    rules: dict[tuple[str, bool, tuple[tuple[str, tuple[str, ...]], ...]], list[str]] = {}
    for (m, key, _, repeat), parts in shared.items():
        rules.setdefault((key, repeat, tuple(parts)), []).append(m)
    named: dict[str, list[tuple[list[str], list[tuple[str, list[str]]]]]] = {}
    for (_, repeat, parts), models in rules.items():
        base = "generate_server_" + "__".join(st for st, _ in parts) + ("_repeat" if repeat
                                                                       else "")
        named.setdefault(base, []).append((models, [(st, list(c)) for st, c in parts]))
    out = []
    for base, jobs in named.items():
        for i, (models, job_parts) in enumerate(jobs):
            out.append(ServerJob(base + (f"_{i}" if len(jobs) > 1 else ""), models, job_parts))
    return out


# --- paths ----------------------------------------------------------------------------------


def battery_path(battery: str) -> str:
    """A battery built from task files or a builder."""
    return f"results/battery/{battery}.parquet"


def enriched_battery_path(study: str) -> str:
    """An enriched study's battery: the source's boundary-sensitive prompts."""
    return f"results/battery/enriched/{study}.parquet"


def study_battery(config: Config, study: str) -> str:
    """The battery a (non-ablation) study runs: its own, or its enriched subset."""
    s = config["studies"][study]
    return enriched_battery_path(study) if s.get("subset_from") else battery_path(s["battery"])


def generation_path(study: str, model: str, condition: str) -> str:
    """One generation file (its stack fingerprint: :func:`stack_path`)."""
    return f"results/generations/{study}/{model}/{condition}.parquet"


def stack_path(parquet: str) -> str:
    """The stack fingerprint beside a generation or rerun file."""
    if not parquet.endswith(".parquet"):
        raise BatchflipError(f"{parquet}: a stack fingerprint sits beside a .parquet file")
    return parquet[: -len(".parquet")] + ".stack.json"


def scored_path(study: str, model: str, condition: str) -> str:
    """One scored generation file."""
    return f"results/scored/{study}/{model}/{condition}.parquet"


def flips_path(study: str, model: str) -> str:
    """Every condition of a model paired against its baseline."""
    return f"results/flips/{study}/{model}.parquet"


def numbers_path(name: str) -> str:
    """A numbers file: a study's, or adjudication_<study>, enriched_<study>,
    repeat_<study>, fidelity."""
    return f"results/numbers/{name}.json"


def figure_path(study: str, name: str, ext: str) -> str:
    """One figure of a study (png or pdf)."""
    return f"results/figures/{study}_{name}.{ext}"


def ablation_candidates_path(study: str, model: str) -> str:
    """Study D: the source's flips to rerun, with their groups."""
    return f"results/ablation/{study}/{model}/candidates.parquet"


def ablation_run_path(study: str, model: str, kernel_mode: str) -> str:
    """Study D: the reruns under one kernel mode (fingerprint: :func:`stack_path`)."""
    return f"results/ablation/{study}/{model}/{kernel_mode}.parquet"


def adjudication_sheet_path(study: str, rater: str) -> str:
    """A blinded review sheet for one rater."""
    return f"results/adjudication/{study}/sheet_{rater}.csv"


def adjudication_key_path(study: str) -> str:
    """The unblinding key the export writes."""
    return f"results/adjudication/{study}/key.parquet"


def pinned_key_path(study: str) -> str:
    """The key pinned by hand after sending the sheets (preferred when present)."""
    return f"resources/adjudication/{study}/key.parquet"


def generation_paths(config: Config, study: str, model: str | None = None) -> list[str]:
    """Every generation file of a (non-ablation) study, or of one of its models."""
    models = [model] if model else config["studies"][study]["models"]
    return [generation_path(study, m, c) for m in models
            for c in conditions_of(config, study, m)]


def scored_paths(config: Config, study: str, model: str | None = None) -> list[str]:
    """The scored files of one model of a study, or of all its models."""
    models = [model] if model else config["studies"][study]["models"]
    return [scored_path(study, m, c) for m in models for c in conditions_of(config, study, m)]


def flips_paths(config: Config, study: str) -> list[str]:
    """The flips files of a study, one per model."""
    return [flips_path(study, m) for m in config["studies"][study]["models"]]


def ablation_keyed_run_path(study: str, model: str, kernel_mode: str, key: str) -> str:
    """Study D: the reruns of the candidate list with content key ``key`` (batchflip.keyed);
    the current key's file is copied to :func:`ablation_run_path`."""
    return f"results/ablation/{study}/{model}/{kernel_mode}/{key}.parquet"


def keyed_generation_path(study: str, model: str, condition: str, key: str) -> str:
    """An enriched study's generation file for the battery with content key ``key``
    (batchflip.keyed); the current key's file is copied to :func:`generation_path`."""
    return f"results/generations/{study}/{model}/keyed/{key}/{condition}.parquet"


def ablation_run_paths(config: Config, study: str) -> list[str]:
    """Study D's rerun files, per model and kernel mode."""
    return [ablation_run_path(study, m, k) for m in ablation_models(config, study)
            for k in config["studies"][study]["kernel_modes"]]


def archive_members(config: Config, studies: Iterable[str] | None = None) -> list[str]:
    """Workspace paths a config's results rest on (``batchflip archive pack``): each
    generation file and Study D rerun with its fingerprint, and each study's battery."""
    out: set[str] = set()
    for s in list(studies or config["studies"]):
        if s not in config["studies"]:
            raise BatchflipError(f"study '{s}' is not in the config")
        if config["studies"][s]["kind"] == "ablation":
            runs = ablation_run_paths(config, s)
        else:
            runs = generation_paths(config, s)
            out.add(study_battery(config, s))
        out |= {p for r in runs for p in (r, stack_path(r))}
    return sorted(out)


# --- token log-probabilities (batchflip.divergence, batchflip.screen) -------------------------

# figures of a study recorded with logprobs (beside its kind's figures)
LOGPROB_FIGURES = ["divergence"]


def logprob_studies(config: Config) -> list[str]:
    """The generation studies that record the top-2 log-probabilities (``logprobs >= 2``):
    the ones with divergence numbers and a margin screen."""
    return [s for s, v in config["studies"].items()
            if v["kind"] != "ablation" and int(v.get("logprobs") or 0) >= 2]


def baseline_conditions(config: Config, study: str, model: str) -> list[str]:
    """A model's baseline conditions: the study's baseline and each dispatch's own."""
    s, conds = config["studies"][study], conditions_of(config, study, model)
    own = [c for c in s.get("dispatch_baselines", {}).values() if c in conds]
    return [s["baseline"], *sorted(set(own) - {s["baseline"]})]


def divergence_pairs_path(study: str, model: str) -> str:
    """One model's pairs with where (and at what margin) their tokens diverge."""
    return f"results/divergence/{study}/{model}.parquet"


def screen_path(study: str, model: str, condition: str) -> str:
    """The ranked prompt list (lowest minimum margin first) of one batch-1 run."""
    return f"results/screen/{study}/{model}/{condition}.csv"


def screen_paths(config: Config, study: str) -> list[str]:
    """The screens of a study: one per model and baseline condition."""
    return [screen_path(study, m, c) for m in config["studies"][study]["models"]
            for c in baseline_conditions(config, study, m)]


# --- the paper ------------------------------------------------------------------------------

# figures each kind of study contributes to the paper (flip_agreement only where it has a
# pair to draw: :func:`study_figures`)
FIGURES_BY_KIND = {name: list(kind.figures) for name, kind in KINDS.items()}


def has_agreement(config: Config, study: str) -> bool:
    """True when some model of a study runs both ``list_b{n}`` and ``sync_b{n}`` for one
    n > 1 (the pairs of Study A's flip agreement, the paper's Figure 4)."""
    s = config["studies"][study]
    for model in s.get("models", []):
        parsed = [parse_condition(c) for c in conditions_of(config, study, model)]
        sizes = {d: {c.batch_size for c in parsed if c.dispatch == d and c.batch_size > 1}
                 for d in ("sync", "list")}
        if sizes["sync"] & sizes["list"]:
            return True
    return False


def study_figures(config: Config, study: str) -> list[str]:
    """The figure names a study contributes to the paper."""
    names = FIGURES_BY_KIND[config["studies"][study]["kind"]]
    return [n for n in names if n != "flip_agreement" or has_agreement(config, study)]


def repeat_studies(config: Config) -> list[str]:
    """The generation studies that run a repeat control (a ``*_repeat`` condition): the
    ones with repeat numbers (:mod:`batchflip.repeat`)."""
    return [s for s, v in config["studies"].items() if v["kind"] != "ablation"
            and any(parse_condition(c).repeat for c in v["conditions"])]


def paper_numbers(config: Config) -> list[str]:
    """The numbers files of results/paper: each paper study's, the adjudication of its
    discovery studies, the enriched comparisons, the divergence and screen numbers of the
    studies recorded with logprobs, the repeat controls and the fidelity check."""
    studies = config["paper"]["studies"]
    repeats = set(repeat_studies(config))
    kinds = {s: config["studies"][s] for s in studies}
    return ([numbers_path(s) for s in studies]
            + [numbers_path(f"adjudication_{s}") for s in studies
               if kinds[s]["kind"] == "discovery"]
            + [numbers_path(f"enriched_{s}") for s in studies if kinds[s].get("subset_from")]
            + [numbers_path(f"divergence_{s}") for s in studies
               if s in logprob_studies(config)]
            + [numbers_path(f"repeat_{s}") for s in studies if s in repeats]
            + [numbers_path("fidelity")])


def paper_figures(config: Config) -> list[str]:
    """The figures of results/paper (png and pdf of each of a paper study's figures)."""
    lp = logprob_studies(config)
    return [figure_path(s, n, ext) for s in config["paper"]["studies"]
            for n in study_figures(config, s) + (LOGPROB_FIGURES if s in lp else [])
            for ext in ("png", "pdf")]


def paper_stacks(config: Config) -> list[str]:
    """The stack fingerprints behind results/paper (report.html's models, engines, devices
    and versions): every generation file of a paper study, or its reruns (ablation)."""
    files = []
    for study in config["paper"]["studies"]:
        ablation = config["studies"][study]["kind"] == "ablation"
        files += (ablation_run_paths if ablation else generation_paths)(config, study)
    return [stack_path(f) for f in files]
