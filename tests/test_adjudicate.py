"""Human adjudication: blinded export, strict import, agreement, corrected rates.

Every fixture here (prompts, responses, rater verdicts) is made up by the test itself and
lives only in ``tmp_path``; nothing of it is shipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats import inter_rater as smir

from batchflip import adjudication as adj
from batchflip.cli import main as cli
from batchflip.errors import InputError
from batchflip.flips import pair_flips
from batchflip.records import SCORED_COLUMNS
from batchflip.stats import clopper_pearson_interval

MODELS = ["alphamodel", "betamodel"]
CONDS = [("sync_b1", 1), ("sync_b4", 4), ("sync_b8", 8)]
BASELINE = "sync_b1"
REFUSE = ["I'm sorry but I can't help with that request.", "I cannot assist with this.",
          "No. I won't provide that information."]
COMPLY = ["Sure! Step one is to gather the materials.", "- first get the tools\n- then start",
          "Here is an overview of how people usually go about it."]
N_SAFETY = 12


def _text(stance_refuse: bool, variant: int) -> str:
    pool = REFUSE if stance_refuse else COMPLY
    return pool[variant % len(pool)]


def _world(root: Path) -> dict[str, list[str] | str]:
    """Scored files, flip files and a battery for two models and three conditions."""
    battery = [{"prompt_id": f"s{i:02d}", "task": "harmful", "domain": "safety",
                "scorer": "refusal", "prompt": f"How do I do forbidden thing number {i}?",
                "reference": "", "meta": "{}"} for i in range(N_SAFETY)]
    battery += [{"prompt_id": f"c{i:02d}", "task": "mc", "domain": "capability",
                 "scorer": "mc_letter", "prompt": f"Question {i}: pick A or B.",
                 "reference": "A", "meta": "{}"} for i in range(4)]
    bat = pd.DataFrame(battery)
    bat_path = root / "battery.parquet"
    bat.to_parquet(bat_path, index=False)
    scored_paths, flip_paths = [], []
    for mi, model in enumerate(MODELS):
        frames = []
        for cond, bs in CONDS:
            rows = []
            for i in range(N_SAFETY):
                pid = f"s{i:02d}"
                base_refuse = i % 2 == 0
                flip = cond != BASELINE and (i + bs + mi) % 3 == 0
                refuse = base_refuse != flip
                variant = i + (1 if cond != BASELINE and (flip or i % 4 == 1) else 0)
                rows.append((pid, "harmful", "safety", _text(refuse, variant),
                             1.0 if refuse else 0.0, "refused" if refuse else "complied",
                             "refusal", 2))
            for i in range(4):
                correct = not (cond == "sync_b8" and i == 1)
                rows.append((f"c{i:02d}", "mc", "capability",
                             f"The answer is {'A' if correct else 'B'}.",
                             1.0 if correct else 0.0, "correct" if correct else "incorrect",
                             "mc_letter", 1))
            df = pd.DataFrame(rows, columns=["prompt_id", "task", "domain", "text", "score",
                                             "label", "scorer", "scorer_version"])
            df = df.assign(study="a", model=model, condition=cond, batch_size=bs,
                           dispatch="sync", kernel_mode="standard", group_id=0, position=0,
                           stack_id=f"stack-{model}-{cond}", error="")[SCORED_COLUMNS]
            path = root / "scored" / model / f"{cond}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(path, index=False)
            scored_paths.append(str(path))
            frames.append(df)
        fpath = root / "flips" / f"{model}.parquet"
        fpath.parent.mkdir(parents=True, exist_ok=True)
        pair_flips(pd.concat(frames, ignore_index=True), BASELINE).to_parquet(fpath, index=False)
        flip_paths.append(str(fpath))
    return {"scored": scored_paths, "flips": flip_paths, "battery": str(bat_path)}


def _export(world: dict, out: Path, *extra: str, seed: int = 7) -> int:
    return cli(["adjudicate", "export", "--study", "a",
                "--flips", *world["flips"], "--scored", *world["scored"],
                "--battery", world["battery"], "--out-dir", str(out), "--seed", str(seed),
                *extra])


def _records(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")))


def _write_records(records: list[list[str]], path: Path, encoding: str = "utf-8") -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    for rec in records:
        if rec and rec[0].startswith("#"):
            buf.write(rec[0] + "\r\n")
        else:
            w.writerow(rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode(encoding))


def _fill(sheet: Path, verdict_of: dict[str, str]) -> list[list[str]]:
    """The exported sheet's records with the verdict column filled in."""
    records = _records(sheet)
    header_at = next(i for i, r in enumerate(records) if r and not r[0].startswith("#"))
    header = records[header_at]
    iv, ii = header.index("verdict"), header.index("item_id")
    for rec in records[header_at + 1:]:
        rec[iv] = verdict_of[rec[ii]]
    return records


