"""Batch-invariant mode of the hf engine (``batchflip.engines.invariant``).

Modelled on vLLM's batch-invariance tests: a prompt's logits computed alone must be
*bitwise* equal (``torch.equal``) to its logits at a random slot of a ragged, left-padded
batch (sizes 2, 5, 13, 32), for the prefill (every real position) and for greedy generation
through ``model.generate`` (the token ids and every step's logits, final step included).
A negative control runs the same inputs with the standard kernels and must find at least one
mismatch, or the test would not be able to see a violation.

The real-model tests use SmolLM2-135M-Instruct in bf16 on CPU, built by the model stage
when ``resources/models/smollm2-135m`` is absent (the ``model_dir`` fixture: a failing build
fails them, it never skips them). A ``gpu`` test runs the same check on CUDA with
SmolLM2's shapes and random weights. The remaining tests build tiny random Llama (and one
non-Llama) models from configs and always run (correctness against the standard math,
chunked prefill, idempotence, refusals).
"""

from __future__ import annotations

import random

import pytest
import torch

from batchflip.engines import invariant
from batchflip.errors import BatchflipError

BATCH_SIZES = (2, 5, 13, 32)
NEW_TOKENS = 5
WORDS = ("the cat sat on a mat while seven quiet engineers argued about kernels and "
         "padding rules in the old library near river stone bridge tomorrow morning why "
         "how please explain write poem list three reasons chemistry history music").split()


def _pool(n: int, seed: int = 1234) -> list[str]:
    """``n`` distinct prompts of random length (1 to 18 words): a ragged batch needs padding."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 18))).capitalize()
        if text not in out:
            out.append(text)
    return out


def _batches(pool: list, seed: int = 99) -> list[list]:
    """One batch per size; every prompt lands at a random slot among random companions."""
    rng = random.Random(seed)
    return [rng.sample(pool, size) for size in BATCH_SIZES]


def _pad(seqs, pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id sequences as the hf engine's tokenizer call does (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _prefill(model, seqs, pad_id: int) -> list[torch.Tensor]:
    """Logits at every real position of each row ([L_i, vocab]) from one padded forward."""
    ids, mask = _pad(seqs, pad_id, model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return [logits[i][mask[i].bool()].cpu() for i in range(len(seqs))]


def _generate(model, seqs, pad_id: int, n: int = NEW_TOKENS):
    """Greedy generate as the hf engine calls it; per row: new token ids, per-step logits."""
    ids, mask = _pad(seqs, pad_id, model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                             do_sample=False, pad_token_id=pad_id, temperature=None,
                             top_p=None, top_k=None, output_logits=True,
                             return_dict_in_generate=True)
    steps = torch.stack(out.logits, dim=1)  # [batch, steps, vocab]
    return [(out.sequences[i, ids.shape[1]:].cpu(), steps[i].cpu()) for i in range(len(seqs))]


def _compare(model, batches, pad_id: int) -> dict[str, int]:
    """Count rows whose batched results differ in any bit from the same prompt run alone."""
    alone_pre, alone_gen = {}, {}
    counts = {"rows": 0, "prefill_mismatch": 0, "token_mismatch": 0, "logit_mismatch": 0}
    for batch in batches:
        for seq in batch:
            if seq not in alone_pre:
                alone_pre[seq] = _prefill(model, [seq], pad_id)[0]
                alone_gen[seq] = _generate(model, [seq], pad_id)[0]
        pre, gen = _prefill(model, batch, pad_id), _generate(model, batch, pad_id)
        for i, seq in enumerate(batch):
            counts["rows"] += 1
            counts["prefill_mismatch"] += not torch.equal(pre[i], alone_pre[seq])
            ids, steps = alone_gen[seq]
            k = steps.shape[0]  # alone may stop early at EOS; the batch row runs on
            counts["token_mismatch"] += not torch.equal(gen[i][0][:k], ids[:k])
            counts["logit_mismatch"] += not torch.equal(gen[i][1][:k], steps)
    return counts


def _check(model, batches, pad_id: int) -> None:
    """Standard (negative control) then batch_invariant on the same batches."""
    invariant.disable(model)
    standard = _compare(model, batches, pad_id)
    flags = invariant.enable(model)
    assert flags["method"] == invariant.METHOD and flags["dtype"] == "bfloat16"
    inv = _compare(model, batches, pad_id)
    print(f"\nstandard: {standard}\nbatch_invariant: {inv}")

    assert inv["rows"] == sum(BATCH_SIZES)
    assert inv["prefill_mismatch"] == 0, inv
    assert inv["token_mismatch"] == 0, inv
    assert inv["logit_mismatch"] == 0, inv
    # negative control: the same inputs through the standard kernels must show a difference
    control = (standard["prefill_mismatch"] + standard["token_mismatch"]
               + standard["logit_mismatch"])
    assert control >= 1, f"standard mode showed no batch effect; the test is blind: {standard}"


@pytest.fixture(scope="module")
def smollm(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    yield model, tok
    invariant.disable(model)


def test_batch_invariant_bitwise_vs_alone_with_negative_control(smollm):
    model, tok = smollm
    pool = _pool(34)
    seqs = [tuple(ids) for ids in tok(pool)["input_ids"]]
    # the manual left padding is the tokenizer's (the hf engine's) padding
    enc = tok(pool[:5], return_tensors="pt", padding=True)
    ids, mask = _pad(seqs[:5], tok.pad_token_id)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    _check(model, _batches(seqs), tok.pad_token_id)


def test_batch_invariant_equals_standard_batch_of_one(smollm):
    """Alone and unpadded, the patched forward runs the standard operations: same bits."""
    model, tok = smollm
    seqs = [tuple(ids) for ids in tok(_pool(4, seed=7))["input_ids"]]
    invariant.disable(model)
    standard = [_generate(model, [s], tok.pad_token_id)[0] for s in seqs]
    invariant.enable(model)
    patched = [_generate(model, [s], tok.pad_token_id)[0] for s in seqs]
    for (ids_s, log_s), (ids_i, log_i) in zip(standard, patched, strict=True):
        assert torch.equal(ids_s, ids_i)
        assert torch.equal(log_s, log_i)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bitwise_smollm_shapes_random_weights():
    """The same check on CUDA with SmolLM2-135M's shapes and random weights (no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                      pad_token_id=2, bos_token_id=1, eos_token_id=2,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    rng = random.Random(5)
    seqs = [tuple(rng.randrange(3, 49152) for _ in range(rng.randint(2, 40)))
            for _ in range(34)]
    _check(model, _batches(seqs), pad_id=2)


