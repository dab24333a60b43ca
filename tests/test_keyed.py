"""Content-keyed generation downstream of scoring (batchflip.keyed): a scorer change never
regenerates, and a changed Study D candidate list reruns only its new candidates.

The plan tests run Snakemake on config/paper.yaml (the synthetic battery of the paper's task
names when ../shared is absent) in a finished state: every planned output present and in
order (the real battery job, then `snakemake --touch`). `--touch` records no metadata, so a
scorer change is applied as Snakemake's params trigger would apply it: the jobs whose shell
command changes with the new scorer versions (compared over the whole forced plan) are
forced, and the dry run of the new config shows everything that would rerun.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, paper_battery

from batchflip import keyed, layout
from batchflip.cli import main as cli
from batchflip.errors import BatchflipError
from batchflip.scoring import SCORER_VERSIONS
from batchflip.studies.ablation_runs import CANDIDATE_COLUMNS, RUN_COLUMNS

BLOCK = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(.*?)(?=\n\n|\Z)", re.M | re.S)
# rules that start a server, load a model or send a request
GENERATING = re.compile(r"^(generate|generate_keyed|generate_server_\w+|ablation_generate|model)$")


def snakemake(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(ws),
           "--cores", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ws, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def jobs(out: str) -> dict[str, tuple[str, str]]:
    """{first output: (rule, shell command)} of every job a dry run prints."""
    found = {}
    for m in BLOCK.finditer(out):
        outs = re.search(r"^\s+output: (.*)$", m[2], re.M)
        cmd = re.search(r"^Shell command: (.*)$", m[2], re.M)
        if outs:
            found[outs[1].split(", ")[0]] = (m[1], cmd[1] if cmd else "")
    return found


def finish(ws: Path, config: str) -> None:
    """Every output of the plan present and up to date: the real battery job, then each
    planned file created (checkpoint outputs as valid parquet) and `snakemake --touch`."""
    snakemake(ws, "results/battery/paper.parquet", "--configfile", config)
    battery = pd.read_parquet(ws / "results/battery/paper.parquet")
    for _ in range(4):
        out = snakemake(ws, "-n", "results/paper", "--configfile", config)
        if "Nothing to be done" in out.stdout + out.stderr:
            return
        for block in BLOCK.finditer(out.stdout):
            outs = re.search(r"^\s+output: (.*)$", block[2], re.M)
            for o in outs[1].split(", ") if outs else []:
                f = ws / o
                f.parent.mkdir(parents=True, exist_ok=True)
                if f.exists():
                    continue
                if f.name == "candidates.parquet":
                    pd.DataFrame(columns=CANDIDATE_COLUMNS).to_parquet(f, index=False)
                elif o.startswith("results/battery/enriched/"):
                    battery.head(5).to_parquet(f, index=False)
                elif not f.suffix:
                    f.mkdir()
                else:
                    f.touch()
        snakemake(ws, "--touch", "results/paper", "--configfile", config)
    pytest.fail("the touched run is still not complete")


@pytest.fixture(scope="module")
def finished_paper(tmp_path_factory):
    ws = tmp_path_factory.mktemp("paper-run")
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    cfg["batteries"]["paper"]["paths"] = [str(paper_battery(ws))]
    (ws / "paper.yaml").write_text(yaml.safe_dump(cfg))
    finish(ws, "paper.yaml")
    forced = jobs(snakemake(ws, "-n", "--forceall", "results/paper", "--configfile",
                            "paper.yaml").stdout)
    return ws, cfg, forced


@pytest.mark.parametrize("scorer", sorted(SCORER_VERSIONS))
def test_scorer_change_plans_no_generation_on_the_paper_plan(finished_paper, scorer):
    ws, cfg, before = finished_paper
    new = {**cfg, "scorers": {**cfg["scorers"]}}
    new["scorers"][scorer] = next(v for v in SCORER_VERSIONS[scorer]
                                  if v != cfg["scorers"][scorer])
    (ws / f"{scorer}.yaml").write_text(yaml.safe_dump(new))
    after = jobs(snakemake(ws, "-n", "--forceall", "results/paper", "--configfile",
                           f"{scorer}.yaml").stdout)
    assert set(after) == set(before)
    changed = sorted(o for o in after if after[o][1] != before[o][1])
    rules = {after[o][0] for o in changed}
    assert "score" in rules  # the change reaches the scorer: score jobs rerun
    assert not any(GENERATING.match(r) for r in rules), rules
    plan = snakemake(ws, "-n", "results/paper", "--configfile", f"{scorer}.yaml",
                     "--forcerun", *changed).stdout
    planned = {rule for rule, _ in jobs(plan).values()}
    assert {"score", "flips", "paper"} <= planned
    # the candidate list and the enriched subset are rewritten, and their consumers rerun
    assert {"ablation_candidates", "ablation_pick", "enriched_battery",
            "enriched_pick"} <= planned
    # but no server starts, no model loads, no request is sent
    assert not any(GENERATING.match(r) for r in planned), sorted(planned)


# --- keys ------------------------------------------------------------------------------------


def _candidates(n: int = 2) -> pd.DataFrame:
    rows = []
    for i in range(n):
        members = [{"position": 0, "role": "target", "prompt_id": f"p{i}"},
                   {"position": 1, "role": "target", "prompt_id": f"q{i}"}]
        rows.append({c: None for c in CANDIDATE_COLUMNS} | {
            "candidate_id": f"sync_b2/p{i}", "source_study": "a", "model": "m", "task": "t",
            "domain": "safety", "prompt_id": f"p{i}", "condition": "sync_b2",
            "dispatch": "sync", "batch_size": 2, "group_id": i, "position": 0,
            "group_size": 2, "members": json.dumps(members), "direction": "to_unsafe",
            "baseline_score": 1.0, "condition_score": 0.0})
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def test_candidates_key_ignores_scores_and_order_but_not_groups():
    cands = _candidates()
    key = keyed.candidates_key(cands)
    assert len(key) == keyed.KEY_LEN and re.fullmatch(keyed.KEY_PATTERN, key)
    rescored = cands.assign(baseline_score=0.5, condition_score=1.0, direction="to_safe")
    assert keyed.candidates_key(rescored) == key  # a scorer change keeps the key
    assert keyed.candidates_key(cands.iloc[::-1]) == key
    moved = cands.copy()
    moved.loc[0, "position"] = 1
    assert keyed.candidates_key(moved) != key
    assert keyed.candidates_key(_candidates(3)) != key
    with pytest.raises(BatchflipError, match="members"):
        keyed.candidates_key(cands.drop(columns=["members"]))


def test_battery_key_follows_content_and_order(tmp_path):
    df = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", "y"]})
    df.to_parquet(tmp_path / "1.parquet", index=False)
    df.to_parquet(tmp_path / "2.parquet", index=False)
    df.iloc[::-1].to_parquet(tmp_path / "3.parquet", index=False)
    df.assign(prompt=["x", "z"]).to_parquet(tmp_path / "4.parquet", index=False)
    k = [keyed.battery_key(tmp_path / f"{i}.parquet") for i in range(1, 5)]
    assert k[0] == k[1] and len({k[0], k[2], k[3]}) == 3
    assert keyed.combined_key([k[0]]) == k[0]
    assert keyed.combined_key([k[0], k[2]]) != keyed.combined_key([k[2], k[0]])


def test_check_and_pick_cli(tmp_path, capsys):
    df = pd.DataFrame({"prompt_id": ["a"], "prompt": ["x"]})
    df.to_parquet(tmp_path / "b.parquet", index=False)
    key = keyed.battery_key(tmp_path / "b.parquet")
    assert cli(["keyed", "check", "--file", str(tmp_path / "b.parquet"), "--kind", "battery",
                "--key", key]) == 0
    assert cli(["keyed", "check", "--file", str(tmp_path / "b.parquet"), "--kind", "battery",
                "--key", "0" * 16]) == 1
    assert f"content key {key}, but this job is for {'0' * 16}" in capsys.readouterr().err
    (tmp_path / "s.json").write_text("{}")
    assert cli(["keyed", "pick", "--src", str(tmp_path / "b.parquet"), str(tmp_path / "s.json"),
                "--dst", str(tmp_path / "o/x.parquet"), str(tmp_path / "o/x.stack.json")]) == 0
    assert (tmp_path / "o/x.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert cli(["keyed", "pick", "--src", str(tmp_path / "nope"), "--dst",
                str(tmp_path / "y")]) == 1
    assert not (tmp_path / "y").exists()


def test_keyed_paths_never_match_the_fixed_ones():
    keyed_gen = layout.keyed_generation_path("ae", "m", "sync_b2", "0123456789abcdef")
    assert not re.fullmatch(r"results/generations/[^/]+/[^/]+/[a-z0-9_]+\.parquet", keyed_gen)
    keyed_run = layout.ablation_keyed_run_path("d", "m", "standard", "0123456789abcdef")
    assert keyed_run.startswith(layout.ablation_run_path("d", "m", "standard")[:-8] + "/")
    assert set(RUN_COLUMNS) >= {"candidate_id", "run"}


# --- Study D: an added candidate is the only one rerun (tiny workflow, real SmolLM2) -------


def _add_candidate(ws: Path, model: str) -> str:
    """Append to Study D's candidate list one source row it does not hold yet (chosen as
    the candidates rule chooses: select_candidates on the real flips and generations)."""
    from batchflip.studies.ablation_runs import select_candidates

    path = ws / layout.ablation_candidates_path("d", model)
    cands = pd.read_parquet(path)
    flips = pd.read_parquet(ws / layout.flips_path("a", model))
    gens = {str(p): pd.read_parquet(p)
            for p in sorted((ws / "results/generations/a" / model).glob("*.parquet"))}
    ids = flips["condition"].astype(str) + "/" + flips["prompt_id"].astype(str)
    free = flips[~ids.isin(set(cands["candidate_id"]))].iloc[:1].assign(flip=True)
    new = select_candidates(free, gens, "sync_b1")
    (pd.concat([cands, new], ignore_index=True) if len(cands) else new).to_parquet(
        path, index=False)
    return str(new["candidate_id"].iloc[0])


@pytest.mark.workflow
def test_added_candidate_is_the_only_one_rerun(tmp_path, model_dir):
    model = "smollm2-135m"
    cfg = yaml.safe_load((ROOT / "tests/fixtures/tiny_config.yaml").read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"][model] = {"source": "path", "path": str(model_dir)}
    cfg["studies"]["a"]["conditions"] = ["sync_b1", "sync_b2"]  # sync_b2: one group of both prompts
    # one prompt of each task: 3 generation groups, 2 conditioned rows to add as candidates
    cfg["studies"]["a"]["subset"] = {"method": "head", "per_task": {"tiny_refusal": 1,
                                                                    "tiny_mc": 1}}
    cfg["studies"]["d"] = {"kind": "ablation", "source": "a", "engine": "hf",
                           "kernel_modes": ["standard"]}
    cfg["paper"]["studies"] = ["a", "d"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = ("results/numbers/d.json", "--configfile", "config.yaml")
    snakemake(tmp_path, *run)
    mode_dir = tmp_path / "results/ablation/d" / model / "standard"
    first = sorted(mode_dir.glob("*.parquet"))
    assert len(first) == 1  # one keyed rerun file: the first candidate list's
    fixed = tmp_path / layout.ablation_run_path("d", model, "standard")
    assert fixed.read_bytes() == first[0].read_bytes()

    added = []
    for _ in range(2):
        before = pd.read_parquet(fixed)
        added.append(_add_candidate(tmp_path, model))
        plan = {rule for rule, _ in jobs(snakemake(tmp_path, "-n", *run).stdout).values()}
        assert {"ablation_generate", "ablation_pick", "ablation_numbers"} <= plan
        assert not plan & {"generate", "score", "flips", "ablation_candidates"}, plan
        out = snakemake(tmp_path, *run)
        assert "rule generate:" not in out.stdout + out.stderr
        cands = pd.read_parquet(tmp_path / layout.ablation_candidates_path("d", model))
        key = keyed.candidates_key(cands)
        record = json.loads((mode_dir / f"{key}.reuse.json").read_text())
        assert record["generated"] == [added[-1]]  # only the new candidate ran
        assert record["reused"] == sorted(before["candidate_id"].unique())
        after = pd.read_parquet(fixed)
        old = after[after["candidate_id"].isin(set(before["candidate_id"]))]
        pd.testing.assert_frame_equal(old.reset_index(drop=True), before.reset_index(drop=True),
                                      check_dtype=False)
        assert set(after["candidate_id"]) == set(before["candidate_id"]) | {added[-1]}
        assert len(after) == 2 * after["candidate_id"].nunique()  # alone and in group
    # the rule's own candidate list again (a forced rerun rewrites it): its key's reruns
    # exist, so nothing is generated
    out = snakemake(tmp_path, *run, "--forcerun", "ablation_candidates")
    assert "ablation_generate" not in out.stdout + out.stderr
    assert fixed.read_bytes() == first[0].read_bytes()
    assert len(sorted(mode_dir.glob("*.parquet"))) == 3


# --- Study D reuse, unit level (a recording engine double) ----------------------------------


class RecordingEngineDouble:
    """Test double of an engine: answers each member with '<condition>:<prompt id>' and
    records every group it is asked to run."""

    name = "double"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def fingerprint(self) -> dict:
        return {"engine": "double"}

    def run_group(self, group, cond):
        from batchflip.engines import Result

        self.calls.append((cond.name, tuple(m.prompt_id for m in group.members)))
        return [Result(f"{cond.name}:{m.prompt_id}", [1], "stop", 1, 0.0, 0.0, 0.0)
                for m in group.members]

    def close(self) -> None:
        pass


def _tiny_candidates(battery: pd.DataFrame, n: int) -> pd.DataFrame:
    ids = battery["prompt_id"].tolist()
    rows = []
    for i in range(n):
        pair = [ids[2 * i], ids[2 * i + 1]]
        members = [{"position": j, "role": "target", "prompt_id": p} for j, p in enumerate(pair)]
        rows.append({c: None for c in CANDIDATE_COLUMNS} | {
            "candidate_id": f"sync_b2/{pair[0]}", "source_study": "a", "model": "m",
            "task": "t", "domain": "safety", "prompt_id": pair[0], "condition": "sync_b2",
            "dispatch": "sync", "batch_size": 2, "group_id": i, "position": 0,
            "group_size": 2, "members": json.dumps(members), "direction": "to_unsafe",
            "baseline_score": 1.0, "condition_score": 0.0})
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def test_run_mode_reruns_only_new_candidates_and_starts_no_engine_without_any(tmp_path,
                                                                            monkeypatch):
    from batchflip.battery import build_battery
    from batchflip.settings import GenerationSettings
    from batchflip.studies.ablation_runs import reuse_path, run_mode

    def no_engine(*args: object) -> None:
        raise AssertionError("no engine may start")

    monkeypatch.setattr("batchflip.generate.make_engine", no_engine)
    battery = build_battery([ROOT / "tests/fixtures/battery"])
    params = {"study": "d", "model": "m", "engine": "hf", "dtype": "float32",
              "max_new_tokens": 4, "seed": 1, "prompt_format": "raw"}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    mode_dir = tmp_path / "standard"
    mode_dir.mkdir()

    def run(cands, name, engine=None, **over):
        out = mode_dir / f"{name}.parquet"
        settings = GenerationSettings.from_mapping({**params, **over})
        runs, _ = run_mode(cands, battery, settings, str(model_dir), "standard", out,
                           Path(layout.stack_path(str(out))), engine=engine, reuse=True)
        return runs, json.loads(reuse_path(out).read_text())

    two, three = _tiny_candidates(battery, 2), _tiny_candidates(battery, 3)
    first = RecordingEngineDouble()
    runs2, rec = run(two, "k2", first)
    assert len(first.calls) == 4 and rec["reused"] == [] and len(rec["generated"]) == 2
    second = RecordingEngineDouble()
    runs3, rec = run(three, "k3", second)
    new = three["candidate_id"].iloc[2]
    assert rec["generated"] == [new] and rec["reused"] == sorted(two["candidate_id"])
    # only the new candidate ran: alone, then in its group
    assert second.calls == [("sync_b1", (three["prompt_id"].iloc[2],)),
                            ("sync_b2", tuple(json.loads(three["members"].iloc[2])[j]["prompt_id"]
                                              for j in range(2)))]
    assert runs3.iloc[:4].to_dict("records") == runs2.to_dict("records")
    assert runs3["candidate_id"].tolist() == [c for c in three["candidate_id"] for _ in range(2)]
    # a subset of what was run: no engine at all (make_engine would fail on this name)
    runs_again, rec = run(two, "k2b")
    assert rec["generated"] == [] and runs_again.to_dict("records") == runs2.to_dict("records")
    assert (mode_dir / "k2b.stack.json").read_text() == (mode_dir / "k2.stack.json").read_text()
    # other settings: nothing carries over
    third = RecordingEngineDouble()
    _, rec = run(two, "k2c", third, max_new_tokens=5)
    assert rec["reused"] == [] and len(third.calls) == 4
