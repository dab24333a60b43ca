"""Human adjudication of flip candidates: blinded export, multi-rater import, agreement,
corrected flip rates.

The paper had one person adjudicate the candidate rows, unblinded, with no agreement
statistic. This stage sends the candidates to several raters blind, checks the returned
sheets strictly, and reports agreement and flip rates corrected for scorer artifacts.

Sub-actions (``batchflip adjudicate ACTION ...``)
------------------------------------------------
``export``
    Candidates = the flip rows whose label flipped (``flip`` true) in the chosen domains
    (default: safety), over every model, in the chosen ``--phase``: ``sync`` (default) =
    the synchronized conditions at batch size > 1, the rows the paper adjudicated; ``all``
    = every condition of the study. Each item's baseline response is that of the condition
    its flip row was paired with (the flips' ``baseline_condition``). With
    ``--include-text-changes`` it also adds rows whose label is the same but whose text
    changed (a check for flips the scorer missed), optionally a seeded sample of
    ``--text-change-limit`` of them. Writes, under ``--out-dir``:

    - ``sheet_{rater}.csv`` for each rater: UTF-8 with a byte-order mark (so that Excel
      detects UTF-8), CRLF line ends, RFC 4180 quoting. First come instruction lines: each
      starts with ``#`` and has no comma, so a spreadsheet shows it in column A; they list
      the verdicts. Then the header ``item_id,prompt,response_a,response_b,verdict,note``
      and one row per item. ``item_id`` is ``i`` + 12 hex digits of
      sha256(seed, study, model, condition, prompt id): it is the same in every sheet, and
      you cannot tell the prompt order, model or condition from it. Which of A and B holds
      the baseline response is balanced: items are ranked by a seeded hash, even ranks get
      the baseline as A and odd ranks as B. Each rater gets the rows in a different order
      (sorted by a hash of seed, rater and item id). A text cell that starts with ``=``,
      ``+``, ``-``, ``@``, a tab or a CR gets one leading ``'`` (OWASP's CSV-injection
      rule), so that a spreadsheet shows it as text instead of running it as a formula; so
      do the text cells of rereview.csv and verdicts.csv, prompt ids included. The sheet
      never holds the model, condition, batch size, dispatch, task or any automated label or score.
      Running it again on the same inputs with the same seed gives the same bytes.
    - ``key.parquet``: the unblinding key, one row per item (columns ``KEY_COLUMNS``). It
      holds the model, prompt id, condition, batch size, dispatch, which of A/B is the
      baseline, the automated scores, labels and scorer versions of both responses, the
      direction, stack ids, and sha256 of the prompt and of both responses. It is never
      part of a rater's sheet.

``validate``
    Checks filled sheets (``resources/adjudication/{study}/{rater}.csv``; the rater is
    the file's stem) against the key and writes nothing. ``results`` runs the same checks
    before it writes anything.

``results``
    Reads the key, the current flip records (and, optionally, the current scored files)
    and any filled sheets, and writes the numbers JSON, a re-review CSV and an unblinded
    per-item verdict CSV (see :func:`compute_results`).

Reading a filled sheet
----------------------
A file must be UTF-8. A UTF-8 byte-order mark is fine. A UTF-16 file (byte-order mark or
NUL bytes) or bytes that are not valid UTF-8 (e.g. a sheet saved as latin-1 /
Windows-1252) stop the run with the row and field where the bad bytes are. Rows that are
empty and rows whose first cell starts with ``#`` are skipped. The first other row is the
header: it must hold ``item_id`` and ``verdict``. Other columns (``prompt``,
``response_a``, ``response_b``, ``note``, and any that a spreadsheet added) are read but
not checked against the export. A ``verdict`` is normalised before it is checked: outer
spaces are dropped, it is lower-cased, and inner spaces or hyphens become underscores
(``"Genuine flip"`` -> ``genuine_flip``). Every row must hold a known item id, at most
once, and an allowed verdict; every item of the key must have a row. Rows may be in any
order. Each problem raises :class:`~batchflip.errors.InputError` naming the file, the
**row** and the field. The row is the row number a spreadsheet shows at its left margin
for that record: the file's records count from 1 at the top, and the instruction lines and
the header count too. A response with line breaks is still one row. A problem that
belongs to no row (items of the key missing from the sheet) names the row just below the
last one. The first problem is raised, and the message says how many more there are.

Consensus and statistics (``results``)
--------------------------------------
- Consensus of an item = the verdict most raters gave it. If two or more verdicts tie for
  the most votes, the consensus is ``borderline``. With two raters, a disagreement is
  therefore borderline. With one rater, the consensus is that rater's verdict.
- Agreement over all items (every rater rates every item): for two raters, Cohen's kappa
  and Krippendorff's alpha (nominal); for three or more, Fleiss' kappa and Krippendorff's
  alpha; for any number, the share of items on which all raters agree. These come from
  :mod:`batchflip.stats` (``cohens_kappa`` and ``fleiss_kappa`` wrap statsmodels;
  ``krippendorff_alpha_nominal`` is the coincidence-matrix formula). A statistic that is
  undefined (e.g. everyone always says the same verdict) is ``null`` with the reason.
- Genuine share of domain d = k/n. Here n = the label-flip items of d that are still
  current (not flagged for re-review), and k = those whose consensus is
  ``genuine_flip``. ``borderline`` counts as not genuine. The interval is Clopper-Pearson.
- Automated flip rate of d = flips / conditioned rows of d in the *current* flip records,
  pooled over models, of the same ``--phase`` as the candidates (``sync``: the
  synchronized conditions at batch size > 1, so the corrected rate is the paper's
  0.6% x 17/63 on that phase, not on all conditions pooled), with a Clopper-Pearson
  interval. The genuine share takes only key items of that phase too (a pinned key
  exported with another phase may hold more).
- Corrected flip rate = automated flip rate x genuine share. Its interval carries both
  uncertainties by the Bonferroni product of exact intervals: take Clopper-Pearson
  intervals [L1, U1] and [L2, U2] of the two proportions, each at confidence
  1 - (1 - c)/2 (97.5% for c = 95%). The interval is [L1 * L2, U1 * U2]. Both
  intervals hold their true values together with probability >= c, by the Bonferroni
  inequality, and the product grows with both factors. So the interval covers the true
  corrected rate with probability >= c. It is conservative, exact-based, needs no seed,
  and is defined at zero counts (where a bootstrap of the two binomials or a delta method
  on the log scale breaks down). It contains the point estimate and is wider than either
  single-source interval.
- Directions of the genuine flips (to_unsafe / to_safe counts) come from the unblinded key.

Scorer change after adjudication
--------------------------------
The key keeps the automated scores, labels and scorer versions from export time.
``results`` compares each item with the current flip records, and with the current scored
files if they are given. An item is flagged for re-review, and left out of the genuine
share, when any of these holds:

- it is missing from the current records;
- its baseline or condition score, flip or direction changed;
- its label string changed;
- a response's text changed.

Flagged items are listed in the JSON (``{study}/adjudication/rereview``) and in the
re-review CSV. That CSV is unblinded and meant for the lead; re-export to get fresh
blinded sheets. Items whose scorer version changed but whose labels did not are kept and
counted (``.../scorer_version_changed_kept``). Current candidates that are not in the key
are counted as ``.../not_adjudicated``.

Pin the key: the workflow re-runs ``export`` whenever the flips change, and that rewrites
``results/adjudication/{study}/key.parquet``. When you hand out the sheets, copy the key
to ``resources/adjudication/{study}/key.parquet``. The ``results`` rule prefers that
pinned key, so the comparison is with the labels the raters actually saw.

With no filled sheet, ``results`` still writes all three files. Their status says
``pending: N items exported to <sheets>``, every rater-based value is ``null``, and
nothing is invented.
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
