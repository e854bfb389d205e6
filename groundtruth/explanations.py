"""The text forms of causal explanations (patching, ablation), of token attributions and of lists of
components (which heads carry the answer), and their parsers: one module owns both sides of each."""
from __future__ import annotations

import re
from typing import Optional

CHANGED = "The most likely output would change to <<<{content}>>>."
UNCHANGED = "The output would remain unchanged from <<<{content}>>>."
_PARSE = re.compile(r"(change to|unchanged from)\s*<<<(.*?)>>>", re.DOTALL)


def format_explanation(changed: bool, content: str) -> str:
    """Gold explanation: the new output if the intervention changed it, else the unchanged output."""
    return (CHANGED if changed else UNCHANGED).format(content=content)


def parse_explanation(text: str) -> Optional[tuple[bool, str]]:
    """(changed, content) from an explainer's output, or None when it does not follow the form."""
    match = _PARSE.search(text)
    if match is None:
        return None
    return match.group(1) == "change to", match.group(2).strip()


DEPENDS = "The output depends most on <<<{word}>>>."
WORD_EDGES = ".,;:!?\"'()"
"""Punctuation stripped from a word's ends, in a prompt's words and in the word an answer names alike."""
_PARSE_WORD = re.compile(r"depends most on\s*<<<(.*?)>>>", re.DOTALL)


def format_attribution(word: str) -> str:
    """Gold explanation of a token attribution: the input word the output depends on most."""
    return DEPENDS.format(word=word)


def parse_attribution(text: str) -> Optional[str]:
    """The word an explainer's output names, or None when it does not follow the form."""
    match = _PARSE_WORD.search(text)
    return None if match is None else match.group(1).strip()


CARRIED = "The answer is carried by <<<{items}>>>."
_PARSE_LIST = re.compile(r"carried by\s*<<<(.*?)>>>", re.DOTALL)


def format_list(items: list[str]) -> str:
    """Gold explanation of a list question: the components named, most important first."""
    return CARRIED.format(items=", ".join(items))


def parse_list(text: str) -> Optional[list[str]]:
    """The components an explainer's output names, in its order (each once), or None when it does not
    follow the form."""
    match = _PARSE_LIST.search(text)
    if match is None:
        return None
    return list(dict.fromkeys(item.strip() for item in match.group(1).split(",") if item.strip()))
