"""Process supervision of a launched vLLM server: start, health wait and an ordered stop
that leaves no process behind.

Lifecycle guarantees for a launched server: it runs in its own session (process group, so a
terminal's Ctrl-C reaches only the job, which then stops it in order) and is stopped by
``close()``, when start-up fails or times out (the error carries the last 30 lines of the
server log), when the job gets SIGTERM / SIGINT / SIGHUP (the handler unwinds the job, so
``finally: engine.close()`` closes the client's connections and then stops the server; a
default SIGTERM exits with status 143, SIGINT raises KeyboardInterrupt) and at interpreter
exit (atexit). Stopping = SIGTERM to the API server (vLLM shuts its engine core and workers
down and its resource tracker unlinks shared memory), SIGKILL after ``stop_grace_s``, then
SIGTERM/SIGKILL to whatever is left in the group or below the server. Killing the whole group
at once is avoided: a SIGKILLed vLLM leaves ~400 MB of ``/dev/shm`` segments behind when its
resource tracker dies with it. A SIGKILLed job cannot clean up, so a small watchdog process
(own session) notices that the job is gone and runs the same sequence; on Linux the server
also gets SIGTERM from ``PR_SET_PDEATHSIG``. vLLM 0.32 ignores SIGTERM while it is loading
the model and its HTTP shutdown waits for open client streams, hence the escalation.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from batchflip.engines.vllm_launch import _SECRET, LOG_TAIL_LINES, log_tail, server_environ
from batchflip.errors import BatchflipError


def _proc_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every process, from /proc (empty off Linux)."""
    rows = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return rows
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        rows.append((int(entry), int(fields[1]), int(fields[2]), fields[0]))
    return rows


def process_tree(root: int) -> set[int]:
    """Live (non-zombie) processes in ``root``'s process group or descending from it."""
    table = [r for r in _proc_table() if r[3] != "Z"]
    found = {pid for pid, _, pgrp, _ in table if pgrp == root}
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    alive = {pid for pid, _, _, _ in table}
    stack = [root] if root in alive else []
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


# A separate process (own session) that outlives a SIGKILLed job: once its parent (the job)
# is gone it stops the server like VLLMServer.stop (SIGTERM to the API server, SIGKILL after
# the grace period, then the rest of the group); it exits by itself once the group is gone.
# vLLM does not always act on the SIGTERM that PR_SET_PDEATHSIG sends while it is still
# loading, so this is what guarantees the stop.
_WATCHDOG = r"""
import os, signal, sys, time
parent, leader, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)
def alive(group):
    try:
        (os.killpg if group else os.kill)(leader, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def send(sig, group):
    try:
        (os.killpg if group else os.kill)(leader, sig)
    except OSError:
        pass
def wait(group, timeout):
    deadline = time.time() + timeout
    while alive(group) and time.time() < deadline:
        time.sleep(0.2)
while alive(True) and os.getppid() == parent:
    time.sleep(0.5)
if not alive(True):
    sys.exit(0)
send(signal.SIGTERM, False)
wait(False, grace)
send(signal.SIGKILL, False)
wait(True, min(10.0, grace))
send(signal.SIGTERM, True)
wait(True, 3.0)
send(signal.SIGKILL, True)
"""

_LIVE: dict[int, VLLMServer] = {}
_PREVIOUS: dict[int, Any] = {}
_HOOKS_INSTALLED = False


def stop_all_servers() -> None:
    """Stop every server this process launched and still runs (atexit)."""
    for server in list(_LIVE.values()):
        server.stop()


