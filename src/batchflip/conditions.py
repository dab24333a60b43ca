"""Condition names and what they mean.

A condition is a wildcard in the generation path, so its name carries everything about
how prompts are dispatched:

- ``sync_b{n}``: synchronized dispatch at batch size n. Prompts are taken in battery order
  in groups of n; a group finishes before the next starts; the tail group is padded with
  discarded fillers. The hf engine runs one padded ``generate`` per group; vLLM sends n
  concurrent single-prompt requests.
- ``list_b{n}``: true batching: one request whose ``prompt`` is the list of n prompts (hf:
  identical to ``sync_b{n}``, one padded generate).
- ``conc_c{n}``: a concurrency-capped stream (Study A's phase 3, the harness's
  ``asyncio.Semaphore(n)``): the study's prompts, in battery order, as one stream of
  single-prompt requests with at most n in flight; the next request starts as soon as any
  one returns (no group barrier, unlike ``sync_b{n}``). Server engines only (vllm, openai;
  hf refuses it). Records: ``dispatch`` ``conc``, ``batch_size`` n (the concurrency cap,
  not a group size). Groups: every prompt is a group of its own (``group_id`` = its place in
  the stream, ``position`` 0), and the whole stream of groups still to do is dispatched
  at once (``batchflip.generate.run_job``), so the checkpoint keeps each answered prompt: a
  killed job resumes with the prompts not yet answered, streamed again at most n in
  flight (the resumed stream is shorter, so the load around its first requests is not the
  uninterrupted run's; ``t_submit`` shows it). ``conc_c1`` (one request at a time) is the
  phase's baseline.
- ``cobatch_b{n}_{pool}``: composition: each safety prompt is a target, sent with n-1
  fillers from ``pool`` (``solo`` sends the target alone) at a seeded target position.
- ``stagger_b{n}_{pool}_{m|p}{ms}``: composition with the fillers sent ``ms`` milliseconds
  before (``m``) or after (``p``) the target (needs a continuous-batching server).
- ``stagger_b{n}_{pool}_simultaneous``: the temporal phase's zero offset: target and fillers
  sent at once (``stagger_ms`` 0; the same dispatch as ``cobatch``, a stagger condition so
  that the temporal phase has its own reference).
- ``stagger_b{n}_{pool}_minimal_overlap``: the fillers are sent ``MINIMAL_OVERLAP_MS``
  (50 ms) after the target: longer than the target's prefill on the paper's stack (tens of
  ms for 1-3B models and prompts under 2,048 tokens on one H100), so the target's prefill
  runs without them and they join its decode steps. The rule is a fixed delay because the
  server engine dispatches stagger groups by delay (``stagger_ms`` = +50); the generation
  records' ``t_first`` (target) and ``t_submit`` (fillers) show whether each group met it.
- ``list_b{n}_{pool}``: static batching: the target and its n-1 fillers (drawn as for
  ``cobatch``) sent as one request whose ``prompt`` is the list (the server admits the
  whole batch at once), against ``cobatch_b{n}_{pool}`` (continuous batching: concurrent
  single requests). ``list_b{n}`` without a pool is Study A's true batching.

A composition condition may end in a phase tag ``_ph{tag}`` (lower-case letters and
digits, e.g. ``cobatch_b8_solo_ph3a``): the same dispatch, a separate condition, so a phase
can rerun a composition on other targets without clashing with the composition phase
(Study C's phases 3A and 3B). A tagged condition is compared with its phase's reference
(``batchflip.studies.composition_pairs.phase_reference``), never with the study baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchflip.errors import BatchflipError

CONC = "conc"  # the dispatch of conc_c{n} (a concurrency-capped stream)
# dispatches whose groups are batch_size prompts of the study's own (not composition):
# a study must send at least that many (config.check_batch_sizes, generate.run_job)
BATCHED_DISPATCHES = ("sync", "list")
POOLS = ("solo", "benign", "adversarial", "safety", "jailbreak", "mixed", "refusal")
TIMINGS = ("simultaneous", "minimal_overlap")  # named stagger timings (besides m/p offsets)
MINIMAL_OVERLAP_MS = 50  # fillers this many ms after the target (see the module docstring)
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
    stagger_ms: int = 0  # negative: fillers before the target; positive: after
    timing: str | None = None  # stagger only: "offset", "simultaneous" or "minimal_overlap"
    phase: str | None = None  # the ``_ph{tag}`` tag of a phase condition

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
    if c := _CONC.match(name):
        return Condition(name, CONC, int(c["size"]))
    m = _PATTERN.match(name)
    if not m:
        raise BatchflipError(
            f"condition '{name}': expected sync_b<n>, list_b<n>[_<pool>], cobatch_b<n>_<pool>, "
            f"stagger_b<n>_<pool>_<m|p><ms|simultaneous|minimal_overlap> (a composition "
            f"optionally ending in _ph<tag>) or conc_c<n>"
        )
    dispatch, size, pool, phase = m["dispatch"], int(m["size"]), m["pool"], m["phase"]
    timed = bool(m["ms"] or m["timing"])
    ms = int(m["ms"]) * (-1 if m["sign"] == "m" else 1) if m["ms"] else 0
    if m["timing"] == "minimal_overlap":
        ms = MINIMAL_OVERLAP_MS
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
