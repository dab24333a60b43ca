# Which batchflip the Snakefile and every job import (included first by the Snakefile).
import importlib.metadata
import importlib.util
import json
import shlex


def installed_batchflip():
    """Where Python imports batchflip from when that is an installed, non-editable copy
    (a wheel in site-packages); None when it is not installed, is an editable install, or
    PYTHONPATH points at a source tree."""
    spec = importlib.util.find_spec("batchflip")
    try:
        dist = importlib.metadata.distribution("batchflip")
    except importlib.metadata.PackageNotFoundError:
        return None
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if spec is None or spec.origin is None or direct.get("dir_info", {}).get("editable"):
        return None
    init = Path(dist.locate_file("batchflip/__init__.py")).resolve()
    return init.parent if Path(spec.origin).resolve() == init else None


# Rules run `python -m batchflip ...` in whatever environment a rule gets (the current one,
# or a conda env from envs/ with --sdm conda). The code is this checkout's src/, put first
# on every job's PYTHONPATH, unless batchflip is installed from a wheel: then the jobs and
# this Snakefile use that installed package (README: Installing from a wheel).
if (INSTALLED := installed_batchflip()) is not None:
    print(f"batchflip: using the installed package {INSTALLED}", file=sys.stderr)
else:
    SRC = str(Path(workflow.basedir) / "src")
    sys.path.insert(0, SRC)
    # the checkout's path shell-quoted (a folder name may hold $ or quotes), its braces
    # doubled for Snakemake's formatting of the prefix
    _SRC_Q = shlex.quote(SRC).replace("{", "{{").replace("}", "}}")
    shell.prefix(f'export PYTHONPATH={_SRC_Q}"${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; ')
