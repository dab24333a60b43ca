"""Server engines ``vllm`` and ``openai``: the engine over a launched or running server.

``make_server_engine(settings, model_dir)`` returns a :class:`ServerEngine`:

- engine ``vllm`` launches ``python -m vllm.entrypoints.openai.api_server`` on loopback
  (a free port unless one is configured; another ``host`` needs ``expose_host: true``)
  with a random per-launch API key (``VLLM_API_KEY`` in its environment, sent by the client,
  recorded nowhere), waits for ``GET /health`` to answer 200, sends
  3 unrecorded warm-up requests and then serves ``run_group`` through
  :mod:`batchflip.engines.openai_client`. With ``server.base_url`` it uses that running
  server instead and launches nothing.
- engine ``openai`` never launches; it needs ``server.base_url`` of any OpenAI-compatible
  endpoint and records what ``/v1/models`` and ``/version`` say about it.

Requests carry ``model``: the model entry's ``served_model``, else ``server.model``, else
the first id ``/v1/models`` lists. A ``source: endpoint`` model has no files here, so its
token ids are the server's or ``unavailable``. The fingerprint (``.stack.json``) holds
nothing run-specific (port, pid, log path, time, free memory), so a resumed job gets the
same stack id; the per-launch ``startup`` block is left out of the id.
``server.replicas: k`` (engine ``vllm``, launched servers only): k servers on one device,
each with 1/k of ``gpu_memory_utilization``; replicas 1..k-1 start the first time a batch-1
condition runs (:meth:`ServerEngine.run_replicated`).

Launch settings: :mod:`batchflip.engines.vllm_launch`; lifecycle:
:mod:`batchflip.engines.supervise`; what the fingerprint records: docs/engines-gpus.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from batchflip.conditions import Condition
from batchflip.engines import Group, Result
from batchflip.engines.openai_client import ClientSettings, CompletionClient
from batchflip.engines.replicas import ReplicaPool
from batchflip.engines.supervise import VLLMServer, process_tree, stop_all_servers
from batchflip.engines.vllm_cache import cache_env, count_files, startup_facts
from batchflip.engines.vllm_launch import (
    BATCH_INVARIANT_SIGNS,
    SERVER_DEFAULTS,
    build_launch,
    check_batch_invariant_log,
    check_kernel_mode,
    free_port,
    launch_dtype,
    launch_settings,
    log_tail,
    parse_attention_backend,
    probe_vllm,
    recorded_env,
    replica_count,
    server_environ,
    server_settings,
)
from batchflip.errors import BatchflipError
from batchflip.model import ENDPOINT_PREFIX
from batchflip.settings import KERNEL_MODES, GenerationSettings

# re-exported for callers of this module (tests, the generate stage)
__all__ = ["BATCH_INVARIANT_SIGNS", "KERNEL_MODES", "SERVER_DEFAULTS", "ServerEngine",
           "VLLMServer", "build_launch", "check_batch_invariant_log", "check_kernel_mode",
           "free_port", "launch_settings", "log_tail", "make_server_engine",
           "parse_attention_backend", "probe_vllm", "process_tree", "server_environ",
           "server_settings", "stop_all_servers"]


class ServerEngine:
    """Engine ``vllm`` or ``openai``: an optional launched server plus the client."""

    def __init__(self, name: str, client: CompletionClient, facts: dict[str, Any],
                 server: VLLMServer | None = None) -> None:
        self.name, self.client, self.facts, self.server = name, client, facts, server
        # server.replicas (batchflip.engines.replicas): k, and how to start replica i >= 1
        self.replica_count = 1
        self.replica_factory: Callable[[int], Any] | None = None
        self.replicas: list[tuple[VLLMServer | None, CompletionClient]] = []
        self.startup: list[dict[str, Any]] = []  # per launch: cache state, compile, seconds

    def fingerprint(self) -> dict[str, Any]:
        """Stack facts for .stack.json (nothing run-specific, so resume keeps its id; the
        ``startup`` block is a run fact that the stack id leaves out)."""
        return {**self.facts, **({"startup": list(self.startup)} if self.startup else {}),
                "system_fingerprint": self.client.system_fingerprint,
                "token_ids_source": self.client.token_ids_source,
                "client": {"endpoint": "/v1/completions", "stream": True,
                           "temperature": 0.0,
                           "return_token_ids": self.client.return_token_ids,
                           **({"logprobs": self.client.s.logprobs,
                               "logprob_token_names": self.client.logprob_token_names}
                              if self.client.s.logprobs else {})}}

    def use_request_settings(self, settings: GenerationSettings) -> None:
        """Switch to a study's request settings (new tokens, logprobs) between the studies
        of a shared server job; the launch settings are the same by construction
        (batchflip.layout.LAUNCH_KEYS)."""
        for client in self._clients():
            client.s.max_tokens = settings.max_new_tokens
            client.s.logprobs = settings.logprobs
            if client.warmed_up:  # logprobs switched on after the warm-up: settle names
                client.negotiate_logprobs()

    def _clients(self) -> list[CompletionClient]:
        return [self.client, *(c for _, c in self.replicas)]

    def start_replicas(self) -> None:
        """Start replicas 1..k-1 one after another (each measures free memory at start-up,
        so they cannot start side by side), once; their clients take the first client's
        request settings and must have negotiated the same response fields."""
        if self.replica_factory is None or self.replicas:
            return
        for i in range(1, self.replica_count):
            launched = self.replica_factory(i)
            self.replicas.append((launched.server, launched.client))
            self.startup.append(launched.startup)
            theirs, ours = launched.client, self.client
            theirs.s.max_tokens, theirs.s.logprobs = ours.s.max_tokens, ours.s.logprobs
            theirs.negotiate_logprobs()
            for what in ("return_token_ids", "token_id_names", "logprob_token_names"):
                if getattr(theirs, what) != getattr(ours, what):
                    raise BatchflipError(
                        f"replica {i} ({theirs.base_url}) negotiated {what}="
                        f"{getattr(theirs, what)!r}, the first server {getattr(ours, what)!r}")
            for what in ("attention_backend", "batch_invariant_verified"):
                mine = launched.backend if what == "attention_backend" else launched.verified
                if mine != self.facts.get(what):
                    raise BatchflipError(
                        f"replica {i}: {what} {mine!r}, the first server "
                        f"{self.facts.get(what)!r} (log {launched.server.log_path})")

    def run_replicated(self, groups: Sequence[Group], condition: Condition,
                       on_group: Callable[[Group, list[Result]], None]) -> None:
        """A batch-1 condition over all replicas, one request in flight on each
        (:class:`batchflip.engines.replicas.ReplicaPool`); ``on_group`` in group order."""
        self._check_server()
        self.start_replicas()

        def done(group: Group, results: list[Result]) -> None:
            self._check_results(group, results)
            on_group(group, results)

        ReplicaPool(self._clients()).run(groups, condition, done)

    def run_group(self, group: Group, condition: Condition) -> list[Result]:
        """Dispatch one group; a dead launched server or unreachable endpoint is an error."""
        self._check_server()
        results = self.client.run_group(group, condition)
        self._check_results(group, results)
        return results

    def run_stream(self, groups: Sequence[Group], condition: Condition,
                   on_group: Callable[[Group, list[Result]], None]) -> None:
        """``conc`` dispatch: the groups as one request stream (at most n in flight);
        ``on_group`` gets each group's results as it finishes. A dead launched server or
        an unreachable endpoint stops the stream with an error, as in :meth:`run_group`."""
        self._check_server()

        def done(group: Group, results: list[Result]) -> None:
            self._check_results(group, results)
            on_group(group, results)

        self.client.run_stream(groups, condition, done)

    def _check_results(self, group: Group, results: list[Result]) -> None:
        if any(r.error for r in results):
            self._check_server()
            if all(r.extra.get("connect_error") for r in results):
                raise BatchflipError(f"{self.client.base_url} refused every connection for "
                                     f"group {group.group_id}: {results[0].error}")

    def _check_server(self) -> None:
        for server in [self.server, *(r for r, _ in self.replicas)]:
            if server is not None and not server.alive():
                raise BatchflipError(server._failure("the vLLM server died during the run"))

    def close(self) -> None:
        """Close the clients and stop the servers this engine launched (idempotent)."""
        try:
            for _, client in self.replicas:
                client.close()
            self.client.close()
        finally:
            for server in [*(r for r, _ in self.replicas), self.server]:
                if server is not None:
                    server.stop()


def _log_name(settings: GenerationSettings, replica: int = 0) -> str:
    parts = [settings.study, settings.model, settings.kernel_mode,
             time.strftime("%Y%m%d-%H%M%S"), str(os.getpid())]
    if replica:
        parts.append(f"r{replica}")
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts) + ".log"




def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(cfg: dict[str, Any], base_url: str) -> str | None:
    """The token sent to a running server (``base_url``): only from the variable the
    config names in ``server.api_key_env`` (none by default), and never in clear over
    http to a host other than loopback (docs/security.md)."""
    name = cfg["api_key_env"]
    key = os.environ.get(name) if name else None
    if not key:
        return None
    url = urlsplit(base_url)
    if url.scheme != "https" and not is_loopback(url.hostname or ""):
        raise BatchflipError(
            f"server.api_key_env: refusing to send ${name} to {base_url} over plain "
            f"{url.scheme or 'http'} (host {url.hostname} is not loopback): use an https "
            "base_url, or leave api_key_env out to send no token")
    return key


def check_host(cfg: dict[str, Any]) -> None:
    """A launched server binds loopback unless ``server.expose_host`` is true; then warn."""
    host = str(cfg["host"])
    if is_loopback(host):
        return
    if not cfg.get("expose_host"):
        raise BatchflipError(
            f"server.host: '{host}' is not a loopback address: other machines could send "
            "requests that get batched with the measured ones; set server.expose_host: true "
            "to allow it (requests still need the server's per-launch key)")
    print(f"WARNING: the vLLM server binds {host} (server.expose_host): it is reachable "
          "beyond this machine; requests need its per-launch key", file=sys.stderr)


def _client_for(settings: GenerationSettings, cfg: dict[str, Any], base_url: str,
                model_dir: str, launched_key: str | None = None) -> CompletionClient:
    """The client of a server: a launched one's own key, else api_key_for."""
    def load_tokenizer() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    key = launched_key or api_key_for(cfg, base_url)
    settings = ClientSettings(
        base_url=base_url, model=settings.served_model or cfg["model"],
        max_tokens=settings.max_new_tokens,
        seed=settings.seed, request_timeout_s=float(cfg["request_timeout_s"]),
        max_retries=int(cfg["max_retries"]), retry_backoff_s=float(cfg["retry_backoff_s"]),
        api_key=key or None, logprobs=settings.logprobs)
    endpoint_only = model_dir.startswith(ENDPOINT_PREFIX)  # no tokenizer files here
    return CompletionClient(settings, tokenizer_loader=None if endpoint_only else load_tokenizer)


