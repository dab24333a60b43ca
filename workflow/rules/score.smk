rule score:
    """Score one generation file; scorer versions are params, so a change re-scores only."""
    input:
        gen="results/generations/{study}/{model}/{condition}.parquet",
        battery=lambda w: battery_of(w.study),
        patterns=str(bundled_path("scorers/refusal_patterns.yaml")),
    output:
        "results/scored/{study}/{model}/{condition}.parquet",
    params:
        versions=json.dumps(config["scorers"], sort_keys=True),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/score/{study}/{model}/{condition}.log",
    shell:
        "python -m batchflip score --generations {input.gen:q} --battery {input.battery:q} "
        "--versions {params.versions:q} --patterns {input.patterns:q} --out {output:q} "
        "> {log:q} 2>&1"
