rule flips:
    """Pair every condition of a model against the study's baseline condition."""
    input:
        lambda w: scored_paths(w.study, w.model),
    output:
        "results/flips/{study}/{model}.parquet",
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/flips/{study}/{model}.log",
    shell:
        "python -m batchflip flips {input:q} --baseline {params.baseline} --out {output:q} > {log:q} 2>&1"
