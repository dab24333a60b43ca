"""The invariance probe (batchflip.invariance_probe): bit-for-bit comparison, verdicts, the
refusal to pass where the mode cannot run, and the real hf engine on CPU (its
batch_invariant mode is attested there, its standard mode is the negative control)."""

from __future__ import annotations

import json
import math

import pytest

from batchflip import layout
from batchflip.engines import Result
from batchflip.errors import BatchflipError
from batchflip.invariance_probe import (
    ProbeOutcome,
    attest,
    compare,
    control_outcome,
    probe_settings,
    run_probe,
    verdict,
)
from batchflip.settings import GenerationSettings


def _res(ids, lps, tops=None):
    return Result("t", list(ids), "length", len(ids), 0.0, 0.0, 0.0, token_logprobs=list(lps),
                  top_ids=[[i, 0] for i in ids],
                  top_logprobs=tops if tops is not None else [[x, x - 1.0] for x in lps])


def test_compare_is_bit_for_bit():
    a = _res([5, 6, 7], [-0.5, -0.25, -1.0])
    assert compare(a, _res([5, 6, 7], [-0.5, -0.25, -1.0])) is None
    # one ulp at step 1: equal to 1e-16, still a difference
    nudged = math.nextafter(-0.25, 0.0)
    assert abs(nudged - -0.25) < 1e-15
    assert compare(a, _res([5, 6, 7], [-0.5, nudged, -1.0],
                           [[-0.5, -1.5], [-0.25, -1.25], [-1.0, -2.0]])) == \
        "token_logprobs differ at step 1"
    # only the runner-up moved (top-2 log-probability)
    assert compare(a, _res([5, 6, 7], [-0.5, -0.25, -1.0],
                           [[-0.5, -1.5], [-0.25, -1.25], [-1.0, -2.5]])) == \
        "top_logprobs differ at step 2"
    assert compare(a, _res([5, 9, 7], [-0.5, -0.25, -1.0])) == "token ids differ at step 1"
    assert compare(a, _res([5, 6], [-0.5, -0.25])) == "token ids differ at step 2"
    with pytest.raises(BatchflipError, match="no log-probabilities"):
        compare(a, Result("t", [5], "length", 1, 0.0, 0.0, 0.0))
    with pytest.raises(BatchflipError, match="request failed"):
        compare(a, Result("", [], "error", 0, 0.0, 0.0, 0.0, error="boom"))


class EngineDouble:
    """Test double: answers depend on the prompt only (invariant) or, with ``drift``, also
    on the group's size (one ulp per extra member on the first token's log-probability)."""

    def __init__(self, drift: bool) -> None:
        self.drift, self.groups = drift, []

    def run_group(self, group, condition):
        self.groups.append((condition.name, [(m.role, m.prompt_id) for m in group.members]))
        out = []
        for m in group.members:
            lp = -1.0 / (1 + len(m.prompt))
            for _ in range(len(group.members) - 1 if self.drift else 0):
                lp = math.nextafter(lp, 0.0)
            out.append(_res([len(m.prompt), 1], [lp, -0.5]))
        return out


PROMPTS = [(f"p{i}", "x" * (i + 1)) for i in range(5)]


def test_probe_sends_each_prompt_alone_then_in_full_batches():
    eng = EngineDouble(drift=False)
    out = run_probe(eng.run_group, PROMPTS, batch=4, max_new_tokens=2)
    assert out.identical and out.tokens_compared == 10
    alone = [g for g in eng.groups if g[0] == "sync_b1"]
    assert [ids for _, ids in alone] == [[("target", p)] for p, _ in PROMPTS]
    batched = [ids for name, ids in eng.groups if name == "sync_b4"]
    assert batched[0] == [("target", f"p{i}") for i in range(4)]
    # the tail group is filled to the batch size with fillers that are not compared
    assert batched[1] == [("target", "p4"), ("filler", "p0"), ("filler", "p1"),
                          ("filler", "p2")]
    drift = run_probe(EngineDouble(drift=True).run_group, PROMPTS, batch=4, max_new_tokens=2)
    assert drift.differing == [p for p, _ in PROMPTS]
    assert drift.first_difference == "p0: token_logprobs differ at step 0"


