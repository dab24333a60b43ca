"""Reviewer reproduction: archive → restore → verify, on small real generation files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT

from batchflip import archive, layout
from batchflip.battery import build_battery
from batchflip.cli import main as cli
from batchflip.config import check_config
from batchflip.errors import BatchflipError
from batchflip.records import GENERATION_COLUMNS

TINY = ROOT / "tests" / "fixtures" / "tiny_config.yaml"
VERSIONS = {"refusal": 2, "mc_letter": 1, "truthfulqa": 1, "bbq": 1}
REFUSE, COMPLY = "I'm sorry, but I can't help with that.", "Sure, here is how to do it."


def _text(pid: str, condition: str, flip_all: bool = False) -> str:
    """Deterministic responses with some label flips between conditions."""
    if pid.startswith("tiny_harm"):
        refuses = (int(pid[-1]) + len(condition)) % 2 == 0
        return REFUSE if refuses != flip_all else COMPLY
    return "B" if condition == "sync_b1" or pid.endswith("0") else "C"


def _gen_frame(battery: pd.DataFrame, condition: str, stack_id: str,
               flip_all: bool = False) -> pd.DataFrame:
    b = int(condition.split("_b")[1].split("_")[0])
    rows = []
    if condition.startswith("cobatch"):
        targets = battery[battery["task"] == "tiny_refusal"]["prompt_id"].tolist()
        fillers = battery[battery["task"] == "tiny_mc"]["prompt_id"].tolist()
        members = [[(t, "target")] + [(f, "filler") for f in fillers[: b - 1]] for t in targets]
    else:
        ids = battery["prompt_id"].tolist()
        members = [[(p, "target") for p in ids[i:i + b]] for i in range(0, len(ids), b)]
    for g, group in enumerate(members):
        for pos, (pid, role) in enumerate(group):
            text = _text(pid, condition, flip_all)
            rows.append({
                "study": "a", "model": "smol", "condition": condition, "batch_size": b,
                "dispatch": condition.split("_")[0], "kernel_mode": "standard",
                "group_id": g, "position": pos, "role": role, "prompt_id": pid, "text": text,
                "token_ids": [len(w) for w in text.split()], "finish_reason": "stop",
                "n_tokens": len(text.split()), "t_submit": 1.0, "t_first": 1.5, "t_done": 2.0,
                "seed": 42, "stack_id": stack_id, "attempts": 1, "error": ""})
    return pd.DataFrame(rows, columns=GENERATION_COLUMNS)


def make_workspace(ws: Path, stack_id: str = "stackA", flip_all: bool = False) -> Path:
    """A workspace with a config, its battery and generation files; returns the config."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"] = {"smol": {"source": "path", "path": str(ws / "no-model-needed")}}
    cfg["studies"]["a"]["models"] = ["smol"]
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    battery = build_battery(cfg["batteries"]["tiny"]["paths"])
    (ws / "results/battery").mkdir(parents=True, exist_ok=True)
    battery.to_parquet(ws / "results/battery/tiny.parquet", index=False)
    for c in cfg["studies"]["a"]["conditions"]:
        gen = ws / layout.generation_path("a", "smol", c)
        gen.parent.mkdir(parents=True, exist_ok=True)
        _gen_frame(battery, c, stack_id, flip_all).to_parquet(gen, index=False)
        Path(layout.stack_path(str(gen))).write_text(json.dumps({"stack_id": stack_id}))
    return ws / "config.yaml"


def gen_files(ws: Path) -> list[Path]:
    return sorted((ws / "results/generations").rglob("*.parquet"))


@pytest.fixture()
def packed(tmp_path: Path) -> tuple[Path, Path]:
    ws = tmp_path / "original"
    cfg = make_workspace(ws)
    out = tmp_path / "batchflip-archive.tar.gz"
    assert cli(["archive", "pack", "--config", str(cfg), "--root", str(ws),
                "--out", str(out)]) == 0
    return ws, out


