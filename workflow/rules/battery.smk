rule battery:
    """Render task-YAML files into one battery parquet."""
    input:
        battery_files,
    output:
        "results/battery/{battery}.parquet",
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/battery/{battery}.log",
    shell:
        "python -m batchflip battery {input:q} --out {output:q} > {log:q} 2>&1"
