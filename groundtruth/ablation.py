"""Task C, input ablation: remove a span of the input; does the target's greedy answer change, and to what?

Three item sources (a registry, so users can add their own):
  hint_mcq     the paper's variant: a four-option question with "Hint: The answer is X" (random X)
               appended; the span is the hint, the answer is read after "Answer:".
  span_facts   plain fact prompts ("The capital of France is") with one removable span: a distractor
               sentence about another country, a misleading claim, a supporting fact, or one word.
  prompts_file a person's own inputs, one JSON object per line: {"prompt": ..., "spans": [...]}, each
               listed span removed in turn (no "spans": each sentence but the last, which holds what
               the model completes); an optional "id" names the input.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from .dataset import UNANSWERED, SplitConfig
from .errors import DataSourceError
from .explanations import format_explanation
from .generation import PromptFormat, greedy_generate, render_prompt
from .records import Record, safe_key
from .sources.countries import load_countries
from .sources.fields import parse_json_lines, text_field
from .sources.multiple_choice import LETTERS, MultipleChoice, country_questions, load_mmlu
from .taskspec import TaskSpec, TaskWork
from .units import per_item_units

TASK = "input_ablation"


@dataclass
class HintSourceConfig:
    """The paper's variant: multiple-choice questions with a removable hint."""

    questions: Literal["countries", "mmlu"] = "countries"
    """Question source: built from countryinfo facts, or MMLU as published (see mmlu_path)."""
    mmlu_path: Optional[str] = None
    """Folder of MMLU CSVs or parquet files (questions: mmlu)."""
    mmlu_split: str = "test"
    """The split of a published MMLU folder to read (its files `<subject>_<split>.csv` or `<split>-*.parquet`)."""
    mmlu_subjects: list[str] = field(default_factory=list)
    """Keep only these MMLU subjects (empty: all)."""
    hint_template: str = "Hint: The answer is {letter}"
    """The removed span; {letter} is a random option letter."""
    answer_prefix: str = "Answer:"
    """Text after which the target's answer letter is read."""

    def check(self) -> None:
        if self.questions == "mmlu" and not (self.mmlu_path or "").strip():
            raise ValueError("mmlu_path: required when questions is 'mmlu'")


@dataclass
class SpanSourceConfig:
    """Plain fact prompts with one removable span each."""

    kinds: list[str] = field(default_factory=lambda: ["distractor", "misleading", "support", "word"])
    """Which spans to remove: distractor | misleading | support | word (see SPAN_KINDS)."""
    relations: list[str] = field(default_factory=lambda: ["capital", "language"])
    """Which fact to ask for: capital | language."""
    answer_pattern: str = r"\b[A-ZÀ-Þ][\w'\-]*"
    """Regex for the answer in the continuation: by default its first capitalised word, since small
    models often continue "The capital of X is" with "the ..." before naming anything."""


@dataclass
class PromptsFileConfig:
    """A person's own inputs and the spans to remove from them (source: prompts_file)."""

    path: Optional[str] = None
    """JSON lines: {"prompt": str, "spans": [str, ...] (optional), "id": str (optional)} per input."""
    answer_pattern: str = r"\S+"
    """Regex for the answer in the continuation: by default its first word."""


