rule battery:
    """Render task-YAML files, and/or sample public datasets (a builder), into one battery."""
    input:
        tasks=battery_files,
        sources=builder_files,
    output:
        layout.battery_path("{battery}"),
    params:
        builder=lambda w: builder_spec(w.battery),
        render=lambda w: config["batteries"][w.battery]["render"],
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/battery/{battery}.log",
    shell:
        "python -m batchflip battery {input.tasks:q} --builder {params.builder:q} "
        "--render {params.render} "
        "--out {output:q} > {log:q} 2>&1"
