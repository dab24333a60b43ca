rule paper:
    """The paper bundle: numbers.json, numbers.tex, report.html, figures, MANIFEST.tsv."""
    input:
        numbers=paper_numbers,
        figures=paper_figures,
        # stack fingerprints: report.html's models, engine, device and versions
        stacks=lambda w: [
            p[: -len(".parquet")] + ".stack.json"
            for s in config["paper"]["studies"]
            for p in (
                ablation_runs(s)
                if study_cfg(s)["kind"] == "ablation"
                else [
                    gen_path(s, m, c)
                    for m in study_cfg(s)["models"]
                    for c in conditions_of(s, m)
                ]
            )
        ],
        captions=figure_captions(),
    output:
        directory("results/paper"),
    params:
        captions_dir=lambda w, input: str(Path(input.captions[0]).parent),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/paper.log",
    shell:
        "python -m batchflip paper --numbers {input.numbers:q} --figures {input.figures:q} "
        "--stacks {input.stacks:q} --captions-dir {params.captions_dir:q} --out {output:q} "
        "> {log:q} 2>&1"
