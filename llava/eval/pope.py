"""POPE's yes/no scoring, as LLaVA's eval_pope.py reads an answer: the first sentence, commas
dropped, is "no" when it contains the word No / no / not, and "yes" otherwise."""

from __future__ import annotations


def answer_to_label(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """accuracy, precision, recall, F1 (of "yes") and yes-ratio; predictions are free text."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    predicted = [answer_to_label(p) for p in predictions]
    tp = sum(p == "yes" and l == "yes" for p, l in zip(predicted, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(predicted, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(predicted, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(predicted, labels))
    total = max(1, len(labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": predicted.count("yes") / total, "n": len(labels)}
