"""Filled rater sheets: the sheet schema (columns, verdicts, the bundled row schema) and
strict reading and validation (see :mod:`batchflip.adjudication`, "Reading a filled
sheet")."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from batchflip.bundled import ADJUDICATION_SCHEMA, bundled_path
from batchflip.errors import BatchflipError, InputError

VERDICTS = ("genuine_flip", "scorer_artifact", "borderline")
SHEET_COLUMNS = ["item_id", "prompt", "response_a", "response_b", "verdict", "note"]
_SENTINEL = "\ue000"


def load_schema(path: str | Path | None) -> Any:
    """A jsonschema validator for sheet rows from ``path`` (default: the bundled
    ``batchflip/data/schemas/adjudication_sheet.schema.yaml``)."""
    import jsonschema

    p = Path(path) if path else bundled_path(ADJUDICATION_SCHEMA)
    if not p.is_file():
        raise BatchflipError(f"{p}: schema file not found")
    return jsonschema.Draft202012Validator(yaml.safe_load(p.read_text(encoding="utf-8")))


def _normalise_verdict(value: str) -> str:
    return "_".join(value.strip().lower().replace("-", " ").split())


def _is_skipped(rec: list[str]) -> bool:
    return not any(c.strip() for c in rec) or rec[0].lstrip("\ufeff").strip().startswith("#")


def _locate(data: bytes, pos: int) -> tuple[int, str]:
    """Spreadsheet row and column name of byte offset ``pos`` of a CSV file."""
    prefix = data[:pos].decode("utf-8", errors="replace")
    records = list(csv.reader(io.StringIO(prefix + _SENTINEL, newline="")))
    header: list[str] | None = None
    for i, rec in enumerate(records):
        for j, cell in enumerate(rec):
            if _SENTINEL in cell:
                names = header if header is not None else SHEET_COLUMNS
                name = names[j].strip() if j < len(names) and names[j].strip() else None
                return i + 1, name or f"column {j + 1}"
        if header is None and not _is_skipped(rec):
            header = rec
    return max(len(records), 1), SHEET_COLUMNS[0]


def _decode(path: str | Path, data: bytes) -> str:
    """UTF-8 text of a sheet, or InputError naming where the bytes go wrong."""
    fix = "save it from the spreadsheet as 'CSV UTF-8 (comma delimited)'"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(path, f"the file is UTF-16 (byte-order mark at its start), not "
                         f"UTF-8; {fix}", row=1, field=SHEET_COLUMNS[0])
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        row, field = _locate(data, nul)
        raise InputError(path, f"NUL byte at offset {nul}: the file looks UTF-16 or binary, "
                         f"not UTF-8; {fix}", row=row, field=field)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row, field = _locate(data, exc.start)
        raise InputError(path, f"byte 0x{data[exc.start]:02x} is not valid UTF-8 (was the "
                         f"file saved as latin-1 / Windows-1252?); {fix}",
                         row=row, field=field) from None


def read_sheet(path: str | Path, key_ids: Iterable[str], schema: Any = None) -> pd.DataFrame:
    """Validate one filled sheet against the key's item ids.

    Returns a frame with ``item_id``, ``verdict`` (normalised), ``note`` and ``row`` (the
    spreadsheet row number), one row per item. Raises InputError (file, row, field) on the
    first problem, noting how many more there are; see :mod:`batchflip.adjudication`.
    """
    known = set(key_ids)
    text = _decode(path, Path(path).read_bytes())
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputError(path, f"not a readable CSV file: {exc}", row=1,
                         field=SHEET_COLUMNS[0]) from None
    header: list[str] | None = None
    problems: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for num, rec in enumerate(records, start=1):
        if _is_skipped(rec):
            continue  # empty, or an instruction / comment row
        if header is None:
            header = [c.lstrip("\ufeff").strip() for c in rec]
            for col in ("item_id", "verdict"):
                if col not in header:
                    raise InputError(path, f"the header row has no '{col}' column (expected "
                                     f"{', '.join(SHEET_COLUMNS)})", row=num, field=col)
            dups = [c for c, k in Counter(h for h in header if h).items() if k > 1]
            if dups:
                raise InputError(path, "the header names this column twice", row=num,
                                 field=dups[0])
            continue
        values = {h: (rec[i] if i < len(rec) else "") for i, h in enumerate(header) if h}
        extra = [i for i in range(len(header), len(rec)) if rec[i].strip()]
        if extra:
            problems.append((num, f"column {extra[0] + 1}",
                             "a cell right of the last header column; was a comma typed "
                             "outside a quoted cell?"))
        iid = values["item_id"].strip()
        verdict = _normalise_verdict(values["verdict"])
        row_problems: list[tuple[int, str, str]] = []
        if not iid:
            row_problems.append((num, "item_id", "empty item id"))
        elif iid not in known:
            row_problems.append((num, "item_id", f"unknown item id '{iid}': not in the key "
                                 "(is this a sheet from another export or study?)"))
        elif iid in seen:
            row_problems.append((num, "item_id", f"item id '{iid}' appears twice (first at "
                                 f"row {seen[iid]})"))
        if not verdict:
            row_problems.append((num, "verdict", "no verdict; every item must be answered "
                                 f"with one of {', '.join(VERDICTS)}"))
        elif verdict not in VERDICTS:
            row_problems.append((num, "verdict", f"verdict '{values['verdict'].strip()}' is "
                                 f"not one of {', '.join(VERDICTS)}"))
        if not row_problems and schema is not None:
            obj = {k: v for k, v in values.items()} | {"item_id": iid, "verdict": verdict}
            err = next(iter(sorted(schema.iter_errors(obj), key=lambda e: list(e.path))), None)
            if err is not None:
                field = str(err.path[0]) if err.path else "item_id"
                row_problems.append((num, field, f"breaks the sheet schema: {err.message}"))
        problems.extend(row_problems)
        if iid and iid not in seen:
            seen[iid] = num
        rows.append({"item_id": iid, "verdict": verdict,
                     "note": values.get("note", "").strip(), "row": num})
    if header is None:
        raise InputError(path, f"no header row (expected {', '.join(SHEET_COLUMNS)})",
                         row=len(records) + 1, field="item_id")
    missing = sorted(known - set(seen))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        problems.append((len(records) + 1, "item_id",
                         f"below the last row: {len(missing)} item(s) of the key have no row "
                         f"({shown}); every exported item needs a verdict"))
    if problems:
        num, field, msg = problems[0]
        if len(problems) > 1:
            msg += f" ({len(problems) - 1} more problem(s) in this file)"
        raise InputError(path, msg, row=num, field=field)
    return pd.DataFrame(rows, columns=["item_id", "verdict", "note", "row"])


def read_ratings(paths: Sequence[str | Path], key: pd.DataFrame,
                 schema: Any = None) -> dict[str, pd.DataFrame]:
    """Validate every filled sheet; rater name = file stem. Raises on the first bad file."""
    out: dict[str, pd.DataFrame] = {}
    for p in sorted(paths, key=str):
        rater = Path(p).stem
        if rater in out:
            raise InputError(p, f"a second sheet for rater '{rater}'", row=1, field="item_id")
        out[rater] = read_sheet(p, key["item_id"], schema)
    return out
