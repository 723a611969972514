"""`llava serve` driven by the real openai client: the same greedy text as `llava chat`, streaming,
every kind of bad request answered with the right 4xx while the server keeps answering, 64
concurrent streaming clients, media permissions, metrics, and the command itself."""

import asyncio
import base64
import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import llava
from llava.cli import main
from llava.generate.chat import chat_prompt
from llava.generate.engine import Engine
from llava.generate.generate import generate_text
from llava.generate.sampling import SamplingParams
from llava.serve.api import ServeConfig, create_app
from llava.serve.media import MediaPolicy
from llava.testing import free_port
from llava.testing import serve_in_thread as running

KEY = "sk-test-key"
QUESTION = "What is in the image?"


def data_url(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text, *urls):
    return [{"role": "user", "content": [{"type": "text", "text": text}] +
             [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


@pytest.fixture(scope="module")
def tiny(checkpoints):
    folder = checkpoints("llava")
    model, processor = llava.load_pretrained(folder, device="cpu")
    return folder, model, processor


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("media")
    photos["wide"].save(folder / "cat.png")
    outside = tmp_path_factory.mktemp("private")
    photos["tall"].save(outside / "secret.png")
    (folder / "link.png").symlink_to(outside / "secret.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny):
    _, model, processor = tiny
    engine = Engine(model, processor, max_batch_size=64)
    config = ServeConfig(model_name="tiny-llava", api_key=KEY, max_images_per_request=2,
                         media=MediaPolicy(max_image_bytes=1_000_000, max_image_pixels=1_000_000))
    with running(create_app(engine, config)) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_plain_and_streaming_answers_equal_llava_chat(tiny, client, photos, tmp_path, capsys):
    folder, _, _ = tiny
    path = tmp_path / "cat.png"
    photos["wide"].save(path)
    assert main(["chat", "--model", str(folder), "--image", str(path), "--prompt", QUESTION,
                 "--max-new-tokens", "16"]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    messages = user(QUESTION, data_url(photos["wide"]))
    plain = client.chat.completions.create(model="tiny-llava", messages=messages, temperature=0, max_tokens=16)
    assert plain.choices[0].message.content == expected
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason in ("stop", "length")
    usage = plain.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 0 < usage.completion_tokens <= 16
    chunks = list(client.chat.completions.create(model="tiny-llava", messages=messages, temperature=0,
                                                 max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix is cached


def test_models_health_and_metrics(server, client):
    url, _ = server
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llava"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    client.chat.completions.create(model="tiny-llava", messages=user("Hello"), max_tokens=2, temperature=0)
    metrics = httpx.get(url + "/metrics").text
    for name in ("llava_requests_total", "llava_prompt_tokens_total", "llava_completion_tokens_total",
                 "llava_request_latency_seconds_bucket", "llava_time_to_first_token_seconds_count",
                 "llava_queue_depth", "llava_running_requests", "llava_feature_cache_hits_total"):
        assert name in metrics
    line = next(x for x in metrics.splitlines() if x.startswith('llava_http_requests_total{path="/v1/chat'))
    assert float(line.split()[-1]) >= 1


def _corrupt_png(photos) -> str:
    url = data_url(photos["square"])
    raw = bytearray(base64.b64decode(url.split(",")[1]))
    raw[60:200] = b"\x00" * 140
    return "data:image/png;base64," + base64.b64encode(bytes(raw)).decode()


def _forged_bomb() -> str:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_every_bad_request_is_a_4xx_and_the_server_keeps_answering(server, client, photos, media_dir):
    url, _ = server
    good = data_url(photos["square"])
    noise = torch.randint(0, 256, (700, 700, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from PIL import Image
    big = data_url(Image.fromarray(noise.numpy()))  # ~1.5 MB of PNG, over the 1 MB limit
    cases = {
        "malformed JSON": (b'{"model": "tiny-llava", "messages": [', 400, None),
        "bad base64": (user("hi", "data:image/png;base64,@@@not-base64@@@"), 400, "base64"),
        "corrupt image": (user("hi", _corrupt_png(photos)), 400, "not a readable image"),
        "oversized image": (user("hi", big), 400, "over the limit"),
        "decompression bomb": (user("hi", _forged_bomb()), 400, "over the limit of 1000000 pixels"),
        "too many images": (user("hi", good, good, good), 400, "images per request"),
        "file URL": (user("hi", f"file://{media_dir}/cat.png"), 400, "local files is disabled"),
        "plain path": (user("hi", str(media_dir / "cat.png")), 400, "local files is disabled"),
        "http URL": (user("hi", "http://127.0.0.1:9/cat.png"), 400, "disabled"),
        "prompt over the context": (user("word " * 600), 400, "maximum context length"),
        "max_tokens over the context": ({"messages": user("hi"), "max_tokens": 100000}, 400, "context length"),
        "bad temperature": ({"messages": user("hi"), "temperature": 7}, 400, "temperature"),
        "n > 1": ({"messages": user("hi"), "n": 3}, 400, "n must be 1"),
        "bad role": ([{"role": "robot", "content": "hi"}], 400, "role"),
        "no messages": ({"messages": []}, 400, "messages"),
        "bad part": ([{"role": "user", "content": [{"type": "audio"}]}], 400, "text or image_url"),
    }
    for name, (body, status, words) in cases.items():
        if isinstance(body, list):
            body = {"messages": body}
        content = body if isinstance(body, bytes) else json.dumps({"model": "tiny-llava", **body}).encode()
        response = httpx.post(url + "/v1/chat/completions", content=content, timeout=30,
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] == "invalid_request_error", name
        if words:
            assert words in error["message"], (name, error["message"])
        assert httpx.get(url + "/health").status_code == 200
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny-llava", messages=user("hi"))
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError, match="local files"):
        client.chat.completions.create(model="tiny-llava", messages=user("hi", "file:///etc/passwd"))
    answer = client.chat.completions.create(model="tiny-llava", messages=user("hi", good), max_tokens=3)
    assert answer.choices[0].message.content is not None


def test_body_size_limit_and_a_disconnecting_client(tiny, photos):
    _, model, processor = tiny
    engine = Engine(model, processor)
    with running(create_app(engine, ServeConfig(model_name="m", max_body_bytes=2000))) as url:
        response = httpx.post(url + "/v1/chat/completions", json={"messages": user("x" * 5000)})
        assert response.status_code == 413 and "over the limit of 2000 bytes" in response.json()["error"]["message"]
        body = {"messages": user("Tell me everything."), "max_tokens": 400, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as stream:
            next(stream.iter_lines())  # the first event, then hang up
        deadline = time.time() + 30
        while engine.stats.requests["cancelled"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats.requests["cancelled"] == 1 and engine.stats.running == 0
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up waiting
            httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.time() + 30
        while engine.stats.requests["cancelled"] == 1 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats.requests["cancelled"] == 2
        assert httpx.get(url + "/health").status_code == 200
    engine.close()


def test_local_and_remote_images_only_when_allowed(tiny, photos, media_dir, tmp_path):
    _, model, processor = tiny
    engine = Engine(model, processor)
    (tmp_path / "cat.png").write_bytes((media_dir / "cat.png").read_bytes())

    class Images(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}"
    policy = MediaPolicy(allowed_local_media_path=media_dir, allow_remote_images=True)
    params = SamplingParams(max_new_tokens=6)
    prompt, params.stop = chat_prompt(processor, [{"role": "user", "content": f"<image>\n{QUESTION}"}])
    expected = generate_text(model, processor, [prompt], [photos["wide"].convert("RGB")], params)[0].strip()
    try:
        with running(create_app(engine, ServeConfig(model_name="m", media=policy))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for source in (f"file://{media_dir}/cat.png", "cat.png", f"{remote}/cat.png"):
                answer = client.chat.completions.create(model="m", messages=user(QUESTION, source), max_tokens=6,
                                                        temperature=0)
                assert answer.choices[0].message.content == expected, source
            for source, words in ((f"file://{media_dir}/../{media_dir.name}/../secret.png", "outside"),
                                  (f"file://{media_dir}/link.png", "outside"),
                                  (f"file://{media_dir}/missing.png", "no such file"),
                                  (f"{remote}/missing.png", "HTTP 404")):
                with pytest.raises(openai.BadRequestError, match=words):
                    client.chat.completions.create(model="m", messages=user("hi", source))
    finally:
        files.shutdown()
        engine.close()


def test_64_concurrent_streaming_clients(server, tiny, photos):
    url, engine = server
    _, model, processor = tiny
    choices = [(QUESTION, "wide"), ("Describe it.", "tall"), ("Hello there", None), (QUESTION, "square")]
    params = SamplingParams(max_new_tokens=10)
    expected = {}
    for question, image in choices:
        content = f"<image>\n{question}" if image else question
        prompt, params.stop = chat_prompt(processor, [{"role": "user", "content": content}])
        expected[(question, image)] = generate_text(model, processor, [prompt],
                                                    [photos[image]] if image else None, params)[0].strip()
    urls = {name: data_url(photos[name]) for name in ("wide", "tall", "square")}

    async def one(client, i):
        question, image = choices[i % len(choices)]
        stream = await client.chat.completions.create(
            model="tiny-llava", messages=user(question, *([urls[image]] if image else [])), max_tokens=10,
            temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def everyone():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    steps_before = engine.stats.decode_steps
    answers = asyncio.run(everyone())
    assert answers == [expected[choices[i % len(choices)]] for i in range(64)]
    assert engine.stats.decode_steps - steps_before < 64 * 10 / 4  # they really shared decode steps



def test_the_serve_command(tiny, photos):
    folder, _, _ = tiny
    port = free_port()
    env = {**os.environ, "LLAVA_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "llava", "serve", "--model", str(folder), "--port", str(port),
                                "--served-model-name", "cmd", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        assert client.models.list().data[0].id == "cmd"
        answer = client.chat.completions.create(model="cmd", messages=user("hi", data_url(photos["square"])),
                                                max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
    finally:
        process.terminate()
        process.wait(timeout=30)
