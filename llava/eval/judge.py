"""GPT-judged benchmarks, with any OpenAI-compatible endpoint as the judge (the data-generation
teacher's options): LLaVA-Bench-in-the-Wild as LLaVA's eval_gpt_review_bench.py + summarize_gpt_review.py
(the judge scores the reference and the candidate 1-10; relative score = candidate / reference x 100 per
category) and MM-Vet as its official grader (few-shot correctness 0.0-1.0 per answer; total and per
capability x 100). Judge replies are parsed robustly; unparsable replies and failures are retried and
counted; reviews go to a JSONL file, so a rerun only asks what is missing.

    llava-bench   questions.jsonl, context.jsonl, answers_gpt4.jsonl (the reference), rule.json
    mmvet         mm-vet.json ({id: {"question", "answer", "capability": [...]}}); question ids are its keys
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from ..core.errors import DataError
from ..core.io import read_rows

LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
MMVET_PROMPT = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. "
    "<AND> in the ground truth means it is totally right only when all elements in the ground truth are present "
    "in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in "
    "the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or "
    "1.0 (totally right). Just complete the last space of the correctness score.\n\n"
    "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and "
    "Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while "
    "Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the "
    "names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and "
    "Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. "
    "| 0.4\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and "
    "Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while "
    "Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the "
    "names of these countries do not accurately represent their landscapes. | The meme is using humor to point out "
    "the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green "
    "landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a "
    "playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is "
    "derived from the unexpected contrast between the names of the countries and their actual physical "
    "characteristics. | 1.0\n")


def parse_pair(review: str) -> tuple[float, float] | None:
    """The two scores on the review's first line ("8 6", "8, 6", "Assistant 1: 8 Assistant 2: 6")."""
    first = review.strip().split("\n")[0]
    numbers = re.findall(r"\d+(?:\.\d+)?", first.replace(",", " "))
    plain = first.replace(",", " ").split()
    if len(plain) == 2 and all(re.fullmatch(r"\d+(?:\.\d+)?", p) for p in plain):
        return float(plain[0]), float(plain[1])
    numbers = [n for n in numbers if n not in ("1", "2") or len(numbers) == 2]  # drop "Assistant 1 / 2" labels
    if len(numbers) == 2 and all(0 <= float(n) <= 10 for n in numbers):
        return float(numbers[0]), float(numbers[1])
    return None


def parse_correctness(reply: str) -> float | None:
    """MM-Vet's grade: the first number of the reply, if it lies in [0, 1]."""
    match = re.search(r"\d+(?:\.\d+)?", reply.strip())
    if match is None:
        return None
    value = float(match.group(0))
    return value if 0.0 <= value <= 1.0 else None


def _ask(judge, chat: list[dict], parse, attempts: int, stats: dict):
    """A parsed judge reply; unparsable replies are asked again (a little warmer each time)."""
    from ..datagen.teachers import TeacherUnavailable

    for attempt in range(attempts):
        stats["requests"] += 1
        try:
            reply = judge.complete(chat, temperature=min(1.0, 0.2 * attempt) if attempt else None)
        except TeacherUnavailable:
            stats["failed_requests"] += 1
            continue
        value = parse(reply)
        if value is not None:
            return reply, value
        stats["unparsable"] += 1
    stats["failed"] += 1
    return None, None


def llava_bench(judge, data: str | Path, predictions: dict, reviews: str | Path, attempts: int = 3) -> dict:
    """Relative scores per category and overall; `predictions` {question_id: answer text}."""
    data = Path(data)
    questions = read_rows(_need(data / "questions.jsonl"))
    captions = {c["image"]: c["caption"] for c in read_rows(_need(data / "context.jsonl"))}
    references = {r["question_id"]: r["text"] for r in read_rows(_need(data / "answers_gpt4.jsonl"))}
    rules = json.loads(_need(data / "rule.json").read_text())
    reviews = Path(reviews)
    done = {r["question_id"]: r for r in read_rows(reviews)}
    stats = {"requests": 0, "failed_requests": 0, "unparsable": 0, "failed": 0}
    with open(reviews, "a") as out:
        for q in questions:
            qid = q["question_id"]
            if qid in done or qid not in predictions:
                continue
            rule = rules[f"llava_bench_{q['category']}"]
            role = rule["role"]
            content = (f"[Context]\n{captions.get(q['image'], '')}\n\n[Question]\n{q['text']}\n\n"
                       f"[{role} 1]\n{references[qid]}\n\n[End of {role} 1]\n\n"
                       f"[{role} 2]\n{predictions[qid]}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")
            chat = [{"role": "system", "content": LLAVA_BENCH_SYSTEM}, {"role": "user", "content": content}]
            reply, pair = _ask(judge, chat, parse_pair, attempts, stats)
            if pair is None:
                continue
            done[qid] = {"question_id": qid, "category": q["category"], "content": reply, "tuple": list(pair)}
            out.write(json.dumps(done[qid]) + "\n")
            out.flush()
    by_category: dict = defaultdict(list)
    for review in done.values():
        by_category[review["category"]].append(review["tuple"])
        by_category["all"].append(review["tuple"])
    result = {}
    for category, pairs in sorted(by_category.items()):
        reference = sum(p[0] for p in pairs) / len(pairs)
        candidate = sum(p[1] for p in pairs) / len(pairs)
        result[category] = {"relative": 100 * candidate / reference if reference else 0.0,
                            "reference": reference * 10, "candidate": candidate * 10, "n": len(pairs)}
    return {"scores": result, "judge": stats, "reviewed": len(done), "questions": len(questions)}


def mmvet(judge, data: str | Path, predictions: dict, reviews: str | Path, attempts: int = 5) -> dict:
    """MM-Vet total and per-capability scores (0-100) from the judge's correctness grades."""
    data = Path(data)
    questions = json.loads(_need(data / "mm-vet.json").read_text())
    reviews = Path(reviews)
    done = {r["question_id"]: r for r in read_rows(reviews)}
    stats = {"requests": 0, "failed_requests": 0, "unparsable": 0, "failed": 0}
    with open(reviews, "a") as out:
        for qid, q in questions.items():
            if qid in done or qid not in predictions:
                continue
            truth = q["answer"].replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
            prompt = MMVET_PROMPT + f"{q['question']} | {truth} | {predictions[qid]} | "
            reply, grade = _ask(judge, [{"role": "user", "content": prompt}], parse_correctness, attempts, stats)
            if grade is None:
                continue
            done[qid] = {"question_id": qid, "content": reply, "score": grade, "capability": q.get("capability", [])}
            out.write(json.dumps(done[qid]) + "\n")
            out.flush()
    per_capability: dict = defaultdict(list)
    for review in done.values():
        for capability in review["capability"]:
            per_capability[capability].append(review["score"])
    scores = [r["score"] for r in done.values()]
    return {"total": 100 * sum(scores) / max(1, len(scores)),
            "capabilities": {k: 100 * sum(v) / len(v) for k, v in sorted(per_capability.items())},
            "judge": stats, "reviewed": len(done), "questions": len(questions)}


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found")
    return path
