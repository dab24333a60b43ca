"""Condition names and what they mean.

A condition is a wildcard in the generation path, so its name carries everything about
how prompts are dispatched:

- ``sync_b{n}``: groups of n prompts in battery order, each finished before the next
  starts, the tail padded with discarded fillers (hf: one padded ``generate`` per group;
  servers: n concurrent single-prompt requests).
- ``list_b{n}``: one request whose ``prompt`` is the list of n prompts (hf: as ``sync_b{n}``).
- ``conc_c{n}``: the prompts as one stream of single-prompt requests, at most n in flight,
  no group barrier; every prompt is a group of its own. Records: ``dispatch`` ``conc``,
  ``batch_size`` n (the cap). Server engines only (hf refuses it).
- ``cobatch_b{n}_{pool}``: each safety prompt a target, sent with n-1 fillers from
  ``pool`` (``solo``: alone) at a seeded target position.
- ``stagger_b{n}_{pool}_{m|p}{ms}``: fillers sent ``ms`` ms before (``m``) or after (``p``)
  the target; ``..._simultaneous``: all at once (``stagger_ms`` 0); ``..._minimal_overlap``:
  fillers sent when the target's first generated token arrives.
- ``list_b{n}_{pool}``: static batching, target and its n-1 fillers in one list request.

Suffixes: ``_repeat`` (any condition) is the repeat control, the condition generated again
as a condition of its own and paired with it (``batchflip.repeat``); ``_ph{tag}`` (lower-case
letters and digits, compositions only) is the same dispatch as a separate condition, compared
with its phase's reference (``batchflip.studies.composition_pairs.phase_reference``), never
with the study baseline.

Narrative (conc resume, minimal_overlap's rule, phases): docs/configuration.md, docs/pairs.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from batchflip.errors import BatchflipError

CONC = "conc"  # the dispatch of conc_c{n} (a concurrency-capped stream)
# dispatches whose groups are batch_size prompts of the study's own (not composition):
# a study must send at least that many (config.check_batch_sizes, generate.run_job)
BATCHED_DISPATCHES = ("sync", "list")
POOLS = ("solo", "benign", "adversarial", "safety", "jailbreak", "mixed", "refusal")
TIMINGS = ("simultaneous", "minimal_overlap")  # named stagger timings (besides m/p offsets)
REPEAT = "_repeat"  # the suffix of a repeat control (see the module docstring)
# Version of the composition grouping and dispatch rule. A composition job with fillers
# carries it in its params (batchflip.layout.generation_settings), so a new version reruns
# exactly those jobs. 2: fillers and target position drawn per (seed, pool, batch size,
# target), not per condition name (batchflip.generate.draw_group); minimal_overlap sends the
# fillers on the target's first streamed token (batchflip.engines.openai_client).
GROUPING = 2
_CONC = re.compile(r"^conc_c(?P<size>[1-9][0-9]*)$")
_PATTERN = re.compile(
    r"^(?P<dispatch>sync|list|cobatch|stagger)_b(?P<size>[1-9][0-9]*)"
    r"(?:_(?P<pool>[a-z]+))?"
    r"(?:_(?:(?P<sign>[mp])(?P<ms>[0-9]+)|(?P<timing>simultaneous|minimal_overlap)))?"
    r"(?:_ph(?P<phase>[a-z0-9]+))?$"
)


@dataclass(frozen=True)
class Condition:
    """A parsed condition name."""

    name: str
    dispatch: str
    batch_size: int  # conc: the concurrency cap n
    pool: str | None = None
    stagger_ms: int = 0  # negative: fillers before the target; positive: after (offsets)
    timing: str | None = None  # stagger only: "offset", "simultaneous" or "minimal_overlap"
    phase: str | None = None  # the ``_ph{tag}`` tag of a phase condition
    repeat: bool = False  # a repeat control (``_repeat``): the base condition run again

    @property
    def base(self) -> str:
        """The name without ``_repeat``: the condition a repeat runs again (else the name)."""
        return self.name[: -len(REPEAT)] if self.repeat else self.name

    @property
    def composition(self) -> bool:
        """True for target + fillers conditions (cobatch, stagger, list with a pool)."""
        return self.dispatch in ("cobatch", "stagger") or (self.dispatch == "list"
                                                           and self.pool is not None)

    @property
    def concurrency(self) -> int | None:
        """conc: the most requests in flight at once (None for every other dispatch)."""
        return self.batch_size if self.dispatch == CONC else None


def parse_condition(name: str) -> Condition:
    """Parse a condition name; raise BatchflipError naming the part that is wrong."""
    if name.endswith(REPEAT):
        try:
            base = parse_condition(name[: -len(REPEAT)])
        except BatchflipError as exc:
            raise BatchflipError(f"condition '{name}' (a repeat control): {exc}") from None
        if base.repeat:
            raise BatchflipError(f"condition '{name}': a repeat is repeated once "
                                 f"(one {REPEAT} suffix)")
        return replace(base, name=name, repeat=True)
    if c := _CONC.match(name):
        return Condition(name, CONC, int(c["size"]))
    m = _PATTERN.match(name)
    if not m:
        raise BatchflipError(
            f"condition '{name}': expected sync_b<n>, list_b<n>[_<pool>], cobatch_b<n>_<pool>, "
            f"stagger_b<n>_<pool>_<m|p><ms|simultaneous|minimal_overlap> (a composition "
            f"optionally ending in _ph<tag>) or conc_c<n>, any of them optionally ending in "
            f"{REPEAT}"
        )
    dispatch, size, pool, phase = m["dispatch"], int(m["size"]), m["pool"], m["phase"]
    timed = bool(m["ms"] or m["timing"])
    ms = int(m["ms"]) * (-1 if m["sign"] == "m" else 1) if m["ms"] else 0
    if dispatch == "sync" and (pool or timed or phase):
        raise BatchflipError(f"condition '{name}': sync takes no filler pool, delay or phase")
    if dispatch == "list" and (timed or (phase and not pool)):
        raise BatchflipError(f"condition '{name}': list takes no delay, and a phase tag only "
                             "with a filler pool (list_b<n>_<pool>_ph<tag>)")
    if pool is not None and pool not in POOLS:
        raise BatchflipError(f"condition '{name}': filler pool must be one of {POOLS}")
    if dispatch in ("cobatch", "stagger"):
        if pool is None:
            raise BatchflipError(f"condition '{name}': {dispatch} needs a filler pool, one of "
                                 f"{POOLS}")
        if dispatch == "stagger" and not timed:
            raise BatchflipError(f"condition '{name}': stagger needs a delay like _m250 or "
                                 "_p500, or _simultaneous or _minimal_overlap")
        if m["ms"] and ms == 0:
            raise BatchflipError(f"condition '{name}': a zero offset is spelled "
                                 f"stagger_b{size}_{pool}_simultaneous")
        if dispatch == "cobatch" and timed:
            raise BatchflipError(f"condition '{name}': cobatch takes no delay (use stagger)")
    if dispatch == "list" and pool == "solo":
        raise BatchflipError(f"condition '{name}': a static batch needs fillers (solo is "
                             "cobatch_b<n>_solo)")
    timing = (m["timing"] or "offset") if dispatch == "stagger" else None
    return Condition(name, dispatch, size, pool, ms, timing, phase)
