"""MkDocs hook: the configuration reference, rendered from workflow/schemas/config.schema.yaml.

docs/config-reference.md holds the marker ``<!-- config-reference -->``; at build time
``on_page_markdown`` replaces it with one table per top-level section: every key of the
schema (map entries written ``<name>``, list items ``[]``), its type, default, whether it
is required and its description. Nothing is copied by hand, so the page cannot drift from
the schema (tests/test_docs.py checks that every property appears on the built page).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MARKER = "<!-- config-reference -->"
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# how a map's entries are written in key paths (default <name>)
PLACEHOLDERS = {"studies": "<id>", "sources": "<source>", "filler_pools": "<pool>",
                "mix": "<pool>", "dispatch_baselines": "<dispatch>", "extra_env": "<VAR>",
                "per_task": "<task>"}


@dataclass(frozen=True)
class Row:
    """One documented key: dotted path, type, default, required note, description."""

    path: str
    type: str
    default: str
    required: str
    description: str


def load_schema(path: Path = SCHEMA) -> dict[str, Any]:
    """The config schema as a dict."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/$defs/<name>``) to its definition."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def type_of(node: dict[str, Any], schema: dict[str, Any]) -> str:
    """A short human reading of a schema node's type."""
    node = _resolve(node, schema)
    if "const" in node:
        return f"`{_value(node['const'])}`"
    if "enum" in node:
        return "one of " + ", ".join(f"`{_value(v)}`" for v in node["enum"])
    for key in ("oneOf", "anyOf"):
        alts = [type_of(a, schema) for a in node.get(key, []) if set(a) - {"required"}]
        if alts:
            return " or ".join(dict.fromkeys(alts))
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    words = []
    for k in kinds:
        if k == "array" and isinstance(node.get("items"), dict):
            words.append(f"list of {type_of(node['items'], schema)}")
        elif k == "object" and isinstance(node.get("additionalProperties"), dict) \
                and not node.get("properties"):
            words.append(f"map of {type_of(node['additionalProperties'], schema)}")
        else:
            words.append(str(k))
    return " or ".join(words) or "any"


def _conditional_required(node: dict[str, Any]) -> dict[str, str]:
    """key -> 'when `k: v`' for ``allOf: [{if: {properties: {k: {const: v}}}, then:
    {required: [...]}}]`` entries."""
    out: dict[str, str] = {}
    for rule in node.get("allOf", []):
        cond = rule.get("if", {}).get("properties", {})
        consts = [f"`{k}: {_value(v['const'])}`" for k, v in cond.items() if "const" in v]
        for key in rule.get("then", {}).get("required", []):
            if consts:
                out.setdefault(key, "when " + ", ".join(consts))
    return out


def _value(value: Any) -> str:
    """A schema value as it is written in YAML/JSON (null, false, [...])."""
    return value if isinstance(value, str) else json.dumps(value)


def _text(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def rows(node: dict[str, Any], schema: dict[str, Any], path: str = "",
         name: str = "") -> list[Row]:
    """Every key under ``node`` (depth first, schema order) as a Row."""
    node = _resolve(node, schema)
    out: list[Row] = []
    required = set(node.get("required", []))
    conditional = _conditional_required(node)
    for key, sub in node.get("properties", {}).items():
        sub = _resolve(sub, schema)
        sub_path = f"{path}.{key}" if path else key
        default = f"`{_text(_value(sub['default']))}`" if "default" in sub else ""
        req = "yes" if key in required else conditional.get(key, "")
        out.append(Row(sub_path, _text(type_of(sub, schema)), default, req,
                       _text(sub.get("description", ""))))
        out += rows(sub, schema, sub_path, key)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and (extra.get("properties") or extra.get("$ref")):
        out += rows(extra, schema, f"{path}.{PLACEHOLDERS.get(name, '<name>')}", name)
    items = node.get("items")
    if isinstance(items, dict) and _resolve(items, schema).get("properties"):
        out += rows(items, schema, f"{path}[]", name)
    for key in ("oneOf", "anyOf"):
        for alt in node.get(key, []):
            if isinstance(alt, dict) and _resolve(alt, schema).get("properties"):
                out += rows(alt, schema, path, name)
    return out


def render(schema: dict[str, Any]) -> str:
    """The reference as Markdown: one section and table per top-level key."""
    required = set(schema.get("required", []))
    parts = [f"The schema says: *{_text(schema.get('description', ''))}*. Keys marked "
             "*required* must be set; a default is filled in at load "
             "(`batchflip.config.check_config`) when the key is absent.\n"]
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, schema)
        parts.append(f"## `{key}`\n")
        head = _text(sub.get("description", ""))
        status = "required" if key in required else "optional"
        parts.append(f"{head + ' ' if head else ''}({status}; {type_of(sub, schema)})\n")
        table = rows(sub, schema, key, key)
        if table:
            parts.append("| key | type | default | required | description |")
            parts.append("| --- | --- | --- | --- | --- |")
            parts += [f"| `{r.path}` | {r.type} | {r.default} | {r.required} | "
                      f"{r.description} |" for r in table]
            parts.append("")
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the marker of the reference page."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(load_schema()))
