# Studies recorded with logprobs (layout.logprob_studies): where greedy paths diverge
# (batchflip.divergence) and the margin screen from one batch-1 run (batchflip.screen).


rule screen:
    """Prompts of one batch-1 run ranked by their minimum top-1/top-2 margin."""
    input:
        layout.generation_path("{study}", "{model}", "{condition}"),
    output:
        layout.screen_path("{study}", "{model}", "{condition}"),
    wildcard_constraints:
        study=lp_studies(),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/screen/{study}/{model}/{condition}.log",
    shell:
        "python -m batchflip screen {input:q} --out {output:q} > {log:q} 2>&1"


rule divergence_pairs:
    """Each pair of the flips file with its divergence index, margins and noise."""
    input:
        gens=lambda w: layout.generation_paths(config, w.study, w.model),
        flips=layout.flips_path("{study}", "{model}"),
    output:
        layout.divergence_pairs_path("{study}", "{model}"),
    wildcard_constraints:
        study=lp_studies(),
    params:
        baseline=lambda w: study_cfg(w.study)["baseline"],
        own=lambda w: dispatch_baseline_args(w.study, w.model),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/divergence/{study}/{model}.log",
    shell:
        "python -m batchflip divergence pairs {input.gens:q} --flips {input.flips:q} "
        "--baseline {params.baseline:q} {params.own:q} --out {output:q} > {log:q} 2>&1"


rule divergence_numbers:
    """A study's divergence, noise and screen numbers, and the divergence figure."""
    input:
        pairs=lambda w: [
            layout.divergence_pairs_path(w.study, m) for m in study_cfg(w.study)["models"]
        ],
        screens=lambda w: layout.screen_paths(config, w.study),
        gens=lambda w: [
            layout.generation_path(w.study, m, c)
            for m in study_cfg(w.study)["models"]
            for c in layout.baseline_conditions(config, w.study, m)
        ],
    output:
        numbers=layout.numbers_path("divergence_{study}"),
        png=layout.figure_path("{study}", "divergence", "png"),
        pdf=layout.figure_path("{study}", "divergence", "pdf"),
    wildcard_constraints:
        study=lp_studies(),
    params:
        bootstrap=config["divergence"]["bootstrap"],
        seed=config["divergence"]["seed"],
        near_tie=config["divergence"]["near_tie"],
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/divergence/{study}.log",
    shell:
        "python -m batchflip divergence numbers {input.pairs:q} --screens {input.screens:q} "
        "--generations {input.gens:q} --study {wildcards.study:q} "
        "--bootstrap {params.bootstrap:q} --seed {params.seed:q} "
        "--near-tie {params.near_tie:q} --out {output.numbers:q} "
        "--png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"
