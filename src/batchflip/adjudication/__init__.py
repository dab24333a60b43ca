"""Human adjudication of flip candidates: blinded export, multi-rater import, agreement,
corrected flip rates.

Actions of ``batchflip adjudicate ACTION ...``:

- ``export`` writes, under ``--out-dir``, one blinded ``sheet_{rater}.csv`` per rater
  (UTF-8 with a byte-order mark, CRLF, RFC 4180 quoting, ``#`` instruction lines, then
  ``item_id,prompt,response_a,response_b,verdict,note``) and the unblinding
  ``key.parquet`` (columns ``KEY_COLUMNS``). A sheet never holds the model, condition,
  batch size, dispatch, task or any automated label or score; text cells that a
  spreadsheet would run as a formula get a leading ``'``. Same inputs and seed give the
  same bytes.
- ``validate`` checks filled sheets (``resources/adjudication/{study}/{rater}.csv``)
  against the key and writes nothing.
- ``results`` runs the same checks, then writes the numbers JSON, a re-review CSV and an
  unblinded per-item verdict CSV (:func:`compute_results`). With no filled sheet every
  rater-based value is ``null`` and the status says ``pending: N items exported to
  <sheets>``.

A bad sheet (not UTF-8, unknown, repeated or missing item, a verdict not allowed) raises
:class:`~batchflip.errors.InputError` naming the file, the spreadsheet row and the field;
the first problem is raised and the message counts the others. Items whose automated
scores, labels or texts changed since export are flagged for re-review and left out of
the genuine share.

Sheet format, consensus, statistics and re-review rules: docs/reviewing.md.
"""

from __future__ import annotations

from batchflip.adjudication.export import (
    DEFAULT_DOMAINS,
    DEFAULT_PHASE,
    DEFAULT_RATERS,
    INSTRUCTIONS,
    KEY_COLUMNS,
    PHASES,
    SCORED_INPUT_COLUMNS,
    build_export,
    in_phase,
    make_item_id,
    render_sheet,
    select_candidates,
    write_bytes,
)
from batchflip.adjudication.results import (
    REREVIEW_COLUMNS,
    compare_with_current,
    compute_results,
    consensus,
    corrected_rate,
)
from batchflip.adjudication.sheets import (
    SHEET_COLUMNS,
    VERDICTS,
    load_schema,
    read_ratings,
    read_sheet,
)

__all__ = [
    "DEFAULT_DOMAINS", "DEFAULT_PHASE", "DEFAULT_RATERS", "INSTRUCTIONS", "KEY_COLUMNS",
    "PHASES", "REREVIEW_COLUMNS", "SCORED_INPUT_COLUMNS", "SHEET_COLUMNS", "VERDICTS",
    "build_export", "compare_with_current", "compute_results", "consensus", "corrected_rate",
    "in_phase", "load_schema", "make_item_id",
    "read_ratings", "read_sheet", "render_sheet", "select_candidates", "write_bytes",
]
