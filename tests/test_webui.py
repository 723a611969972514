"""`llava webui`: in Debian's chromium (driven by Playwright) a user uploads an image, asks, and
reads the streamed answer, which equals the engine's; regenerate and clear work. The page talks
to a running `llava serve` just as well."""

import shutil
from pathlib import Path

import pytest

import llava
from llava.generate.chat import chat_prompt
from llava.generate.engine import Engine
from llava.generate.sampling import SamplingParams
from llava.serve.webui import ApiBackend, EngineBackend, Turn, build_ui
from llava.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
IMAGE = ROOT / "examples" / "images" / "shapes.png"
QUESTION = "What shapes can you see in the image?"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# flags for a machine with no network and no screen (Chromium otherwise keeps dialling out)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]



@pytest.fixture(scope="module")
def engine():
    model, processor = llava.load_pretrained(DEMO, device="cpu")
    engine = Engine(model, processor)
    yield engine
    engine.close()


def _greedy(engine, question=QUESTION, max_tokens=64):
    from llava.data.images import load_image

    processor = engine.processor
    prompt, stop = chat_prompt(processor, [{"role": "user", "content": f"{processor.image_token}\n{question}"}])
    params = SamplingParams(max_new_tokens=max_tokens, stop=stop)
    return engine.submit(prompt, [load_image(IMAGE)], params).result().text.strip()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_browser_upload_ask_and_read_the_streamed_answer(engine, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    expected = _greedy(engine)
    port = free_port()
    page_app = build_ui(EngineBackend(engine))
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    shot = tmp_path / "webui.png"
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#image input[type=file]", state="attached", timeout=60_000)
            for slider, value in (("#temperature", "0"), ("#max_tokens", "64")):
                box = page.locator(f"{slider} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.set_input_files("#image input[type=file]", str(IMAGE))
            page.wait_for_selector("#image img", timeout=30_000)
            # record every length the answer shows, to see it arrive in pieces
            page.evaluate("""() => { window.lengths = [];
                new MutationObserver(() => { const bots = document.querySelectorAll('#chatbot .bot-row');
                  if (bots.length) window.lengths.push(bots[bots.length - 1].innerText.length); })
                .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#question textarea", QUESTION)
            page.click("#send")
            answer = _wait_for_answer(page, expected)
            assert answer == expected
            lengths = page.evaluate("window.lengths")
            assert len(set(lengths)) > 2, lengths  # streamed, not shown at once
            assert page.locator("#chatbot img").count() >= 1  # the image sits above the question
            page.screenshot(path=str(shot), full_page=True)

            page.click("#regenerate")
            page.wait_for_timeout(500)
            assert _wait_for_answer(page, expected) == expected
            assert page.locator("#chatbot .bot-row").count() == 1
            page.click("#clear")
            page.wait_for_function("() => document.querySelectorAll('#chatbot .bot-row').length === 0",
                                   timeout=30_000)
            browser.close()
    finally:
        page_app.close()
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def _wait_for_answer(page, expected: str) -> str:
    page.wait_for_function(
        """(want) => { const bots = document.querySelectorAll('#chatbot .bot-row');
                       return bots.length && bots[bots.length - 1].innerText.trim() === want; }""",
        arg=expected, timeout=120_000)
    return page.locator("#chatbot .bot-row").last.inner_text().strip()


def test_the_page_talks_to_a_running_server_like_to_the_engine(engine):
    from llava.serve.api import ServeConfig, create_app
    from llava.testing import serve_in_thread as running

    turns = [Turn("user", QUESTION, str(IMAGE))]
    params = dict(max_new_tokens=24, temperature=0.0, top_p=1.0)
    local = "".join(EngineBackend(engine).stream(turns, SamplingParams(**params))).strip()
    with running(create_app(engine, ServeConfig(model_name="demo"))) as url:
        remote = "".join(ApiBackend(url + "/v1").stream(turns, SamplingParams(**params))).strip()
        # a second turn without a new image, after the first answer
        turns += [Turn("assistant", remote), Turn("user", "What colour is the circle?")]
        follow_up = "".join(ApiBackend(url + "/v1").stream(turns, SamplingParams(**params)))
    assert remote == local and local
    assert follow_up.strip() == "".join(EngineBackend(engine).stream(turns, SamplingParams(**params))).strip()
