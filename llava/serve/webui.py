"""The web UI: a Gradio chat page (image upload, multi-turn, streaming, sampling settings, regenerate,
clear) on the in-process engine or on a running `llava serve` through its OpenAI API."""

from __future__ import annotations

import base64
import mimetypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local chat page

import gradio as gr  # noqa: E402

from ..core.errors import LlavaError
from ..data.images import load_image
from ..generate.chat import chat_prompt
from ..generate.sampling import SamplingParams


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str
    image: str | None = None  # file path of an image sent with this user turn


class EngineBackend:
    """Generates in this process on an Engine."""

    def __init__(self, engine, conv_mode: str | None = None):
        self.engine = engine
        self.conv_mode = conv_mode
        self.name = "in-process engine"

    def stream(self, turns: list[Turn], params: SamplingParams) -> Iterator[str]:
        token = self.engine.processor.image_token
        messages = [{"role": t.role, "content": f"{token}\n{t.text}" if t.image else t.text} for t in turns]
        images = [load_image(t.image) for t in turns if t.image]
        prompt, stop = chat_prompt(self.engine.processor, messages, self.conv_mode)
        params.stop = params.stop + stop
        handle = self.engine.submit(prompt, images, params)
        try:
            yield from handle
        finally:
            handle.cancel()  # the page closed or the user pressed stop: free the batch slot


class ApiBackend:
    """Generates on a running `llava serve` (or any OpenAI-compatible server) with the openai client."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("LLAVA_API_KEY") or "none")
        self.model = model
        self.name = base_url

    def stream(self, turns: list[Turn], params: SamplingParams) -> Iterator[str]:
        import openai

        if self.model is None:
            self.model = self.client.models.list().data[0].id
        messages = []
        for t in turns:
            if t.image:
                mime = mimetypes.guess_type(t.image)[0] or "image/png"
                data = base64.b64encode(Path(t.image).read_bytes()).decode()
                content = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
                           {"type": "text", "text": t.text}]
            else:
                content = t.text
            messages.append({"role": t.role, "content": content})
        try:
            chunks = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, temperature=params.temperature,
                top_p=params.top_p, max_tokens=params.max_new_tokens)
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIStatusError as e:
            raise LlavaError(f"the server refused the request: {e.message}") from None
        except openai.APIConnectionError:
            raise LlavaError(f"cannot reach {self.name}") from None


def _chat_messages(turns: list[Turn]) -> list[dict]:
    """Turns -> Gradio chatbot messages (an image shows above the question it came with)."""
    out = []
    for t in turns:
        content = [{"path": t.image}, t.text] if t.image else t.text
        out.append({"role": t.role, "content": content})
    return out


def build_ui(backend) -> gr.Blocks:
    """The page; `backend.stream(turns, params)` yields answer text as it is generated."""

    def answer(turns: list[Turn], temperature, top_p, max_tokens):
        params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        reply = Turn("assistant", "")
        shown = turns + [reply]
        try:
            for delta in backend.stream(turns, params):
                reply.text += delta
                yield _chat_messages(shown), shown
        except LlavaError as e:
            raise gr.Error(str(e)) from None
        reply.text = reply.text.strip()
        yield _chat_messages(shown), shown

    def ask(text, image, turns, sent_image, temperature, top_p, max_tokens):
        text = (text or "").strip()
        if not text:
            raise gr.Error("type a question first")
        # an image goes with the turn it is first asked about, as in the original LLaVA demo
        new_image = image if image and image != sent_image else None
        turns = turns + [Turn("user", text, new_image)]
        for messages, state in answer(turns, temperature, top_p, max_tokens):
            yield messages, state, "", new_image or sent_image

    def regenerate(turns, temperature, top_p, max_tokens):
        if not turns:
            raise gr.Error("nothing to regenerate yet")
        turns = turns[:-1] if turns[-1].role == "assistant" else turns
        yield from answer(turns, temperature, top_p, max_tokens)

    with gr.Blocks(title="LLaVA") as page:
        gr.Markdown(f"## LLaVA: chat about an image\nBackend: {backend.name}")
        turns = gr.State([])
        sent_image = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", elem_id="image")
                temperature = gr.Slider(0.0, 2.0, value=0.2, step=0.05, label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top p", elem_id="top_p")
                max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens", elem_id="max_tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False,
                                          elem_id="question", scale=5)
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                with gr.Row():
                    again = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
        settings = [temperature, top_p, max_tokens]
        for trigger in (send.click, question.submit):
            trigger(ask, [question, image, turns, sent_image, *settings], [chatbot, turns, question, sent_image])
        again.click(regenerate, [turns, *settings], [chatbot, turns])
        clear.click(lambda: ([], [], None, None, ""), None, [chatbot, turns, sent_image, image, question])
    return page
