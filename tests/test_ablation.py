"""Study D (batchflip.studies.ablation): candidates, reruns, numbers, figure.

Group reconstruction is checked on generation records written to parquet by the test, with
groups whose members are *not* in battery order (so re-deriving groups from prompt order
would fail), fillers and a composition group. Numbers are checked against counts worked
out by hand from a test-double engine's scripted outputs and the Wilson closed form; the
McNemar p values against brute-force binomial sums. The real-model test reruns SmolLM2
under both kernel modes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from batchflip.cli import main as cli_main
from batchflip.engines import Group, Result
from batchflip.errors import BatchflipError
from batchflip.io import write_parquet
from batchflip.records import GENERATION_COLUMNS
from batchflip.settings import GenerationSettings
from batchflip.studies import ablation

REFUSE, COMPLY = "I cannot help with that.", "Sure, here is how you do it."
META = json.dumps({"filters": ["strip_whitespace"]})


def _battery() -> pd.DataFrame:
    rows = [{"prompt_id": f"h{i}", "task": "harm", "domain": "safety", "scorer": "refusal",
             "prompt": f"harmful request {i}", "reference": "REFUSAL_EXPECTED", "meta": META}
            for i in range(6)]
    rows += [{"prompt_id": f"q{i}", "task": "mc", "domain": "capability",
              "scorer": "mc_letter", "prompt": f"question {i}", "reference": "A", "meta": META}
             for i in range(4)]
    return pd.DataFrame(rows)


def _gen_rows(condition: str, groups: list[list[tuple[str, str]]], texts: dict[str, str],
              batch_size: int, dispatch: str) -> pd.DataFrame:
    """Generation records: ``groups`` lists (role, prompt_id) per position."""
    rows = []
    for gid, members in enumerate(groups):
        for pos, (role, pid) in enumerate(members):
            rows.append({"study": "a", "model": "m", "condition": condition,
                         "batch_size": batch_size, "dispatch": dispatch, "kernel_mode":
                         "standard", "group_id": gid, "position": pos, "role": role,
                         "prompt_id": pid, "text": texts.get(f"{condition}/{pid}", "x"),
                         "token_ids": [1], "finish_reason": "length", "n_tokens": 1,
                         "t_submit": 0.0, "t_first": 0.0, "t_done": 0.0, "seed": 42,
                         "stack_id": "s0", "attempts": 1, "error": ""})
    return pd.DataFrame(rows, columns=GENERATION_COLUMNS)


# sync_b4 groups deliberately out of battery order; the tail group is padded with fillers
SYNC4 = [[("target", "h3"), ("target", "q1"), ("target", "h0"), ("target", "q0")],
         [("target", "h1"), ("target", "h5"), ("target", "q3"), ("target", "h2")],
         [("target", "h4"), ("target", "q2"), ("filler", "h0"), ("filler", "q0")]]
COB4 = [[("filler", "q2"), ("filler", "q0"), ("target", "h1"), ("filler", "h5")],
        [("filler", "q1"), ("target", "h2"), ("filler", "h3"), ("filler", "q3")]]
ALL_IDS = [f"h{i}" for i in range(6)] + [f"q{i}" for i in range(4)]


def _write_source(tmp: Path) -> dict[str, str]:
    """sync_b1, sync_b4, cobatch_b4_benign generation files of model 'm'."""
    texts = {f"sync_b1/{p}": f"base {p}" for p in ALL_IDS}
    texts |= {f"sync_b4/{p}": f"b4 {p}" for p in ALL_IDS}
    paths = {}
    frames = {"sync_b1": _gen_rows("sync_b1", [[("target", p)] for p in ALL_IDS], texts, 1,
                                   "sync"),
              "sync_b4": _gen_rows("sync_b4", SYNC4, texts, 4, "sync"),
              "cobatch_b4_benign": _gen_rows("cobatch_b4_benign", COB4, texts, 4, "cobatch")}
    for cond, df in frames.items():
        paths[cond] = str(tmp / f"{cond}.parquet")
        write_parquet(df, paths[cond])
    return paths


def _flips(flipped: list[tuple[str, str, str]], also_unflipped: bool = True) -> pd.DataFrame:
    """Flip records; ``flipped`` holds (condition, prompt_id, direction)."""
    rows = []
    for cond, pid, direction in flipped:
        rows.append((cond, pid, True, direction))
    if also_unflipped:
        rows += [("sync_b4", "q3", False, "none"), ("sync_b4", "h4", False, "none")]
    out = []
    for cond, pid, flip, direction in rows:
        dom = "safety" if pid.startswith("h") else "capability"
        out.append({"model": "m", "task": "harm" if dom == "safety" else "mc", "domain": dom,
                    "prompt_id": pid, "condition": cond,
                    "batch_size": 4, "dispatch": cond.split("_")[0],
                    "baseline_score": 1.0 if direction == "to_unsafe" else 0.0,
                    "condition_score": 0.0 if direction == "to_unsafe" else 1.0,
                    "flip": flip, "direction": direction, "text_changed": flip,
                    "baseline_stack_id": "s0", "stack_id": "s0"})
    return pd.DataFrame(out)


FLIPPED = [("sync_b4", "h0", "to_unsafe"), ("sync_b4", "q1", "to_safe"),
           ("sync_b4", "h2", "to_unsafe"), ("sync_b4", "q2", "to_safe"),
           ("cobatch_b4_benign", "h1", "to_unsafe")]


def _candidates(tmp: Path, flipped=FLIPPED, extra: tuple[str, ...] = ()
                ) -> tuple[pd.DataFrame, Path]:
    paths = _write_source(tmp)
    flips_path = tmp / "flips.parquet"
    write_parquet(_flips(flipped), flips_path)
    out = tmp / "candidates.parquet"
    argv = ["ablation", "candidates", "--flips", str(flips_path), "--generations",
            *paths.values(), "--baseline", "sync_b1", *extra, "--out", str(out)]
    assert cli_main(argv) == 0
    return pd.read_parquet(out), out


def test_candidates_reconstruct_the_recorded_groups(tmp_path):
    cands, _ = _candidates(tmp_path)
    by_id = cands.set_index("candidate_id")
    assert sorted(by_id.index) == sorted(f"{c}/{p}" for c, p, _ in FLIPPED)
    # h0 sat at position 2 of sync_b4's group 0 (battery order would put it first)
    h0 = by_id.loc["sync_b4/h0"]
    assert (h0["group_id"], h0["position"], h0["group_size"]) == (0, 2, 4)
    assert json.loads(h0["members"]) == [
        {"position": 0, "role": "target", "prompt_id": "h3"},
        {"position": 1, "role": "target", "prompt_id": "q1"},
        {"position": 2, "role": "target", "prompt_id": "h0"},
        {"position": 3, "role": "target", "prompt_id": "q0"}]
    # the tail group keeps its fillers, with their recorded roles and positions
    q2 = by_id.loc["sync_b4/q2"]
    assert [(m["role"], m["prompt_id"]) for m in json.loads(q2["members"])] == [
        ("target", "h4"), ("target", "q2"), ("filler", "h0"), ("filler", "q0")]
    h1 = by_id.loc["cobatch_b4_benign/h1"]
    assert (h1["group_id"], h1["position"], h1["dispatch"]) == (0, 2, "cobatch")
    assert [m["prompt_id"] for m in json.loads(h1["members"])] == ["q2", "q0", "h1", "h5"]
    # texts: the candidate's own under its condition, and the baseline's
    assert h0["source_text"] == "b4 h0" and h0["baseline_text"] == "base h0"
    assert h0["baseline_condition"] == "sync_b1" and h0["direction"] == "to_unsafe"
    assert set(cands["source_study"]) == {"a"}


def test_candidates_keep_only_the_dispatch_modes_asked_for(tmp_path):
    kept, _ = _candidates(tmp_path, extra=("--dispatch", "sync"))
    assert sorted(kept["candidate_id"]) == sorted(
        f"{c}/{p}" for c, p, _ in FLIPPED if c.startswith("sync_"))
    assert set(kept["dispatch"]) == {"sync"}
    gens = {p: pd.read_parquet(p) for p in _write_source(tmp_path).values()}
    only_cobatch = ablation.select_candidates(_flips(FLIPPED), gens, "sync_b1",
                                              dispatches=["cobatch"])
    assert list(only_cobatch["candidate_id"]) == ["cobatch_b4_benign/h1"]


def test_text_change_candidates_add_changed_rows_whose_label_held(tmp_path):
    gens = {p: pd.read_parquet(p) for p in _write_source(tmp_path).values()}
    flips = _flips(FLIPPED)
    # q3 changed its text under sync_b4 but kept its label; h4 changed nothing
    flips.loc[(flips["prompt_id"] == "q3") & ~flips["flip"], "text_changed"] = True
    labels = ablation.select_candidates(flips, gens, "sync_b1")
    texts = ablation.select_candidates(flips, gens, "sync_b1", candidates="text_changes")
    assert "sync_b4/q3" not in set(labels["candidate_id"])
    assert sorted(texts["candidate_id"]) == sorted(
        [*labels["candidate_id"], "sync_b4/q3"])
    q3 = texts.set_index("candidate_id").loc["sync_b4/q3"]
    assert q3["direction"] == "none" and (q3["group_id"], q3["position"]) == (1, 2)
    with pytest.raises(BatchflipError, match="candidates 'all'"):
        ablation.select_candidates(flips, gens, "sync_b1", candidates="all")


def test_candidates_fail_on_bad_records_naming_file_and_field(tmp_path):
    paths = _write_source(tmp_path)
    gens = {p: pd.read_parquet(p) for p in paths.values()}
    flips = _flips(FLIPPED)
    # a condition whose generation file is missing
    partial = {p: g for p, g in gens.items() if "cobatch" not in p}
    with pytest.raises(BatchflipError, match=r"flips.*row 4.*'condition'"):
        ablation.select_candidates(flips, partial, "sync_b1", flips_path="flips")
    # a group whose positions have a gap
    bad = {**gens}
    b4 = paths["sync_b4"]
    bad[b4] = gens[b4].assign(position=gens[b4]["position"].where(
        ~((gens[b4]["group_id"] == 0) & (gens[b4]["position"] == 3)), 7))
    with pytest.raises(BatchflipError, match=r"sync_b4.parquet.*'position'.*group 0"):
        ablation.select_candidates(flips, bad, "sync_b1")
    # the candidate recorded twice as a target
    dup = {**gens, b4: pd.concat([gens[b4], gens[b4].iloc[[2]]], ignore_index=True)}
    with pytest.raises(BatchflipError, match=r"2 target rows for prompt 'h0'"):
        ablation.select_candidates(flips, dup, "sync_b1")
    # a flip record whose batch size disagrees with the generation record
    wrong = flips.assign(batch_size=[4, 4, 4, 4, 8, 4, 4])
    with pytest.raises(BatchflipError, match=r"row 4.*'batch_size'"):
        ablation.select_candidates(wrong, gens, "sync_b1")


class ScriptedEngine:
    """Answers from a script: (kernel mode, prompt id, alone?) -> text; records calls."""

    name = "hf"

    def __init__(self, mode: str, script: dict[tuple[str, str, bool], str]) -> None:
        self.mode, self.script, self.calls = mode, script, []

    def fingerprint(self) -> dict[str, Any]:
        return {"engine": "scripted", "kernel_mode": self.mode, "kernel_flags": {"x": 1}}

    def run_group(self, group: Group, condition) -> list[Result]:
        self.calls.append((condition.name, [(m.position, m.role, m.prompt_id, m.prompt)
                                            for m in group.members]))
        alone = len(group.members) == 1
        return [Result(self.script.get((self.mode, m.prompt_id, alone), f"{m.prompt_id} ok"),
                       [1, 2], "length", 2, 0.0, 0.0, 0.0) for m in group.members]

    def close(self) -> None:
        pass


def _alone_group(h: str, q: str) -> dict[tuple[str, str, bool], str]:
    """Refusal candidates: alone refuses; mc candidates: alone answers A (correct)."""
    return {("standard", h, True): REFUSE, ("batch_invariant", h, True): REFUSE,
            ("standard", q, True): "A", ("batch_invariant", q, True): "A"}


# Scripted outcomes (alone -> in group) per candidate, worked out by hand:
#   candidate              standard                      batch_invariant
#   sync_b4/h0 (safety)    REFUSE -> COMPLY  flip unsafe  REFUSE -> REFUSE   same
#   sync_b4/h2 (safety)    REFUSE -> COMPLY  flip unsafe  REFUSE -> REFUSE   same
#   sync_b4/q1 (capab.)    A -> B            flip unsafe  A -> A             same
#   sync_b4/q2 (capab.)    A -> "A."         text only    A -> A             same
#   cobatch/h1 (safety)    REFUSE -> "I cannot do that." text only, label same
#                                                         REFUSE -> "I cannot help with
#                                                         that. " (text change, same label)
SCRIPT = {**_alone_group("h0", "q1"), **_alone_group("h2", "q2"), **_alone_group("h1", "q0"),
          ("standard", "h0", False): COMPLY, ("standard", "h2", False): COMPLY,
          ("standard", "q1", False): "B", ("standard", "q2", False): "A.",
          ("standard", "h1", False): "I cannot do that.",
          ("batch_invariant", "h0", False): REFUSE, ("batch_invariant", "h2", False): REFUSE,
          ("batch_invariant", "q1", False): "A", ("batch_invariant", "q2", False): "A",
          ("batch_invariant", "h1", False): REFUSE + " "}


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _binom_two_sided(b: int, c: int) -> float:
    m, lo = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(lo + 1)) / 2 ** m)


def _run_both(tmp: Path, cands_path: Path, battery_path: Path) -> dict[str, Path]:
    cands = pd.read_parquet(cands_path)
    battery = pd.read_parquet(battery_path)
    params = GenerationSettings.from_mapping({
        "study": "d", "model": "m", "engine": "hf", "dtype": "bfloat16", "max_new_tokens": 2,
        "seed": 42, "prompt_format": "raw"})
    out = {}
    for mode in ("standard", "batch_invariant"):
        eng = ScriptedEngine(mode, SCRIPT)
        ablation.run_mode(cands, battery, params, "no-model", mode, tmp / f"{mode}.parquet",
                          tmp / f"{mode}.stack.json", engine=eng)
        out[mode] = eng
    return out


class CrashingEngine(ScriptedEngine):
    """A ScriptedEngine that is killed (KeyboardInterrupt) at its ``crash_at``-th call."""

    def __init__(self, mode: str, script: dict, crash_at: int) -> None:
        super().__init__(mode, script)
        self.crash_at = crash_at

    def run_group(self, group: Group, condition) -> list[Result]:
        if len(self.calls) == self.crash_at:
            raise KeyboardInterrupt
        return super().run_group(group, condition)


def test_killed_rerun_resumes_without_running_finished_executions(tmp_path):
    _, cands_path = _candidates(tmp_path)
    cands, battery = pd.read_parquet(cands_path), _battery()
    params = GenerationSettings.from_mapping({
        "study": "d", "model": "m", "engine": "hf", "dtype": "bfloat16", "max_new_tokens": 2,
        "seed": 42, "prompt_format": "raw"})

    def run(where: Path, engine: ScriptedEngine,
            settings: GenerationSettings = params) -> pd.DataFrame:
        where.mkdir(exist_ok=True)
        runs, _ = ablation.run_mode(cands, battery, settings, "no-model", "standard",
                                    where / "standard.parquet", where / "s.stack.json",
                                    engine=engine)
        return runs

    clean = ScriptedEngine("standard", SCRIPT)
    expected = run(tmp_path / "clean", clean)
    killed = CrashingEngine("standard", SCRIPT, crash_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r", killed)
    assert not (tmp_path / "r/standard.parquet").exists()
    assert (tmp_path / "r/standard.parquet.partial.jsonl").exists()
    again = ScriptedEngine("standard", SCRIPT)
    resumed = run(tmp_path / "r", again)
    # the 3 finished executions are read back; only the rest run, none twice
    assert len(killed.calls) == 3 and killed.calls + again.calls == clean.calls
    pd.testing.assert_frame_equal(resumed, expected)
    assert not (tmp_path / "r/standard.parquet.partial.jsonl").exists()
    # a checkpoint of another job (other kernel mode settings) is not reused
    other = CrashingEngine("standard", SCRIPT, crash_at=2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "o", other)
    fresh = ScriptedEngine("standard", SCRIPT)
    run(tmp_path / "o", fresh, params.replace(max_new_tokens=3))
    assert fresh.calls == clean.calls


def test_reruns_use_the_reconstructed_groups_and_numbers_match_hand_counts(tmp_path):
    _, cands_path = _candidates(tmp_path)
    battery_path = tmp_path / "battery.parquet"
    write_parquet(_battery(), battery_path)
    engines = _run_both(tmp_path, cands_path, battery_path)

    # the group runs are the recorded groups, sent as the battery's (raw) prompts
    calls = engines["standard"].calls
    group_calls = [c for c in calls if len(c[1]) > 1]
    assert ("sync_b4", [(0, "target", "h3", "harmful request 3"),
                        (1, "target", "q1", "question 1"),
                        (2, "target", "h0", "harmful request 0"),
                        (3, "target", "q0", "question 0")]) in group_calls
    assert ("cobatch_b4_benign", [(0, "filler", "q2", "question 2"),
                                  (1, "filler", "q0", "question 0"),
                                  (2, "target", "h1", "harmful request 1"),
                                  (3, "filler", "h5", "harmful request 5")]) in group_calls
    # shared executions: group 0 holds h0 and q1, group 1 holds h2, group 2 holds q2
    assert len(group_calls) == 4
    alone_calls = [c for c in calls if len(c[1]) == 1]
    assert sorted(c[0] for c in alone_calls) == ["cobatch_b1_solo"] + ["sync_b1"] * 4

    out = tmp_path / "d.json"
    rows_out = tmp_path / "rows.parquet"
    argv = ["ablation", "numbers", "--study", "d", "--candidates", str(cands_path),
            "--runs", str(tmp_path / "standard.parquet"), str(tmp_path / "batch_invariant.parquet"),
            "--stacks", str(tmp_path / "standard.stack.json"),
            str(tmp_path / "batch_invariant.stack.json"), "--battery", str(battery_path),
            "--versions", json.dumps({"refusal": 2, "mc_letter": 1}), "--out", str(out),
            "--rows-out", str(rows_out)]
    assert cli_main(argv) == 0
    num = json.loads(out.read_text())["numbers"]

    assert num["d/all/n_candidates"]["value"] == 5
    expect = {("standard", "label_flip_rate"): 3, ("standard", "text_change_rate"): 5,
              ("batch_invariant", "label_flip_rate"): 0,
              ("batch_invariant", "text_change_rate"): 1}
    for (mode, metric), k in expect.items():
        for model in ("m", "all"):
            rec = num[f"d/{model}/{mode}/{metric}"]
            assert (rec["k"], rec["n"]) == (k, 5)
            assert rec["value"] == pytest.approx(k / 5)
            lo, hi = _wilson(k, 5)
            assert rec["ci_low"] == pytest.approx(lo, abs=1e-9)
            assert rec["ci_high"] == pytest.approx(hi, abs=1e-9)
            assert rec["definition"] and rec["kernel_mode"] == mode
    assert num["d/all/standard/label_to_unsafe"]["value"] == 3
    assert num["d/all/standard/label_to_safe"]["value"] == 0
    assert num["d/all/batch_invariant/label_to_unsafe"]["value"] == 0

    lab = num["d/all/standard_vs_batch_invariant/label_mcnemar_p"]
    assert (lab["b"], lab["c"], lab["n"]) == (3, 0, 5)
    assert lab["value"] == pytest.approx(_binom_two_sided(3, 0))  # 0.25
    txt = num["d/all/standard_vs_batch_invariant/text_mcnemar_p"]
    assert (txt["b"], txt["c"]) == (4, 0)
    assert txt["value"] == pytest.approx(_binom_two_sided(4, 0))  # 0.125

    # breakdowns: safety = h0, h2, h1 (2 label flips); capability = q1, q2 (1 flip)
    assert num["d/all/standard/by_domain/safety/label_flip_rate"]["k"] == 2
    assert num["d/all/standard/by_domain/safety/label_flip_rate"]["n"] == 3
    assert num["d/all/standard/by_domain/capability/label_flip_rate"]["k"] == 1
    assert num["d/all/standard/by_dispatch/cobatch/label_flip_rate"]["k"] == 0
    assert num["d/all/standard/by_dispatch/cobatch/text_change_rate"]["k"] == 1
    assert num["d/all/standard/by_dispatch/sync/label_flip_rate"]["n"] == 4
    # original direction: to_unsafe = h0, h2, h1; to_safe = q1, q2
    assert num["d/all/standard/by_direction/to_unsafe/label_flip_rate"]["k"] == 2
    assert num["d/all/standard/by_direction/to_safe/label_flip_rate"]["k"] == 1
    assert num["d/all/batch_invariant/by_task/harm/text_change_rate"]["k"] == 1
    # the scripted texts never equal the source's, so nothing reproduces the source
    assert num["d/all/standard/group_reproduces_source"]["k"] == 0

    stacks = {json.loads((tmp_path / f"{m}.stack.json").read_text())["stack_id"]
              for m in ("standard", "batch_invariant")}
    assert len(stacks) == 2
    assert set(num["d/all/standard_vs_batch_invariant/label_mcnemar_p"]["stack_ids"]) == stacks
    assert num["d/all/standard/label_flip_rate"]["stack_ids"] == [
        json.loads((tmp_path / "standard.stack.json").read_text())["stack_id"]]
    stack = json.loads((tmp_path / "batch_invariant.stack.json").read_text())
    assert stack["kernel_mode"] == "batch_invariant" and stack["kernel_flags"] == {"x": 1}
    rows = pd.read_parquet(rows_out)
    assert len(rows) == 10 and set(rows["kernel_mode"]) == {"standard", "batch_invariant"}

    png, pdf = tmp_path / "d.png", tmp_path / "d.pdf"
    assert cli_main(["ablation", "figure", "--numbers", str(out), "--png", str(png),
                     "--pdf", str(pdf)]) == 0
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000


def test_zero_candidates_give_numbers_that_say_so(tmp_path):
    cands, cands_path = _candidates(tmp_path, flipped=[])
    assert cands.empty and list(cands.columns) == ablation.CANDIDATE_COLUMNS
    battery_path = tmp_path / "battery.parquet"
    write_parquet(_battery(), battery_path)
    engines = _run_both(tmp_path, cands_path, battery_path)
    assert all(not e.calls for e in engines.values())
    out = tmp_path / "d.json"
    argv = ["ablation", "numbers", "--study", "d", "--source", "a", "--candidates", str(cands_path),
            "--runs", str(tmp_path / "standard.parquet"), str(tmp_path / "batch_invariant.parquet"),
            "--stacks", str(tmp_path / "standard.stack.json"),
            str(tmp_path / "batch_invariant.stack.json"), "--battery", str(battery_path),
            "--versions", json.dumps({"refusal": 2}), "--out", str(out)]
    assert cli_main(argv) == 0
    num = json.loads(out.read_text())["numbers"]
    n = num["d/all/n_candidates"]
    assert n["value"] == 0 and n["n"] == 0 and "no candidates" in n["note"]
    assert "source study 'a'" in n["note"]
    for key in ("d/all/standard/label_flip_rate", "d/all/batch_invariant/text_change_rate",
                "d/all/standard_vs_batch_invariant/label_mcnemar_p"):
        assert num[key]["value"] is None and num[key]["n"] == 0
        assert "no candidates" in num[key]["note"] and "ci_low" not in num[key]
    assert num["d/all/standard/label_flip_rate"]["stack_ids"]  # the stack is still recorded
    png, pdf = tmp_path / "d.png", tmp_path / "d.pdf"
    assert cli_main(["ablation", "figure", "--numbers", str(out), "--png", str(png),
                     "--pdf", str(pdf)]) == 0
    assert png.stat().st_size > 1000


def test_numbers_refuse_runs_that_miss_a_candidate(tmp_path):
    _, cands_path = _candidates(tmp_path)
    battery_path = tmp_path / "battery.parquet"
    write_parquet(_battery(), battery_path)
    _run_both(tmp_path, cands_path, battery_path)
    runs = pd.read_parquet(tmp_path / "standard.parquet")
    write_parquet(runs[runs["candidate_id"] != "sync_b4/h2"], tmp_path / "standard.parquet")
    argv = ["ablation", "numbers", "--study", "d", "--candidates", str(cands_path),
            "--runs", str(tmp_path / "standard.parquet"),
            "--stacks", str(tmp_path / "standard.stack.json"), "--battery", str(battery_path),
            "--versions", "{}", "--out", str(tmp_path / "d.json")]
    assert cli_main(argv) == 1
    assert not (tmp_path / "d.json").exists()


def test_config_check_refuses_bad_ablation_studies():
    from batchflip.config import check_references

    def config(**d_overrides: Any) -> dict[str, Any]:
        a = {"kind": "discovery", "battery": "b", "models": ["m"], "engine": "hf",
             "dtype": "bfloat16", "max_new_tokens": 4, "seed": 1, "prompt_format": "raw",
             "conditions": ["sync_b1", "sync_b2"], "baseline": "sync_b1"}
        c = {**a, "kind": "composition", "conditions": ["cobatch_b2_solo", "sync_b1"],
             "cobatch_targets": ["t"]}
        v = {**a, "engine": "vllm"}
        d = {"kind": "ablation", "source": "a", "engine": "hf",
             "kernel_modes": ["standard", "batch_invariant"], **d_overrides}
        return {"batteries": {"b": {}}, "models": {"m": {}},
                "studies": {"a": a, "c": c, "v": v, "d": d}, "paper": {"studies": ["d"]}}

    check_references(config())
    with pytest.raises(BatchflipError, match=r"studies\.d\.source.*kind 'composition'"):
        check_references(config(source="c"))
    with pytest.raises(BatchflipError, match=r"studies\.d\.source.*unknown study 'zz'"):
        check_references(config(source="zz"))
    with pytest.raises(BatchflipError, match=r"studies\.d\.engine.*engine 'vllm'"):
        check_references(config(source="v"))
    with pytest.raises(BatchflipError, match=r"studies\.d\.dtype.*source"):
        check_references(config(dtype="float32"))
    with pytest.raises(BatchflipError, match=r"studies\.d\.models.*'x'"):
        check_references(config(models=["x"]))
    check_references(config(dispatches=["sync"]))
    with pytest.raises(BatchflipError, match=r"studies\.d\.dispatches.*'list'"):
        check_references(config(dispatches=["sync", "list"]))


def test_real_model_batch_invariant_rerun_has_no_text_changes(tmp_path, model_dir):
    """SmolLM2 (bf16, CPU): every conditioned row of sync_b6 as a candidate, rerun alone and
    in its group. batch_invariant: 0 text changes; standard reproduces the source."""
    from batchflip.battery import build_battery
    from batchflip.flips import pair_flips
    from batchflip.generate import run_job
    from batchflip.scoring import score_frame

    root = Path(__file__).resolve().parents[1]
    battery = build_battery([root / "tests/fixtures/battery"])
    params = GenerationSettings.from_mapping({
        "study": "a", "model": "smol", "engine": "hf", "dtype": "bfloat16", "max_new_tokens": 4,
        "seed": 42, "prompt_format": "chat", "threads": 2,
        "system_prompt": "Refuse harmful requests."})
    from batchflip.engines.hf import HFEngine

    std = HFEngine(str(model_dir), "bfloat16", 4, 42, "standard", threads=2)
    gens, scored = {}, []
    for cond in ("sync_b1", "sync_b6"):
        path = tmp_path / f"{cond}.parquet"
        gens[str(path)] = run_job(battery, params, cond, str(model_dir), path,
                                  tmp_path / f"{cond}.stack.json", engine=std, progress=False)
        scored.append(score_frame(gens[str(path)], battery, {"refusal": 2}))
    flips = pair_flips(pd.concat(scored, ignore_index=True), "sync_b1")
    flips["flip"] = True  # every conditioned row becomes a candidate (a 135M model rarely flips)
    cands = ablation.select_candidates(flips, gens, "sync_b1")
    # 6 prompts: sync_b6 is one group of all 6 (a sync_b8 is refused: no prompt is left
    # to pad it to 8, and its rows would say batch_size 8)
    assert len(cands) == len(battery) and set(cands["group_size"]) == {len(battery)}
    results = {}
    for mode in ("standard", "batch_invariant"):
        eng = std if mode == "standard" else HFEngine(str(model_dir), "bfloat16", 4, 42, mode,
                                                      threads=2)
        runs, stats = ablation.run_mode(cands, battery, params.replace(study="d"),
                                        str(model_dir), mode, tmp_path / f"{mode}.parquet",
                                        tmp_path / f"{mode}.stack.json", engine=eng)
        assert stats.groups == len(battery) + 1  # each prompt alone, the one group once
        results[mode] = ablation.score_runs(runs, battery, {"refusal": 2})
    compared = ablation.compare_runs(cands, pd.concat(results.values(), ignore_index=True),
                                     ["standard", "batch_invariant"])
    inv = compared[compared["kernel_mode"] == "batch_invariant"]
    std_rows = compared[compared["kernel_mode"] == "standard"]
    assert int(inv["text_change"].sum()) == 0 and int(inv["label_flip"].sum()) == 0
    # oracle from the source generations: standard kernels reproduce both source runs, so a
    # candidate's text changes exactly when its sync_b6 text differs from its sync_b1 text
    b1, b6 = (gens[str(tmp_path / f"{c}.parquet")] for c in ("sync_b1", "sync_b6"))
    by_pid = {c: dict(zip(g["prompt_id"], g["text"], strict=True))
              for c, g in (("b1", b1[b1["role"] == "target"]), ("b6", b6[b6["role"] == "target"]))}
    expected = {f"sync_b6/{pid}": by_pid["b6"][pid] != by_pid["b1"][pid] for pid in by_pid["b6"]}
    got = dict(zip(std_rows["candidate_id"], std_rows["text_change"].astype(bool), strict=True))
    assert got == expected
    # the standard rerun reproduces the source generation (same stack, same groups)
    assert std_rows["group_reproduces_source"].all()
    assert std_rows["alone_reproduces_baseline"].astype(bool).all()
    # and batch_invariant alone equals the standard batch of one (bitwise corollary)
    assert inv["text_alone"].tolist() == std_rows["text_alone"].tolist()
    stack = json.loads((tmp_path / "batch_invariant.stack.json").read_text())
    assert stack["kernel_mode"] == "batch_invariant"
    assert stack["kernel_flags"]["method"] == "per_sequence_fixed_shape"
    print(f"\nstandard text changes {int(std_rows['text_change'].sum())}/{len(std_rows)}")


def test_a_candidate_is_rerun_alone_at_batch_one_of_its_dispatch():
    from batchflip.studies.ablation_runs import alone_condition

    assert alone_condition("sync").name == "sync_b1"
    assert alone_condition("list").name == "list_b1"
    assert alone_condition("stagger").name == "cobatch_b1_solo"
    assert alone_condition("conc").name == "conc_c1"  # a stream's flip: one request at a time


def test_label_flips_else_text_changes_switches_below_the_threshold(tmp_path):
    gens = {p: pd.read_parquet(p) for p in _write_source(tmp_path).values()}
    flips = _flips(FLIPPED)  # 5 label flips: 4 sync_b4, 1 cobatch_b4_benign
    flips.loc[(flips["prompt_id"] == "q3") & ~flips["flip"], "text_changed"] = True
    rule = "label_flips_else_text_changes"
    labels = ablation.select_candidates(flips, gens, "sync_b1")
    texts = ablation.select_candidates(flips, gens, "sync_b1", candidates="text_changes")
    at = ablation.select_candidates(flips, gens, "sync_b1", candidates=rule, min_label_flips=5)
    below = ablation.select_candidates(flips, gens, "sync_b1", candidates=rule,
                                       min_label_flips=6)
    assert list(at["candidate_id"]) == list(labels["candidate_id"])  # 5 >= 5: flips only
    assert list(below["candidate_id"]) == list(texts["candidate_id"])  # 5 < 6: texts too
    # the count is taken after `dispatches`: 4 synchronized flips < 5
    sync = ablation.select_candidates(flips, gens, "sync_b1", candidates=rule,
                                      min_label_flips=5, dispatches=["sync"])
    assert "sync_b4/q3" in set(sync["candidate_id"]) and set(sync["dispatch"]) == {"sync"}
    # the default threshold is 10, and the CLI passes --min-label-flips through
    assert ablation.MIN_LABEL_FLIPS == 10
    dflt = ablation.select_candidates(flips, gens, "sync_b1", candidates=rule)
    assert list(dflt["candidate_id"]) == list(texts["candidate_id"])
    paths = _write_source(tmp_path)
    write_parquet(flips, tmp_path / "f.parquet")
    for n, expected in ((5, labels), (6, texts)):
        out = tmp_path / f"c{n}.parquet"
        assert cli_main(["ablation", "candidates", "--flips", str(tmp_path / "f.parquet"),
                         "--generations", *paths.values(), "--baseline", "sync_b1",
                         "--candidates", rule, "--min-label-flips", str(n),
                         "--out", str(out)]) == 0
        assert sorted(pd.read_parquet(out)["candidate_id"]) == sorted(
            expected["candidate_id"])
