"""Batch invariance attested by behaviour: a probe on the served stack before Study D
measures (ablation study key ``invariance_probe``).

The server log shows that vLLM *registered* its batch-invariant kernels
(``vllm_launch.BATCH_INVARIANT_SIGNS``); the probe checks that they *do* what they promise
on this stack. It sends a few prompts (``prompts``, default 8: the Study D candidates' own
prompts first, then the battery's in order) alone (``sync_b1``, one at a time) and together
(``sync_b{batch}``, default 8 at once), greedy, ``max_new_tokens`` (default 32) tokens with
the top-2 log-probabilities, and compares each prompt's two answers **bit for bit**: the
generated token ids, the chosen tokens' log-probabilities and the top-2 log-probabilities
(as IEEE-754 doubles, ``float.hex``).

- Under ``kernel_mode: batch_invariant`` every prompt must match; a prompt that does not is a
  **failed** probe: the job stops with an error naming it (nothing is measured).
- Under ``kernel_mode: standard`` the same probe is the **negative control**: it should
  differ somewhere, which shows that the probe can see a batch effect on this stack. When it
  does not, nothing is wrong with the measurement, but an identical batch-invariant probe
  then proves nothing: the verdict says it **cannot tell**.

The batch-invariant job reads the standard job's result (its stack fingerprint, an input of
the rule when both modes are in ``kernel_modes``) and records the combined verdict:
``attested`` (identical with the mode on, different with it off), ``cannot tell``
(identical both ways), ``identical, no negative control`` (standard not run) or ``failed``.
The verdict and both outcomes go into the stack fingerprint's ``invariance_probe`` block (a
run fact, left out of the stack id: ``generate.RUN_FACTS``).

Where the mode cannot run, the probe says so and never passes: vLLM's CPU build has no
Triton backend for the batch-invariant kernels (``unavailable_reason``; the launch is
refused before anything starts, ``vllm_launch.check_kernel_mode``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchflip.conditions import parse_condition
from batchflip.engines import Group, Member, Result
from batchflip.errors import BatchflipError

PROBE_DEFAULTS: dict[str, Any] = {"prompts": 8, "batch": 8, "max_new_tokens": 32}
VERDICTS = ("attested", "cannot tell", "identical, no negative control", "failed",
            "negative control: differs", "negative control: identical", "not run")
Runner = Callable[[Group, Any], list[Result]]


@dataclass
class ProbeOutcome:
    """One probe: which prompts, how they were sent, and which answers differed."""

    prompt_ids: list[str]
    batch: int
    max_new_tokens: int
    tokens_compared: int = 0
    differing: list[str] = field(default_factory=list)
    first_difference: str | None = None

    @property
    def identical(self) -> bool:
        """True when every prompt's batched answer equals its batch-1 answer bit for bit."""
        return not self.differing

    def to_dict(self) -> dict[str, Any]:
        """The outcome as recorded in the fingerprint."""
        return {**asdict(self), "identical": self.identical}


def probe_settings(given: Any) -> dict[str, Any] | None:
    """``invariance_probe`` over :data:`PROBE_DEFAULTS` (None or false: no probe; true:
    the defaults); unknown keys and sizes below 1 (prompts, batch below 2) are errors."""
    if given is None or given is False:
        return None
    if given is True:
        given = {}
    if not isinstance(given, dict):
        raise BatchflipError(f"invariance_probe: expected true, false or a mapping, got "
                             f"{given!r}")
    unknown = sorted(set(given) - set(PROBE_DEFAULTS))
    if unknown:
        raise BatchflipError(f"invariance_probe: unknown key(s) {unknown}; known: "
                             f"{sorted(PROBE_DEFAULTS)}")
    out = {**PROBE_DEFAULTS, **given}
    if int(out["batch"]) < 2 or int(out["prompts"]) < 1 or int(out["max_new_tokens"]) < 1:
        raise BatchflipError(f"invariance_probe: batch must be >= 2, prompts and "
                             f"max_new_tokens >= 1, got {out}")
    return {k: int(v) for k, v in out.items()}


def _bits(values: Sequence[Any] | None) -> list[Any]:
    """Floats as exact hex strings (nested lists kept), so equality is bit equality."""
    if values is None:
        return []
    return [_bits(v) if isinstance(v, (list, tuple)) else float(v).hex() for v in values]


def compare(alone: Result, batched: Result) -> str | None:
    """None when the two answers agree bit for bit (token ids, chosen log-probabilities,
    top log-probabilities), else where they first differ. Answers without
    log-probabilities cannot be compared: an error."""
    for r in (alone, batched):
        if r.error:
            raise BatchflipError(f"invariance probe: a request failed: {r.error}")
        if r.token_logprobs is None:
            raise BatchflipError("invariance probe: the engine returned no log-probabilities")
    if list(alone.token_ids) != list(batched.token_ids):
        i = next((j for j, (a, b) in enumerate(zip(alone.token_ids, batched.token_ids,
                                                     strict=False)) if a != b),
                 min(len(alone.token_ids), len(batched.token_ids)))
        return f"token ids differ at step {i}"
    for name in ("token_logprobs", "top_logprobs"):
        a, b = _bits(getattr(alone, name)), _bits(getattr(batched, name))
        if a != b:
            i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
            return f"{name} differ at step {i}"
    return None


