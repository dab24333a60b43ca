rule score:
    """Score one generation file; scorer versions are params, so a change re-scores only."""
    input:
        gen=layout.generation_path("{study}", "{model}", "{condition}"),
        battery=lambda w: battery_of(w.study),
        patterns=str(bundled_path("scorers/refusal_patterns.yaml")),
    output:
        layout.scored_path("{study}", "{model}", "{condition}"),
    params:
        versions=json.dumps(config["scorers"], sort_keys=True),
        scored_format=SCORED_FORMAT,
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/score/{study}/{model}/{condition}.log",
    benchmark:
        "results/benchmarks/score/{study}/{model}/{condition}.tsv"
    shell:
        "python -m batchflip score --generations {input.gen:q} --battery {input.battery:q} "
        "--versions {params.versions:q} --patterns {input.patterns:q} --out {output:q} "
        "> {log:q} 2>&1"
