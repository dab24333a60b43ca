# The repeat control (batchflip.repeat): each condition's text-change and flip rates beside
# those of the study's baseline generated a second time (<baseline>_repeat), with the exact
# McNemar test of condition vs repeat. One numbers file per study that runs a repeat.


rule repeat_numbers:
    """Every condition's text-change and flip rates beside the repeat control's."""
    input:
        lambda w: all_scored_paths(w.study),
    output:
        layout.numbers_path("repeat_{study}"),
    wildcard_constraints:
        study=repeat_studies(),
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
        own=lambda w: dispatch_baseline_args(w.study),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/repeat/{study}.log",
    shell:
        "python -m batchflip repeat numbers --study {wildcards.study:q} "
        "--baseline {params.baseline:q} {params.own:q} --scored {input:q} --out {output:q} "
        "> {log:q} 2>&1"
