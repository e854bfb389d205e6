"""A chat model run in this process: the `llm` describer, simulator and judge with no server and no
network, e.g. `endpoint: {url: local, model: smollm2-135m-instruct}`.

`model` is any source groundtruth.models loads (a packaged name, a local folder, a hub id). Decoding is
greedy (temperature is not read). One copy of a model per process serves every client that names it;
`complete_many` decodes a list of requests together in batches of the endpoint's `batch_size`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from ..generation import greedy_generate, render_prompt
from ..models import ModelSpec, default_device, load_model


@lru_cache(maxsize=2)
def _loaded(source: str, device: str):
    return load_model(ModelSpec(source=source), device)


def render_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a one-turn request (system messages, then user messages) as the model's input: through
    its chat template where it has one, else as plain text after the system text."""
    roles = {m["role"] for m in messages}
    if not roles <= {"system", "user"}:
        raise ValueError(f"a local model answers one turn: roles {sorted(roles - {'system', 'user'})} are not supported")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system") or None
    text = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
    return render_prompt(tokenizer, text, "auto", system)


class LocalChat:
    """The ChatClient interface (complete, complete_many, calls) over a model in this process: `model` a
    model source, `max_tokens` the default answer length, `batch_size` requests decoded together."""

    def __init__(self, model: str, max_tokens: int = 256, batch_size: int = 16, device: Optional[str] = None):
        self.model, self.max_tokens, self.batch_size = model, max_tokens, batch_size
        self.device = device or default_device()
        self.calls = 0

    def complete(self, messages: list[dict], max_tokens: Optional[int] = None) -> str:
        return self.complete_many([messages], max_tokens)[0]

    def complete_many(self, requests: list[list[dict]], max_tokens: Optional[int] = None) -> list[str]:
        """The replies to several requests, in order, decoded together."""
        model, tokenizer = _loaded(self.model, self.device)
        prompts = [render_messages(tokenizer, messages) for messages in requests]
        replies = greedy_generate(model, tokenizer, prompts, max_tokens or self.max_tokens, batch_size=self.batch_size)
        self.calls += len(requests)
        return replies
