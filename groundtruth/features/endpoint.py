"""A client for any OpenAI-compatible chat-completions endpoint (a local vLLM or llama.cpp server, or a
hosted API): what the `llm` describer, simulator and judge talk to. `url: local` runs `model` in this
process instead (local_chat.py), offline.

Plain urllib, no SDK: POST {url}/chat/completions with {model, messages, temperature, max_tokens}
and read choices[0].message.content. Rate limits (429) and server errors (5xx) are retried with
backoff; anything else fails at once, naming the URL.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint."""

    url: str
    """Base URL of the API, e.g. http://localhost:8000/v1 (the client appends /chat/completions), or
    `local`: `model` runs in this process (groundtruth/features/local_chat.py)."""
    model: str
    """Model name the server expects; with url `local`, a model source (e.g. smollm2-135m-instruct)."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """Environment variable holding the API key (sent as a Bearer token if set; local servers need none)."""
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 120.0
    """Seconds per request."""
    retries: int = 4
    """Attempts after a 429 / 5xx / connection error before giving up."""
    batch_size: int = 16
    """Requests a local model decodes together, or a server is sent at once (complete_many)."""


class EndpointError(RuntimeError):
    pass


class ChatClient(Protocol):
    """What the llm describer, simulator and judge call: ChatEndpoint or local_chat.LocalChat."""

    def complete(self, messages: list[dict], max_tokens: Optional[int] = None) -> str: ...

    def complete_many(self, requests: list[list[dict]], max_tokens: Optional[int] = None) -> list[str]: ...


class ChatEndpoint:
    def __init__(self, cfg: EndpointConfig):
        self.cfg = cfg
        self.calls = 0
        self._count = threading.Lock()

    def complete(self, messages: list[dict], max_tokens: Optional[int] = None) -> str:
        """The assistant's reply to a list of {'role', 'content'} messages."""
        cfg = self.cfg
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                           "max_tokens": max_tokens or cfg.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = cfg.url.rstrip("/") + "/chat/completions"
        last: Exception = EndpointError("no attempt made")
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
                    reply = json.loads(response.read())
                with self._count:
                    self.calls += 1
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    detail = err.read().decode(errors="replace")[:300]
                    raise EndpointError(f"{url}: HTTP {err.code}: {detail}") from None
                last = err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = err
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                raise EndpointError(f"{url}: not an OpenAI chat-completions reply ({err!r})") from None
        raise EndpointError(f"{url}: gave up after {cfg.retries + 1} attempts: {last}")

    def complete_many(self, requests: list[list[dict]], max_tokens: Optional[int] = None) -> list[str]:
        """The replies to several requests, in order, up to batch_size HTTP requests in flight at once: a
        server batches concurrent requests itself, and one at a time leaves it waiting on each round trip."""
        workers = min(self.cfg.batch_size, len(requests))
        if workers <= 1:
            return [self.complete(messages, max_tokens) for messages in requests]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda messages: self.complete(messages, max_tokens), requests))


LOCAL = "local"


def client_for(endpoint: Optional[EndpointConfig], what: str) -> ChatClient:
    """A client for `what` (e.g. 'the llm judge'), failing clearly when no endpoint is configured: a
    ChatEndpoint, or a LocalChat where the url is `local`."""
    if endpoint is None:
        raise ValueError(f"{what} needs an endpoint (endpoint.url and endpoint.model in the task config)")
    if endpoint.url == LOCAL:
        from .local_chat import LocalChat  # loads torch and transformers only where a local model is asked for
        return LocalChat(endpoint.model, endpoint.max_tokens, endpoint.batch_size)
    return ChatEndpoint(endpoint)


def build(registry: dict, name: str, what: str, endpoint: Optional[EndpointConfig]):
    """registry[name](endpoint), naming the known entries when `name` is not one."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(registry)})")
    return registry[name](endpoint)
