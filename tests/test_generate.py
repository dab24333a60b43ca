"""Group building and resume, with a test double engine (FakeEngine) for speed; the real
model's resume after a kill is in test_workflow.py."""

import json

import pandas as pd
import pytest

from batchflip.conditions import parse_condition
from batchflip.engines import Result
from batchflip.errors import BatchflipError
from batchflip.generate import build_groups, run_job
from batchflip.settings import GenerationSettings


def _battery(n_harm=5, n_mc=7):
    rows = [{"prompt_id": f"h{i}", "task": "harm", "domain": "safety", "scorer": "refusal",
             "prompt": f"harm {i}", "reference": "R", "meta": "{}"} for i in range(n_harm)]
    rows += [{"prompt_id": f"m{i}", "task": "mc", "domain": "capability", "scorer": "mc_letter",
              "prompt": f"mc {i}", "reference": "A", "meta": "{}"} for i in range(n_mc)]
    df = pd.DataFrame(rows)
    df["sent"] = df["prompt"]
    return df


PARAMS = {"study": "a", "model": "fake", "engine": "hf", "seed": 42, "dtype": "bfloat16",
          "max_new_tokens": 4, "prompt_format": "raw", "cobatch_targets": ["harm"],
          "filler_pools": {"benign": {"tasks": ["mc"]}, "adversarial": {"tasks": ["harm"]},
                           "mixed": {"mix": {"benign": 2, "adversarial": 1}}}}


def _settings(**changes) -> GenerationSettings:
    """PARAMS, parsed, with ``changes``."""
    return GenerationSettings.from_mapping({**PARAMS, **changes})


def test_sync_groups_cover_every_prompt_once_and_pad_the_tail():
    groups = build_groups(_battery(), parse_condition("sync_b5"), _settings())
    targets = [m.prompt_id for g in groups for m in g.members if m.role == "target"]
    assert targets == _battery()["prompt_id"].tolist()
    assert all(len(g.members) == 5 for g in groups)
    tail = groups[-1].members
    assert [m.role for m in tail] == ["target", "target", "filler", "filler", "filler"]
    assert not {m.prompt_id for m in tail if m.role == "filler"} & {tail[0].prompt_id,
                                                                     tail[1].prompt_id}


def test_cobatch_positions_seeded_recorded_and_varied():
    cond = parse_condition("cobatch_b4_mixed")
    g1 = build_groups(_battery(), cond, _settings())
    g2 = build_groups(_battery(), cond, _settings())
    assert g1 == g2  # seeded
    assert len(g1) == 5  # one group per harm target
    positions = [next(m.position for m in g.members if m.role == "target") for g in g1]
    assert len(set(positions)) > 1
    for g in g1:
        target = next(m.prompt_id for m in g.members if m.role == "target")
        fillers = [m.prompt_id for m in g.members if m.role == "filler"]
        assert target not in fillers and len(fillers) == 3
        assert sum(f.startswith("m") for f in fillers) == 2  # 2 benign + 1 adversarial
    other = build_groups(_battery(), cond, _settings(seed=7))
    assert other != g1
    solo = build_groups(_battery(), parse_condition("cobatch_b8_solo"), _settings())
    assert all(len(g.members) == 1 for g in solo)


class FakeEngine:
    """Test double: echoes prompts; can crash after a number of groups (a 'kill')."""

    name = "fake"

    def __init__(self, crash_after=None):
        self.calls, self.crash_after = [], crash_after

    def fingerprint(self):
        return {"engine": "fake"}

    def run_group(self, group, condition):
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(group.group_id)
        return [Result(m.prompt.upper(), [1, 2], "length", 2, 0.0, 0.1, 0.2)
                for m in group.members]

    def close(self):
        pass


