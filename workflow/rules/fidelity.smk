# Fidelity: recompute every published statistic of the paper from its published inputs
# (the bundled batchflip/data/fidelity/published.yaml) and record value, printed value,
# precision and match.
# Pure CPU, seconds. Add --strict to the command to fail the target on any mismatch.


rule fidelity:
    input:
        str(bundled_path("fidelity/published.yaml")),
    output:
        layout.numbers_path("fidelity"),
    conda:
        "../../envs/analysis.yaml"
    log:
        "results/logs/fidelity.log",
    shell:
        "python -m batchflip fidelity --published {input} --out {output} > {log} 2>&1"
