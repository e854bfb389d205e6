"""Prompt rendering and batched greedy generation, shared by ground truth and explainer eval."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Collection, Literal, Optional, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .decode_attention import decode_attention
from .kv_cache import cache_kwargs
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


PROMPT_ROWS = 16
"""Prompts per forward pass of the prompts. They are sorted by length, so a chunk of 16 pads little; the
rows of a generation batch are then decoded together, where more rows are cheaper per row (SmolLM2-135M on
2 cores: a decode step of 16 rows took 131 ms, of 64 rows 334 ms: 8.2 vs 5.2 ms a row)."""


def _run_prompts(model, batch: Sequence[Sequence[int]], pad_id: int, stop_at: Collection[int]):
    """The prompts of `batch` through the model: (cache, attention mask [b, T], last position's logits [b, V]).

    A prefix they all share runs once (its keys and values serve every row) and the padding goes between
    it and each prompt's own tokens; not where a sliding window is shorter than the prompts (the gap
    would take window positions the prompt's own run has)."""
    device = model_device(model)
    shared = shared_prefix(batch, stop_at)
    if shared and not _window_spans(model, max(map(len, batch))):
        shared = 0
    own_ids, own_mask = left_pad([ids[shared:] for ids in batch], pad_id)
    mask = torch.cat([torch.ones(len(batch), shared, dtype=torch.long), own_mask], dim=1).to(device)
    cache = DynamicCache(config=model.config)
    if shared:
        model(input_ids=torch.tensor([list(batch[0][:shared])], device=device), **cache_kwargs(model, cache),
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(batch))
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, shared:]  # as generate() numbers them
    out = model(input_ids=own_ids.to(device), attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache),
                use_cache=True, logits_to_keep=1)
    return cache, mask, out.logits[:, -1].float()


class PreallocatedLayer(DynamicLayer):
    """A cache layer with room for the answer: each decode step writes its keys and values into place.
    A DynamicLayer concatenates instead, copying the whole cache at every step and layer (13% of the
    decode time at 64 rows of SmolLM2). Used only where no sliding window is shorter than prompt plus
    answer, so a sliding layer here keeps every position as a full one does."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, sliding: bool):
        super().__init__()  # keys, values: [B, H, length + room, D], the first `length` positions filled
        self.is_sliding = sliding
        self.device, self.is_initialized = keys.device, True
        self._room_keys, self._room_values = keys, values
        self._fill(length)

    def _fill(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._room_keys[:, :, :length], self._room_values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self._room_keys[:, :, self.length:end] = key_states
        self._room_values[:, :, self.length:end] = value_states
        self._fill(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._room_keys, self._room_values = self._room_keys[indices], self._room_values[indices]
        self._fill(self.length)


def _preallocatable(cache) -> bool:
    """Whether every layer is a plain (full or sliding) attention layer that PreallocatedLayer can stand for."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def _decode_batch(model, parts: list[tuple], room: int) -> tuple:
    """One decode batch with `room` positions to grow into, from parts (cache, mask [b, T], logits [b, V]):
    prompt chunks, and the rows already decoding when new prompts join them. Each part's keys, values
    and mask are left-padded to the widest (padding is masked, so a row attends to what it did alone),
    then stacked on the batch. Columns no row of a part attends to (a finished row's share of the
    frame) are dropped first, so the frame stays as wide as its longest row however long decoding runs."""
    parts = [_trim(*part) for part in parts]
    width = max(mask.shape[1] for _, mask, _, _ in parts)
    cache = DynamicCache(config=model.config)
    layers = []
    for i, source in enumerate(parts[0][0].layers):
        _, heads, _, dim = source.keys.shape
        shape = (sum(c.layers[i].keys.shape[0] for c, *_ in parts), heads, width + room, dim)
        keys, values = source.keys.new_zeros(shape), source.values.new_zeros(shape)
        row = 0
        for c, mask, _, lead in parts:
            layer = c.layers[i]
            rows, length = layer.keys.shape[0], mask.shape[1]
            keys[row:row + rows, :, width - length:width] = layer.keys[:, :, lead:]
            values[row:row + rows, :, width - length:width] = layer.values[:, :, lead:]
            row += rows
        layers.append(PreallocatedLayer(keys, values, width, source.is_sliding))
    cache.layers = layers
    left = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
    return cache, torch.cat([left(m) for _, m, _, _ in parts]), torch.cat([logits for _, _, logits, _ in parts])


def _trim(cache, mask: torch.Tensor, logits: torch.Tensor) -> tuple:
    """(cache, mask without its leading columns that no row attends to, logits, how many were dropped)."""
    lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
    return cache, mask[:, lead:], logits, lead


