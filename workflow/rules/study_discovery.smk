# Study A (kind: discovery): flip rates, directions and output identity per condition
# (batchflip.studies.discovery). Only studies with `kind: discovery` match these rules;
# every other kind has its own numbers rule (study_<kind>.smk), so results/numbers/{study}.json
# has exactly one producer. Without such studies the constraint is layout.NEVER_MATCHES and
# the rules are inert. Generation, scoring and flips are the shared stages.


rule discovery_numbers:
    """Every number of a study, with value, definition, inputs and stack ids."""
    input:
        flips=lambda w: flips_paths(w.study),
        scored=lambda w: all_scored_paths(w.study),
    output:
        layout.numbers_path("{study}"),
    wildcard_constraints:
        study=studies_of("discovery"),
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
        max_error_share=max_error_share(),
        # the models' quantizations (models.<m>.quant / requantize, base): Study A phase
        # 3's quantization x concurrency section (batchflip.studies.quantization)
        quants=lambda w: study_quants(w.study),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/discovery/{study}_numbers.log",
    shell:
        "python -m batchflip discovery numbers --study {wildcards.study:q} "
        "--baseline {params.baseline:q} --flips {input.flips:q} --scored {input.scored:q} "
        "--max-error-share {params.max_error_share:q} --quants {params.quants:q} "
        "--out {output:q} > {log:q} 2>&1"


rule discovery_figure:
    """One figure of a study, drawn from its numbers file."""
    input:
        layout.numbers_path("{study}"),
    output:
        png=report(
            layout.figure_path("{study}", "{name}", "png"),
            caption=repo_path("workflow/report/figure.rst"),
            category="Figures",
        ),
        pdf=layout.figure_path("{study}", "{name}", "pdf"),
    wildcard_constraints:
        name="|".join(layout.FIGURES_BY_KIND["discovery"]),
        study=studies_of("discovery"),
    params:
        # report captions are not wildcard-expanded: figure.rst renders this text
        caption=lambda w: Path(repo_path(f"workflow/report/{w.name}.rst")).read_text(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/discovery/{study}_{name}.log",
    shell:
        "python -m batchflip discovery figure --numbers {input:q} --name {wildcards.name:q} "
        "--png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
