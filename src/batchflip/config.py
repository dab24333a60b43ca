"""Config checks run by the Snakefile at start-up, before any job.

First the JSON schema (``workflow/schemas/config.schema.yaml``): the first violation stops
the run with the dotted key, the offending value and the schema rule it broke. Then the
cross-references a schema cannot express (conditions parse, the baseline is one of the
study's conditions, batteries and models exist, composition conditions have targets and
pools; a synchronized or list condition's batch is no larger than the prompts the study
sends it; an ablation study names a discovery source on its own engine and sets none of the
generation settings it inherits from that source; a hub model pins its revision).
Last, every absent key with a schema ``default`` is filled in (:func:`fill_defaults`), so
the rules and ``batchflip.layout`` read config values directly: the schema is the one
place a config default is written.

Before all that, :func:`apply_cpu_profile` merges the host's entry of ``cpu_profiles`` (if
the config has one) into the studies it names, so the merged studies are what is checked.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from batchflip.conditions import BATCHED_DISPATCHES, CONC, REPEAT, parse_condition
from batchflip.design import models_for, scope_of
from batchflip.errors import BatchflipError
from batchflip.hub import check_revision
from batchflip.platform_facts import native_bf16

# the profiles a config's ``cpu_profiles`` may hold, and the variable that pins the choice
CPU_PROFILES = ("no_native_bf16",)
CPU_PROFILE_ENV = "BATCHFLIP_CPU_PROFILE"


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def check_schema(config: dict[str, Any], schema_file: str | Path) -> None:
    """Validate against the schema; raise naming key, value and rule of the first error."""
    schema = yaml.safe_load(Path(schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(e.path)))
    if errors:
        e = errors[0]
        raise BatchflipError(
            f"invalid config: key '{_key(e.path)}' breaks schema rule '{e.validator}' "
            f"({_key(e.schema_path)}): {e.message}")


def fill_defaults(instance: Any, schema: dict[str, Any],
                  root: dict[str, Any] | None = None) -> None:
    """Set every absent key that has a schema ``default``, in place, top-down.

    Follows ``properties``, ``additionalProperties``, ``items``, local ``$ref`` and the
    ``if``/``then``/``else`` of ``allOf`` (the branch that applies to the instance), so a
    default given in a study's non-ablation branch reaches only those studies. Run it on a
    valid config: it does not check values."""
    root = schema if root is None else root
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise BatchflipError(f"schema: only local $ref are supported, not '{ref}'")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        fill_defaults(instance, target, root)
    for part in schema.get("allOf", []):
        if "if" in part:
            ok = jsonschema.Draft202012Validator(part["if"]).is_valid(instance)
            branch = part.get("then" if ok else "else")
            if branch:
                fill_defaults(instance, branch, root)
        else:
            fill_defaults(instance, part, root)
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if key in props:
                fill_defaults(value, props[key], root)
            elif isinstance(extra, dict):
                fill_defaults(value, extra, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"], root)


def check_models(config: dict[str, Any]) -> None:
    """A hub model pins its revision (batchflip.hub.check_revision); only hub models take
    ``revision`` and ``allow_patterns``; only a GGUF (``pypi_gguf``) can be requantized,
    and a requantized model's ``quant``, if given, is the type it is requantized to. Raise
    naming the key at fault."""
    for name, spec in config["models"].items():
        source = spec.get("source")
        if spec.get("requantize"):
            if source != "pypi_gguf":
                raise BatchflipError(f"invalid config: key 'models.{name}.requantize': only a "
                                     f"GGUF can be requantized (source pypi_gguf; source is "
                                     f"'{source}')")
            if spec.get("quant", spec["requantize"]) != spec["requantize"]:
                raise BatchflipError(
                    f"invalid config: key 'models.{name}.quant': '{spec['quant']}' but "
                    f"requantize makes the weights '{spec['requantize']}' (leave quant out "
                    "or give the same type)")
        if source == "hub":
            check_revision(name, spec)
            continue
        for key in ("revision", "allow_patterns"):
            if key in spec:
                raise BatchflipError(f"invalid config: key 'models.{name}.{key}': only hub "
                                     f"models take it (source is '{source}')")


def model_quant(config: dict[str, Any], model: str) -> dict[str, str] | None:
    """``{"base": ..., "quant": ...}`` of a model that records its quantization (``quant``,
    or the ``requantize`` type), else None; ``base`` defaults to the model's own name."""
    spec = config["models"][model]
    quant = spec.get("quant") or spec.get("requantize")
    return {"base": spec.get("base", model), "quant": quant} if quant else None


