"""server.cache_dir (batchflip.engines.vllm_cache): the environment a launch gets and what
the fingerprint's startup block says about the cache."""

from __future__ import annotations

from batchflip.engines.vllm_cache import cache_env, compile_outcome, count_files, startup_facts
from batchflip.layout import SERVER_NOT_ROWS, generation_settings

# log lines as vLLM 0.10-0.32 print them (compile range / dynamic shape spellings)
LOADED = ("(EngineCore_DP0 pid=1) INFO [backends.py:292] Directly load the compiled graph(s) "
          "for compile range (1, 2048) from the cache, took 0.648 s")
LOADED_OLD = ("INFO [backends.py:161] Directly load the compiled graph(s) for dynamic shape "
              "from the cache, took 2.810 s")
COMPILED = ("(EngineCore_DP0 pid=1) INFO [backends.py:399] Compiling a graph for compile "
            "range (1, 2048) takes 21.37 s")
COMPILED_OLD = "INFO [backends.py:215] Compiling a graph for dynamic shape takes 19.20 s"


def test_cache_env_points_the_three_caches_into_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = cache_env("resources/vllm-cache")
    root = tmp_path / "resources/vllm-cache"
    assert env == {"VLLM_CACHE_ROOT": str(root / "vllm"), "TRITON_CACHE_DIR": str(root / "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
    assert all((root / sub).is_dir() for sub in ("vllm", "triton", "inductor"))
    assert cache_env(None) == {}


def test_compile_outcome_from_the_log():
    assert compile_outcome(f"x\n{LOADED}\ny") == "loaded from cache"
    assert compile_outcome(LOADED_OLD) == "loaded from cache"
    assert compile_outcome(COMPILED) == compile_outcome(COMPILED_OLD) == "compiled"
    assert compile_outcome(f"{LOADED}\n{COMPILED}") == "partly cached"
    assert compile_outcome("INFO Starting vLLM API server") == "not logged"
    # batchflip's header lines (the launch command) never count
    assert compile_outcome(f"# batchflip launch: python -c '{LOADED}'\n{COMPILED}") == \
        "compiled"


def test_startup_facts_say_warm_only_when_the_cache_held_files(tmp_path):
    d = tmp_path / "cache"
    assert count_files(d) == 0 and count_files(None) == 0
    cold = startup_facts(str(d), count_files(d), COMPILED, 136.04)
    assert cold["cache"] == "cold" and cold["compile"] == "compiled" and cold["startup_s"] == 136.0
    (d / "vllm/torch_compile_cache/abc").mkdir(parents=True)
    (d / "vllm/torch_compile_cache/abc/graph.py").write_text("x")
    (d / "triton/k.json").parent.mkdir(parents=True)
    (d / "triton/k.json").write_text("{}")
    warm = startup_facts(str(d), count_files(d), LOADED, 70.0)
    assert warm["cache_files_before"] == 2 and warm["cache"] == "warm"
    assert startup_facts(None, 0, "", None)["cache"] == "vLLM default location"


def test_cache_dir_changes_no_row():
    cfg = {"models": {"m": {"source": "path", "path": "x"}},
           "studies": {"a": {"engine": "vllm", "dtype": "float16", "max_new_tokens": 4,
                             "seed": 1, "prompt_format": "raw", "battery": "b",
                             "server": {"cache_dir": "elsewhere", "max_model_len": 512}}}}
    assert "cache_dir" in SERVER_NOT_ROWS
    assert generation_settings(cfg, "a", "m", ["sync_b1"])["server"] == {"max_model_len": 512}
