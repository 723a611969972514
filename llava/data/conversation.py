"""Conversation templates with the exact prompt strings of the original LLaVA, plus llama_3 and qwen_2.

`Conversation` keeps the original's fields and methods (`roles`, `append_message`, `get_prompt`,
`copy`), so `llava.conversation` can re-export it unchanged. `render` additionally returns the
character spans of the assistant turns (answer + end-of-turn separator): the only text that is
trained on. A checkpoint's own jinja chat_template is rendered by `render_chat_template`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, auto

from ..core.constants import DEFAULT_IMAGE_TOKEN
from ..core.errors import TemplateError


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()
    LLAMA_3 = auto()
    CHATML = auto()


@dataclass
class Conversation:
    """A template plus the messages so far; `messages` holds [role, text] pairs, text None = to generate."""

    system: str
    roles: tuple[str, str]
    messages: list = field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[[r, m] for r, m in self.messages])

    def dict(self) -> dict:
        return {"system": self.system, "roles": self.roles,
                "messages": [[r, m[0] if isinstance(m, tuple) else m] for r, m in self.messages],
                "offset": self.offset, "sep": self.sep, "sep2": self.sep2}

    @property
    def stop_str(self) -> str:
        """The string that ends an assistant turn (what the original CLI stops generation on)."""
        if self.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2):
            return self.sep2
        return self.sep

    def get_prompt(self) -> str:
        return self.render()[0]

    def render(self) -> tuple[str, list[tuple[int, int]]]:
        """(prompt, spans): spans are [start, end) of each assistant answer with its end-of-turn text."""
        messages = _with_image_first(self.messages, self.roles, self.version)
        out = _Builder()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            out.add(self.system + self.sep)
            for role, message in messages:
                if message:
                    out.add(role + ":")
                    out.add(" " + message + self.sep, answer=role == self.roles[1])
                else:
                    out.add(role + ":")
        elif style == SeparatorStyle.TWO:
            seps = [self.sep, self.sep2]
            out.add(self.system + seps[0])
            for i, (role, message) in enumerate(messages):
                if message:
                    out.add(role + ":")
                    out.add(" " + message + seps[i % 2], answer=role == self.roles[1])
                else:
                    out.add(role + ":")
        elif style == SeparatorStyle.MPT:
            out.add(self.system + self.sep)
            for role, message in messages:
                out.add(role)
                if message:
                    out.add(message + self.sep, answer=role == self.roles[1])
        elif style == SeparatorStyle.LLAMA_2:
            for i, (role, message) in enumerate(messages):
                if i == 0 and (not message or role != self.roles[0]):
                    raise TemplateError(f"template {self.version!r}: the first message must be a user message")
                if not message:
                    continue
                if i % 2 == 0:
                    if i == 0:
                        message = (f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if self.system else "") + message
                    out.add(self.sep + f"[INST] {message} [/INST]")
                else:
                    out.add(" " + message + " " + self.sep2, answer=True)
            out.lstrip(self.sep)
        elif style == SeparatorStyle.PLAIN:
            seps = [self.sep, self.sep2 or self.sep]
            out.add(self.system)
            for i, (role, message) in enumerate(messages):
                if message:
                    out.add(message + seps[i % 2], answer=i % 2 == 1)
        elif style == SeparatorStyle.LLAMA_3:
            def header(role):
                return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            if self.system:
                out.add(header("system") + self.system + self.sep)
            for role, message in messages:
                out.add(header(role))
                if message:
                    out.add(message + self.sep, answer=role == self.roles[1])
        elif style == SeparatorStyle.CHATML:
            if self.system:
                out.add(self.system + self.sep + "\n")
            for role, message in messages:
                out.add(role + "\n")
                if message:
                    out.add(message + self.sep, answer=role == self.roles[1])
                    out.add("\n")
        else:  # pragma: no cover - the enum is closed
            raise TemplateError(f"unknown separator style {style}")
        return out.text, out.spans


class _Builder:
    """Concatenates prompt pieces and records where the assistant answers are."""

    def __init__(self):
        self.text, self.spans = "", []

    def add(self, piece: str, answer: bool = False) -> None:
        if answer:
            self.spans.append((len(self.text), len(self.text) + len(piece)))
        self.text += piece

    def lstrip(self, chars: str) -> None:
        # str.lstrip strips a set of characters, exactly as the original does with "<s>"
        stripped = self.text.lstrip(chars) if chars else self.text
        cut = len(self.text) - len(stripped)
        self.text = stripped
        self.spans = [(max(0, a - cut), b - cut) for a, b in self.spans]


def _with_image_first(messages, roles, version):
    """The original's handling of a first message given as (text, image, mode): image token in front."""
    if not messages or not isinstance(messages[0][1], tuple):
        return [(r, m) for r, m in messages]
    messages = [(r, m) for r, m in messages]
    role, (text, *_rest) = messages[0]
    if "mmtag" in version:
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        messages[0] = (role, text)
        messages.insert(0, (roles[0], "<Image><image></Image>"))
        messages.insert(1, (roles[1], "Received."))
    elif not text.startswith(DEFAULT_IMAGE_TOKEN):
        messages[0] = (role, DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip())
    else:
        messages[0] = (role, text)
    return [(r, m[0] if isinstance(m, tuple) else m) for r, m in messages]