def run_probe(run: Runner, prompts: Sequence[tuple[str, str]], batch: int,
              max_new_tokens: int) -> ProbeOutcome:
    """Each prompt alone (sync_b1), then in groups of ``batch`` (sync_b{batch}; a short
    tail group is filled with the first prompts as fillers), compared bit for bit."""
    if len(prompts) < 1:
        raise BatchflipError("invariance probe: no prompts")
    alone_cond, batch_cond = parse_condition("sync_b1"), parse_condition(f"sync_b{batch}")
    alone = {pid: run(Group(i, (Member(0, "target", pid, text),)), alone_cond)[0]
             for i, (pid, text) in enumerate(prompts)}
    out = ProbeOutcome([pid for pid, _ in prompts], batch, max_new_tokens)
    for gid, start in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[start:start + batch])
        fill = [p for p in prompts if p not in chunk][: batch - len(chunk)]
        while len(chunk) + len(fill) < batch:  # fewer prompts than one batch: repeat
            fill.append(prompts[len(fill) % len(prompts)])
        members = [Member(i, "target", pid, text) for i, (pid, text) in enumerate(chunk)]
        members += [Member(len(chunk) + i, "filler", pid, text)
                    for i, (pid, text) in enumerate(fill)]
        results = run(Group(gid, tuple(members)), batch_cond)
        for m, res in zip(members, results, strict=True):
            if m.role != "target":
                continue
            out.tokens_compared += len(res.token_ids)
            diff = compare(alone[m.prompt_id], res)
            if diff is not None:
                out.differing.append(m.prompt_id)
                out.first_difference = out.first_difference or f"{m.prompt_id}: {diff}"
    return out


def verdict(kernel_mode: str, outcome: ProbeOutcome | None,
            control: dict[str, Any] | None = None, reason: str | None = None
            ) -> dict[str, Any]:
    """The fingerprint block: the verdict (:data:`VERDICTS`), this job's outcome and, for
    batch_invariant, the standard job's (``control``: its recorded outcome, or None)."""
    if outcome is None:
        return {"verdict": "not run", "reason": reason or "no probe",
                "kernel_mode": kernel_mode}
    block: dict[str, Any] = {"kernel_mode": kernel_mode, "outcome": outcome.to_dict()}
    if kernel_mode == "standard":
        block["verdict"] = ("negative control: differs" if not outcome.identical
                            else "negative control: identical")
        return block
    block["control"] = control
    if not outcome.identical:
        block["verdict"] = "failed"
    elif control is None:
        block["verdict"] = "identical, no negative control"
    elif control.get("identical"):
        block["verdict"] = "cannot tell"
    else:
        block["verdict"] = "attested"
    return block


def unavailable_reason(facts: dict[str, Any], kernel_mode: str) -> str | None:
    """Why the batch-invariant mode (and so its probe) cannot run on this stack, or None."""
    if kernel_mode != "batch_invariant":
        return None
    if facts.get("engine") == "vllm" and facts.get("device_type") == "cpu":
        return ("vLLM's batch-invariant kernels are Triton kernels and this vLLM build runs "
                "on CPU, where Triton has no backend: the mode cannot run here, so the probe "
                "cannot attest it (it does not pass)")
    if facts.get("launched") is False:
        return "a server this engine did not launch: its kernel mode is only declared"
    return None


@contextlib.contextmanager
def _probe_mode(engine: Any, max_new_tokens: int) -> Iterator[Runner]:
    """The engine with top-2 log-probabilities and the probe's token budget, restored
    afterwards (server engines: the client's request settings; hf: the engine's)."""
    client = getattr(engine, "client", None)
    if client is not None:  # ServerEngine
        saved = (client.s.max_tokens, client.s.logprobs)
        client.s.max_tokens, client.s.logprobs = max_new_tokens, 2
        try:
            client.negotiate_logprobs()
            yield client.run_group
        finally:
            client.s.max_tokens, client.s.logprobs = saved
        return
    if hasattr(engine, "logprobs") and hasattr(engine, "max_new_tokens"):  # HFEngine
        saved = (engine.max_new_tokens, engine.logprobs)
        engine.max_new_tokens, engine.logprobs = max_new_tokens, 2
        try:
            yield engine.run_group
        finally:
            engine.max_new_tokens, engine.logprobs = saved
        return
    raise BatchflipError(f"invariance probe: engine '{getattr(engine, 'name', engine)}' "
                         "cannot return log-probabilities")


def attest(engine: Any, prompts: Sequence[tuple[str, str]], settings: dict[str, Any],
           kernel_mode: str, control: dict[str, Any] | None) -> dict[str, Any]:
    """Run the probe on ``engine`` and return the fingerprint block; a failed
    batch-invariant probe raises (the job stops before it measures)."""
    reason = unavailable_reason(engine.fingerprint(), kernel_mode)
    if reason:
        return verdict(kernel_mode, None, reason=reason)
    chosen = list(prompts)[: settings["prompts"]]
    with _probe_mode(engine, settings["max_new_tokens"]) as run:
        outcome = run_probe(run, chosen, settings["batch"], settings["max_new_tokens"])
    block = verdict(kernel_mode, outcome, control)
    if block["verdict"] == "failed":
        raise BatchflipError(
            f"invariance probe failed: with kernel_mode batch_invariant, "
            f"{len(outcome.differing)} of {len(chosen)} prompts answered differently alone "
            f"and in a batch of {settings['batch']} (first: {outcome.first_difference}); "
            f"the server's batch-invariant kernels do not make this stack batch-invariant, "
            f"so Study D was not measured")
    return block


def control_outcome(stack: dict[str, Any], path: object) -> dict[str, Any] | None:
    """The standard job's probe outcome from its stack fingerprint (None when it ran no
    probe); a fingerprint of another kernel mode is an error naming the file."""
    block = stack.get("invariance_probe")
    if block is None or block.get("outcome") is None:
        return None
    if block.get("kernel_mode") != "standard":
        raise BatchflipError(f"{path}: invariance_probe of kernel mode "
                             f"'{block.get('kernel_mode')}', expected the standard job's")
    return dict(block["outcome"])