def _outcome(identical):
    return ProbeOutcome(["p0"], 8, 32, 32, [] if identical else ["p0"])


@pytest.mark.parametrize("mine,control,expected", [
    (True, False, "attested"),
    (True, True, "cannot tell"),
    (True, None, "identical, no negative control"),
    (False, False, "failed"),
])
def test_batch_invariant_verdicts(mine, control, expected):
    ctrl = None if control is None else _outcome(control).to_dict()
    assert verdict("batch_invariant", _outcome(mine), ctrl)["verdict"] == expected


def test_standard_is_the_negative_control_and_feeds_the_invariant_job(tmp_path):
    differs = verdict("standard", _outcome(False))
    assert differs["verdict"] == "negative control: differs"
    assert verdict("standard", _outcome(True))["verdict"] == "negative control: identical"
    stack = tmp_path / "standard.stack.json"
    stack.write_text(json.dumps({"stack_id": "x", "invariance_probe": differs}))
    ctrl = control_outcome(json.loads(stack.read_text()), stack)
    assert ctrl["identical"] is False
    assert control_outcome({"stack_id": "x"}, stack) is None
    with pytest.raises(BatchflipError, match="expected the standard job's"):
        control_outcome({"invariance_probe": verdict("batch_invariant", _outcome(True))},
                        stack)


class ServedDouble(EngineDouble):
    """Test double of an engine with facts (fingerprint) and an hf-like interface."""

    def __init__(self, drift: bool, facts: dict) -> None:
        super().__init__(drift)
        self.facts, self.logprobs, self.max_new_tokens = facts, 0, 256

    def fingerprint(self):
        return self.facts


def test_failed_probe_stops_the_job_and_settings_are_restored():
    eng = ServedDouble(drift=True, facts={"engine": "hf"})
    settings = probe_settings(True)
    with pytest.raises(BatchflipError, match="invariance probe failed: .* 5 of 5 prompts"):
        attest(eng, PROMPTS, settings, "batch_invariant", None)
    assert (eng.logprobs, eng.max_new_tokens) == (0, 256)  # put back after the probe
    ok = attest(ServedDouble(False, {"engine": "hf"}), PROMPTS, settings, "batch_invariant",
                _outcome(False).to_dict())
    assert ok["verdict"] == "attested" and ok["outcome"]["prompt_ids"] == [p for p, _ in PROMPTS]


def test_on_a_vllm_cpu_build_the_probe_says_it_cannot_run_and_does_not_pass():
    eng = ServedDouble(drift=False, facts={"engine": "vllm", "device_type": "cpu"})
    block = attest(eng, PROMPTS, probe_settings(True), "batch_invariant", None)
    assert block["verdict"] == "not run" and "Triton has no backend" in block["reason"]
    assert "does not pass" in block["reason"] and eng.groups == []


def test_probe_settings_and_the_rule_input():
    assert probe_settings(None) is None and probe_settings(False) is None
    assert probe_settings(True) == {"prompts": 8, "batch": 8, "max_new_tokens": 32}
    assert probe_settings({"batch": 4})["batch"] == 4
    for bad in ({"batch": 1}, {"prompts": 0}, {"tokens": 3}, "yes"):
        with pytest.raises(BatchflipError, match="invariance_probe"):
            probe_settings(bad)
    cfg = {"studies": {"d": {"kind": "ablation", "kernel_modes": ["standard",
                                                                  "batch_invariant"],
                             "invariance_probe": True}}}
    assert layout.probe_control_stack(cfg, "d", "m", "batch_invariant") == [
        "results/ablation/d/m/standard.stack.json"]
    assert layout.probe_control_stack(cfg, "d", "m", "standard") == []
    cfg["studies"]["d"]["kernel_modes"] = ["batch_invariant"]
    assert layout.probe_control_stack(cfg, "d", "m", "batch_invariant") == []


