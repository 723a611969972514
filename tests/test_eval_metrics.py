"""Benchmark metrics against the official scorers' rules, on hand-made fixtures in each benchmark's
own file format, including each scorer's awkward cases; `llava eval score` end to end."""

import json
import subprocess
import sys

import pytest

from llava.eval.choice import extract_letter, mmbench_circular, seed_accuracy
from llava.eval.mme import mme_scores, parse_yes_no
from llava.eval.pope import answer_to_label
from llava.eval.scienceqa import parse_letter, scienceqa_accuracy
from llava.eval.vqa import gqa_accuracy, normalize_answer, vqa_score


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"), ("The dog", "dog"), ("a Red-Car", "red car"), ("dont", "don't"), ("isnt it?", "isn't it"),
    ("yes, it is", "yes it is"), ("3.5", "3.5"), ("10,000", "10000"), ("none", "0"), ("It's a cat!", "it 's cat"),
    ("  \tTen\n", "10"), ("left/right", "left right"), ("an apple", "apple"),
])
def test_vqa_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_is_min_matches_over_three_averaged_over_leave_one_out():
    assert vqa_score("two", ["2"] * 10) == 1.0
    assert vqa_score("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 x 2/3 + 7 x 1, over 10
    assert vqa_score("2", ["2"] * 2 + ["1"] * 8) == pytest.approx(0.6)    # 2 x 1/3 + 8 x 2/3, over 10
    assert vqa_score("cat", ["dog"] * 10) == 0.0
    assert vqa_score("The Dog.", ["dog"] * 4 + ["puppy"] * 6) == 1.0


def test_gqa_exact_match_after_llavas_cleanup():
    result = gqa_accuracy({"1": "Yes.", "2": "left", "3": "the table"}, {"1": "yes", "2": "right", "3": "table"})
    assert result == {"accuracy": pytest.approx(1 / 3), "n": 3}


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B. The cat", "B"), ("The answer is C.", "C"), ("Because ... The answer is A.", "A"),
    ("The answer is A. The answer is B.", "FAILED"), ("E", "FAILED"), ("b", "FAILED"), ("A.", "FAILED"),
])
def test_scienceqa_answer_letters_as_llava_parses_them(text, letter):
    assert parse_letter(text, 4) == letter


def test_scienceqa_accuracy_counts_missing_as_failed_and_reports_img():
    problems = {"1": {"choices": ["x", "y"], "answer": 1, "image": "image.png"},
                "2": {"choices": ["x", "y", "z"], "answer": 0, "image": None},
                "3": {"choices": ["x", "y"], "answer": 0, "image": "image.png"}}
    result = scienceqa_accuracy({"1": "The answer is B.", "2": "A. x"}, problems)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["img_accuracy"] == 0.5
    assert result["missing"] == 1 and result["failed_parses"] == 1


@pytest.mark.parametrize("text, label", [
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
    ("No.", "no"), ("Yes", "yes"), ("I see no dog in the image", "no"), ("Not sure.", "yes"),
    ("The dog is there. No doubt.", "yes"),
])
def test_pope_reads_answers_as_eval_pope(text, label):
    # eval_pope: the first sentence, commas dropped; "No"/"not"/"no" as a word means no ("Not" does not)
    assert answer_to_label(text) == label


def test_mme_acc_and_acc_plus_per_image():
    rows = [{"category": "existence", "image": "1.png", "prediction": "Yes", "answer": "Yes"},
            {"category": "existence", "image": "1.png", "prediction": "No, it is not.", "answer": "No"},
            {"category": "existence", "image": "2.png", "prediction": "yes", "answer": "Yes"},
            {"category": "existence", "image": "2.png", "prediction": "Yes", "answer": "No"},
            {"category": "code_reasoning", "image": "3.png", "prediction": "maybe", "answer": "Yes"},
            {"category": "code_reasoning", "image": "3.png", "prediction": "no", "answer": "No"}]
    scores = mme_scores(rows)
    existence = scores["subtasks"]["existence"]
    assert existence["acc"] == 75.0 and existence["acc_plus"] == 50.0 and existence["score"] == 125.0
    assert scores["perception"] == 125.0 and scores["cognition"] == 50.0 + 0.0
    assert parse_yes_no("Yes.") == "yes" and parse_yes_no("Nope") == "no" and parse_yes_no("maybe") == "other"


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("(B) blue", "B"), ("C. red", "C"), ("Answer: D", "D"), ("The answer is B", "B"),
    ("green", "C"), ("I think it is blue.", "B"), ("none of them", None), ("A or B", None),
])
def test_choice_letters(text, letter):
    assert extract_letter(text, ["red", "blue", "green", "yellow"]) == letter


def test_mmbench_circular_needs_every_rotation_right():
    options = ["cat", "dog", "bird", "fish"]  # the answer is "dog" (B)
    def rows(index, predictions):
        return [{"index": index, "round": r, "prediction": p, "options": options, "answer": "B", "category": "c"}
                for r, p in enumerate(predictions)]
    # rotation r shows option (i + r) % 4 at letter i: dog is at B, A, D, C in rounds 0..3
    all_right = rows(1, ["B", "A", "D", "C"])
    one_wrong = rows(2, ["B", "A", "D", "D"])
    by_text = rows(3, ["dog", "dog", "The answer is D", "C"])
    result = mmbench_circular(all_right + one_wrong + by_text)
    assert result["circular_accuracy"] == pytest.approx(2 / 3) and result["vanilla_accuracy"] == 1.0