def _on_signal(signum: int, frame: Any) -> None:
    """Hand over to the previous handler, or exit; ``close()``/atexit then stop the server.

    Raising here (KeyboardInterrupt from Python's SIGINT handler, SystemExit(128 + signum)
    for a default SIGTERM/SIGHUP) unwinds through ``finally: engine.close()``, which closes
    the client's connections *before* stopping the server, so vLLM shuts down without
    waiting for in-flight streams. A previous handler that returns keeps the run going.
    """
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    """atexit always; signal handlers when called from the main thread (ignored signals stay
    ignored, e.g. SIGINT of a background job)."""
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(stop_all_servers)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        with contextlib.suppress(ValueError, OSError):
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue
            _PREVIOUS[sig] = previous
            signal.signal(sig, _on_signal)


def _wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


class VLLMServer:
    """One launched server process group with its log file."""

    def __init__(self, argv: list[str], env: dict[str, str | None], log_path: Path, host: str,
                 port: int, startup_timeout_s: float, stop_grace_s: float) -> None:
        self.argv, self.env, self.log_path = argv, env, log_path
        self.base_url = f"http://{host}:{port}"
        self.startup_timeout_s, self.stop_grace_s = startup_timeout_s, stop_grace_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self.startup_s: float | None = None
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Launch in a new session; then wait for health (stopping it on any failure)."""
        _install_hooks()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        shown = {k: "<redacted>" if _SECRET.search(k) and v is not None else v
                 for k, v in self.env.items()}  # the per-launch API key stays out of logs
        self._log.write(f"# batchflip launch: {' '.join(self.argv)}\n# env: "
                        f"{json.dumps(shown, sort_keys=True)}\n".encode())
        self._log.flush()
        t0 = time.time()
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=server_environ(self.env), start_new_session=True,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
        except OSError as exc:
            self._log.close()
            raise BatchflipError(f"could not launch the vLLM server ({self.argv[0]}): "
                                 f"{exc}") from exc
        _LIVE[id(self)] = self
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.proc.pid),
                 str(self.stop_grace_s)], stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - t0

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                assert self.proc is not None
                rc = self.proc.poll()
                if rc is not None:
                    raise BatchflipError(self._failure(
                        f"the vLLM server exited with status {rc} before it became healthy"))
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise BatchflipError(self._failure(
                        f"the vLLM server did not become healthy within "
                        f"{self.startup_timeout_s:g} s"))
                time.sleep(0.5)

    def _failure(self, what: str) -> str:
        if self._log:
            self._log.flush()
        return (f"{what} (log: {self.log_path}); last {LOG_TAIL_LINES} log lines:\n"
                f"{log_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and everything it started (safe to call again, also mid-stop).

        1. SIGTERM to the API server (vLLM then shuts its engine core and workers down);
           SIGKILL it if it is still running after ``stop_grace_s``.
        2. The rest of the group gets up to 10 s to exit by itself (the engine core notices;
           multiprocessing's resource tracker unlinks the shared memory left behind).
        3. SIGTERM, then 3 s later SIGKILL, to whatever is left in the group or below it.
        """
        proc = self.proc
        if proc is None or self._stopped:
            return
        leader = proc.pid  # leads its own session and process group
        members = process_tree(leader)
        _signal(leader, signal.SIGTERM)
        if not _wait_for(lambda: proc.poll() is not None, self.stop_grace_s):
            _signal(leader, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

        def rest() -> set[int]:
            return process_tree(leader) | _alive(members)

        if not _wait_for(lambda: not rest(), min(10.0, self.stop_grace_s)):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                _signal(leader, sig, group=True)
                for pid in rest():
                    _signal(pid, sig)
                if _wait_for(lambda: not rest(), 3.0):
                    break
        if self.watchdog is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.watchdog.kill()
                self.watchdog.wait(timeout=5)
        self._stopped = True
        _LIVE.pop(id(self), None)
        if self._log:
            with contextlib.suppress(OSError):
                self._log.write(f"# batchflip: server stopped (status {proc.returncode})\n"
                                .encode())
                self._log.close()


def _alive(pids: set[int]) -> set[int]:
    live = {pid for pid, _, _, state in _proc_table() if state != "Z"}
    return pids & live


# ---- the engine --------------------------------------------------------------------------