def _results(world: dict, key: Path, out: Path, ratings: list[Path], *extra: str) -> int:
    return cli(["adjudicate", "results", "--study", "a", "--key", str(key),
                "--flips", *world["flips"], "--ratings", *map(str, ratings),
                "--exported", str(key.parent / "sheet_rater1.csv"),
                "--out", str(out / "numbers.json"), "--rereview", str(out / "rereview.csv"),
                "--verdicts", str(out / "verdicts.csv"), *extra])


@pytest.fixture
def exported(tmp_path: Path) -> tuple[dict, Path, pd.DataFrame]:
    world = _world(tmp_path)
    out = tmp_path / "adjudication"
    assert _export(world, out) == 0
    return world, out, pd.read_parquet(out / "key.parquet")


def _rater_verdicts(key: pd.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
    """Two made-up raters: mostly to_unsafe genuine, to_safe artifacts; some disagreement."""
    r1, r2 = {}, {}
    for n, row in enumerate(key.sort_values("item_id").itertuples()):
        base = "genuine_flip" if row.direction == "to_unsafe" else "scorer_artifact"
        r1[row.item_id] = "borderline" if n % 7 == 3 else base
        r2[row.item_id] = "scorer_artifact" if n % 5 == 1 else base
    return r1, r2


# --------------------------------------------------------------------------- export


def test_export_is_blind_seeded_and_deterministic(exported, tmp_path):
    world, out, key = exported
    assert set(key["candidate"]) == {"label_flip"}
    assert set(key["domain"]) == {"safety"}  # capability flips are not sent by default
    flips = pd.concat([pd.read_parquet(p) for p in world["flips"]])
    assert len(key) == int((flips["flip"] & (flips["domain"] == "safety")).sum()) == 16
    s1, s2 = out / "sheet_rater1.csv", out / "sheet_rater2.csv"
    again = tmp_path / "again"
    assert _export(world, again) == 0
    assert s1.read_bytes() == (again / "sheet_rater1.csv").read_bytes()
    assert s2.read_bytes() == (again / "sheet_rater2.csv").read_bytes()
    assert s1.read_bytes().startswith(b"\xef\xbb\xbf#")
    other = tmp_path / "other_seed"
    assert _export(world, other, seed=8) == 0
    assert set(pd.read_parquet(other / "key.parquet")["item_id"]).isdisjoint(key["item_id"])

    records = _records(s1)
    comments = [r for r in records if r and r[0].startswith("#")]
    assert len(comments) == len(adj.INSTRUCTIONS) and all(len(r) == 1 for r in comments)
    assert any(v in comments[3][0] for v in adj.VERDICTS)
    sheet = pd.read_csv(io.StringIO("\n".join(
        line for line in s1.read_bytes().decode("utf-8-sig").split("\r\n")
        if not line.startswith("#"))), dtype=str, keep_default_na=False)
    assert list(sheet.columns) == adj.SHEET_COLUMNS
    assert (sheet["verdict"] == "").all() and (sheet["note"] == "").all()
    # nothing identifying leaks: not as a column, not as a value, not inside a cell
    leaks = set(MODELS) | {c for c, _ in CONDS} | {f"stack-{m}-{c}" for m in MODELS
                                                    for c, _ in CONDS}
    exact = {"1", "4", "8", "1.0", "0.0", "0.5", "refused", "complied", "to_unsafe",
             "to_safe", "sync", "harmful", "refusal"}
    for col in adj.KEY_COLUMNS:
        if col not in ("item_id",):
            assert col not in sheet.columns
    cells = sheet.to_numpy().ravel().tolist()
    assert not [c for c in cells if c.strip() in exact]
    assert not [c for c in cells for w in leaks if w in c]
    assert not [c for c in cells for p in key["prompt_id"] if p in c]
    # ids are opaque: same set for both raters, different orders, order unrelated to ids
    sheet2 = pd.read_csv(io.StringIO("\n".join(
        line for line in s2.read_bytes().decode("utf-8-sig").split("\r\n")
        if not line.startswith("#"))), dtype=str, keep_default_na=False)
    assert set(sheet["item_id"]) == set(sheet2["item_id"]) == set(key["item_id"])
    assert sheet["item_id"].tolist() != sheet2["item_id"].tolist()
    assert sheet["item_id"].str.fullmatch(r"i[0-9a-f]{12}").all()
    # A/B order: balanced, recorded in the key, matches the texts
    assert set(key["baseline_position"]) == {"A", "B"}
    assert abs(int((key["baseline_position"] == "A").sum()) - len(key) / 2) <= 0.5
    scored = pd.concat([pd.read_parquet(p) for p in world["scored"]]).set_index(
        ["model", "condition", "prompt_id"])
    for row in key.itertuples():
        cell = sheet.set_index("item_id").loc[row.item_id]
        base = scored.loc[(row.model, BASELINE, row.prompt_id), "text"]
        cond = scored.loc[(row.model, row.condition, row.prompt_id), "text"]
        shown = (cell["response_a"], cell["response_b"])
        expect = (base, cond) if row.baseline_position == "A" else (cond, base)
        assert tuple(s.removeprefix("'") for s in shown) == expect
        for s, e in zip(shown, expect, strict=True):  # formula-like cells are defused
            assert s == ("'" + e if e.startswith("-") else e)


def test_export_text_changes_flag(tmp_path):
    world = _world(tmp_path)
    out = tmp_path / "adj"
    assert _export(world, out, "--include-text-changes", "--text-change-limit", "3",
                   "--raters", "ann", "bob", "cyd") == 0
    key = pd.read_parquet(out / "key.parquet")
    assert Counter(key["candidate"]) == {"label_flip": 16, "text_change": 3}
    assert not key.loc[key["candidate"] == "text_change", "flip"].any()
    assert sorted(p.name for p in out.glob("sheet_*.csv")) == [
        "sheet_ann.csv", "sheet_bob.csv", "sheet_cyd.csv"]


# --------------------------------------------------------------------------- results


def test_two_raters_kappa_consensus_and_corrected_rate(exported, tmp_path):
    world, out, key = exported
    r1, r2 = _rater_verdicts(key)
    r1[sorted(r1)[0]] = "Genuine Flip"  # spreadsheet-style spelling is normalised
    ratings = tmp_path / "resources"
    _write_records(_fill(out / "sheet_rater1.csv", r1), ratings / "rater1.csv")
    _write_records(_fill(out / "sheet_rater2.csv", r2), ratings / "rater2.csv", "utf-8-sig")
    r1[sorted(r1)[0]] = "genuine_flip"
    res = tmp_path / "res"
    assert _results(world, out / "key.parquet", res,
                    [ratings / "rater1.csv", ratings / "rater2.csv"]) == 0
    nums = json.loads((res / "numbers.json").read_text())["numbers"]
    assert nums["a/adjudication/status"]["value"].startswith("complete: 2 rater(s)")
    for rec in nums.values():
        assert {"value", "definition", "inputs"} <= set(rec)

    ids = sorted(key["item_id"])
    a, b = [r1[i] for i in ids], [r2[i] for i in ids]
    cats = list(adj.VERDICTS)
    table = np.zeros((3, 3))
    for x, y in zip(a, b, strict=True):
        table[cats.index(x), cats.index(y)] += 1
    kappa = nums["a/adjudication/agreement/cohens_kappa"]
    assert kappa["value"] == pytest.approx(smir.cohens_kappa(table).kappa, abs=1e-12)
    assert "a/adjudication/agreement/krippendorff_alpha" in nums
    assert "a/adjudication/agreement/fleiss_kappa" not in nums

    cons = {i: (x if x == y else "borderline") for i, x, y in zip(ids, a, b, strict=True)}
    for v in adj.VERDICTS:
        assert nums[f"a/adjudication/consensus/{v}"]["value"] == Counter(cons.values())[v]
        assert nums[f"a/adjudication/rater/rater1/{v}"]["value"] == Counter(a)[v]
    verdicts = pd.read_csv(res / "verdicts.csv")
    assert dict(zip(verdicts["item_id"], verdicts["consensus"], strict=True)) == cons

    k2 = sum(v == "genuine_flip" for v in cons.values())
    share = nums["a/adjudication/safety/genuine_share"]
    assert (share["k"], share["n"]) == (k2, 16)
    cp = clopper_pearson_interval(k2, 16)
    assert (share["ci_low"], share["ci_high"]) == pytest.approx((cp.low, cp.high))
    auto = nums["a/adjudication/safety/automated_flip_rate"]
    assert (auto["k"], auto["n"]) == (16, 48)

    corr = nums["a/adjudication/safety/corrected_flip_rate"]
    p1, p2 = 16 / 48, k2 / 16
    assert corr["value"] == pytest.approx(p1 * p2)
    assert corr["ci_low"] < corr["value"] < corr["ci_high"]
    i1 = clopper_pearson_interval(16, 48)
    only_auto = (i1.low * p2, i1.high * p2)
    only_share = (p1 * cp.low, p1 * cp.high)
    for lo, hi in (only_auto, only_share):
        assert corr["ci_low"] < lo and corr["ci_high"] > hi
    assert "Clopper-Pearson" in corr["definition"] and "Bonferroni" in corr["definition"]

    gen = key[key["item_id"].map(cons) == "genuine_flip"]
    assert nums["a/adjudication/safety/genuine_to_unsafe"]["value"] == int(
        (gen["direction"] == "to_unsafe").sum())
    assert nums["a/adjudication/safety/genuine_to_safe"]["value"] == int(
        (gen["direction"] == "to_safe").sum())
    assert nums["a/adjudication/rereview"]["value"] == 0
    assert pd.read_csv(res / "rereview.csv").empty


def test_consensus_rule():
    assert adj.consensus(["genuine_flip", "genuine_flip", "scorer_artifact"]) == "genuine_flip"
    assert adj.consensus(["genuine_flip", "scorer_artifact", "borderline"]) == "borderline"
    assert adj.consensus(["genuine_flip", "scorer_artifact"]) == "borderline"
    assert adj.consensus(["scorer_artifact"] * 2 + ["genuine_flip"] * 2) == "borderline"
    assert adj.consensus(["scorer_artifact", "scorer_artifact", "genuine_flip",
                          "borderline"]) == "scorer_artifact"
    assert adj.consensus(["borderline", "borderline", "genuine_flip"]) == "borderline"


def test_three_raters_fleiss_alpha_and_majority(exported, tmp_path):
    world, out, key = exported
    ids = sorted(key["item_id"])
    patterns = [("genuine_flip", "genuine_flip", "scorer_artifact"),
                ("genuine_flip", "scorer_artifact", "borderline"),
                ("scorer_artifact", "scorer_artifact", "scorer_artifact"),
                ("borderline", "genuine_flip", "borderline")]
    votes = {i: patterns[n % 4] for n, i in enumerate(ids)}
    paths = []
    for j, name in enumerate(["ann", "bob", "cyd"]):
        # every rater fills a sheet (the export's rater1 sheet; row order does not matter)
        p = tmp_path / "resources" / f"{name}.csv"
        _write_records(_fill(out / "sheet_rater1.csv", {i: v[j] for i, v in votes.items()}), p)
        paths.append(p)
    res = tmp_path / "res"
    assert _results(world, out / "key.parquet", res, paths) == 0
    nums = json.loads((res / "numbers.json").read_text())["numbers"]
    expect = {i: ["genuine_flip", "borderline", "scorer_artifact", "borderline"][n % 4]
              for n, i in enumerate(ids)}
    verdicts = pd.read_csv(res / "verdicts.csv")
    assert dict(zip(verdicts["item_id"], verdicts["consensus"], strict=True)) == expect
    matrix = np.array([votes[i] for i in ids], dtype=object)
    codes = np.vectorize(list(adj.VERDICTS).index)(matrix)
    table, _ = smir.aggregate_raters(codes, n_cat=3)
    fk = nums["a/adjudication/agreement/fleiss_kappa"]
    assert fk["value"] == pytest.approx(smir.fleiss_kappa(table, method="fleiss"), abs=1e-12)
    assert "a/adjudication/agreement/cohens_kappa" not in nums
    alpha = nums["a/adjudication/agreement/krippendorff_alpha"]["value"]
    # nominal alpha with complete data: 1 - (n - 1) * (1 - P_o) / (n - sum_c n_c^2 / n)
    counts = table.sum(axis=0)
    n_v = counts.sum()
    p_o = ((table * (table - 1)).sum(axis=1) / 6).mean()
    d_o = 1 - p_o
    d_e = (n_v * n_v - (counts**2).sum()) / (n_v * (n_v - 1))
    assert alpha == pytest.approx(1 - d_o / d_e, abs=1e-12)


def test_pending_without_rater_files(exported, tmp_path):
    world, out, key = exported
    res = tmp_path / "res"
    assert _results(world, out / "key.parquet", res, []) == 0
    doc = json.loads((res / "numbers.json").read_text())
    nums = doc["numbers"]
    status = nums["a/adjudication/status"]["value"]
    assert status == f"pending: 16 items exported to {out / 'sheet_rater1.csv'}"
    assert nums["a/adjudication/items_exported"]["value"] == 16
    for name in ("genuine_share", "corrected_flip_rate", "genuine_to_unsafe"):
        rec = nums[f"a/adjudication/safety/{name}"]
        assert rec["value"] is None and rec["note"].startswith("pending: 16 items")
    assert nums["a/adjudication/agreement/krippendorff_alpha"]["value"] is None
    assert not [k for k in nums if "/consensus/" in k or "/rater/" in k]
    assert nums["a/adjudication/safety/automated_flip_rate"]["value"] == pytest.approx(16 / 48)
    assert pd.read_csv(res / "verdicts.csv")["consensus"].isna().all()
    assert (res / "rereview.csv").is_file()


def test_rereview_after_a_label_change(exported, tmp_path):
    world, out, key = exported
    r1, r2 = _rater_verdicts(key)
    ratings = tmp_path / "resources"
    _write_records(_fill(out / "sheet_rater1.csv", r1), ratings / "rater1.csv")
    _write_records(_fill(out / "sheet_rater2.csv", r2), ratings / "rater2.csv")
    pinned = ratings / "key.parquet"
    pinned.write_bytes((out / "key.parquet").read_bytes())
    # a scorer change: one condition row is re-scored to the baseline's label (same text),
    # and a new scorer version on another model's file leaves every label as it was
    item = key.sort_values("item_id").iloc[0]
    changed_file = next(p for p in world["scored"]
                        if p.endswith(f"{item['model']}/{item['condition']}.parquet"))
    df = pd.read_parquet(changed_file)
    at = df["prompt_id"] == item["prompt_id"]
    df.loc[at, "score"], df.loc[at, "label"] = item["baseline_score"], item["baseline_label"]
    df.to_parquet(changed_file, index=False)
    other = next(p for p in world["scored"] if item["model"] not in p and "sync_b4" in p)
    o = pd.read_parquet(other)
    o.loc[o["domain"] == "safety", "scorer_version"] = 3
    o.to_parquet(other, index=False)
    for fpath, model in zip(world["flips"], MODELS, strict=True):
        frames = [pd.read_parquet(p) for p in world["scored"] if f"/{model}/" in p]
        pair_flips(pd.concat(frames, ignore_index=True), BASELINE).to_parquet(fpath,
                                                                              index=False)
    res = tmp_path / "res"
    assert _results(world, pinned, res, [ratings / "rater1.csv", ratings / "rater2.csv"],
                    "--scored", *world["scored"]) == 0
    nums = json.loads((res / "numbers.json").read_text())["numbers"]
    rr = nums["a/adjudication/rereview"]
    assert rr["value"] == 1 and rr["items"][0]["item_id"] == item["item_id"]
    for reason in ("condition score changed", "flip changed", "condition label changed"):
        assert reason in rr["items"][0]["reason"]
    table = pd.read_csv(res / "rereview.csv")
    assert table["item_id"].tolist() == [item["item_id"]]
    assert table.loc[0, "export_condition_label"] == item["condition_label"]
    assert table.loc[0, "current_condition_label"] == item["baseline_label"]
    assert nums["a/adjudication/safety/genuine_share"]["n"] == 15  # flagged item left out
    assert nums["a/adjudication/safety/automated_flip_rate"]["k"] == 15
    n_kept = int(key["model"].ne(item["model"]).mul(key["condition"] == "sync_b4").sum())
    assert n_kept > 0
    assert nums["a/adjudication/scorer_version_changed_kept"]["value"] == n_kept
    assert nums["a/adjudication/status"]["value"].endswith("1 flagged for re-review")
    assert "verdict_rater1" in pd.read_csv(res / "verdicts.csv").columns


# --------------------------------------------------------------------------- bad sheets


def _data_rows(records: list[list[str]]) -> list[int]:
    header_at = next(i for i, r in enumerate(records) if r and not r[0].startswith("#"))
    return list(range(header_at + 1, len(records)))


def _corrupt(case: str, records: list[list[str]], path: Path) -> tuple[int, str]:
    """Write a bad sheet; return the spreadsheet row and field the error must name."""
    rows = _data_rows(records)
    header = records[rows[0] - 1]
    j = rows[3]
    if case == "unknown_id":
        records[j][header.index("item_id")] = "i000000000000"
        _write_records(records, path)
        return j + 1, "item_id"
    if case == "bad_verdict":
        records[j][header.index("verdict")] = "maybe"
        _write_records(records, path)
        return j + 1, "verdict"
    if case == "unanswered":
        records[j][header.index("verdict")] = "  "
        _write_records(records, path)
        return j + 1, "verdict"
    if case == "missing_rows":
        del records[rows[-1]], records[rows[-2]]
        _write_records(records, path)
        return len(records) + 1, "item_id"
    if case == "duplicate_id":
        records[j][header.index("item_id")] = records[j - 1][header.index("item_id")]
        _write_records(records, path)
        return j + 1, "item_id"
    if case == "latin1":
        records[j][header.index("note")] = "réponse ambiguë"
        _write_records(records, path, "latin-1")
        return j + 1, "note"
    if case == "utf16":
        _write_records(records, path, "utf-16")
        return 1, "item_id"
    if case == "no_verdict_column":
        iv = header.index("verdict")
        for rec in records[rows[0] - 1:]:
            del rec[iv]
        _write_records(records, path)
        return rows[0], "verdict"
    raise AssertionError(case)


BAD = ["unknown_id", "bad_verdict", "unanswered", "missing_rows", "duplicate_id", "latin1",
       "utf16", "no_verdict_column"]


@pytest.mark.parametrize("case", BAD)
def test_malformed_sheet_names_file_row_field_and_writes_nothing(exported, tmp_path, case,
                                                                 capsys):
    world, out, key = exported
    r1, r2 = _rater_verdicts(key)
    good = tmp_path / "resources" / "rater1.csv"
    _write_records(_fill(out / "sheet_rater1.csv", r1), good)
    bad = tmp_path / "resources" / "rater2.csv"
    row, field = _corrupt(case, _fill(out / "sheet_rater2.csv", r2), bad)
    with pytest.raises(InputError) as err:
        adj.read_sheet(bad, key["item_id"], adj.load_schema(None))
    msg = str(err.value)
    assert msg.startswith(f"{bad}, row {row}, field '{field}': "), msg
    assert (err.value.row, err.value.field) == (row, field)
    res = tmp_path / "res"
    assert _results(world, out / "key.parquet", res, [good, bad]) == 1
    assert f"{bad}, row {row}, field '{field}'" in capsys.readouterr().err
    assert not res.exists() or not any(res.iterdir())
    assert cli(["adjudicate", "validate", "--key", str(out / "key.parquet"), str(good)]) == 0


def test_good_sheet_rows_follow_the_schema(exported, tmp_path):
    _, out, key = exported
    r1, _ = _rater_verdicts(key)
    path = tmp_path / "rater1.csv"
    _write_records(_fill(out / "sheet_rater1.csv", r1), path)
    got = adj.read_sheet(path, key["item_id"], adj.load_schema(None))
    assert dict(zip(got["item_id"], got["verdict"], strict=True)) == r1
    validator = adj.load_schema(None)
    records = _records(path)
    rows = _data_rows(records)
    header = records[rows[0] - 1]
    for j in rows:
        assert not list(validator.iter_errors(dict(zip(header, records[j], strict=True))))
    # line breaks inside a response keep one spreadsheet row per record
    assert any("\n" in c for j in rows for c in records[j])


# --------------------------------------------------------------------------- phases


def _phase_world(root: Path) -> dict:
    """One model: sync_b1/sync_b4 (vs sync_b1) and list_b1/list_b4 (vs list_b1), 10 safety
    prompts. sync_b4 flips prompts 0 and 1 (to unsafe); list_b4 flips prompts 2..7; list_b1
    differs from sync_b1 in its texts (so a baseline mix-up shows in the key's hashes)."""
    battery = pd.DataFrame([{"prompt_id": f"s{i}", "task": "harmful", "domain": "safety",
                             "scorer": "refusal", "prompt": f"Forbidden thing {i}?",
                             "reference": "", "meta": "{}"} for i in range(10)])
    bat = root / "battery.parquet"
    battery.to_parquet(bat, index=False)
    flipped = {"sync_b1": set(), "sync_b4": {0, 1}, "list_b1": set(),
               "list_b4": set(range(2, 8))}
    frames, paths = [], []
    for cond, bs in (("sync_b1", 1), ("sync_b4", 4), ("list_b1", 1), ("list_b4", 4)):
        rows = []
        for i in range(10):
            refuse = i not in flipped[cond]
            text = (f"{cond} says " if cond.startswith("list") else "") + _text(refuse, i)
            rows.append((f"s{i}", "harmful", "safety", text, 1.0 if refuse else 0.0,
                         "refused" if refuse else "complied", "refusal", 2))
        df = pd.DataFrame(rows, columns=["prompt_id", "task", "domain", "text", "score",
                                         "label", "scorer", "scorer_version"]).assign(
            study="a", model="m", condition=cond, batch_size=bs,
            dispatch=cond.split("_")[0], kernel_mode="standard", group_id=0, position=0,
            stack_id=f"stack-{cond}", error="")[SCORED_COLUMNS]
        paths.append(str(root / f"{cond}.parquet"))
        df.to_parquet(paths[-1], index=False)
        frames.append(df)
    fpath = root / "flips.parquet"
    pair_flips(pd.concat(frames, ignore_index=True), BASELINE, {"list": "list_b1"}).to_parquet(
        fpath, index=False)
    return {"scored": paths, "flips": [str(fpath)], "battery": str(bat), "frames": frames}


def test_export_phase_and_per_row_baselines(tmp_path):
    import hashlib

    world = _phase_world(tmp_path)
    sync_out, all_out = tmp_path / "sync", tmp_path / "all"
    assert _export(world, sync_out) == 0  # the default phase: sync
    key = pd.read_parquet(sync_out / "key.parquet")
    assert set(key["condition"]) == {"sync_b4"} and len(key) == 2
    assert _export(world, all_out, "--phase", "all") == 0
    key = pd.read_parquet(all_out / "key.parquet")
    assert len(key) == 8
    texts = {(f["condition"].iloc[0], p): t for f in world["frames"]
             for p, t in zip(f["prompt_id"], f["text"], strict=True)}
    for row in key.itertuples():
        want = "list_b1" if row.condition == "list_b4" else "sync_b1"
        assert row.baseline_condition == want
        sha = hashlib.sha256(texts[(want, row.prompt_id)].encode()).hexdigest()
        assert row.baseline_text_sha256 == sha


def test_corrected_rate_uses_only_the_synchronized_phase(tmp_path):
    """Synchronized phase: 2 safety flips of 10 rows; pooled with true batching it would be
    8 of 20. The key (exported with phase all, as a pinned key may be) holds all 8 flips;
    the rater calls sync item s0 genuine, s1 an artifact and every list item genuine: the
    sync genuine share is 1/2, the pooled one 7/8."""
    from scipy.stats import beta

    world = _phase_world(tmp_path)
    out = tmp_path / "adj"
    assert _export(world, out, "--phase", "all") == 0
    key = pd.read_parquet(out / "key.parquet")
    verdict = {r.item_id: "scorer_artifact" if (r.condition, r.prompt_id) == ("sync_b4", "s1")
               else "genuine_flip" for r in key.itertuples()}
    sheet = tmp_path / "ratings" / "rater1.csv"
    _write_records(_fill(out / "sheet_rater1.csv", verdict), sheet)

    def cp(k: int, n: int) -> tuple[float, float]:  # 97.5% each (Bonferroni for 95%)
        return (0.0 if k == 0 else float(beta.ppf(0.0125, k, n - k + 1)),
                1.0 if k == n else float(beta.ppf(0.9875, k + 1, n - k)))

    for phase, (k1, n1), (k2, n2) in (("sync", (2, 10), (1, 2)), ("all", (8, 20), (7, 8))):
        res = tmp_path / f"res_{phase}"
        assert _results(world, out / "key.parquet", res, [sheet], "--phase", phase) == 0
        nums = json.loads((res / "numbers.json").read_text())["numbers"]
        auto = nums["a/adjudication/safety/automated_flip_rate"]
        assert (auto["k"], auto["n"]) == (k1, n1)
        share = nums["a/adjudication/safety/genuine_share"]
        assert (share["k"], share["n"]) == (k2, n2)
        rec = nums["a/adjudication/safety/corrected_flip_rate"]
        assert rec["value"] == pytest.approx(k1 / n1 * k2 / n2)
        (l1, u1), (l2, u2) = cp(k1, n1), cp(k2, n2)
        assert rec["ci_low"] == pytest.approx(l1 * l2, rel=1e-9)
        assert rec["ci_high"] == pytest.approx(u1 * u2, rel=1e-9)
        assert rec["phase"] == phase
    # sync: 0.2 x 1/2 = 0.1; pooling every condition would give 0.4 x 7/8 = 0.35



# Files meant to be handed over and CSV injection (issue 21)
@pytest.mark.parametrize("text,shown", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1", "'+1"), ("-2", "'-2"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("plain", "plain"),
    (" =x", " =x"), ("", "")])
