rule generate:
    """One generation job per (study, model, condition)."""
    input:
        battery=lambda w: battery_of(w.study),
        model=model_input,
    output:
        gen="results/generations/{study}/{model}/{condition}.parquet",
        stack="results/generations/{study}/{model}/{condition}.stack.json",
    params:
        settings=lambda w: gen_settings(w.study, w.model),
        model_dir=lambda w: model_dir(w.model),
    threads: lambda w: study_cfg(w.study).get("threads", 1)
    conda:
        "../../envs/generation.yaml"
    log:
        "results/logs/generate/{study}/{model}/{condition}.log",
    shell:
        "python -m batchflip generate --battery {input.battery:q} --params {params.settings:q} "
        "--model-dir {params.model_dir:q} --condition {wildcards.condition} "
        "--out {output.gen:q} --stack-out {output.stack:q} 2> {log:q}"
