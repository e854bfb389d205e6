"""Prompt rendering and batched greedy generation, shared by ground truth and explainer eval."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Collection, Literal, Optional, Sequence

import torch

from .models import model_device

PromptFormat = Literal["auto", "chat", "plain"]


def uses_chat(tokenizer, fmt: PromptFormat) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template ('auto': if it has one)."""
    if fmt == "chat" and not tokenizer.chat_template:
        raise ValueError(f"prompt format 'chat' asked for, but tokenizer {tokenizer.name_or_path!r} has no chat template")
    return fmt == "chat" or (fmt == "auto" and bool(tokenizer.chat_template))


def prompt_string(tokenizer, text: str, fmt: PromptFormat, system: Optional[str] = None) -> tuple[str, bool]:
    """(the model's input as a string, whether tokenizing it adds special tokens such as BOS).

    A chat template writes its own special tokens; plain text gets the tokenizer's (BOS). The template
    also reads the model spec's chat_template_kwargs (load_model puts them on the tokenizer), e.g.
    enable_thinking=False for Qwen3."""
    if uses_chat(tokenizer, fmt):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        extra = getattr(tokenizer, "chat_template_kwargs", None) or {}
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra), False
    prefix = f"{system}\n\n" if system else ""
    return prefix + text, True


def render_prompt(tokenizer, text: str, fmt: PromptFormat, system: Optional[str] = None) -> list[int]:
    """Token ids of `text` as the model's input, ending where the model's answer starts."""
    string, special = prompt_string(tokenizer, text, fmt, system)
    return tokenizer(string, add_special_tokens=special)["input_ids"]


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, padded on the left so every prompt ends at the last column."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def _window_spans(model, width: int) -> bool:
    """Whether every attention layer sees all `width` positions (no sliding window shorter than them)."""
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    return window is None or width <= window


MIN_SHARED_PREFIX = 8
"""Tokens every prompt must share before it is run once for all (a few-shot preamble, a chat header):
below that, the extra forward's fixed cost outweighs the positions it saves."""


def shared_prefix(prompts: Sequence[Sequence[int]], stop_at: Collection[int] = ()) -> int:
    """Length of the token prefix all prompts share, 0 if under MIN_SHARED_PREFIX. Every prompt keeps at
    least its last token to itself (its next token is decided there), and the prefix ends before the
    first token in stop_at (tokens whose embedding differs per prompt: an injected [vec])."""
    if len(prompts) < 2:
        return 0
    first = [int(t) for t in prompts[0]]
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if first[i] in stop_at or any(int(p[i]) != first[i] for p in prompts[1:]):
            n = i
            break
    return n if n >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    use_cache: bool = True,
    batch_context: Optional[Callable[[list[int]], AbstractContextManager]] = None,
    suppress_tokens: Sequence[int] = (),
    row_tokens: Collection[int] = (),
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of token-id prompts, in input order.

    Prompts are sorted by length before batching so a batch pads little; the KV cache makes each new
    token cost one position instead of the whole prefix, and a prefix the batch's prompts share runs once
    (its keys and values serve every row; the padding goes between it and each prompt's own tokens).
    batch_context(rows) wraps the generation of the prompts `rows` (vector injection uses it);
    suppress_tokens are never generated; row_tokens (an injected [vec]) end any shared prefix.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = [prompts[i] for i in rows]
        shared = shared_prefix(batch, row_tokens) if use_cache else 0
        if shared and not _window_spans(model, max(map(len, batch))):
            shared = 0  # the padding between prefix and prompt would take window positions the prompt's own run has
        own_ids, own_mask = left_pad([ids[shared:] for ids in batch], tokenizer.pad_token_id)
        prefix = torch.tensor([list(batch[0][:shared])], dtype=torch.long)  # [1, shared]
        input_ids = torch.cat([prefix.expand(len(rows), -1), own_ids], dim=1)
        mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), own_mask], dim=1)
        with batch_context(rows) if batch_context else nullcontext():
            past = None
            if shared:
                past = model(input_ids=prefix.to(device), use_cache=True, logits_to_keep=1).past_key_values
                past.batch_repeat_interleave(len(rows))
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), past_key_values=past,
                max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                use_cache=use_cache, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                suppress_tokens=list(suppress_tokens) or None)
        new_tokens = generated[:, input_ids.shape[1]:]
        for row, ids in zip(rows, new_tokens):
            outputs[row] = tokenizer.decode(ids, skip_special_tokens=True)
    return outputs
