"""`llava eval --benchmark NAME --model M --data DIR`: answer a benchmark's questions from the question
files LLaVA's evaluation uses, prompted as LLaVA prompts them (the model's template, the short-answer
and multiple-choice suffixes already in those files, MMBench's options and circular rotations), with
batched greedy decoding on the engine. Answers go to answers.jsonl (LLaVA's format, one line per
question, fsynced), so a rerun skips what is done; then the benchmark's metric is computed.

    vqav2      llava_vqav2_mscoco_*.jsonl       gqa        llava_gqa_testdev_balanced.jsonl
    textvqa    llava_textvqa_val_v051_ocr.jsonl pope       llava_pope_test.jsonl
    vizwiz     llava_test.jsonl                 mme        llava_mme.jsonl
    scienceqa  llava_test_CQM-A.json            seed       llava-seed-bench.jsonl
    mmbench    mmbench_*.tsv (images inside, base64; every rotation of the options is asked)
    llava_bench questions.jsonl                 mmvet      llava-mm-vet.jsonl   (GPT-judged; --max-new-tokens 1024)
Images are looked up under DIR/images (or --image-folder).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import uuid
from pathlib import Path

from ..core.errors import DataError
from ..core.io import atomic_write_text, read_rows
from ..generate.chat import chat_prompt
from ..generate.engine import Engine
from ..generate.sampling import SamplingParams

QUESTION_FILES = {"vqav2": "llava_vqav2_mscoco_*.jsonl", "textvqa": "llava_textvqa_val_v051_ocr.jsonl",
                  "vizwiz": "llava_test.jsonl", "gqa": "llava_gqa_testdev_balanced.jsonl",
                  "scienceqa": "llava_test_CQM-A.json", "pope": "llava_pope_test.jsonl", "mme": "llava_mme.jsonl",
                  "seed": "llava-seed-bench.jsonl", "mmbench": "mmbench_*.tsv", "llava_bench": "questions.jsonl",
                  "mmvet": "llava-mm-vet.jsonl"}
MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."


def _question_file(benchmark: str, data: Path) -> Path:
    if benchmark not in QUESTION_FILES:
        raise DataError(f"unknown benchmark {benchmark!r}; available: shapes, {', '.join(QUESTION_FILES)}")
    found = sorted(data.glob(QUESTION_FILES[benchmark]))
    if not found:
        raise DataError(f"{data}: no {QUESTION_FILES[benchmark]} (LLaVA's question file for {benchmark})")
    return found[0]


def load_questions(benchmark: str, data: Path, image_folder: Path | None = None) -> list[dict]:
    """[{"question_id", "round_id", "text" (without the image token), "image" (path or PIL image or None),
    and for MMBench "options"}] in file order."""
    path = _question_file(benchmark, data)
    images = image_folder or data / "images"
    if benchmark == "mmbench":
        return _mmbench_questions(path)
    if path.suffix == ".json":  # ScienceQA: LLaVA conversation records
        rows = []
        for record in json.loads(path.read_text()):
            text = record["conversations"][0]["value"].replace("<image>", "").strip()
            rows.append({"question_id": record["id"], "round_id": 0, "text": text,
                         "image": images / record["image"] if record.get("image") else None})
        return rows
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: not valid JSON") from None
        rows.append({"question_id": q["question_id"], "round_id": 0, "text": q["text"],
                     "image": images / q["image"] if q.get("image") else None})
    return rows


def _mmbench_questions(path: Path) -> list[dict]:
    from ..mm_utils import load_image_from_base64

    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = [row[c] for c in "ABCD" if row.get(c) not in (None, "", "nan")]
            image = load_image_from_base64(row["image"]) if row.get("image") else None
            for round_id in range(len(options)):  # circular evaluation: every rotation
                shown = options[round_id:] + options[:round_id]
                question = row["question"]
                if row.get("hint") not in (None, "", "nan"):
                    question = row["hint"] + "\n" + question
                for letter, option in zip("ABCD", shown):
                    question += f"\n{letter}. {option}"
                rows.append({"question_id": int(row["index"]), "round_id": round_id, "image": image,
                             "text": question + "\n" + MMBENCH_SUFFIX, "options": shown})
    return rows


def run_benchmark(model, processor, benchmark: str, data: str | Path, output: str | Path, *,
                  image_folder: str | Path | None = None, limit: int | None = None, batch_size: int = 16,
                  max_new_tokens: int = 128, num_chunks: int = 1, chunk_idx: int = 0, progress: bool = True,
                  model_id: str = "llava") -> Path:
    """Answer the (chunk of the) benchmark into output/answers[_K].jsonl, resuming; returns the file."""
    from tqdm import tqdm

    from ..data.images import load_image

    if not 0 <= chunk_idx < num_chunks:
        raise DataError(f"--chunk-idx {chunk_idx} is not in 0..{num_chunks - 1}")
    data, output = Path(data), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    questions = load_questions(benchmark, data, Path(image_folder) if image_folder else None)
    if limit:
        keep = {q["question_id"] for q in questions[:limit]} if benchmark != "mmbench" else \
            set(list(dict.fromkeys(q["question_id"] for q in questions))[:limit])
        questions = [q for q in questions if q["question_id"] in keep]
    size = math.ceil(len(questions) / num_chunks)
    questions = questions[chunk_idx * size:(chunk_idx + 1) * size]
    path = output / ("answers.jsonl" if num_chunks == 1 else f"answers_{chunk_idx}.jsonl")
    # MME asks two questions per image under one question_id: the prompt is part of the key
    done = {(row["question_id"], row.get("round_id", 0), row["prompt"]) for row in read_rows(path)}
    todo = [q for q in questions if (q["question_id"], q["round_id"], q["text"]) not in done]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    engine = Engine(model, processor, max_batch_size=batch_size)
    token = processor.image_token
    try:
        with open(path, "a") as out, tqdm(total=len(todo), desc=benchmark, disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts, images, stops = [], [], []
                for q in batch:
                    content = f"{token}\n{q['text']}" if q["image"] is not None else q["text"]
                    prompt, stop = chat_prompt(processor, [{"role": "user", "content": content}])
                    prompts.append(prompt)
                    stops.append(stop)
                    if q["image"] is None:
                        images.append([])
                    else:
                        images.append([q["image"] if not isinstance(q["image"], Path) else load_image(q["image"])])
                settings = [SamplingParams(max_new_tokens=params.max_new_tokens, stop=s) for s in stops]
                for q, prompt, answer in zip(batch, prompts, engine.generate(prompts, images, settings)):
                    row = {"question_id": q["question_id"], "prompt": q["text"], "text": answer.text.strip(),
                           "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
                    if benchmark == "mmbench":
                        row.update(round_id=q["round_id"], options=q["options"])
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                bar.update(len(batch))
    finally:
        engine.close()
    return path


def merge_chunks(output: str | Path, num_chunks: int) -> Path:
    """answers_0 … answers_{N-1}.jsonl -> answers.jsonl (atomically); every chunk must be there."""
    output = Path(output)
    parts = [output / f"answers_{k}.jsonl" for k in range(num_chunks)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise DataError(f"{output}: chunks not done yet: {', '.join(missing)}")
    rows = [row for part in parts for row in read_rows(part)]
    target = output / "answers.jsonl"
    atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target