def _verify(ws: Path, arc: Path, **kw) -> dict:
    return archive.verify(arc, gen_files(ws), ws / "results/battery/tiny.parquet", VERSIONS,
                          "sync_b1", root=ws, study="a", **kw)


def test_pack_is_deterministic_and_lists_every_member(packed, tmp_path):
    ws, arc = packed
    again = tmp_path / "again.tar.gz"
    archive.pack_config(ws / "config.yaml", again, ws)
    assert again.read_bytes() == arc.read_bytes()
    with tarfile.open(arc) as tar:
        names = tar.getnames()
        assert names[0] == archive.MANIFEST and names[1:] == sorted(names[1:])
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    sums = archive.read_manifest(arc)
    assert set(sums) == set(names[1:])
    assert {"config.yaml", "results/battery/tiny.parquet",
            "results/generations/a/smol/cobatch_b4_benign.stack.json"} <= set(sums)
    assert len([n for n in sums if n.endswith(".parquet")]) == 1 + 3
    gen = "results/generations/a/smol/sync_b4.parquet"
    assert sums[gen] == hashlib.sha256((ws / gen).read_bytes()).hexdigest()


def test_round_trip_restores_identical_files_and_verify_passes(packed, tmp_path, monkeypatch):
    ws, arc = packed
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    members = [m for m in archive.read_manifest(arc) if m.startswith("results/")]
    assert cli(["archive", "restore", str(arc), *members]) == 0
    for m in members:
        assert (fresh / m).read_bytes() == (ws / m).read_bytes(), m
    restored = pd.read_parquet(fresh / "results/generations/a/smol/sync_b4.parquet")
    pd.testing.assert_frame_equal(
        restored, pd.read_parquet(ws / "results/generations/a/smol/sync_b4.parquet"))

    report = _verify(fresh, arc)
    assert report["passed"] is True and report["n_mismatches"] == 0
    assert {f["mode"] for f in report["files"]} == {"exact"}
    assert all(f["rows"] > 0 for f in report["files"])

    out = tmp_path / "verify.json"
    assert cli(["archive", "verify", "--archive", str(arc), "--study", "a",
                "--battery", "results/battery/tiny.parquet", "--versions", json.dumps(VERSIONS),
                "--baseline", "sync_b1", "--out", str(out),
                *[str(p.relative_to(fresh)) for p in gen_files(fresh)]]) == 0
    assert json.loads(out.read_text())["passed"] is True


def test_altered_row_is_reported_by_its_key(packed, tmp_path):
    ws, arc = packed
    fresh = tmp_path / "fresh"
    shutil.copytree(ws, fresh)
    path = fresh / "results/generations/a/smol/sync_b4.parquet"
    df = pd.read_parquet(path)
    i = df.index[df["prompt_id"] == "tiny_mc_1"][0]
    df.loc[i, "text"] = "D"
    df.to_parquet(path, index=False)

    report = _verify(fresh, arc)
    assert report["passed"] is False and report["n_mismatches"] == 1
    (bad,) = report["mismatches"]
    assert bad["prompt_id"] == "tiny_mc_1" and bad["condition"] == "sync_b4"
    assert bad["field"] == "text" and bad["fresh"] == "D"
    assert (bad["group_id"], bad["position"]) == (int(df.loc[i, "group_id"]),
                                                  int(df.loc[i, "position"]))
    by_file = {f["condition"]: f["passed"] for f in report["files"]}
    assert by_file == {"sync_b1": True, "sync_b4": False, "cobatch_b4_benign": True}

    # a dropped row and changed token ids are reported too
    df = df.drop(index=i).reset_index(drop=True)
    df["token_ids"] = [[9, 9, 9]] + df["token_ids"].tolist()[1:]
    df.to_parquet(path, index=False)
    fields = {(m["prompt_id"], m["field"]) for m in _verify(fresh, arc)["mismatches"]}
    assert ("tiny_mc_1", "row") in fields
    assert (str(df.iloc[0]["prompt_id"]), "token_ids") in fields


