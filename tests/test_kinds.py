"""batchflip.kinds: the one list of study kinds, and everything that must agree with it
(the schema's enum, the CLI, the figures, the headlines, rule files, captions, docs)."""

from __future__ import annotations

import importlib

import yaml
from conftest import ROOT

from batchflip import cli, headlines, layout
from batchflip.kinds import KINDS

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def test_the_schemas_kind_enum_is_the_registry():
    schema = yaml.safe_load(SCHEMA.read_text())
    kinds = schema["properties"]["studies"]["additionalProperties"]["properties"]["kind"]
    assert sorted(kinds["enum"]) == sorted(KINDS)


def test_cli_figures_and_headlines_read_the_registry():
    for name, kind in KINDS.items():
        assert cli.COMMANDS[name] == (kind.module, kind.help)
        assert layout.FIGURES_BY_KIND[name] == list(kind.figures)
        assert headlines.WRITERS[name] is getattr(headlines, kind.headline)
    assert set(layout.FIGURES_BY_KIND) == set(headlines.WRITERS) == set(KINDS)


def test_each_kind_has_its_module_rule_file_and_captions():
    for kind in KINDS.values():
        module = importlib.import_module(kind.module)
        assert callable(module.configure) and callable(module.main), kind.module
        rules = (ROOT / kind.rule_file).read_text()
        assert f"rule {kind.name}_" in rules, kind.rule_file
        for figure in kind.figures:
            assert (ROOT / f"workflow/report/{figure}.rst").is_file(), figure


def test_the_docs_tables_list_every_kind():
    readme = (ROOT / "README.md").read_text()
    architecture = (ROOT / "docs/architecture.md").read_text()
    for kind in KINDS.values():
        row = f"| {kind.letter} | `{kind.name}` |"
        assert row in readme, f"README.md: no row {row}"
        assert row in architecture, f"docs/architecture.md: no row {row}"
