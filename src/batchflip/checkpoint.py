"""Resumable jobs: an append-only JSON-lines file of the groups a job has finished.

The file sits beside the job's output (``<out>.partial.jsonl``). Line 1 is
``{"job_key": KEY}``; each further line ``{"group_id": ID, "rows": [...]}`` is one finished
group, flushed and fsynced before the next group starts. On a rerun the groups of a file
with the same key are read back and skipped; a file of another job (other key) is ignored
and overwritten, and a line a kill cut short is dropped, so that group runs again: before
appending, the file is cut back to its last complete line, so the next group never glues
onto the torn fragment (which a later resume would drop, regenerating that group). Group
ids are any JSON value (generation: the int group id; ablation: a run's name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any


def checkpoint_path(out: Path) -> Path:
    """Where the job writing ``out`` checkpoints its finished groups."""
    return out.with_name(out.name + ".partial.jsonl")


def read_checkpoint(path: Path, key: str) -> dict[Any, list[dict[str, Any]]]:
    """Finished groups from a checkpoint written by the same job (``key``); else nothing."""
    done: dict[Any, list[dict[str, Any]]] = {}
    if not path.exists():
        return done
    lines = path.read_text().split("\n")
    if lines[0] != json.dumps({"job_key": key}):
        return done
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut short: that group runs again
        done[entry["group_id"]] = entry["rows"]
    return done


def cut_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline (drops a line a kill cut short)."""
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        pos, step = size, 1 << 16
        while pos > 0:
            start = max(0, pos - step)
            fh.seek(start)
            chunk = fh.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            pos = start
        else:
            end = 0
        if end != size:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())


class Checkpoint:
    """The finished groups of one job: ``done`` on resume, ``add`` as each finishes."""

    def __init__(self, out: Path, key: str) -> None:
        self.path = checkpoint_path(Path(out))
        self.key = key
        self.done = read_checkpoint(self.path, key)
        self._fh: IO[str] | None = None

    def add(self, group_id: Any, rows: list[dict[str, Any]]) -> None:
        """Record one finished group durably."""
        if self._fh is None:
            if self.done:
                cut_torn_tail(self.path)
            self._fh = open(self.path, "a" if self.done else "w")
            if not self.done:
                self._fh.write(json.dumps({"job_key": self.key}) + "\n")
        self._fh.write(json.dumps({"group_id": group_id, "rows": rows}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done[group_id] = rows

    def close(self) -> None:
        """Close the file (the checkpoint stays for a rerun)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Delete the checkpoint once the job's output is written."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
