"""The real DAG through a real vLLM server (markers: workflow, vllm).

A tiny discovery study on the ``vllm`` engine: one server job runs every condition (sync
and list dispatch) against one launched server, then scoring, flips (each dispatch against
its own batch-1 baseline), numbers with the flip agreement, and the paper bundle. After the
run no server process may be left, and the generation records carry the request timings.
The repeat control (``sync_b1_repeat``) runs in a server job of its own: a second, fresh
server start, and its numbers reach the paper bundle.
"""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import yaml
from conftest import ROOT
from test_server import _skip_without_vllm
from test_workflow import job_counts, snakemake

TINY = ROOT / "tests" / "fixtures" / "tiny_config.yaml"
CONDITIONS = ["sync_b1", "sync_b3", "list_b1", "list_b3", "sync_b1_repeat"]


def _api_servers() -> set[int]:
    """Processes running vLLM's OpenAI API server module right now."""
    out = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"],
                         capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.mark.workflow
@pytest.mark.vllm
def test_vllm_study_through_the_dag(tmp_path, model_dir):
    _skip_without_vllm()
    before = _api_servers()
    cfg = yaml.safe_load(TINY.read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"]["smollm2-135m"] = {"source": "path", "path": str(model_dir)}
    study = cfg["studies"].pop("a")
    study.update(engine="vllm", conditions=CONDITIONS, baseline="sync_b1",
                 dispatch_baselines={"list": "list_b1"},
                 server={"max_model_len": 512, "log_dir": "results/logs/vllm"})
    for key in ("threads", "cobatch_targets", "filler_pools"):
        study.pop(key)
    cfg["studies"] = {"v": study}
    cfg["paper"] = {"studies": ["v"]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))

    dry = snakemake("-n", "--cores", "2", "results/paper", "--configfile", str(path),
                    cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    counts = job_counts(dry.stdout)  # one server start per model, one more for the repeat
    assert counts["generate_server_v"] == counts["generate_server_v_repeat"] == 1

    proc = snakemake("--cores", "2", "results/paper", "--configfile", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _api_servers() <= before, "a vLLM server outlived the workflow"
    logs = list((tmp_path / "results/logs/vllm").glob("*.log"))
    assert len(logs) == 2 and all("Application startup complete" in log.read_text()
                                  for log in logs)  # the repeat's server is a fresh start

    gen_dir = tmp_path / "results/generations/v/smollm2-135m"
    assert not list(gen_dir.glob("*.partial.jsonl"))  # checkpoints removed once all written
    for cond in CONDITIONS:
        df = pd.read_parquet(gen_dir / f"{cond}.parquet")
        targets = df[df["role"] == "target"]
        assert sorted(targets["prompt_id"]) == sorted(set(targets["prompt_id"]))
        assert len(targets) == 6 and (df["finish_reason"] != "error").all()
        assert (df["t_submit"] <= df["t_first"]).all() and (df["t_first"] <= df["t_done"]).all()
        stack = json.loads((gen_dir / f"{cond}.stack.json").read_text())
        assert stack["engine"] == "vllm" and stack["kernel_flags"] == {"VLLM_BATCH_INVARIANT": "0"}
    # tail padding: 6 prompts at b = 3 fill two groups exactly; list groups match sync groups
    sync3 = pd.read_parquet(gen_dir / "sync_b3.parquet")
    assert sync3.groupby("group_id").size().tolist() == [3, 3]

    numbers = json.loads((tmp_path / "results/paper/numbers.json").read_text())["reproduced"]
    agree = numbers["v/smollm2-135m/flip_agreement_b3"]
    assert agree["n"] == 6 and 0 <= agree["value"] <= 1
    for dispatch in ("sync", "list"):
        rec = numbers[f"v/smollm2-135m/{dispatch}_b3/identical_share"]
        assert rec["n"] == 6 and rec["stack_ids"]
    # the repeat control: sync_b1 again, paired with sync_b1, beside sync_b3 (same prompts)
    own = numbers["v/smollm2-135m/sync_b1_repeat/repeat/any/text_change_rate"]
    beside = numbers["v/smollm2-135m/sync_b3/vs_repeat/any/text_change_vs_repeat_p"]
    assert own["n"] == beside["n"] == 6 and 0 <= beside["value"] <= 1
    assert beside["repeat_k"] == own["k"]
    html = (tmp_path / "results/paper/report.html").read_text()
    assert "<b>sync_b1_repeat</b> (vs sync_b1)" in html
