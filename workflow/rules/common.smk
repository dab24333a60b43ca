# Helpers shared by the rules: paths and params derived from the config.
import json


def study_cfg(study):
    return config["studies"][study]


def model_dir(model):
    """Directory (or hub id) a model is loaded from."""
    spec = config["models"][model]
    if spec["source"] == "pypi_gguf":
        return f"resources/models/{model}"
    return spec["path"] if spec["source"] == "path" else spec["id"]


def model_input(wildcards):
    """The model stage's sentinel file, when the model is built by the workflow."""
    spec = config["models"][wildcards.model]
    return [f"resources/models/{wildcards.model}/model.json"] if spec[
        "source"
    ] == "pypi_gguf" else []


def gen_settings(study, model):
    """Every result-changing generation setting of a study, as JSON (a params value)."""
    s = study_cfg(study)
    keep = {k: v for k, v in s.items() if k not in ("models", "conditions", "kind", "baseline")}
    keep.setdefault("kernel_mode", "standard")
    return json.dumps({**keep, "study": study, "model": model}, sort_keys=True)


def gen_path(study, model, condition):
    return f"results/generations/{study}/{model}/{condition}.parquet"


def scored_paths(study, model):
    return [
        f"results/scored/{study}/{model}/{c}.parquet" for c in study_cfg(study)["conditions"]
    ]


def flips_paths(study):
    return [f"results/flips/{study}/{m}.parquet" for m in study_cfg(study)["models"]]


def all_scored_paths(study):
    return [p for m in study_cfg(study)["models"] for p in scored_paths(study, m)]


def battery_of(study):
    return f"results/battery/{study_cfg(study)['battery']}.parquet"


def repo_path(rel):
    """A file shipped with the workflow, wherever the working directory is."""
    return str(Path(workflow.basedir) / rel)


def battery_files(wildcards):
    from batchflip.battery import task_files

    return [str(p) for p in task_files(config["batteries"][wildcards.battery]["paths"])]


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
