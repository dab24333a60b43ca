"""Every `snakemake ...` command written in README.md and in the headers of config/*.yaml
and profiles/*/config.yaml parses and plans: each is run verbatim as a dry run (`-n`).

The commands run in a directory laid out like a user's checkout (links to the Snakefile,
workflow/, src/, config/, profiles/, resources/, envs/) with ../shared/data/paper_battery
beside it (the real one, or a synthetic battery of the paper's task names when absent).
The files the README leaves to the user are made here: my.yaml (the default config with
`verify: {archive}`), reviewer.yaml (with `restore: {archive}`), my_battery.yaml (the
battery override). `snakemake --report` renders a finished run, so it is not planned.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, paper_battery

LINKS = ["Snakefile", "workflow", "src", "config", "profiles", "resources", "envs"]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every snakemake command in the README and the YAML headers."""
    out = []
    text = (ROOT / "README.md").read_text()
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced and line.strip().startswith("snakemake "):
            out.append(("README.md", line.split("#")[0].strip()))
    for span in re.findall(r"`(snakemake [^`]+)`", text):
        out.append(("README.md", span.strip()))
    for path in [*sorted((ROOT / "config").glob("*.yaml")),
                 *sorted((ROOT / "profiles").glob("*/config.yaml"))]:
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break  # the header ends at the first line that is not a comment
            cmd = line.lstrip("# ").split("  #")[0].strip()
            if cmd.startswith("snakemake "):
                out.append((str(path.relative_to(ROOT)), cmd))
    seen, unique = set(), []
    for where, cmd in out:
        if cmd not in seen and "--report" not in cmd:
            seen.add(cmd)
            unique.append((where, cmd))
    return unique


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A user's checkout (links) with ../shared/data/paper_battery and the user's files."""
    root = tmp_path_factory.mktemp("user")
    work = root / "batchflip"
    work.mkdir()
    for name in LINKS:
        (work / name).symlink_to(ROOT / name)
    shared = root / "shared" / "data"
    shared.mkdir(parents=True)
    battery = paper_battery(root / "synthetic")
    (shared / "paper_battery").symlink_to(battery)
    archive = root / "archive.tar.gz"
    archive.write_bytes(b"")  # only planned, never read
    default = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    (work / "my.yaml").write_text(yaml.safe_dump({**default, "verify": {"archive": str(archive)}}))
    (work / "reviewer.yaml").write_text(
        yaml.safe_dump({**default, "restore": {"archive": str(archive)}}))
    (work / "my_battery.yaml").write_text(
        yaml.safe_dump({"batteries": {"paper": {"paths": [str(battery)]}}}))
    return work


def test_the_docs_have_commands():
    cmds = [c for _, c in documented_commands()]
    assert "snakemake --cores all results/paper" in cmds
    assert any("config/paper.yaml" in c for c in cmds)
    assert any("--profile profiles/slurm" in c for c in cmds)


@pytest.mark.parametrize("where,cmd", documented_commands(), ids=lambda v: v)
def test_documented_command_plans(checkout, where, cmd):
    args = shlex.split(cmd)
    assert args[0] == "snakemake"
    if "profiles/slurm" in args:
        pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args[1:], "-n"], cwd=checkout,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (f"{where}: `{cmd}` failed as a dry run:\n"
                                  f"{proc.stdout[-1500:]}{proc.stderr[-2500:]}")
    assert "Job stats:" in proc.stdout or "Nothing to be done" in proc.stdout + proc.stderr
