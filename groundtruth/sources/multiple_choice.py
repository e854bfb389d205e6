"""Four-option multiple-choice questions: built from country facts, or read from MMLU as published."""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DataSourceError
from .countries import load_countries
from .fields import text_field

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


def in_split(file: Path, root: Path, split: str) -> bool:
    """A file of the published layouts belongs to `split`: `<subject>_<split>.csv`, `<split>-*.parquet`,
    `<split>.parquet`, or any file under a folder named `<split>`."""
    stem, folders = file.stem, file.relative_to(root).parts[:-1]
    return split in folders or stem == split or stem.endswith(f"_{split}") or stem.startswith(f"{split}-")


def load_mmlu(path: str, subjects: Optional[list[str]] = None, split: str = "test") -> list[MultipleChoice]:
    """MMLU as published: a folder of `<subject>_<split>.csv` (no header: question, A, B, C, D, answer
    letter), or parquet files with columns question, subject, choices (4 strings), answer (index 0-3).
    A folder is read for one split only (the published one also holds dev, val and auxiliary_train);
    a single file is read whole."""
    root = Path(path)
    if not root.exists():
        raise DataSourceError(f"MMLU source {root} does not exist (a folder of CSVs or parquet files)")
    files = [root] if root.is_file() else \
        [f for f in sorted(root.rglob("*.csv")) + sorted(root.rglob("*.parquet")) if in_split(f, root, split)]
    questions: list[MultipleChoice] = []
    for file in files:
        rows = _read_parquet(file) if file.suffix == ".parquet" else _read_csv(file)
        for i, (question, choices, answer, subject) in enumerate(rows):
            if subjects and subject not in subjects:
                continue
            questions.append(MultipleChoice(f"mmlu_{subject}_{file.stem}_{i}", question, choices, answer, subject))
    if not questions:
        raise DataSourceError(f"no MMLU questions found in {root} (split {split!r}"
                              + (f", subjects {subjects})" if subjects else ")"))
    return questions


def _read_csv(file: Path):
    subject = file.stem.rsplit("_", 1)[0] if "_" in file.stem else file.stem
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not question text
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{file}: not UTF-8 text ({err})") from None
    for lineno, row in enumerate(rows, 1):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise DataSourceError(f"{file}:{lineno}: expected 6 columns (question, A, B, C, D, answer letter), got {row!r}")
        yield _question(row[0], row[1:5], LETTERS.index(row[5].strip()), subject, f"{file}:{lineno}")


def _read_parquet(file: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(file).to_pylist()
    for rownum, row in enumerate(table):
        where = f"{file}: row {rownum}"
        missing = {"question", "choices", "answer"} - set(row)
        if missing:
            raise DataSourceError(f"{where} lacks columns {sorted(missing)}")
        answer = row["answer"]
        valid = answer in range(4) if isinstance(answer, int) and not isinstance(answer, bool) else \
            isinstance(answer, str) and answer in tuple(LETTERS)
        if not valid:
            raise DataSourceError(f"{where} has answer {answer!r}, expected 0-3 or A-D")
        answer = LETTERS.index(answer) if isinstance(answer, str) else int(answer)
        subject = row.get("subject")
        yield _question(row["question"], row["choices"], answer,
                        file.stem if subject is None else text_field(subject, "subject", where), where)


def _question(question, choices, answer: int, subject: str, where: str) -> tuple[str, tuple[str, ...], int, str]:
    """One question's fields, checked: a non-empty question and four non-empty choices."""
    if not isinstance(choices, (list, tuple)) or len(choices) != 4:
        raise DataSourceError(f"{where}: choices must be 4 strings, got {choices!r}")
    return (text_field(question, "question", where),
            tuple(text_field(c, f"choice {LETTERS[i]}", where) for i, c in enumerate(choices)), answer, subject)
