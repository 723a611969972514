"""MME scores as the benchmark's calculation.py computes them: per subtask, accuracy over questions and
accuracy+ over images (both of an image's two questions right), score = 100 x (acc + acc+); perception
is the sum of its 10 subtasks, cognition of its 4. Answers are read as the official parse_pred_ans."""

from __future__ import annotations

from collections import defaultdict

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(prediction: str) -> str:
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(rows: list[dict]) -> dict:
    """rows: {"category" (subtask), "image", "prediction", "answer" ("Yes"/"No")}."""
    by_task: dict = defaultdict(list)
    for row in rows:
        by_task[row["category"]].append(row)
    tasks = {}
    for task, items in by_task.items():
        right = [parse_yes_no(r["prediction"]) == r["answer"].strip().lower() for r in items]
        per_image: dict = defaultdict(list)
        for r, ok in zip(items, right):
            per_image[r["image"]].append(ok)
        acc = sum(right) / len(right)
        acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
        tasks[task] = {"acc": acc * 100, "acc_plus": acc_plus * 100, "score": (acc + acc_plus) * 100,
                       "n": len(items)}
    return {"perception": sum(t["score"] for k, t in tasks.items() if k in PERCEPTION),
            "cognition": sum(t["score"] for k, t in tasks.items() if k in COGNITION),
            "subtasks": tasks, "n": len(rows)}