_VICUNA_V0_EXAMPLE = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    ("Assistant",
     "Renewable energy sources are those that can be replenished naturally in a relatively "
     "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
     "Non-renewable energy sources, on the other hand, are finite and will eventually be "
     "depleted, such as coal, oil, and natural gas. Here are some key differences between "
     "renewable and non-renewable energy sources:\n"
     "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
     "energy sources are finite and will eventually run out.\n"
     "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
     "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
     "and other negative effects.\n"
     "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
     "have lower operational costs than non-renewable sources.\n"
     "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
     "locations than non-renewable sources.\n"
     "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
     "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
     "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
     "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"),
)
_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_MMTAG_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant is able to understand the visual content that the user provides, and assist the "
                 "user with a variety of tasks using natural language."
                 "The visual content will be provided with the following format: <Image>visual content</Image>.")
_LLAVA_SYSTEM = ("You are a helpful language and vision assistant. "
                 "You are able to understand the visual content that the user provides, "
                 "and assist the user with a variety of tasks using natural language.")
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.")

conv_vicuna_v0 = Conversation(system=_HUMAN_SYSTEM, roles=("Human", "Assistant"),
                              messages=[list(m) for m in _VICUNA_V0_EXAMPLE], offset=2,
                              sep_style=SeparatorStyle.SINGLE, sep="###")
