"""Prompt rendering and batched greedy generation, shared by ground truth and explainer eval."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Literal, Optional, Sequence

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
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of token-id prompts, in input order.

    Prompts are sorted by length before batching so a batch pads little; the KV cache makes each new
    token cost one position instead of the whole prefix. batch_context(rows) wraps the generation of
    the prompts `rows` (vector injection uses it); suppress_tokens are never generated.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = left_pad([prompts[i] for i in rows], tokenizer.pad_token_id)
        with batch_context(rows) if batch_context else nullcontext():
            generated = _generate(model, tokenizer, input_ids.to(device), mask.to(device), max_new_tokens,
                                  use_cache, list(suppress_tokens) or None)
        new_tokens = generated[:, input_ids.shape[1]:]
        for row, ids in zip(rows, new_tokens):
            outputs[row] = tokenizer.decode(ids, skip_special_tokens=True)
    return outputs


def _generate(model, tokenizer, input_ids, mask, max_new_tokens, use_cache, suppress):
    return model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=use_cache,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        suppress_tokens=suppress,
    )
