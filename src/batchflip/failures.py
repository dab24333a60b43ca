"""Failed requests: which rows they are, how many per condition, and the limit on them.

A *failed request* is a row whose engine gave up on it: the server client
(``batchflip.engines.openai_client``) keeps such a row after its retries with
``finish_reason "error"``, empty text and the error text in ``error`` (a time-out, an HTTP
400, a server that went away). It is not an answer, so it is never scored as one: the score
stage keeps it with ``score`` null, ``label "error"`` and its ``error`` text; flips, Study
B, C and D, the enriched subset and adjudication leave it out of every pair and rate.

Each numbers job counts the failed target rows of every (model, condition) it reads
(``<study>/<model>/<condition>/error_count`` and ``/error_share``) and fails, before it
writes anything, when a condition's share is above the config key ``errors.max_share``
(default ``DEFAULT_MAX_SHARE`` = 1%), naming the file, the share and the first error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from batchflip.errors import BatchflipError
from batchflip.numbers import proportion, scalar

DEFAULT_MAX_SHARE = 0.01
ERROR_LABEL = "error"

Record = dict[str, Any]


def failed_mask(df: pd.DataFrame) -> np.ndarray:
    """True for the rows that are failed requests: ``finish_reason == "error"`` or a
    non-empty ``error`` text. A frame with neither column has no failed rows."""
    failed = np.zeros(len(df), dtype=bool)
    if "finish_reason" in df.columns:
        failed |= (df["finish_reason"].astype(str) == "error").to_numpy()
    if "error" in df.columns:
        err = df["error"]
        failed |= (err.notna() & (err.astype(str).str.len() > 0)).to_numpy()
    return failed


def answered(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` that are not failed requests."""
    return df[~failed_mask(df)]


def error_text(row: pd.Series) -> str:
    """The error text of a failed row (its finish reason when no text was recorded)."""
    err = row.get("error")
    if isinstance(err, str) and err:
        return err
    return f"finish_reason '{row.get('finish_reason')}' with no error text"


def error_texts(df: pd.DataFrame) -> pd.Series:
    """The error text of every row: ``""`` for answered rows, the recorded text (or a note
    naming the finish reason when none was recorded) for failed ones."""
    failed = failed_mask(df)
    if "error" in df.columns:
        err = df["error"].fillna("").astype(str)
    else:
        err = pd.Series("", index=df.index, dtype=object)
    missing = failed & (err.str.len() == 0).to_numpy()
    if missing.any():
        err = err.copy()
        err[missing] = [error_text(r) for _, r in df[missing].iterrows()]
    return err.where(failed, "")


def error_table(frames: dict[str, pd.DataFrame], keys: tuple[str, ...] = ("model", "condition")
                ) -> pd.DataFrame:
    """Failed and total rows per ``keys`` over frames (path -> frame), with the path and the
    first failed row's prompt id, position in its file and error text (file order)."""
    out = []
    for path, df in frames.items():
        failed = failed_mask(df)
        for key, idx in df.groupby(list(keys), sort=True).indices.items():
            key = key if isinstance(key, tuple) else (key,)
            hit = idx[failed[idx]]
            first = df.iloc[hit[0]] if len(hit) else None
            out.append({**{k: str(v) for k, v in zip(keys, key, strict=True)}, "path": str(path),
                        "failed": int(len(hit)), "rows": int(len(idx)),
                        "first_row": int(hit[0]) if len(hit) else None,
                        "first_prompt": None if first is None else str(first["prompt_id"]),
                        "first_error": None if first is None else error_text(first),
                        "stack_ids": sorted({str(s) for s in df["stack_id"].iloc[idx]})
                        if "stack_id" in df.columns else []})
    cols = [*keys, "path", "failed", "rows", "first_row", "first_prompt", "first_error",
            "stack_ids"]
    table = pd.DataFrame(out, columns=cols)
    dup = table.duplicated(list(keys))
    if dup.any():
        d = table[dup].iloc[0]
        where = ", ".join(f"{k} '{d[k]}'" for k in keys)
        raise BatchflipError(f"{where} has rows in more than one file (e.g. {d['path']})")
    return table.sort_values(list(keys), kind="stable").reset_index(drop=True)


def check_error_share(table: pd.DataFrame, max_share: float, what: str = "condition",
                      key: str = "condition") -> None:
    """Raise BatchflipError for the first row of ``error_table`` whose failed share is above
    ``max_share``, naming its file, model, ``what``, the share and the first error."""
    if not 0 <= max_share <= 1:
        raise BatchflipError(f"errors.max_share must be within 0 and 1, got {max_share}")
    for r in table.itertuples(index=False):
        if r.rows and r.failed / r.rows > max_share:
            raise BatchflipError(
                f"{r.path}: model '{r.model}', {what} '{getattr(r, key)}': {r.failed} of "
                f"{r.rows} requests failed ({100 * r.failed / r.rows:.2f}%), above the limit "
                f"errors.max_share = {100 * max_share:g}%; first error (row {r.first_row}, "
                f"prompt '{r.first_prompt}'): {r.first_error}")


def error_records(table: pd.DataFrame, study: str, max_share: float,
                  key: str = "condition", unit: str = "target requests"
                  ) -> dict[str, Record]:
    """``<study>/<model>/<key value>/error_count`` and ``/error_share`` per row of
    ``error_table`` (the share with its Wilson interval, the first error in
    ``first_error``)."""
    out: dict[str, Record] = {}
    for r in table.itertuples(index=False):
        level = str(getattr(r, key))
        meta = {"study": study, "model": r.model, key: level, "errors": True,
                "max_share": max_share}
        inputs, stacks = [r.path], list(r.stack_ids)
        prefix = f"{study}/{r.model}/{level}"
        out[f"{prefix}/error_count"] = scalar(
            r.failed, f"failed requests (finish_reason 'error'; never scored, paired or "
            f"counted as answers) among the {unit} of {key} {level}, model {r.model}",
            inputs, stacks, n=r.rows, first_error=r.first_error, **meta)
        if r.rows:
            out[f"{prefix}/error_share"] = proportion(
                r.failed, r.rows, f"share of the {unit} of {key} {level}, model {r.model}, "
                f"that failed; above errors.max_share the numbers job fails", inputs, stacks,
                first_error=r.first_error, **meta)
    return out


def error_numbers(frames: dict[str, pd.DataFrame], study: str, max_share: float,
                  key: str = "condition", unit: str = "target requests") -> dict[str, Record]:
    """Count the failed rows of frames (path -> frame) per (model, ``key``), fail when a
    share is above ``max_share`` (``check_error_share``), else return their records."""
    table = error_table(frames, ("model", key))
    check_error_share(table, max_share, key, key)
    return error_records(table, study, max_share, key, unit)
