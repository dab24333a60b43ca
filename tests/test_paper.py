"""The paper bundle (batchflip.paper): numbers.json, numbers.tex, figures and MANIFEST.tsv.

Oracles: the bundle's numbers.json is the union of the input files' records (json), each
number has one LaTeX macro, figures are copied byte for byte, and MANIFEST.tsv's hashes
and sizes are recomputed here with hashlib. (report.html: tests/test_report.py.)
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from batchflip.cli import main as cli_main
from batchflip.errors import BatchflipError
from batchflip.paper import build_bundle, macro_name

BUILT = datetime(2024, 1, 1, tzinfo=UTC)
A = {"a/all/sync_b8/safety_flip_rate": {"value": 0.25, "k": 1, "n": 4, "ci_low": 0.05,
                                        "ci_high": 0.7, "definition": "d", "inputs": [],
                                        "stack_ids": []},
     "a/all/sync_b8/ratio": {"value": None, "note": "not estimable: x", "definition": "d",
                             "inputs": [], "stack_ids": []}}
C = {"c/all/mh_p": {"value": 0.0123456, "definition": "d", "inputs": [], "stack_ids": []}}


@pytest.fixture
def inputs(tmp_path):
    files = []
    for study, recs in (("a", A), ("c", C)):
        f = tmp_path / "numbers" / f"{study}.json"
        f.parent.mkdir(exist_ok=True)
        f.write_text(json.dumps({"study": study, "numbers": recs}))
        files.append(str(f))
    fig = tmp_path / "figures" / "a_flip_rates.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return files, [str(fig)]


def test_bundle_merges_numbers_writes_macros_figures_and_manifest(tmp_path, inputs):
    files, figs = inputs
    out = tmp_path / "paper"
    build_bundle(files, figs, {"a_flip_rates": "caption"}, out, built=BUILT,
                 kinds={"a": "discovery", "c": "composition"})
    bundle = json.loads((out / "numbers.json").read_text())
    # this run's numbers and the fidelity values sit in separate sections
    assert set(bundle) == {"reproduced", "recomputed_from_published"}
    assert bundle["recomputed_from_published"] == {}
    merged = bundle["reproduced"]
    assert merged == {**A, **C}
    assert list(merged) == sorted(merged)
    tex = (out / "numbers.tex").read_text()
    macros = [ln for ln in tex.splitlines() if ln.startswith("\\newcommand")]
    assert len(macros) == 3
    assert "\\newcommand{\\bfAAllSyncBEightSafetyFlipRate}{25.00\\%}" in tex
    assert "\\newcommand{\\bfAAllSyncBEightRatio}{n/a}" in tex
    assert "\\newcommand{\\bfCAllMhP}{0.0123}" in tex
    assert (out / "figures" / "a_flip_rates.png").read_bytes() == open(figs[0], "rb").read()
    lines = (out / "MANIFEST.tsv").read_text().splitlines()
    assert lines[0] == "path\tsha256\tsize"
    listed = {}
    for line in lines[1:]:
        path, digest, size = line.split("\t")
        listed[path] = (digest, int(size))
    assert set(listed) == {"figures/a_flip_rates.png", "numbers.json", "numbers.tex",
                           "report.html"}
    for path, (digest, size) in listed.items():
        data = (out / path).read_bytes()
        assert digest == hashlib.sha256(data).hexdigest() and size == len(data)


def test_bundle_is_reproducible_and_replaces_an_old_one(tmp_path, inputs):
    files, figs = inputs
    out = tmp_path / "paper"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_bundle(files, figs, {}, out, built=BUILT, kinds={"a": "discovery"})
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "stale.txt" not in first
    build_bundle(files, figs, {}, out, built=BUILT, kinds={"a": "discovery"})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first


def test_macro_names_are_letters_only_and_collisions_fail(tmp_path):
    assert macro_name("a_vllm/all/sync_b32/ratio") == "bfAVllmAllSyncBThreeTwoRatio"
    clash = tmp_path / "x.json"
    clash.write_text(json.dumps({"numbers": {"a/b_c": {"value": 1}, "a/b/c": {"value": 2}}}))
    with pytest.raises(BatchflipError, match="share macro"):
        build_bundle([str(clash)], [], {}, tmp_path / "paper", built=BUILT, kinds={})
    assert not (tmp_path / "paper").exists()  # nothing half-written


def test_cli_builds_the_bundle(tmp_path, inputs):
    files, figs = inputs
    out = tmp_path / "paper"
    assert cli_main(["paper", "--numbers", *files, "--figures", *figs,
                     "--kinds", json.dumps({"a": "discovery", "c": "composition"}),
                     "--out", str(out)]) == 0
    assert json.loads((out / "numbers.json").read_text())["reproduced"] == {**A, **C}