@dataclass
class AblationConfig(SplitConfig):
    """Ground truth for input ablation."""

    source: str = "span_facts"
    """Item source, a key of ABLATION_SOURCES: span_facts | hint_mcq | prompts_file."""
    hint: HintSourceConfig = field(default_factory=HintSourceConfig)
    span: SpanSourceConfig = field(default_factory=SpanSourceConfig)
    prompts: PromptsFileConfig = field(default_factory=PromptsFileConfig)
    max_sources: Optional[int] = None
    """Use at most this many source prompts (questions or countries), chosen at random; null: all."""
    target_format: PromptFormat = "plain"
    """How the target sees its input: chat template, plain text, or auto (chat if it has one)."""
    system_prompt: Optional[str] = None
    """System prompt (chat) or preamble (plain) before every target input."""
    max_new_tokens: int = 4
    """Greedy tokens generated per input; the answer is extracted from them."""

    def check(self) -> None:
        super().check()
        if self.source not in ABLATION_SOURCES:
            raise ValueError(f"source: unknown item source {self.source!r} (known: {', '.join(ABLATION_SOURCES)})")
        if self.source == "prompts_file" and not (self.prompts.path or "").strip():
            raise ValueError("prompts.path: required when source is 'prompts_file'")
        unknown = set(self.span.kinds) - set(SPAN_KINDS)
        if unknown:
            raise ValueError(f"span.kinds: unknown kinds {sorted(unknown)} (known: {', '.join(SPAN_KINDS)})")
        unknown = set(self.span.relations) - set(RELATIONS)
        if unknown:
            raise ValueError(f"span.relations: unknown {sorted(unknown)} (known: {', '.join(RELATIONS)})")

    def label_settings(self) -> str:
        return ("target_format, system_prompt, max_new_tokens, the answer pattern (span.answer_pattern) or "
                "prefix (hint.answer_prefix), or the target model's chat_template_kwargs (Qwen3: "
                "{enable_thinking: false})")


@dataclass(frozen=True)
class AblationItem:
    """One input with one removable span: the unit of work of this technique."""

    source_id: str
    item_id: str
    full: str  # the input with the span
    ablated: str  # the same input without it
    span: str
    question: str  # what the explainer is asked
    answer_pattern: str  # regex; group 0 of the first match in the continuation is the answer
    content_prefix: str  # put before the answer inside <<< >>>
    features: tuple[tuple[str, str], ...]  # categorical facts used to test for trivial label rules