def test_other_stack_is_judged_by_flip_rates(packed, tmp_path):
    ws, arc = packed
    same = make_workspace(tmp_path / "other_gpu", stack_id="stackB")
    report = _verify(same.parent, arc)
    assert {f["mode"] for f in report["files"]} == {"rate"}
    # another stack is never a pass by default: agreement is reported for judgement
    assert report["passed"] is None and report["stack"] == "other" and report["rates"]
    assert "never a pass by default" in report["expectation"]
    for r in report["rates"]:
        lo, hi = r["archive"]["wilson"]
        assert lo <= r["fresh"]["rate"] <= hi
    from statsmodels.stats.proportion import proportion_confint

    for f in report["files"]:
        agree = f["agreement"]
        fresh = pd.read_parquet(same.parent / f["file"])
        n = int((fresh["role"] == "target").sum())
        assert agree["rows"] == n and agree["unpaired"] == 0
        # the same scripted texts on both stacks: every row agrees (k = n), and the
        # interval is statsmodels' Wilson interval of n / n
        for name in ("text_identical", "label_agreement"):
            assert (agree[name]["k"], agree[name]["n"]) == (n, n)
            assert agree[name]["wilson"] == pytest.approx(
                list(proportion_confint(n, n, alpha=0.05, method="wilson")))

    # every refusal inverted in every condition but the baseline: a safety rate disagrees
    flipped = make_workspace(tmp_path / "flipped", stack_id="stackB")
    base = flipped.parent / "results/generations/a/smol/sync_b1.parquet"
    bat = pd.read_parquet(flipped.parent / "results/battery/tiny.parquet")
    for c in ("sync_b4", "cobatch_b4_benign"):
        _gen_frame(bat, c, "stackB", flip_all=True).to_parquet(
            flipped.parent / layout.generation_path("a", "smol", c), index=False)
    assert base.is_file()
    report = _verify(flipped.parent, arc)
    assert report["passed"] is False
    bad = [r for r in report["rates"] if not r["passed"]]
    assert bad and all(r["domain"] == "safety" for r in bad)
    # the inverted refusals lower the text agreement of those files by hand-countable rows
    b4 = next(f for f in report["files"] if f["condition"] == "sync_b4")
    harm = [p for p in bat["prompt_id"] if p.startswith("tiny_harm")]
    assert b4["agreement"]["text_identical"]["k"] == len(bat) - len(harm)


SCOPED_CONDS = ["sync_b1", "sync_b4", "list_b1", "list_b4"]


