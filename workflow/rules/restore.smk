# Reviewer reproduction (batchflip.archive; `batchflip archive pack` makes the archive).
# - `restore: {archive: A}`: generation files, their stack fingerprints, kernel-ablation
#   reruns and the batteries come out of archive A (each checked against its
#   MANIFEST.sha256) instead of the models and task files; common.smk's restoring()
#   switches the generate rules off, and ruleorders put the restore rules before battery
#   (ablation_pick and enriched_pick are off then). No GPU, no model download.
# - `verify: {archive: A}`: results/verify/{study}.json compares fresh generations with A.


if restoring():

    rule restore_generation:
        """Restore one generation file and its stack fingerprint from the archive."""
        input:
            config["restore"]["archive"],
        output:
            gen=layout.generation_path("{study}", "{model}", "{condition}"),
            stack=layout.stack_path(layout.generation_path("{study}", "{model}", "{condition}")),
        conda:
            "../../envs/analysis.yaml"
        log:
            "results/logs/restore/{study}/{model}/{condition}.log",
        shell:
            "python -m batchflip archive restore {input:q} {output.gen:q} {output.stack:q} "
            "> {log:q} 2>&1"

    rule restore_battery:
        """Restore a battery parquet from the archive (the one the generations used)."""
        input:
            config["restore"]["archive"],
        output:
            layout.battery_path("{battery}"),
        conda:
            "../../envs/analysis.yaml"
        log:
            "results/logs/restore/battery/{battery}.log",
        shell:
            "python -m batchflip archive restore {input:q} {output:q} > {log:q} 2>&1"

    rule restore_ablation:
        """Restore one kernel-ablation rerun (Study D) and its fingerprint."""
        input:
            config["restore"]["archive"],
        output:
            runs=layout.ablation_run_path("{study}", "{model}", "{kernel_mode}"),
            stack=layout.stack_path(layout.ablation_run_path("{study}", "{model}", "{kernel_mode}")),
        wildcard_constraints:
            study=studies_of("ablation"),
            kernel_mode="|".join(KERNEL_MODES),
        conda:
            "../../envs/analysis.yaml"
        log:
            "results/logs/restore/ablation/{study}/{model}/{kernel_mode}.log",
        shell:
            "python -m batchflip archive restore {input:q} {output.runs:q} {output.stack:q} "
            "> {log:q} 2>&1"

    ruleorder: restore_battery > battery


rule verify:
    """Compare a study's fresh generations with the archive: exact where the stack matches,
    flip rates within the archived Wilson intervals where it does not."""
    input:
        archive=verify_archive,
        fresh=study_gen_paths,
        battery=lambda w: battery_of(w.study),
    output:
        "results/verify/{study}.json",
    params:
        versions=json.dumps(config["scorers"], sort_keys=True),
        baseline=lambda w: study_cfg(w.study)["baseline"],
        own=lambda w: dispatch_baseline_args(w.study),
        confidence=lambda w: config["verify"]["confidence"],
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/verify/{study}.log",
    shell:
        "python -m batchflip archive verify --archive {input.archive:q} "
        "--study {wildcards.study:q} --battery {input.battery:q} "
        "--versions {params.versions:q} "
        "--baseline {params.baseline:q} {params.own:q} --confidence {params.confidence:q} "
        "--out {output:q} {input.fresh:q} > {log:q} 2>&1"
