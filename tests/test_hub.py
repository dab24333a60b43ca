"""Hub models: the pinned-snapshot download of the model stage, and its place in the DAG.

The hub is unreachable from the test machine, so the two hub calls are replaced by test
doubles: ``fake_resolve`` (a fixed branch head) and ``fake_snapshot_download``, which copies
the files of a local directory that match ``allow_patterns`` (fnmatch, as huggingface_hub
filters repo files). Everything after them (allow patterns passed, revision checks,
model.json, sha256 of every file, atomicity) is the real code. The sha256 oracle is hashlib
on the source files' bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_workflow import TINY, job_counts, snakemake

from batchflip import hub
from batchflip.config import check_config
from batchflip.errors import BatchflipError
from batchflip.model import materialise, model_fingerprint

HEAD = "1" * 40
PIN = "ab" * 20
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"
# the repository's files: weights in two shards, configs, tokenizer, and files a model
# directory does not need
REPO = {
    "model-00001-of-00002.safetensors": b"shard one",
    "model-00002-of-00002.safetensors": b"shard two",
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "config.json": b'{"model_type": "llama"}',
    "generation_config.json": b"{}",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "README.md": b"# card",
    "original/consolidated.00.pth": b"meta checkpoint",
    ".gitattributes": b"*.safetensors filter=lfs",
}
NEEDED = {n for n in REPO if n not in ("README.md", "original/consolidated.00.pth",
                                       ".gitattributes")}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name, data in REPO.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def fake_resolve(head: str = HEAD):
    """Test double for the hub's revision lookup: unpinned gives ``head``, a commit itself."""
    def resolve(repo_id: str, revision: str | None) -> str:
        return head if revision is None else revision
    return resolve


def fake_snapshot_download(source: Path, calls: list[dict], fail_after: int | None = None):
    """Test double for huggingface_hub.snapshot_download: copies the files of ``source``
    that match allow_patterns into local_dir (with a .cache folder, as the real one leaves);
    with ``fail_after`` it raises after copying that many files."""
    def snapshot(**kwargs):
        calls.append(kwargs)
        dest = Path(kwargs["local_dir"])
        (dest / ".cache/huggingface").mkdir(parents=True)
        copied = 0
        for p in sorted(source.rglob("*")):
            rel = p.relative_to(source).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in kwargs["allow_patterns"]):
                if fail_after is not None and copied == fail_after:
                    raise ConnectionError("connection reset")
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest / rel)
                copied += 1
        return str(dest)
    return snapshot


def spec(revision: str = PIN, **extra) -> dict:
    return {"source": "hub", "id": "org/model", "revision": revision, **extra}


def test_pinned_snapshot_downloads_needed_files_and_hashes_each(tmp_path, repo):
    calls: list[dict] = []
    out = tmp_path / "models" / "m1"
    record = hub.download(spec(), out, resolve=fake_resolve(),
                          snapshot=fake_snapshot_download(repo, calls))
    assert len(calls) == 1
    assert calls[0]["repo_id"] == "org/model" and calls[0]["revision"] == PIN
    assert calls[0]["allow_patterns"] == list(hub.DEFAULT_ALLOW_PATTERNS)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == NEEDED | {"model.json"}  # no .cache, README or original/ checkpoint
    assert record["files"] == {n: hashlib.sha256(REPO[n]).hexdigest() for n in NEEDED}
    assert (record["source"], record["id"], record["revision"], record["commit"]) == (
        "hub", "org/model", PIN, PIN)
    assert json.loads((out / "model.json").read_text()) == record
    # the stack fingerprint copies model.json (hashed once, by the model stage)
    assert model_fingerprint(str(out)) == record


def test_unpinned_downloads_the_head_resolved_first_and_records_it(tmp_path, repo):
    calls: list[dict] = []
    record = hub.download(spec(hub.UNPINNED), tmp_path / "m", resolve=fake_resolve(HEAD),
                          snapshot=fake_snapshot_download(repo, calls))
    assert calls[0]["revision"] == HEAD  # the commit, not the moving branch
    assert record["revision"] == "unpinned" and record["commit"] == HEAD


def test_allow_patterns_from_the_config_are_used(tmp_path, repo):
    calls: list[dict] = []
    record = hub.download(spec(allow_patterns=["*.pth", "config.json"]), tmp_path / "m",
                          resolve=fake_resolve(), snapshot=fake_snapshot_download(repo, calls))
    assert set(record["files"]) == {"original/consolidated.00.pth", "config.json"}
    assert record["allow_patterns"] == ["*.pth", "config.json"]


def test_a_snapshot_without_weights_is_refused(tmp_path, repo):
    with pytest.raises(BatchflipError, match=r"models\.m: no weight file .*models\.m\."
                                             "allow_patterns"):
        hub.download(spec(allow_patterns=["*.json"]), tmp_path / "m", resolve=fake_resolve(),
                     snapshot=fake_snapshot_download(repo, []))
    assert not (tmp_path / "m").exists()


def test_a_pin_that_resolves_elsewhere_is_refused(tmp_path, repo):
    calls: list[dict] = []
    with pytest.raises(BatchflipError, match=r"models\.m\.revision: .* resolved to commit"):
        hub.download(spec(), tmp_path / "m", resolve=lambda repo_id, rev: HEAD,
                     snapshot=fake_snapshot_download(repo, calls))
    assert calls == []


