"""ScienceQA accuracy as LLaVA's eval_science_qa.py reads an answer: a bare option letter, "A. ..."
(letter, period, space), or exactly one "The answer is X." in the text; anything else is FAILED
(wrong). Reported overall and for the questions with an image (IMG), as LLaVA reports it."""

from __future__ import annotations

import re

from .choice import LETTERS

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(prediction: str, n_options: int) -> str:
    options = LETTERS[:n_options]
    if prediction in options:
        return prediction
    if len(prediction) >= 3 and prediction[0] in options and prediction[1:3] == ". ":
        return prediction[0]
    found = _ANSWER_IS.findall(prediction)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_accuracy(predictions: dict, problems: dict) -> dict:
    """predictions {pid: text}; problems: the split's ScienceQA problems ({pid: {choices, answer (index),
    image}}). A problem without a prediction counts as FAILED, as in LLaVA's script."""
    unknown = sorted(set(predictions) - set(problems), key=str)
    if unknown:
        raise ValueError(f"{len(unknown)} predictions have no ScienceQA problem (e.g. {unknown[0]!r})")
    correct, with_image, failed = [], [], 0
    for pid, problem in problems.items():
        letter = parse_letter(predictions.get(pid, "FAILED").strip(), len(problem["choices"]))
        failed += letter == "FAILED"
        right = letter == LETTERS[int(problem["answer"])]
        correct.append(right)
        if problem.get("image"):
            with_image.append(right)
    n = len(correct)
    return {"accuracy": sum(correct) / max(1, n), "img_accuracy": sum(with_image) / max(1, len(with_image)),
            "n": n, "n_img": len(with_image), "failed_parses": failed, "missing": len(set(problems) - set(predictions))}
