"""batchflip.settings: one job's generation settings, parsed and checked once; the JSON the
rules pass survives the round trip byte for byte, and the schema's enums are the module's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from conftest import ROOT

from batchflip import layout, settings
from batchflip.config import check_config
from batchflip.errors import BatchflipError
from batchflip.settings import GenerationSettings

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
BASE = {"study": "a", "model": "m", "engine": "hf", "dtype": "bfloat16", "max_new_tokens": 4,
        "seed": 42, "prompt_format": "chat"}


def _configs() -> list[dict]:
    out = []
    for name in ("config/config.yaml", "config/paper.yaml", "config/gpu-full.yaml"):
        cfg = yaml.safe_load((ROOT / name).read_text())
        check_config(cfg, SCHEMA)
        out.append(cfg)
    return out


def test_every_planned_jobs_json_survives_the_round_trip():
    seen = 0
    for cfg in _configs():
        for study, s in cfg["studies"].items():
            models = layout.ablation_models(cfg, study) if s["kind"] == "ablation" \
                else s["models"]
            for model in models:
                if s["kind"] == "ablation":
                    given = [layout.ablation_settings(cfg, study, model, k)
                             for k in s["kernel_modes"]]
                else:
                    given = [layout.generation_settings(
                        cfg, study, model, layout.conditions_of(cfg, study, model))]
                for g in given:
                    text = json.dumps(g, sort_keys=True)
                    parsed = GenerationSettings.from_json(text)
                    assert parsed.to_json() == text and parsed.as_dict() == g
                    seen += 1
    assert seen > 20


def test_defaults_fill_fields_never_the_dict():
    s = GenerationSettings.from_mapping(BASE)
    assert s.kernel_mode == settings.DEFAULT_KERNEL_MODE == "standard"
    assert (s.threads, s.logprobs, s.system_prompt, s.server) == (None, 0, None, None)
    assert s.job_threads == settings.DEFAULT_THREADS
    assert s.as_dict() == BASE  # nothing added
    # a given null stays given (a raw prompt format's study may carry system_prompt: null)
    assert GenerationSettings.from_mapping({**BASE, "system_prompt": None}).as_dict() == {
        **BASE, "system_prompt": None}


def test_replace_and_for_condition():
    s = GenerationSettings.from_mapping({
        **BASE, "cobatch_targets": ["harm"],
        "condition_overrides": {"list_b4": {"subset": {"per_task": {"x": 2}}}}})
    assert s.cobatch_targets == ("harm",) and s.as_dict()["cobatch_targets"] == ["harm"]
    scoped = s.for_condition("list_b4")
    assert scoped.subset == {"per_task": {"x": 2}} and scoped.condition_overrides is None
    assert "condition_overrides" not in scoped.as_dict()
    assert s.for_condition("sync_b1").subset is None
    assert s.replace(kernel_mode="batch_invariant").as_dict()["kernel_mode"] == \
        "batch_invariant"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(("change", "message"), [
    ({"kernel_mode": "fast"}, "kernel_mode must be one of standard, batch_invariant, got 'fast'"),
    ({"engine": "tgi"}, "engine must be one of hf, vllm, openai"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"seed": "42"}, "seed must be an integer >= 0, got '42'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"threads": True}, "threads must be an integer >= 1"),
    ({"logprobs": -1}, "logprobs must be an integer >= 0"),
    ({"prompt_format": "xml"}, "prompt_format must be one of raw, chat"),
    ({"server": ["x"]}, "server must be a mapping"),
    ({"cobatch_targets": "harm"}, "cobatch_targets must be a list of task names"),
    ({"kernel": "standard"}, r"unknown key\(s\) \['kernel'\]"),
])
def test_a_bad_setting_is_an_error_naming_it(change, message):
    with pytest.raises(BatchflipError, match=message):
        GenerationSettings.from_mapping({**BASE, **change})


def test_a_missing_setting_and_bad_json_are_errors():
    with pytest.raises(BatchflipError, match=r"missing key\(s\) \['seed'\]"):
        GenerationSettings.from_mapping({k: v for k, v in BASE.items() if k != "seed"})
    with pytest.raises(BatchflipError, match="not JSON"):
        GenerationSettings.from_json("{seed: 1}")


def test_the_schema_enums_are_the_modules():
    schema = yaml.safe_load(SCHEMA.read_text())
    study = schema["properties"]["studies"]["additionalProperties"]
    props = study["properties"]
    assert tuple(props["kernel_mode"]["enum"]) == settings.KERNEL_MODES
    assert tuple(props["kernel_modes"]["items"]["enum"]) == settings.KERNEL_MODES
    assert tuple(props["engine"]["enum"]) == settings.ENGINES
    assert tuple(props["dtype"]["enum"]) == settings.DTYPES
    assert tuple(props["prompt_format"]["enum"]) == settings.PROMPT_FORMATS
    generation = study["allOf"][0]["else"]["properties"]
    assert generation["kernel_mode"]["default"] == settings.DEFAULT_KERNEL_MODE
