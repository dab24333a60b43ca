"""Column sets of the record files (see DESIGN.md, Records) and the one reader for them."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pandas as pd

from batchflip.errors import InputError
from batchflip.io import parquet_schema_names, read_parquet

BATTERY_COLUMNS = ["prompt_id", "task", "domain", "scorer", "prompt", "reference", "meta"]

GENERATION_COLUMNS = [
    "study", "model", "condition", "batch_size", "dispatch", "kernel_mode", "group_id",
    "position", "role", "prompt_id", "text", "token_ids", "finish_reason", "n_tokens",
    "t_submit", "t_first", "t_done", "seed", "stack_id", "attempts", "error",
]

# per generated token, only in files of a study with ``logprobs: k`` (batchflip.engines):
# the chosen token's log-probability, and the top k ids and log-probabilities (highest
# first); list columns, empty for a failed request
LOGPROB_COLUMNS = ["token_logprobs", "top_ids", "top_logprobs"]

# version of the scored-file layout; the score rule takes it as a params value, so a
# change (2: failed requests kept unscored with their `error`) re-scores old files
SCORED_FORMAT = 2
SCORED_COLUMNS = [
    "study", "model", "condition", "batch_size", "dispatch", "kernel_mode", "group_id",
    "position", "prompt_id", "task", "domain", "text", "score", "label", "scorer",
    "scorer_version", "stack_id", "error",
]

# version of the flips-file layout; the flips rule takes it as a params value, so a change
# (2: ``baseline_condition``, the condition each row was paired with) re-pairs old files
FLIPS_FORMAT = 2
FLIP_COLUMNS = [
    "model", "task", "domain", "prompt_id", "condition", "batch_size", "dispatch",
    "baseline_condition", "baseline_score", "condition_score", "flip", "direction", "text_changed",
    "baseline_stack_id", "stack_id",
]


def require_columns(df: pd.DataFrame, columns: list[str], path: object) -> None:
    """Raise InputError naming the first missing column of a record file."""
    for col in columns:
        if col not in df.columns:
            raise InputError(path, "missing column", field=col)


def read_records(path: str | os.PathLike[str], columns: list[str],
                 optional: Iterable[str] = ()) -> pd.DataFrame:
    """Only ``columns`` (then those of ``optional`` the file has) of a parquet record file.

    A missing column of ``columns`` is an InputError naming the file and the field; the
    file's other columns are never read.
    """
    names = parquet_schema_names(path)
    require_columns(pd.DataFrame(columns=names), columns, path)
    extra = [c for c in optional if c in names and c not in columns]
    return read_parquet(path, columns=[*columns, *extra])