def _models_summary(models: Any) -> list[dict[str, Any]]:
    """/v1/models without the per-call fields (timestamps, permission ids)."""
    data = models.get("data", []) if isinstance(models, dict) else []
    keep = ("id", "root", "owned_by", "max_model_len", "parent")
    return [{k: m.get(k) for k in keep if k in m} for m in data if isinstance(m, dict)]


def _prepare_client(client: CompletionClient, cfg: dict[str, Any], base_url: str) -> Any:
    models = client.get_json("/v1/models")
    if client.s.model is None:
        summary = _models_summary(models)
        if not summary:
            raise BatchflipError(f"{base_url}/v1/models lists no model; set server.model")
        client.s.model = summary[0]["id"]
    client.warmup(int(cfg["warmup_requests"]))
    return models


def make_server_engine(settings: GenerationSettings, model_dir: str) -> ServerEngine:
    """Engine ``vllm`` (launch or ``base_url``) or ``openai`` (``base_url`` only)."""
    name = settings.engine
    cfg = server_settings(settings)
    kernel_mode = settings.kernel_mode
    if name == "openai" or (name == "vllm" and cfg["base_url"]):
        if not cfg["base_url"]:
            raise BatchflipError("engine openai needs server.base_url (e.g. "
                                 "http://127.0.0.1:8000)")
        if replica_count(cfg) > 1:
            raise BatchflipError(f"server.replicas {cfg['replicas']}: replicas are servers "
                                 "this engine launches; a server.base_url cannot have them")
        client = _client_for(settings, cfg, cfg["base_url"], model_dir)
        try:
            models = _prepare_client(client, cfg, cfg["base_url"])
            version = client.get_json("/version")
        except BaseException:
            client.close()
            raise
        facts = {"engine": name,
                 "engine_version": version.get("version") if isinstance(version, dict) else None,
                 "base_url": cfg["base_url"].rstrip("/"), "served_model": client.s.model,
                 "server_models": _models_summary(models), "server_version": version,
                 "launched": False, "dtype": settings.dtype, "dtype_source": "declared",
                 "kernel_mode": kernel_mode, "kernel_mode_source": "declared",
                 "device": None, "attention_backend": None}
        return ServerEngine(name, client, facts)
    if name != "vllm":
        raise BatchflipError(f"engine '{name}': make_server_engine serves vllm and openai")

    python = cfg["python"] or sys.executable
    probe = probe_vllm(python)
    check_kernel_mode(kernel_mode, probe)
    check_host(cfg)
    eff = launch_settings(settings, probe)  # checks server.replicas
    first = _launch(settings, cfg, probe, model_dir, 0)
    facts = {
        "engine": "vllm",
        "engine_version": first.version or probe.get("vllm_version"),
        "vllm_distribution": probe.get("distribution"),
        "torch": probe.get("torch"), "transformers": probe.get("transformers"),
        "device": probe.get("device"), "device_type": probe.get("device_type"),
        "compute_capability": probe.get("compute_capability"),
        "dtype": launch_dtype(settings, probe),
        **({"dtype_rule": "auto"} if settings.dtype == "auto" else {}),
        "attention_backend": first.backend, "attention_backend_source": first.backend_source,
        "kernel_mode": kernel_mode,
        "kernel_flags": {"VLLM_BATCH_INVARIANT": first.env["VLLM_BATCH_INVARIANT"]},
        "batch_invariant_verified": first.verified,
        "server_settings": eff,
        "server_flags": first.flags, "server_env": recorded_env(first.env), "launched": True,
        "host": probe.get("host"), "flash_attn": probe.get("flash_attn"),
    }
    engine = ServerEngine("vllm", first.client, facts, first.server)
    engine.startup = [first.startup]
    k = int(eff.get("replicas", 1))
    if k > 1:
        engine.replica_count = k
        engine.replica_factory = lambda i: _launch(settings, cfg, probe, model_dir, i)
    return engine


