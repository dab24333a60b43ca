rule generate:
    """hf engine: one generation job per (study, model, condition)."""
    input:
        battery=lambda w: battery_of(w.study),
        model=model_input,
    output:
        gen=layout.generation_path("{study}", "{model}", "{condition}"),
        stack=layout.stack_path(layout.generation_path("{study}", "{model}", "{condition}")),
    wildcard_constraints:
        study=studies_on("hf"),
    params:
        settings=lambda w: gen_settings(w.study, w.model, [w.condition]),
        model_dir=lambda w: model_dir(w.model),
    threads: lambda w: study_threads(w.study)
    resources:
        gpu=lambda w: study_gpu(w.study),
    conda:
        "../../envs/generation.yaml"
    log:
        "results/logs/generate/{study}/{model}/{condition}.log",
    benchmark:
        "results/benchmarks/generate/{study}/{model}/{condition}.tsv"
    shell:
        "python -m batchflip generate --battery {input.battery:q} --params {params.settings:q} "
        "--model-dir {params.model_dir:q} --condition {wildcards.condition} "
        "--out {output.gen:q} --stack-out {output.stack:q} 2> {log:q}"


# Server engines (vllm, openai): one job per (study, model) runs every condition of the
# study against one server start (start-up takes minutes on CPU); the job still writes
# one parquet + stack fingerprint per condition. One rule per such study and set of
# conditions (scopes can give models different condition lists; server_jobs groups them),
# because its outputs depend on the condition list. A profile's settings for the family
# name `generate_server` apply to every such rule of a GPU study (profiles/slurm).
for _name, _study, _models, _conds in server_jobs():
    if study_gpu(_study):
        inherit_profile_settings(_name, "generate_server")

    rule:
        name:
            _name
        input:
            battery=battery_of(_study),
            model=model_input,
        output:
            gen=[layout.generation_path(_study, "{model}", c) for c in _conds],
            stack=[layout.stack_path(layout.generation_path(_study, "{model}", c))
                   for c in _conds],
        wildcard_constraints:
            model="|".join(re.escape(m) for m in _models),
        params:
            settings=lambda w, _s=_study, _c=_conds: gen_settings(_s, w.model, _c),
            model_dir=lambda w: model_dir(w.model),
            jobs=lambda w, output, _s=_study: server_job_args(_s, output),
        threads: study_threads(_study)
        resources:
            gpu=study_gpu(_study),
        conda:
            "../../envs/generation.yaml"
        log:
            f"results/logs/generate/{_study}/{{model}}/server_job.log",
        benchmark:
            f"results/benchmarks/generate/{_study}/{{model}}/server_job.tsv"
        shell:
            "python -m batchflip generate --battery {input.battery:q} --params {params.settings:q} "
            "--model-dir {params.model_dir:q} {params.jobs} 2> {log:q}"
