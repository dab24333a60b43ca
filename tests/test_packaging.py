"""The package as a package: its import graph, and (marker: workflow) a wheel install."""

from __future__ import annotations

import ast
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from test_workflow import tiny_config

from batchflip.records import GENERATION_COLUMNS

PACKAGE = ROOT / "src" / "batchflip"
# Function-level imports that still close a cycle; each entry names who owns the fix.
# (None left: since Study A's numbers moved to batchflip.studies.discovery, numbers.py no
# longer imports failures, and failures imports the record API at module level.)
KNOWN_LAZY_CYCLE_EDGES: set[tuple[str, str]] = set()


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path, name: str, top_level_only: bool) -> set[str]:
    """The names a module imports (``from a import b`` gives a and a.b), relative imports
    resolved; with ``top_level_only`` only the statements of the module body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            if not node.level:
                parts = []
            module = ".".join(parts + ([node.module] if node.module else []))
            out |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return out


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods = module_names()
    return {m: (imported(p, m, top_level_only) & set(mods)) - {m} for m, p in mods.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    mod = tmp_path / "pkg" / "sub" / "m.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("from . import x\nfrom ..y import z\n\ndef f():\n    import pkg.w\n")
    assert imported(mod, "pkg.sub.m", True) == {"pkg.sub", "pkg.sub.x", "pkg.y", "pkg.y.z"}
    assert "pkg.w" in imported(mod, "pkg.sub.m", False)


def test_no_import_cycle_among_batchflip_modules():
    graph = import_graph(top_level_only=True)
    assert {"batchflip.tasks"} <= graph["batchflip.battery"] & graph["batchflip.builders"]
    assert cycle(graph) is None


def test_no_import_cycle_with_function_level_imports():
    graph = import_graph(top_level_only=False)
    for a, b in KNOWN_LAZY_CYCLE_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: drop it from KNOWN_LAZY_CYCLE_EDGES"
        graph[a].discard(b)
    assert "batchflip.battery" not in graph["batchflip.builders"]
    assert cycle(graph) is None


# --------------------------------------------------------------------------- the wheel


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a command; a non-zero exit fails the test with its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def running_site_dirs() -> list[str]:
    """The site-packages directories of the interpreter running the tests, in its order:
    an active venv's own (and the base's when it was made with --system-site-packages),
    or the base interpreter's outside a venv; the user site when enabled."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def see_running_site_packages(venv: Path) -> Path:
    """Let ``venv`` import what the running interpreter imports (torch, vLLM, Snakemake),
    after its own packages: a .pth file that adds each of ``running_site_dirs()`` as a site
    directory (their own .pth files processed). ``python -m venv --system-site-packages``
    would give the *base* interpreter's packages instead, which is wrong when the tests run
    inside a venv (issue 26: "No module named 'pandas'")."""
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    lines = [f"import site; site.addsitedir({d!r})" for d in running_site_dirs()]
    pth = purelib / "zz_batchflip_tests_running_site.pth"
    pth.write_text("\n".join(lines) + "\n")
    return pth


