"""Config checks run by the Snakefile at start-up, before any job.

First the JSON schema (``workflow/schemas/config.schema.yaml``): the first violation stops
the run with the dotted key, the offending value and the schema rule it broke. Then the
cross-references a schema cannot express (conditions parse, the baseline is one of the
study's conditions, batteries and models exist, composition conditions have targets and
pools).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from batchflip.conditions import parse_condition
from batchflip.errors import BatchflipError


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


def check_references(config: dict[str, Any]) -> None:
    """Cross-field checks; raise naming the key at fault."""
    for name, study in config["studies"].items():
        where = f"studies.{name}"
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
    for s in config.get("paper", {}).get("studies", []):
        if s not in config["studies"]:
            raise BatchflipError(f"invalid config: key 'paper.studies': unknown study '{s}'")


def check_config(config: dict[str, Any], schema_file: str | Path) -> None:
    """Schema first, then cross-references."""
    check_schema(config, schema_file)
    check_references(config)
