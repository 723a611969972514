"""The shapes benchmark: short-answer accuracy (colour, shape, count, position) and POPE-style
object existence on a held-out split of the shapes world, answered with batched greedy decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.errors import DataError
from ..core.io import atomic_write_text
from ..data.images import load_image
from ..data.shapes import NUMBERS, SHORT_ANSWER_SUFFIX
from .pope import pope_metrics

POPE_SPLITS = ("random", "popular", "adversarial")


def normalize(text: str) -> str:
    """lower case, no punctuation or articles, number words as digits."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [str(NUMBERS.index(w)) if w in NUMBERS else w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: not found (run `llava synth` to make the shapes data)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def answer_questions(model, processor, root: Path, rows: list[dict], batch_size: int = 16,
                     max_new_tokens: int = 8, progress: bool = False, desc: str = "eval") -> list[str]:
    """Greedy answers to short-answer questions about images, in LLaVA-1.5's VQA prompt."""
    from tqdm import tqdm

    from ..data.conversation import stop_strings
    from ..generate.generate import generate_text
    from ..generate.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop_strings(processor.conv_mode))
    answers: list[str] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = rows[start:start + batch_size]
        prompts = [processor.build_prompt([{"role": "user", "content":
                                            f"{processor.image_token}\n{row['text']}\n{SHORT_ANSWER_SUFFIX}"}])[0]
                   for row in batch]
        images = [load_image(root / row["image"]) for row in batch]
        answers += [a.strip() for a in generate_text(model, processor, prompts, images, params)]
    return answers


def evaluate_shapes(model, processor, root: str | Path, split: str = "test", limit: int | None = None,
                    batch_size: int = 16, output: str | Path | None = None, progress: bool = False) -> dict:
    """Metrics on `split`: {"short": {"accuracy", per category, "n"}, "pope": {strategy: metrics},
    "pope_f1": mean F1}. With `output`, predictions go to short.jsonl / pope_*.jsonl and the metrics to
    metrics.json there."""
    root = Path(root)
    rows = _read_jsonl(root / "questions" / f"short_{split}.jsonl", limit)
    answers = answer_questions(model, processor, root, rows, batch_size, progress=progress, desc="shapes short")
    correct: dict[str, list[bool]] = {}
    for row, answer in zip(rows, answers):
        correct.setdefault(row["category"], []).append(normalize(answer) == normalize(row["answer"]))
    every = [c for values in correct.values() for c in values]
    short = {"accuracy": sum(every) / max(1, len(every)), "n": len(every)}
    short.update({category: sum(v) / len(v) for category, v in sorted(correct.items())})
    metrics = {"split": split, "short": short, "pope": {}}
    predictions = {"short": [{**row, "prediction": a} for row, a in zip(rows, answers)]}
    for strategy in POPE_SPLITS:
        pope_rows = _read_jsonl(root / "questions" / f"pope_{split}_{strategy}.jsonl", limit)
        pope_answers = answer_questions(model, processor, root, pope_rows, batch_size, progress=progress,
                                        desc=f"shapes pope {strategy}")
        metrics["pope"][strategy] = pope_metrics(pope_answers, [r["label"] for r in pope_rows])
        predictions[f"pope_{strategy}"] = [{**r, "prediction": a} for r, a in zip(pope_rows, pope_answers)]
    metrics["pope_f1"] = sum(m["f1"] for m in metrics["pope"].values()) / len(POPE_SPLITS)
    if output is not None:
        output = Path(output)
        for name, items in predictions.items():
            atomic_write_text(output / f"{name}.jsonl", "".join(json.dumps(i) + "\n" for i in items))
        atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
