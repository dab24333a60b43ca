"""Tests of `batchflip fidelity`: every published value of PAPER.md that has an independent
oracle is reproduced, and no match is claimed where the oracle is circular."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import SHARED

from batchflip import cli, fidelity
from batchflip.errors import BatchflipError

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "src" / "batchflip" / "data" / "fidelity" / "published.yaml"
PAPER_MD = SHARED.parent / "PAPER.md"

# The values as PAPER.md prints them (typed here from the paper, not from the code), for the
# entries whose inputs are all published (or derived without the printed value).
PAPER_VALUES = {
    "studyA_enriched_safety_flip_rate_pct": "1.68",
    "studyA_enriched_capability_flip_rate_pct": "0.42",
    "studyA_adjudicated_genuine_pct": "27",
    "studyB_safety_capability_ratio": "0.94",
    "studyB_alignment_anova_F": "0.127",
    "studyB_alignment_anova_p": "0.942",
    "studyB_alignment_anova_eta2": "0.033",
    "studyC_mde_pp": "4.7",
    "studyC_direction_to_unsafe_total": "28",
    "studyC_direction_flips_total": "31",
    "studyC_direction_wilson_low_pct": "75.1",
    "studyC_direction_wilson_high_pct": "96.7",
    "studyD_label_mcnemar_p": "4.77e-7",
    "studyD_text_mcnemar_p": "5.96e-8",
}
# Circular by PAPER.md's own words: 36/7,020 and 10/7,275 are "counts inferred" from the
# printed rates; the corrected rate's "about 0.6%" is 0.16% / (17/63) back-solved; 4.66 pp and
# Study D's Wilson intervals are not printed anywhere in PAPER.md (computed from the inputs).
CIRCULAR = {
    "studyA_safety_flip_rate_pct", "studyA_capability_flip_rate_pct",
    "studyA_corrected_flip_rate_pct", "studyC_mde_pp_2dp",
    "studyD_standard_label_flip_wilson_low_pct", "studyD_standard_label_flip_wilson_high_pct",
    "studyD_invariant_label_flip_wilson_low_pct", "studyD_invariant_label_flip_wilson_high_pct",
}
UNPRINTED = {"studyA_adjudicated_genuine_wilson_low_pct",
             "studyA_adjudicated_genuine_wilson_high_pct",
             "studyA_adjudicated_genuine_cp_low_pct", "studyA_adjudicated_genuine_cp_high_pct"}


@pytest.fixture(scope="module")
def doc() -> dict:
    return fidelity.compute_fidelity(fidelity.load_published(PUBLISHED), source=str(PUBLISHED))


def test_every_independent_published_value_reproduced(doc):
    numbers = doc["numbers"]
    assert {k for k, r in numbers.items() if r["oracle"] == "independent"} == set(PAPER_VALUES)
    for ident, printed in PAPER_VALUES.items():
        rec = numbers[ident]
        assert rec["printed"] == printed, ident
        assert rec["published"] == float(printed), ident
        assert rec["match"] is True, (ident, rec["formatted"], printed)
    assert doc["summary"]["all_match"] is True
    assert doc["summary"]["mismatched"] == []
    assert doc["summary"]["checked"] == doc["summary"]["matched"] == len(PAPER_VALUES)


def test_circular_entries_claim_no_match(doc):
    numbers = doc["numbers"]
    assert set(doc["summary"]["circular"]) == CIRCULAR
    assert set(doc["summary"]["unprinted"]) == UNPRINTED
    for ident in CIRCULAR:
        rec = numbers[ident]
        assert rec["oracle"] == "circular" and rec["match"] is None, ident
        assert "no match is claimed" in rec["oracle_note"], ident
    for ident in ("studyA_safety_flip_rate_pct", "studyA_corrected_flip_rate_pct"):
        assert "derived from the printed value" in numbers[ident]["oracle_note"]
        assert numbers[ident]["published"] == float(numbers[ident]["printed"])
    # a derived comparison value is no published value
    assert numbers["studyD_standard_label_flip_wilson_low_pct"]["published"] is None
    assert numbers["studyC_mde_pp_2dp"]["published"] is None
    # a circular entry stays null even when its recomputation disagrees with the printed value
    data = yaml.safe_load(PUBLISHED.read_text())
    for entry in data["numbers"]:
        if entry["id"] == "studyA_safety_flip_rate_pct":
            entry["printed"]["value"] = "0.99"
    rec = fidelity.compute_fidelity(data)["numbers"]["studyA_safety_flip_rate_pct"]
    assert rec["match"] is None and rec["formatted"] == "0.51"


def test_provenance_recorded_per_input(doc):
    prov = doc["numbers"]["studyA_safety_flip_rate_pct"]["provenance"]
    assert prov["inputs"]["k"]["mark"] == "derived" and prov["inputs"]["k"]["uses_printed"]
    assert prov["inputs"]["n"]["mark"] == "derived" and not prov["inputs"]["n"]["uses_printed"]
    assert prov["printed"]["mark"] == "published"
    mc = doc["numbers"]["studyD_label_mcnemar_p"]
    assert mc["oracle"] == "independent" and "derived without it (b, c" in mc["oracle_note"]
    assert any(s.startswith("k=36 [derived, from the printed value]")
               for s in doc["numbers"]["studyA_safety_flip_rate_pct"]["inputs"])


@pytest.mark.skipif(not PAPER_MD.is_file(), reason="../shared/PAPER.md is absent")
def test_every_published_mark_quotes_paper_md():
    """Each `published` mark quotes PAPER.md ('...'); the quote must be in PAPER.md and hold
    the value it vouches for, so a mark cannot call a derived number published."""
    paper = " ".join(PAPER_MD.read_text().split()).lower()
    data = yaml.safe_load(PUBLISHED.read_text())
    seen = 0
    for entry in data["numbers"]:
        items = [*entry["inputs"].items(), ("printed", entry.get("printed"))]
        for field, item in items:
            if not item or "published" not in item:
                continue
            quotes = re.findall(r"'([^']+)'", item["published"])
            assert quotes, (entry["id"], field)
            for q in quotes:
                assert " ".join(q.split()).lower() in paper, (entry["id"], field, q)
            value = item["value"]
            if isinstance(value, str) and value in data["tables"]:
                continue
            shown = {str(value), f"{value:,}" if isinstance(value, int) else str(value)}
            if isinstance(value, float):
                shown.add(f"{value:.2f}")
            assert any(v in " ".join(quotes) for v in shown), (entry["id"], field, value)
            seen += 1
    assert seen >= 40


@pytest.mark.skipif(not PAPER_MD.is_file(), reason="../shared/PAPER.md is absent")
def test_study_b_table_is_paper_md_table():
    text = " ".join(PAPER_MD.read_text().split())
    listing = text.split("Per-model safety flip rate (%) and alignment type:")[1]
    listing = listing.split("##")[0]
    parsed = re.findall(r"([\w.\-]+) (\d+\.\d+) (RLHF|SFT|DPO|Distilled)", listing)
    rows = yaml.safe_load(PUBLISHED.read_text())["tables"]["study_b_models"]
    assert [(r["model"], r["safety_flip_rate_pct"], r["alignment"]) for r in rows] == [
        (m, float(v), a) for m, v, a in parsed]


def test_recomputed_values_are_on_the_printed_scale(doc):
    n = doc["numbers"]
    assert n["studyD_label_mcnemar_p"]["value"] == pytest.approx(2 * 0.5**22, rel=1e-12)
    assert n["studyD_text_mcnemar_p"]["value"] == pytest.approx(2 * 0.5**25, rel=1e-12)
    assert n["studyC_mde_pp"]["value"] == pytest.approx(
        100 * 2.802 * (2 * 0.737 * 0.263 / 1404) ** 0.5
    )
    assert n["studyA_adjudicated_genuine_pct"]["value"] == pytest.approx(100 * 17 / 63)
    assert n["studyD_invariant_label_flip_wilson_low_pct"]["value"] == 0.0


def test_unpublished_intervals_recorded_without_match(doc):
    n = doc["numbers"]
    wl = n["studyA_adjudicated_genuine_wilson_low_pct"]
    wh = n["studyA_adjudicated_genuine_wilson_high_pct"]
    cl = n["studyA_adjudicated_genuine_cp_low_pct"]
    ch = n["studyA_adjudicated_genuine_cp_high_pct"]
    for rec in (wl, wh, cl, ch):
        assert rec["published"] is None and rec["match"] is None and rec["oracle"] == "none"
    assert cl["value"] < wl["value"] < 100 * 17 / 63 < wh["value"] < ch["value"]


def test_record_fields(doc):
    for ident, rec in doc["numbers"].items():
        assert rec["id"] == ident
        assert isinstance(rec["value"], float)
        assert rec["definition"] and isinstance(rec["definition"], str)
        assert isinstance(rec["inputs"], list) and rec["inputs"]
        assert "published" in rec and "match" in rec and "precision" in rec
    anova = doc["numbers"]["studyB_alignment_anova_F"]
    assert any("study_b_models (15 rows)" in s for s in anova["inputs"])


def test_published_table_is_the_paper_table():
    data = yaml.safe_load(PUBLISHED.read_text())
    rows = data["tables"]["study_b_models"]
    assert len(rows) == 15
    by_type: dict[str, int] = {}
    for r in rows:
        by_type[r["alignment"]] = by_type.get(r["alignment"], 0) + 1
    assert by_type == {"RLHF": 4, "SFT": 4, "DPO": 4, "Distilled": 3}
    cond = data["tables"]["study_c_significant_conditions"]
    assert [(c["to_unsafe"], c["flips"]) for c in cond] == [(8, 9), (9, 10), (11, 12)]


@pytest.mark.parametrize(
    ("printed", "expected"),
    [
        ("0.127", ("decimals", 3)),
        ("27", ("decimals", 0)),
        ("4.7", ("decimals", 1)),
        ("4.77e-7", ("significant", 3)),
        ("5e-8", ("significant", 1)),
    ],
)
def test_parse_printed(printed, expected):
    assert fidelity.parse_printed(printed) == expected


def test_format_at():
    assert fidelity.format_at(4.76837158203125e-07, ("significant", 3)) == "4.77e-07"
    assert fidelity.format_at(-1e-9, ("decimals", 1)) == "0.0"
    assert fidelity.format_at(0.0334, ("decimals", 3)) == "0.033"
    assert fidelity.format_at(0.0336, ("decimals", 3)) == "0.034"
    with pytest.raises(BatchflipError):
        fidelity.parse_printed("n/a")


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "numbers" / "fidelity.json"
    rc = cli.main(["fidelity", "--published", str(PUBLISHED), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"numbers", "not_reproducible", "summary"}
    assert data["numbers"]["studyB_alignment_anova_F"]["match"] is True
    assert "reproduced" in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary


def test_sources_do_not_depend_on_where_the_checkout_is(tmp_path, monkeypatch):
    """The workflow passes an absolute path; the numbers name it relative to the run dir, so
    two checkouts in different places give byte-identical numbers."""
    texts = []
    for where in ("one", "two"):
        root = tmp_path / where
        (root / "resources").mkdir(parents=True)
        src = root / "resources" / "published.yaml"
        src.write_bytes(PUBLISHED.read_bytes())
        monkeypatch.chdir(root)
        assert cli.main(["fidelity", "--published", str(src.resolve()), "--out",
                         "fidelity.json"]) == 0
        texts.append((root / "fidelity.json").read_text())
    assert texts[0] == texts[1] and str(tmp_path) not in texts[0]
    assert json.loads(texts[0])["summary"]["source"] == "resources/published.yaml"
    # the bundled table, named inside the package wherever the run directory is (also the
    # checkout's root, which contains it) and whether it is given or the default
    for where, given in ((tmp_path, True), (ROOT, True), (tmp_path, False)):
        monkeypatch.chdir(where)
        out = tmp_path / "f.json"
        args = ["--published", str(PUBLISHED.resolve())] if given else []
        assert cli.main(["fidelity", *args, "--out", str(out)]) == 0
        source = json.loads(out.read_text())["summary"]["source"]
        assert source == "batchflip/data/fidelity/published.yaml"


def test_mismatch_is_reported_and_strict_fails(tmp_path, capsys):
    data = yaml.safe_load(PUBLISHED.read_text())
    for entry in data["numbers"]:
        if entry["id"] == "studyB_alignment_anova_F":
            entry["printed"]["value"] = "0.130"
    src = _write_yaml(tmp_path / "published.yaml", data)
    out = tmp_path / "f.json"
    assert cli.main(["fidelity", "--published", str(src), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["numbers"]["studyB_alignment_anova_F"]["match"] is False
    assert doc["summary"]["mismatched"] == ["studyB_alignment_anova_F"]
    assert "MISMATCH studyB_alignment_anova_F" in capsys.readouterr().err
    out.unlink()
    rc = cli.main(["fidelity", "--published", str(src), "--out", str(out), "--strict"])
    assert rc == 1 and out.exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["numbers"][0].update(recipe="nope"), "unknown recipe"),
        (lambda d: d["numbers"][0]["inputs"]["k"].update(value=99999), "k must not exceed n"),
        (lambda d: d["numbers"][0]["inputs"].update(k=36),
         "row studyA_safety_flip_rate_pct, field 'inputs.k'"),
        (lambda d: d["numbers"][2]["inputs"]["n"].pop("published"),
         "row studyA_enriched_safety_flip_rate_pct, field 'inputs.n'"),
        (lambda d: d["numbers"][2]["inputs"]["n"].update(derived="1,605"), "exactly one"),
        (lambda d: d["numbers"][0]["inputs"]["k"].pop("uses_printed"), "uses_printed"),
        (lambda d: d["numbers"][2].update(printed="1.68"), "field 'printed'"),
        (lambda d: d["numbers"][2]["printed"].update(published=" "), "must say where"),
        (lambda d: d["numbers"][0].pop("definition"), "definition"),
        (lambda d: d["numbers"].append(dict(d["numbers"][0])), "duplicate id"),
        (lambda d: d["numbers"][0].update(output="missing"), "recipe gives"),
    ],
)
def test_invalid_published_file(tmp_path, capsys, mutate, message):
    data = yaml.safe_load(PUBLISHED.read_text())
    mutate(data)
    src = _write_yaml(tmp_path / "published.yaml", data)
    out = tmp_path / "f.json"
    assert cli.main(["fidelity", "--published", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "published.yaml" in err
    assert not out.exists()


def test_missing_file(tmp_path, capsys):
    rc = cli.main(["fidelity", "--published", str(tmp_path / "x.yaml"), "--out", "o.json"])
    assert rc == 1 and "file not found" in capsys.readouterr().err


def test_independent_values_equal_scipy_and_statsmodels(doc):
    """Each independent entry's recomputed value (printed scale) against a library or hand
    oracle at full precision, then at the printed precision against the paper."""
    import math

    from scipy import stats as sps
    from statsmodels.stats.proportion import proportion_confint

    table = yaml.safe_load(PUBLISHED.read_text())["tables"]["study_b_models"]
    by = {}
    for r in table:
        by.setdefault(r["alignment"], []).append(r["safety_flip_rate_pct"])
    anova = sps.f_oneway(*by.values())
    rates = [r["safety_flip_rate_pct"] for r in table]
    grand = sum(rates) / len(rates)
    ss_b = sum(len(v) * (sum(v) / len(v) - grand) ** 2 for v in by.values())
    ss_t = sum((x - grand) ** 2 for x in rates)
    lo, hi = proportion_confint(28, 31, alpha=0.05, method="wilson")
    oracles = {
        "studyA_enriched_safety_flip_rate_pct": 100 * 27 / 1605,
        "studyA_enriched_capability_flip_rate_pct": 100 * 5 / 1200,
        "studyA_adjudicated_genuine_pct": 100 * 17 / 63,
        "studyB_safety_capability_ratio": 0.75 / 0.80,
        "studyB_alignment_anova_F": anova.statistic,
        "studyB_alignment_anova_p": anova.pvalue,
        "studyB_alignment_anova_eta2": ss_b / ss_t,
        "studyC_mde_pp": 100 * (1.96 + 0.842) * math.sqrt(2 * 0.737 * 0.263 / 1404),
        "studyC_direction_to_unsafe_total": 8 + 9 + 11,
        "studyC_direction_flips_total": 9 + 10 + 12,
        "studyC_direction_wilson_low_pct": 100 * lo,
        "studyC_direction_wilson_high_pct": 100 * hi,
        "studyD_label_mcnemar_p": sps.binomtest(0, 22, 0.5).pvalue,
        "studyD_text_mcnemar_p": sps.binomtest(0, 25, 0.5).pvalue,
    }
    assert set(oracles) == set(PAPER_VALUES)
    for ident, want in oracles.items():
        rec = doc["numbers"][ident]
        assert rec["value"] == pytest.approx(want, rel=1e-9), ident
        assert rec["printed"] == PAPER_VALUES[ident] and rec["match"] is True, ident


def _one_unit_off(printed: str) -> str:
    """The printed string moved by one unit in its last printed digit."""
    kind, digits = fidelity.parse_printed(printed)
    value = float(printed)
    if kind == "decimals":
        return f"{value + 10 ** -digits:.{digits}f}"
    exp = math.floor(math.log10(abs(value)))
    return f"{value + 10 ** (exp - digits + 1):.{digits - 1}e}".replace("e-0", "e-")


def test_no_entry_passes_by_rounding():
    """Every independent entry compares at the printed precision and no coarser: the printed
    value one unit off in its last digit is a mismatch."""
    data = yaml.safe_load(PUBLISHED.read_text())
    for entry in data["numbers"]:
        if entry["id"] not in PAPER_VALUES:
            continue
        off = _one_unit_off(str(entry["printed"]["value"]))
        mutated = {**data, "numbers": [{**entry, "printed": {**entry["printed"], "value": off}}]}
        rec = fidelity.compute_fidelity(mutated)["numbers"][entry["id"]]
        assert rec["match"] is False, (entry["id"], off, rec["formatted"])


def test_unreproducible_values_are_marked_never_compared(doc):
    marked = doc["not_reproducible"]
    assert set(marked) == {"studyC_tost_interval_pp", "studyC_mde_p_rule"}
    assert doc["summary"]["not_reproducible"] == sorted(marked)
    for rec in marked.values():
        assert rec["oracle"] == "not reproducible from printed inputs"
        assert rec["match"] is None and rec["reason"] and rec["reported"]
        assert rec["id"] not in doc["numbers"]
    assert "-0.158" in marked["studyC_tost_interval_pp"]["printed"]
    bad = yaml.safe_load(PUBLISHED.read_text())
    del bad["not_reproducible"][0]["reason"]
    with pytest.raises(BatchflipError, match="lacks 'reason'"):
        fidelity.compute_fidelity(bad)