def check_quant_axis(config: dict[str, Any], name: str) -> None:
    """In a study with ``conc`` conditions (Study A phase 3) no two models may be the same
    quantization of one base model: their rows would fall into one ANOVA cell."""
    study = config["studies"][name]
    if not any(parse_condition(c).dispatch == CONC for c in study["conditions"]):
        return
    seen: dict[tuple[str, str], str] = {}
    for m in study["models"]:
        q = model_quant(config, m)
        if q is None:
            continue
        key = (q["base"], q["quant"])
        if key in seen:
            raise BatchflipError(f"invalid config: key 'studies.{name}.models': models "
                                 f"'{seen[key]}' and '{m}' are both quant {q['quant']} of "
                                 f"base '{q['base']}' (set models.{m}.base or .quant)")
        seen[key] = m


def check_endpoint_models(config: dict[str, Any], name: str) -> None:
    """A ``source: endpoint`` model runs only where a running endpoint serves it (engine
    openai, or vllm with server.base_url) and with raw prompts (no tokenizer here)."""
    study = config["studies"][name]
    for m in study["models"]:
        spec = config["models"][m]
        if spec.get("source") != "endpoint":
            continue
        served = study["engine"] == "openai" or (
            study["engine"] == "vllm" and (study.get("server") or {}).get("base_url"))
        if not served:
            raise BatchflipError(f"invalid config: key 'studies.{name}.engine': model '{m}' "
                                 "is served by an endpoint (source endpoint); the study needs "
                                 "engine openai (or vllm with server.base_url)")
        if spec.get("prompt_format", study["prompt_format"]) != "raw":
            raise BatchflipError(f"invalid config: key 'models.{m}.prompt_format': an endpoint "
                                 "model has no tokenizer here to apply a chat template; set "
                                 "prompt_format: raw")


def check_references(config: dict[str, Any]) -> None:
    """Cross-field checks; raise naming the key at fault."""
    check_models(config)
    for name, study in config["studies"].items():
        where = f"studies.{name}"
        if study["kind"] == "ablation":
            check_ablation(config, name)
            continue
        if study["battery"] not in config["batteries"]:
            raise BatchflipError(f"invalid config: key '{where}.battery': battery "
                                 f"'{study['battery']}' is not defined under 'batteries'")
        for m in study["models"]:
            if m not in config["models"]:
                raise BatchflipError(f"invalid config: key '{where}.models': model '{m}' is "
                                     "not defined under 'models'")
        conds = [parse_condition(c) for c in study["conditions"]]
        if study["baseline"] not in study["conditions"]:
            raise BatchflipError(f"invalid config: key '{where}.baseline': "
                                 f"'{study['baseline']}' is not one of its conditions")
        for d, base in study.get("dispatch_baselines", {}).items():
            if base not in study["conditions"] or parse_condition(base).dispatch != d:
                raise BatchflipError(f"invalid config: key '{where}.dispatch_baselines.{d}': "
                                     f"'{base}' must be one of its {d} conditions")
        for c in conds:
            paired = study.get("dispatch_baselines", {}).get(c.dispatch, study["baseline"])
            if c.repeat and c.base != paired:
                raise BatchflipError(f"invalid config: key '{where}.conditions': '{c.name}' "
                                     f"repeats '{c.base}', but it is paired with '{paired}'; "
                                     f"a repeat control repeats its baseline ({paired}"
                                     f"{REPEAT})")
            if c.composition and not study.get("cobatch_targets"):
                raise BatchflipError(f"invalid config: key '{where}.cobatch_targets': needed "
                                     f"by condition '{c.name}'")
            if c.composition and c.pool != "solo" and c.pool not in study.get("filler_pools",
                                                                                {}):
                raise BatchflipError(f"invalid config: key '{where}.filler_pools': no pool "
                                     f"'{c.pool}' for condition '{c.name}'")
            if c.dispatch == "stagger" and study["engine"] == "hf":
                raise BatchflipError(f"invalid config: key '{where}.conditions': '{c.name}' "
                                     "needs a continuous-batching server; engine hf has none")
            if c.dispatch == CONC and study["engine"] == "hf":
                raise BatchflipError(f"invalid config: key '{where}.conditions': '{c.name}' "
                                     "is a stream of single-prompt requests with a "
                                     "concurrency cap; engine hf serves no requests (use "
                                     "vllm or openai)")
        check_design(config, name)
        check_batch_sizes(config, name)
        check_quant_axis(config, name)
        check_endpoint_models(config, name)
    for s in config.get("paper", {}).get("studies", []):
        if s not in config["studies"]:
            raise BatchflipError(f"invalid config: key 'paper.studies': unknown study '{s}'")
    if config.get("restore") and config.get("verify"):
        raise BatchflipError("invalid config: keys 'restore' and 'verify' are both set: verify "
                             "compares fresh generations with an archive, restore copies "
                             "them out of it; set one")


