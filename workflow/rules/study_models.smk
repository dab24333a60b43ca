# Study B (kind: models): fragility and output instability across models
# (batchflip.studies.models). Only studies with `kind: models` match these rules; every other
# kind has its own numbers rule (study_<kind>.smk), so results/numbers/{study}.json has
# exactly one producer. Without such studies the constraint is layout.NEVER_MATCHES and the
# rules are inert.
# Generation, scoring and flips are the shared stages; alignment types come from
# models.<name>.alignment ("unspecified" when absent).


rule models_numbers:
    """Per-model fragility and instability, pooled rates, ANOVA by alignment type, Pearson r
    with a seeded bootstrap interval, flip directions with a binomial test."""
    input:
        flips=lambda w: flips_paths(w.study),
        scored=lambda w: all_scored_paths(w.study),
    output:
        layout.numbers_path("{study}"),
    wildcard_constraints:
        study=studies_of("models"),
    params:
        # one --alignment NAME=TYPE pair per model, each element shell-quoted (:q)
        alignment=lambda w: [
            a
            for m in study_cfg(w.study)["models"]
            for a in ("--alignment", f"{m}={config['models'][m].get('alignment', 'unspecified')}")
        ],
        seed=lambda w: study_cfg(w.study)["seed"],
        resamples=2000,
        max_error_share=max_error_share(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/models/{study}_numbers.log",
    shell:
        "python -m batchflip models numbers --study {wildcards.study:q} "
        "--flips {input.flips:q} {params.alignment:q} --seed {params.seed:q} "
        "--resamples {params.resamples:q} --scored {input.scored:q} "
        "--max-error-share {params.max_error_share:q} --out {output:q} > {log:q} 2>&1"


rule models_figure:
    """Instability vs fragility per model with the fit line."""
    input:
        layout.numbers_path("{study}"),
    output:
        png=report(
            layout.figure_path("{study}", "models", "png"),
            caption=repo_path("workflow/report/models.rst"),
            category="Figures",
        ),
        pdf=layout.figure_path("{study}", "models", "pdf"),
    wildcard_constraints:
        study=studies_of("models"),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/models/{study}_figure.log",
    shell:
        "python -m batchflip models figure --numbers {input:q} "
        "--png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
