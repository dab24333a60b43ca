# batchflip: every paper number, table and figure is a target file.
#   snakemake --cores all results/paper
# Architecture: DESIGN.md in the project's shared notes; usage: README.md.
import sys
from pathlib import Path


# which batchflip the Snakefile and the jobs use: this checkout's src/ or an installed wheel
include: "workflow/rules/package.smk"


import os  # noqa: E402

from batchflip.bundled import bundled_path  # noqa: E402
from batchflip.config import CPU_PROFILE_ENV, apply_cpu_profile, check_config  # noqa: E402
from batchflip.platform_facts import cpu_facts  # noqa: E402

# The default config applies only when none is given: `--configfile X` replaces it
# (Snakemake would otherwise deep-merge the two).
if not config:

    configfile: "config/config.yaml"


# On a CPU without native bf16 the studies take the settings of the config's
# cpu_profiles.no_native_bf16 (config/config.yaml: the default's dtype and sizes for such a
# CPU); BATCHFLIP_CPU_PROFILE pins the choice (a profile name, or none), e.g. for cluster
# nodes whose CPU differs from this machine's.
apply_cpu_profile(config, cpu_facts(with_torch=False), os.environ.get(CPU_PROFILE_ENV))
check_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")

# GPU jobs declare `gpu=1` (common.smk). On one machine at most as many run at once as it
# has GPUs: unless `--resources gpu=N` is given, the gpu resource is the number of devices
# visible here (CUDA_VISIBLE_DEVICES, else nvidia-smi). With none (a CPU machine) it stays
# unset, i.e. unconstrained, and GPU-less runs proceed as before. Cluster executors size
# each job's request instead (profiles/slurm). Each job leases its own device
# (batchflip.gpu_lease).
#
# A vLLM server launched on the CPU (no GPU here) takes about 1.6 cores whatever its
# `threads` (API server, engine core, streaming client): two side by side starve each other
# and every job beside them. Such jobs declare `vllm_cpu_server=1`, and on a machine
# without GPUs one runs at a time (unless `--resources vllm_cpu_server=N` says otherwise),
# while shorter jobs use the other core.
if workflow.local_exec and "gpu" not in workflow.global_resources:
    from batchflip.gpu_lease import visible_devices  # noqa: E402

    if _gpus := len(visible_devices()):
        workflow.register_resource("gpu", _gpus)
    elif "vllm_cpu_server" not in workflow.global_resources:
        workflow.register_resource("vllm_cpu_server", 1)


wildcard_constraints:
    study="|".join(config["studies"]),
    model=r"[^/]+",
    condition=r"[a-z0-9_]+",
    battery=r"[^/]+",


include: "workflow/rules/common.smk"
include: "workflow/rules/battery.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/restore.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/flips.smk"
include: "workflow/rules/divergence.smk"
# one rule file per study kind (batchflip.studies): <kind>_numbers, <kind>_figure, ...
include: "workflow/rules/study_discovery.smk"
include: "workflow/rules/study_models.smk"
include: "workflow/rules/study_composition.smk"
include: "workflow/rules/study_ablation.smk"
include: "workflow/rules/study_enriched.smk"
include: "workflow/rules/fidelity.smk"
include: "workflow/rules/repeat.smk"
include: "workflow/rules/adjudicate.smk"
include: "workflow/rules/paper.smk"


rule all:
    default_target: True
    input:
        "results/paper",
