"""No value from a config, a battery or an archive reaches a shell unquoted (issue 21).

Hostile strings (``$(...)``, backticks, ``;``, quotes) go into every free string that the
config schema still allows (system prompts, model paths and specs, served model names,
server settings, battery and archive paths, alignment labels with shell characters) of the
three shipped configs. The dry run's ``-p`` commands are then run by bash with a test double
``python`` first on PATH that only records its argv: no marker file may appear, every
command must parse, and each hostile string must arrive as one literal argument (or inside
a JSON argument). Names and labels that the schema patterns refuse fail the config check
with the key named. Last, the Study B numbers job (whose ``--alignment`` pairs were joined
into its shell line unquoted) really runs on such a config with the real model.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, paper_battery

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
# shell-hostile labels the alignment pattern allows: a syntax error when unquoted
ALIGNMENTS = ["RLHF (PPO)", "SFT + DPO/x"]


def hostile(marker: Path | str, tag: str) -> str:
    """A string that runs `touch marker` through every shell construct if it is unquoted,
    or closes a quote around it."""
    return (f"{tag} $(touch {marker}) `touch {marker}` ; touch {marker} ; "
            f"' ; touch {marker} ; ' \" ; touch {marker} ; \" end")


# folder names hold no "/": they touch MARKER in the working directory of the command
DIR_MARKER = "MARKER"


def snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"),
                           "-d", str(cwd), *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def hostile_dir(parent: Path, marker: Path, tag: str, target: Path) -> Path:
    """A directory with a hostile name (touching ``DIR_MARKER``, relative: the command's
    working directory) holding a link ``target.name`` -> ``target``."""
    d = parent / hostile(DIR_MARKER, tag)
    d.mkdir(parents=True, exist_ok=True)
    (d / target.name).symlink_to(target)
    return d / target.name


def poison(cfg: dict, tmp: Path, marker: Path) -> list[str]:
    """Put hostile strings into every free string of ``cfg`` that the schema allows;
    returns the strings that must reach the commands verbatim."""
    expect = []
    for name, spec in cfg["batteries"].items():
        paths = []
        for p in spec.get("paths", []):
            real = paper_battery(tmp / "synthetic") if "paper_battery" in p else ROOT / p
            paths.append(str(hostile_dir(tmp / "batteries" / name, marker, "battery", real)))
        spec["paths"] = paths
        expect += paths
    for i, (_name, spec) in enumerate(sorted(cfg["models"].items())):
        field = {"pypi_gguf": "package", "hub": "id", "path": "path",
                 "endpoint": "served_model"}[spec["source"]]
        spec[field] = hostile(marker, f"model{i}")
        expect.append(spec[field])
        spec["alignment"] = ALIGNMENTS[i % 2]
    for name, study in cfg["studies"].items():
        if study["kind"] == "ablation":
            continue
        # an enriched study generates after its subset checkpoint (batchflip.keyed): a dry
        # run does not plan those commands, so its strings cannot be expected in them
        planned = not study.get("subset_from")
        study["system_prompt"] = hostile(marker, f"system-{name}")
        expect += [study["system_prompt"]] if planned else []
        if study["engine"] != "hf":
            server = study["server"] = dict(study.get("server") or {})  # YAML anchors share
            server["extra_args"] = [hostile(marker, f"arg-{name}")]
            expect += server["extra_args"] if planned else []
    if any(s["kind"] == "models" for s in cfg["studies"].values()):
        expect += [f"{m}={a}" for m, a in zip(sorted(cfg["models"]), ALIGNMENTS * 99,
                                              strict=False)
                   if any(m in s.get("models", []) and s["kind"] == "models"
                          for s in cfg["studies"].values())]
    return expect


FAKE_PYTHON = """#!/bin/bash
# test double for python: records its argv (NUL-separated, one record per call)
printf '%s\\0' "$@" >> "$ARGV_LOG"
printf '\\n\\0' >> "$ARGV_LOG"
"""


def run_commands(commands: list[str], ws: Path, tmp: Path) -> list[list[str]]:
    """Run each command with bash in ``ws`` with the recording python first on PATH; return
    the argv of every call. Every command must exit 0 (a quoting slip is a syntax error)."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "python").write_text(FAKE_PYTHON)
    (bindir / "python").chmod(0o755)
    log = tmp / "argv.log"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "ARGV_LOG": str(log)}
    for cmd in commands:
        words = shlex.split(cmd)
        for op, path in zip(words, words[1:], strict=False):  # log redirections' folders
            if op in (">", "2>"):
                (ws / path).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bash", "-c", "set -euo pipefail; " + cmd], cwd=ws, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr}"
    records = log.read_bytes().split(b"\n\0") if log.exists() else []
    return [[a.decode() for a in r.split(b"\0") if a] for r in records if r]


