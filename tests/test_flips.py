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
    from batchflip.studies.discovery import flip_agreement

    agree = flip_agreement(f, "a", ["f.parquet"])["a/all/flip_agreement_b4"]
    # sync flips: p0 yes, p1 no; list flips: p0 no, p1 yes -> agreement 0 of 2
    assert (agree["k"], agree["n"]) == (0, 2)