# settings an ablation study takes from its source study (it may not set them itself)
ABLATION_INHERITED = ("battery", "dtype", "max_new_tokens", "seed", "kernel_mode", "threads",
                      "prompt_format", "system_prompt", "baseline", "dispatch_baselines",
                      "conditions", "cobatch_targets", "filler_pools", "server", "logprobs")


def check_ablation(config: dict[str, Any], name: str) -> None:
    """An ablation study (Study D) names a discovery source on the same engine, and
    reruns its flips with the source's settings; raise naming the key at fault."""
    study, where = config["studies"][name], f"studies.{name}"
    source = study["source"]
    if source not in config["studies"]:
        raise BatchflipError(f"invalid config: key '{where}.source': unknown study '{source}'")
    src = config["studies"][source]
    if src["kind"] != "discovery":
        raise BatchflipError(f"invalid config: key '{where}.source': study '{source}' is of "
                             f"kind '{src['kind']}'; an ablation reruns the label flips of a "
                             "discovery study")
    if study["engine"] != src["engine"]:
        raise BatchflipError(f"invalid config: key '{where}.engine': '{study['engine']}' but "
                             f"source study '{source}' runs on engine '{src['engine']}'; the "
                             "ablation reruns the source's flips on the same engine")
    for key in ABLATION_INHERITED:
        if key in study:
            raise BatchflipError(f"invalid config: key '{where}.{key}': an ablation study "
                                 f"reruns with its source's settings; set it on "
                                 f"'studies.{source}' instead")
    for m in study.get("models", []):
        if m not in src["models"]:
            raise BatchflipError(f"invalid config: key '{where}.models': model '{m}' is not "
                                 f"a model of source study '{source}'")
    used = {parse_condition(c).dispatch for c in src["conditions"]}
    for d in study.get("dispatches", []):
        if d not in used:
            raise BatchflipError(f"invalid config: key '{where}.dispatches': no condition of "
                                 f"source study '{source}' uses dispatch '{d}'")


def check_design(config: dict[str, Any], name: str) -> None:
    """Scopes, subset_from and model prompt formats of one study (batchflip.design)."""
    study, where = config["studies"][name], f"studies.{name}"
    seen: dict[str, int] = {}
    for i, scope in enumerate(study.get("scopes") or []):
        for c in scope["conditions"]:
            if c not in study["conditions"]:
                raise BatchflipError(f"invalid config: key '{where}.scopes.{i}.conditions': "
                                     f"'{c}' is not one of the study's conditions")
            if c in seen:
                raise BatchflipError(f"invalid config: key '{where}.scopes.{i}.conditions': "
                                     f"'{c}' is already in scope {seen[c]}")
            seen[c] = i
        for m in scope.get("models", []):
            if m not in study["models"]:
                raise BatchflipError(f"invalid config: key '{where}.scopes.{i}.models': "
                                     f"'{m}' is not one of the study's models")
    # every model that runs a condition also runs the condition it is paired against
    own = study.get("dispatch_baselines", {})
    for c in study["conditions"]:
        base = own.get(parse_condition(c).dispatch, study["baseline"])
        missing = set(models_for(study, c)) - set(models_for(study, base))
        if missing:
            raise BatchflipError(f"invalid config: key '{where}.scopes': models "
                                 f"{sorted(missing)} run '{c}' but not its baseline '{base}'")
    src = study.get("subset_from")
    if src:
        if src["study"] not in config["studies"] or src["study"] == name:
            raise BatchflipError(f"invalid config: key '{where}.subset_from.study': "
                                 f"'{src['study']}' must be another study")
        source = config["studies"][src["study"]]
        if source.get("battery") != study["battery"]:
            raise BatchflipError(f"invalid config: key '{where}.battery': '{study['battery']}'"
                                 f" but subset_from study '{src['study']}' ran battery "
                                 f"'{source.get('battery')}'; the subset is drawn from it")
    for m in study["models"]:
        fmt = config["models"][m].get("prompt_format", study["prompt_format"])
        if fmt == "chat" and config["models"][m].get("chat") is False:
            raise BatchflipError(f"invalid config: key 'models.{m}.prompt_format': model has "
                                 f"no chat template (chat: false) but study '{name}' sends "
                                 "chat prompts; set prompt_format: raw on the model")


