"""`llava eval score`: score a predictions file (LLaVA's answers JSONL: one {"question_id", "text", ...}
per line) against a benchmark's ground truth in its published format. The data folder holds:

    vqav2       v2_mscoco_val2014_annotations.json (official); without it, a test-dev submission file is written
    textvqa     TextVQA_0.5.1_val.json
    vizwiz      val.json (official annotations; question ids are image names); without it, a test submission
    gqa         testdev_balanced_questions.json
    scienceqa   problems.json and pid_splits.json (the test split is scored)
    pope        coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json ("label" per question)
    mme         MME_Benchmark_release_version/ (the official folder: per subtask, "question<TAB>answer" .txt
                files beside the images or in questions_answers_YN/); predictions carry LLaVA's question_id
                ("subtask/image.png") and the question as "prompt"
    mmbench     the MMBench TSV (mmbench_dev_*.tsv: index, question, A-D, answer, category); predictions carry
                "round_id" for the circular rotations
    seed        SEED-Bench.json (questions with question_type_id and answer; question_type names)
    llava_bench, mmvet   GPT-judged: see llava.eval.judge (a judge endpoint is needed)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..core.errors import DataError
from ..core.io import atomic_write_text
from .choice import LETTERS, mmbench_circular, seed_accuracy
from .mme import mme_scores
from .pope import pope_metrics
from .scienceqa import scienceqa_accuracy
from .vqa import gqa_accuracy, normalize_answer, vqa_accuracy

BENCHMARKS = ("vqav2", "textvqa", "vizwiz", "gqa", "scienceqa", "pope", "mme", "mmbench", "seed", "llava_bench",
              "mmvet")


def read_predictions(path: str | Path) -> list[dict]:
    """Answers JSONL; a torn last line (a killed run) is ignored, any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such predictions file")
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: not valid JSON") from None
        if "question_id" not in row or "text" not in row:
            raise DataError(f"{path}:{number}: a prediction needs question_id and text")
        rows.append(row)
    return rows


