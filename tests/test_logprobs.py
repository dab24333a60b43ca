"""Token log-probability capture: each engine against a direct computation on the model.

hf: the recorded log-probabilities equal a manual forward pass over prompt + generated
prefix (log-softmax of the last position). The OpenAI client: the streamed ``logprobs`` are
parsed into chosen / top-k lists. vLLM CPU (marker ``vllm``): the server's log-probabilities
for its greedy tokens against the same hf forward pass, within a loose tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch

from batchflip.conditions import parse_condition
from batchflip.engines import Group, Member, Result
from batchflip.engines.openai_client import ClientSettings, CompletionClient
from batchflip.generate import run_job
from batchflip.records import LOGPROB_COLUMNS
from batchflip.settings import GenerationSettings

PROMPTS = ["The capital of France is", "Write one word about rain:"]


def _group(prompts: list[str]) -> Group:
    return Group(0, tuple(Member(i, "target", f"p{i}", p) for i, p in enumerate(prompts)))


def _forward_logprobs(model, tokenizer, prompt: str, generated: list[int]) -> torch.Tensor:
    """log-softmax over the vocabulary at each generated position (one unpadded pass)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    with torch.inference_mode():
        logits = model(torch.tensor([ids + generated])).logits.float()
    lp = torch.log_softmax(logits, dim=-1)[0]
    return lp[len(ids) - 1: len(ids) - 1 + len(generated)]


def _check_consistent(r: Result, k: int) -> None:
    """Top-1 is the chosen (greedy) token, log-probabilities <= 0, sorted top-k."""
    assert len(r.token_logprobs) == len(r.top_ids) == len(r.top_logprobs) == len(r.token_ids)
    for tok, lp, ids, tops in zip(r.token_ids, r.token_logprobs, r.top_ids, r.top_logprobs,
                                  strict=True):
        assert len(ids) == len(tops) == k
        assert ids[0] == tok and lp == pytest.approx(tops[0], abs=1e-6)
        assert lp <= 0 and tops[0] >= tops[1]


def test_hf_logprobs_match_a_manual_forward_pass(model_dir: Path) -> None:
    from batchflip.engines.hf import HFEngine

    eng = HFEngine(str(model_dir), "float32", 8, 42, threads=2, logprobs=2)
    worst = 0.0
    for p in PROMPTS:  # batch 1: the manual pass sees exactly what generate saw
        (r,) = eng.run_group(_group([p]), parse_condition("sync_b1"))
        _check_consistent(r, 2)
        lp = _forward_logprobs(eng.model, eng.tokenizer, p, r.token_ids)
        top = lp.topk(2, dim=-1)
        assert top.indices.tolist() == r.top_ids
        worst = max(worst, (top.values - torch.tensor(r.top_logprobs)).abs().max().item())
        chosen = lp.gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
        worst = max(worst, (chosen - torch.tensor(r.token_logprobs)).abs().max().item())
    print(f"hf float32 max abs diff vs manual forward: {worst:.3g}")
    assert worst < 1e-3
    both = eng.run_group(_group(PROMPTS), parse_condition("sync_b2"))  # left-padded batch
    for r in both:
        _check_consistent(r, 2)
    plain = HFEngine(str(model_dir), "float32", 8, 42, threads=2)
    (r0,) = plain.run_group(_group(PROMPTS[:1]), parse_condition("sync_b1"))
    assert r0.token_logprobs is None and r0.top_ids is None  # off: nothing recorded


def _sse(chunks: list[dict]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def test_client_parses_streamed_logprobs() -> None:
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        chunks = [
            {"choices": [{"index": 0, "text": "Hi", "token_ids": [5], "logprobs": {
                "tokens": ["token_id:5"], "token_logprobs": [-0.1],
                "top_logprobs": [{"token_id:5": -0.1, "token_id:9": -2.5}]}}]},
            # the sampled token (not the top) comes first in vLLM's map; k + 1 entries
            {"choices": [{"index": 0, "text": "!", "token_ids": [7], "finish_reason": "stop",
                          "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-1.2],
                                       "top_logprobs": [{"token_id:7": -1.2, "token_id:3":
                                                         -0.4, "x": -1.0}]}}]},
        ]
        return httpx.Response(200, content=_sse(chunks))

    settings = ClientSettings(base_url="http://fake", model="m", max_tokens=8, seed=7,
                              logprobs=2)
    client = CompletionClient(settings, transport=httpx.MockTransport(handler))
    (r,) = client.run_group(_group(["a"]), parse_condition("sync_b1"))
    client.close()
    assert bodies[0]["logprobs"] == 2 and bodies[0]["return_tokens_as_token_ids"] is True
    assert r.token_ids == [5, 7] and r.token_logprobs == [-0.1, -1.2]
    assert r.top_ids == [[5, 9], [3, -1]] and r.top_logprobs == [[-0.1, -2.5], [-0.4, -1.0]]
    off = CompletionClient(ClientSettings(base_url="http://fake", model="m", max_tokens=8,
                                          seed=7), transport=httpx.MockTransport(handler))
    (r,) = off.run_group(_group(["a"]), parse_condition("sync_b1"))
    off.close()
    assert "logprobs" not in bodies[-1] and r.token_logprobs is None


