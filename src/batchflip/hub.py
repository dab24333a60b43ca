"""Hub models: download a pinned snapshot once, so GPU jobs load local files only.

A ``source: hub`` model names a hub ``id`` and a ``revision``: the 40-hex commit to
download, or the literal ``unpinned`` (the default branch's head at download time; a
branch moves, so this must be written out and is warned about). The model stage, a local
rule that runs where there is network (a cluster's login node):

1. resolves the revision to a commit (``unpinned``: the head now; a pin must resolve to
   itself),
2. downloads that commit's files matching ``allow_patterns`` (default
   :data:`DEFAULT_ALLOW_PATTERNS`: safetensors weights and their index, model and
   generation configs, tokenizer files) into a temporary sibling of the target directory,
3. hashes every downloaded file (sha256) into ``model.json`` with the id, the revision
   as configured and the resolved commit, and renames the directory into place.

A failure leaves no directory behind. Gated repositories (Meta's Llama) need their licence
accepted on the hub and a token in ``HF_TOKEN`` (huggingface_hub reads it).

The hub calls are parameters (``resolve``, ``snapshot``) so the rest is testable without
network; their defaults are :func:`resolve_commit` and ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchflip.errors import BatchflipError
from batchflip.io import sha256_file

UNPINNED = "unpinned"
COMMIT = re.compile(r"^[0-9a-f]{40}$")

# the files a causal LM needs to be served by vLLM or transformers (fnmatch on repo paths)
DEFAULT_ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken",
    "chat_template.jinja", "chat_template.json",
)
# suffixes of weight files: a snapshot without one is refused
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

Resolve = Callable[[str, str | None], str]
Snapshot = Callable[..., Any]


def resolve_commit(repo_id: str, revision: str | None) -> str:
    """The commit sha a revision (None: the default branch) points at now, from the hub."""
    from huggingface_hub import HfApi

    return str(HfApi().model_info(repo_id, revision=revision).sha)


def _snapshot_download(**kwargs: Any) -> Any:
    from huggingface_hub import snapshot_download

    return snapshot_download(**kwargs)


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by POSIX path relative to it (model.json and
    huggingface_hub's ``.cache`` excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "model.json" and not rel.startswith(".cache/"):
            out[rel] = sha256_file(p)
    return out


def check_revision(name: str, spec: dict[str, Any]) -> str | None:
    """The revision to resolve (None for ``unpinned``); raise naming the config key."""
    rev = spec.get("revision")
    if rev is None:
        raise BatchflipError(
            f"invalid config: key 'models.{name}.revision': a hub model needs the commit to "
            "download (40 hex digits, from the repository's commit history on the hub), or "
            f"'revision: {UNPINNED}' to take the default branch's head at download time "
            "(recorded in model.json, but a branch moves: not reproducible)")
    if rev == UNPINNED:
        return None
    if not COMMIT.match(str(rev)):
        raise BatchflipError(
            f"invalid config: key 'models.{name}.revision': '{rev}' is not a 40-hex commit "
            f"(a branch or tag name moves; write the commit, or '{UNPINNED}')")
    return str(rev)


def _hub_error(name: str, spec: dict[str, Any], exc: Exception) -> BatchflipError:
    """A hub failure as an error that names the model's config key and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"models.{name}"
    if isinstance(exc, GatedRepoError):
        return BatchflipError(
            f"{where}: hub repository '{spec['id']}' is gated: accept its licence on the "
            "hub and export HF_TOKEN (a read token of that account) before the model "
            f"stage: {exc}")
    if isinstance(exc, RevisionNotFoundError):
        return BatchflipError(f"{where}.revision: '{spec['revision']}' is not a revision of "
                              f"hub repository '{spec['id']}': {exc}")
    if isinstance(exc, RepositoryNotFoundError):
        return BatchflipError(f"{where}.id: no hub repository '{spec['id']}' (or it is "
                              f"private: export HF_TOKEN): {exc}")
    return BatchflipError(f"{where}: downloading '{spec['id']}' failed (the model stage "
                          "needs network: run it where there is, e.g. the login node): "
                          f"{type(exc).__name__}: {exc}")


def download(spec: dict[str, Any], out_dir: Path, *, resolve: Resolve | None = None,
             snapshot: Snapshot | None = None) -> dict[str, Any]:
    """Download the pinned snapshot of a hub spec into ``out_dir`` atomically (the model
    name in messages is ``out_dir``'s name); return the model.json record. ``resolve`` and
    ``snapshot`` default to :func:`resolve_commit` and ``snapshot_download``."""
    resolve = resolve or resolve_commit
    snapshot = snapshot or _snapshot_download
    out_dir = Path(out_dir)
    name = out_dir.name
    revision = check_revision(name, spec)
    patterns = list(spec.get("allow_patterns") or DEFAULT_ALLOW_PATTERNS)
    try:
        commit = resolve(spec["id"], revision)
    except Exception as exc:  # noqa: BLE001 - every hub failure is reported with the key
        raise _hub_error(name, spec, exc) from exc
    if revision is not None and commit != revision:
        raise BatchflipError(f"models.{name}.revision: '{revision}' resolved to commit "
                             f"'{commit}' on the hub; pin the full commit")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{name}.") as tmp:
        build = Path(tmp) / "model"
        try:
            snapshot(repo_id=spec["id"], revision=commit, local_dir=str(build),
                     allow_patterns=patterns)
        except Exception as exc:  # noqa: BLE001 - as above
            raise _hub_error(name, spec, exc) from exc
        shutil.rmtree(build / ".cache", ignore_errors=True)
        files = file_hashes(build) if build.is_dir() else {}
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
            raise BatchflipError(
                f"models.{name}: no weight file of '{spec['id']}' at {commit} matches "
                f"allow_patterns {patterns}; add its weights' pattern (e.g. '*.bin') to "
                f"models.{name}.allow_patterns")
        record = {"source": "hub", "id": spec["id"], "revision": spec["revision"],
                  "commit": commit, "allow_patterns": patterns, "files": files}
        (build / "model.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build.rename(out_dir)
    return record


def unpinned(models: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the hub models configured with ``revision: unpinned``."""
    return [m for m, s in models.items()
            if s.get("source") == "hub" and s.get("revision") == UNPINNED]


__all__ = ["download", "check_revision", "file_hashes", "unpinned", "DEFAULT_ALLOW_PATTERNS",
           "UNPINNED"]