def test_seed_accuracy_per_question_type():
    rows = [{"question_type_id": 1, "prediction": "A", "answer": "A"},
            {"question_type_id": 1, "prediction": "B.", "answer": "A"},
            {"question_type_id": 2, "prediction": "(C)", "answer": "C"}]
    result = seed_accuracy(rows, {"Scene Understanding": 1, "Instance Identity": 2})
    assert result["types"] == {"Scene Understanding": 0.5, "Instance Identity": 1.0}
    assert result["accuracy"] == pytest.approx(2 / 3)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(benchmark, predictions, data):
    result = subprocess.run([sys.executable, "-m", "llava", "eval", "score", "--benchmark", benchmark,
                             "--predictions", str(predictions), "--data", str(data), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_score_reads_each_benchmarks_own_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    answers = [{"answer": a} for a in ["2"] * 3 + ["3"] * 7]
    (data / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"annotations": [{"question_id": 7, "answers": answers}, {"question_id": 8, "answers": [{"answer": "no"}] * 10}]}))
    preds = _write(tmp_path / "vqa.jsonl", [{"question_id": 7, "text": "Two"}, {"question_id": 8, "text": "No."}])
    assert _score("vqav2", preds, data)["accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    (data / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [{"question_id": 7, "answers": ["stop"] * 10}]}))
    assert _score("textvqa", _write(tmp_path / "t.jsonl", [{"question_id": 7, "text": "STOP"}]), data)["accuracy"] == 1
    (data / "testdev_balanced_questions.json").write_text(json.dumps({"201": {"answer": "yes"}, "202": {"answer": "no"}}))
    gqa = _write(tmp_path / "g.jsonl", [{"question_id": "201", "text": "Yes."}, {"question_id": "202", "text": "yes"}])
    assert _score("gqa", gqa, data)["accuracy"] == 0.5
    (data / "problems.json").write_text(json.dumps({"5": {"choices": ["a", "b"], "answer": 1, "image": "i.png"},
                                                     "6": {"choices": ["a", "b"], "answer": 0, "image": None}}))
    (data / "pid_splits.json").write_text(json.dumps({"test": ["5", "6"], "train": []}))
    sqa = _write(tmp_path / "s.jsonl", [{"question_id": "5", "text": "B"}, {"question_id": "6", "text": "B"}])
    assert _score("scienceqa", sqa, data)["accuracy"] == 0.5
    _write(data / "coco_pope_random.json", [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}])
    _write(data / "coco_pope_popular.json", [{"question_id": 3, "label": "no"}])
    pope = _write(tmp_path / "p.jsonl", [{"question_id": 1, "text": "Yes, there is."},
                                         {"question_id": 2, "text": "No."}, {"question_id": 3, "text": "Yes"}])
    result = _score("pope", pope, data)
    assert result["random"]["accuracy"] == 1.0 and result["popular"]["accuracy"] == 0.0 and "adversarial" not in result


def test_test_splits_become_submission_files_and_bad_input_is_one_line(tmp_path):
    preds = _write(tmp_path / "vqa.jsonl", [{"question_id": 7, "text": "Two dogs."}])
    result = _score("vqav2", preds, tmp_path)
    submission = json.loads(open(result["submission"]).read())
    assert submission == [{"question_id": 7, "answer": "2 dogs"}]
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps({"question_id": 7, "text": "x"}) + "\n" + '{"question_id": 8, "te')
    assert _score("vqav2", torn, tmp_path)["n"] == 1  # a killed run's half line is skipped
    bad = subprocess.run([sys.executable, "-m", "llava", "eval", "score", "--benchmark", "gqa", "--predictions",
                          str(preds), "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "testdev_balanced_questions.json: not found" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_summary_table_json_and_chart_across_models(tmp_path):
    runs = tmp_path / "runs"
    for model, f1, acc in (("tiny-a", 0.5, 0.25), ("tiny-b", 0.75, 0.5)):
        for benchmark, metrics in (("pope", {"f1_mean": f1}), ("gqa", {"accuracy": acc, "n": 4})):
            (runs / model / benchmark).mkdir(parents=True)
            (runs / model / benchmark / "metrics.json").write_text(json.dumps(metrics))
    (runs / "tiny-b" / "mme").mkdir()
    (runs / "tiny-b" / "mme" / "metrics.json").write_text(json.dumps({"perception": 1200.5, "cognition": 300}))
    result = subprocess.run([sys.executable, "-m", "llava", "eval", "summary", "--runs", str(runs), "--output",
                             str(tmp_path / "report"), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert table == {"tiny-a": {"gqa": 25.0, "pope": 50.0}, "tiny-b": {"gqa": 50.0, "mme": 1200.5, "pope": 75.0}}
    markdown = (tmp_path / "report" / "summary.md").read_text().splitlines()
    assert markdown[0] == "| model | gqa | mme | pope |" and markdown[2] == "| tiny-a | 25.0 | – | 50.0 |"
    assert (tmp_path / "report" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
