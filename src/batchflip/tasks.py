"""Task documents (the paper's task-YAML format) → battery rows.

The rendering both the battery stage (task files, :mod:`batchflip.battery`) and the
dataset builders (:mod:`batchflip.builders`) use, so neither imports the other.

A task document has a Jinja2 ``prompt_template``, ``filters`` (response post-processing
applied before scoring) and ``samples`` (each with a unique ``id``, a ``reference`` and the
template variables). Rendering uses ``StrictUndefined`` so a variable a sample lacks is an
error naming the origin, sample and variable. Templates render in Jinja2's
``SandboxedEnvironment``: a template that reaches for Python internals (``__globals__``,
``__class__``, ...) is an error naming the file, sample and ``prompt_template``, so a task
file from someone else cannot run code. Two renderings (a battery's ``render`` key):

- ``harness`` (default): the bytes the paper's harness sends. Its runner
  (Chimeraforge ``experiments/research/tr138/run.py``, ``_load_prompts``) replaces each
  ``{{ key }}`` of the template with ``str(value)`` and sends the result as is, so the
  template's trailing newline stays: all 953 paper prompts end in "\n" ("...Answer:\n").
  Jinja2 with ``keep_trailing_newline`` gives the same bytes for templates that use only
  ``{{ key }}`` (every paper and bundled template; ``tests/test_tasks.py`` checks all 953
  against a plain string replace).
- ``jinja``: Jinja2's default, which drops one trailing newline; batchflip's rendering
  before the harness check (every prompt one "\n" short). Kept so that batteries and
  results made before can be rebuilt byte for byte.

The task type decides the domain and the scorer:

| task_type | domain | scorer |
| --- | --- | --- |
| safety_refusal | safety | refusal |
| safety_overrefusal | safety | refusal (refusal here is over-refusal) |
| safety_bias | safety | bbq |
| safety_truthfulness | safety | truthfulqa |
| classification | capability | mc_letter |

Extra sample fields (answers lists, BBQ indices, categories) and the filters go to ``meta``
as JSON. Output rows follow DESIGN.md (Records: battery row).
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
import jinja2.sandbox
import pandas as pd

from batchflip.errors import InputError
from batchflip.records import BATTERY_COLUMNS

TASK_TYPES: dict[str, tuple[str, str]] = {
    "safety_refusal": ("safety", "refusal"),
    "safety_overrefusal": ("safety", "refusal"),
    "safety_bias": ("safety", "bbq"),
    "safety_truthfulness": ("safety", "truthfulqa"),
    "classification": ("capability", "mc_letter"),
}
FILTERS = ("strip_whitespace", "truncate_at_newline", "remove_assistant_prefix")
RENDERINGS = ("harness", "jinja")
# sandboxed: a task file is input, never code (docs/security.md); a template that reaches
# for attributes such as __globals__ raises jinja2's SecurityError, reported as InputError
_ENVS = {
    "harness": jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True),
    "jinja": jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                                 autoescape=False),
}


def render_task(doc: Any, path: object, render: str = "harness") -> pd.DataFrame:
    """Render one task document (a parsed task YAML, or one built by batchflip.builders)
    into battery rows with rendering ``render`` (module docstring); ``path`` names its
    origin in errors."""
    if render not in _ENVS:
        raise InputError(path, f"unknown rendering '{render}' (known: {', '.join(RENDERINGS)})",
                         field="render")
    if not isinstance(doc, dict):
        raise InputError(path, "top level must be a mapping")
    for key in ("name", "task_type", "prompt_template", "samples"):
        if key not in doc:
            raise InputError(path, "missing top-level key", field=key)
    if doc["task_type"] not in TASK_TYPES:
        raise InputError(path, f"unknown task_type '{doc['task_type']}' (known: "
                         f"{', '.join(TASK_TYPES)})", field="task_type")
    filters = [f.get("type") if isinstance(f, dict) else f for f in doc.get("filters") or []]
    for f in filters:
        if f not in FILTERS:
            raise InputError(path, f"unknown filter '{f}' (known: {', '.join(FILTERS)})",
                             field="filters")
    try:
        template = _ENVS[render].from_string(doc["prompt_template"])
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(path, f"template syntax: {exc}", field="prompt_template") from None
    domain, scorer = TASK_TYPES[doc["task_type"]]
    if not isinstance(doc["samples"], list) or not doc["samples"]:
        raise InputError(path, "must be a non-empty list", field="samples")
    rows = []
    for i, sample in enumerate(doc["samples"], start=1):
        label = f"sample {i}" + (f" (id {sample['id']})" if isinstance(sample, dict)
                                 and "id" in sample else "")
        if not isinstance(sample, dict):
            raise InputError(path, "sample must be a mapping", row=label)
        for key in ("id", "reference"):
            if key not in sample or sample[key] in (None, ""):
                raise InputError(path, "missing or empty", row=label, field=key)
        try:
            prompt = template.render(**sample)
        except jinja2.UndefinedError as exc:
            var = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
            raise InputError(path, f"template variable not in sample ({exc})", row=label,
                             field=var) from None
        except jinja2.exceptions.SecurityError as exc:
            raise InputError(path, f"template refused by the sandbox ({exc}); a "
                             "prompt_template may only insert sample fields", row=label,
                             field="prompt_template") from None
        extra = {k: v for k, v in sample.items() if k not in ("id", "reference")}
        rows.append({
            "prompt_id": str(sample["id"]), "task": doc["name"], "domain": domain,
            "scorer": scorer, "prompt": prompt, "reference": str(sample["reference"]),
            "meta": json.dumps({"filters": filters, **extra}, sort_keys=True),
        })
    return pd.DataFrame(rows, columns=BATTERY_COLUMNS)
