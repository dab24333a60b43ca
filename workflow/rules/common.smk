# Helpers shared by the rules: paths and params derived from the config.
import glob
import json
import os


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


# figures each kind of study contributes to the paper
FIGURES_BY_KIND = {
    "discovery": ["flip_rates", "identity"],
    "composition": ["composition"],
    "ablation": ["ablation"],
}


def studies_of(kind):
    """Regex of the configured studies of one kind (never matches when there are none)."""
    names = [s for s, v in config["studies"].items() if v["kind"] == kind]
    return "|".join(names) or "(?!x)x"


def paper_numbers(wildcards):
    studies = config["paper"]["studies"]
    adjudicated = [s for s in studies if study_cfg(s)["kind"] == "discovery"]
    return (
        [f"results/numbers/{s}.json" for s in studies]
        + [f"results/numbers/adjudication_{s}.json" for s in adjudicated]
        + ["results/numbers/fidelity.json"]
    )


def paper_figures(wildcards):
    return [
        f"results/figures/{s}_{n}.{ext}"
        for s in config["paper"]["studies"]
        for n in FIGURES_BY_KIND[study_cfg(s)["kind"]]
        for ext in ("png", "pdf")
    ]


def figure_captions():
    names = sorted({n for names in FIGURES_BY_KIND.values() for n in names})
    return [repo_path(f"workflow/report/{n}.rst") for n in names]


# --- adjudication (see workflow/rules/adjudicate.smk) ---
ADJ_DEFAULTS = {
    "raters": ["rater1", "rater2"],
    "seed": 0,
    "domains": ["safety"],
    "include_text_changes": False,
    "text_change_limit": None,
    "confidence": 0.95,
}


def adj_cfg(name):
    """One adjudication setting: config["adjudication"][name], else its default."""
    return (config.get("adjudication") or {}).get(name, ADJ_DEFAULTS[name])


def adj_sheets(study):
    return [f"results/adjudication/{study}/sheet_{r}.csv" for r in adj_cfg("raters")]


def adj_pinned_key(study):
    return f"resources/adjudication/{study}/key.parquet"


def adj_key(wildcards):
    """The pinned key when there is one, else the key the export rule writes."""
    pinned = adj_pinned_key(wildcards.study)
    if os.path.exists(pinned):
        return pinned
    return f"results/adjudication/{wildcards.study}/key.parquet"


def adj_exported(wildcards):
    """The blank sheets (named in the pending status) when the key is not pinned."""
    if os.path.exists(adj_pinned_key(wildcards.study)):
        return []
    return adj_sheets(wildcards.study)


def adj_rating_files(wildcards):
    """Filled sheets present now (sorted): resources/adjudication/{study}/*.csv."""
    return sorted(glob.glob(f"resources/adjudication/{wildcards.study}/*.csv"))


def adj_export_flags():
    flags = ["--include-text-changes"] if adj_cfg("include_text_changes") else []
    if adj_cfg("text_change_limit") is not None:
        flags += ["--text-change-limit", str(int(adj_cfg("text_change_limit")))]
    return " ".join(flags)
