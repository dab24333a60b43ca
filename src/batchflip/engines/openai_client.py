"""Async streaming client for OpenAI-compatible ``/v1/completions`` (vLLM, SGLang, TGI, ...).

One :class:`CompletionClient` owns a private asyncio event loop and one
``httpx.AsyncClient`` (connections are reused across groups); ``run_group`` is a plain
synchronous call that runs one group to completion on that loop, and ``run_stream`` runs a
``conc`` stream with at most ``batch_size`` requests in flight.

Requests are streamed and greedy (``temperature 0``, the study ``seed``), one per member
or one list request (``Condition.dispatch``); prompts arrive as finished strings. Each
member's ``Result`` carries ``t_submit``, ``t_first`` (first streamed token) and
``t_done`` in ``time.time()`` seconds. Transport errors, timeouts, HTTP 408/429/5xx and
in-stream errors are retried up to ``max_retries`` times; other 4xx are not. A member whose
attempts are exhausted still gets a row: empty text, ``finish_reason "error"``, the error
text in ``Result.error``; nothing is dropped.

The fingerprint's ``client`` reports ``token_ids_source`` (``server``,
``client_tokenizer`` or ``unavailable``) and, with ``logprobs``, ``logprob_token_names``
(``token_id`` or ``text``, the vLLM fields the warm-up found the server accepts). A token
name the vocabulary lacks gets id -1.

Dispatch, retries, log-probability fields and token ids in detail: docs/engines-gpus.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from batchflip.conditions import CONC, Condition
from batchflip.engines import Group, Result
from batchflip.errors import BatchflipError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
WARMUP_PROMPT = "Hello! Please introduce yourself in one sentence."


@dataclass
class ClientSettings:
    """What every request carries, and the retry policy."""

    base_url: str
    model: str | None
    max_tokens: int
    seed: int
    request_timeout_s: float = 300.0
    max_retries: int = 2
    retry_backoff_s: float = 1.0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    logprobs: int = 0


class RequestFailed(Exception):
    """One attempt failed; ``retriable`` says whether another attempt may succeed."""

    def __init__(self, message: str, retriable: bool = True, connect: bool = False) -> None:
        super().__init__(message)
        self.retriable, self.connect = retriable, connect


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    got_ids: bool = False
    chunks: int = 0
    finish_reason: str | None = None
    t_first: float | None = None
    t_done: float | None = None
    token_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def add_logprobs(self, lp: dict[str, Any], k: int, token_id: Callable[[str], int]) -> None:
        """Append one chunk's ``logprobs`` (token_logprobs, top_logprobs) to the choice;
        ``token_id`` turns a token's name into its id (-1 when unknown)."""
        for chosen, top in zip(lp.get("token_logprobs") or [], lp.get("top_logprobs") or [],
                               strict=False):
            ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])[:k]
            self.token_logprobs.append(float("nan") if chosen is None else float(chosen))
            self.top_ids.append([token_id(t) for t, _ in ranked])
            self.top_logprobs.append([float(v) for _, v in ranked])


TOKEN_ID_PREFIX = "token_id:"


def _token_id(token: str) -> int:
    """The id of a ``token_id:<id>`` name (vLLM's return_tokens_as_token_ids), else -1."""
    head, _, tail = token.partition(":")
    return int(tail) if head == "token_id" and tail.lstrip("-").isdigit() else -1


def _vocab_id(tokenizer: Any, token: str) -> int:
    """The id of a text-named token in the tokenizer's vocabulary, else -1.

    ``convert_tokens_to_ids`` looks the name up as a vocabulary entry (exact for the
    vocabulary's own spelling); an answer of None, a negative id or the unknown-token id for
    a name other than the unknown token itself counts as not found.
    """
    if tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
        return -1
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # noqa: BLE001 - a name the tokenizer cannot look up has no id
        return -1
    if not isinstance(tid, int) or tid < 0:
        return -1
    if tid == getattr(tokenizer, "unk_token_id", None) and token != getattr(
            tokenizer, "unk_token", None):
        return -1
    return tid


