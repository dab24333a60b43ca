# Study D (kind: ablation, kernel ablation): the label flips of a discovery study (`source`), each re-run
# alone and inside its reconstructed original group, under every kernel mode in
# `kernel_modes` (a wildcard), with the source's generation settings (batchflip.studies.ablation).
# Only studies with `kind: ablation` match these rules; every other kind has its own numbers
# rule (study_<kind>.smk), so results/numbers/{study}.json has exactly one producer. Without
# such studies the constraint is layout.NEVER_MATCHES and the rules are inert.
# Helpers (ablation_source, ablation_models, ablation_settings, ...): common.smk.
#
# Content-keyed reruns (batchflip.keyed): a scorer change rewrites the candidate list, but
# the reruns are written under the key of what it asks to generate
# (results/ablation/{study}/{model}/{kernel_mode}/{key}.parquet) and ablation_pick copies
# the current key's file to the fixed path. ablation_candidates is a checkpoint, so the key
# is read after it runs: an unchanged candidate set plans no rerun, a changed one reruns
# only its new candidates (--reuse copies the others from the earlier keyed files).


checkpoint ablation_candidates:
    """The source's label flips, each with its original group (members, positions, roles)."""
    input:
        flips=lambda w: layout.flips_path(ablation_source(w.study), w.model),
        generations=lambda w: ablation_source_generations(w.study, w.model),
    output:
        layout.ablation_candidates_path("{study}", "{model}"),
    wildcard_constraints:
        study=studies_of("ablation"),
    params:
        baseline=lambda w: study_cfg(ablation_source(w.study))["baseline"],
        # only the dispatches whose baseline this model runs (a scope may leave one out)
        own=lambda w: dispatch_baseline_args(ablation_source(w.study), w.model),
        candidates=lambda w: study_cfg(w.study)["candidates"],
        min_flips=lambda w: study_cfg(w.study).get("min_label_flips", 10),
        dispatches=lambda w: [
            a for d in study_cfg(w.study).get("dispatches", []) for a in ("--dispatch", d)
        ],
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/ablation/{study}/{model}/candidates.log",
    shell:
        "python -m batchflip ablation candidates --flips {input.flips:q} "
        "--generations {input.generations:q} --baseline {params.baseline:q} {params.own:q} "
        "{params.dispatches:q} --candidates {params.candidates:q} "
        "--min-label-flips {params.min_flips:q} --out {output:q} "
        "> {log:q} 2>&1"


rule ablation_generate:
    """Rerun the candidates of one content key alone and in their groups, one kernel mode
    (ancient: the candidate list's file time never reruns it; its key names the output)."""
    input:
        candidates=ancient(layout.ablation_candidates_path("{study}", "{model}")),
        battery=lambda w: battery_of(ablation_source(w.study)),
        model=model_input,
        # the invariance probe's negative control (batch_invariant after standard)
        # (ancient: a re-picked standard stack never reruns the batch-invariant job)
        control=lambda w: [
            ancient(p) for p in layout.probe_control_stack(config, w.study, w.model, w.kernel_mode)
        ],
    output:
        runs=layout.ablation_keyed_run_path("{study}", "{model}", "{kernel_mode}", "{key}"),
        stack=layout.stack_path(
            layout.ablation_keyed_run_path("{study}", "{model}", "{kernel_mode}", "{key}")
        ),
    wildcard_constraints:
        study=studies_of("ablation"),
        kernel_mode="|".join(KERNEL_MODES),
        key=KEY_PATTERN,
    params:
        # the params trigger: the rerun's settings that change its rows
        rows=lambda w: ablation_settings(w.study, w.model, w.kernel_mode),
        # the command's --params, launch-only server settings included (untracked)
        settings=untracked(lambda w: ablation_command_params(w.study, w.model, w.kernel_mode)),
        model_dir=lambda w: model_dir(w.model),
        control=lambda w, input: [a for p in input.control for a in ("--control-stack", p)],
    threads: lambda w: study_threads(ablation_source(w.study))
    resources:
        gpu=ablation_gpu,
        vllm_cpu_server=ablation_launches_server,
    conda:
        "../../envs/generation.yaml"
    log:
        "results/logs/ablation/{study}/{model}/{kernel_mode}/{key}.log",
    benchmark:
        "results/benchmarks/ablation/{study}/{model}/{kernel_mode}/{key}.tsv"
    shell:
        "python -m batchflip ablation generate --candidates {input.candidates:q} "
        "--battery {input.battery:q} --params {params.settings:q} "
        "--model-dir {params.model_dir:q} --kernel-mode {wildcards.kernel_mode} "
        "--key {wildcards.key:q} --reuse {params.control:q} "
        "--out {output.runs:q} --stack-out {output.stack:q} > {log:q} 2>&1"


# When restoring, the fixed paths come out of the archive (restore.smk).
if not restoring():

    rule ablation_pick:
        """The reruns of the current candidate list's key, at the fixed path."""
        input:
            ablation_keyed_runs,
        output:
            runs=layout.ablation_run_path("{study}", "{model}", "{kernel_mode}"),
            stack=layout.stack_path(layout.ablation_run_path("{study}", "{model}", "{kernel_mode}")),
        wildcard_constraints:
            study=studies_of("ablation"),
            kernel_mode="|".join(KERNEL_MODES),
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        log:
            "results/logs/ablation/{study}/{model}/{kernel_mode}_pick.log",
        shell:
            "python -m batchflip keyed pick --src {input:q} --dst {output:q} > {log:q} 2>&1"


rule ablation_numbers:
    """Study D numbers (scored here: a scorer change re-scores, never regenerates)."""
    input:
        candidates=lambda w: [
            layout.ablation_candidates_path(w.study, m) for m in ablation_models(w.study)
        ],
        runs=lambda w: ablation_runs(w.study),
        stacks=lambda w: [layout.stack_path(p) for p in ablation_runs(w.study)],
        battery=lambda w: battery_of(ablation_source(w.study)),
        patterns=str(bundled_path("scorers/refusal_patterns.yaml")),
    output:
        numbers=layout.numbers_path("{study}"),
        rows="results/ablation/{study}/rows.parquet",
    wildcard_constraints:
        study=studies_of("ablation"),
    params:
        versions=json.dumps(config["scorers"], sort_keys=True),
        source=lambda w: ablation_source(w.study),
        max_error_share=max_error_share(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/ablation/{study}/numbers.log",
    shell:
        "python -m batchflip ablation numbers --study {wildcards.study:q} "
        "--source {params.source:q} "
        "--candidates {input.candidates:q} --runs {input.runs:q} --stacks {input.stacks:q} "
        "--battery {input.battery:q} --versions {params.versions:q} "
        "--patterns {input.patterns:q} --max-error-share {params.max_error_share:q} "
        "--out {output.numbers:q} --rows-out {output.rows:q} > {log:q} 2>&1"


rule ablation_figure:
    """Label flips and text changes per kernel mode with Wilson 95% intervals."""
    input:
        layout.numbers_path("{study}"),
    output:
        png=report(
            layout.figure_path("{study}", "ablation", "png"),
            caption=repo_path("workflow/report/ablation.rst"),
            category="Figures",
        ),
        pdf=layout.figure_path("{study}", "ablation", "pdf"),
    wildcard_constraints:
        study=studies_of("ablation"),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/ablation/{study}/figure.log",
    shell:
        "python -m batchflip ablation figure --numbers {input:q} "
        "--png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
