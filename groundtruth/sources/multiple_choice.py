"""Four-option multiple-choice questions: built from country facts, or read from MMLU as published."""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DataSourceError
from .countries import load_countries

LETTERS = "ABCD"


@dataclass(frozen=True)
class MultipleChoice:
    qid: str
    question: str
    choices: tuple[str, ...]  # exactly four
    answer: int  # index of the correct choice
    subject: str


def country_questions(seed: int = 0) -> list[MultipleChoice]:
    """Capital, region, language and demonym questions with three distractors of the same kind."""
    rng = random.Random(seed)
    countries = load_countries()
    relations = {
        "capital": ("What is the capital of {name}?", lambda c: c.capital),
        "region": ("On which continent or region is {name}?", lambda c: c.region),
        "language": ("Which language is an official language of {name}?", lambda c: c.language),
        "demonym": ("What are people from {name} called?", lambda c: c.demonym),
    }
    questions = []
    for relation, (template, attr) in relations.items():
        values = sorted({attr(c) for c in countries if attr(c)})
        for country in countries:
            answer = attr(country)
            if not answer or len(values) < 4:
                continue
            distractors = rng.sample([v for v in values if v != answer], 3)
            choices = distractors + [answer]
            rng.shuffle(choices)
            questions.append(MultipleChoice(
                qid=f"{relation}_{country.name}", question=template.format(name=country.name),
                choices=tuple(choices), answer=choices.index(answer), subject=f"countries_{relation}",
            ))
    return questions


def load_mmlu(path: str, subjects: Optional[list[str]] = None) -> list[MultipleChoice]:
    """MMLU as published: a folder of `<subject>_<split>.csv` (no header: question, A, B, C, D, answer
    letter), or parquet files with columns question, subject, choices (4 strings), answer (index)."""
    root = Path(path)
    if not root.exists():
        raise DataSourceError(f"MMLU source {root} does not exist (a folder of CSVs or parquet files)")
    files = [root] if root.is_file() else sorted(root.rglob("*.csv")) + sorted(root.rglob("*.parquet"))
    questions: list[MultipleChoice] = []
    for file in files:
        rows = _read_parquet(file) if file.suffix == ".parquet" else _read_csv(file)
        for i, (question, choices, answer, subject) in enumerate(rows):
            if subjects and subject not in subjects:
                continue
            questions.append(MultipleChoice(f"mmlu_{subject}_{file.stem}_{i}", question, choices, answer, subject))
    if not questions:
        raise DataSourceError(f"no MMLU questions found in {root}" + (f" for subjects {subjects}" if subjects else ""))
    return questions


def _read_csv(file: Path):
    subject = file.stem.rsplit("_", 1)[0] if "_" in file.stem else file.stem
    with open(file, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise DataSourceError(f"{file}:{lineno}: expected 6 columns (question, A, B, C, D, answer letter), got {row!r}")
            yield row[0], tuple(row[1:5]), LETTERS.index(row[5].strip()), subject


def _read_parquet(file: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(file).to_pylist()
    for rownum, row in enumerate(table):
        missing = {"question", "choices", "answer"} - set(row)
        if missing:
            raise DataSourceError(f"{file}: row {rownum} lacks columns {sorted(missing)}")
        answer = row["answer"]
        answer = LETTERS.index(answer) if isinstance(answer, str) else int(answer)
        if len(row["choices"]) != 4:
            raise DataSourceError(f"{file}: row {rownum} has {len(row['choices'])} choices, expected 4")
        yield row["question"], tuple(row["choices"]), answer, row.get("subject") or file.stem
