"""The tiny workflow through a real one-node SLURM cluster (marker: slurm).

The cluster (slurmctld, slurmd, slurmdbd with MariaDB accounting, munge) is started by the
repo's own ci/slurm/start.sh and stopped by ci/slurm/stop.sh. Every job goes through sbatch
via profiles/slurm and the SLURM executor plugin (job states from squeue, as the profile
says); the test reads what SLURM recorded with sacct.

Skips only where the cluster cannot exist: outside CI, when this is not root or Debian's
slurm packages are absent (a developer's laptop). In CI (.ci/run installs the packages and
sets CI) a missing package or a failing start fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT
from test_workflow import job_counts, tiny_config

pytestmark = pytest.mark.slurm

DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sacct", "sbatch")
TARGET = "results/numbers/a.json"
SYNC_B1 = "results/generations/a/smollm2-135m/sync_b1.parquet"
SYNC_B4 = "results/generations/a/smollm2-135m/sync_b4.parquet"
COMMENT = "rule_generate_wildcards_a_smollm2-135m_sync_b1"  # the plugin's sbatch --comment
TIMING = ["t_submit", "t_first", "t_done"]  # wall-clock columns of a generation record
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) "
                       r"\(log: \S*/slurm_logs/rule_(\w+)/")
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)", re.M)
RUN_ID = re.compile(r"^SLURM run ID: (\S+)", re.M)
# states in which sacct's record of a job is final ("CANCELLED by <uid>": its first word)
FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# the plugin polls job states after this many seconds (default 40, then +10 s per idle poll);
# 2 s keeps the test short and changes nothing the jobs compute
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "2"]


def _can_start() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "ci/slurm/start.sh starts daemons as root"
    missing = [d for d in DAEMONS if not (shutil.which(d) or Path("/usr/sbin", d).exists())]
    return f"missing {', '.join(missing)} (apt-get install slurmctld slurmd slurmdbd " \
           f"slurm-client munge mariadb-server)" if missing else None


def sh(*cmd: str, timeout: float = 120) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster():
    why = _can_start()
    if why and not os.environ.get("CI"):
        pytest.skip(f"no SLURM cluster here: {why}")
    proc = subprocess.run(["bash", str(ROOT / "ci/slurm/start.sh")], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:  # a failing set-up step fails the test, never skips it
        pytest.fail(f"ci/slurm/start.sh failed ({why or 'packages present'}):\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    yield
    subprocess.run(["bash", str(ROOT / "ci/slurm/stop.sh")], capture_output=True, timeout=300)


def snakemake_cmd(ws: Path, cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(ws),
            TARGET, "--configfile", str(cfg), *args]


def workspace(tmp: Path, name: str, model_dir: Path) -> tuple[Path, Path]:
    """The tiny config (6 prompts, 4 new tokens) with two conditions, in its own directory."""
    ws = tmp / name
    ws.mkdir()
    cfg = tiny_config(ws, model_dir)
    doc = yaml.safe_load(cfg.read_text())
    study = doc["studies"]["a"]
    study["conditions"] = ["sync_b1", "sync_b4"]
    for key in ("cobatch_targets", "filler_pools"):
        study.pop(key)
    cfg.write_text(yaml.safe_dump(doc))
    return ws, cfg


def checkpoint_groups(path: Path) -> list[dict]:
    """Finished groups in a generation checkpoint (line 1 is its key)."""
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines()[1:] if x.endswith("}")]


def generation_process(ws: Path, out: str) -> int | None:
    """The pid of the `batchflip generate` process writing ``out`` in workspace ``ws``
    (the cluster's one node is this host)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except (OSError, ValueError):
            continue
        if b"batchflip" in cmd and b"generate" in cmd and out.encode() in cmd \
                and Path(cwd) == ws:
            return int(proc.name)
    return None


def squeue_job(run: str, comment: str) -> tuple[str, str] | None:
    """(id, state) of the queued or running job of Snakemake run ``run`` (the plugin's job
    name) whose comment (the plugin's rule + wildcards) is ``comment``; squeue's default
    lists no finished job."""
    for line in sh("squeue", "-h", "-n", run, "-o", "%i|%T|%k").splitlines():
        job, state, note = line.split("|", 2)
        if note == comment:
            return job, state
    return None


def stop_process(pid: int, timeout: float = 10) -> bool:
    """SIGSTOP ``pid`` and wait until every thread of it is stopped, so that nothing it
    writes changes after this returns. False when the process is gone."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                      for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:  # the process is gone, or one of its threads ended while read
            if not Path(f"/proc/{pid}").exists():
                return False
            continue
        if all(s in "tTZX" for s in states):
            return not any(s in "ZX" for s in states)
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout} s of SIGSTOP")


def submitted(out: str) -> list[tuple[str, str]]:
    """(SLURM job id, rule) of every job an invocation submitted (the rule from the
    plugin's log path, .snakemake/slurm_logs/rule_<rule>/...)."""
    return SUBMITTED.findall(out)


def sacct_jobs(ids: list[str]) -> list[dict[str, str]]:
    out = sh("sacct", "-X", "-P", "-n", "-j", ",".join(ids),
             "--format=JobIDRaw,JobName%60,State,Partition,ReqTRES,AllocTRES,Comment%200")
    keys = ["id", "name", "state", "partition", "req", "alloc", "comment"]
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]


def sacct_final(ids: list[str], names: set[str], timeout: float = 120) -> list[dict[str, str]]:
    """The accounting records of ``ids`` (jobs of the runs ``names``: a job id a reset
    controller handed out before is another job) once slurmdbd has every one of them in a
    final state; slurmctld sends them asynchronously, so a record can lag the job."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in sacct_jobs(ids) if j["name"] in names]
        if sorted(j["id"] for j in jobs) == sorted(ids) and \
                all(j["state"].split()[0] in FINAL for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            return jobs  # the caller's assertions say what is missing
        time.sleep(1)


def snapshot(ws: Path) -> dict[Path, tuple[bytes, int]]:
    """Bytes and mtime (ns) of each result file."""
    return {rel: ((ws / rel).read_bytes(), (ws / rel).stat().st_mtime_ns)
            for rel in result_files(ws)}


def result_files(ws: Path) -> list[Path]:
    """Everything the run wrote under results/, but its logs and benchmarks (timings)."""
    return sorted(p.relative_to(ws) for p in (ws / "results").rglob("*") if p.is_file()
                  and p.relative_to(ws).parts[1] not in ("logs", "benchmarks"))




def abandon(first: subprocess.Popen, log1: Path, pid: int | None) -> None:
    """End a first invocation that is not to go on: its held process continued, Snakemake
    interrupted (it scancels its jobs then), and whatever of its run is left cancelled."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    if first.poll() is None:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=300)
        except subprocess.TimeoutExpired:
            first.kill()
    run = RUN_ID.search(log1.read_text())
    if run:
        sh("scancel", "--name", run[1])


def cancel_mid_run(first: subprocess.Popen, ws: Path, log1: Path) -> str | None:
    """scancel sync_b1's generation job mid-run, at a point where all else the first
    invocation does is fixed: the job's id once cancelled, or None where the process got
    through all its groups before it could be held (the caller then starts the scenario
    again in a new workspace).

    The process (the cluster's node is this host) runs in slices of 20 ms between SIGSTOPs
    until its checkpoint holds a group; from then on it stays stopped, so how far it got
    cannot change: 1 to 5 of 6 groups done, no output written, the job RUNNING. It is held
    until this invocation has finished sync_b4's generation and its score, the only jobs
    that do not wait on sync_b1 (score sync_b1, flips, discovery_numbers do), and cancelled
    only then: the invocation is left with nothing to start and ends having submitted
    exactly battery, both generate jobs and score sync_b4, however fast each job ran.
    scancel sends the job SIGCONT, then SIGTERM."""
    ckpt = ws / (SYNC_B1 + ".partial.jsonl")
    deadline = time.monotonic() + 900

    def running() -> None:
        if first.poll() is not None or time.monotonic() > deadline:
            abandon(first, log1, pid)
            pytest.fail(f"first invocation ended or timed out before the cancel "
                        f"(rc {first.poll()}):\n{log1.read_text()[-3000:]}")

    pid = run = None
    while True:
        running()
        if run is None:
            run = RUN_ID.search(log1.read_text())
            time.sleep(0 if run else 0.2)
            continue
        if pid is None:
            pid = generation_process(ws, SYNC_B1) if squeue_job(run[1], COMMENT) else None
            time.sleep(0 if pid else 0.2)
            continue
        if not stop_process(pid):  # it ended between two slices: every group was done
            return None
        if checkpoint_groups(ckpt):
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    if len(checkpoint_groups(ckpt)) == 6:  # held after its last group: it would finish
        os.kill(pid, signal.SIGCONT)
        return None
    while sorted(FINISHED.findall(log1.read_text())) != ["battery", "generate", "score"]:
        running()
        time.sleep(0.5)
    job = squeue_job(run[1], COMMENT)
    assert job and job[1] == "RUNNING" and stop_process(pid), (job, pid)
    assert not (ws / SYNC_B1).exists()
    sh("scancel", job[0])
    return job[0]


def test_tiny_workflow_through_slurm(cluster, model_dir, tmp_path):
    from batchflip.layout import scored_path

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.monotonic()

    # the oracle: the same config run here, without SLURM
    local, local_cfg = workspace(tmp_path, "local", model_dir)
    proc = subprocess.run(snakemake_cmd(local, local_cfg, "--cores", "2"), cwd=local, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t_local = time.monotonic() - t0

    # 1st invocation through the profile; sync_b1's generation job is cancelled mid-run
    # (cancel_mid_run says when). --retries 0: the cancel ends this run instead of being
    # retried in it.
    profile = ["--profile", str(ROOT / "profiles/slurm"), *FAST_POLL]
    attempts = []
    for attempt in range(1, 4):
        ws, cfg = workspace(tmp_path, f"slurm{attempt}", model_dir)
        log1 = tmp_path / f"first{attempt}.log"
        with log1.open("w") as sink:
            first = subprocess.Popen(snakemake_cmd(ws, cfg, *profile, "--retries", "0"),
                                     cwd=ws, env=env, stdout=sink, stderr=subprocess.STDOUT)
        job = cancel_mid_run(first, ws, log1)
        if job:
            break
        attempts.append(attempt)  # too late to hold it: this attempt is given up
        abandon(first, log1, None)
    else:
        pytest.fail(f"sync_b1 finished before it could be held, {len(attempts)} times")
    first.wait(timeout=600)
    out1 = log1.read_text()
    assert first.returncode != 0, out1[-3000:]
    assert re.search(rf"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED", out1), \
        out1[-3000:]
    ckpt = ws / (SYNC_B1 + ".partial.jsonl")
    done_before = checkpoint_groups(ckpt)  # read after the job ended: nothing can add to it
    assert 1 <= len(done_before) < 6, done_before  # cancelled mid-run, not after the end
    assert not (ws / SYNC_B1).exists()
    # the whole plan, of which exactly the four jobs that do not wait on sync_b1 ran
    assert job_counts(out1) == {"battery": 1, "generate": 2, "score": 2, "flips": 1,
                                "discovery_numbers": 1}, out1[-3000:]
    assert sorted(rule for _, rule in submitted(out1)) == \
        ["battery", "generate", "generate", "score"], out1[-3000:]
    kept = {rel: v for rel, v in snapshot(ws).items()  # what the first invocation finished
            if not rel.name.endswith(".partial.jsonl")}
    assert {Path(SYNC_B4), Path(scored_path("a", "smollm2-135m", "sync_b4"))} <= set(kept)
    assert Path(scored_path("a", "smollm2-135m", "sync_b1")) not in kept

    # 2nd invocation, the profile as shipped: only what is missing runs, sync_b1 resumes
    second = subprocess.run(snakemake_cmd(ws, cfg, *profile), cwd=ws, env=env,
                            capture_output=True, text=True, timeout=900)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-3000:]
    wall = time.monotonic() - t0
    plan2 = {"generate": 1, "score": 1, "flips": 1, "discovery_numbers": 1}
    assert job_counts(out2) == plan2, out2[-3000:]
    assert sorted(rule for _, rule in submitted(out2)) == sorted(plan2), out2[-3000:]
    log = (ws / "results/logs/generate/a/smollm2-135m/sync_b1.log").read_text()
    assert f"{len(done_before)} of 6 groups already done" in log, log[-2000:]
    gen = pd.read_parquet(ws / SYNC_B1)
    assert sorted(gen["group_id"]) == list(range(6))
    for entry in done_before:  # finished groups were kept, not generated again
        row = gen[gen["group_id"] == entry["group_id"]].iloc[0]
        assert row["t_done"] == entry["rows"][0]["t_done"], entry["group_id"]
    assert not ckpt.exists()
    for rel, (data, mtime) in kept.items():  # finished files untouched: bytes and mtime
        assert (ws / rel).read_bytes() == data, rel
        assert (ws / rel).stat().st_mtime_ns == mtime, rel
    # the caps the profile gives: the Snakefile did not cap the cluster from this machine
    assert 'vllm_cpu_server=Resource("vllm_cpu_server", 64)' in out1 + out2

    # every job went through sbatch and sacct knows it: 1st run battery, both generation
    # jobs (sync_b1 cancelled), score sync_b4; 2nd sync_b1 again, its score, flips,
    # discovery_numbers. The plugin names a job by its run's uuid.
    rule_of = dict(submitted(out1) + submitted(out2))
    assert len(rule_of) == 8, rule_of
    runs = {RUN_ID.search(out)[1] for out in (out1, out2)}
    jobs = sacct_final(list(rule_of), runs)
    assert sorted(j["id"] for j in jobs) == sorted(rule_of), jobs
    assert {j["name"] for j in jobs} == runs and len(runs) == 2, jobs
    for j in jobs:
        assert j["comment"].startswith(f"rule_{rule_of[j['id']]}_wildcards_"), j
        state = "CANCELLED" if j["id"] == job else "COMPLETED"
        assert j["state"].split()[0] == state, j  # "CANCELLED by 0": its first word
        gpu = j["comment"].startswith("rule_generate_")
        assert j["partition"] == ("gpu" if gpu else "cpu"), j
        for tres in (j["req"], j["alloc"]):
            assert ("gres/gpu=1" in tres) == gpu, j
    assert next(j for j in jobs if j["id"] == job)["comment"] == COMMENT

    # the results are the local run's, byte for byte (generation records: but their clocks)
    files = result_files(local)
    assert files == result_files(ws) and Path(TARGET) in files, files
    for rel in files:
        if rel.parts[1] == "generations" and rel.suffix == ".parquet":
            a, b = (pd.read_parquet(w / rel).drop(columns=TIMING) for w in (local, ws))
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        else:
            assert (local / rel).read_bytes() == (ws / rel).read_bytes(), rel
    print(f"\nslurm test: local run {t_local:.0f} s, both SLURM invocations "
          f"{wall - t_local:.0f} s; attempts started again: {attempts or 'none'}; resumed "
          f"with {len(done_before)} of 6 groups done; sacct:\n" + "\n".join(
              "|".join(j.values()) for j in sorted(jobs, key=lambda j: int(j["id"]))))
