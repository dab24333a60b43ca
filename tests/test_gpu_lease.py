"""GPU leases (batchflip.gpu_lease) with real processes contending for file locks.

No GPU is needed: the device ids are injected through CUDA_VISIBLE_DEVICES (which the lease
respects, as under SLURM) or a fake ``nvidia-smi`` on PATH. The oracle for exclusivity is
the time intervals the holders record themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from batchflip.errors import BatchflipError
from batchflip.gpu_lease import acquire, lease_for, lock_dir, needs_gpu, visible_devices
from batchflip.settings import GenerationSettings


def _job(**given: object) -> GenerationSettings:
    """A job's settings: ``given`` over a minimal study's."""
    return GenerationSettings.from_mapping({
        "study": "a", "model": "m", "engine": "hf", "dtype": "float16", "max_new_tokens": 1,
        "seed": 0, "prompt_format": "raw", **given})


HOLDER = """
import json, os, subprocess, sys, time
from batchflip.gpu_lease import lease_for
from batchflip.settings import GenerationSettings
out, hold = sys.argv[1], float(sys.argv[2])
job = GenerationSettings.from_mapping({"engine": "vllm", "study": "a", "model": "m",
    "dtype": "float16", "max_new_tokens": 1, "seed": 0, "prompt_format": "raw"})
with lease_for(job) as lease:
    t0 = time.time()
    child = subprocess.run([sys.executable, "-c",
                            "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                           capture_output=True, text=True).stdout.strip()
    time.sleep(hold)
    rec = {"device": lease.device, "env": os.environ["CUDA_VISIBLE_DEVICES"],
           "child": child, "start": t0, "end": time.time()}
    open(out, "w").write(json.dumps(rec))
"""


def _env(tmp: Path, devices: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "CUDA_DEVICE_ORDER")}
    env.update(PYTHONPATH=str(ROOT / "src"), BATCHFLIP_GPU_LOCK_DIR=str(tmp / "locks"), **extra)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def _holder(tmp: Path, name: str, env: dict[str, str], hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp / f"{name}.json"), str(hold)],
                            env=env, stderr=subprocess.PIPE, text=True)


def test_visible_devices_follow_cuda_visible_devices():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0,2"}) == ["0", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": " 3 , GPU-ab12 "}) == ["3", "GPU-ab12"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at -1


def _fake_nvidia_smi(tmp_path, monkeypatch, n: int) -> None:
    """Test double: an `nvidia-smi` on PATH that lists device indices 0..n-1."""
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '" + "".join(f"{i}\\n" for i in range(n)) + "'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))


def test_visible_devices_from_nvidia_smi(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert visible_devices({}) == []  # no nvidia-smi: a CPU machine
    _fake_nvidia_smi(tmp_path, monkeypatch, 3)
    assert visible_devices({}) == ["0", "1", "2"]


def test_lock_dir_override_and_slurm_subfolder(tmp_path):
    assert lock_dir({"BATCHFLIP_GPU_LOCK_DIR": str(tmp_path)}) == tmp_path
    assert lock_dir({"BATCHFLIP_GPU_LOCK_DIR": str(tmp_path), "SLURM_JOB_ID": "42"}) == \
        tmp_path / "slurm-42"
    assert lock_dir({}) == Path(f"/tmp/batchflip-gpu-locks-{os.getuid()}")


def test_which_jobs_need_a_gpu():
    assert needs_gpu({"engine": "hf"})
    assert needs_gpu({"engine": "vllm", "server": {"max_model_len": 2048}})
    assert not needs_gpu({"engine": "vllm", "server": {"base_url": "http://10.0.0.5:8000"}})
    assert not needs_gpu({"engine": "openai", "server": {"base_url": "http://x"}})


def test_concurrent_jobs_never_share_a_device(tmp_path):
    """Three jobs, two devices: two run at once on different devices, the third waits for
    one of them; each job's env and its child processes see only its own device."""
    env = _env(tmp_path, "0,1")
    procs = [_holder(tmp_path, f"h{i}", env, 1.5) for i in range(3)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    recs = [json.loads((tmp_path / f"h{i}.json").read_text()) for i in range(3)]
    for r in recs:
        assert r["device"] in ("0", "1")
        assert r["env"] == r["child"] == r["device"]
    for i, a in enumerate(recs):
        for b in recs[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and a["device"] == b["device"]), (a, b)
    first_end = min(r["end"] for r in recs)
    assert sum(r["start"] >= first_end - 0.05 for r in recs) == 1  # exactly one waited
    assert any("waiting" in e for e in errs)


def test_a_killed_job_releases_its_device(tmp_path):
    env = _env(tmp_path, "7")
    proc = _holder(tmp_path, "killed", env, 60)
    locks = tmp_path / "locks"
    deadline = time.time() + 30
    while time.time() < deadline:
        f = locks / "gpu-7.lock"
        if f.exists() and f.read_text().startswith(f"pid {proc.pid}"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the holder never took the lease")
    with pytest.raises(BatchflipError, match=rf"no free device among \['7'\].*pid {proc.pid}"):
        acquire(["7"], locks, timeout_s=0.3, poll_s=0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with acquire(["7"], locks, timeout_s=5, poll_s=0.1) as lease:
        assert lease.device == "7"


def test_no_gpu_no_lease(tmp_path, monkeypatch):
    """CPU machines and remote servers take no lease and leave the environment alone."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    env = {"BATCHFLIP_GPU_LOCK_DIR": str(tmp_path / "locks")}
    with lease_for(_job(engine="hf"), env) as lease:
        assert lease is None and "CUDA_VISIBLE_DEVICES" not in env
    env["CUDA_VISIBLE_DEVICES"] = "0"
    with lease_for(_job(engine="openai", server={"base_url": "http://x"}), env) as lease:
        assert lease is None and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert not (tmp_path / "locks").exists()


def test_devices_from_nvidia_smi_pin_the_pci_order(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, 2)
    env1, env2 = ({"BATCHFLIP_GPU_LOCK_DIR": str(tmp_path / "locks")} for _ in range(2))
    with lease_for(_job(engine="hf"), env1) as first, lease_for(_job(engine="hf"), env2) as second:
        assert {first.device, second.device} == {"0", "1"}
        assert env1["CUDA_VISIBLE_DEVICES"] == first.device
        assert env1["CUDA_DEVICE_ORDER"] == env2["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_lease_timeout_is_read_from_the_environment(tmp_path):
    env = {"BATCHFLIP_GPU_LOCK_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0",
           "BATCHFLIP_GPU_LEASE_TIMEOUT": "0.2"}
    with lease_for(_job(engine="hf"), dict(env)):
        with pytest.raises(BatchflipError, match="no free device"):
            with lease_for(_job(engine="hf"), dict(env)):
                pass
    env["BATCHFLIP_GPU_LEASE_TIMEOUT"] = "soon"
    with pytest.raises(BatchflipError, match="BATCHFLIP_GPU_LEASE_TIMEOUT='soon'"):
        with lease_for(_job(engine="hf"), dict(env)):
            pass
