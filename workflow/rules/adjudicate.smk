# Human adjudication of flip candidates (batchflip.adjudication; its docstring has the
# details): blinded export -> raters fill sheets -> agreement and corrected flip rates.
#
# Config (all optional; defaults in workflow/schemas/config.schema.yaml, filled in at load):
#   adjudication:
#     raters: [rater1, rater2]     # one blinded sheet per rater, each in its own row order
#     seed: 0                      # item ids, A/B assignment, row orders, text-change sample
#     phase: sync                  # rows reviewed and rated: sync (dispatch sync, b > 1;
#                                  # the paper's) or all (every condition pooled)
#     domains: [safety]            # domains whose label flips are sent for review
#     include_text_changes: false  # also send same-label, changed-text rows (missed flips)
#     text_change_limit: null      # seeded sample of at most this many of those (null = all)
#     confidence: 0.95             # intervals of the genuine share and the corrected rate
#
# How to run an adjudication round:
#   1. snakemake ... results/adjudication/{study}/key.parquet   (writes sheet_{rater}.csv too)
#   2. send results/adjudication/{study}/sheet_{rater}.csv to each rater. Never send the key.
#      Pin the key: cp results/adjudication/{study}/key.parquet
#      resources/adjudication/{study}/key.parquet. The results rule prefers the pinned key,
#      so a later scorer change is compared with the labels the raters saw. Without the pin,
#      the export re-runs whenever the flips change and rewrites the key.
#   3. put the filled sheets at resources/adjudication/{study}/{rater}.csv (UTF-8 CSV).
#   4. snakemake ... results/numbers/adjudication_{study}.json
# The results rule takes as input every *.csv under resources/adjudication/{study}/ that
# exists when the DAG is built (a Python input function that globs). Adding or removing a
# sheet changes the rule's input set, so Snakemake reruns it (rerun trigger "input", on by
# default). Editing a sheet makes it newer than the output (trigger "mtime"). With no sheet,
# the rule still runs: the numbers say "pending: N items exported to ..." and invent
# nothing.
rule adjudication_export:
    """Blinded review sheets (one per rater) and the unblinding key of a study's flips."""
    input:
        flips=lambda w: flips_paths(w.study),
        scored=lambda w: all_scored_paths(w.study),
        battery=lambda w: battery_of(w.study),
    output:
        sheets=[layout.adjudication_sheet_path("{study}", r) for r in adj_cfg("raters")],
        key=layout.adjudication_key_path("{study}"),
    params:
        outdir=lambda w, output: os.path.dirname(output.key),
        raters=adj_cfg("raters"),
        seed=adj_cfg("seed"),
        domains=adj_cfg("domains"),
        phase=adj_cfg("phase"),
        flags=adj_export_flags(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/adjudication/{study}_export.log",
    shell:
        "python -m batchflip adjudicate export --study {wildcards.study:q} "
        "--flips {input.flips:q} --scored {input.scored:q} "
        "--battery {input.battery:q} --out-dir {params.outdir:q} --raters {params.raters:q} "
        "--seed {params.seed:q} --domains {params.domains:q} --phase {params.phase:q} "
        "{params.flags:q} > {log:q} 2>&1"


rule adjudication_results:
    """Agreement, consensus, genuine share and corrected flip rates (pending if no sheet)."""
    input:
        key=adj_key,
        flips=lambda w: flips_paths(w.study),
        scored=lambda w: all_scored_paths(w.study),
        ratings=adj_rating_files,
        exported=adj_exported,
        schema=str(bundled_path("schemas/adjudication_sheet.schema.yaml")),
    output:
        numbers=layout.numbers_path("adjudication_{study}"),
        rereview="results/adjudication/{study}/rereview.csv",
        verdicts="results/adjudication/{study}/verdicts.csv",
    params:
        domains=adj_cfg("domains"),
        phase=adj_cfg("phase"),
        confidence=adj_cfg("confidence"),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/adjudication/{study}_results.log",
    shell:
        "python -m batchflip adjudicate results --study {wildcards.study:q} "
        "--key {input.key:q} --flips {input.flips:q} --scored {input.scored:q} "
        "--ratings {input.ratings:q} --exported {input.exported:q} "
        "--schema {input.schema:q} --domains {params.domains:q} --phase {params.phase:q} "
        "--confidence {params.confidence:q} --out {output.numbers:q} "
        "--rereview {output.rereview:q} --verdicts {output.verdicts:q} > {log:q} 2>&1"