def make_scoped_workspace(ws: Path, stack_id: str) -> Path:
    """Study a on two models where only `smol` runs true batching (a scope, as in
    config/paper.yaml): `smol2` has no list_* files. Returns the config."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"] = {m: {"source": "path", "path": str(ws / "no-model-needed")}
                     for m in ("smol", "smol2")}
    cfg["studies"]["a"].update(
        models=["smol", "smol2"], conditions=SCOPED_CONDS,
        dispatch_baselines={"list": "list_b1"},
        scopes=[{"conditions": ["list_b1", "list_b4"], "models": ["smol"]}])
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    battery = build_battery(cfg["batteries"]["tiny"]["paths"])
    (ws / "results/battery").mkdir(parents=True, exist_ok=True)
    battery.to_parquet(ws / "results/battery/tiny.parquet", index=False)
    for model in ("smol", "smol2"):
        for c in layout.conditions_of(cfg, "a", model):
            gen = ws / layout.generation_path("a", model, c)
            gen.parent.mkdir(parents=True, exist_ok=True)
            _gen_frame(battery, c, stack_id).assign(model=model).to_parquet(gen, index=False)
            Path(layout.stack_path(str(gen))).write_text(json.dumps({"stack_id": stack_id}))
    return ws / "config.yaml"


def test_verify_on_a_scoped_config_pairs_true_batching_only_where_a_model_runs_it(tmp_path):
    # issue 26: verify got --dispatch-baseline list=list_b1 for the whole study, and a
    # model without list_* conditions then failed ("baseline condition 'list_b1' has no
    # scored rows") as soon as the stacks differed (flip rates compared)
    cfg = make_scoped_workspace(tmp_path / "original", "stackA")
    arc = tmp_path / "archive.tar.gz"
    assert cli(["archive", "pack", "--config", str(cfg), "--root", str(cfg.parent),
                "--out", str(arc)]) == 0
    fresh = make_scoped_workspace(tmp_path / "fresh", "stackB").parent
    config = yaml.safe_load(cfg.read_text())
    check_config(config, ROOT / "workflow/schemas/config.schema.yaml")
    assert len(gen_files(fresh)) == 4 + 2
    report = archive.verify(arc, gen_files(fresh), fresh / "results/battery/tiny.parquet",
                            VERSIONS, "sync_b1", layout.dispatch_baselines(config, "a"),
                            root=fresh, study="a")
    assert {f["mode"] for f in report["files"]} == {"rate"}
    # another stack is never a pass by default (issue 23): null, not false (no rate is out)
    assert report["passed"] is None
    cells = {(r["model"], r["condition"]) for r in report["rates"]}
    # by hand: each model's non-baseline conditions; list_b4 against list_b1, smol only
    assert cells == {("smol", "sync_b4"), ("smol", "list_b4"), ("smol2", "sync_b4")}
    # the same rows, the same rates: every archived rate equals the fresh one
    assert all(r["archive"]["rate"] == r["fresh"]["rate"] for r in report["rates"])


def _rewrite(arc: Path, out: Path, change: dict[str, bytes]) -> None:
    """Copy an archive, replacing some members' bytes but keeping its manifest."""
    with tarfile.open(arc) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            data = change.get(m.name, src.extractfile(m).read())
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))