def test_a_nested_venv_imports_the_running_interpreters_packages(tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    see_running_site_packages(venv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = json.loads(run([str(venv / "bin/python"), "-c", (
        "import json, sys, pandas, site; print(json.dumps([pandas.__file__, sys.prefix, "
        "site.getsitepackages()]))")], cwd=tmp_path, env=env).stdout)
    assert Path(out[0]).resolve() == Path(pd.__file__).resolve()  # the running one's pandas
    assert Path(out[1]) == venv  # still its own venv: its own site-packages come first
    assert Path(out[2][0]).is_relative_to(venv)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict[str, Path | dict[str, str]]:
    """A copy of the working tree (what git tracks or would track), a wheel built from it,
    and a fresh venv with only that wheel installed that also sees the running
    interpreter's packages (torch, vLLM, Snakemake; ``see_running_site_packages``), inside
    a venv or outside one; the copy's src/ is then made unimportable, so anything that
    imports it instead of the wheel fails."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=ROOT).stdout.split("\0")
    checkout = tmp / "checkout"
    for rel in filter(None, files):
        if (ROOT / rel).is_file():  # a file deleted in the working tree is not copied
            (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, checkout / rel)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(checkout)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("batchflip-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    see_running_site_packages(venv)
    # --ignore-installed: an editable install of the checkout in the running site-packages
    # (what envs/install-cpu.sh makes) would otherwise count as "already satisfied"
    run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)], cwd=tmp)
    (checkout / "src/batchflip/__init__.py").write_text(
        'raise ImportError("imported the checkout\'s src/, not the installed wheel")\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return {"checkout": checkout, "venv": venv, "wheel": wheel, "env": env}


@pytest.mark.workflow
def test_wheel_ships_the_bundled_files_and_its_cli_runs_without_a_checkout(wheel_env,
                                                                           tmp_path):
    env, venv = wheel_env["env"], wheel_env["venv"]
    python = str(venv / "bin/python")
    with zipfile.ZipFile(wheel_env["wheel"]) as zf:
        names = set(zf.namelist())
    assert {f"batchflip/data/{n}" for n in ("scorers/refusal_patterns.yaml",
                                            "schemas/adjudication_sheet.schema.yaml",
                                            "fidelity/published.yaml")} <= names
    where = json.loads(run([python, "-c", (
        "import json, batchflip, batchflip.bundled as b, batchflip.adjudication as a;"
        "print(json.dumps([batchflip.__file__, [str(b.bundled_path(n)) for n in b.BUNDLED],"
        " a.load_schema(None).schema['title']]))")], cwd=tmp_path, env=env).stdout)
    site = venv / "lib"
    assert Path(where[0]).is_relative_to(site), where[0]  # the wheel, not a source tree
    assert all(Path(p).is_relative_to(site) and Path(p).is_file() for p in where[1])
    assert where[2] == "adjudication sheet row"

    tasks = tmp_path / "tasks"
    shutil.copytree(ROOT / "tests/fixtures/battery", tasks)
    run([python, "-m", "batchflip", "battery", str(tasks), "--out", "battery.parquet"],
        cwd=tmp_path, env=env)
    battery = pd.read_parquet(tmp_path / "battery.parquet")
    targets = battery[battery["task"] == "tiny_refusal"]["prompt_id"].tolist()[:2]
    texts = ["I can\u2019t help with that.", "Sure, here is how."]
    gen = pd.DataFrame([{**dict.fromkeys(GENERATION_COLUMNS), "study": "a", "model": "m",
                         "condition": "sync_b1", "batch_size": 1, "group_id": i,
                         "role": "target", "prompt_id": pid, "text": text,
                         "finish_reason": "length"}
                        for i, (pid, text) in enumerate(zip(targets, texts, strict=True))])
    gen.to_parquet(tmp_path / "gen.parquet")
    run([python, "-m", "batchflip", "score", "--generations", "gen.parquet", "--battery",
         "battery.parquet", "--versions", '{"refusal": 2}', "--out", "scored.parquet"],
        cwd=tmp_path, env=env)
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert scored["label"].tolist() == ["refused", "complied"]  # the bundled lexicon, v2
    run([python, "-m", "batchflip", "fidelity", "--out", "fidelity.json"], cwd=tmp_path,
        env=env)
    summary = json.loads((tmp_path / "fidelity.json").read_text())["summary"]
    assert summary["all_match"] and summary["checked"] > 10
    assert summary["source"] == "batchflip/data/fidelity/published.yaml"


@pytest.mark.workflow
def test_tiny_workflow_runs_on_the_wheel_from_another_directory(wheel_env, tmp_path,
                                                                model_dir):
    checkout, venv = wheel_env["checkout"], wheel_env["venv"]
    cfg = tiny_config(tmp_path, model_dir)
    proc = run([str(venv / "bin/python"), "-m", "snakemake", "-s", str(checkout / "Snakefile"),
                "-d", str(tmp_path), "--cores", "2", "results/paper", "--configfile",
                str(cfg)], cwd=tmp_path, env=wheel_env["env"])
    assert f"batchflip: using the installed package {venv}" in proc.stderr
    numbers = json.loads((tmp_path / "results/paper/numbers.json").read_text())["reproduced"]
    assert "a/smollm2-135m/sync_b4/safety_flip_rate" in numbers
    fidelity = json.loads((tmp_path / "results/numbers/fidelity.json").read_text())
    assert fidelity["summary"]["all_match"] is True
    assert fidelity["summary"]["source"] == "batchflip/data/fidelity/published.yaml"
