"""Condition names and what they mean.

A condition is a wildcard in the generation path, so its name carries everything about
how prompts are dispatched:

- ``sync_b{n}``: synchronized dispatch at batch size n. Prompts are taken in battery order
  in groups of n; a group finishes before the next starts; the tail group is padded with
  discarded fillers. The hf engine runs one padded ``generate`` per group; vLLM sends n
  concurrent single-prompt requests.
- ``list_b{n}``: true batching: one request whose ``prompt`` is the list of n prompts (hf:
  identical to ``sync_b{n}``, one padded generate).
- ``cobatch_b{n}_{pool}``: composition: each safety prompt is a target, sent with n-1
  fillers from ``pool`` (``solo`` sends the target alone) at a seeded target position.
- ``stagger_b{n}_{pool}_{m|p}{ms}``: composition with the fillers sent ``ms`` milliseconds
  before (``m``) or after (``p``) the target (needs a continuous-batching server).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchflip.errors import BatchflipError

POOLS = ("solo", "benign", "adversarial", "safety", "jailbreak", "mixed", "refusal")
_PATTERN = re.compile(
    r"^(?P<dispatch>sync|list|cobatch|stagger)_b(?P<size>[1-9][0-9]*)"
    r"(?:_(?P<pool>[a-z]+))?(?:_(?P<sign>[mp])(?P<ms>[0-9]+))?$"
)


@dataclass(frozen=True)
class Condition:
    """A parsed condition name."""

    name: str
    dispatch: str
    batch_size: int
    pool: str | None = None
    stagger_ms: int = 0  # negative: fillers before the target; positive: after

    @property
    def composition(self) -> bool:
        """True for target + fillers conditions (cobatch, stagger)."""
        return self.dispatch in ("cobatch", "stagger")


def parse_condition(name: str) -> Condition:
    """Parse a condition name; raise BatchflipError naming the part that is wrong."""
    m = _PATTERN.match(name)
    if not m:
        raise BatchflipError(
            f"condition '{name}': expected sync_b<n>, list_b<n>, cobatch_b<n>_<pool> or "
            f"stagger_b<n>_<pool>_<m|p><ms>"
        )
    dispatch, size, pool = m["dispatch"], int(m["size"]), m["pool"]
    ms = int(m["ms"]) * (-1 if m["sign"] == "m" else 1) if m["ms"] else 0
    if dispatch in ("sync", "list") and (pool or m["ms"]):
        raise BatchflipError(f"condition '{name}': {dispatch} takes no filler pool or delay")
    if dispatch in ("cobatch", "stagger"):
        if pool not in POOLS:
            raise BatchflipError(f"condition '{name}': filler pool must be one of {POOLS}")
        if dispatch == "stagger" and not m["ms"]:
            raise BatchflipError(f"condition '{name}': stagger needs a delay like _m250 or _p500")
        if dispatch == "cobatch" and m["ms"]:
            raise BatchflipError(f"condition '{name}': cobatch takes no delay (use stagger)")
    return Condition(name, dispatch, size, pool, ms)
