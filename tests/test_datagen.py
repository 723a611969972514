"""Instruction-data generation: reply parsing, the rule-based teacher, the OpenAI-compatible teacher
against a local HTTP server, and a killed run that continues without losing or repeating a context."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llava.data.dataset import LlavaDataset
from llava.data.shapes import synth
from llava.datagen.context import describe, load_coco
from llava.datagen.parse import RejectedResponse, parse_response
from llava.datagen.prompts import KINDS
from llava.datagen.runner import finish, run
from llava.datagen.teachers import OpenAITeacher, RuleTeacher, TeacherUnavailable

GOOD = {
    "conversation": "Question:\nWhat is there?\n===\nAnswer:\nA red circle.\n===\nQuestion:\nWhere?\n===\n"
                    "Answer:\nAt the top left.",
    "detail": "The image shows a red circle at the top left on a grey background, and nothing else.",
    "complex_reasoning": "Question:\nWhat if the circle left?\n===\nAnswer:\nThen the image would be empty.",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synth(root, {"train": 12, "test": 4}, seed=1)
    return root


@pytest.fixture(scope="module")
def contexts(world):
    return load_coco(world / "annotations" / "captions_train.json", world / "annotations" / "instances_train.json")


def test_contexts_read_captions_and_normalised_boxes(contexts):
    assert len(contexts) == 12 and all(len(c.captions) == 5 for c in contexts)
    text = describe(contexts[0])
    lines = text.splitlines()
    assert lines[:5] == contexts[0].captions and lines[5] == ""
    name, coords = lines[6].split(": ")
    assert name.split()[-1] in ("circle", "square", "triangle", "diamond", "cross")
    assert all(0 <= float(v) <= 1 for v in coords.strip("[]").split(", "))


@pytest.mark.parametrize("kind,text,reason", [
    ("conversation", "What is there? A circle.", "neither 'Question:' nor 'Answer:'"),
    ("conversation", "Answer:\nA circle.", "an answer without a question"),
    ("conversation", "Question:\nWhat?\n===\nQuestion:\nWhy?", "two questions in a row"),
    ("conversation", "Question:\nWhat?", "has no answer"),
    ("conversation", "Question:\nWhere?\n===\nAnswer:\nAt [0.12, 0.3, 0.5, 0.6].", "coordinates"),
    ("conversation", "Question:\nWhat?\n===\nAnswer:\nI'm sorry, I cannot see images.", "refusal"),
    ("detail", "A circle.", "too short"),
    ("detail", "Question:\nWhat?\n===\nAnswer:\nA circle on a grey background in the image here.", "questions"),
    ("complex_reasoning", GOOD["conversation"], "expected one question, got 2"),
    ("detail", "", "empty"),
])
def test_bad_replies_are_rejected_with_the_reason(kind, text, reason):
    with pytest.raises(RejectedResponse, match=reason.replace("[", r"\[")):
        parse_response(kind, text)


def test_good_replies_parse():
    assert parse_response("conversation", GOOD["conversation"]) == [("What is there?", "A red circle."),
                                                                     ("Where?", "At the top left.")]
    assert parse_response("detail", GOOD["detail"])[0][1].startswith("The image shows")


def test_rule_teacher_writes_every_kind_in_the_reply_format(contexts, world, tmp_path):
    teacher = RuleTeacher(seed=0)
    for context in contexts:
        for kind in KINDS:
            text = teacher.respond(kind, context)
            assert text == RuleTeacher(seed=0).respond(kind, context)  # deterministic
            turns = parse_response(kind, text)
            if kind == "conversation":
                assert 3 <= len(turns) <= 6
            if kind == "detail":
                body = turns[0][1]
                for box in context.boxes:  # every object is named, with its place
                    assert f"{box['colour']} {box['category']}" in body
    summary = run(contexts, teacher, tmp_path / "out", concurrency=2)
    assert sum(summary.written.values()) == 3 * len(contexts) and not summary.rejected
    target = finish(tmp_path / "out")
    records = json.loads(target.read_text())
    assert len(records) == 3 * len(contexts)
    first = records[0]["conversations"][0]["value"]
    assert first.startswith("<image>\n") or first.endswith("\n<image>")
    dataset = LlavaDataset(target, processor=None, image_folder=str(world), check_image_files=True)
    assert len(dataset) == len(records)


class _Teacher(BaseHTTPRequestHandler):
    """A chat-completions endpoint. Replies by kind (read from the system prompt); fails the first
    request with 500; always answers context `bad_id` with an unusable reply; sleeps `delay` s."""
    requests: list = []
    fail_first = True
    bad_id = None
    delay = 0.0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).requests.append({"auth": self.headers.get("Authorization"), "path": self.path, **body})
            fail = type(self).fail_first
            type(self).fail_first = False
        if fail:
            self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
            return
        time.sleep(self.delay)
        system = body["messages"][0]["content"]
        kind = ("conversation" if "conversation" in system else "complex_reasoning" if "reasoning" in system
                else "detail")
        text = GOOD[kind]
        if self.bad_id and self.bad_id in body["messages"][-1]["content"]:
            text = "I'm sorry, I cannot help with that."
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    _Teacher.requests, _Teacher.fail_first, _Teacher.bad_id, _Teacher.delay = [], True, None, 0.0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_openai_teacher_against_a_local_server(server, contexts, tmp_path):
    _Teacher.bad_id = contexts[3].captions[0]  # the user message of context 3 holds its captions
    teacher = OpenAITeacher(base_url=server, model="teacher-1", api_key="sk-test", backoff=0.01)
    summary = run(contexts, teacher, tmp_path / "out", concurrency=4, attempts=2)
    assert teacher.stats["retries"] == 1  # the 500 was retried
    assert summary.written == Counter({k: len(contexts) - 1 for k in KINDS})
    assert sum(summary.rejected.values()) == 3
    rejects = [json.loads(l) for l in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["kind"], r["id"]) for r in rejects) == sorted((k, contexts[3].id) for k in KINDS)
    first = _Teacher.requests[1]
    assert first["auth"] == "Bearer sk-test" and first["model"] == "teacher-1"
    assert first["path"] == "/v1/chat/completions"
    roles = [m["role"] for m in first["messages"]]
    assert roles[0] == "system" and roles[-1] == "user" and "assistant" in roles  # few-shot example
    user = first["messages"][-1]["content"]
    assert any(user.startswith(c.captions[0]) for c in contexts) and "]" in user.splitlines()[-1]
    # bad replies were asked twice, then given up; a rerun asks nothing more
    asked = len(_Teacher.requests)
    again = run(contexts, teacher, tmp_path / "out", concurrency=4)
    assert len(_Teacher.requests) == asked and sum(again.skipped.values()) == 3 * len(contexts)


def test_unreachable_teacher_fails_cleanly(contexts, tmp_path):
    teacher = OpenAITeacher(base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, backoff=0.01, timeout=2)
    summary = run(contexts[:2], teacher, tmp_path / "out", kinds=("detail",), concurrency=2)
    assert summary.failed == 2 and not summary.written
    assert "failed 2 times" in summary.errors[0]
    with pytest.raises(TeacherUnavailable):
        teacher.respond("detail", contexts[0])


def test_killed_run_continues_without_losing_or_repeating_a_context(server, world, tmp_path):
    _Teacher.fail_first, _Teacher.delay = False, 0.05
    out = tmp_path / "out"
    command = [sys.executable, "-m", "llava", "datagen", "--captions", str(world / "annotations/captions_train.json"),
               "--instances", str(world / "annotations/instances_train.json"), "--output", str(out),
               "--base-url", server, "--model", "m", "--api-key", "k", "--concurrency", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = sum(len((out / f"{k}.jsonl").read_text().splitlines()) for k in KINDS
                    if (out / f"{k}.jsonl").exists())
        if lines >= 8:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with open(out / "detail.jsonl", "a") as f:  # as if killed in the middle of a write
        f.write('{"id": "torn", "ima')
    done_before = sum(len((out / f"{k}.jsonl").read_text().splitlines()) for k in KINDS
                      if (out / f"{k}.jsonl").exists())
    assert 8 <= done_before < 36
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{done_before - 1} already done" in result.stderr  # the torn line was not counted
    for kind in KINDS:
        ids = [json.loads(l)["id"] for l in (out / f"{kind}.jsonl").read_text().splitlines()]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 12, kind  # each context exactly once
    assert len(json.loads((out / "llava_instruct.json").read_text())) == 36