def battery_size(config: dict[str, Any], battery: str) -> int | None:
    """Prompts in a battery of task-YAML files (their samples, counted without rendering);
    None when it cannot be known before the battery rule runs (a builder, or a path that is
    not there yet, e.g. a battery restored from an archive)."""
    spec = config["batteries"][battery]
    if spec.get("builder") or not spec.get("paths"):
        return None
    from batchflip.battery import task_files

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    total = 0
    try:
        for path in task_files(spec["paths"]):
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
            samples = doc.get("samples") if isinstance(doc, dict) else None
            if not isinstance(samples, list):
                return None  # the battery rule reports the bad file
            total += len(samples)
    except (BatchflipError, OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return total


def prompts_sent(config: dict[str, Any], name: str, condition: str,
                 sizes: dict[str, int | None]) -> int | None:
    """How many prompts study ``name`` sends in ``condition`` (its scope's subset, else the
    study's, else the whole battery); None when only the job can tell (an enriched study,
    a battery not countable before it is built). ``sizes`` caches battery sizes."""
    study = config["studies"][name]
    subset = (scope_of(study, condition) or {}).get("subset") or study.get("subset")
    if subset:
        return sum(int(n) for n in subset["per_task"].values())
    if study.get("subset_from"):
        return None
    if study["battery"] not in sizes:
        sizes[study["battery"]] = battery_size(config, study["battery"])
    return sizes[study["battery"]]


def check_batch_sizes(config: dict[str, Any], name: str,
                      sizes: dict[str, int | None] | None = None) -> None:
    """A synchronized or list condition (``sync_b{n}``, ``list_b{n}``) with fewer prompts
    than n would run one smaller group and still record batch_size n on every row: refuse
    it, naming study, condition and counts (generate.run_job checks again at run time)."""
    study, sizes = config["studies"][name], {} if sizes is None else sizes
    for c in study["conditions"]:
        cond = parse_condition(c)
        if cond.dispatch not in BATCHED_DISPATCHES or cond.composition:
            continue
        n = prompts_sent(config, name, c, sizes)
        if n is not None and cond.batch_size > n:
            raise BatchflipError(
                f"invalid config: key 'studies.{name}.conditions': condition '{c}' of study "
                f"'{name}' sends batches of {cond.batch_size} prompts, but the study sends "
                f"only {n} prompts in it (after subset and scopes); its one group would "
                f"hold {n} and be recorded as batch_size {cond.batch_size}")


def check_config(config: dict[str, Any], schema_file: str | Path) -> None:
    """Schema first, then cross-references; then fill the schema's defaults in place."""
    check_schema(config, schema_file)
    check_references(config)
    fill_defaults(config, yaml.safe_load(Path(schema_file).read_text()))


def cpu_profile_for(cpu: Mapping[str, Any]) -> str | None:
    """The profile a CPU calls for: ``no_native_bf16`` without native bf16
    (:func:`batchflip.platform_facts.native_bf16`, which honours the ISA caps), else None."""
    return None if native_bf16(cpu) else "no_native_bf16"


def apply_cpu_profile(config: dict[str, Any], cpu: Mapping[str, Any],
                      pinned: str | None = None) -> str | None:
    """Merge ``cpu_profiles.<profile>.studies`` into ``config["studies"]`` in place (each
    named study's keys replaced, and ``cpu_profile`` set to the profile's name, which the
    jobs' params and stack fingerprints carry); return the profile applied, or None.

    The profile is ``pinned`` when given (a name, or ``none``: the value of
    :data:`CPU_PROFILE_ENV`), else :func:`cpu_profile_for` of ``cpu``. A config without
    ``cpu_profiles``, or without the host's profile, is left as it is; a pinned name it
    lacks, or a profile naming a study the config lacks, is an error.
    """
    if pinned == "none":
        return None
    if pinned is not None and pinned not in CPU_PROFILES:
        raise BatchflipError(f"{CPU_PROFILE_ENV}={pinned!r}: not a CPU profile; known: "
                             f"{', '.join(CPU_PROFILES)}, none")
    profiles = config.get("cpu_profiles") or {}
    name = pinned or cpu_profile_for(cpu)
    if name not in profiles:
        if pinned and profiles:
            raise BatchflipError(f"{CPU_PROFILE_ENV}={pinned}: the config has no "
                                 f"cpu_profiles.{pinned}")
        return None
    studies = (profiles[name] or {}).get("studies") or {}
    if not isinstance(studies, Mapping):
        raise BatchflipError(f"invalid config: key 'cpu_profiles.{name}.studies': expected a "
                             f"mapping of study names to settings, got {studies!r}")
    for study, keys in studies.items():
        where = f"cpu_profiles.{name}.studies.{study}"
        if study not in (config.get("studies") or {}):
            raise BatchflipError(f"invalid config: key '{where}': no study '{study}' in studies")
        if not isinstance(keys, Mapping):
            raise BatchflipError(f"invalid config: key '{where}': expected a mapping of study "
                                 f"settings, got {keys!r}")
        config["studies"][study].update(copy.deepcopy(dict(keys)))
        config["studies"][study]["cpu_profile"] = name
    return name
