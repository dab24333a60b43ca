# Enriched subset (batchflip.studies.enriched): a study with `subset_from: {study: S, rule: boundary}`
# runs only the prompts that finished study S found boundary-sensitive (a score of 0.5 or a
# flip in any condition), and reports its rates beside S's full-set rates with a note that
# the selection inflates them. battery_of() points the study's generate and score jobs at
# the enriched battery; the rules are inert without such studies (enriched_studies()
# and enriched_source() live in common.smk).


checkpoint enriched_battery:
    """The source study's boundary-sensitive prompts, in battery order (a checkpoint: the
    generation jobs write under its content key, batchflip.keyed, read after it runs)."""
    input:
        battery=lambda w: battery_of(enriched_source(w.study)),
        scored=lambda w: all_scored_paths(enriched_source(w.study)),
        flips=lambda w: flips_paths(enriched_source(w.study)),
    output:
        layout.enriched_battery_path("{study}"),
    wildcard_constraints:
        study=enriched_studies(),
    params:
        rule=lambda w: study_cfg(w.study)["subset_from"]["rule"],
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/enriched/{study}_battery.log",
    shell:
        "python -m batchflip enriched select --battery {input.battery:q} "
        "--scored {input.scored:q} --flips {input.flips:q} --rule {params.rule:q} "
        "--out {output:q} > {log:q} 2>&1"


rule enriched_numbers:
    """Enriched-subset flip rates beside the source's full-set rates (same conditions)."""
    input:
        flips=lambda w: flips_paths(w.study),
        source_flips=lambda w: flips_paths(enriched_source(w.study)),
        selected=layout.enriched_battery_path("{study}"),
        battery=lambda w: battery_of(enriched_source(w.study)),
    output:
        layout.numbers_path("enriched_{study}"),
    wildcard_constraints:
        study=enriched_studies(),
    params:
        source=lambda w: enriched_source(w.study),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/enriched/{study}_numbers.log",
    shell:
        "python -m batchflip enriched compare --study {wildcards.study:q} "
        "--source {params.source:q} --flips {input.flips:q} "
        "--source-flips {input.source_flips:q} --selected {input.selected:q} "
        "--battery {input.battery:q} --out {output:q} > {log:q} 2>&1"


if not restoring():

    rule enriched_pick:
        """The generations of the current enriched battery's content key, at the fixed path
        the score job reads (generate_keyed / the enriched server job write them keyed)."""
        input:
            enriched_keyed_generation,
        output:
            gen=layout.generation_path("{study}", "{model}", "{condition}"),
            stack=layout.stack_path(layout.generation_path("{study}", "{model}", "{condition}")),
        wildcard_constraints:
            study=enriched_studies(),
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        log:
            "results/logs/enriched/{study}/{model}/{condition}_pick.log",
        shell:
            "python -m batchflip keyed pick --src {input:q} --dst {output:q} > {log:q} 2>&1"