# ---------------------------------------------------------------- tiny random models ----

def _tiny_llama(dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    cfg.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()


def _ragged(seed: int = 3, sizes=(3, 9, 1, 6)):
    """Left-padded ids and mask for rows of the given lengths (pad id 0, tokens 3..96)."""
    g = torch.Generator().manual_seed(seed)
    width = max(sizes)
    ids = torch.zeros(len(sizes), width, dtype=torch.long)
    mask = torch.zeros(len(sizes), width, dtype=torch.long)
    for i, n in enumerate(sizes):
        ids[i, width - n:] = torch.randint(3, 97, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_matches_standard_math(attn):
    """Same function as the standard path (float32, tolerance): padding, rope, cache, GQA."""
    model = _tiny_llama(attn_implementation=attn)
    ids, mask = _ragged()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        ref_pre = model(input_ids=ids, attention_mask=mask).logits
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        invariant.enable(model)
        got_pre = model(input_ids=ids, attention_mask=mask).logits
        got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    real = mask.bool()
    torch.testing.assert_close(got_pre[real], ref_pre[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits),
                               atol=1e-4, rtol=1e-4)


def test_tiny_chunked_prefill_matches_full_prefill():
    """New queries after cached keys (explicit bottom-right causal mask over real keys)."""
    from transformers import DynamicCache

    model = _tiny_llama()
    invariant.enable(model)
    ids, mask = _ragged(sizes=(7, 10, 4))
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache)
        tail = model(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=cache).logits
    real = mask[:, 6:].bool()
    torch.testing.assert_close(tail[real], full[:, 6:][real], atol=1e-4, rtol=1e-4)


def test_tiny_bf16_bitwise_any_slot():
    model = _tiny_llama(torch.bfloat16)
    invariant.enable(model)
    ids, mask = _ragged(sizes=(5, 11, 2, 8, 3))
    with torch.inference_mode():
        batch = model(input_ids=ids, attention_mask=mask).logits
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            alone = model(input_ids=ids[i:i + 1, real]).logits[0]
            assert torch.equal(batch[i][real], alone)


def test_enable_is_idempotent_and_disable_restores():
    model = _tiny_llama()
    ids, mask = _ragged()
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        flags = invariant.enable(model)
        assert invariant.enable(model) == flags and invariant.is_enabled(model)
        assert flags["device"] == "cpu" and flags["attn_implementation"] == "sdpa"
        invariant.disable(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not invariant.is_enabled(model)
    assert "forward" not in model.model.__dict__ and "forward" not in model.lm_head.__dict__
    assert torch.equal(before, after)


def test_position_ids_that_disagree_with_the_mask_are_refused():
    model = _tiny_llama()
    invariant.enable(model)
    ids, mask = _ragged()
    wrong = torch.arange(ids.shape[1]).expand_as(ids)  # ignores the left padding
    with pytest.raises(BatchflipError, match="position_ids"):
        model(input_ids=ids, attention_mask=mask, position_ids=wrong)


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(BatchflipError, match="Llama-family"):
        invariant.enable(gpt2)
    with pytest.raises(BatchflipError, match="rope_type 'dynamic'"):
        invariant.enable(_tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                      "rope_theta": 10000.0}))
    with pytest.raises(BatchflipError, match="eval"):
        invariant.enable(_tiny_llama().train())
