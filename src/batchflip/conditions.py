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
- ``stagger_b{n}_{pool}_minimal_overlap``: the fillers are sent when the target's first
  generated token arrives (the streamed response's first chunk): the target's prefill ran
  without them, and they join its decode steps. The rule is the event, not a delay (a fixed
  50 ms was close to full overlap by the paper's own overlap model); what each group got
  is measured from its records (``batchflip.studies.composition_verify.stagger_overlap``:
  first filler submit against the target's first token and its end).
- ``list_b{n}_{pool}``: static batching: the target and its n-1 fillers (drawn as for
  ``cobatch``) sent as one request whose ``prompt`` is the list (the server admits the
  whole batch at once), against ``cobatch_b{n}_{pool}`` (continuous batching: concurrent
  single requests). ``list_b{n}`` without a pool is Study A's true batching.

Any condition may end in ``_repeat`` (e.g. ``sync_b1_repeat``, ``conc_c1_repeat``,
``cobatch_b8_solo_repeat``): the repeat control. It is the condition without the suffix,
generated a second time as a condition of its own (server engines: on a server of its own
start, ``batchflip.layout.server_jobs``), paired with it like any other condition: what it
changes is what a plain rerun changes (``batchflip.repeat``). A repeat repeats the
condition it is paired with: the study's baseline, or its dispatch's own baseline
(``batchflip.config``).

A composition condition may end in a phase tag ``_ph{tag}`` (lower-case letters and
digits, e.g. ``cobatch_b8_solo_ph3a``): the same dispatch, a separate condition, so a phase
can rerun a composition on other targets without clashing with the composition phase
(Study C's phases 3A and 3B). A tagged condition is compared with its phase's reference
(``batchflip.studies.composition_pairs.phase_reference``), never with the study baseline.
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
