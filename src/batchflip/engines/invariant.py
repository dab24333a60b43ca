"""Batch-invariant forward for Llama-family transformers models (``batch_invariant`` mode).

``enable(model)`` patches one loaded ``LlamaForCausalLM`` *instance* in place (nothing
global, no other model is touched); ``disable(model)`` undoes it. The patched decoder runs
every row of a batch on its own real tokens only (padding is never computed or attended
to) and the lm_head one position at a time, so a sequence's logits are bitwise the same
alone or at any slot of any batch, and equal standard batch-1 outputs when the logits are
requested the same way (``tests/test_invariant.py``). It is a correctness tool, not a
serving mode: about 1.6x slower on CPU.

Invariance holds with respect to the batch (size, composition, slot, padding) on one stack
(device, library versions, thread count); not across stacks or dtypes. Refused with
``BatchflipError``: a model not in eval mode, other architectures, ``dynamic``/``longrope``
rotary, flash-attention implementations (``sdpa`` and ``eager`` only), static/compiled
caches and 4-D masks (``DynamicCache`` and a 2-D mask only), ``output_attentions`` /
``output_hidden_states``. Passed ``position_ids`` that disagree with the mask on a real
token are an error.

How it works, why it is invariant, what it costs: docs/studies/d.md.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from batchflip.errors import BatchflipError

METHOD = "per_sequence_fixed_shape"
VERSION = 1
_ATTR = "_batchflip_invariant"
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ATTN = ("sdpa", "eager")


def enable(model: Any) -> dict[str, Any]:
    """Patch ``model`` (a loaded ``LlamaForCausalLM``) in place; return the kernel flags.

    Idempotent: a second call returns the flags of the first. Raises ``BatchflipError`` for
    unsupported architectures or settings.
    """
    if getattr(model, _ATTR, None):
        return dict(getattr(model, _ATTR))
    _check_supported(model)
    inner, head = model.model, model.lm_head
    inner.forward = types.MethodType(_per_sequence_forward, inner)
    head.forward = types.MethodType(_per_token_linear_forward, head)
    param = head.weight
    flags = {
        "method": METHOD,
        "version": VERSION,
        "overrides": [
            "LlamaModel.forward: per-sequence forward over real tokens only "
            "(KV read back per row with index_select)",
            "lm_head.forward: one [1, hidden] x W product per position",
        ],
        "device": str(param.device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    setattr(model, _ATTR, flags)
    return dict(flags)


def disable(model: Any) -> None:
    """Undo ``enable``: the instance goes back to the class's standard forwards."""
    if not getattr(model, _ATTR, None):
        return
    for module in (model.model, model.lm_head):
        module.__dict__.pop("forward", None)
    delattr(model, _ATTR)


def is_enabled(model: Any) -> bool:
    """Whether ``enable`` has patched this model instance."""
    return bool(getattr(model, _ATTR, None))


def _check_supported(model: Any) -> None:
    from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

    name = type(model).__name__
    if not isinstance(model, LlamaForCausalLM) or not isinstance(
            getattr(model, "model", None), LlamaModel):
        raise BatchflipError(
            f"kernel_mode 'batch_invariant' (engine hf) supports Llama-family models "
            f"(LlamaForCausalLM) only; got {name} "
            f"(model_type '{getattr(model.config, 'model_type', '?')}')")
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _ROPE_TYPES:
        raise BatchflipError(f"kernel_mode 'batch_invariant': rope_type '{rope}' rescales with "
                             f"the sequence length; supported: {', '.join(_ROPE_TYPES)}")
    attn = cfg._attn_implementation
    if attn not in _ATTN:
        raise BatchflipError(f"kernel_mode 'batch_invariant': attention implementation "
                             f"'{attn}' is not supported; load the model with "
                             f"attn_implementation='sdpa' or 'eager'")
    if model.training:
        raise BatchflipError("kernel_mode 'batch_invariant': call model.eval() first")


class _Row:
    """One sequence's slice of the batch: where its real tokens are, and its state."""

    __slots__ = ("b", "q_idx", "k_idx", "h", "cos", "sin", "q", "k", "v")

    def __init__(self, b: int, q_idx: torch.Tensor, k_idx: torch.Tensor) -> None:
        self.b, self.q_idx, self.k_idx = b, q_idx, k_idx
        self.h = self.cos = self.sin = self.q = self.k = self.v = None


