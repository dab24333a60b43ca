rule flips:
    """Pair every condition of a model against the study's baseline condition."""
    input:
        lambda w: scored_paths(w.study, w.model),
    output:
        layout.flips_path("{study}", "{model}"),
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
        # a scope may leave a dispatch out (layout.dispatch_baselines)
        own=lambda w: layout.dispatch_baseline_flags(config, w.study, w.model),
        # the flips-file layout (records.FLIPS_FORMAT): a new format re-pairs old files
        flips_format=FLIPS_FORMAT,
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/flips/{study}/{model}.log",
    shell:
        "python -m batchflip flips {input:q} --baseline {params.baseline} {params.own} --out {output:q} > {log:q} 2>&1"
