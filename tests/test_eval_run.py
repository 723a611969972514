"""`llava eval --benchmark NAME`: a tiny random model answers small fixtures in each benchmark's
question-file format, answers are written in LLaVA's format and scored; a rerun after a kill resumes,
and chunks answered apart merge into the same answers."""

import base64
import io
import json

import pytest

from llava.cli import main
from llava.core.io import read_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("bench")
    (root / "images").mkdir()
    names = ["wide", "tall", "square", "grey"]
    for name in names:
        photos[name].convert("RGB").save(root / "images" / f"{name}.png")
    pope = [{"question_id": i, "image": f"{names[i % 4]}.png", "text": "Is there a cat in the image?",
             "category": "random"} for i in range(6)]
    (root / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in pope))
    (root / "coco_pope_random.json").write_text("".join(
        json.dumps({"question_id": q["question_id"], "label": "yes" if i % 2 else "no"}) + "\n"
        for i, q in enumerate(pope)))
    gqa = [{"question_id": f"g{i}", "image": f"{names[i % 4]}.png",
            "text": "What is it?\nAnswer the question using a single word or phrase."} for i in range(5)]
    (root / "llava_gqa_testdev_balanced.jsonl").write_text("".join(json.dumps(q) + "\n" for q in gqa))
    (root / "testdev_balanced_questions.json").write_text(json.dumps({q["question_id"]: {"answer": "cat"}
                                                                      for q in gqa}))
    sqa = [{"id": str(i), "image": "wide.png" if i % 2 else None, "conversations": [
        {"from": "human", "value": ("<image>\n" if i % 2 else "") + "Question: Which is a mammal?\nOptions: "
                                   "(A) cat (B) fish\nAnswer with the option's letter from the given choices directly."},
        {"from": "gpt", "value": "A"}]} for i in range(4)]
    (root / "llava_test_CQM-A.json").write_text(json.dumps(sqa))
    (root / "problems.json").write_text(json.dumps({str(i): {"choices": ["cat", "fish"], "answer": 0,
                                                             "image": "image.png" if i % 2 else None} for i in range(4)}))
    (root / "pid_splits.json").write_text(json.dumps({"test": [str(i) for i in range(4)]}))
    buffer = io.BytesIO()
    photos["square"].save(buffer, "PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    lines = [f"{i}\tWhat animal is shown?\tnan\tcat\tdog\tbird\t{'fish' if i else 'nan'}\tA\tanimals\t{encoded}\n"
             for i in range(2)]
    (root / "mmbench_dev_20230712.tsv").write_text(header + "".join(lines))
    short = "\nAnswer the question using a single word or phrase."
    textvqa = [{"question_id": 30 + i, "image": f"{names[i]}.png", "text": "What does the sign say?" + short}
               for i in range(3)]
    (root / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(q) + "\n" for q in textvqa))
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": q["question_id"], "answers": ["stop"] * 10} for q in textvqa]}))
    mme = [{"question_id": f"existence/{n}.png", "image": f"{n}.png", "category": "existence",
            "text": f"Is there a {w} in this image? Please answer yes or no."}
           for n in names[:2] for w in ("cat", "car")]  # two questions per image, one question_id
    (root / "llava_mme.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mme))
    official = root / "MME_Benchmark_release_version" / "existence"
    official.mkdir(parents=True)
    for n in names[:2]:
        (official / f"{n}.txt").write_text("Is there a cat in this image? Please answer yes or no.\tYes\n"
                                           "Is there a car in this image? Please answer yes or no.\tNo\n")
    seed = [{"question_id": f"s{i}", "image": f"{names[i]}.png", "text": "Which animal?\nA. cat\nB. dog\nC. cow"
             "\nD. pig\nAnswer with the option's letter from the given choices directly."} for i in range(3)]
    (root / "llava-seed-bench.jsonl").write_text("".join(json.dumps(q) + "\n" for q in seed))
    (root / "SEED-Bench.json").write_text(json.dumps({"question_type": {"Instance Identity": 2}, "questions": [
        {"question_id": q["question_id"], "question_type_id": 2, "answer": "A", "choice_a": "cat", "choice_b": "dog",
         "choice_c": "cow", "choice_d": "pig"} for q in seed]}))
    test = root / "test-splits"
    (test / "images").mkdir(parents=True)
    photos["wide"].save(test / "images" / "wide.png")
    (test / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text(json.dumps(
        {"question_id": 262148000, "image": "wide.png", "text": "What animal?" + short}) + "\n")
    (test / "llava_test.jsonl").write_text(json.dumps(
        {"question_id": "VizWiz_test_00000000.jpg", "image": "wide.png", "text": "What is this?" + short}) + "\n")
    (test / "mmbench_test_20230712.tsv").write_text(header + lines[0].replace("\tA\tanimals", "\t\tanimals"))
    return root


def _eval(capsys, *args):
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("benchmark, questions, key", [
    ("pope", 6, "random"), ("gqa", 5, "accuracy"), ("scienceqa", 4, "accuracy"), ("mmbench", 7, "circular_accuracy"),
    ("textvqa", 3, "accuracy"), ("mme", 4, "perception"), ("seed", 3, "types"),
])
def test_each_format_is_answered_and_scored(checkpoints, data, tmp_path, capsys, benchmark, questions, key):
    model = str(checkpoints("llava"))
    metrics = _eval(capsys, "--benchmark", benchmark, "--model", model, "--data", str(data), "--output",
                    str(tmp_path), "--max-new-tokens", "4", "--batch-size", "3")
    assert key in metrics
    rows = read_rows(tmp_path / "answers.jsonl")
    assert len(rows) == questions  # mmbench: 3 + 4 rotations of its two questions
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(rows[0])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    if benchmark == "mmbench":
        assert sorted(r["round_id"] for r in rows if r["question_id"] == 1) == [0, 1, 2, 3]
        assert rows[1]["prompt"].splitlines()[1:4] == ["A. dog", "B. bird", "C. cat"]  # round 1: rotated


def test_a_rerun_after_a_kill_resumes_and_chunks_merge(checkpoints, data, tmp_path, capsys):
    model = str(checkpoints("llava"))
    common = ["--benchmark", "pope", "--model", model, "--data", str(data), "--max-new-tokens", "3"]
    _eval(capsys, *common, "--output", str(tmp_path / "a"), "--limit", "4")
    answers = tmp_path / "a" / "answers.jsonl"
    first = read_rows(answers)
    with open(answers, "a") as f:
        f.write('{"question_id": 4, "te')  # the line a killed run was writing
    full = _eval(capsys, *common, "--output", str(tmp_path / "a"))
    rows = read_rows(answers)
    assert [r["answer_id"] for r in rows[:4]] == [r["answer_id"] for r in first]  # kept, not redone
    assert sorted(r["question_id"] for r in rows) == list(range(6))
    for k in range(2):
        assert main(["eval", *common, "--output", str(tmp_path / "b"), "--num-chunks", "2", "--chunk-idx", str(k)]) == 0
    capsys.readouterr()
    merged = _eval(capsys, "merge", "--benchmark", "pope", "--data", str(data), "--output", str(tmp_path / "b"),
                   "--num-chunks", "2")
    assert merged == full
    assert [r["text"] for r in read_rows(tmp_path / "b" / "answers.jsonl")] == [r["text"] for r in rows]


@pytest.mark.parametrize("benchmark, file", [("vqav2", "vqav2_submission.json"),
                                             ("vizwiz", "vizwiz_submission.json"),
                                             ("mmbench", "mmbench_submission.xlsx")])
def test_test_splits_write_the_servers_submission_files(checkpoints, data, tmp_path, capsys, benchmark, file):
    metrics = _eval(capsys, "--benchmark", benchmark, "--model", str(checkpoints("llava")), "--data",
                    str(data / "test-splits"), "--output", str(tmp_path), "--max-new-tokens", "3")
    assert metrics["submission"] == str(tmp_path / file) and metrics["n"] == 1
    if file.endswith(".json"):
        entry = json.loads((tmp_path / file).read_text())[0]
        assert set(entry) == ({"question_id", "answer"} if benchmark == "vqav2" else {"image", "answer"})
    else:
        from openpyxl import load_workbook
        sheet = load_workbook(tmp_path / file).active
        assert [c.value for c in sheet[1]][:7] == ["index", "question", "A", "B", "C", "D", "prediction"]
        assert sheet.max_row == 2
