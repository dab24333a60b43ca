"""One generation job's settings, parsed and checked once.

:class:`GenerationSettings` is what ``batchflip generate --params`` and ``batchflip
ablation generate --params`` carry (the JSON that :func:`batchflip.layout.generation_settings`
and :func:`batchflip.layout.ablation_settings` write), and what the engines, the generate
stage and the GPU lease take. Defaults live here and nowhere else.

Contract: :meth:`GenerationSettings.as_dict` returns exactly the keys that were given, with
their values, so what is hashed from it (job keys, reuse keys) is the same as the JSON the
job received; a default fills a field, never the dict.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchflip.errors import BatchflipError

# the kernel modes a study may name, and the one a job without ``kernel_mode`` runs
KERNEL_MODES = ("standard", "batch_invariant")
DEFAULT_KERNEL_MODE = "standard"
ENGINES = ("hf", "vllm", "openai")
DTYPES = ("auto", "bfloat16", "float16", "float32")  # auto: bf16 where native
PROMPT_FORMATS = ("raw", "chat")
# cores a job asks for when the study sets no ``threads`` (layout.job_threads)
DEFAULT_THREADS = 1

_REQUIRED = ("study", "model", "engine", "dtype", "max_new_tokens", "seed", "prompt_format")


def _check(name: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise BatchflipError(f"generation settings: {name} must be {want}, got {value!r}")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_mapping(value: Any) -> bool:
    return value is None or isinstance(value, Mapping)


@dataclass(frozen=True)
class GenerationSettings:
    """The settings that change a generation job's rows (batchflip.layout's docstring),
    typed; plus ``invariance_probe`` for Study D's reruns."""

    study: str
    model: str
    engine: str
    dtype: str
    max_new_tokens: int
    seed: int
    prompt_format: str
    kernel_mode: str = DEFAULT_KERNEL_MODE
    threads: int | None = None
    system_prompt: str | None = None
    server: Mapping[str, Any] | None = None  # resolved by vllm_launch.server_settings
    served_model: str | None = None
    logprobs: int = 0
    battery: str | None = None
    subset: Mapping[str, Any] | None = None
    cobatch_targets: tuple[str, ...] | None = None
    filler_pools: Mapping[str, Any] | None = None
    grouping: int | None = None
    condition_overrides: Mapping[str, Mapping[str, Any]] | None = None
    invariance_probe: bool | Mapping[str, Any] | None = None
    cpu_profile: str | None = None  # batchflip.config.apply_cpu_profile
    # the keys the mapping gave (as_dict returns these and only these)
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("study", "model"):
            _check(name, getattr(self, name), isinstance(getattr(self, name), str), "a string")
        _check("engine", self.engine, self.engine in ENGINES, f"one of {', '.join(ENGINES)}")
        _check("dtype", self.dtype, self.dtype in DTYPES, f"one of {', '.join(DTYPES)}")
        _check("max_new_tokens", self.max_new_tokens, _is_int(self.max_new_tokens, 1),
               "an integer >= 1")
        _check("seed", self.seed, _is_int(self.seed, 0), "an integer >= 0")
        _check("prompt_format", self.prompt_format, self.prompt_format in PROMPT_FORMATS,
               f"one of {', '.join(PROMPT_FORMATS)}")
        _check("kernel_mode", self.kernel_mode, self.kernel_mode in KERNEL_MODES,
               f"one of {', '.join(KERNEL_MODES)}")
        _check("threads", self.threads, self.threads is None or _is_int(self.threads, 1),
               "an integer >= 1")
        _check("logprobs", self.logprobs, _is_int(self.logprobs, 0), "an integer >= 0")
        _check("grouping", self.grouping, self.grouping is None or _is_int(self.grouping, 0),
               "an integer")
        for name in ("system_prompt", "served_model", "battery", "cpu_profile"):
            value = getattr(self, name)
            _check(name, value, value is None or isinstance(value, str), "a string")
        for name in ("server", "subset", "filler_pools", "condition_overrides"):
            _check(name, getattr(self, name), _is_mapping(getattr(self, name)), "a mapping")
        targets = self.cobatch_targets
        _check("cobatch_targets", targets, targets is None
               or all(isinstance(t, str) for t in targets), "a list of task names")
        probe = self.invariance_probe
        _check("invariance_probe", probe, probe is None or isinstance(probe, (bool, Mapping)),
               "true, false or a mapping")

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any]) -> GenerationSettings:
        """Parse the settings of one job; a missing, unknown or ill-typed key is a
        BatchflipError naming it."""
        if not isinstance(given, Mapping):
            raise BatchflipError(f"generation settings: expected a mapping, got {given!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"given"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise BatchflipError(f"generation settings: unknown key(s) {unknown}; known: "
                                 f"{sorted(known)}")
        missing = [k for k in _REQUIRED if k not in given]
        if missing:
            raise BatchflipError(f"generation settings: missing key(s) {missing}")
        values = {k: copy.deepcopy(v) for k, v in given.items()}
        targets = values.get("cobatch_targets")
        if isinstance(targets, (list, tuple)):
            values["cobatch_targets"] = tuple(targets)
        elif targets is not None:
            _check("cobatch_targets", targets, False, "a list of task names")
        return cls(**values, given=frozenset(given))

    @classmethod
    def from_json(cls, text: str) -> GenerationSettings:
        """Parse the JSON form (a ``--params`` argument)."""
        try:
            given = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BatchflipError(f"generation settings: not JSON ({exc}): {text[:80]}") from exc
        return cls.from_mapping(given)

    def as_dict(self) -> dict[str, Any]:
        """The given keys with their values (the JSON form's content; a copy)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self.given:
                value = getattr(self, f.name)
                if f.name == "cobatch_targets" and value is not None:
                    value = list(value)
                out[f.name] = copy.deepcopy(value)
        return out

    def to_json(self) -> str:
        """The canonical JSON form (sorted keys), as layout writes it."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with ``changes`` set (and given)."""
        return GenerationSettings.from_mapping({**self.as_dict(), **changes})

    def for_condition(self, condition: str) -> GenerationSettings:
        """The settings one condition runs with: its ``condition_overrides`` merged in
        (:func:`batchflip.design.condition_params`)."""
        from batchflip.design import condition_params

        return GenerationSettings.from_mapping(condition_params(self.as_dict(), condition))

    @property
    def job_threads(self) -> int:
        """Cores the job runs on: ``threads``, else :data:`DEFAULT_THREADS`."""
        return self.threads or DEFAULT_THREADS
