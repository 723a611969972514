"""Multiple-choice benchmarks: the option letter read from a free-text answer, MMBench's circular
evaluation (a question counts only if every rotation of its options is answered right) and SEED-Bench's
per-question-type accuracy."""

from __future__ import annotations

import re
from collections import defaultdict

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def extract_letter(prediction: str, options: list[str]) -> str | None:
    """The chosen letter: a leading "A.", "(A)" or "A)", else the only option letter standing alone in
    the text ("A", "Answer: A", "The answer is A"), else the text of exactly one option; None when the
    answer names no option or several ("A or B"), which counts as wrong."""
    letters = LETTERS[:len(options)]
    text = prediction.strip()
    match = re.match(rf"^\(?([{letters}])[\).:]", text)
    if match:
        return match.group(1)
    alone = set(re.findall(rf"\b([{letters}])\b", text))
    if len(alone) == 1:
        return alone.pop()
    named = [letter for letter, option in zip(letters, options) if option and option.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def mmbench_circular(rows: list[dict]) -> dict:
    """rows: {"index" (the question), "round" (rotation r: option i shows option (i + r) % n), "prediction",
    "options" (in the original order), "answer" (letter in the original order), "category"}.
    Returns circular accuracy overall and per category, and the plain accuracy of round 0."""
    by_question: dict = defaultdict(list)
    for row in rows:
        by_question[row["index"]].append(row)
    per_category: dict = defaultdict(list)
    circular, first = [], []
    for index, rounds in by_question.items():
        oks = []
        for row in rounds:
            n = len(row["options"])
            shown = [row["options"][(i + row["round"]) % n] for i in range(n)]
            letter = extract_letter(row["prediction"], shown)
            chosen = None if letter is None else (LETTERS.index(letter) + row["round"]) % n
            ok = chosen == LETTERS.index(row["answer"])
            oks.append(ok)
            if row["round"] == 0:
                first.append(ok)
        circular.append(all(oks))
        per_category[rounds[0].get("category", "all")].append(all(oks))
    return {"circular_accuracy": sum(circular) / max(1, len(circular)),
            "vanilla_accuracy": sum(first) / max(1, len(first)),
            "categories": {k: sum(v) / len(v) for k, v in sorted(per_category.items())}, "n": len(circular)}


def seed_accuracy(rows: list[dict], type_names: dict | None = None) -> dict:
    """rows: {"question_type_id", "prediction", "answer" (letter), "options"}; accuracy per type and overall."""
    names = {int(v): k for k, v in (type_names or {}).items()}
    per_type: dict = defaultdict(list)
    for row in rows:
        letter = extract_letter(row["prediction"], row.get("options") or ["", "", "", ""])
        per_type[int(row["question_type_id"])].append(letter == row["answer"])
    everything = [ok for v in per_type.values() for ok in v]
    return {"accuracy": sum(everything) / max(1, len(everything)),
            "types": {names.get(t, str(t)): sum(v) / len(v) for t, v in sorted(per_type.items())},
            "n": len(everything)}