class _LpEngine:
    name = "fake"

    def fingerprint(self) -> dict:
        return {"engine": "fake"}

    def run_group(self, group: Group, condition) -> list[Result]:
        out = []
        for m in group.members:
            r = Result(m.prompt, [1, 2], "length", 2, 0.0, 0.1, 0.2)
            if m.prompt_id != "h1":  # h1 "fails": no logprobs
                r.token_logprobs, r.top_ids = [-0.1, -0.2], [[1, 3], [2, 4]]
                r.top_logprobs = [[-0.1, -3.0], [-0.2, -0.3]]
            out.append(r)
        return out

    def close(self) -> None:
        pass


def test_generate_writes_list_columns_only_when_asked(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("batchflip.generate.format_prompts", lambda p, *a, **k: list(p))
    monkeypatch.setattr("batchflip.generate.model_fingerprint", lambda d: {"m": d})
    battery = pd.DataFrame([{"prompt_id": f"h{i}", "task": "harm", "domain": "safety",
                             "scorer": "refusal", "prompt": f"harm {i}", "reference": "R",
                             "meta": "{}"} for i in range(3)])
    params = {"study": "a", "model": "fake", "engine": "hf", "seed": 42, "dtype": "bfloat16",
              "max_new_tokens": 2, "prompt_format": "raw"}
    ids = {}
    for k in (0, 2):
        out, stack = tmp_path / f"g{k}.parquet", tmp_path / f"g{k}.stack.json"
        settings = GenerationSettings.from_mapping({**params, **({"logprobs": k} if k else {})})
        run_job(battery, settings, "sync_b1", "nomodel", out, stack, engine=_LpEngine(),
                progress=False)
        df = pd.read_parquet(out)
        fp = json.loads(stack.read_text())
        ids[k] = fp["stack_id"]
        if not k:
            assert not set(LOGPROB_COLUMNS) & set(df.columns) and "logprobs" not in fp
            continue
        assert fp["logprobs"] == 2
        row = df.set_index("prompt_id")
        assert list(row.loc["h0", "top_logprobs"][1]) == [-0.2, -0.3]
        assert list(row.loc["h1", "token_logprobs"]) == []
    assert ids[0] != ids[2]


@pytest.mark.vllm
def test_vllm_cpu_logprobs_match_hf(tmp_path, model_dir: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from batchflip.engines.server import make_server_engine

    params = {"engine": "vllm", "dtype": "bfloat16", "max_new_tokens": 8, "seed": 42,
              "kernel_mode": "standard", "study": "t", "model": "m", "logprobs": 2,
              "threads": 2, "prompt_format": "raw",
              "server": {"log_dir": str(tmp_path), "max_model_len": 512}}
    eng = make_server_engine(GenerationSettings.from_mapping(params), str(model_dir))
    try:
        assert eng.fingerprint()["client"]["logprobs"] == 2
        results = [eng.run_group(_group([p]), parse_condition("sync_b1"))[0] for p in PROMPTS]
        listed = eng.run_group(_group(PROMPTS), parse_condition("list_b2"))
    finally:
        eng.close()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.error == "" and r.token_ids
        _check_consistent(r, 2)
        lp = _forward_logprobs(model, tok, p, r.token_ids)
        chosen = lp.gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
        worst = max(worst, (chosen - torch.tensor(r.token_logprobs)).abs().max().item())
    for r in listed:
        _check_consistent(r, 2)
    print(f"vLLM CPU bf16 max abs diff vs hf float32 forward: {worst:.3g}")
    assert worst < 0.5
