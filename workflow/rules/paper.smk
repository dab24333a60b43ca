rule paper:
    """The paper bundle: numbers.json, numbers.tex, report.html, figures, MANIFEST.tsv."""
    input:
        numbers=paper_numbers,
        figures=paper_figures,
        # stack fingerprints: report.html's models, engine, device and versions
        stacks=paper_stacks,
        captions=figure_captions(),
    output:
        directory("results/paper"),
    params:
        captions_dir=lambda w, input: str(Path(input.captions[0]).parent),
        kinds=json.dumps(
            {s: study_cfg(s)["kind"] for s in config["paper"]["studies"]}, sort_keys=True
        ),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/paper.log",
    shell:
        "python -m batchflip paper --numbers {input.numbers:q} --figures {input.figures:q} "
        "--stacks {input.stacks:q} --captions-dir {params.captions_dir:q} "
        "--kinds {params.kinds:q} --out {output:q} "
        "> {log:q} 2>&1"
