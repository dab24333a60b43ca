"""Atomic file writing (write to a temporary sibling, then rename into place) and parquet
reading with one-line errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batchflip.errors import BatchflipError, InputError


def _umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The file gets the mode a plain ``open()`` gives (0666 less the umask: 0644 usually), not
    mkstemp's 0600, so that files meant to be handed over (rater sheets, the packed
    archive) can be read by others."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_parquet(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a DataFrame to parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


REGENERATE_HINT = ("delete it and rerun (Snakemake makes it again; or run snakemake with "
                   "--forcerun on the rule that writes it)")


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None
                 ) -> pd.DataFrame:
    """Read a parquet file; a missing, truncated or corrupt file is an InputError naming it,
    with the hint to delete and regenerate it (never pyarrow's traceback)."""
    import pyarrow as pa

    try:
        return pd.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise InputError(path, "file does not exist") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"not a readable parquet file ({first}): it is truncated or "
                         f"corrupt; {REGENERATE_HINT}") from None


def parquet_schema_names(path: str | os.PathLike[str]) -> list[str]:
    """The column names of a parquet file (errors as in :func:`read_parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except FileNotFoundError:
        raise InputError(path, "file does not exist") from None
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"not a readable parquet file ({first}): it is truncated or "
                         f"corrupt; {REGENERATE_HINT}") from None


def non_finite_path(obj: Any, where: str = "") -> str | None:
    """The key path (``numbers.a/m/c/value``, ``rows[3]``) of the first NaN or infinite
    float in ``obj`` (dicts, lists, tuples, Python or numpy floats), else None."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            found = non_finite_path(obj[key], f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            found = non_finite_path(item, f"{where}[{i}]")
            if found is not None:
                return found
    elif isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return where or "<top level>"
    return None


def dumps_json(obj: Any) -> str:
    """JSON text with sorted keys and a final newline; NaN and infinities are refused
    (BatchflipError naming the key): a value that cannot be estimated is ``null`` with a
    note, never NaN, which is not JSON."""
    bad = non_finite_path(obj)
    if bad is not None:
        raise BatchflipError(f"refusing to write a non-finite number (NaN or inf) at '{bad}'; "
                             "a value that cannot be estimated must be null with a note")
    return json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write :func:`dumps_json` text atomically, so equal content gives equal bytes; NaN and
    infinities raise BatchflipError naming the key, and nothing is written."""
    text = dumps_json(obj)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
