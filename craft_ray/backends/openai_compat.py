"""``openai`` backend: any OpenAI-compatible HTTP server (vLLM serve, TGI, llama.cpp,
``transformers serve``, hosted).

Requests go out from a small Ray Data actor pool; inside an actor, a thread pool keeps up to
``max_concurrent_requests`` requests in flight under a QPS limit (the configured QPS is split
evenly over the actors). Server errors (HTTP 429 / 5xx), timeouts and connection failures are
retried with exponential backoff; what still fails becomes a row with a fixed ``error`` reason,
so it ends in the rejects, never kills the stage. Before any work, :func:`preflight` asks the
server for its models once (``GET /models``): an unreachable URL or a refused key is one clear
error then, not a stage full of rejects (a model the list does not name: a warning). Only the
standard library is used (urllib).

Why not ``ray.data.llm``'s HTTP request processor (``HttpRequestProcessorConfig``, read in
Ray 2.60's ``ray/llm/_internal/batch/stages/http_request_stage.py``)? It does retries and a QPS
limit, but not with the semantics this stage needs:

- a request that still fails after ``max_retries`` raises ``RuntimeError`` in the UDF, which
  fails the whole batch (and, once Ray Data's task retries are spent, the dataset);
  ``should_continue_on_error`` is honoured by the vLLM and Serve stages only. Here a failed
  request must become a reject row with its reason (``raw = clean + rejects``).
- only HTTP 429/408/502/503/504 are retried; an HTTP 500 (or any other error status) whose body
  is JSON is handed on as if it were the response, without its status code, and one whose body
  is not JSON raises (aiohttp's ``ContentTypeError`` is not caught) and fails the batch.
- requests of a batch are sent one after another: the ``session.post(...)`` calls of its first
  loop only create the requests, each is sent when awaited in the second loop, so an actor
  never has more than one request in flight (no ``max_concurrent_requests``).
- no per-request timeout (aiohttp's session default: 5 minutes in total); the QPS counter
  restarts with every batch.

So the hand-written client stays; it is small and tested against a fake server and a real
``transformers serve`` (``tests/backends``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from craft_ray.backends import (
    ERR_BAD_RESPONSE,
    ERR_CONNECTION,
    ERR_REJECTED,
    ERR_SERVER,
    ERR_TIMEOUT,
    batch_rows,
    error_row,
    merge_outputs,
    row_seed,
)
from craft_ray.config import StrictModel

logger = logging.getLogger(__name__)


class OpenAIBackendConfig(StrictModel):
    """Settings of the ``openai`` backend."""

    base_url: str = Field(
        default="http://127.0.0.1:8000/v1",
        description="Server base URL up to and including /v1 (e.g. http://host:8000/v1).",
    )
    api: Literal["chat", "completions"] = Field(
        default="chat",
        description="'chat': POST /chat/completions with the messages (the server applies its "
        "chat template); 'completions': POST /completions with the prompt rendered locally "
        "(needs generate.tokenizer).",
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key (sent as a Bearer "
        "token). None: no key (local servers).",
    )
    qps: float = Field(default=8.0, gt=0, le=100_000, description="Requests per second, total.")
    max_concurrent_requests: int = Field(
        default=8, ge=1, le=4096, description="Requests in flight per actor."
    )
    concurrency: int = Field(default=1, ge=1, le=256, description="Request actors.")
    batch_size: int = Field(default=16, ge=1, le=100_000, description="Rows per actor call.")
    timeout_s: float = Field(default=120.0, gt=0, le=3600, description="Timeout per request.")
    max_retries: int = Field(
        default=3, ge=0, le=20, description="Retries after the first attempt (429/5xx/timeouts)."
    )
    backoff_s: float = Field(
        default=1.0, ge=0, le=600,
        description="First retry delay; doubles each retry (plus up to 10% jitter).",
    )
    send_top_k: bool = Field(
        default=True,
        description="Send top_k (vLLM/TGI/llama.cpp accept it; the OpenAI API does not, and "
        "transformers serve answers HTTP 422 to it: set false there).",
    )
    guided_format: Literal["response_format", "none"] = Field(
        default="response_format",
        description="How guided decoding is requested: OpenAI's response_format json_schema "
        "(vLLM, llama.cpp, OpenAI), or not at all. Whitespace inside the JSON is the server's "
        "choice: for vLLM start it with --structured-outputs-config "
        "'{\"disable_any_whitespace\": true}' (its xgrammar backend ignores the per-request "
        "flag), else a weak model can loop on whitespace until max_tokens.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra JSON fields merged into every request (server-specific options).",
    )
    preflight: bool = Field(
        default=True,
        description="Before any work, GET {base_url}/models once: the server must answer and "
        "accept the key (a model it does not list: a warning). false: skip (servers without "
        "/models).",
    )


class _RateLimiter:
    """At most ``qps`` starts per second across the threads of one actor."""

    def __init__(self, qps: float) -> None:
        self.interval = 1.0 / qps
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class OpenAIGenerator:
    """Ray Data actor: sends one request per prompt row, with retries, under a QPS limit."""

    def __init__(self, cfg: dict[str, Any], model: str, sampling: dict[str, Any],
                 actors: int) -> None:
        self.cfg = OpenAIBackendConfig.model_validate(cfg)
        self.model = model
        self.sampling = sampling
        self.limiter = _RateLimiter(self.cfg.qps / max(1, actors))
        self.api_key = None
        if self.cfg.api_key_env:
            self.api_key = os.environ.get(self.cfg.api_key_env)
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrent_requests)

    # --- one request --------------------------------------------------------------------
    def build_request(self, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(url, JSON body) for a prompt row."""
        s = self.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": int(row["max_new_tokens"]),
            "temperature": float(s["temperature"]),
            "top_p": float(s["top_p"]),
            "seed": row_seed(int(s["seed"]), str(row["sample_id"])),
        }
        if self.cfg.send_top_k:
            body["top_k"] = int(s["top_k"])
        if s["guided"] and self.cfg.guided_format == "response_format":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "task_sample", "schema": json.loads(row["schema"])},
            }
        if self.cfg.api == "chat":
            body["messages"] = json.loads(row["messages"])
            url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        else:
            body["prompt"] = str(row["prompt"])
            url = self.cfg.base_url.rstrip("/") + "/completions"
        body.update(self.cfg.extra_body)
        return url, body

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = f"HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}"
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(ERR_SERVER, detail) from None
            raise _Final(ERR_REJECTED, detail) from None
        except TimeoutError as exc:
            raise _Retryable(ERR_TIMEOUT, f"timeout after {self.cfg.timeout_s}s: {exc}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Retryable(ERR_TIMEOUT, f"timeout: {exc.reason}") from None
            raise _Retryable(ERR_CONNECTION, f"{exc.reason}") from None
        except (ConnectionError, OSError) as exc:
            raise _Retryable(ERR_CONNECTION, f"{type(exc).__name__}: {exc}") from None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            raise _Final(ERR_BAD_RESPONSE, payload[:500].decode(errors="replace")) from None

    def request(self, row: dict[str, Any]) -> dict[str, Any]:
        """Generation columns for one row (retries included)."""
        url, body = self.build_request(row)
        t0 = time.perf_counter()
        attempts = self.cfg.max_retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.cfg.backoff_s * 2 ** (attempt - 1)
                time.sleep(delay * (1 + 0.1 * random.random()))
            self.limiter.wait()
            try:
                data = self._post(url, body)
            except _Retryable as exc:
                last = exc
                logger.warning("request for %s failed (attempt %d/%d): %s", row["sample_id"],
                               attempt + 1, attempts, exc.detail)
                continue
            except _Final as exc:
                return error_row(exc.reason, exc.detail, time.perf_counter() - t0)
            return _parse_response(data, self.cfg.api, int(row["max_new_tokens"]),
                                   time.perf_counter() - t0)
        assert last is not None
        return error_row(last.reason, f"{attempts} attempts; last: {last.detail}",
                         time.perf_counter() - t0)

    def __call__(self, batch: Any) -> Any:
        rows = batch_rows(batch, ("sample_id", "prompt", "messages", "schema",
                                  "max_new_tokens"))
        outs = list(self.pool.map(self.request, rows))
        return merge_outputs(batch, outs)


class _Final(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _parse_response(data: dict[str, Any], api: str, max_tokens: int, seconds: float
                    ) -> dict[str, Any]:
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
        text = text or ""
        usage = data.get("usage") or {}
        tokens_out = int(usage.get("completion_tokens", -1))
        finish = choice.get("finish_reason") or ""
    except (KeyError, IndexError, TypeError) as exc:
        return error_row(ERR_BAD_RESPONSE, f"{type(exc).__name__}: {json.dumps(data)[:500]}",
                         seconds)
    if finish not in ("stop", "length"):
        finish = "length" if 0 <= max_tokens <= tokens_out else "stop"
    return {"text": text, "tokens_in": int(usage.get("prompt_tokens", -1)),
            "tokens_out": tokens_out, "gen_seconds": seconds, "finish_reason": finish,
            "error": "", "error_detail": ""}


PREFLIGHT_TIMEOUT_S = 10.0


def _auth_headers(cfg: OpenAIBackendConfig) -> dict[str, str]:
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def preflight(cfg: OpenAIBackendConfig, model: str, section: str = "generate") -> list[str]:
    """Ask the server for its models once, before any work; the ids it serves.

    Raises :class:`~craft_ray.config.ConfigError` naming the URL and what to check when the
    server cannot be reached, refuses the key or answers an error (``section`` names the
    config section in the message, e.g. ``judge.judge``); a ``model`` the list does not name
    is a warning. Skipped (returns []) with ``preflight: false``.
    """
    from craft_ray.config import ConfigError

    if not cfg.preflight:
        return []
    url = cfg.base_url.rstrip("/") + "/models"
    where = f"{section}.openai"
    off = f"(or set {where}.preflight: false to skip this check)"
    req = urllib.request.Request(url, headers=_auth_headers(cfg), method="GET")
    try:
        with urllib.request.urlopen(req, timeout=min(cfg.timeout_s, PREFLIGHT_TIMEOUT_S)) as resp:
            payload = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()[:300].decode(errors="replace")
        if exc.code in (401, 403):
            key = (f"the key in ${cfg.api_key_env}" if cfg.api_key_env else "no key")
            raise ConfigError(
                f"{where}: the server at {url} refused the request with {key} (HTTP "
                f"{exc.code}: {body}); check that {where}.api_key_env names a variable "
                "holding a valid key for this server") from None
        if exc.code == 404:
            raise ConfigError(
                f"{where}: GET {url} answered HTTP 404; check that {where}.base_url is the "
                f"server's API root ending in /v1, e.g. http://host:8000/v1 {off}") from None
        raise ConfigError(f"{where}: GET {url} answered HTTP {exc.code}: {body}; check the "
                          f"server's log {off}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"{where}: cannot reach the server at {url} ({reason}); check that it is running "
            f"and listening there and that {where}.base_url (host, port, /v1) is right"
        ) from None
    try:
        ids = [str(m["id"]) for m in json.loads(payload).get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise ConfigError(f"{where}: GET {url} did not answer an OpenAI model list "
                          f"({payload[:200].decode(errors='replace')!r}); is {where}.base_url "
                          f"an OpenAI-compatible API? {off}") from None
    if ids and model not in ids:
        # A warning, not an error: some servers (llama.cpp) answer to any model name.
        logger.warning("%s.model=%r is not among the models %s lists (%s); if the server "
                       "refuses the requests, set %s.model to the served name", section, model,
                       cfg.base_url, ids[:10], section)
    else:
        logger.info("openai backend: %s answers and serves %s", cfg.base_url, model)
    return ids


def openai_generate(ds: Any, model: str, cfg: OpenAIBackendConfig, sampling: dict[str, Any]
                    ) -> Any:
    """Lazy: ``ds`` (prompt rows) -> the same rows plus the generation columns."""
    import ray.data

    runtime_env = None
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        # The key travels to the request actors through their environment (never a column).
        runtime_env = {"env_vars": {cfg.api_key_env: os.environ[cfg.api_key_env]}}
    extra: dict[str, Any] = {"runtime_env": runtime_env} if runtime_env else {}
    return ds.map_batches(
        OpenAIGenerator, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_cpus=0.25,
        fn_constructor_kwargs={"cfg": cfg.model_dump(), "model": model, "sampling": sampling,
                               "actors": cfg.concurrency},
        **extra,
    )
