def paper_stacks(wildcards):
    """The stack fingerprints of the paper's studies: report.html's model, engine, device
    and versions (generations; Study D's reruns for ablation studies)."""
    out = []
    for s in config["paper"]["studies"]:
        if study_cfg(s)["kind"] == "ablation":
            out += [p[: -len(".parquet")] + ".stack.json" for p in ablation_runs(s)]
            continue
        for m in study_cfg(s)["models"]:
            out += [f"results/generations/{s}/{m}/{c}.stack.json" for c in conditions_of(s, m)]
    return out


rule paper:
    """The paper bundle: numbers.json, numbers.tex, report.html, figures, MANIFEST.tsv."""
    input:
        numbers=paper_numbers,
        figures=paper_figures,
        stacks=paper_stacks,
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
