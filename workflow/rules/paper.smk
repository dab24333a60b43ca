FIGURE_NAMES = ["flip_rates", "identity"]


def paper_numbers(wildcards):
    studies = config["paper"]["studies"]
    return [f"results/numbers/{s}.json" for s in studies] + ["results/numbers/fidelity.json"]


def paper_figures(wildcards):
    return [
        f"results/figures/{s}_{n}.{ext}"
        for s in config["paper"]["studies"]
        for n in FIGURE_NAMES
        for ext in ("png", "pdf")
    ]


rule paper:
    """The paper bundle: numbers.json, numbers.tex, report.html, figures, MANIFEST.tsv."""
    input:
        numbers=paper_numbers,
        figures=paper_figures,
        captions=[repo_path(f"workflow/report/{n}.rst") for n in FIGURE_NAMES],
    output:
        directory("results/paper"),
    params:
        captions_dir=repo_path("workflow/report"),
    log:
        "results/logs/paper.log",
    shell:
        "batchflip paper --numbers {input.numbers:q} --figures {input.figures:q} "
        "--captions-dir {params.captions_dir:q} --out {output:q} > {log:q} 2>&1"
