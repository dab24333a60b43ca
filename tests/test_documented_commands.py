"""Every command the documentation shows runs, plans or parses.

Pages: README.md, config/README.md, every page under docs/, and the header comments of
config/*.yaml and profiles/*/config.yaml. A command is a line of a fenced block, or an
inline code span, that starts with a program the project documents (``COMMAND_WORDS``);
``documented_commands`` collects them and ``test_every_documented_command_is_covered``
fails on one that no rule here covers. The rules:

- ``snakemake ...`` is run verbatim as a dry run (``-n``; ``--lint`` as is) in a directory
  laid out like a user's checkout (links to the Snakefile, workflow/, src/, config/,
  profiles/, resources/, envs/) with ../shared/data/paper_battery beside it (the real one,
  or a synthetic battery of the paper's task names when absent). The files the docs leave
  to the user are made here: my.yaml (the default config with `verify: {archive}`),
  reviewer.yaml (with `restore: {archive}`), my_battery.yaml (the battery override),
  profiles/mysite (the copy of profiles/slurm that docs/clusters.md makes).
  `snakemake --report` renders a finished run, so it is not planned; `snakemake --unlock`
  must say it unlocked the directory;
- ``batchflip ...`` is parsed by the CLI's own parser (a fenced command must parse in
  full; an inline mention such as `batchflip discovery numbers` must name an existing
  command and action);
- ``python3 bench/<script> --flag ...`` (or ``python bench/...``): the script exists and
  defines each flag;
- ``pip install "batchflip[<extra>]"``: each extra is one of pyproject.toml's
  optional-dependencies;
- ``python3 -m pytest ...``: each marker is registered in pyproject.toml, each path exists;
- ``bash <script>``: the script exists;
- the rest (``COVERED_ELSEWHERE``) is run by another test or by CI, or is not ours.

A command with ``<placeholder>`` or ``...`` is a template, not a command, and is skipped.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, paper_battery

from batchflip.cli import COMMANDS, build_parser

LINKS = ["Snakefile", "workflow", "src", "config", "resources", "envs"]
COMMAND_WORDS = {"snakemake", "batchflip", "python3", "python", "bash", "mkdocs", "pip",
                 ".", "apt-get", "export", "sha256sum", "ollama"}
# first words of commands checked elsewhere (or not ours), with who checks them
COVERED_ELSEWHERE = {
    "python3 -m pip wheel": "tests/test_packaging.py builds the wheel this way",
    "python3 -m pip install": "tests/test_packaging.py installs the wheel this way",
    "python3 -m venv": "tests/test_packaging.py makes a venv this way",
    ". .venv/bin/activate": "shell",
    "mkdocs build": "tests/test_docs.py and .ci/run build the site",
    "mkdocs serve": "the same build, served (tests/test_docs.py)",
    "apt-get install": ".ci/run",
    "export HF_HUB_OFFLINE": "an environment variable of huggingface_hub",
    "sha256sum -c": "coreutils; tests/test_archive.py checks the manifest",
    "sha256sum --quiet -c": "coreutils (docs/gpu-scale.md's device kit, run by hand)",
    "pip download": "pip's own command (docs/gpu-scale.md's device kit, run by hand)",
    "python -m batchflip": "how every rule calls the CLI: the rules' commands are planned "
                           "above and run by tests/test_shell_quoting.py",
    "ollama pull": "Ollama's CLI on the serving machine (not installed here)",
    "python -m vllm.entrypoints.openai.api_server": "launched by batchflip.engines "
                                                    "(tests/test_server.py)",
}


def doc_pages() -> list[Path]:
    """README.md, config/README.md and every page of the documentation site."""
    return [ROOT / "README.md", ROOT / "config/README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def commands_in(text: str) -> list[tuple[str, bool]]:
    """(command, fenced) for each command of a Markdown page: fenced-block lines (comments
    after two spaces dropped) and inline code spans; ``a && b`` and ``a; b`` give two, a
    leading ``VAR=value`` is dropped."""
    raw = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            raw.append((line.split("  #")[0].split(" # ")[0].strip(), True))
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    raw += [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", outside)]
    out = []
    for cmd, fenced in raw:
        for part in re.split(r"&&|;", cmd):
            words = part.split()
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words[:1] == ["."] and len(words) > 1 and "/" not in words[1]:
                continue  # `. _ + /`: a list of characters, not `. <path>` (source)
            if len(words) > 1 and words[0] in COMMAND_WORDS:
                out.append((" ".join(words), fenced))
    return out


def is_template(cmd: str) -> bool:
    """A command with a <placeholder> or an ellipsis: a pattern, not a command."""
    return "<" in cmd or "..." in cmd


def documented_commands() -> list[tuple[str, str, bool]]:
    """(where, command, fenced), each command once: the doc pages' and the YAML headers'."""
    out = []
    for page in doc_pages():
        rel = str(page.relative_to(ROOT))
        out += [(rel, cmd, fenced) for cmd, fenced in commands_in(page.read_text())]
    for path in [*sorted((ROOT / "config").glob("*.yaml")),
                 *sorted((ROOT / "profiles").glob("*/config.yaml"))]:
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break  # the header ends at the first line that is not a comment
            cmd = line.lstrip("# ").split("  #")[0].strip()
            if cmd.startswith("snakemake "):
                out.append((str(path.relative_to(ROOT)), cmd, True))
    seen: dict[str, int] = {}
    unique: list[tuple[str, str, bool]] = []
    for where, cmd, fenced in out:
        if is_template(cmd):
            continue
        if cmd in seen:  # a fenced occurrence makes the stricter check
            i = seen[cmd]
            unique[i] = (unique[i][0], cmd, unique[i][2] or fenced)
            continue
        seen[cmd] = len(unique)
        unique.append((where, cmd, fenced))
    return unique


def of_kind(prefix: str) -> list[tuple[str, str, bool]]:
    return [c for c in documented_commands() if c[1].split()[0] == prefix]


def snakemake_commands() -> list[tuple[str, str]]:
    return [(w, c) for w, c, _ in of_kind("snakemake") if "--report" not in c]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A user's checkout (links) with ../shared/data/paper_battery and the user's files."""
    root = tmp_path_factory.mktemp("user")
    work = root / "batchflip"
    work.mkdir()
    for name in LINKS:
        (work / name).symlink_to(ROOT / name)
    (work / "profiles").mkdir()
    for profile in (ROOT / "profiles").iterdir():
        (work / "profiles" / profile.name).symlink_to(profile)
    # docs/clusters.md: `cp -r profiles/slurm profiles/mysite`, then plan with the copy
    shutil.copytree(ROOT / "profiles/slurm", work / "profiles/mysite")
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
    cmds = [c for _, c in snakemake_commands()]
    assert "snakemake --cores all results/paper" in cmds
    assert any("config/paper.yaml" in c for c in cmds)
    assert any("--profile profiles/slurm" in c for c in cmds)
    every = {c for _, c, _ in documented_commands()}
    for page in ("config/README.md", "docs/getting-started.md", "docs/reviewing.md"):
        found = {c for c, _ in commands_in((ROOT / page).read_text()) if not is_template(c)}
        assert found and found <= every, page