def _json(folder: Path, name: str):
    path = folder / name
    if not path.exists():
        raise DataError(f"{path}: not found (see `llava eval score --help` for the data layout)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(benchmark: str, predictions_path: str | Path, data: str | Path, output: str | Path | None = None,
          judge=None) -> dict:
    """The benchmark's metrics for a predictions file (or, for test splits, the submission file written).
    `judge` (an OpenAITeacher) grades the GPT-judged benchmarks; its reviews go beside the predictions."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; scorable: {', '.join(BENCHMARKS)}")
    data = Path(data)
    rows = read_predictions(predictions_path)
    text = {row["question_id"]: row["text"] for row in rows}
    output = Path(output) if output else Path(predictions_path).parent
    if benchmark in ("llava_bench", "mmvet"):
        from . import judge as judged

        if judge is None:
            raise DataError(f"{benchmark} is scored by a judge model: give --judge-model (and --judge-base-url)")
        output.mkdir(parents=True, exist_ok=True)
        grade = judged.llava_bench if benchmark == "llava_bench" else judged.mmvet
        return grade(judge, data, {str(q) if benchmark == "mmvet" else q: t for q, t in text.items()},
                     output / f"{benchmark}_reviews.jsonl")
    if benchmark == "vqav2":
        if not (data / "v2_mscoco_val2014_annotations.json").exists():
            return _submission(output / "vqav2_submission.json",
                               [{"question_id": q, "answer": normalize_answer(t)} for q, t in text.items()])
        annotations = _json(data, "v2_mscoco_val2014_annotations.json")["annotations"]
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
        return vqa_accuracy(text, answers)
    if benchmark == "textvqa":
        entries = _json(data, "TextVQA_0.5.1_val.json")["data"]
        return vqa_accuracy(text, {e["question_id"]: e["answers"] for e in entries})
    if benchmark == "vizwiz":
        if not (data / "val.json").exists():
            return _submission(output / "vizwiz_submission.json",
                               [{"image": q, "answer": normalize_answer(t)} for q, t in text.items()])
        entries = _json(data, "val.json")
        return vqa_accuracy(text, {e["image"]: [a["answer"] for a in e["answers"]] for e in entries})
    if benchmark == "gqa":
        questions = _json(data, "testdev_balanced_questions.json")
        return gqa_accuracy({str(q): t for q, t in text.items()}, {q: v["answer"] for q, v in questions.items()})
    if benchmark == "scienceqa":
        problems = _json(data, "problems.json")
        split = _json(data, "pid_splits.json")["test"]
        return scienceqa_accuracy({str(q): t for q, t in text.items()}, {pid: problems[pid] for pid in split})
    if benchmark == "pope":
        return _pope(text, data)
    if benchmark == "mme":
        return _mme(rows, data)
    if benchmark == "mmbench":
        return _mmbench(rows, data, output)
    return _seed(text, data)


def _mme(rows: list[dict], data: Path) -> dict:
    root = data / "MME_Benchmark_release_version" if (data / "MME_Benchmark_release_version").is_dir() else data
    truth = {}
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        texts = sorted((task / "questions_answers_YN").glob("*.txt")) or sorted(task.glob("*.txt"))
        for text in texts:
            for line in text.read_text().splitlines():
                if "\t" in line:
                    question, answer = line.split("\t")[:2]
                    truth[(task.name, text.stem, question.strip())] = answer.strip()
    if not truth:
        raise DataError(f"{root}: no MME subtask folders with question/answer .txt files")
    scored = []
    for row in rows:
        task, _, image = str(row["question_id"]).partition("/")
        key = (task, Path(image).stem, row.get("prompt", "").strip())
        if key not in truth:
            raise DataError(f"MME: no ground truth for {row['question_id']!r} asking {key[2]!r}")
        scored.append({"category": task, "image": image, "prediction": row["text"], "answer": truth[key]})
    return mme_scores(scored)


def _submission(path: Path, entries: list) -> dict:
    atomic_write_text(path, json.dumps(entries))
    return {"submission": str(path), "n": len(entries)}


def _pope(text: dict, data: Path) -> dict:
    result = {}
    for split in ("random", "popular", "adversarial"):
        path = data / f"coco_pope_{split}.json"
        if not path.exists():
            continue
        labels = {q["question_id"]: q["label"] for q in _jsonl(path)}
        answered = [q for q in labels if q in text]
        if answered:
            result[split] = pope_metrics([text[q] for q in answered], [labels[q] for q in answered])
    if not result:
        raise DataError(f"{data}: no coco_pope_*.json file has a question of these predictions")
    result["f1_mean"] = sum(m["f1"] for m in result.values()) / len(result)
    return result


def _mmbench(rows: list[dict], data: Path, output: Path) -> dict:
    tables = sorted(data.glob("mmbench*.tsv"))
    if not tables:
        raise DataError(f"{data}: no mmbench*.tsv")
    csv.field_size_limit(1 << 30)  # the images are base64 inside the table
    with open(tables[0], newline="") as f:
        questions = {int(r["index"]): r for r in csv.DictReader(f, delimiter="\t")}
    if not any(q.get("answer") for q in questions.values()):  # the test split: a file for the MMBench server
        return _mmbench_submission(rows, questions, output / "mmbench_submission.xlsx")
    scored = []
    for row in rows:
        question = questions.get(int(row["question_id"]))
        if question is None:
            raise DataError(f"{tables[0]}: no question with index {row['question_id']}")
        options = [question[c] for c in LETTERS[:4] if question.get(c) not in (None, "", "nan")]
        scored.append({"index": int(row["question_id"]), "round": int(row.get("round_id", 0)),
                       "prediction": row["text"], "options": options, "answer": question["answer"],
                       "category": question.get("category", "all")})
    return mmbench_circular(scored)


def _mmbench_submission(rows: list[dict], questions: dict, path: Path) -> dict:
    """LLaVA's convert_mmbench_for_submission: index, question, A-D, prediction (the letter, in the order the
    options were shown in round 0), category, l2-category, split, as .xlsx."""
    from openpyxl import Workbook

    from ..core.io import atomic_path
    from .choice import extract_letter

    columns = ["index", "question", "A", "B", "C", "D", "prediction", "category", "l2-category", "split"]
    book = Workbook()
    sheet = book.active
    sheet.append(columns)
    for row in rows:
        if int(row.get("round_id", 0)) != 0:
            continue
        question = questions[int(row["question_id"])]
        options = [question.get(c, "") for c in "ABCD"]
        letter = extract_letter(row["text"], [o for o in options if o not in ("", "nan")]) or row["text"][:1]
        sheet.append([question.get(c, "") if c != "prediction" else letter for c in columns])
    output_rows = sheet.max_row - 1
    with atomic_path(path) as tmp:
        book.save(str(tmp))
    return {"submission": str(path), "n": output_rows}


def _seed(text: dict, data: Path) -> dict:
    seed = _json(data, "SEED-Bench.json")
    questions = {str(q["question_id"]): q for q in seed["questions"]}
    rows = []
    for qid, prediction in text.items():
        question = questions.get(str(qid))
        if question is None:
            raise DataError(f"SEED-Bench.json: no question {qid!r}")
        options = [question.get(f"choice_{c.lower()}", "") for c in "ABCD"]
        rows.append({"question_type_id": question["question_type_id"], "prediction": prediction,
                     "answer": question["answer"], "options": options})
    return seed_accuracy(rows, seed.get("question_type"))