def test_resume_after_kill_completes_missing_groups_only(tmp_path, monkeypatch):
    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    out, stack = tmp_path / "g.parquet", tmp_path / "g.stack.json"
    battery = _battery().drop(columns="sent")
    first = FakeEngine(crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_job(battery, _settings(), "sync_b2", "nomodel", out, stack, engine=first,
                progress=False)
    assert not out.exists()  # no partial parquet
    second = FakeEngine()
    df = run_job(battery, _settings(), "sync_b2", "nomodel", out, stack, engine=second,
                 progress=False)
    assert first.calls == [0, 1] and second.calls == [2, 3, 4, 5]
    t = df[df["role"] == "target"]
    assert t["prompt_id"].tolist() == battery["prompt_id"].tolist()  # none missing, no dupes
    upper = dict(zip(battery.prompt_id, battery.prompt.str.upper(), strict=True))
    assert (t["text"] == t["prompt_id"].map(upper)).all()
    assert not (tmp_path / "g.parquet.partial.jsonl").exists()
    assert json.loads(stack.read_text())["stack_id"] == df["stack_id"].iloc[0]


def _killed_after_two_groups(tmp_path, monkeypatch):
    """A sync_b2 job killed after its first two groups: (records path, stack path, battery)."""
    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    out, stack = tmp_path / "g.parquet", tmp_path / "g.stack.json"
    battery = _battery().drop(columns="sent")
    with pytest.raises(KeyboardInterrupt):
        run_job(battery, _settings(), "sync_b2", "x", out, stack, engine=FakeEngine(2),
                progress=False)
    return out, stack, battery


def test_checkpoint_of_other_settings_is_not_reused(tmp_path, monkeypatch):
    out, stack, battery = _killed_after_two_groups(tmp_path, monkeypatch)
    again = FakeEngine()
    run_job(battery, _settings(max_new_tokens=8), "sync_b2", "x", out, stack,
            engine=again, progress=False)
    assert again.calls == [0, 1, 2, 3, 4, 5]  # a changed knob starts over


def _shared_engine(bodies: list[dict], made: list[int]):
    """A ServerEngine over an httpx.MockTransport that answers every prompt with two
    tokens and keeps the request bodies (a test double for a launched vLLM server)."""
    import httpx

    from batchflip.engines.openai_client import ClientSettings, CompletionClient
    from batchflip.engines.server import ServerEngine

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        chunks = [{"choices": [{"index": 0, "text": f"{body['prompt']}#{step}",
                                "token_ids": [step],
                                "finish_reason": "stop" if step else None}]}
                  for step in range(2)]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode())

    def make(settings, model_dir):
        made.append(1)
        client = CompletionClient(ClientSettings(
            base_url="http://fake", model="m", max_tokens=settings.max_new_tokens,
            seed=settings.seed), transport=httpx.MockTransport(handler))
        return ServerEngine("openai", client, {"engine": "openai", "launched": False})

    return make


def test_one_job_serves_several_studies_with_their_own_request_settings(tmp_path,
                                                                        monkeypatch):
    import argparse

    from batchflip import generate

    bodies: list[dict] = []
    made: list[int] = []
    monkeypatch.setattr(generate, "make_engine", _shared_engine(bodies, made))
    monkeypatch.setattr(generate, "model_fingerprint", lambda d: {"id": d})
    _battery(2, 1).drop(columns="sent").to_parquet(tmp_path / "a.parquet")
    _battery(1, 2).drop(columns="sent").to_parquet(tmp_path / "c.parquet")
    base = {"model": "m", "engine": "openai", "seed": 42, "dtype": "bfloat16",
            "prompt_format": "raw", "server": {"base_url": "http://fake"}}
    a = {**base, "study": "a", "max_new_tokens": 8}
    c = {**base, "study": "c", "max_new_tokens": 3}
    (tmp_path / "m").mkdir()  # the model directory must exist (generate.main checks)
    argv = ["--model-dir", str(tmp_path / "m"), "--battery", str(tmp_path / "a.parquet"),
            "--params", json.dumps(a)]
    for cond in ("sync_b1", "sync_b2"):
        argv += ["--condition", cond, "--out", str(tmp_path / f"a_{cond}.parquet"),
                 "--stack-out", str(tmp_path / f"a_{cond}.stack.json")]
    argv += ["--battery", str(tmp_path / "c.parquet"), "--params", json.dumps(c),
             "--condition", "sync_b1", "--out", str(tmp_path / "c_sync_b1.parquet"),
             "--stack-out", str(tmp_path / "c_sync_b1.stack.json"), "--no-progress"]
    parser = argparse.ArgumentParser()
    generate.configure(parser)
    assert generate.main(parser.parse_args(argv)) == 0
    assert made == [1]  # one engine (one server start) for both studies
    # each study's prompts went out with its own max_tokens (a: 3 + 4 padded, c: 3)
    by_study = {p: pd.read_parquet(tmp_path / f"{p}.parquet") for p in
                ("a_sync_b1", "a_sync_b2", "c_sync_b1")}
    assert by_study["a_sync_b1"]["prompt_id"].tolist() == ["h0", "h1", "m0"]
    assert set(by_study["c_sync_b1"]["study"]) == {"c"}
    assert by_study["c_sync_b1"]["prompt_id"].tolist() == ["h0", "m0", "m1"]
    a_tokens = {b["max_tokens"] for b in bodies[: len(bodies) - 3]}
    c_tokens = {b["max_tokens"] for b in bodies[len(bodies) - 3:]}
    assert a_tokens == {8} and c_tokens == {3}