def keep_rows(cache, mask: torch.Tensor, tokens: torch.Tensor, writing: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache, mask [b, T] and tokens [b] cut to the rows in `writing`. The index is a host tensor,
    legal for tensors on any device: a model spread over several GPUs keeps each cache layer on its
    layer's GPU, where an index made on the embedding's GPU would fail."""
    keep = torch.tensor(writing)
    cache.batch_select_indices(keep)
    return mask[keep], tokens[keep]


class _Stream:
    """The rows being decoded: one KV cache, its mask [b, T], the logits of each row's next token [b, V],
    and the prompt index each row answers."""

    def __init__(self):
        self.cache, self.mask, self.logits, self.rows = None, None, None, []

    def join(self, model, parts: list[tuple], rows: list[int], room: int, merge: bool) -> None:
        """New prompts' chunks (cache, mask, logits) join the batch: merged with the rows decoding into one
        cache with room for `room` more positions, or (merge=False: a chunk decodes on its own) taken
        as the batch, which must then be empty."""
        if merge:
            mine = [(self.cache, self.mask, self.logits)] if self.rows else []
            self.cache, self.mask, self.logits = _decode_batch(model, mine + parts, room)
        else:
            assert not self.rows and len(parts) == 1
            self.cache, self.mask, self.logits = parts[0]
        self.rows = self.rows + rows

    def step(self, model, tokens: torch.Tensor, writing: list[int]) -> None:
        """The rows in `writing` (batch positions) append their `tokens` [b]; the others leave the cache."""
        if not writing:
            self.cache, self.mask, self.logits, self.rows = None, None, None, []
            return
        if len(writing) < len(self.rows):
            self.mask, tokens = keep_rows(self.cache, self.mask, tokens, writing)
            self.rows = [self.rows[i] for i in writing]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        self.logits = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions,
                            **cache_kwargs(model, self.cache), use_cache=True).logits[:, -1].float()


def _joins_running_batch(model, width: int) -> bool:
    """Whether prompts can join rows already decoding: their caches merge into one preallocated cache,
    which needs plain attention layers and no sliding window shorter than the frame (`width`: the widest
    prompt plus the answer)."""
    return _window_spans(model, width) and _preallocatable(DynamicCache(config=model.config))


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    batch_context: Optional[Callable[[list[int]], AbstractContextManager]] = None,
    suppress_tokens: Sequence[int] = (),
    row_tokens: Collection[int] = (),
    continuous: Optional[bool] = None,
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of token-id prompts, in input order.

    Continuous batching: prompts, sorted by length, run in chunks of PROMPT_ROWS and join one decode
    batch of up to `batch_size` rows (one KV cache, so each new token costs one position); a row leaves
    when it has written EOS or max_new_tokens, and as soon as a chunk's worth of rows has left, the next
    chunk of prompts joins the rows still writing, so the batch stays full until the prompts run out
    (continuous=False: the batch drains before the next one starts). By default continuous on a GPU
    only: there a decode step costs about the same for 8 rows as for 64, so rows that have left are
    lost work; on a CPU a step costs nearly in proportion to its rows, so a full batch saves little and
    each join's copy of the live rows' cache costs about as much (SmolLM2 on 2 cores, 192 prompts in
    batches of 64: drain / continuous 1.04 in benchmarks/results/eval_generation.json, 0.92 over three
    alternating runs).
    Where caches cannot merge (a sliding window shorter than prompt plus answer), each chunk decodes on
    its own. batch_context(rows) wraps the forward of the prompts `rows` (vector injection uses it);
    suppress_tokens are never generated; row_tokens (an injected [vec]) end any shared prefix.
    """
    if max_new_tokens < 1:
        return [""] * len(prompts)
    pending = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[::-1]  # shortest last: pop() takes it
    answers: list[list[int]] = [[] for _ in prompts]
    chunk = min(batch_size, PROMPT_ROWS)
    merge = _joins_running_batch(model, max(map(len, prompts), default=0) + max_new_tokens)
    if continuous is None:
        continuous = model_device(model).type == "cuda"
    stream = _Stream()
    with decode_attention():  # a forward of one new position per row takes the decode-step matmuls
        while pending or stream.rows:
            free = batch_size - len(stream.rows)
            if pending and (continuous and merge and free >= min(chunk, len(pending)) or not stream.rows):
                take = (free // chunk * chunk or free) if merge else chunk  # whole chunks where more wait
                joining = [pending.pop() for _ in range(min(take, len(pending)))]
                parts = []
                for first in range(0, len(joining), chunk):
                    part = joining[first:first + chunk]
                    with batch_context(part) if batch_context else nullcontext():
                        parts.append(_run_prompts(model, [prompts[i] for i in part], tokenizer.pad_token_id, row_tokens))
                stream.join(model, parts, joining, max_new_tokens, merge)
            if suppress_tokens:
                stream.logits[:, list(suppress_tokens)] = float("-inf")
            tokens = stream.logits.argmax(-1)  # [b]
            writing = []
            for i, (row, token) in enumerate(zip(stream.rows, tokens.tolist())):
                answers[row].append(token)
                if token != tokenizer.eos_token_id and len(answers[row]) < max_new_tokens:
                    writing.append(i)
            stream.step(model, tokens, writing)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
