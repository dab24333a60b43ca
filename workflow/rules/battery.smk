def battery_files(wildcards):
    from batchflip.battery import task_files

    return [str(p) for p in task_files(config["batteries"][wildcards.battery]["paths"])]


rule battery:
    """Render task-YAML files into one battery parquet."""
    input:
        battery_files,
    output:
        "results/battery/{battery}.parquet",
    log:
        "results/logs/battery/{battery}.log",
    shell:
        "batchflip battery {input:q} --out {output:q} > {log:q} 2>&1"
