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
        # the targets the generation file must hold (checked before scoring)
        expect=lambda w: json.dumps(
            design.target_spec(study_cfg(w.study), w.condition), sort_keys=True
        ),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/score/{study}/{model}/{condition}.log",
    benchmark:
        "results/benchmarks/score/{study}/{model}/{condition}.tsv"
    shell:
        "python -m batchflip score --generations {input.gen:q} --battery {input.battery:q} "
        "--versions {params.versions:q} --patterns {input.patterns:q} "
        "--expect {params.expect:q} --out {output:q} "
        "> {log:q} 2>&1"