def strings_in(args: list[str]) -> set[str]:
    """Every argument, and every string inside an argument that is JSON."""
    out: set[str] = set(args)

    def walk(v):
        if isinstance(v, str):
            out.add(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for a in args:
        if a[:1] in "{[":
            try:
                walk(json.loads(a))
            except json.JSONDecodeError:
                pass
    return out


def shell_commands(output: str) -> list[str]:
    return [line[len("Shell command: "):] for line in output.splitlines()
            if line.startswith("Shell command: ")]


@pytest.mark.parametrize("name,mode", [("config.yaml", "verify"), ("config.yaml", "restore"),
                                       ("gpu-check.yaml", "verify"), ("paper.yaml", "verify")])
def test_hostile_strings_reach_every_command_as_literal_arguments(tmp_path, name, mode):
    marker = tmp_path / "MARKER"
    ws = tmp_path / "ws"
    ws.mkdir()
    cfg = yaml.safe_load((ROOT / "config" / name).read_text())
    expect = poison(cfg, tmp_path, marker)
    archive = hostile_dir(tmp_path / "archive", marker, "archive", tmp_path / "a.tar.gz")
    (tmp_path / "a.tar.gz").write_bytes(b"")  # planned only, never read
    cfg[mode] = {"archive": str(archive)}
    if mode == "restore":  # no battery, model or generation job runs: their strings are unused
        expect = [e for e in expect if e.split("=")[0] in cfg["models"]]
    expect.append(str(archive))
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    targets = ["results/paper"]
    if mode == "verify":
        targets += [f"results/verify/{s}.json" for s, v in cfg["studies"].items()
                    if v["kind"] != "ablation"][:2]
    proc = snakemake(ws, "-n", "-p", "--cores", "2", *targets, "--configfile", str(path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    commands = shell_commands(proc.stdout + proc.stderr)
    assert len(commands) > 10
    calls = run_commands(commands, ws, tmp_path)
    assert not marker.exists() and not (ws / DIR_MARKER).exists()
    assert len(calls) == len(commands)  # every command ran its one python call
    seen = set().union(*(strings_in(c) for c in calls))
    missing = [e for e in expect if not any(e in s for s in seen)]
    assert not missing
    for e in expect:  # whole arguments or whole JSON strings, never split on spaces
        assert e in seen or any(e in s and s.startswith(("/", "results")) for s in seen)


EDITS = {
    "models.smollm2-135m.alignment":
        lambda c, p: c["models"]["smollm2-135m"].update(alignment=p),
    "models": lambda c, p: c["models"].update({f"m{p}": c["models"].pop("gemma3-270m")}),
    "batteries":
        lambda c, p: c["batteries"].update({f"b{p}": c["batteries"].pop("composition")}),
    "studies.a.baseline": lambda c, p: c["studies"]["a"].update(baseline=p),
    "studies.a_vllm.dispatch_baselines.list":
        lambda c, p: c["studies"]["a_vllm"]["dispatch_baselines"].update(list=p),
    "studies.b.models.0": lambda c, p: c["studies"]["b"]["models"].__setitem__(0, p),
}


def default_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for spec in cfg["batteries"].values():
        spec["paths"] = [str(ROOT / p) for p in spec["paths"]]
    return cfg


@pytest.mark.parametrize("key", sorted(EDITS))
def test_names_and_labels_with_shell_characters_are_refused_by_the_schema(tmp_path, key):
    """Model and battery names, alignment labels and condition names have schema patterns:
    the config check stops naming the key (the issue's payloads, e.g. an alignment
    "SFT $(touch X)", ran in a normal run and on the reviewer's side)."""
    from batchflip.config import check_config
    from batchflip.errors import BatchflipError

    cfg = default_config()
    EDITS[key](cfg, "SFT $(touch X); `touch X`")
    with pytest.raises(BatchflipError) as err:
        check_config(cfg, SCHEMA)
    msg = str(err.value)
    assert f"key '{key}'" in msg and ("'pattern'" in msg or "'propertyNames'" in msg), msg


def test_the_issue_reproduction_stops_at_the_config_check(tmp_path):
    """models.<m>.alignment "SFT $(touch X)" through Snakemake: a one-line error naming the
    key, nothing planned, nothing run."""
    marker = tmp_path / "MARKER"
    cfg = default_config()
    cfg["models"]["smollm2-135m"]["alignment"] = f"SFT $(touch {marker})"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "-p", "--cores", "2", "results/paper", "--configfile",
                     str(path))
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "invalid config: key 'models.smollm2-135m.alignment'" in err and "pattern" in err
    assert "Shell command" not in err
    assert not marker.exists() and not (tmp_path / "results").exists()


# Fields left unquoted on purpose: the generation and battery rules keep their shell text,
# because Snakemake's code trigger would rerun every existing generation for a changed text.
# Each is safe without :q: pre-quoted (shlex) or constrained to an enum / a wildcard pattern.
UNQUOTED_ON_PURPOSE = {
    "generate.smk: {wildcards.condition}",  # constraint CONDITION_WILDCARD (common.smk)
    "generate.smk: {params.jobs}",  # server_job_args quotes every argument with shlex
    "generate.smk: {params.check}",  # keyed_check: a shell prefix, its parts shlex-quoted
    "study_ablation.smk: {wildcards.kernel_mode}",  # constraint standard|batch_invariant
    "battery.smk: {params.render}",  # schema enum harness | jinja
    "fidelity.smk: {input}", "fidelity.smk: {output}", "fidelity.smk: {log}",  # fixed paths
}


def test_every_shell_field_of_every_rule_is_quoted():
    """Static check of the rule files: each {input...}/{output...}/{log}/{params...}/
    {wildcards...} field of a shell string carries :q (UNQUOTED_ON_PURPOSE aside)."""
    import re

    field = re.compile(r"\{(input|output|log|params|wildcards)(\.[A-Za-z_]+)?(:[a-z]*)?\}")
    bad = []
    for smk in sorted((ROOT / "workflow/rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.findall(r"shell:\n((?:\s+\".*\"\n?)+)", text):
            for m in field.finditer(block):
                if m.group(3) != ":q":
                    bad.append(f"{smk.name}: {m.group(0)}")
    assert sorted(set(bad) - UNQUOTED_ON_PURPOSE) == []


@pytest.mark.workflow
def test_study_b_numbers_job_runs_with_shell_characters_in_its_config(tmp_path, model_dir):
    """The real Study B DAG (two model names on the real SmolLM2, alignment labels with
    parentheses, '+' and '/', a hostile system prompt, model and battery folders with
    hostile names): the numbers job runs, records the labels verbatim and runs no marker."""
    marker = tmp_path / "MARKER"
    ws = tmp_path / "ws"
    ws.mkdir()
    battery = hostile_dir(tmp_path / "bat", marker, "battery", ROOT / "tests/fixtures/battery")
    model = hostile_dir(tmp_path / "mod", marker, "model", model_dir)
    cfg = yaml.safe_load((ROOT / "tests/fixtures/tiny_config.yaml").read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(battery)]
    cfg["models"] = {"m1": {"source": "path", "path": str(model), "alignment": ALIGNMENTS[0]},
                     "m2": {"source": "path", "path": str(model), "alignment": ALIGNMENTS[1]}}
    a = cfg["studies"].pop("a")
    cfg["studies"]["b"] = {**{k: a[k] for k in ("battery", "engine", "dtype", "max_new_tokens",
                                                "seed", "prompt_format", "threads")},
                           "kind": "models", "models": ["m1", "m2"], "threads": 1,
                           "system_prompt": hostile(marker, "system"), "max_new_tokens": 2,
                           "baseline": "sync_b1", "conditions": ["sync_b1", "sync_b4"]}
    cfg["paper"] = {"studies": ["b"]}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(ws, "--cores", "2", "results/numbers/b.json", "--configfile", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists() and not (ws / DIR_MARKER).exists()
    numbers = json.loads((ws / "results/numbers/b.json").read_text())["numbers"]
    labels = {numbers[f"b/{m}/fragility"]["alignment"] for m in ("m1", "m2")}
    assert labels == set(ALIGNMENTS)
    assert numbers["b/m1/fragility"]["alignment"] == ALIGNMENTS[0]
    # the hostile system prompt reached the model as text (the generation job's params)
    gen = pd.read_parquet(ws / "results/generations/b/m1/sync_b1.parquet")
    assert len(gen) == 6 and (gen["finish_reason"] != "error").all()