@pytest.mark.parametrize(("revision", "message"), [
    (None, r"key 'models\.m\.revision': a hub model needs the commit"),
    ("main", r"key 'models\.m\.revision': 'main' is not a 40-hex commit"),
    ("ABCD" * 10, r"key 'models\.m\.revision': 'ABCD.*' is not a 40-hex commit"),
])
def test_revision_errors_name_the_key(tmp_path, revision, message):
    s = spec() if revision is None else spec(revision)
    if revision is None:
        del s["revision"]
    with pytest.raises(BatchflipError, match=message):
        hub.download(s, tmp_path / "m", resolve=fake_resolve(),
                     snapshot=fake_snapshot_download(tmp_path, []))


def _tiny_with(model: dict) -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["models"]["smollm2-135m"] = model
    return cfg


@pytest.mark.parametrize(("model", "key", "rule"), [
    ({"source": "hub", "id": "org/model"}, "models.smollm2-135m.revision", "needs the commit"),
    (spec("main"), "models.smollm2-135m.revision", "oneOf"),
    ({"source": "path", "path": "/m", "revision": PIN}, "models.smollm2-135m.revision",
     "only hub models"),
])
def test_config_check_refuses_unpinned_hub_models(model, key, rule):
    with pytest.raises(BatchflipError, match=rf"key '{key}'.*{rule}"):
        check_config(_tiny_with(model), SCHEMA)


def test_config_check_accepts_pinned_and_explicitly_unpinned():
    check_config(_tiny_with(spec()), SCHEMA)
    check_config(_tiny_with(spec(hub.UNPINNED)), SCHEMA)


def test_a_failed_download_leaves_nothing_behind(tmp_path, repo):
    models = tmp_path / "models"
    old = models / "m"
    old.mkdir(parents=True)
    (old / "model.json").write_text('{"old": true}')
    with pytest.raises(BatchflipError, match=r"models\.m: downloading 'org/model' failed .*"
                                             "ConnectionError: connection reset"):
        hub.download(spec(), old, resolve=fake_resolve(),
                     snapshot=fake_snapshot_download(repo, [], fail_after=2))
    # the previous build is untouched and no temporary directory is left
    assert sorted(p.name for p in models.iterdir()) == ["m"]
    assert [p.name for p in old.iterdir()] == ["model.json"]
    assert json.loads((old / "model.json").read_text()) == {"old": True}


def test_gated_repository_error_says_hf_token(tmp_path, repo):
    import httpx
    from huggingface_hub.errors import GatedRepoError

    def gated(**kwargs):
        response = httpx.Response(401, request=httpx.Request("GET", "https://hub/org/model"))
        raise GatedRepoError("Access to model org/model is restricted", response=response)

    with pytest.raises(BatchflipError, match=r"models\.m: hub repository 'org/model' is "
                                             "gated: .*HF_TOKEN"):
        hub.download(spec(), tmp_path / "m", resolve=fake_resolve(), snapshot=gated)
    assert not (tmp_path / "m").exists()


def test_materialise_dispatches_hub_specs(tmp_path, repo, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(hub, "resolve_commit", fake_resolve())
    monkeypatch.setattr(hub, "_snapshot_download", fake_snapshot_download(repo, calls))
    record = materialise(spec(), tmp_path / "m")
    assert record["commit"] == PIN and len(calls) == 1


def test_path_fingerprint_hashes_every_weight_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"bin weights")
    (tmp_path / "model.safetensors").write_bytes(b"st weights")
    (tmp_path / "config.json").write_text("{}")
    fp = model_fingerprint(str(tmp_path))
    assert fp["files"] == {"pytorch_model.bin": hashlib.sha256(b"bin weights").hexdigest(),
                           "model.safetensors": hashlib.sha256(b"st weights").hexdigest()}


def _hub_config(tmp_path: Path) -> Path:
    cfg = _tiny_with(spec(hub.UNPINNED))
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_generation_of_a_hub_model_reads_its_downloaded_directory(tmp_path):
    """Dry run: one `model` job, and the generate job takes resources/models/<name>/
    model.json as input and loads resources/models/<name> (not the hub id)."""
    target = "results/generations/a/smollm2-135m/sync_b4.parquet"
    proc = snakemake("-n", "-p", "--cores", "1", target, "--configfile",
                     str(_hub_config(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert job_counts(out)["model"] == 1
    gen = out.split("rule generate:")[1]
    updated = re.search(r"Input files updated by another job: ([^\n]*)", gen)
    assert updated and "resources/models/smollm2-135m/model.json" in updated.group(1)
    assert "--model-dir resources/models/smollm2-135m " in gen and "org/model" not in gen
    assert "hub models without a pinned revision" in proc.stderr + out


@pytest.mark.workflow
def test_under_slurm_the_model_job_runs_on_the_submitting_machine(tmp_path):
    """With the SLURM executor the `model` job is a local rule: it runs here (no sbatch),
    and with the hub unreachable (HF_HUB_OFFLINE=1) fails with the message naming the
    model's key, leaving no model directory."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cmd = [sys.executable, "-m", "snakemake", "resources/models/smollm2-135m/model.json",
           "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--executor", "slurm",
           "--jobs", "1", "--configfile", str(_hub_config(tmp_path)),
           "--default-resources", "slurm_account=none", "slurm_partition=none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    sbatch = tmp_path / "sbatch"  # a test double that records any submission
    sbatch.write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\nexit 1\n")
    sbatch.chmod(0o755)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert re.search(r"^localrule model:$", proc.stdout + proc.stderr, re.M)
    assert not (tmp_path / "submitted").exists()
    log = (tmp_path / "results/logs/model/smollm2-135m.log").read_text()
    assert "models.smollm2-135m: downloading 'org/model' failed" in log
    assert not (tmp_path / "resources/models").exists() or not any(
        (tmp_path / "resources/models").iterdir())
