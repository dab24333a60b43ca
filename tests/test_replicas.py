"""server.replicas: batch-1 conditions over k servers (batchflip.engines.replicas).

Dispatch logic with test doubles (named ...Double; an httpx.MockTransport stands in for each
replica's vLLM server); the byte-identity of real replicas on a GPU is the gpu-marked test
at the end (run on the device)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pandas as pd
import pytest
from test_server import FAKE_OPENAI_SERVER

from batchflip.conditions import parse_condition
from batchflip.engines import Group, Member, Result
from batchflip.engines.openai_client import ClientSettings, CompletionClient
from batchflip.engines.replicas import ReplicaPool, one_in_flight
from batchflip.engines.server import ServerEngine, _Launched
from batchflip.engines.vllm_launch import launch_settings, server_settings
from batchflip.errors import BatchflipError
from batchflip.generate import run_job
from batchflip.settings import GenerationSettings


@pytest.mark.parametrize("name,expected", [
    ("sync_b1", True), ("list_b1", True), ("conc_c1", True), ("cobatch_b8_solo", True),
    ("cobatch_b8_solo_ph3a", True), ("sync_b2", False), ("list_b8", False),
    ("conc_c4", False), ("cobatch_b8_benign", False), ("stagger_b8_jailbreak_m250", False),
    ("list_b8_jailbreak", False),
])
def test_only_conditions_with_one_request_in_flight_are_replicated(name, expected):
    assert one_in_flight(parse_condition(name)) is expected


class RunnerDouble:
    """Test double of a replica's client: answers after a short, group-dependent delay and
    records how many of its own requests were in flight at once."""

    def __init__(self, tag: str, fail_on: int | None = None) -> None:
        self.tag, self.fail_on = tag, fail_on
        self.ran: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def run_group(self, group, condition):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if group.group_id == self.fail_on:  # at once, while the others still work
                raise RuntimeError(f"replica {self.tag} failed on {group.group_id}")
            time.sleep(0.002 * (group.group_id % 3) + 0.003)
            self.ran.append(group.group_id)
            return [Result(m.prompt.upper(), [len(m.prompt)], "stop", 1, 0.0, 0.0, 0.0)
                    for m in group.members]
        finally:
            with self.lock:
                self.in_flight -= 1


def _groups(n: int) -> list[Group]:
    return [Group(i, (Member(0, "target", f"p{i}", f"prompt {i}"),)) for i in range(n)]


def test_pool_runs_every_group_once_one_in_flight_per_replica_in_group_order():
    runners = [RunnerDouble("a"), RunnerDouble("b"), RunnerDouble("c")]
    seen: list[tuple[int, str, str]] = []
    callers: set[str] = set()

    def on_group(group, results):
        callers.add(threading.current_thread().name)
        seen.append((group.group_id, results[0].text, group.members[0].prompt))

    used = ReplicaPool(runners).run(_groups(40), parse_condition("sync_b1"), on_group)
    assert [g for g, _, _ in seen] == list(range(40))  # handed over in group order
    assert all(text == prompt.upper() for _, text, prompt in seen)
    ran = sorted(g for r in runners for g in r.ran)
    assert ran == list(range(40))  # each group once, on exactly one replica
    assert all(r.max_in_flight == 1 for r in runners)  # batch 1 on every replica
    assert all(r.ran for r in runners)  # every replica did work
    assert [used[g] for g in runners[1].ran] == [1] * len(runners[1].ran)
    assert callers == {threading.current_thread().name}  # the caller's thread writes


def test_pool_stops_taking_groups_after_an_error_and_raises_it():
    runners = [RunnerDouble("a", fail_on=5), RunnerDouble("b", fail_on=5)]
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="failed on 5"):
        ReplicaPool(runners).run(_groups(50), parse_condition("conc_c1"),
                                 lambda g, r: seen.append(g.group_id))
    assert seen == list(range(len(seen))) and 5 not in seen
    started = [g for r in runners for g in r.ran]
    assert max(started) <= 5 + len(runners)  # at most one more per replica, then none


def test_pool_refuses_conditions_with_more_than_one_request_in_flight():
    with pytest.raises(BatchflipError, match="batch-1 conditions"):
        ReplicaPool([RunnerDouble("a")]).run(_groups(2), parse_condition("sync_b8"),
                                             lambda g, r: None)


def test_replicas_split_the_memory_share_and_need_one():
    gpu = {"device_type": "cuda"}

    def served(**server: object) -> GenerationSettings:
        return SETTINGS.replace(server=server)

    eff = launch_settings(served(replicas=2, gpu_memory_utilization=0.8), gpu)
    assert eff["gpu_memory_utilization"] == 0.4 and eff["replicas"] == 2
    one = launch_settings(served(gpu_memory_utilization=0.8), gpu)
    assert one["gpu_memory_utilization"] == 0.8 and "replicas" not in one
    with pytest.raises(BatchflipError, match="set server.gpu_memory_utilization"):
        launch_settings(served(replicas=2), gpu)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(BatchflipError, match="positive integer"):
            launch_settings(served(replicas=bad, gpu_memory_utilization=0.8), gpu)
    assert server_settings(SETTINGS)["replicas"] == 1


# ---- the generate stage over a ServerEngine with replicas (MockTransport doubles) ----------


class ServerDouble:
    """Test double of one vLLM server behind an httpx.MockTransport: answers each prompt
    with its own deterministic two-token stream and logs the concurrency it saw."""

    def __init__(self, tag: int) -> None:
        self.tag, self.prompts = tag, []
        self.in_flight = self.max_in_flight = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if isinstance(body["prompt"], list):  # list_b1: a list of one prompt
            (body["prompt"],) = body["prompt"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.002)
        finally:
            self.in_flight -= 1
        if str(body["prompt"]).startswith("prompt number"):  # not the warm-up
            self.prompts.append(body["prompt"])
        text = body["prompt"][::-1]
        chunks = [{"choices": [{"index": 0, "text": text[:3] if step == 0 else text[3:],
                                "token_ids": [len(text), step],
                                "finish_reason": "stop" if step else None}]}
                  for step in range(2)]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode())

    def client(self) -> CompletionClient:
        return CompletionClient(ClientSettings(base_url=f"http://replica{self.tag}", model="m",
                                               max_tokens=4, seed=42),
                                transport=httpx.MockTransport(self.handler))


def _engine(k: int, doubles: list[ServerDouble]) -> ServerEngine:
    doubles.append(ServerDouble(0))
    facts = {"engine": "vllm", "attention_backend": None, "batch_invariant_verified": None}
    engine = ServerEngine("vllm", doubles[0].client(), facts)
    engine.startup = [{"replica": 0, "cache": "cold"}]
    if k > 1:
        engine.replica_count = k

        def factory(i):
            doubles.append(ServerDouble(i))
            client = doubles[-1].client()
            client.warmup(1)
            return _Launched(None, client, {}, [], None, None, "", None,
                             {"replica": i, "cache": "warm"})

        engine.replica_factory = factory
    engine.client.warmup(1)
    return engine


def _battery(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"q{i:03d}" for i in range(n)], "task": "t",
                         "domain": "safety", "scorer": "refusal",
                         "prompt": [f"prompt number {i}" for i in range(n)],
                         "reference": "", "meta": "{}"})


PARAMS = {"study": "a", "model": "m", "engine": "vllm", "seed": 42, "dtype": "float16",
          "max_new_tokens": 4, "prompt_format": "raw"}
SETTINGS = GenerationSettings.from_mapping(PARAMS)
TIMES = ["t_submit", "t_first", "t_done"]


@pytest.mark.parametrize("condition", ["sync_b1", "conc_c1", "list_b1"])
def test_replicated_job_writes_the_rows_of_one_server(tmp_path, monkeypatch, condition):
    monkeypatch.setattr("batchflip.generate.model_fingerprint", lambda d: {"dir": d})
    battery = _battery(23)
    frames, stacks, all_doubles = [], [], []
    for k in (1, 2):
        doubles: list[ServerDouble] = []
        engine = _engine(k, doubles)
        out = tmp_path / f"k{k}.parquet"
        frames.append(run_job(battery, SETTINGS, condition, "m", out, tmp_path / f"k{k}.json",
                              engine=engine, progress=False))
        stacks.append(json.loads((tmp_path / f"k{k}.json").read_text()))
        engine.close()
        all_doubles.append(doubles)
    one, two = frames
    assert len(all_doubles[1]) == 2 and all(d.prompts for d in all_doubles[1])
    assert all(d.max_in_flight == 1 for d in all_doubles[1])  # one request per replica
    assert sorted(p for d in all_doubles[1] for p in d.prompts) == sorted(
        all_doubles[0][0].prompts)  # every prompt once, split over the replicas
    pd.testing.assert_frame_equal(one.drop(columns=TIMES), two.drop(columns=TIMES))
    assert two["prompt_id"].tolist() == battery["prompt_id"].tolist()  # prompt order
    # the startup block is a run fact: both replicas listed, the stack id unaffected
    assert [s["replica"] for s in stacks[1]["startup"]] == [0, 1]
    assert stacks[0]["stack_id"] == stacks[1]["stack_id"] == one["stack_id"].iloc[0]


def test_batched_conditions_stay_on_the_first_replica(tmp_path, monkeypatch):
    monkeypatch.setattr("batchflip.generate.model_fingerprint", lambda d: {"dir": d})
    doubles: list[ServerDouble] = []
    engine = _engine(2, doubles)
    run_job(_battery(9), SETTINGS, "sync_b4", "m", tmp_path / "b.parquet",
            tmp_path / "b.json", engine=engine, progress=False)
    engine.close()
    assert len(doubles) == 1 and len(doubles[0].prompts) == 12  # 3 groups of 4, padded


# ---- on the device ----------------------------------------------------------------------


@pytest.mark.gpu
def test_replica_texts_are_byte_identical_to_one_servers(tmp_path, monkeypatch):
    """Two real vLLM replicas of Qwen2.5-Coder-0.5B (fp16, CUDA graphs, the GPU check's
    launch settings) answer 64 paper prompts at sync_b1 with the same token ids and texts
    as one server. Needs a CUDA GPU, vLLM, the paper battery and the model built by the
    model stage (BATCHFLIP_GPU_MODEL_DIR, default resources/models/qwen2.5-coder-0.5b)."""
    import os
    from pathlib import Path

    from batchflip.generate import make_engine

    model = Path(os.environ.get("BATCHFLIP_GPU_MODEL_DIR",
                                "resources/models/qwen2.5-coder-0.5b")).resolve()
    battery_path = Path(os.environ.get("BATCHFLIP_GPU_BATTERY",
                                       "results/battery/paper.parquet")).resolve()
    if not (model / "model.json").is_file() or not battery_path.is_file():
        pytest.fail(f"needs {model} and {battery_path} (run the model and battery stages "
                    "of config/gpu-full.yaml first)")
    battery = pd.read_parquet(battery_path).groupby("task", sort=False).head(11)
    params = {**PARAMS, "model": "qwen", "max_new_tokens": 128,
              "server": {"max_model_len": 2048, "gpu_memory_utilization": 0.8,
                         "enforce_eager": False, "enable_prefix_caching": False,
                         "attention_backend": "FLASH_ATTN",
                         "log_dir": str(tmp_path / "logs")}}
    frames = []
    for k in (1, 2):
        p = GenerationSettings.from_mapping(
            {**params, "server": {**params["server"], "replicas": k}})
        engine = make_engine(p, str(model))
        try:
            frames.append(run_job(battery, p, "sync_b1", str(model), tmp_path / f"{k}.parquet",
                                  tmp_path / f"{k}.json", engine=engine, progress=False))
        finally:
            engine.close()
    one, two = frames
    assert (one["error"] == "").all() and (two["error"] == "").all()
    assert one["token_ids"].map(list).tolist() == two["token_ids"].map(list).tolist()
    assert [t.encode() for t in one["text"]] == [t.encode() for t in two["text"]]


# ---- the launch path with real processes (a stand-in server program, not vLLM) ------------

# A stand-in OpenAI server: logs like vLLM's compile step (compiles into an empty
# VLLM_CACHE_ROOT, loads from a filled one), answers each prompt with the prompt reversed,
# and appends every prompt it serves to $FAKE_OUT/<port>.txt.
_STARTUP = '''print(os.environ.get("FAKE_LOG_LINE", "fake server up"), file=sys.stderr, flush=True)
'''
_COMPILE_LOG = '''port = int(sys.argv[sys.argv.index("--port") + 1])
root = os.environ["VLLM_CACHE_ROOT"]
if os.listdir(root):
    print("INFO Directly load the compiled graph(s) for compile range (1, 2048) from "
          "the cache, took 0.1 s", file=sys.stderr, flush=True)
else:
    open(os.path.join(root, "graph.py"), "w").write("compiled")
    print("INFO Compiling a graph for compile range (1, 2048) takes 1.0 s",
          file=sys.stderr, flush=True)
'''
_OK_POST = '''        self.rfile.read(int(self.headers["Content-Length"]))
        chunk = {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop",
                              "token_ids": [1]}]}
'''
_ECHO_POST = '''        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        with open(os.path.join(os.environ["FAKE_OUT"], f"{port}.txt"), "a") as fh:
            fh.write(prompt + "\\n")
        chunk = {"choices": [{"index": 0, "text": prompt[::-1], "finish_reason": "stop",
                              "token_ids": [len(prompt)]}]}
'''
# test_server's stand-in with those two parts swapped in
FAKE_VLLM_DOUBLE = FAKE_OPENAI_SERVER.replace(_STARTUP, _COMPILE_LOG).replace(_OK_POST,
                                                                                _ECHO_POST)
assert _STARTUP not in FAKE_VLLM_DOUBLE and _OK_POST not in FAKE_VLLM_DOUBLE


def test_launched_replicas_start_in_turn_share_the_work_and_stop(tmp_path, monkeypatch):
    import sys

    from batchflip.engines import server as srv
    from batchflip.engines import supervise

    fake_probe = {"vllm_version": "0.26.0", "distribution": "vllm", "device_type": "cuda",
                  "device": "GPU double", "compute_capability": "9.0",
                  "attention_backend_env": False, "batch_invariant_env": True}
    monkeypatch.setattr(srv, "probe_vllm", lambda python: fake_probe)
    monkeypatch.setattr("batchflip.generate.model_fingerprint", lambda d: {"dir": d})
    out = tmp_path / "served"
    out.mkdir()
    program = tmp_path / "fake_vllm.py"  # a file: the log's launch line stays one line
    program.write_text(FAKE_VLLM_DOUBLE)
    params = SETTINGS.replace(server={
        "command": [sys.executable, str(program)], "log_dir": str(tmp_path / "logs"),
        "cache_dir": str(tmp_path / "cache"), "gpu_memory_utilization": 0.8, "replicas": 2,
        "extra_env": {"FAKE_OUT": str(out)}, "warmup_requests": 1, "stop_grace_s": 5})
    live = set(supervise._LIVE)
    engine = srv.make_server_engine(params, "m")
    try:
        assert "--gpu-memory-utilization" in engine.server.argv
        assert engine.server.argv[engine.server.argv.index("--gpu-memory-utilization") + 1] \
            == "0.4"
        assert engine.replicas == []  # the second starts only for a batch-1 condition
        run_job(_battery(9), params, "sync_b4", "m", tmp_path / "b4.parquet",
                tmp_path / "b4.json", engine=engine, progress=False)
        assert engine.replicas == []
        df = run_job(_battery(17), params, "sync_b1", "m", tmp_path / "b1.parquet",
                     tmp_path / "b1.json", engine=engine, progress=False)
        servers = [engine.server, engine.replicas[0][0]]
    finally:
        engine.close()
    assert set(supervise._LIVE) == live  # both stopped
    assert all(srv.process_tree(s.pid) == set() for s in servers)
    assert (df["text"] == df["prompt_id"].map(
        dict(zip(_battery(17)["prompt_id"], _battery(17)["prompt"].str[::-1],
                 strict=True)))).all()
    served = {p.name: [ln for ln in p.read_text().splitlines() if ln.startswith("prompt")]
              for p in out.glob("*.txt")}
    b1 = {k: [x for x in v if x in set(_battery(17)["prompt"])] for k, v in served.items()}
    assert len(served) == 2 and all(b1.values())  # both replicas served sync_b1 prompts
    assert sum(len(v) for v in b1.values()) >= 17
    stack = json.loads((tmp_path / "b1.json").read_text())
    # the first start compiled into the empty cache, the second loaded from it
    assert [(s["replica"], s["cache"], s["compile"]) for s in stack["startup"]] == [
        (0, "cold", "compiled"), (1, "warm", "loaded from cache")]
    assert stack["server_settings"]["replicas"] == 2
    assert "VLLM_CACHE_ROOT" not in stack["server_env"]  # a path, not a stack fact
    assert sorted(p.name.endswith("_r1.log") for p in (tmp_path / "logs").iterdir()) == [
        False, True]
