"""Generation engines: a common interface over in-process transformers and OpenAI servers.

An engine turns one *group* (the prompts that share a batch under a condition) into one
result per member. ``generate.py`` builds the groups, handles resume and writes records;
engines only generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from batchflip.conditions import Condition


@dataclass(frozen=True)
class Member:
    """One prompt in a group: its slot, whether it counts, and the text sent."""

    position: int
    role: str  # "target" | "filler"
    prompt_id: str
    prompt: str


@dataclass(frozen=True)
class Group:
    """Prompts dispatched together under one condition."""

    group_id: int
    members: tuple[Member, ...]


@dataclass
class Result:
    """What an engine returns for one member (timestamps are ``time.time()`` seconds).

    With a study's ``logprobs: k`` the engine also fills, per generated token, the chosen
    token's log-probability and the k most likely tokens (ids and log-probabilities,
    highest first); otherwise the three stay None and no record carries them.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    n_tokens: int
    t_submit: float
    t_first: float
    t_done: float
    attempts: int = 1
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    token_logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


class Engine(Protocol):
    """The interface every engine implements."""

    name: str

    def fingerprint(self) -> dict[str, Any]:
        """Stack facts (engine, versions, device, dtype, kernels, flags) for .stack.json."""
        ...

    def run_group(self, group: Group, condition: Condition) -> list[Result]:
        """Generate greedily for every member; results in member order."""
        ...

    def close(self) -> None:
        """Release resources (stop a server this engine started)."""
        ...


@runtime_checkable
class StreamEngine(Protocol):
    """An engine that also serves ``conc`` conditions (the server engines): a stream of
    single-prompt requests with a concurrency cap (:mod:`batchflip.conditions`)."""

    def run_stream(self, groups: Sequence[Group], condition: Condition,
                   on_group: Callable[[Group, list[Result]], None]) -> None:
        """Send every group's members as one stream; ``on_group`` as each group is done."""
        ...
