rule figure:
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
        name="flip_rates|identity",
        study=studies_of("discovery"),
    params:
        # report captions are not wildcard-expanded: figure.rst renders this text
        caption=lambda w: Path(repo_path(f"workflow/report/{w.name}.rst")).read_text(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/figures/{study}_{name}.log",
    shell:
        "python -m batchflip figures --numbers {input:q} --name {wildcards.name} "
        "--png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