def test_corrupted_member_fails_its_checksum(packed, tmp_path, capsys):
    ws, arc = packed
    name = "results/generations/a/smol/sync_b4.parquet"
    data = bytearray((ws / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tar.gz"
    _rewrite(arc, bad, {name: bytes(data)})
    dest = tmp_path / "restore" / name
    with pytest.raises(BatchflipError, match=f"member {name} fails its checksum"):
        archive.extract(bad, {name: dest})
    assert not dest.exists() and not list(dest.parent.glob("*.tmp"))
    # the other members still restore, and the CLI reports the bad one in one line
    ok = "results/generations/a/smol/sync_b1.parquet"
    archive.extract(bad, {ok: tmp_path / "restore" / ok})
    assert cli(["archive", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "fails its checksum" in err and name in err and "corrupt or was altered" in err


def test_truncated_or_missing_archive_is_a_clear_error(packed, tmp_path):
    _, arc = packed
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    with pytest.raises(BatchflipError, match="cut.tar.gz"):
        archive.check(cut)
    with pytest.raises(BatchflipError, match="no member results/generations/b/"):
        archive.extract(arc, {"results/generations/b/smol/x.parquet": tmp_path / "x"})
    with pytest.raises(BatchflipError, match="missing file for archive member"):
        archive.pack({"results/x.parquet": tmp_path / "nope.parquet"}, tmp_path / "y.tar.gz")


def test_reviewer_config_sets_restore(packed, tmp_path):
    ws, arc = packed
    out = tmp_path / "reviewer.yaml"
    assert cli(["archive", "config", str(arc), "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    assert cfg["restore"] == {"archive": str(arc)}
    assert cfg["studies"] == yaml.safe_load((ws / "config.yaml").read_text())["studies"]


def test_members_cover_ablation_reruns_and_scoped_conditions():
    cfg = yaml.safe_load(TINY.read_text())
    cfg["studies"]["d"] = {"kind": "ablation", "source": "a", "engine": "hf",
                           "kernel_modes": ["standard", "batch_invariant"]}
    members = layout.archive_members(cfg)
    assert "results/ablation/d/smollm2-135m/batch_invariant.stack.json" in members
    assert "results/generations/a/smollm2-135m/cobatch_b4_benign.parquet" in members
    assert layout.archive_members(cfg, ["d"]) == sorted(
        f"results/ablation/d/smollm2-135m/{k}.{e}" for k in ("standard", "batch_invariant")
        for e in ("parquet", "stack.json"))
    with pytest.raises(BatchflipError, match="study 'zz' is not in the config"):
        layout.archive_members(cfg, ["zz"])


def test_restore_and_verify_together_are_refused():
    from batchflip.config import check_config

    cfg = yaml.safe_load(TINY.read_text())
    cfg["restore"] = cfg["verify"] = {"archive": "a.tar.gz"}
    with pytest.raises(BatchflipError, match="'restore' and 'verify' are both set"):
        check_config(cfg, ROOT / "workflow/schemas/config.schema.yaml")
    del cfg["verify"]
    cfg["restore"]["extra"] = 1
    with pytest.raises(BatchflipError, match="key 'restore'"):
        check_config(cfg, ROOT / "workflow/schemas/config.schema.yaml")


# --- the workflow: restore with no model, numbers byte for byte ----------------------------


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(cwd),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def test_restore_plans_no_generation_and_no_model(packed, tmp_path):
    _, arc = packed
    ws = tmp_path / "reviewer"
    ws.mkdir()
    cli(["archive", "config", str(arc), "--out", str(ws / "reviewer.yaml")])
    cfg = yaml.safe_load((ws / "reviewer.yaml").read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(tmp_path / "task-files-not-here")]
    (ws / "reviewer.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--cores", "1", "results/numbers/a.json", "--configfile",
                     "reviewer.yaml", cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "restore_generation" in out and "restore_battery" in out
    assert "rule generate" not in out and "rule model" not in out and "rule battery:" not in out
    # the verify target without its config key says which key it needs
    del cfg["restore"]
    (ws / "plain.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "results/verify/a.json", "--configfile", "plain.yaml", cwd=ws)
    assert proc.returncode != 0
    assert "needs the config key verify.archive" in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_reviewer_round_trip_reproduces_numbers_byte_for_byte(packed, tmp_path):
    _, arc = packed
    numbers = []
    for name in ("first", "second"):
        ws = tmp_path / name
        ws.mkdir()
        assert cli(["archive", "config", str(arc), "--out", str(ws / "reviewer.yaml")]) == 0
        proc = snakemake("--cores", "2", "results/paper", "--configfile", "reviewer.yaml",
                         cwd=ws)
        assert proc.returncode == 0, proc.stderr[-3000:]
        numbers.append((ws / "results/paper/numbers.json").read_bytes())
        assert not (ws / "resources/models").exists()
    assert numbers[0] == numbers[1]
    rec = json.loads(numbers[0])["reproduced"]["a/smol/sync_b4/safety_flip_rate"]
    assert rec["n"] == 3 and rec["stack_ids"] == ["stackA"]

    # a reviewer's fresh generations with one altered row: the verify target names it
    ws = tmp_path / "third"
    for sub in ("results/battery", "results/generations"):
        shutil.copytree(tmp_path / "second" / sub, ws / sub)
    for p in (ws / "results/generations").rglob("*.*"):  # newer than the battery, as in a
        os.utime(p)                                         # real run
    cfg = yaml.safe_load((tmp_path / "second/reviewer.yaml").read_text())
    cfg["verify"] = cfg.pop("restore")
    (ws / "verify.yaml").write_text(yaml.safe_dump(cfg))
    path = ws / "results/generations/a/smol/sync_b4.parquet"
    df = pd.read_parquet(path)
    df.loc[df["prompt_id"] == "tiny_harm_2", "text"] = "Altered."
    df.to_parquet(path, index=False)
    proc = snakemake("--cores", "1", "results/verify/a.json", "--configfile", "verify.yaml",
                     cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rule generate" not in proc.stdout + proc.stderr
    report = json.loads((ws / "results/verify/a.json").read_text())
    assert report["passed"] is False
    assert [(m["condition"], m["prompt_id"]) for m in report["mismatches"]] == [
        ("sync_b4", "tiny_harm_2")]


# Hostile archives and handed-over files (issue 21)
def _with_link(arc: Path, out: Path, name: str, link: str, kind: bytes = tarfile.SYMTYPE) -> None:
    """Copy an archive with member ``name`` replaced by a link to ``link`` (manifest kept)."""
    with tarfile.open(arc) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            if m.name == name:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, link
                dst.addfile(info)
            else:
                dst.addfile(m, src.extractfile(m))


@pytest.mark.parametrize("link,kind", [("../../../../etc/passwd", tarfile.SYMTYPE),
                                       ("results/generations/a/smol/sync_b1.parquet",
                                        tarfile.SYMTYPE),
                                       ("nowhere.parquet", tarfile.LNKTYPE)])
def test_a_link_member_is_a_one_line_error_and_nothing_is_written(packed, tmp_path, capsys,
                                                                  link, kind):
    ws, arc = packed
    name = "results/generations/a/smol/sync_b4.parquet"
    bad = tmp_path / "bad.tar.gz"
    _with_link(arc, bad, name, link, kind)
    gen = tmp_path / "restore" / name
    with pytest.raises(BatchflipError, match=rf"bad.tar.gz: member {name} is a .*link to "
                                             rf"{link}; .*only regular files"):
        archive.extract(bad, {name: gen})
    with pytest.raises(BatchflipError, match=rf"member {name} is a .*link"):
        archive.read_member(bad, name)
    assert not gen.exists() and not (tmp_path / "restore").exists()
    assert cli(["archive", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and name in err and "link" in err


def test_packed_archive_gets_a_plain_files_mode(packed):
    """The archive is handed to reviewers: 0666 less the umask (0644 under 022), not 0600."""
    import stat

    _, arc = packed
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(arc.stat().st_mode) == 0o666 & ~mask


# --- the reviewer against the authors' own numbers.json --------------------------------------


def clean_checkout(dest: Path) -> Path:
    """The repository's tracked files (as in this working tree) copied to ``dest``: a
    checkout with no results, no resources and no .snakemake."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_in(checkout: Path, ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """snakemake of ``checkout``'s Snakefile in workspace ``ws`` with its own src/."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(checkout / "Snakefile"),
                           "-d", str(ws), "--cores", "2", *args], capture_output=True,
                          text=True, cwd=ws, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def fill_sheets(ws: Path, study: str, raters: list[str]) -> int:
    """Each rater's exported sheet filled (verdicts cycling through the three answers,
    shifted per rater so they disagree somewhere) at resources/adjudication/{study}/; the key
    pinned beside them. Returns the number of items."""
    verdicts = ["genuine_flip", "scorer_artifact", "borderline"]
    dest = ws / "resources/adjudication" / study
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ws / layout.adjudication_key_path(study), ws / layout.pinned_key_path(study))
    n = 0
    for r, rater in enumerate(raters):
        sheet = ws / layout.adjudication_sheet_path(study, rater)
        # the export writes a BOM and '#' instruction lines (one cell each, no commas)
        records = list(csv.reader(io.StringIO(sheet.read_bytes().decode("utf-8-sig"),
                                              newline="")))
        top = next(i for i, rec in enumerate(records) if rec and not rec[0].startswith("#"))
        iv = records[top].index("verdict")
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\r\n")
        for i, rec in enumerate(records):
            if i > top:
                rec[iv] = verdicts[(i + r) % 3]
            if rec and rec[0].startswith("#"):
                buf.write(rec[0] + "\r\n")
            else:
                writer.writerow(rec)
        (dest / f"{rater}.csv").write_bytes(buf.getvalue().encode("utf-8"))
        records = records[top:]
        n = len(records) - 1
    return n


def authors_and_reviewer(tmp_path: Path, ws: Path, config: Path, require_items: bool = True
                         ) -> tuple[bytes, bytes, dict]:
    """The authors finish ``ws`` (sheets filled, numbers.json), pack it; a reviewer restores
    it in a clean checkout elsewhere and rebuilds results/paper. Both numbers.json bytes."""
    checkout = clean_checkout(tmp_path / "checkout")
    cfg = yaml.safe_load(config.read_text())
    raters = cfg["adjudication"]["raters"]
    run_in(checkout, ws, "results/paper", "--configfile", str(config))
    n_items = fill_sheets(ws, "a", raters)
    assert n_items > 0 or not require_items  # the authors' run has items to adjudicate
    run_in(checkout, ws, "results/paper", "--configfile", str(config))
    authors = (ws / "results/paper/numbers.json").read_bytes()
    arc = tmp_path / "authors.tar.gz"
    assert cli(["archive", "pack", "--config", str(config), "--root", str(ws), "--out",
                str(arc)]) == 0
    assert {f"resources/adjudication/a/{r}.csv" for r in raters} | {
        "resources/adjudication/a/key.parquet"} <= set(archive.read_manifest(arc))
    reviewer = tmp_path / "reviewer"
    reviewer.mkdir()
    assert cli(["archive", "config", str(arc), "--out", str(reviewer / "reviewer.yaml")]) == 0
    out = run_in(checkout, reviewer, "results/paper", "--configfile", "reviewer.yaml")
    assert "rule generate:" not in out.stdout + out.stderr
    assert not (reviewer / "resources/models").exists()
    return authors, (reviewer / "results/paper/numbers.json").read_bytes(), {"items": n_items}


@pytest.mark.workflow
def test_reviewer_reproduces_the_authors_numbers_with_adjudication(tmp_path):
    """Scripted texts with known label flips: the authors' adjudicated corrected rate comes
    back byte for byte from the archive alone."""
    ws = tmp_path / "authors"
    config = make_workspace(ws)
    cfg = yaml.safe_load(config.read_text())
    cfg["adjudication"] = {"raters": ["rater1", "rater2"], "domains": ["safety", "capability"]}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for p in (ws / "results/generations").rglob("*.*"):
        os.utime(p)  # newer than the battery, as in a finished run
    authors, reviewer, info = authors_and_reviewer(tmp_path, ws, config)
    assert reviewer == authors
    nums = json.loads(authors)["reproduced"]
    corrected = {k: v for k, v in nums.items() if k.startswith("a/adjudication/")
                 and k.endswith("corrected_flip_rate")}
    assert corrected and all(v.get("value") is not None for v in corrected.values())
    assert all(v["status"].startswith("complete: 2 rater(s)") for v in corrected.values())


@pytest.mark.workflow
def test_reviewer_reproduces_a_real_tiny_run(tmp_path, model_dir):
    """Real SmolLM2 generations of the tiny workflow, rater sheets filled: the reviewer's
    numbers.json equals the authors' byte for byte."""
    ws = tmp_path / "authors"
    ws.mkdir()
    cfg = yaml.safe_load(TINY.read_text())
    cfg["batteries"]["tiny"]["paths"] = [str(ROOT / "tests/fixtures/battery")]
    cfg["models"]["smollm2-135m"] = {"source": "path", "path": str(model_dir)}
    cfg["studies"]["a"]["conditions"] = ["sync_b1", "sync_b4"]
    cfg["studies"]["a"]["subset"] = {"method": "head", "per_task": {"tiny_refusal": 2,
                                                                    "tiny_mc": 2}}
    # every changed text is sent for review too, so the real run has items to rate
    cfg["adjudication"] = {"raters": ["rater1"], "domains": ["safety", "capability"],
                           "phase": "all", "include_text_changes": True}
    config = ws / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    authors, reviewer, info = authors_and_reviewer(tmp_path, ws, config, require_items=False)
    assert reviewer == authors
    status = json.loads(authors)["reproduced"]["a/adjudication/safety/corrected_flip_rate"]
    assert status["status"].startswith("complete: 1 rater(s)" if info["items"]
                                       else "nothing to adjudicate")
    print(f"\nreal tiny run: {info['items']} items adjudicated")