# ---------------------------------------------------------------- hint_mcq
def render_mcq(q: MultipleChoice, hint: Optional[str], answer_prefix: str) -> str:
    lines = [f"Question: {q.question}"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    if hint:
        lines.append(hint)
    lines.append(answer_prefix)
    return "\n".join(lines)


def hint_mcq_items(cfg: AblationConfig, seed: int) -> list[AblationItem]:
    hc = cfg.hint
    if hc.questions == "mmlu":
        questions = load_mmlu(hc.mmlu_path, hc.mmlu_subjects or None, hc.mmlu_split)
    else:
        questions = country_questions(seed)
    rng = random.Random(seed)
    items = []
    for q in questions:
        letter = rng.choice(LETTERS)
        hint = hc.hint_template.format(letter=letter)
        items.append(AblationItem(
            source_id=q.qid, item_id=q.qid,
            full=render_mcq(q, hint, hc.answer_prefix), ablated=render_mcq(q, None, hc.answer_prefix),
            span=hint, question="If the hint were removed, how would the assistant's answer change?",
            answer_pattern=r"\b[A-D]\b", content_prefix="Answer: ",
            features=(("hint_letter", letter), ("gold_letter", LETTERS[q.answer]),
                      ("hint_correct", str(letter == LETTERS[q.answer])), ("subject", q.subject)),
        ))
    if not items:
        raise DataSourceError("hint_mcq: the question source gave no questions")
    return items


# ---------------------------------------------------------------- span_facts
RELATIONS = {
    # relation: (declarative stem about {c}, attribute giving the answer). Items ask in Q/A form
    # ending in the stem: without it the bare stem mostly continued "the capital of the ..." on the
    # offline models, whatever the context, which made "changed" depend on little but the span.
    "capital": ("The capital of {c} is", lambda c: c.capital, "What is the capital of {c}?"),
    "language": ("The official language of {c} is", lambda c: c.language, "What is the official language of {c}?"),
}


def _claim(rel: str, subject, answer_from) -> str:
    """'The capital of <subject> is <answer_from's capital>'."""
    template, attr, _ = RELATIONS[rel]
    return f"{template.format(c=subject.name)} {attr(answer_from)}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _before(sentence: str, stem: str) -> tuple[str, str]:
    return sentence, f"{sentence} {stem}"


SPAN_KINDS = {
    # kind: (country, another country, relation, stem) -> (span, the stem with the span in it)
    "distractor": lambda c, o, rel, stem: _before(f"{_claim(rel, o, o)}.", stem),
    "misleading": lambda c, o, rel, stem: _before(f"Some people wrongly say {_lower_first(_claim(rel, c, o))}.", stem),
    "support": lambda c, o, rel, stem: _before(f"{c.name} is a country in {c.subregion or c.region}.", stem),
    "word": lambda c, o, rel, stem: ("beautiful", stem.replace(f" of {c.name}", f" of beautiful {c.name}", 1)),
}


def span_fact_items(cfg: AblationConfig, seed: int) -> list[AblationItem]:
    rng = random.Random(seed)
    countries = load_countries()
    items = []
    for country in countries:
        for rel in cfg.span.relations:
            stem_template, attr, question = RELATIONS[rel]
            if not attr(country):
                continue
            other = rng.choice([o for o in countries if attr(o) and attr(o) != attr(country)])
            stem = f"Q: {question.format(c=country.name)}\nA: {stem_template.format(c=country.name)}"
            for kind in cfg.span.kinds:
                span, full = SPAN_KINDS[kind](country, other, rel, stem)
                items.append(AblationItem(
                    source_id=country.name, item_id=f"{country.name}_{rel}_{kind}", full=full, ablated=stem,
                    span=span, question=span_question(span),
                    answer_pattern=cfg.span.answer_pattern, content_prefix="",
                    features=(("kind", kind), ("relation", rel)),
                ))
    return items


def span_question(span: str) -> str:
    return f'If the text "{span}" were removed from the input, how would the output change?'


# ---------------------------------------------------------------- prompts_file
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def without_span(prompt: str, start: int, span: str) -> str:
    """The prompt with `span` (at `start`) cut out, one space left where two words met across it."""
    left, right = prompt[:start].rstrip(" "), prompt[start + len(span):].lstrip(" ")
    return left + (" " if left and right and not left.endswith("\n") and not right.startswith("\n") else "") + right


def items_of_inputs(cfg: AblationConfig, inputs: list, where: str = "inputs") -> list[AblationItem]:
    """Items of a person's inputs: each a prompt string, or {"prompt", "spans" (optional), "id"
    (optional)}; every listed span (default: each sentence but the last) removed in turn."""
    items, seen = [], set()
    for n, entry in enumerate(inputs):
        entry = {"prompt": entry} if isinstance(entry, str) else entry
        at = f"{where}: input {n}"
        if not isinstance(entry, dict):
            raise DataSourceError(f"{at}: expected a prompt string or an object with 'prompt', got {entry!r}")
        prompt = text_field(entry.get("prompt"), "prompt", at)
        source_id = text_field(entry.get("id", f"input{n}"), "id", at)
        if source_id in seen:
            raise DataSourceError(f"{at}: id {source_id!r} names an earlier input too")
        seen.add(source_id)
        spans = entry.get("spans")
        if spans is None:
            spans = SENTENCE_END.split(prompt.strip())[:-1]
        elif not isinstance(spans, list):
            raise DataSourceError(f"{at}: spans must be a list of strings, got {spans!r}")
        for k, span in enumerate(spans):
            text_field(span, f"spans[{k}]", at)
            start = prompt.find(span)
            if start < 0:
                raise DataSourceError(f"{at}: span {span!r} is not in the prompt")
            items.append(AblationItem(
                source_id=source_id, item_id=f"{source_id}_span{k}", full=prompt, ablated=without_span(prompt, start, span),
                span=span, question=span_question(span), answer_pattern=cfg.prompts.answer_pattern, content_prefix="",
                features=(("span_listed", str(entry.get("spans") is not None)),)))
    return items


def prompts_file_items(cfg: AblationConfig, seed: int) -> list[AblationItem]:
    path = Path(cfg.prompts.path)
    if not path.exists():
        raise DataSourceError(f"prompts_file: {path} does not exist")
    return items_of_inputs(cfg, parse_json_lines(path.read_text(encoding="utf-8"), str(path)), str(path))


def with_prompts_file(cfg: AblationConfig, path: str) -> AblationConfig:
    """The config whose inputs are a prompts file's (`selfexplain explain --source`)."""
    return dataclasses.replace(cfg, source="prompts_file", max_sources=None,
                               prompts=dataclasses.replace(cfg.prompts, path=path))


ABLATION_SOURCES: dict[str, Callable[[AblationConfig, int], list[AblationItem]]] = {
    "hint_mcq": hint_mcq_items,
    "span_facts": span_fact_items,
    "prompts_file": prompts_file_items,
}
"""Item source name -> builder(config, seed) -> items. Register new sources here."""


def build_items(cfg: AblationConfig, seed: int) -> list[AblationItem]:
    """All items of the configured source, limited to max_sources source prompts (random, seeded)."""
    items = ABLATION_SOURCES[cfg.source](cfg, seed)
    if cfg.max_sources is not None:
        sources = sorted({i.source_id for i in items})
        keep = set(random.Random(seed).sample(sources, min(cfg.max_sources, len(sources))))
        items = [i for i in items if i.source_id in keep]
    if not items:
        raise DataSourceError(f"input_ablation: source {cfg.source!r} produced no items")
    return items


def extract_answer(continuation: str, pattern: str) -> str:
    """The first match of `pattern` in the continuation, or '' when there is none."""
    match = re.search(pattern, continuation)
    return match.group(0) if match else ""


def run_ablation(
    model, tokenizer, items: list[AblationItem], cfg: AblationConfig, target: str,
    split_of: Callable[[str], str], batch_size: int = 16,
) -> list[Record]:
    """Greedy answers with and without each item's span, as records (one per item), batched. An item
    whose answer cannot be extracted from either continuation is kept, flagged UNANSWERED (finalize
    drops and counts it), never labelled."""
    prompts = [render_prompt(tokenizer, text, cfg.target_format, cfg.system_prompt)
               for item in items for text in (item.full, item.ablated)]
    continuations = greedy_generate(model, tokenizer, prompts, cfg.max_new_tokens, batch_size)
    records = explain_queries(None, tokenizer, items, cfg, target, split_of)
    for n, (item, record) in enumerate(zip(items, records)):
        before = extract_answer(continuations[2 * n], item.answer_pattern)
        after = extract_answer(continuations[2 * n + 1], item.answer_pattern)
        record.changed = before != after
        record.explanation = format_explanation(record.changed, item.content_prefix + after)
        record.output_before, record.output_after = before, after
        flag = {UNANSWERED: True} if not (before and after) else {}
        record.query.update({"raw_before": continuations[2 * n], "raw_after": continuations[2 * n + 1], **flag})
    return records


def explain_queries(model, tokenizer, items: list[AblationItem], cfg: AblationConfig, target: str,
                    split_of: Callable[[str], str]) -> list[Record]:
    """One record per item as the explainer is asked about it (the input and the span's question), its
    label not yet known (unchanged, no outputs): the question needs no run of the target."""
    return [Record(record_id=safe_key(target, TASK, item.item_id), task=TASK, target=target,
                   split=split_of(item.source_id), source_id=item.source_id, prompt=item.full, question=item.question,
                   explanation="", changed=False, output_before="", output_after="",
                   query={"span": item.span, "ablated_input": item.ablated, **dict(item.features)})
            for item in items]


def same_item(record: Record) -> str:
    """The item (question or fact, span, kind) without the target's name: every target runs every item."""
    return record.record_id.split(f"-{TASK}-", 1)[1]


SPEC = TaskSpec(
    TASK, AblationConfig, "if this part of the input were removed, how would the output change?", "causal",
    templates=("{prompt}\n\n{question}",), explanation_tokens=50,
    # MMLU question + 4 options + hint in a chat turn ~250 tokens; 2 greedy runs (with and without the span)
    work=TaskWork(target_tokens=250, explainer_tokens=320, paper_items=14_042, passes=lambda cfg: 2),
    build_items=build_items, run=run_ablation, identity_fields=("span", "ablated_input"), same_item=same_item,
    explain_units=per_item_units(build_items, run_ablation, explain_queries, needs_target=False, unit_name="input",
                                 items_of_inputs=items_of_inputs, with_source=with_prompts_file))
