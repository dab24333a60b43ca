"""Failed requests (batchflip.failures): never scored, paired or counted as answers.

Generation records are written by hand with the three kinds of failure the server client
keeps as rows (``finish_reason "error"``, empty text, the error text): a time-out, an HTTP
400 and a server that went away (connection refused). Each failed row is placed where, if
its empty text were scored as before (empty = refused, no letter = wrong), it would have
made a flip. The real score -> flips -> numbers -> paper functions and CLI run on them; the
expected counts are worked out by hand below.

Battery: h0..h4 refusal prompts, q0 and q1 multiple choice (reference A).

    prompt  sync_b1 (baseline)       sync_b4                    pair?   flip?
    h0      REFUSE (1)               REFUSE (1)                 yes     no
    h1      COMPLY (0)               time-out                   no      -
    h2      COMPLY (0)               connection refused         no      -
    h3      REFUSE (1)               COMPLY (0)                 yes     yes, to unsafe
    h4      connection refused       REFUSE (1)                 no      -
    q0      "A" (1)                  HTTP 400                   no      -
    q1      "B" (0)                  "B" (0)                    yes     no
    filler  -                        HTTP 400 (filler, sync_b4 tail: not a target)

    failed targets: sync_b1 1 of 7 (14.29%), sync_b4 3 of 7 (42.86%); first errors in
    file order: sync_b1 h4 (connection refused), sync_b4 h1 (time-out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchflip.cli import main as cli_main
from batchflip.config import check_schema
from batchflip.errors import BatchflipError
from batchflip.failures import error_numbers, failed_mask
from batchflip.flips import pair_flips
from batchflip.io import write_parquet
from batchflip.paper import build_bundle, failure_summary
from batchflip.records import GENERATION_COLUMNS
from batchflip.scoring import score_frame
from batchflip.studies import ablation
from batchflip.studies.composition import cobatch_verification, composition_numbers
from batchflip.studies.discovery import discovery_numbers

ROOT = Path(__file__).resolve().parents[1]
REFUSE, COMPLY = "I cannot help with that.", "Sure, here is how you do it."
TIMEOUT = "timeout (ReadTimeout): timed out (after 3 attempts)"
HTTP400 = ("HTTP 400: This model's maximum context length is 2048 tokens; the prompt has "
           "2107 (after 1 attempt)")
GONE = "ConnectError: [Errno 111] Connection refused (after 3 attempts)"
META = json.dumps({"filters": ["strip_whitespace"]})
FAILED = {"h1", "h2", "h4", "q0"}


def _battery() -> pd.DataFrame:
    rows = [{"prompt_id": f"h{i}", "task": "harm", "domain": "safety", "scorer": "refusal",
             "prompt": f"harmful {i}", "reference": "REFUSAL_EXPECTED", "meta": META}
            for i in range(5)]
    rows += [{"prompt_id": f"q{i}", "task": "mc", "domain": "capability", "scorer":
              "mc_letter", "prompt": f"question {i}", "reference": "A", "meta": META}
             for i in range(2)]
    return pd.DataFrame(rows)


def _gen(condition: str, groups: list[list[tuple[str, str, str | None, str | None]]]
         ) -> pd.DataFrame:
    """Generation records; each member is (role, prompt id, text, error) by position."""
    bs = int(condition.split("_b")[1])
    rows = []
    for gid, members in enumerate(groups):
        for pos, (role, pid, text, err) in enumerate(members):
            rows.append({"study": "a", "model": "m", "condition": condition, "batch_size": bs,
                         "dispatch": "sync", "kernel_mode": "standard", "group_id": gid,
                         "position": pos, "role": role, "prompt_id": pid,
                         "text": "" if err else text, "token_ids": [] if err else [1, 2],
                         "finish_reason": "error" if err else "stop",
                         "n_tokens": 0 if err else 2, "t_submit": 0.0, "t_first": 0.1,
                         "t_done": 0.2, "seed": 42, "stack_id": f"stack-{condition}",
                         "attempts": 3 if err else 1, "error": err or ""})
    return pd.DataFrame(rows, columns=GENERATION_COLUMNS)


def _generations() -> dict[str, pd.DataFrame]:
    b1 = [[("target", "h0", REFUSE, None)], [("target", "h1", COMPLY, None)],
          [("target", "h2", COMPLY, None)], [("target", "h3", REFUSE, None)],
          [("target", "h4", None, GONE)], [("target", "q0", "A", None)],
          [("target", "q1", "B", None)]]
    b4 = [[("target", "h0", REFUSE, None), ("target", "h1", None, TIMEOUT),
           ("target", "h2", None, GONE), ("target", "h3", COMPLY, None)],
          [("target", "h4", REFUSE, None), ("target", "q0", None, HTTP400),
           ("target", "q1", "B", None), ("filler", "q1", None, HTTP400)]]
    return {"sync_b1": _gen("sync_b1", b1), "sync_b4": _gen("sync_b4", b4)}


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_score_keeps_failed_requests_unscored():
    scored = score_frame(_generations()["sync_b4"], _battery(), {"refusal": 2})
    s = scored.set_index("prompt_id")
    assert len(scored) == 7  # targets only: the failed filler is no row
    assert set(s.index[s["label"] == "error"]) == {"h1", "h2", "q0"}
    assert s.loc[["h1", "h2", "q0"], "score"].isna().all()  # not "refused", not "wrong"
    assert s.loc["h1", "error"] == TIMEOUT and s.loc["q0", "error"] == HTTP400
    assert s.loc["h2", "error"] == GONE
    assert (s.loc[["h0", "h3", "h4", "q1"], "error"] == "").all()
    assert s.loc[["h0", "h3", "h4", "q1"], "score"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # a failed row with no recorded text still counts as failed and says why
    gen = _generations()["sync_b4"].assign(error="")
    s2 = score_frame(gen, _battery(), {"refusal": 2}).set_index("prompt_id")
    assert s2.loc["h1", "label"] == "error"
    assert s2.loc["h1", "error"] == "finish_reason 'error' with no error text"


def test_no_flip_comes_from_a_failed_request():
    gens = _generations()
    scored = pd.concat([score_frame(g, _battery(), {"refusal": 2}) for g in gens.values()],
                       ignore_index=True)
    flips = pair_flips(scored, "sync_b1").set_index("prompt_id")
    assert sorted(flips.index) == ["h0", "h3", "q1"]  # h1, h2, q0, h4: a side failed
    assert flips["flip"].to_dict() == {"h0": False, "h3": True, "q1": False}
    assert flips.loc["h3", "direction"] == "to_unsafe"
    # the oracle for the bug: scored as answers, the failures would have made 4 more flips
    naive = scored.assign(score=scored["score"].fillna(1.0).where(
        scored["domain"] == "safety", scored["score"].fillna(0.0)), error="")
    naive_flips = pair_flips(naive, "sync_b1")
    assert int(naive_flips["flip"].sum()) == 4  # h1 and h2 to safe, q0, h3 (h4: same)
    # the numbers function sees the same pairs and refuses the 42.86% failed condition
    frames = {"b1": scored[scored["condition"] == "sync_b1"],
              "b4": scored[scored["condition"] == "sync_b4"]}
    num = discovery_numbers({"f": flips.reset_index()}, frames, "a", "sync_b1", 0.5)
    assert (num["a/m/sync_b4/safety_flip_rate"]["k"], num["a/all/sync_b4/safety_flip_rate"]
            ["n"]) == (1, 2)
    with pytest.raises(BatchflipError, match="b4: model 'm', condition 'sync_b4': 3 of 7"):
        discovery_numbers({"f": flips.reset_index()}, frames, "a", "sync_b1", 0.2)


def _write_inputs(tmp: Path) -> dict[str, Path]:
    paths = {"battery": tmp / "battery.parquet"}
    write_parquet(_battery(), paths["battery"])
    for cond, gen in _generations().items():
        g = tmp / "generations" / f"{cond}.parquet"
        write_parquet(gen, g)
        s = tmp / "scored" / "a" / "m" / f"{cond}.parquet"
        assert cli_main(["score", "--generations", str(g), "--battery", str(paths["battery"]),
                         "--versions", '{"refusal": 2}', "--out", str(s)]) == 0
        paths[cond] = s
    paths["flips"] = tmp / "flips" / "a" / "m.parquet"
    assert cli_main(["flips", str(paths["sync_b1"]), str(paths["sync_b4"]), "--baseline",
                     "sync_b1", "--out", str(paths["flips"])]) == 0
    return paths


def _numbers_argv(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["discovery", "numbers", "--study", "a", "--baseline", "sync_b1",
            "--flips", str(paths["flips"]),
            "--scored", str(paths["sync_b1"]), str(paths["sync_b4"]), *extra, "--out", str(out)]


def test_cli_counts_failures_per_condition_and_keeps_them_out_of_rates(tmp_path):
    paths = _write_inputs(tmp_path)
    flips = pd.read_parquet(paths["flips"])
    assert not set(flips["prompt_id"]) & FAILED and int(flips["flip"].sum()) == 1
    out = tmp_path / "numbers" / "a.json"
    assert cli_main(_numbers_argv(paths, out, "--max-error-share", "0.5")) == 0
    num = json.loads(out.read_text())["numbers"]
    for cond, k, first in (("sync_b1", 1, GONE), ("sync_b4", 3, TIMEOUT)):
        count, share = num[f"a/m/{cond}/error_count"], num[f"a/m/{cond}/error_share"]
        assert (count["value"], count["n"]) == (k, 7)
        assert (share["k"], share["n"]) == (k, 7) and share["value"] == pytest.approx(k / 7)
        lo, hi = _wilson(k, 7)
        assert share["ci_low"] == pytest.approx(lo) and share["ci_high"] == pytest.approx(hi)
        assert count["first_error"] == first == share["first_error"]
        assert count["inputs"] == [str(paths[cond])] and count["condition"] == cond
        assert count["stack_ids"] == [f"stack-{cond}"] and count["definition"]
    # rates rest on answered pairs only: safety h0, h3 (1 flip); capability q1 (0 flips)
    sf, cf = num["a/m/sync_b4/safety_flip_rate"], num["a/m/sync_b4/capability_flip_rate"]
    assert (sf["k"], sf["n"], cf["k"], cf["n"]) == (1, 2, 0, 1)
    assert num["a/m/sync_b4/identical_share"]["n"] == 3

    # the report shows them: one line and the conditions with failures
    bundle = tmp_path / "paper"
    build_bundle([str(out)], [], {}, bundle)
    html = (bundle / "report.html").read_text()
    assert "4 of 14 requests failed, in 2 of 2 (study, model, condition)" in html
    assert "3 / 7" in html and "1 / 7" in html and "42.86%" in html
    assert "timeout (ReadTimeout): timed out" in html


@pytest.mark.parametrize(("limit", "cond", "share", "first", "row", "prompt"), [
    (None, "sync_b1", "1 of 7 requests failed (14.29%)", GONE, 4, "h4"),  # default 1%
    ("0.2", "sync_b4", "3 of 7 requests failed (42.86%)", TIMEOUT, 1, "h1"),
])
def test_limit_fails_the_numbers_job_naming_file_and_first_error(
        tmp_path, capsys, limit, cond, share, first, row, prompt):
    paths = _write_inputs(tmp_path)
    out = tmp_path / "numbers" / "a.json"
    extra = ("--max-error-share", limit) if limit else ()
    capsys.readouterr()
    assert cli_main(_numbers_argv(paths, out, *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"batchflip discovery: error: {paths[cond]}: model 'm', condition "
                          f"'{cond}': {share}, above the limit errors.max_share = ")
    assert f"first error (row {row}, prompt '{prompt}'): {first}" in err
    assert not out.exists() and not list(out.parent.glob(".*"))  # nothing written


def test_limit_is_inclusive_and_independent_of_answered_rows():
    scored = {"s1.parquet": pd.DataFrame({
        "model": "m", "condition": "c", "prompt_id": [f"p{i}" for i in range(100)],
        "stack_id": "s", "error": ["boom"] + [""] * 99})}
    assert error_numbers(scored, "a", 0.01)["a/m/c/error_share"]["k"] == 1  # 1% is allowed
    with pytest.raises(BatchflipError, match=r"s1.parquet: .* 1 of 100 .*: boom"):
        error_numbers(scored, "a", 0.009)


def test_composition_leaves_failed_targets_out(tmp_path):
    """Study C: targets t0..t3; the baseline's t3 and the benign condition's t1 failed."""
    def scored(cond: str, refused: list[float | None]) -> pd.DataFrame:
        return pd.DataFrame({
            "model": "m", "condition": cond, "batch_size": 8, "dispatch": "cobatch",
            "prompt_id": [f"t{i}" for i in range(4)], "domain": "safety", "stack_id": "s",
            "score": [np.nan if r is None else r for r in refused],
            "error": ["" if r is not None else TIMEOUT for r in refused]})

    frames = {"solo.parquet": scored("cobatch_b8_solo", [1.0, 1.0, 0.0, None]),
              "benign.parquet": scored("cobatch_b8_benign", [1.0, None, 0.0, 1.0])}
    num = composition_numbers(frames, {}, "c", max_error_share=0.5)
    solo = num["c/m/cobatch_b8_solo/refusal_rate"]
    benign = num["c/m/cobatch_b8_benign/refusal_rate"]
    assert (solo["k"], solo["n"], benign["k"], benign["n"]) == (2, 3, 2, 3)
    assert num["c/m/cobatch_b8_benign/paired_n"]["value"] == 2  # t0 and t2 only
    assert num["c/m/cobatch_b8_benign/to_unsafe"]["value"] == 0
    assert num["c/m/cobatch_b8_benign/to_safe"]["value"] == 0
    assert num["c/m/cobatch_b8_solo/error_count"]["value"] == 1
    assert num["c/m/cobatch_b8_benign/error_share"]["k"] == 1
    with pytest.raises(BatchflipError, match="benign.parquet: model 'm', condition "
                       "'cobatch_b8_benign': 1 of 4 .*timeout"):
        composition_numbers(frames, {}, "c", max_error_share=0.2)

    # verification: a failed target has no decode interval; a failed filler never overlaps
    gen = pd.DataFrame({
        "model": "m", "condition": "cobatch_b8_benign", "group_id": [0, 0, 1, 1],
        "role": ["target", "filler", "target", "filler"], "prompt_id": ["t0", "f", "t1", "f"],
        "t_first": [0.0, 0.0, 5.0, 0.0], "t_done": [1.0, 1.0, 5.0, 1.0],
        "finish_reason": ["stop", "stop", "error", "stop"], "error": ["", "", GONE, ""]})
    ver = cobatch_verification(gen)
    assert ver["prompt_id"].tolist() == ["t0"] and ver["verified"].tolist() == [True]
    gen.loc[1, ["finish_reason", "error"]] = ["error", HTTP400]
    assert cobatch_verification(gen)["verified"].tolist() == [False]


def test_ablation_leaves_failed_reruns_out():
    """Study D: c1 and c2 flip under standard; under batch_invariant c1 holds and c2's group
    rerun failed (a server time-out), so c2 has no pair under that mode."""
    cands = pd.DataFrame([{col: None for col in ablation.CANDIDATE_COLUMNS}
                          | {"candidate_id": c, "model": "m", "task": "harm",
                             "domain": "safety", "prompt_id": c, "condition": "sync_b4",
                             "dispatch": "sync", "batch_size": 4, "direction": "to_unsafe",
                             "source_text": "src", "baseline_text": "base"}
                          for c in ("c1", "c2")])
    runs = []
    for mode, outcome in (("standard", {"c1": 0.0, "c2": 0.0}),
                          ("batch_invariant", {"c1": 1.0, "c2": None})):
        for cid, group in outcome.items():
            runs.append({"model": "m", "candidate_id": cid, "kernel_mode": mode, "run": "alone",
                         "score": 1.0, "text": REFUSE, "stack_id": mode, "error": ""})
            runs.append({"model": "m", "candidate_id": cid, "kernel_mode": mode, "run": "group",
                         "score": np.nan if group is None else group,
                         "text": "" if group is None else (REFUSE if group else COMPLY),
                         "stack_id": mode, "error": TIMEOUT if group is None else ""})
    modes = ["standard", "batch_invariant"]
    compared = ablation.compare_runs(cands, pd.DataFrame(runs), modes)
    failed = compared.set_index(["kernel_mode", "candidate_id"])["failed"]
    assert failed.to_dict() == {("batch_invariant", "c1"): False,
                                ("batch_invariant", "c2"): True,
                                ("standard", "c1"): False, ("standard", "c2"): False}
    num = ablation.ablation_numbers(cands, compared, "d", modes, ["x"],
                                    {("m", m): m for m in modes}, "a")
    bi = num["d/m/batch_invariant/text_change_rate"]
    assert (bi["k"], bi["n"]) == (0, 1)  # the failed rerun is no text change
    st = num["d/m/standard/label_flip_rate"]
    assert (st["k"], st["n"]) == (2, 2)
    mc = num["d/m/standard_vs_batch_invariant/label_mcnemar_p"]
    assert (mc["b"], mc["c"], mc["n"]) == (1, 0, 1)  # c1 only: c2 has no pair


def test_failed_mask_reads_either_marker():
    df = pd.DataFrame({"finish_reason": ["stop", "error", "length", "stop"],
                       "error": ["", "", "boom", None]})
    assert failed_mask(df).tolist() == [False, True, True, False]
    assert failed_mask(df[["finish_reason"]]).tolist() == [False, True, False, False]
    assert failed_mask(pd.DataFrame({"x": [1]})).tolist() == [False]


def test_report_says_when_nothing_failed():
    rec = {"value": 0, "n": 7, "errors": True, "max_share": 0.01}
    summary = failure_summary({"a/m/sync_b1/error_count": rec,
                               "b/m/sync_b4/error_count": {**rec, "n": 5}})
    assert summary["failed"] == []
    assert summary["line"] == ("No failed requests: all 12 requests of 2 (study, model, "
                               "condition) were answered.")


def test_config_key_errors_max_share():
    schema = ROOT / "workflow/schemas/config.schema.yaml"
    import yaml

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    check_schema({**config, "errors": {"max_share": 0.05}}, schema)
    with pytest.raises(BatchflipError, match="errors.max_share"):
        check_schema({**config, "errors": {"max_share": 1.5}}, schema)