def test_parts_with_other_launch_settings_cannot_share_a_job(tmp_path):
    import argparse

    from batchflip import generate
    from batchflip.errors import BatchflipError

    a = {"study": "a", "model": "m", "engine": "vllm", "seed": 42, "dtype": "bfloat16",
         "max_new_tokens": 8, "prompt_format": "raw"}
    parser = argparse.ArgumentParser()
    generate.configure(parser)
    argv = ["--model-dir", "m"]
    for i, params in enumerate((a, {**a, "study": "c", "dtype": "float32"})):
        argv += ["--battery", "b.parquet", "--params", json.dumps(params), "--condition",
                 "sync_b1", "--out", f"{i}.parquet", "--stack-out", f"{i}.stack.json"]
    with pytest.raises(BatchflipError, match="'c' cannot share the server of study 'a'"):
        generate.main(parser.parse_args(argv))
    with pytest.raises(SystemExit):  # a condition before any --params
        parser.parse_args(["--model-dir", "m", "--condition", "sync_b1"])

class FakeStreamEngine(FakeEngine):
    """Test double of a server engine's request stream: answers the groups in order and can
    crash after a number of them (a 'kill' mid-stream)."""

    def run_stream(self, groups, condition, on_group):
        self.streams = getattr(self, "streams", []) + [[g.group_id for g in groups]]
        for group in groups:
            on_group(group, self.run_group(group, condition))


def test_conc_stream_is_one_group_per_prompt_in_battery_order():
    groups = build_groups(_battery(), parse_condition("conc_c4"), _settings())
    assert [g.group_id for g in groups] == list(range(12))
    assert [[(m.position, m.role) for m in g.members] for g in groups] == [[(0, "target")]] * 12
    assert [g.members[0].prompt_id for g in groups] == _battery()["prompt_id"].tolist()


