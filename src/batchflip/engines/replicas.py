"""Batch-1 conditions over k server replicas on one device (``server.replicas``).

A batch-1 condition only requires that each engine sees one request at a time; on a GPU a
small model's batch-1 decoding is latency-bound (one request in flight leaves the GPU idle
most of the time), so k identical servers of the model, each with its share of the device's
memory and each with one request in flight, finish the same work up to k times sooner
without changing what any one engine computes. Measured on an NVIDIA H100 (vLLM 0.26,
Qwen2.5-Coder-0.5B fp16, 128 paper prompts, 128 new tokens): one server 372 tokens/s with
the GPU busy ~44% of the time; 2 replicas 1.99x, 4 replicas 2.14x, texts 128/128
byte-identical to one server's. Hence the suggestion k = 2 for a 0.5B model on an H100.

Which conditions (:func:`one_in_flight`): ``sync_b1`` and ``list_b1`` (one single-prompt
request per group, a group finishes before the next starts; this includes a repeat of the
baseline), ``conc_c1`` (one request at a time) and ``cobatch_b<n>_solo`` (the target sent
alone). Every other condition runs on the first replica only.

Dispatch (:class:`ReplicaPool`): one worker thread per replica takes the next group in
order from one shared queue and runs it on its own client (so each replica has at most one
request in flight); finished groups are handed to ``on_group`` in group order, on the
calling thread, so the checkpoint and the records are written in the same order, with the
same rows, as one server's (only the timestamps differ). The first error stops the workers
from taking new groups; the error is raised once the requests in flight have returned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from batchflip.conditions import CONC, Condition
from batchflip.engines import Group, Result
from batchflip.errors import BatchflipError

# how long the caller waits for the workers to return after an error or an interrupt
JOIN_TIMEOUT_S = 600.0


def one_in_flight(cond: Condition) -> bool:
    """True for the conditions in which the engine sees one request at a time (module
    docstring): sync_b1, list_b1, conc_c1 and cobatch_b<n>_solo."""
    if cond.dispatch == CONC:
        return cond.batch_size == 1
    if cond.dispatch in ("sync", "list") and cond.pool is None:
        return cond.batch_size == 1
    return cond.dispatch == "cobatch" and cond.pool == "solo"


class GroupRunner(Protocol):
    """What a replica needs: the client's synchronous ``run_group``."""

    def run_group(self, group: Group, condition: Condition) -> list[Result]:
        """Dispatch one group; results in member order."""
        ...


class ReplicaPool:
    """Groups of a one-in-flight condition spread over replicas (module docstring)."""

    def __init__(self, runners: Sequence[GroupRunner]) -> None:
        if not runners:
            raise BatchflipError("a replica pool needs at least one replica")
        self.runners = list(runners)

    def run(self, groups: Sequence[Group], condition: Condition,
            on_group: Callable[[Group, list[Result]], None]) -> list[int]:
        """Run every group on some replica; ``on_group`` in group order on this thread.
        Returns, per group in order, the index of the replica that ran it."""
        if not one_in_flight(condition):
            raise BatchflipError(f"condition '{condition.name}' puts more than one request "
                                 "in flight; replicas serve only batch-1 conditions")
        lock = threading.Condition()
        todo = list(range(len(groups)))
        todo.reverse()  # pop() takes the next group in order
        finished: dict[int, tuple[list[Result], int]] = {}
        errors: list[BaseException] = []
        stop = threading.Event()

        def work(replica: int) -> None:
            runner = self.runners[replica]
            while True:
                with lock:  # stop is set under this lock: no group starts after an error
                    if stop.is_set() or not todo:
                        return
                    i = todo.pop()
                try:
                    results = runner.run_group(groups[i], condition)
                except BaseException as exc:  # handed to the caller's thread
                    with lock:
                        errors.append(exc)
                        stop.set()
                        lock.notify_all()
                    return
                with lock:
                    finished[i] = (results, replica)
                    lock.notify_all()

        threads = [threading.Thread(target=work, args=(r,), daemon=True,
                                    name=f"replica-{r}") for r in range(len(self.runners))]
        for t in threads:
            t.start()
        used: list[int] = []
        try:
            for i, group in enumerate(groups):
                with lock:
                    while i not in finished and not errors:
                        lock.wait(timeout=1.0)
                    if errors:
                        raise errors[0]
                    results, replica = finished.pop(i)
                used.append(replica)
                on_group(group, results)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=JOIN_TIMEOUT_S)
        return used
