"""GPT-judged benchmarks: LLaVA-Bench relative scores and MM-Vet grades from a judge endpoint (a local
OpenAI-compatible server started here), replies parsed robustly, bad replies retried and counted,
reviews resumable."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llava.eval.judge import parse_correctness, parse_pair


@pytest.mark.parametrize("review, pair", [
    ("8 6\nAssistant 1 was better.", (8.0, 6.0)), ("8, 6", (8.0, 6.0)), ("7.5 9", (7.5, 9.0)),
    ("Assistant 1: 8, Assistant 2: 6", (8.0, 6.0)), ("Both are good.\n8 6", None), ("8", None),
])
def test_review_score_pairs(review, pair):
    assert parse_pair(review) == pair


@pytest.mark.parametrize("reply, grade", [("0.5", 0.5), (" 1.0 ", 1.0), ("0.3 because", 0.3), ("7", None),
                                           ("correct", None)])
def test_mmvet_grades(reply, grade):
    assert parse_correctness(reply) == grade


class _Judge(BaseHTTPRequestHandler):
    calls = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        _Judge.calls.append(prompt)
        if "Correctness" in prompt:
            reply = "no idea" if "first try" in prompt and len(_Judge.calls) % 2 else "0.5"
        elif "[Assistant 2]\nA cat." in prompt:
            reply = "8 4\nThe second is short."
        else:
            reply = "8 8\nBoth fine."
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Judge.calls = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(benchmark, predictions, data, judge_url, output):
    result = subprocess.run([sys.executable, "-m", "llava", "eval", "score", "--benchmark", benchmark, "--predictions",
                             str(predictions), "--data", str(data), "--output", str(output), "--judge-model", "judge",
                             "--judge-base-url", judge_url, "--judge-api-key", "k", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_llava_bench_relative_scores_per_category(tmp_path, judge_url):
    data = tmp_path / "llava-bench"
    data.mkdir()
    _write(data / "questions.jsonl", [{"question_id": 0, "image": "a.jpg", "text": "What is it?", "category": "conv"},
                                      {"question_id": 1, "image": "a.jpg", "text": "Describe it.", "category": "detail"}])
    _write(data / "context.jsonl", [{"image": "a.jpg", "caption": "A cat on a mat."}])
    _write(data / "answers_gpt4.jsonl", [{"question_id": 0, "text": "A cat."}, {"question_id": 1, "text": "A cat, lying."}])
    rule = {"role": "Assistant", "prompt": "Rate both answers from 1 to 10, scores first."}
    (data / "rule.json").write_text(json.dumps({f"llava_bench_{c}": rule for c in ("conv", "detail", "complex")}))
    predictions = _write(tmp_path / "answers.jsonl", [{"question_id": 0, "text": "A cat."},
                                                      {"question_id": 1, "text": "Something."}])
    result = _score("llava_bench", predictions, data, judge_url, tmp_path / "out")
    scores = result["scores"]
    assert scores["conv"]["relative"] == pytest.approx(50.0)  # 4 / 8
    assert scores["detail"]["relative"] == pytest.approx(100.0)
    assert scores["all"]["relative"] == pytest.approx(100 * 6 / 8)
    asked = len(_Judge.calls)
    assert "[Context]\nA cat on a mat." in _Judge.calls[0] and "[Assistant 1]\nA cat." in _Judge.calls[0]
    again = _score("llava_bench", predictions, data, judge_url, tmp_path / "out")
    assert again["scores"] == scores and len(_Judge.calls) == asked  # reviews are kept: nothing asked again


def test_mmvet_grades_with_retries_counted(tmp_path, judge_url):
    data = tmp_path / "mm-vet"
    data.mkdir()
    (data / "mm-vet.json").write_text(json.dumps({
        "v1_0": {"question": "first try: what is x?", "answer": "-1<AND>-5", "capability": ["math"]},
        "v1_1": {"question": "What is written?", "answer": "STOP", "capability": ["ocr", "rec"]}}))
    predictions = _write(tmp_path / "answers.jsonl", [{"question_id": "v1_0", "text": "x = -1"},
                                                      {"question_id": "v1_1", "text": "stop"}])
    result = _score("mmvet", predictions, data, judge_url, tmp_path / "out")
    assert result["total"] == pytest.approx(50.0)
    assert result["capabilities"] == {"math": pytest.approx(50.0), "ocr": pytest.approx(50.0),
                                      "rec": pytest.approx(50.0)}
    assert result["judge"]["unparsable"] == 1 and result["judge"]["failed"] == 0
    assert " -1 <AND> -5 " in _Judge.calls[0]  # the ground truth spaced as the official grader does


def test_llava_bench_and_mmvet_are_answered_then_judged(checkpoints, photos, tmp_path, judge_url):
    data = tmp_path / "bench"
    (data / "images").mkdir(parents=True)
    photos["wide"].save(data / "images" / "a.png")
    _write(data / "questions.jsonl", [{"question_id": i, "image": "a.png", "text": "Describe it.",
                                       "category": "detail"} for i in range(2)])
    _write(data / "context.jsonl", [{"image": "a.png", "caption": "A cat."}])
    _write(data / "answers_gpt4.jsonl", [{"question_id": i, "text": "A cat."} for i in range(2)])
    rule = {"role": "Assistant", "prompt": "Rate both."}
    (data / "rule.json").write_text(json.dumps({f"llava_bench_{c}": rule for c in ("conv", "detail", "complex")}))
    _write(data / "llava-mm-vet.jsonl", [{"question_id": "v1_0", "image": "a.png", "text": "What is it?"}])
    (data / "mm-vet.json").write_text(json.dumps({"v1_0": {"question": "What is it?", "answer": "cat",
                                                          "capability": ["rec"]}}))
    for benchmark, key in (("llava_bench", "scores"), ("mmvet", "total")):
        out = tmp_path / benchmark
        result = subprocess.run([sys.executable, "-m", "llava", "eval", "--benchmark", benchmark, "--model",
                                 str(checkpoints("llava")), "--data", str(data), "--output", str(out),
                                 "--max-new-tokens", "4", "--judge-model", "judge", "--judge-base-url", judge_url,
                                 "--json"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert key in json.loads(result.stdout.strip().splitlines()[-1])
        assert (out / "answers.jsonl").exists() and (out / f"{benchmark}_reviews.jsonl").exists()