def _rejected(error: str) -> bool:
    """Whether a failed request was refused as malformed (an unknown field, say)."""
    return "HTTP 400" in error or "HTTP 422" in error


class CompletionClient:
    """Streams completions and turns groups into :class:`Result` lists (member order)."""

    def __init__(self, settings: ClientSettings,
                 tokenizer_loader: Callable[[], Any] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.s = settings
        self._transport = transport  # tests pass an httpx.MockTransport
        self.base_url = settings.base_url.rstrip("/")
        self.return_token_ids = True
        self.token_id_names = True  # send return_tokens_as_token_ids (with logprobs)
        self.logprob_token_names: str | None = None  # "token_id" | "text" once negotiated
        self._saw_text_names = False
        self._text_ids: dict[str, int] = {}
        self.token_ids_source = "server"
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer: Any = None
        self._tokenizer_tried = False
        self._loop = asyncio.new_event_loop()
        self._http: httpx.AsyncClient | None = None
        self.system_fingerprint: str | None = None
        self.warmed_up = False

    # ---- plumbing -------------------------------------------------------------------------

    def _run(self, coro: Awaitable[Any]) -> Any:
        return self._loop.run_until_complete(coro)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
            self._http = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, transport=self._transport,
                timeout=httpx.Timeout(self.s.request_timeout_s),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=128))
        return self._http

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET a JSON document (``/version``, ``/v1/models``); None when absent."""
        async def go() -> Any:
            try:
                r = await self._client().get(path, timeout=timeout)
            except httpx.HTTPError:
                return None
            if r.status_code != 200:
                return None
            try:
                return r.json()
            except ValueError:
                return None
        return self._run(go())

    def close(self) -> None:
        """Close the connections and the private event loop (idempotent)."""
        if self._loop.is_closed():
            return
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        if pending:  # a run interrupted by a signal: cancelling closes its streams
            for task in pending:
                task.cancel()
            with contextlib.suppress(BaseException):
                self._run(asyncio.gather(*pending, return_exceptions=True))
        if self._http is not None:
            with contextlib.suppress(Exception):  # closing must not mask the real error
                self._run(self._http.aclose())
            self._http = None
        with contextlib.suppress(Exception):
            self._run(self._loop.shutdown_asyncgens())
        self._loop.close()

    # ---- one request ----------------------------------------------------------------------

    def _body(self, prompt: str | list[str], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "seed": self.s.seed, "stream": True, **self.s.extra_body}
        if self.s.model:
            body["model"] = self.s.model
        if self.return_token_ids:
            body["return_token_ids"] = True
        if self.s.logprobs:
            body["logprobs"] = self.s.logprobs
            if self.token_id_names:
                body["return_tokens_as_token_ids"] = True
        return body

    async def _attempt(self, prompt: str | list[str], n: int, max_tokens: int,
                       first: asyncio.Event | None = None) -> dict[int, _Choice]:
        """One streamed request; raises RequestFailed on any failure. ``first`` is set when
        the first chunk with a choice arrives."""
        choices: dict[int, _Choice] = {}
        try:
            async with self._client().stream(
                    "POST", "/v1/completions", json=self._body(prompt, max_tokens)) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode("utf-8", "replace")[:500]
                    raise RequestFailed(f"HTTP {resp.status_code}: {detail}",
                                        retriable=resp.status_code in RETRY_STATUS)
                done = False
                async for line in resp.aiter_lines():  # read to the end: no dangling generator
                    if done or not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        continue
                    now = time.time()
                    try:
                        chunk = json.loads(payload)
                    except ValueError as exc:
                        raise RequestFailed(f"malformed stream chunk: {payload[:200]}") from exc
                    if "error" in chunk:
                        raise RequestFailed(f"server error in stream: {chunk['error']}")
                    if chunk.get("system_fingerprint"):
                        self.system_fingerprint = chunk["system_fingerprint"]
                    for c in chunk.get("choices") or []:
                        ch = choices.setdefault(int(c.get("index", 0)), _Choice())
                        if ch.t_first is None:
                            ch.t_first = now
                            if first is not None:
                                first.set()
                        if c.get("text"):
                            ch.text.append(c["text"])
                            ch.chunks += 1
                        if c.get("token_ids") is not None:
                            ch.got_ids = True
                            ch.token_ids.extend(int(t) for t in c["token_ids"])
                        if self.s.logprobs and c.get("logprobs"):
                            ch.add_logprobs(c["logprobs"], self.s.logprobs,
                                            self._logprob_token_id)
                        if c.get("finish_reason"):
                            ch.finish_reason = c["finish_reason"]
                            ch.t_done = now
        except httpx.ConnectError as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}", connect=True) from exc
        except httpx.TimeoutException as exc:
            raise RequestFailed(f"timeout ({type(exc).__name__}): {exc}") from exc
        except httpx.TransportError as exc:  # read/write errors, protocol errors
            raise RequestFailed(f"{type(exc).__name__}: {exc}") from exc
        end = time.time()
        missing = [i for i in range(n) if i not in choices]
        if missing:
            raise RequestFailed(f"response has no choice for index {missing}")
        for ch in choices.values():
            ch.t_done = ch.t_done or end
        return choices

    async def _request(self, prompt: str | list[str], n: int,
                       max_tokens: int | None = None,
                       first: asyncio.Event | None = None) -> list[Result]:
        """A request with timeout and bounded retries; always returns n results. ``first``
        is set on the first streamed chunk, and at the latest when the request ends."""
        try:
            return await self._request_inner(prompt, n, max_tokens, first)
        finally:
            if first is not None:
                first.set()

    async def _request_inner(self, prompt: str | list[str], n: int, max_tokens: int | None,
                             first: asyncio.Event | None) -> list[Result]:
        max_tokens = self.s.max_tokens if max_tokens is None else max_tokens
        t_start = time.time()
        last = RequestFailed("no attempt made")
        attempts = 0
        for attempt in range(1, self.s.max_retries + 2):
            attempts = attempt
            t_submit = time.time()
            try:
                choices = await asyncio.wait_for(self._attempt(prompt, n, max_tokens, first),
                                                 self.s.request_timeout_s)
            except asyncio.TimeoutError:
                last = RequestFailed(f"timeout: no complete response within "
                                     f"{self.s.request_timeout_s:g} s")
            except RequestFailed as exc:
                last = exc
            else:
                return [self._result(choices[i], t_submit, attempt) for i in range(n)]
            if not last.retriable or attempt > self.s.max_retries:
                break
            await asyncio.sleep(min(self.s.retry_backoff_s * 2 ** (attempt - 1), 30.0))
        t_fail = time.time()
        msg = f"{last} (after {attempts} attempt{'s' if attempts > 1 else ''})"
        return [Result(text="", token_ids=[], finish_reason="error", n_tokens=0,
                       t_submit=t_start, t_first=t_fail, t_done=t_fail, attempts=attempts,
                       error=msg, extra={"connect_error": last.connect})
                for _ in range(n)]

    def _result(self, ch: _Choice, t_submit: float, attempts: int) -> Result:
        text = "".join(ch.text)
        ids = ch.token_ids
        n_tokens = len(ids)
        if not ch.got_ids and text:
            ids = self._retokenize(text)
            n_tokens = len(ids) if self._tokenizer is not None else ch.chunks
        t_first = ch.t_first if ch.t_first is not None else ch.t_done
        res = Result(text=text, token_ids=ids, finish_reason=ch.finish_reason or "unknown",
                     n_tokens=n_tokens, t_submit=t_submit, t_first=t_first or t_submit,
                     t_done=ch.t_done or t_submit, attempts=attempts)
        if self.s.logprobs:
            res.token_logprobs, res.top_ids = ch.token_logprobs, ch.top_ids
            res.top_logprobs = ch.top_logprobs
        return res

    def _get_tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use; None when there is none."""
        if not self._tokenizer_tried:
            self._tokenizer_tried = True
            if self._tokenizer_loader is not None:
                try:
                    self._tokenizer = self._tokenizer_loader()
                except Exception:  # noqa: BLE001 - no tokenizer: callers fall back
                    self._tokenizer = None
        return self._tokenizer

    def _retokenize(self, text: str) -> list[int]:
        if self.token_ids_source == "server":
            self.token_ids_source = ("unavailable" if self._get_tokenizer() is None
                                     else "client_tokenizer")
        if self._tokenizer is None:
            return []
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _logprob_token_id(self, name: str) -> int:
        """A logprobs token name as an id: ``token_id:<id>``, else the text looked up in
        the tokenizer's vocabulary (docs/engines-gpus.md), else -1."""
        if name.startswith(TOKEN_ID_PREFIX):
            return _token_id(name)
        self._saw_text_names = True
        if name not in self._text_ids:
            self._text_ids[name] = _vocab_id(self._get_tokenizer(), name)
        return self._text_ids[name]

    # ---- groups ---------------------------------------------------------------------------

    async def _delayed(self, delay_s: float, prompt: str,
                       after: asyncio.Event | None = None) -> Result:
        if after is not None:
            await after.wait()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        return (await self._request(prompt, 1))[0]

    async def _after_first_token(self, group: Group) -> list[Result]:
        """``minimal_overlap``: the target, then the fillers once its first token is in."""
        if [m.role for m in group.members].count("target") != 1:
            raise BatchflipError(f"group {group.group_id}: minimal_overlap needs one target")
        first = asyncio.Event()
        tasks = [asyncio.ensure_future(self._request(m.prompt, 1, first=first))
                 if m.role == "target" else None for m in group.members]
        tasks = [t or asyncio.ensure_future(self._delayed(0.0, m.prompt, after=first))
                 for t, m in zip(tasks, group.members, strict=True)]
        return [r[0] if isinstance(r, list) else r for r in await asyncio.gather(*tasks)]

    async def run_stream_async(self, groups: Sequence[Group], condition: Condition,
                               on_group: Callable[[Group, list[Result]], None]) -> None:
        """``conc`` dispatch: every member of ``groups``, in order, as one stream of
        single-prompt requests with at most ``condition.batch_size`` in flight.

        A request starts only once it holds one of the n slots (taken in stream order by
        this one loop, so the start order is the stream order whatever the semaphore's
        fairness) and frees it when its response, retries included, is complete.
        ``on_group(group, results)`` runs in the loop as soon as every member of a group is
        answered (results in member order); if it raises, nothing more is sent, the
        requests in flight are cancelled and the error propagates.
        """
        if condition.dispatch != CONC:
            raise BatchflipError(f"condition '{condition.name}': a request stream needs a "
                                 "conc_c<n> condition")
        slots = asyncio.Semaphore(condition.batch_size)
        started: list[asyncio.Future[Any]] = []
        groups_done: list[asyncio.Future[Any]] = []

        async def member(prompt: str) -> Result:
            try:
                return (await self._request(prompt, 1))[0]
            finally:
                slots.release()

        async def finish(group: Group, futures: list[asyncio.Future[Any]]) -> None:
            on_group(group, list(await asyncio.gather(*futures)))

        def raise_failed() -> None:
            for fut in groups_done:
                if fut.done() and not fut.cancelled() and fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]

        try:
            for group in groups:
                futures = []
                for m in group.members:
                    await slots.acquire()
                    raise_failed()
                    futures.append(asyncio.ensure_future(member(m.prompt)))
                started += futures
                groups_done.append(asyncio.ensure_future(finish(group, futures)))
            await asyncio.gather(*groups_done)
        except BaseException:
            for fut in started + groups_done:
                fut.cancel()
            await asyncio.gather(*started, *groups_done, return_exceptions=True)
            raise

    def run_stream(self, groups: Sequence[Group], condition: Condition,
                   on_group: Callable[[Group, list[Result]], None]) -> None:
        """Synchronous wrapper around :meth:`run_stream_async`."""
        self._run(self.run_stream_async(groups, condition, on_group))

    async def run_group_async(self, group: Group, condition: Condition) -> list[Result]:
        """Dispatch one group as the condition says; results in member order."""
        prompts = [m.prompt for m in group.members]
        if condition.dispatch == CONC:
            out: list[Result] = []
            await self.run_stream_async([group], condition, lambda _g, res: out.extend(res))
            return out
        if condition.dispatch == "list":
            return await self._request(prompts, len(prompts))
        if condition.dispatch in ("sync", "cobatch"):
            delays = [0.0] * len(prompts)
        elif condition.timing == "minimal_overlap":
            return await self._after_first_token(group)
        elif condition.dispatch == "stagger":
            gap = abs(condition.stagger_ms) / 1000.0
            before = condition.stagger_ms < 0  # fillers before the target
            delays = [(0.0 if before else gap) if m.role == "filler" else (gap if before else 0.0)
                      for m in group.members]
        else:
            raise BatchflipError(f"condition '{condition.name}': unknown dispatch "
                                 f"'{condition.dispatch}'")
        tasks = [asyncio.ensure_future(self._delayed(d, p)) for d, p in zip(delays, prompts,
                                                                               strict=True)]
        return list(await asyncio.gather(*tasks))

    def run_group(self, group: Group, condition: Condition) -> list[Result]:
        """Synchronous wrapper around :meth:`run_group_async`."""
        return self._run(self.run_group_async(group, condition))

    def _negotiate(self, max_tokens: int) -> Result:
        """One warm-up request, asked again without the vLLM-only fields that a server
        rejects (HTTP 400/422): first without ``return_tokens_as_token_ids``, then without
        ``return_token_ids``, then without both. Keeps the first answered combination and,
        with logprobs, settles ``logprob_token_names``; returns the last result."""
        ids_options = (True, False) if self.return_token_ids else (False,)
        names_options = ((True, False) if self.s.logprobs and self.token_id_names
                         else (self.token_id_names,))
        self._saw_text_names = False
        res = None
        for ids, names in itertools.product(ids_options, names_options):
            self.return_token_ids, self.token_id_names = ids, names
            res = self._run(self._request(WARMUP_PROMPT, 1, max_tokens))[0]
            if not res.error or not _rejected(res.error):
                break
        assert res is not None
        if self.s.logprobs and not res.error:
            by_text = not self.token_id_names or self._saw_text_names
            self.logprob_token_names = "text" if by_text else "token_id"
            if by_text:
                self._get_tokenizer()  # load it now, not inside a timed request
        return res

    def _warmup_failed(self, res: Result) -> BatchflipError:
        return BatchflipError(f"warm-up request to {self.base_url}/v1/completions failed: "
                              f"{res.error}")

    def warmup(self, n: int = 3, max_tokens: int = 8) -> None:
        """``n`` sequential unrecorded requests; detects whether token ids are returned.

        A server that rejects ``return_token_ids`` or ``return_tokens_as_token_ids`` (HTTP
        400/422) is asked again without them (:meth:`_negotiate`). Raises BatchflipError
        when the server cannot answer at all.
        """
        for i in range(n):
            res = (self._negotiate(max_tokens) if i == 0
                   else self._run(self._request(WARMUP_PROMPT, 1, max_tokens))[0])
            if res.error:
                raise self._warmup_failed(res)
        self.warmed_up = True

    def negotiate_logprobs(self, max_tokens: int = 8) -> None:
        """Settle ``logprob_token_names`` with one unrecorded request when logprobs were
        switched on after the warm-up (a later study of a shared server job); a no-op when
        logprobs are off or already settled."""
        if self.s.logprobs and self.logprob_token_names is None:
            res = self._negotiate(max_tokens)
            if res.error:
                raise self._warmup_failed(res)
