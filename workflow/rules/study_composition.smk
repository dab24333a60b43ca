# Study C (kind: composition): continuous-batch composition numbers and the
# refusal-by-composition figure (batchflip.studies.composition). Only studies with
# `kind: composition` match these rules; every other kind has its own numbers rule
# (study_<kind>.smk), so results/numbers/{study}.json has exactly one producer. Without such
# studies the constraint is layout.NEVER_MATCHES and the rules are inert.


rule composition_numbers:
    """Study C numbers: refusal rates, McNemar (Holm) vs the baseline and over the paper's
    7 pairs, Cochran's Q, Mantel-Haenszel, TOST (margin: the study's tost_margin, default
    0.03) with the paired difference, minimum detectable effect, flip direction, capability
    rows, position ANOVA and the co-batch verification rate."""
    input:
        scored=lambda w: all_scored_paths(w.study),
        generations=lambda w: layout.generation_paths(config, w.study),
    output:
        layout.numbers_path("{study}"),
    wildcard_constraints:
        study=studies_of("composition"),
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
        max_error_share=max_error_share(),
        margin=lambda w: study_cfg(w.study).get("tost_margin", 0.03),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/composition/{study}_numbers.log",
    shell:
        "python -m batchflip composition numbers --study {wildcards.study:q} "
        "--baseline {params.baseline:q} --scored {input.scored:q} "
        "--generations {input.generations:q} --max-error-share {params.max_error_share:q} "
        "--margin {params.margin:q} "
        "--out {output:q} > {log:q} 2>&1"


rule composition_figure:
    """Refusal rate per composition with Wilson 95% intervals, one series per model."""
    input:
        layout.numbers_path("{study}"),
    output:
        png=report(
            layout.figure_path("{study}", "composition", "png"),
            caption=repo_path("workflow/report/composition.rst"),
            category="Figures",
        ),
        pdf=layout.figure_path("{study}", "composition", "pdf"),
    wildcard_constraints:
        study=studies_of("composition"),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/composition/{study}_figure.log",
    shell:
        "python -m batchflip composition figure --numbers {input:q} "
        "--png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
