"""Prompt formats: ``raw`` (the paper's: the rendered prompt as is) and ``chat``.

``chat`` wraps the rendered prompt as a user turn (after an optional system prompt) with
the model's own chat template and adds the generation prompt. Both engines receive the
same final string, so hf and vLLM generations are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from batchflip.errors import BatchflipError

FORMATS = ("raw", "chat")


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str):  # noqa: ANN202 - transformers type
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def format_prompts(
    prompts: Sequence[str], fmt: str, model_dir: str, system_prompt: str | None = None
) -> list[str]:
    """Return the strings sent to the engine for ``prompts`` under format ``fmt``."""
    if fmt == "raw":
        return list(prompts)
    if fmt != "chat":
        raise BatchflipError(f"prompt_format '{fmt}': must be one of {FORMATS}")
    tok = _tokenizer(model_dir)
    if not getattr(tok, "chat_template", None):
        raise BatchflipError(f"{model_dir}: prompt_format 'chat' but the model has no chat "
                             "template (use prompt_format: raw)")
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tok.apply_chat_template(head + [{"role": "user", "content": p}], tokenize=False,
                                add_generation_prompt=True)
        for p in prompts
    ]