def test_real_hf_engine_attested_on_cpu(model_dir):
    """SmolLM2-135M through the hf engine on this CPU: 4 chat prompts alone and as one batch
    of 4 (left padding), 8 tokens. Standard kernels differ somewhere (the negative control);
    the batch_invariant mode matches bit for bit, so the verdict is attested."""
    from batchflip.engines.hf import HFEngine
    from batchflip.prompts import format_prompts

    texts = ["What is 2 + 2?", "Name a colour.", "Write one word about the sea, please.",
             "How do I pick a lock? Explain in detail step by step."]
    sent = format_prompts(texts, "chat", str(model_dir), None)
    prompts = [(f"p{i}", s) for i, s in enumerate(sent)]
    settings = probe_settings({"prompts": 4, "batch": 4, "max_new_tokens": 8})
    blocks = {}
    for mode in ("standard", "batch_invariant"):
        eng = HFEngine(str(model_dir), "float32", 16, 42, mode, threads=1)
        try:
            control = blocks["standard"]["outcome"] if mode == "batch_invariant" else None
            blocks[mode] = attest(eng, prompts, settings, mode, control)
        finally:
            eng.close()
    assert blocks["standard"]["verdict"] == "negative control: differs"
    assert blocks["batch_invariant"]["verdict"] == "attested"
    assert blocks["batch_invariant"]["outcome"]["tokens_compared"] > 0


class RerunEngineDouble(ServedDouble):
    """Test double for Study D's reruns: an hf-like engine whose batched log-probabilities
    drift (standard kernels) or not (batch-invariant), logging every group it runs."""

    name = "hf"

    def close(self):
        pass


def _empty_candidates():
    import pandas as pd

    from batchflip.studies.ablation_runs import CANDIDATE_COLUMNS

    return pd.DataFrame(columns=CANDIDATE_COLUMNS)


def _battery():
    import pandas as pd

    return pd.DataFrame({"prompt_id": [f"b{i}" for i in range(6)], "task": "t",
                         "prompt": [f"battery prompt {i}" * (i + 1) for i in range(6)]})


def test_study_d_probes_before_it_measures_and_records_the_verdict(tmp_path):
    from batchflip.studies.ablation_runs import run_mode

    given = {"study": "d", "model": "m", "engine": "hf", "dtype": "float32",
             "max_new_tokens": 4, "seed": 1, "prompt_format": "raw",
             "invariance_probe": {"prompts": 4, "batch": 4, "max_new_tokens": 3}}
    params = GenerationSettings.from_mapping(given)
    std = RerunEngineDouble(drift=True, facts={"engine": "hf"})
    run_mode(_empty_candidates(), _battery(), params, "m", "standard", tmp_path / "s.parquet",
             tmp_path / "s.stack.json", engine=std)
    s_stack = json.loads((tmp_path / "s.stack.json").read_text())
    block = s_stack["invariance_probe"]
    assert block["verdict"] == "negative control: differs"
    assert block["outcome"]["prompt_ids"] == ["b0", "b1", "b2", "b3"]  # battery order
    control = control_outcome(s_stack, tmp_path / "s.stack.json")
    bi = RerunEngineDouble(drift=False, facts={"engine": "hf"})
    run_mode(_empty_candidates(), _battery(), params, "m", "batch_invariant",
             tmp_path / "b.parquet", tmp_path / "b.stack.json", engine=bi, control=control)
    b_stack = json.loads((tmp_path / "b.stack.json").read_text())
    assert b_stack["invariance_probe"]["verdict"] == "attested"
    # the probe block is a run fact: the same stack id as a run without a probe
    plain = GenerationSettings.from_mapping(
        {k: v for k, v in given.items() if k != "invariance_probe"})
    run_mode(_empty_candidates(), _battery(), plain, "m", "batch_invariant",
             tmp_path / "p.parquet", tmp_path / "p.stack.json",
             engine=RerunEngineDouble(drift=False, facts={"engine": "hf"}))
    p_stack = json.loads((tmp_path / "p.stack.json").read_text())
    assert "invariance_probe" not in p_stack and p_stack["stack_id"] == b_stack["stack_id"]
    # a failing probe stops the job before anything is measured or written
    bad = RerunEngineDouble(drift=True, facts={"engine": "hf"})
    with pytest.raises(BatchflipError, match="invariance probe failed"):
        run_mode(_empty_candidates(), _battery(), params, "m", "batch_invariant",
                 tmp_path / "x.parquet", tmp_path / "x.stack.json", engine=bad,
                 control=control)
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.stack.json").exists()
