"""In-process transformers engine (CPU or GPU).

Synchronized and true batching are the same thing here: one left-padded greedy
``generate`` call per group. Composition puts target and fillers in one padded batch.
There is no continuous-batching scheduler and no request stream, so ``stagger`` and
``conc`` conditions are refused.

``dtype: auto`` resolves on the device: bfloat16 where it is native (a CPU with AVX512-BF16,
AMX or ARM BF16; a GPU of compute capability >= 8.0), else float32 (CPU) or float16 (GPU);
the fingerprint records the resolved dtype and ``dtype_rule: auto``.

Kernel modes: ``standard`` (whatever transformers/torch pick) and ``batch_invariant``
(``batchflip.engines.invariant``: a fixed-order forward whose result for a sequence does
not depend on the rest of the batch).

Log-probabilities (``logprobs: k``): ``generate`` returns the raw logits of every step
(``output_logits``: before any logits processor, and the engine sets none that change
them), and each token's log-softmax in float32 gives the chosen token's log-probability
and the top k.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from batchflip.conditions import CONC, Condition
from batchflip.engines import Group, Result
from batchflip.errors import BatchflipError
from batchflip.platform_facts import cpu_facts, host_facts, resolve_dtype
from batchflip.settings import DEFAULT_KERNEL_MODE, KERNEL_MODES, GenerationSettings

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _FirstTokenClock:
    """A logits processor that notes when the first decode step starts (after prefill)."""

    def __init__(self) -> None:
        self.t_first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.t_first is None:
            self.t_first = time.time()
        return scores


class HFEngine:
    """Greedy generation with transformers, one padded batch per group."""

    name = "hf"

    def __init__(self, model_dir: str, dtype: str, max_new_tokens: int, seed: int,
                 kernel_mode: str = DEFAULT_KERNEL_MODE, device: str | None = None,
                 threads: int | None = None, logprobs: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_rule = dtype  # "auto" resolves per device (platform_facts.resolve_dtype)
        if dtype == "auto":  # the host facts are read only when the rule needs them
            cuda = self.device.startswith("cuda")
            dtype = resolve_dtype(dtype, cpu_facts(), ".".join(
                map(str, torch.cuda.get_device_capability(self.device))) if cuda else None)
        if dtype not in DTYPES:
            raise BatchflipError(f"dtype '{dtype}': must be one of {sorted(DTYPES)} or auto")
        self.dtype, self.max_new_tokens, self.seed = dtype, max_new_tokens, seed
        self.kernel_mode, self.logprobs = kernel_mode, int(logprobs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        self.model = model.to(self.device).eval()
        self.kernel_flags: dict[str, Any] = {}
        if kernel_mode == "batch_invariant":
            from batchflip.engines import invariant

            self.kernel_flags = invariant.enable(self.model)
        elif kernel_mode not in KERNEL_MODES:
            raise BatchflipError(f"kernel_mode '{kernel_mode}': hf supports "
                                 f"{', '.join(KERNEL_MODES)}")
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id))
        self.eos_ids.add(self.tokenizer.eos_token_id)

    @classmethod
    def from_settings(cls, settings: GenerationSettings, model_dir: str) -> HFEngine:
        """The engine a job's settings describe."""
        return cls(model_dir, settings.dtype, settings.max_new_tokens, settings.seed,
                   settings.kernel_mode, threads=settings.threads, logprobs=settings.logprobs)

    def fingerprint(self) -> dict[str, Any]:
        """Engine, library versions, device, host (CPU model and vector ISA; on GPU the
        card, driver and CUDA) and kernel facts."""
        import transformers

        cuda = torch.cuda.is_available() and self.device.startswith("cuda")
        host = host_facts(gpu=cuda)
        return {
            "engine": "hf",
            "engine_version": transformers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if cuda else host["cpu"]["cpu_model"],
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))
            if cuda else None,
            "host": host,
            "dtype": self.dtype,
            **({"dtype_rule": "auto"} if self.dtype_rule == "auto" else {}),
            "attention_backend": getattr(self.model.config, "_attn_implementation", None),
            "kernel_mode": self.kernel_mode,
            "kernel_flags": self.kernel_flags,
            "threads": torch.get_num_threads(),
        }

    def run_group(self, group: Group, condition: Condition) -> list[Result]:
        """One left-padded greedy generate over the whole group."""
        if condition.dispatch == "stagger":
            raise BatchflipError(f"condition '{condition.name}' needs a continuous-batching "
                                 "server; engine 'hf' has none (use engine vllm or openai)")
        if condition.dispatch == CONC:
            raise BatchflipError(f"condition '{condition.name}' is a stream of single-prompt "
                                 "requests with a concurrency cap, which needs a server; "
                                 "engine 'hf' serves no requests (use engine vllm or openai)")
        texts = [m.prompt for m in group.members]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        clock = _FirstTokenClock()
        torch.manual_seed(self.seed)
        t_submit = time.time()
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id, logits_processor=[clock],
                temperature=None, top_p=None, top_k=None,
                output_logits=bool(self.logprobs), return_dict_in_generate=True,
            )
        t_done = time.time()
        seqs = out.sequences[:, enc["input_ids"].shape[1]:]
        lps = token_logprobs(out.logits, seqs, self.logprobs) if self.logprobs else None
        results = []
        for row, ids in enumerate(seqs.tolist()):
            ids, reason = self._trim(ids)
            res = Result(
                text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                finish_reason=reason, n_tokens=len(ids), t_submit=t_submit,
                t_first=clock.t_first or t_done, t_done=t_done,
            )
            if lps is not None:
                chosen, top_ids, top_lps = (x[row, :len(ids)].tolist() for x in lps)
                res.token_logprobs, res.top_ids, res.top_logprobs = chosen, top_ids, top_lps
            results.append(res)
        return results

    def _trim(self, ids: list[int]) -> tuple[list[int], str]:
        """Cut generated ids after the first EOS (kept); padding after it is dropped."""
        for i, tok in enumerate(ids):
            if tok in self.eos_ids:
                return ids[: i + 1], "stop"
        return ids, "length"

    def close(self) -> None:
        """Nothing to release beyond memory."""
        self.model = None  # type: ignore[assignment]


def token_logprobs(logits: tuple[torch.Tensor, ...], ids: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per generated token: the chosen token's log-probability (batch, steps), and the top
    ``k`` ids and log-probabilities (batch, steps, k), from one logits tensor per step."""
    lp = torch.log_softmax(torch.stack(logits, dim=1).float(), dim=-1)
    chosen = lp.gather(-1, ids[:, : lp.shape[1], None]).squeeze(-1)
    top = lp.topk(k, dim=-1)
    return chosen, top.indices, top.values


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
