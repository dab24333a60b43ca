rule generate:
    """hf engine: one generation job per (study, model, condition)."""
    input:
        battery=lambda w: battery_of(w.study),
        model=model_input,
    output:
        gen=layout.generation_path("{study}", "{model}", "{condition}"),
        stack=layout.stack_path(layout.generation_path("{study}", "{model}", "{condition}")),
    wildcard_constraints:
        study=studies_on("hf", enriched=False),
        # a condition name batchflip.conditions parses: the shell line keeps this wildcard
        # unquoted (its text is unchanged, so Snakemake's code trigger reruns no generation)
        condition=CONDITION_WILDCARD,
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


rule generate_keyed:
    """hf engine, enriched study: the generations of one battery content key (batchflip.keyed;
    ancient: the battery's file time never reruns it; enriched_pick copies the current key's
    file to the fixed path)."""
    input:
        battery=lambda w: ancient(battery_of(w.study)),
        model=model_input,
    output:
        gen=layout.keyed_generation_path("{study}", "{model}", "{condition}", "{key}"),
        stack=layout.stack_path(
            layout.keyed_generation_path("{study}", "{model}", "{condition}", "{key}")
        ),
    wildcard_constraints:
        study=studies_on("hf", enriched=True),
        key=KEY_PATTERN,
    params:
        settings=lambda w: gen_settings(w.study, w.model, [w.condition]),
        model_dir=lambda w: model_dir(w.model),
    threads: lambda w: study_threads(w.study)
    resources:
        gpu=lambda w: study_gpu(w.study),
    conda:
        "../../envs/generation.yaml"
    log:
        "results/logs/generate/{study}/{model}/keyed/{key}/{condition}.log",
    benchmark:
        "results/benchmarks/generate/{study}/{model}/keyed/{key}/{condition}.tsv"
    shell:
        "python -m batchflip keyed check --file {input.battery:q} --kind battery "
        "--key {wildcards.key:q} 2> {log:q} && "
        "python -m batchflip generate --battery {input.battery:q} --params {params.settings:q} "
        "--model-dir {params.model_dir:q} --condition {wildcards.condition} "
        "--out {output.gen:q} --stack-out {output.stack:q} 2>> {log:q}"


# Server engines (vllm, openai): one job per model and launch settings runs every
# condition of every study that shares them against one server start (start-up takes
# about 40 s on this CPU and minutes on a GPU); the job still writes one parquet + stack
# fingerprint per (study, condition). Studies share a server when their settings agree on
# layout.LAUNCH_KEYS (engine, dtype, seed, kernel_mode, threads, server); their request
# settings (max_new_tokens, logprobs, prompts) stay their own. One rule per such group of
# studies and condition lists (layout.server_jobs), because its outputs depend on them. A
# profile's settings for the family name `generate_server` apply to every such rule of a
# GPU study (profiles/slurm). An enriched study's job writes under its battery's content key
# (batchflip.keyed; keyed_generation_path), its battery an ancient input, and enriched_pick
# copies the current key's files to the fixed paths: a scorer change that keeps the subset
# starts no server.
for _job in server_jobs():
    if any(study_gpu(_study) for _study, _ in _job.parts):
        inherit_profile_settings(_job.name, "generate_server")

    rule:
        name:
            _job.name
        input:
            battery=[
                ancient(battery_of(_study)) if job_keyed(_job) else battery_of(_study)
                for _study, _ in _job.parts
            ],
            model=model_input,
        output:
            gen=[job_gen_path(_job, _study, c) for _study, _conds in _job.parts for c in _conds],
            stack=[
                job_gen_path(_job, _study, c, stack=True)
                for _study, _conds in _job.parts
                for c in _conds
            ],
        wildcard_constraints:
            model="|".join(re.escape(m) for m in _job.models),
            key=KEY_PATTERN,
        params:
            model_dir=lambda w: model_dir(w.model),
            # the params trigger: what changes the rows (layout.server_job_settings)
            settings=lambda w, _j=_job: server_job_settings(_j, w.model),
            # the command's arguments, launch-only server settings included: a function of
            # the outputs, left out of the params trigger (layout.server_job_args)
            jobs=lambda w, output, _j=_job: server_job_args(_j, w.model, output),
            # an enriched job first checks that its batteries still have its key
            check=(lambda w, input: keyed_check(w.key, input.battery)) if job_keyed(_job) else "",
        threads: max(study_threads(_study) for _study, _ in _job.parts)
        # a server job is the longest job of a study: start it as soon as its model is
        # there, so that shorter jobs fill the other cores beside it
        priority: 1
        resources:
            gpu=max(study_gpu(_study) for _study, _ in _job.parts),
            vllm_cpu_server=max(launches_server(_study) for _study, _ in _job.parts),
        conda:
            "../../envs/generation.yaml"
        log:
            server_job_file(_job, "results/logs", "log"),
        benchmark:
            server_job_file(_job, "results/benchmarks", "tsv")
        shell:
            "{params.check}python -m batchflip generate --model-dir {params.model_dir:q} "
            "{params.jobs} 2> {log:q}"