def test_command_finder_reads_fences_spans_and_chains():
    text = ("Run `snakemake -n results/paper` or `batchflip <kind> <action>`.\n\n"
            "```bash\npython3 -m venv v && . v/bin/activate   # comment\n"
            "FOO=1 python3 -m pytest -m gpu\nmodels:\n```\n")
    assert commands_in(text) == [
        ("python3 -m venv v", True), (". v/bin/activate", True),
        ("python3 -m pytest -m gpu", True), ("snakemake -n results/paper", False),
        ("batchflip <kind> <action>", False)]
    assert is_template("batchflip <kind> <action>") and not is_template("batchflip doctor")


def covered_elsewhere(cmd: str) -> bool:
    return any(cmd == k or cmd.startswith(k + " ") or cmd.startswith(k + "=")
               for k in COVERED_ELSEWHERE)


def test_every_documented_command_is_covered():
    checked = ("snakemake ", "batchflip ", "python3 bench/", "python bench/",
               "python3 -m pytest ", "bash ", 'pip install "batchflip[')
    uncovered = [(w, c) for w, c, _ in documented_commands()
                 if not c.startswith(checked) and not covered_elsewhere(c)]
    assert not uncovered, f"documented commands no test covers: {uncovered}"


def parse_batchflip(args: list[str]) -> tuple[int, str]:
    """Parse ``batchflip <args>`` with the CLI's parser: (exit code, stderr); 0 = parsed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser([args[0]]).parse_args(args)
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, ""


@pytest.mark.parametrize("where,cmd,fenced", of_kind("batchflip"), ids=str)
def test_documented_batchflip_command_parses(where, cmd, fenced):
    args = shlex.split(cmd)[1:]
    if args[0].endswith(":"):
        pytest.skip(f"{cmd[:40]}: an error message quoted in {where}, not a command")
    assert args[0] in COMMANDS, f"{where}: `{cmd}`: no command {args[0]!r}"
    if fenced:
        code, err = parse_batchflip(args)
        assert code == 0, f"{where}: `{cmd}` does not parse: {err}"
        return
    # a mention (`batchflip enriched select|compare`): the command and each action exist;
    # arguments may be left out
    for action in (args[1].split("|") if len(args) > 1 else [None]):
        code, err = parse_batchflip([args[0], *([action] if action else []), *args[2:]])
        assert "invalid choice" not in err and "unrecognized arguments" not in err, \
            f"{where}: `{cmd}`: {err}"


def test_batchflip_parse_check_catches_a_wrong_action_and_a_missing_argument():
    assert parse_batchflip(["archive", "pack", "--config", "c.yaml", "--out", "a.tgz"])[0] == 0
    assert "invalid choice" in parse_batchflip(["archive", "unpack"])[1]
    assert parse_batchflip(["archive", "pack"])[0] == 2


@pytest.mark.parametrize("where,cmd,fenced",
                         [c for c in of_kind("python3") + of_kind("python")
                          if c[1].split()[1].startswith("bench/")],
                         ids=str)
def test_documented_bench_command_names_its_script_and_flags(where, cmd, fenced):
    args = shlex.split(cmd)
    script = ROOT / args[1]
    assert script.is_file(), f"{where}: `{cmd}`: no {args[1]}"
    source = script.read_text()
    for flag in (a.split("=")[0] for a in args[2:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{where}: `{cmd}`: {args[1]} defines no {flag}"


@pytest.mark.parametrize("where,cmd,fenced",
                         [c for c in of_kind("python3") if c[1].startswith("python3 -m pytest")],
                         ids=str)
def test_documented_pytest_command_names_real_markers_and_files(pytestconfig, where, cmd,
                                                                fenced):
    markers = {m.split(":")[0] for m in pytestconfig.getini("markers")}
    assert {"workflow", "gpu"} <= markers
    args = shlex.split(cmd)[3:]
    for i, arg in enumerate(args):
        if i and args[i - 1] == "-m":
            used = set(re.findall(r"[a-z_]+", arg)) - {"not", "and", "or"}
            assert used <= markers, f"{where}: `{cmd}`: unknown markers {used - markers}"
        elif not arg.startswith("-"):
            assert (ROOT / arg.split("::")[0]).exists(), f"{where}: `{cmd}`: no {arg}"


@pytest.mark.parametrize("where,cmd,fenced",
                         [c for c in of_kind("pip") if c[1].startswith('pip install "batchflip[')],
                         ids=str)
def test_documented_pip_extra_exists(where, cmd, fenced):
    section = (ROOT / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"(?m)^([a-z0-9_-]+) *=", section))
    assert {"dev", "slurm"} <= extras  # the parse itself, against the file as written
    named = re.fullmatch(r'pip install "batchflip\[([a-z0-9_,-]+)\]"', cmd)
    assert named, f"{where}: `{cmd}`: not a plain extras install"
    for extra in named.group(1).split(","):
        assert extra in extras, f"{where}: `{cmd}`: pyproject.toml has no extra {extra!r}"


@pytest.mark.parametrize("where,cmd,fenced", of_kind("bash"), ids=str)
def test_documented_bash_script_exists(where, cmd, fenced):
    assert (ROOT / shlex.split(cmd)[1]).is_file(), f"{where}: `{cmd}`"


@pytest.mark.parametrize("where,cmd", snakemake_commands(), ids=lambda v: v)
def test_documented_command_plans(checkout, where, cmd):
    args = shlex.split(cmd)
    assert args[0] == "snakemake"
    if any(a.startswith("profiles/") and a != "profiles/default" for a in args):
        pytest.importorskip("snakemake_executor_plugin_slurm")
    extra = [] if "--lint" in args else ["-n"]
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args[1:], *extra],
                          cwd=checkout, capture_output=True, text=True)
    assert proc.returncode == 0, (f"{where}: `{cmd}` failed as a dry run:\n"
                                  f"{proc.stdout[-1500:]}{proc.stderr[-2500:]}")
    if "--unlock" in args:  # after a kill (docs/security.md): unlocks, plans nothing
        assert "Unlocked working directory" in proc.stdout + proc.stderr
    elif "--lint" not in args:
        assert "Job stats:" in proc.stdout or "Nothing to be done" in proc.stdout + proc.stderr