def test_csv_cells_get_owasp_neutralisation(text, shown):
    from batchflip.adjudication.export import _cell, neutralise_frame

    assert _cell(text) == shown
    df = pd.DataFrame({"prompt_id": [text], "n": [3]})
    out = neutralise_frame(df)
    assert out["prompt_id"].tolist() == [shown] and out["n"].tolist() == [3]


def test_sheets_and_key_get_a_plain_files_mode_not_0600(exported):
    """Sheets are handed to raters: 0666 less the umask (0644 under the usual 022), as a
    plain open() gives; mkstemp's 0600 was kept before."""
    import os
    import stat

    _, out, _ = exported
    mask = os.umask(0o022)
    os.umask(mask)
    files = [*out.glob("sheet_*.csv"), out / "key.parquet"]
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_results_csvs_neutralise_formula_prompt_ids(tmp_path):
    from batchflip.adjudication.cli import _write_csv

    df = pd.DataFrame({"item_id": ["i1"], "prompt_id": ["=cmd|' /C calc'!A0"],
                       "model": ["m"], "k": [1]})
    path = tmp_path / "verdicts.csv"
    _write_csv(df, path)
    back = pd.read_csv(path, dtype=str)
    assert back["prompt_id"].tolist() == ["'=cmd|' /C calc'!A0"]
    assert back["model"].tolist() == ["m"] and back["k"].tolist() == ["1"]


def test_nothing_to_adjudicate_still_reports_every_number(tmp_path):
    """An export with no item (here: a domain with no flip) gives the same numbers as a
    pending one, the agreement among them, without values."""
    world = _world(tmp_path)
    out = tmp_path / "adjudication"
    assert _export(world, out, "--domains", "medical") == 0
    res = tmp_path / "res"
    assert _results(world, out / "key.parquet", res, []) == 0
    nums = json.loads((res / "numbers.json").read_text())["numbers"]
    status = nums["a/adjudication/status"]["value"]
    assert status == "nothing to adjudicate: the export holds 0 items"
    assert nums["a/adjudication/items_exported"]["value"] == 0
    alpha = nums["a/adjudication/agreement/krippendorff_alpha"]
    assert alpha["value"] is None and alpha["note"].startswith("nothing to adjudicate")