class _Launched(NamedTuple):
    """One launched, warmed-up and checked server with its client."""

    server: VLLMServer
    client: CompletionClient
    env: dict[str, str | None]
    flags: list[str]
    version: str | None
    backend: str | None
    backend_source: str
    verified: str | None
    startup: dict[str, Any]


def _launch(settings: GenerationSettings, cfg: dict[str, Any], probe: dict[str, Any],
            model_dir: str, replica: int) -> _Launched:
    """Start one server (replica ``replica``: its own port and log), wait for health, warm
    it up and check its log (attention backend, kernel-mode signs); stopped on failure."""
    if cfg["port"]:
        port = int(cfg["port"]) + replica
    else:
        port = free_port(cfg["host"])
    argv, env, flags = build_launch(settings, model_dir, port, probe)
    # a random key per launch, in the environment (not argv: other users can read a
    # process's argv): only this job's requests are served, nobody else's get batched in
    key = secrets.token_urlsafe(32)
    env["VLLM_API_KEY"] = key
    log_path = Path(cfg["log_dir"]) / _log_name(settings, replica)
    cache_files = count_files(cfg["cache_dir"])
    server = VLLMServer(argv, {**env, **cache_env(cfg["cache_dir"])}, log_path, cfg["host"],
                        port, float(cfg["startup_timeout_s"]), float(cfg["stop_grace_s"]))
    server.start()
    client = _client_for(settings, cfg, server.base_url, model_dir, launched_key=key)
    try:
        _prepare_client(client, cfg, server.base_url)
        version = client.get_json("/version")
        log = server.log_text()
        backend = parse_attention_backend(log)
        source = "server log"
        if backend is None and cfg["attention_backend"]:
            backend, source = str(cfg["attention_backend"]), "config"
        elif backend is None and probe.get("device_type") == "cpu":
            backend, source = "CPU_ATTN", "vLLM CPU platform default (not logged)"
        elif backend is None:
            source = "unknown"
        verified = check_batch_invariant_log(settings.kernel_mode, log, server.log_path)
    except BaseException:
        client.close()
        server.stop()
        raise
    return _Launched(server, client, env, flags,
                     version.get("version") if isinstance(version, dict) else None,
                     backend, source, verified,
                     {"replica": replica,
                      **startup_facts(cfg["cache_dir"], cache_files, log, server.startup_s)})
