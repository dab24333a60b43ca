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
