rule numbers:
    """Every number of a study, with value, definition, inputs and stack ids."""
    input:
        flips=lambda w: flips_paths(w.study),
        scored=lambda w: all_scored_paths(w.study),
    output:
        layout.numbers_path("{study}"),
    wildcard_constraints:
        study=studies_of("discovery"),
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
        max_error_share=max_error_share(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/numbers/{study}.log",
    shell:
        "python -m batchflip numbers --study {wildcards.study} --baseline {params.baseline} "
        "--flips {input.flips:q} --scored {input.scored:q} "
        "--max-error-share {params.max_error_share} --out {output:q} > {log:q} 2>&1"
