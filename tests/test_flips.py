import pandas as pd

from batchflip.flips import pair_flips


def _rows(cond, scores, texts):
    return [{"model": "m", "task": "t", "domain": "safety", "prompt_id": f"p{i}",
             "condition": cond, "batch_size": int(cond[-1]), "dispatch": "sync",
             "score": s, "text": x, "stack_id": cond} for i, (s, x) in
            enumerate(zip(scores, texts, strict=True))]


def test_flip_definitions_follow_the_paper():
    base = _rows("sync_b1", [1.0, 0.0, 1.0, 0.5, 1.0], ["a", "b", "c", "d", "e"])
    cond = _rows("sync_b8", [0.0, 1.0, 0.995, 0.0, 1.0], ["a2", "b", "c", "d2", "e"])
    f = pair_flips(pd.DataFrame(base + cond), "sync_b1").set_index("prompt_id")
    assert f["flip"].tolist() == [True, True, False, True, False]  # 0.005 is below the 0.01
    assert f["direction"].tolist() == ["to_unsafe", "to_safe", "none", "to_unsafe", "none"]
    assert f["text_changed"].tolist() == [True, False, False, True, False]
    assert set(f["condition"]) == {"sync_b8"}  # the baseline is not paired with itself
    assert f.loc["p0", "baseline_stack_id"] == "sync_b1"
    assert set(f["baseline_condition"]) == {"sync_b1"}


def test_list_dispatch_uses_its_own_baseline():
    base = _rows("sync_b1", [1.0, 0.0], ["a", "b"])
    sync = _rows("sync_b4", [0.0, 0.0], ["a2", "b"])
    lbase = [{**r, "dispatch": "list"} for r in _rows("list_b1", [0.0, 0.0], ["x", "b"])]
    lst = [{**r, "dispatch": "list"} for r in _rows("list_b4", [0.0, 1.0], ["x", "b2"])]
    f = pair_flips(pd.DataFrame(base + sync + lbase + lst), "sync_b1", {"list": "list_b1"})
    assert sorted(set(f["condition"])) == ["list_b4", "sync_b4"]
    lf = f[f["condition"] == "list_b4"].set_index("prompt_id")
    assert lf["flip"].tolist() == [False, True]  # p0 agrees with list_b1, not with sync_b1
    assert set(lf["baseline_stack_id"]) == {"list_b1"}
    # each row records the condition it was paired with
    assert dict(zip(f["condition"], f["baseline_condition"], strict=True)) == {
        "list_b4": "list_b1", "sync_b4": "sync_b1"}
    from batchflip.studies.discovery import flip_agreement

    agree = flip_agreement(f, "a", ["f.parquet"])["a/all/flip_agreement_b4"]
    # sync flips: p0 yes, p1 no; list flips: p0 no, p1 yes -> agreement 0 of 2
    assert (agree["k"], agree["n"]) == (0, 2)


def test_flips_cli_writes_baseline_condition_and_discovery_labels_use_it(tmp_path):
    """A config with dispatch_baselines: list conditions are labelled against list_b1."""
    import json

    from batchflip.cli import main as cli
    from batchflip.records import SCORED_COLUMNS

    paths = []
    for cond, scores in (("sync_b1", [1.0, 0.0]), ("sync_b4", [0.0, 0.0]),
                         ("list_b1", [0.0, 0.0]), ("list_b4", [0.0, 1.0])):
        rows = _rows(cond, scores, ["x", "y"])
        df = pd.DataFrame(rows).assign(
            study="a", dispatch=cond.split("_")[0], kernel_mode="standard", group_id=0,
            position=0, label="l", scorer="refusal", scorer_version=2, error="")
        paths.append(str(tmp_path / f"{cond}.parquet"))
        df[SCORED_COLUMNS].to_parquet(paths[-1])
    flips = tmp_path / "flips.parquet"
    assert cli(["flips", *paths, "--baseline", "sync_b1", "--dispatch-baseline",
                "list=list_b1", "--out", str(flips)]) == 0
    f = pd.read_parquet(flips)
    assert sorted(set(zip(f["condition"], f["baseline_condition"], strict=True))) == [
        ("list_b4", "list_b1"), ("sync_b4", "sync_b1")]
    out = tmp_path / "a.json"
    assert cli(["discovery", "numbers", "--study", "a", "--baseline", "sync_b1", "--flips",
                str(flips), "--scored", *paths, "--out", str(out)]) == 0
    num = json.loads(out.read_text())["numbers"]
    assert "list_b4 vs list_b1" in num["a/m/list_b4/safety_flip_rate"]["definition"]
    assert "sync_b4 vs sync_b1" in num["a/m/sync_b4/safety_flip_rate"]["definition"]
    assert (num["a/m/list_pooled/safety_flip_rate"]["k"],
            num["a/m/list_pooled/safety_flip_rate"]["n"]) == (1, 2)
