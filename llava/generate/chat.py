"""ChatSession: a multi-turn conversation with one model, in the checkpoint's template."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..data.conversation import stop_strings
from .generate import generate_text
from .sampling import SamplingParams


def chat_prompt(processor, messages: list[dict], conv_mode: str | None = None) -> tuple[str, list[str]]:
    """(prompt, the template's stop strings) for messages whose content has image tokens inline."""
    mode = conv_mode or processor.conv_mode
    prompt, _ = processor.build_prompt(messages, conv_mode=mode)
    return prompt, stop_strings(mode)


class ChatSession:
    """Keeps the turns and images so far; each `ask` renders the whole conversation and answers.

    As in the original LLaVA CLI, an image is attached to the user turn it arrives with, its
    image token placed before the text.
    """

    def __init__(self, model, processor, conv_mode: str | None = None, params: SamplingParams | None = None):
        self.model = model
        self.processor = processor
        self.conv_mode = conv_mode or processor.conv_mode
        self.params = params or SamplingParams()
        self.messages: list[dict] = []
        self.images: list = []

    def ask(self, text: str, image=None, on_text: Callable[[str], None] | None = None) -> str:
        content = text if image is None else f"{self.processor.image_token}\n{text}"
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + ([image] if image is not None else [])
        prompt, stop = chat_prompt(self.processor, messages, self.conv_mode)
        params = dataclasses.replace(self.params, stop=self.params.stop + stop)
        callback = (lambda _row, delta: on_text(delta)) if on_text is not None else None
        answer = generate_text(self.model, self.processor, [prompt], images, params, on_text=callback)[0]
        answer = answer.strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images = images
        return answer
