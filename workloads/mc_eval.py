"""Multiple-choice evaluation (MMLU-style): lettered choices in, letter extracted from the output,
accuracy out (overall and per subject).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from workloads.kinds import WorkloadKind

LETTERS = string.ascii_uppercase


def choice_pattern(text: str) -> str:
    # lookarounds rather than \b so choices that start or end in punctuation ("C++", "(none)") match
    return r"(?<!\w)" + re.escape(text) + r"(?!\w)"


def extract_choice(output: str, choices: list[str]) -> str | None:
    """The letter the output picks, or None. In order of trust:

    1. an explicit "Answer: B" / "the answer is (B)" / "answer: b";
    2. an output that starts with a letter: "B", "B) Paris", "(B)";
    3. the text of a choice ("Paris"), the earliest in the output, the longest on a tie;
    4. the first standalone capital letter anywhere, skipping the article in "A good guess".
    """
    letters = LETTERS[: len(choices)]
    if not letters:
        return None
    text = output.strip()
    # lower-case letters only after a colon or bracket: "the answer is a dog" picks nothing
    explicit = re.search(
        rf"(?i:answer)\s*(?:is\s*)?(?:(?::\s*|\()\(?([{letters}{letters.lower()}])|([{letters}]))\)?(?![\w'])",
        text,
    )
    if explicit:
        return (explicit.group(1) or explicit.group(2)).upper()
    leading = re.match(rf"\(?([{letters}])(?![\w'])", text) or re.fullmatch(
        rf"\(?([{letters.lower()}])[).:]?", text
    )
    if leading and not is_article(text, leading):
        return leading.group(1).upper()
    best: tuple[int, int, str] | None = None  # (position, -length, letter)
    for letter, choice in zip(letters, choices, strict=True):
        if choice.strip() and (found := re.search(choice_pattern(choice.strip()), text, re.IGNORECASE)):
            candidate = (found.start(), -len(choice), letter)
            best = candidate if best is None or candidate < best else best
    if best:
        return best[2]
    for found in re.finditer(rf"(?<![\w'])\(?([{letters}])(?![\w'])", text):
        if not is_article(text, found):
            return found.group(1)
    return None


def is_article(text: str, found: re.Match) -> bool:
    return found.group(1) == "A" and re.match(r"\s+[a-z]", text[found.end() :]) is not None


def gold_letter(gold: Any, choices: list[str]) -> str:
    """Normalise a gold label: a letter ('b'), a 0-based index (1, as in Hugging Face MMLU) or the
    text of the right choice."""
    letters = LETTERS[: len(choices)]
    if isinstance(gold, bool):
        raise ValueError(f"gold answer {gold!r} is neither a letter, an index nor a choice")
    if isinstance(gold, int) and 0 <= gold < len(choices):
        return letters[gold]
    value = str(gold).strip()
    if len(value) == 1 and value.upper() in letters:
        return value.upper()
    if value.isdigit() and int(value) < len(choices):
        return letters[int(value)]
    for letter, choice in zip(letters, choices, strict=True):
        if choice is not None and str(choice).strip().lower() == value.lower():
            return letter
    raise ValueError(f"gold answer {gold!r} is neither a letter, an index nor one of the choices {choices}")


@dataclass
class MultipleChoiceEval(WorkloadKind):
    """Each row: a question, its choices (a list column, or one column per letter A, B, C, ...),
    the gold answer and optionally a subject for a per-subject breakdown."""

    name = "mc_eval"
    provides = ("question", "choices")
    default_column = "question"
    default_template = (
        "Answer the following multiple-choice question with the letter of the correct choice.\n\n"
        "{question}\n{choices}\nAnswer:"
    )
    default_max_tokens = 16

    choices_column: str = "choices"
    answer_column: str = "answer"
    subject_column: str = "subject"

    def choice_columns(self, schema: pa.Schema) -> list[str]:
        if self.choices_column in schema.names:
            return [self.choices_column]
        letters = []
        for letter in LETTERS:
            if letter not in schema.names:
                break
            letters.append(letter)
        if len(letters) < 2:
            raise ValueError(
                f"mc_eval needs the choices: a list column {self.choices_column!r} or columns A, B, ...; "
                f"the dataset columns are: {', '.join(schema.names)}"
            )
        return letters

    def input_columns(self, schema: pa.Schema) -> list[str]:
        columns = [self.column, *self.choice_columns(schema)]
        if self.subject_column in schema.names:
            columns.append(self.subject_column)
        return columns

    def score_columns(self, schema: pa.Schema) -> list[str]:
        return [*self.input_columns(schema), self.answer_column]

    def row_choices(self, row: dict[str, Any]) -> list[str]:
        if self.choices_column in row:
            return [str(c) for c in row[self.choices_column] or []]
        return [str(row[letter]) for letter in LETTERS if row.get(letter) is not None]

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        lines = [
            f"{letter}. {choice}" for letter, choice in zip(LETTERS, self.row_choices(row), strict=False)
        ]
        return {"question": row[self.column], "choices": "\n".join(lines)}

    def evaluate(
        self, rows: pa.Table, outputs: list[str | None], results: pa.Table
    ) -> tuple[dict[str, list], dict]:
        subjects = rows[self.subject_column].to_pylist() if self.subject_column in rows.column_names else None
        predicted, gold, correct = [], [], []
        per_subject: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for i, (row, output) in enumerate(zip(rows.to_pylist(), outputs, strict=True)):
            choices = self.row_choices(row)
            try:
                answer = (
                    None if row[self.answer_column] is None else gold_letter(row[self.answer_column], choices)
                )
            except ValueError as exc:
                raise ValueError(f"row {i}: {exc}") from None
            guess = None if output is None else extract_choice(output, choices)
            hit = None if answer is None or output is None else guess == answer
            predicted.append(guess)
            gold.append(answer)
            correct.append(hit)
            if hit is not None and subjects is not None:
                per_subject[str(subjects[i])][0] += hit
                per_subject[str(subjects[i])][1] += 1
        scored = [c for c in correct if c is not None]
        summary = {
            "scored": len(scored),
            "correct": sum(scored),
            "accuracy": sum(scored) / len(scored) if scored else None,
            "unparsed": sum(
                1 for p, o in zip(predicted, outputs, strict=True) if o is not None and p is None
            ),
        }
        if subjects is not None:
            summary["per_subject"] = {
                s: {"scored": n, "accuracy": hits / n} for s, (hits, n) in sorted(per_subject.items())
            }
        return {"predicted": predicted, "gold": gold, "correct": correct}, summary
