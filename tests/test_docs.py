"""The documentation site (mkdocs.yml, docs/): it builds with ``--strict`` (no broken link,
anchor or page left out of the nav), the configuration reference on the built page lists
every property of workflow/schemas/config.schema.yaml, and the README stays a short map."""

from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def load_hook():
    """docs/hooks/config_reference.py, imported from its file (MkDocs loads it the same way)."""
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "docs/hooks/config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def schema_property_names(node, out: set[str] | None = None) -> set[str]:
    """Every key of every ``properties`` mapping anywhere in the schema (the oracle: a
    plain walk of the YAML, not the hook's)."""
    out = set() if out is None else out
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out |= set(value)
            schema_property_names(value, out)
    elif isinstance(node, list):
        for item in node:
            schema_property_names(item, out)
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as CI builds it: ``mkdocs build --strict`` into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return out


def code_spans(page: Path) -> list[str]:
    """The text of every <code> element of a built page."""
    text = page.read_text(encoding="utf-8")
    return [html.unescape(re.sub(r"<[^>]+>", "", c))
            for c in re.findall(r"<code>(.*?)</code>", text, flags=re.S)]


def test_every_schema_property_is_on_the_built_reference_page(site):
    page = site / "config-reference" / "index.html"
    paths = [c for c in code_spans(page) if re.fullmatch(r"[a-z_]+(\.[^ ]+)?", c)]
    names_on_page = {re.sub(r"\[\]$", "", p).rsplit(".", 1)[-1] for p in paths}
    names = schema_property_names(yaml.safe_load(SCHEMA.read_text()))
    assert len(names) > 100
    assert names - names_on_page == set(), "schema properties missing from the reference"
    # spot checks, by hand from the schema: a nested server key, a map entry, a list item,
    # a $ref'd subset under a scope
    for path in ("studies.<id>.server.port", "batteries.<name>.builder.sources.<source>.n",
                 "models.<name>.chunks[].member", "studies.<id>.scopes[].subset.per_task",
                 "adjudication.text_change_limit", "verify.confidence"):
        assert path in paths, path
    text = page.read_text(encoding="utf-8")
    # the hook filled the marker, and a description written only in the schema is there
    assert "config-reference --&gt;" not in text and "<!-- config-reference -->" not in text
    assert "fake quantization in weight space" in text


def test_reference_renders_types_defaults_and_conditional_requirements():
    hook = load_hook()
    schema = {
        "description": "toy",
        "$defs": {"pair": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "required": ["a"],
        "properties": {
            "a": {"type": "object", "additionalProperties": {
                "type": "object",
                "allOf": [{"if": {"properties": {"src": {"const": "hub"}}},
                           "then": {"required": ["id"]}}],
                "properties": {
                    "src": {"enum": ["hub", None]},
                    "id": {"type": ["string", "null"], "description": "a | b"},
                    "on": {"type": "boolean", "default": False},
                    "p": {"$ref": "#/$defs/pair"},
                }}},
        },
    }
    rows = {r.path: r for r in hook.rows(schema["properties"]["a"], schema, "a", "a")}
    assert list(rows) == ["a.<name>.src", "a.<name>.id", "a.<name>.on", "a.<name>.p",
                          "a.<name>.p.x"]
    assert rows["a.<name>.src"].type == "one of `hub`, `null`"
    assert rows["a.<name>.id"].type == "string or null"
    assert rows["a.<name>.id"].required == "when `src: hub`"
    assert rows["a.<name>.id"].description == "a \\| b"  # a pipe would split the table cell
    assert rows["a.<name>.on"].default == "`false`"
    md = hook.render(schema)
    assert "## `a`" in md and "(required; map of object)" in md
    assert "| `a.<name>.p.x` | integer |  |  |  |" in md
    assert hook.on_page_markdown("x", None, None, None) == "x"
    filled = hook.on_page_markdown(f"# R\n\n{hook.MARKER}\n", None, None, None)
    assert hook.MARKER not in filled and "| `studies.<id>.server.port` |" in filled


def test_nav_names_the_pages_of_the_other_issues():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    flat = yaml.safe_dump(nav)
    for page in ("security.md", "pairs.md", "reproduction.md", "clusters.md", "gpu-scale.md",
                 "config-reference.md", "api/stats.md", "measurements.md"):
        assert page in flat, page
        assert (ROOT / "docs" / page).is_file(), page


def test_stats_api_page_renders_the_docstrings(site):
    text = (site / "api" / "stats" / "index.html").read_text(encoding="utf-8")
    import batchflip.stats as stats
    public = [n for n, f in vars(stats).items()
              if callable(f) and not n.startswith("_") and getattr(f, "__module__", "")
              == "batchflip.stats"]
    assert len(public) > 10
    for name in public:
        assert f'id="batchflip.stats.{name}"' in text, name
    first_line = stats.wilson_interval.__doc__.strip().splitlines()[0]
    assert html.escape(first_line.split("(")[0].strip(), quote=False)[:30] in text


def test_readme_is_a_short_map():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    text = "\n".join(lines)
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