conv_vicuna_v1 = Conversation(system=_USER_SYSTEM, roles=("USER", "ASSISTANT"), version="v1",
                              sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>")
conv_llama_2 = Conversation(system=_LLAMA_2_SYSTEM, roles=("USER", "ASSISTANT"), version="llama_v2",
                            sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>")
conv_llava_llama_2 = Conversation(system=_LLAVA_SYSTEM, roles=("USER", "ASSISTANT"), version="llama_v2",
                                  sep_style=SeparatorStyle.LLAMA_2, sep="<s>", sep2="</s>")
conv_mistral_instruct = Conversation(system="", roles=("USER", "ASSISTANT"), version="llama_v2",
                                     sep_style=SeparatorStyle.LLAMA_2, sep="", sep2="</s>")
conv_chatml_direct = Conversation(system="<|im_start|>system\nAnswer the questions.",
                                  roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt",
                                  sep_style=SeparatorStyle.MPT, sep="<|im_end|>")
conv_mpt = Conversation(system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                               "The assistant gives helpful and honest answers.",
                        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt",
                        sep_style=SeparatorStyle.MPT, sep="<|im_end|>")
conv_llava_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n")
conv_llava_v0 = Conversation(system=_HUMAN_SYSTEM, roles=("Human", "Assistant"),
                             sep_style=SeparatorStyle.SINGLE, sep="###")
conv_llava_v0_mmtag = Conversation(system=_MMTAG_SYSTEM, roles=("Human", "Assistant"),
                                   sep_style=SeparatorStyle.SINGLE, sep="###", version="v0_mmtag")
conv_llava_v1 = Conversation(system=_HUMAN_SYSTEM, roles=("USER", "ASSISTANT"), version="v1",
                             sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>")
conv_llava_v1_mmtag = Conversation(system=_MMTAG_SYSTEM, roles=("USER", "ASSISTANT"),
                                   sep_style=SeparatorStyle.TWO, sep=" ", sep2="</s>", version="v1_mmtag")
# LLaVA-NeXT's Llama-3 template: the Llama-3 chat format (BOS comes from the tokenizer).
conv_llava_llama_3 = Conversation(system=_LLAVA_SYSTEM, roles=("user", "assistant"), version="llama_v3",
                                  sep_style=SeparatorStyle.LLAMA_3, sep="<|eot_id|>")
# LLaVA-NeXT's Qwen template: ChatML, as Qwen2's own chat template writes it.
conv_qwen_2 = Conversation(system="<|im_start|>system\nYou are a helpful assistant.",
                           roles=("<|im_start|>user", "<|im_start|>assistant"), version="qwen",
                           sep_style=SeparatorStyle.CHATML, sep="<|im_end|>")

default_conversation = conv_vicuna_v1
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
    "llama_3": conv_llava_llama_3,
    "llava_llama_3": conv_llava_llama_3,
    "qwen_2": conv_qwen_2,
    "qwen_1_5": conv_qwen_2,
}

# The name for "render with the checkpoint's own jinja chat_template".
CHAT_TEMPLATE = "chat_template"


def get_template(name: str) -> Conversation:
    """A fresh copy of the named template."""
    try:
        return conv_templates[name].copy()
    except KeyError:
        known = ", ".join(sorted(conv_templates) + [CHAT_TEMPLATE])
        raise TemplateError(f"unknown conversation template {name!r}; known: {known}") from None


def build_conversation(name: str, messages: list[dict], system: str | None = None) -> Conversation:
    """A template filled with messages [{"role": "user"|"assistant"|"system", "content": str}]."""
    conv = get_template(name)
    conv.messages = []  # the vicuna_v0 example turns are for demos only, never for chat
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            conv.system = content if system is None else system
            continue
        if role not in ("user", "assistant"):
            raise TemplateError(f"message role {role!r} is not 'user', 'assistant' or 'system'")
        if (role == "user") != (len(conv.messages) % 2 == 0):
            raise TemplateError(f"messages must alternate user/assistant starting with user; got {role!r} "
                                f"at turn {len(conv.messages) + 1}")
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], content)
    if system is not None:
        conv.system = system
    return conv


def render(name: str, messages: list[dict], add_generation_prompt: bool = True,
           system: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Prompt text and assistant spans for messages in a named original-style template."""
    conv = build_conversation(name, messages, system)
    if add_generation_prompt and len(conv.messages) % 2 == 1:
        conv.append_message(conv.roles[1], None)
    return conv.render()


def render_chat_template(render_fn, messages: list[dict], add_generation_prompt: bool = True
                         ) -> tuple[str, list[tuple[int, int]]]:
    """Prompt and assistant spans through a jinja chat template, `render_fn(messages, add_generation_prompt)`.

    An assistant span runs from the end of the prompt that asks for that answer to the end of the
    prompt that contains it; the template must render each conversation as a prefix of the next.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_fn(messages[:i], True)
        upto = render_fn(messages[:i + 1], False)
        if not upto.startswith(before):
            raise TemplateError("the chat_template does not render earlier turns as a prefix of later ones; "
                                "use a named --conv-mode for training")
        spans.append((len(before), len(upto)))
    text = render_fn(messages, add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"))
    return text, spans


def stop_strings(name: str) -> list[str]:
    """Strings that end an answer in this template (besides the tokenizer's EOS)."""
    if name == CHAT_TEMPLATE:
        return []
    stop = get_template(name).stop_str
    return [stop] if stop else []
