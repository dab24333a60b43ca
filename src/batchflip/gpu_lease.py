"""GPU leases: one device per job on one host, through file locks.

Snakemake caps how many GPU jobs run at once (``resources: gpu=1`` in the rules,
``--resources gpu=N`` or the count the Snakefile finds), but it does not say *which* device
a job gets. A job that loads a model on a GPU therefore takes a lease at start
(:func:`lease_for`): it locks one free device among the visible ones with ``flock`` on
``<lock dir>/gpu-<id>.lock``, sets ``CUDA_VISIBLE_DEVICES=<id>`` in its own environment
(a vLLM server it launches inherits it) and holds the lock until it exits. The kernel drops
the lock when the process ends, however it ends (also SIGKILL), so a crashed job never
leaves a device leased.

- Visible devices: ``CUDA_VISIBLE_DEVICES`` when set (SLURM sets it for its allocation:
  the lease picks among those; empty or ``-1`` = no GPU), else the indices
  ``nvidia-smi`` lists (then ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set too, so CUDA numbers
  devices as ``nvidia-smi`` does). No ``nvidia-smi``: no GPU, and no lease is taken.
- Lock dir: ``$BATCHFLIP_GPU_LOCK_DIR``, else ``/tmp/batchflip-gpu-locks-<uid>`` (local to
  the host, like its devices). Inside a SLURM job the locks go to a subfolder named by
  ``SLURM_JOB_ID``: SLURM renumbers each allocation's devices from 0, so jobs of different
  allocations must not contend for "device 0".
- Waiting: when every visible device is leased the job waits (one line to stderr, then a
  poll every second) up to ``$BATCHFLIP_GPU_LEASE_TIMEOUT`` seconds (unset: no limit) and
  then fails with a message naming the holders.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from batchflip.errors import BatchflipError
from batchflip.platform_facts import nvidia_smi
from batchflip.settings import GenerationSettings

LOCK_DIR_ENV = "BATCHFLIP_GPU_LOCK_DIR"
TIMEOUT_ENV = "BATCHFLIP_GPU_LEASE_TIMEOUT"


def loads_model(engine: str, server: Mapping[str, Any] | None) -> bool:
    """True when a job of this engine and server settings loads a model on an accelerator.

    ``hf`` loads the model in the job (on CUDA when there is one); ``vllm`` launches a
    server unless ``server.base_url`` names a running one; ``openai`` never launches.
    """
    if engine == "hf":
        return True
    if engine == "vllm":
        return not (server or {}).get("base_url")
    return False


def needs_gpu(study: Mapping[str, Any]) -> bool:
    """:func:`loads_model` for a study entry (its ``engine`` and ``server``; the rules'
    ``gpu`` resource)."""
    return loads_model(study.get("engine", ""), study.get("server"))


def visible_devices(env: Mapping[str, str] | None = None) -> list[str]:
    """The device ids this process may use: CUDA_VISIBLE_DEVICES, else nvidia-smi's."""
    env = os.environ if env is None else env
    given = env.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        ids = [d.strip() for d in given.split(",") if d.strip()]
        # CUDA stops at the first invalid id; "-1" is the usual way to hide every device
        return ids[: ids.index("-1")] if "-1" in ids else ids
    return [row[0] for row in nvidia_smi("index")]


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the device locks live (see the module docstring)."""
    env = os.environ if env is None else env
    base = Path(env.get(LOCK_DIR_ENV) or f"/tmp/batchflip-gpu-locks-{os.getuid()}")
    job = env.get("SLURM_JOB_ID")
    return base / f"slurm-{job}" if job else base


def _lock_path(directory: Path, device: str) -> Path:
    """The lock file of a device id (ids can be indices, GPU-/MIG- UUIDs)."""
    return directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class GpuLease:
    """An exclusive lock on one device id, held until :meth:`release` or process exit."""

    def __init__(self, device: str, path: Path, handle: IO[str]):
        self.device, self.path, self._handle = device, path, handle

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: Path, note: str) -> IO[str] | None:
    handle = open(path, "a+")  # noqa: SIM115 - kept open while the lease is held
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(note + "\n")
    handle.flush()
    return handle


def acquire(devices: Sequence[str], directory: Path, timeout_s: float | None = None,
            poll_s: float = 1.0, note: str = "") -> GpuLease:
    """Lock the first free device of ``devices`` (waiting for one up to ``timeout_s``)."""
    if not devices:
        raise BatchflipError("GPU lease: no devices to lease from")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchflipError(f"GPU lease: cannot create the lock dir {directory}: {exc} "
                             f"(set {LOCK_DIR_ENV} to a writable folder)") from exc
    note = note or f"pid {os.getpid()}"
    start, told = time.monotonic(), False
    while True:
        for dev in devices:
            path = _lock_path(directory, dev)
            handle = _try_lock(path, note)
            if handle is not None:
                return GpuLease(dev, path, handle)
        held = "; ".join(f"{d}: {_holder(_lock_path(directory, d))}" for d in devices)
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise BatchflipError(f"GPU lease: no free device among {list(devices)} after "
                                 f"{waited:.0f} s (locks in {directory}; holders: {held})")
        if not told:
            print(f"GPU lease: every device in {list(devices)} is leased ({held}); waiting",
                  file=sys.stderr)
            told = True
        time.sleep(poll_s)


def _timeout(env: Mapping[str, str]) -> float | None:
    raw = env.get(TIMEOUT_ENV)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise BatchflipError(f"{TIMEOUT_ENV}={raw!r}: must be a number of seconds") from exc


@contextmanager
def lease_for(settings: GenerationSettings,
              env: MutableMapping[str, str] | None = None) -> Iterator[GpuLease | None]:
    """Lease a device for a job with these settings and point CUDA at it.

    Yields the lease, or None when the job needs no GPU or none is visible (CPU runs).
    Sets ``CUDA_VISIBLE_DEVICES`` in ``env`` (default: this process's environment) before
    the engine is made, so a launched server inherits it.
    """
    env = os.environ if env is None else env
    if not loads_model(settings.engine, settings.server):
        yield None
        return
    own_list = env.get("CUDA_VISIBLE_DEVICES") is None
    devices = visible_devices(env)
    if not devices:
        yield None
        return
    note = (f"pid {os.getpid()} study {settings.study} model {settings.model} "
            f"kernel_mode {settings.kernel_mode}")
    lease = acquire(devices, lock_dir(env), _timeout(env), note=note)
    with lease:
        env["CUDA_VISIBLE_DEVICES"] = lease.device
        if own_list:
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        print(f"GPU lease: device {lease.device} of {devices} ({lease.path})", file=sys.stderr)
        yield lease