def _per_sequence_forward(self: Any, input_ids: torch.LongTensor | None = None,
                          attention_mask: torch.Tensor | None = None,
                          position_ids: torch.LongTensor | None = None,
                          past_key_values: Any = None,
                          inputs_embeds: torch.FloatTensor | None = None,
                          use_cache: bool | None = None, **kwargs: Any) -> Any:
    """Drop-in for ``LlamaModel.forward`` that runs every sequence on its own real tokens."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import (
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise BatchflipError(f"kernel_mode 'batch_invariant' does not support {flag}")
    cfg = self.config
    ref = input_ids if input_ids is not None else inputs_embeds
    bsz, q_len = ref.shape[0], ref.shape[1]
    device = ref.device
    use_cache = cfg.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=cfg)
    if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
        raise BatchflipError("kernel_mode 'batch_invariant' supports DynamicCache only, got "
                             f"{type(past_key_values).__name__}")
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    total = past + q_len
    if attention_mask is None:
        mask = torch.ones(bsz, total, dtype=torch.bool)
    elif attention_mask.ndim != 2 or tuple(attention_mask.shape) != (bsz, total):
        raise BatchflipError("kernel_mode 'batch_invariant' needs a 2-D padding mask of shape "
                             f"(batch, past + new) = ({bsz}, {total}); got "
                             f"{tuple(attention_mask.shape)}")
    else:
        mask = attention_mask.detach().to("cpu").bool()
    positions = mask.long().cumsum(-1) - 1
    if position_ids is not None:
        given = position_ids.detach().to("cpu").expand(bsz, q_len)
        if not torch.equal(given[mask[:, past:]], positions[:, past:][mask[:, past:]]):
            raise BatchflipError("kernel_mode 'batch_invariant' derives rotary positions from "
                                 "the attention mask; the position_ids passed disagree")

    rows: list[_Row] = []
    for b in range(bsz):
        q_idx = torch.nonzero(mask[b, past:]).flatten()
        if q_idx.numel() == 0:
            continue  # nothing real to compute for this row in this step
        row = _Row(b, q_idx.to(device), torch.nonzero(mask[b]).flatten().to(device))
        if input_ids is not None:
            row.h = self.embed_tokens(input_ids[b, row.q_idx].unsqueeze(0))
        else:
            row.h = inputs_embeds[b, row.q_idx].unsqueeze(0).clone()
        pos = positions[b, past:][q_idx].unsqueeze(0).to(device)
        row.cos, row.sin = self.rotary_emb(row.h, position_ids=pos)
        rows.append(row)

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation,
                                                      eager_attention_forward)
    eager = cfg._attn_implementation == "eager"
    for layer_idx, layer in enumerate(self.layers[: cfg.num_hidden_layers]):
        attn = layer.self_attn
        for row in rows:
            x = layer.input_layernorm(row.h)
            shape = (1, x.shape[1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            row.v = attn.v_proj(x).view(shape).transpose(1, 2)
            row.q, row.k = apply_rotary_pos_emb(q, k, row.cos, row.sin)
        if past_key_values is not None:
            _exchange_with_cache(past_key_values, layer_idx, rows, bsz, q_len, attn,
                                 rows[0].v if rows else attn.k_proj.weight)
        for row in rows:
            out, _ = attention(attn, row.q, row.k, row.v, _causal_mask(row.q, row.k, eager),
                               dropout=0.0, scaling=attn.scaling)
            out = out.reshape(1, row.q.shape[2], -1).contiguous()
            h = row.h + attn.o_proj(out)
            row.h = h + layer.mlp(layer.post_attention_layernorm(h))
            row.q = row.k = row.v = None

    hidden = torch.zeros(bsz, q_len, cfg.hidden_size, dtype=self.norm.weight.dtype,
                         device=device)
    for row in rows:
        hidden[row.b, row.q_idx] = self.norm(row.h)[0].to(hidden.dtype)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)


def _exchange_with_cache(cache: Any, layer_idx: int, rows: list[_Row], bsz: int,
                         q_len: int, attn: Any, like: torch.Tensor) -> None:
    """Write the rows' new K/V into the batch cache; read back each row's real K/V only."""
    n_kv = attn.config.num_key_value_heads
    shape = (bsz, n_kv, q_len, attn.head_dim)
    new_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
    new_v = torch.zeros(shape, dtype=like.dtype, device=like.device)
    for row in rows:
        new_k[row.b, :, row.q_idx] = row.k[0]
        new_v[row.b, :, row.q_idx] = row.v[0]
    keys, values = cache.update(new_k, new_v, layer_idx)
    for row in rows:
        row.k = keys[row.b].index_select(1, row.k_idx).unsqueeze(0)
        row.v = values[row.b].index_select(1, row.k_idx).unsqueeze(0)


def _causal_mask(q: torch.Tensor, k: torch.Tensor, eager: bool) -> torch.Tensor | None:
    """Additive bottom-right causal mask over the row's own keys, or None where not needed.

    None for a single query (decode) and, with sdpa, for a plain prefill (``is_causal``, as
    transformers does for an unpadded batch of one); an explicit mask for eager attention
    and for new queries that follow cached keys (chunked prefill).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q == 1 or (n_q == n_k and not eager):
        return None
    allowed = (torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
               >= torch.arange(n_k, device=q.device)[None, :])
    bias = torch.zeros(n_q, n_k, dtype=q.dtype, device=q.device)
    return bias.masked_fill(~allowed, torch.finfo(q.dtype).min).view(1, 1, n_q, n_k)


def _per_token_linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``nn.Linear.forward``: each position multiplied on its own (M = 1).

    An all-zero input row (a padded position: the per-sequence forward leaves those at
    exact zeros) gives exactly the bias (or zeros) without a product: every term of its dot
    products is a zero, so skipping the kernel changes no bit except possibly a zero's sign.
    """
    flat = x.reshape(-1, x.shape[-1])
    n_out = self.weight.shape[0]
    out = torch.zeros(flat.shape[0], n_out, dtype=torch.result_type(flat, self.weight),
                      device=flat.device)
    if self.bias is not None:
        out += self.bias
    for i in torch.nonzero(flat.ne(0).any(-1)).flatten().tolist():
        out[i] = torch.nn.functional.linear(flat[i:i + 1].clone(), self.weight, self.bias)[0]
    return out.view(*x.shape[:-1], n_out)