def test_conc_records_carry_the_cap_and_resume_per_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    out, stack = tmp_path / "g.parquet", tmp_path / "g.stack.json"
    battery = _battery().drop(columns="sent")
    first = FakeStreamEngine(crash_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_job(battery, _settings(), "conc_c4", "x", out, stack, engine=first, progress=False)
    assert not out.exists()
    second = FakeStreamEngine()
    df = run_job(battery, _settings(), "conc_c4", "x", out, stack, engine=second, progress=False)
    assert first.calls == [0, 1, 2, 3, 4] and second.streams == [list(range(5, 12))]
    assert df["prompt_id"].tolist() == battery["prompt_id"].tolist()  # each once, in order
    assert df["group_id"].tolist() == list(range(12)) and set(df["position"]) == {0}
    assert set(df["dispatch"]) == {"conc"} and set(df["batch_size"]) == {4}
    assert set(df["role"]) == {"target"}


def test_conc_needs_an_engine_that_streams_requests(tmp_path, monkeypatch):
    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    battery = _battery().drop(columns="sent")
    with pytest.raises(BatchflipError, match=r"conc_c2.*engine 'fake' serves no requests"):
        run_job(battery, _settings(), "conc_c2", "x", tmp_path / "g.parquet",
                tmp_path / "g.stack.json", engine=FakeEngine(), progress=False)


def test_hf_engine_refuses_conc_conditions():
    from batchflip.engines import Group, Member
    from batchflip.engines.hf import HFEngine

    engine = object.__new__(HFEngine)  # the refusal comes before any model is touched
    group = Group(0, (Member(0, "target", "p", "text"),))
    with pytest.raises(BatchflipError, match=r"conc_c4.*engine 'hf' serves no requests"):
        engine.run_group(group, parse_condition("conc_c4"))


def test_resume_after_a_torn_last_line_keeps_the_next_group(tmp_path, monkeypatch):
    """A kill mid-write leaves a fragment without its newline. The resumed job must not
    append its next group onto it: that line would not parse and a second resume would
    regenerate the group (issue 21)."""
    out, stack, battery = _killed_after_two_groups(tmp_path, monkeypatch)
    ckpt = tmp_path / "g.parquet.partial.jsonl"
    with open(ckpt, "a") as fh:  # group 2's line, cut short by the kill
        fh.write('{"group_id": 2, "rows": [{"study": "a", "mod')
    second = FakeEngine(crash_after=1)  # finishes group 2, killed during group 3
    with pytest.raises(KeyboardInterrupt):
        run_job(battery, _settings(), "sync_b2", "x", out, stack, engine=second, progress=False)
    assert second.calls == [2]
    lines = ckpt.read_text().split("\n")
    assert lines[-1] == ""  # every line complete
    assert [json.loads(x)["group_id"] for x in lines[1:-1]] == [0, 1, 2]
    third = FakeEngine()
    df = run_job(battery, _settings(), "sync_b2", "x", out, stack, engine=third, progress=False)
    assert third.calls == [3, 4, 5]  # group 2 is not regenerated
    t = df[df["role"] == "target"]
    assert t["prompt_id"].tolist() == battery["prompt_id"].tolist()


def test_cut_torn_tail_keeps_whole_lines(tmp_path):
    from batchflip.checkpoint import cut_torn_tail

    p = tmp_path / "c.jsonl"
    for text, kept in [("a\nb\n", "a\nb\n"), ("a\nb\nfrag", "a\nb\n"), ("frag", ""),
                       ("", ""), ("x" * 70000 + "\n" + "y" * 70000, "x" * 70000 + "\n")]:
        p.write_text(text)
        cut_torn_tail(p)
        assert p.read_text() == kept


@pytest.mark.parametrize("condition", ["sync_b16", "list_b13"])
def test_job_refuses_a_batch_larger_than_the_prompts_it_sends(tmp_path, monkeypatch,
                                                              condition):
    """The run-time twin of the config check (an enriched study's prompts are known only
    when its job runs): nothing is generated or written."""
    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    out, stack = tmp_path / "g.parquet", tmp_path / "g.stack.json"
    engine = FakeEngine()
    with pytest.raises(BatchflipError) as err:
        run_job(_battery().drop(columns="sent"), _settings(), condition, "x", out, stack,
                engine=engine, progress=False)
    b = condition.split("_b")[1]
    assert f"study 'a', condition '{condition}'" in str(err.value)
    assert f"batches of {b} prompts" in str(err.value) and "only 12 prompts" in str(err.value)
    assert engine.calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["/no/such/model", "resources/models/not-built", "../x/y"])
def test_a_missing_model_path_is_a_one_line_error_naming_it(tmp_path, capsys, where):
    from batchflip.cli import main

    battery = _battery().drop(columns="sent")
    battery.to_parquet(tmp_path / "b.parquet", index=False)
    params = {**PARAMS, "engine": "hf", "model": "llama", "prompt_format": "chat"}
    out = tmp_path / "g.parquet"
    rc = main(["generate", "--battery", str(tmp_path / "b.parquet"), "--params",
               json.dumps(params), "--model-dir", where, "--condition", "sync_b1", "--out",
               str(out), "--stack-out", str(tmp_path / "g.stack.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert where in err and "model directory does not exist" in err
    assert "models.llama.path" in err and not out.exists()


def test_hub_ids_and_endpoints_pass_the_model_check(tmp_path):
    from batchflip.model import check_model_dir

    check_model_dir("Qwen/Qwen2.5-1.5B-Instruct")
    check_model_dir("endpoint:llama3.2:1b")
    check_model_dir(str(tmp_path))
    with pytest.raises(BatchflipError, match="not a directory"):
        (tmp_path / "f").write_text("")
        check_model_dir(str(tmp_path / "f"), "m")
