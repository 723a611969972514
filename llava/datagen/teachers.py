"""Teachers: an OpenAI-compatible chat endpoint, and an offline rule-based writer for the shapes world.

Both answer `respond(kind, context) -> str` in the same reply format, so one parser checks both."""

from __future__ import annotations

import os
import random
import threading
import time

from ..core.errors import LlavaError
from ..data.shapes import COLOURS, NUMBERS, SHAPES, join_words, position_name, position_phrase
from .context import Context
from .prompts import messages


class TeacherUnavailable(LlavaError):
    """The endpoint kept failing (connection, timeout, 429, 5xx) after every retry."""


class OpenAITeacher:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, SGLang, llama.cpp, Ollama).

    base_url / api_key / model default to OPENAI_BASE_URL, OPENAI_API_KEY and LLAVA_TEACHER_MODEL.
    Transport failures are retried `max_retries` times with exponential backoff (and jitter);
    `stats` counts requests, retries and tokens."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 temperature: float = 0.7, max_tokens: int = 1024, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 1.0):
        from openai import OpenAI

        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        self.model = model or os.environ.get("LLAVA_TEACHER_MODEL")
        if not self.model:
            raise LlavaError("no teacher model: give --model or set LLAVA_TEACHER_MODEL")
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff = max_retries, backoff
        self.stats = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()  # respond() runs in several threads at once

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self.stats[key] += amount

    def respond(self, kind: str, context: Context) -> str:
        return self.complete(messages(kind, context))

    def complete(self, chat: list[dict], temperature: float | None = None) -> str:
        """The reply to OpenAI-style messages, with the retries described above."""
        import openai

        retryable = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                     openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            self._count(requests=1)
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=chat, max_tokens=self.max_tokens,
                    temperature=self.temperature if temperature is None else temperature)
            except retryable as e:
                if attempt == self.max_retries:
                    raise TeacherUnavailable(f"teacher at {self.client.base_url} failed {attempt + 1} times: "
                                             f"{type(e).__name__}: {e}") from None
                self._count(retries=1)
                time.sleep(self.backoff * 2 ** attempt * (0.5 + random.random()))
                continue
            except openai.APIStatusError as e:  # 4xx other than 429: retrying will not help
                raise TeacherUnavailable(f"teacher at {self.client.base_url} refused the request: "
                                         f"{e.status_code} {e.message}") from None
            if reply.usage is not None:
                self._count(prompt_tokens=reply.usage.prompt_tokens or 0,
                            completion_tokens=reply.usage.completion_tokens or 0)
            if not reply.choices:
                return ""
            return reply.choices[0].message.content or ""
        raise AssertionError("unreachable")


class RuleTeacher:
    """Writes the three kinds for shapes-world contexts from the boxes alone (name = [size] colour shape,
    position from the box centre on a 3x3 grid). Deterministic per (seed, kind, context id)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.stats = {"requests": 0}

    def respond(self, kind: str, context: Context) -> str:
        self.stats["requests"] += 1
        rng = random.Random(f"{self.seed}-{kind}-{context.id}")
        objects = [_object(box) for box in context.boxes]
        if not objects:
            raise LlavaError(f"context {context.id}: the rule teacher needs boxes (give the instances file)")
        background = next((c.split(" on ", 1)[1].split(":")[0].rstrip(".") for c in context.captions
                           if " on a " in c and "background" in c), None)
        write = {"conversation": _conversation, "detail": _detail, "complex_reasoning": _complex}[kind]
        return write(objects, background, rng)


def _object(box: dict) -> dict:
    x1, y1, x2, y2 = box["bbox"]
    column = min(2, int((x1 + x2) / 2 * 3))
    row = min(2, int((y1 + y2) / 2 * 3))
    colour = box.get("colour") or box.get("color") or ""
    return {"shape": box["category"], "colour": colour, "size": box.get("size", ""),
            "name": f"{colour} {box['category']}".strip(), "position": position_name(row, column),
            "area": (x2 - x1) * (y2 - y1)}


def _a(words: str) -> str:
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def _where(position: str) -> str:
    return position_phrase(position)


def _qa(pairs: list[tuple[str, str]]) -> str:
    return "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}" for q, a in pairs)


def _listing(objects: list[dict], sizes: bool = True) -> str:
    return join_words([f"{_a((o['size'] + ' ' if sizes and o['size'] else '') + o['name'])} {_where(o['position'])}"
                       for o in objects])


def _conversation(objects, background, rng: random.Random) -> str:
    n = len(objects)
    pool = []
    pool.append(("What shapes can you see in the image?",
                 f"I can see {NUMBERS[n]} {'shape' if n == 1 else 'shapes'}: {_listing(objects)}."))
    pool.append((rng.choice(["How many shapes are there in the image?", "How many objects are in the picture?"]),
                 f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {'shape' if n == 1 else 'shapes'} in the image."))
    for o in rng.sample(objects, min(2, n)):
        same_shape = [p for p in objects if p["shape"] == o["shape"]]
        if len(same_shape) == 1:
            pool.append((f"What colour is the {o['shape']}?", f"The {o['shape']} is {o['colour']}."))
        pool.append((f"Where is the {o['name']}?", f"The {o['name']} is {_where(o['position'])} of the image."
                     if o["position"] != "center" else f"The {o['name']} is in the center of the image."))
        if o["size"]:
            pool.append((f"Is the {o['name']} big or small?",
                         f"The {o['name']} is {'large' if o['size'] == 'large' else 'small'}."))
    present = {o["name"] for o in objects}
    guess = f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
    if guess in present:
        o = next(p for p in objects if p["name"] == guess)
        pool.append((f"Is there {_a(guess)} in the image?", f"Yes, there is {_a(guess)} {_where(o['position'])}."))
    else:
        pool.append((f"Is there {_a(guess)} in the image?", f"No, there is no {guess} in the image."))
    if n >= 2:
        a, b = rng.sample(objects, 2)
        ax, bx = _column(a["position"]), _column(b["position"])
        if ax != bx:
            left, right = (a, b) if ax < bx else (b, a)
            pool.append((f"Which is further to the left, the {a['name']} or the {b['name']}?",
                         f"The {left['name']} is further to the left than the {right['name']}."))
    if background:
        pool.append(("What does the background look like?", f"The shapes are on {background}."))
    rng.shuffle(pool)
    return _qa(pool[:rng.randint(3, min(6, len(pool)))])


def _column(position: str) -> int:
    return 0 if "left" in position else 2 if "right" in position else 1


def _detail(objects, background, rng: random.Random) -> str:
    n = len(objects)
    ordered = sorted(objects, key=lambda o: (_row(o["position"]), _column(o["position"])))
    opening = rng.choice(["The image shows", "This picture contains", "In this image there"
                          + (" is" if n == 1 else " are")])
    sentences = [f"{opening} {NUMBERS[n]} {'shape' if n == 1 else 'shapes'}"
                 + (f" on {background}." if background else ".")]
    for o in ordered:
        where = _where(o["position"])
        size = f"{o['size']} " if o["size"] else ""
        sentences.append(rng.choice([f"{where.capitalize()} there is {_a(size + o['name'])}.",
                                     f"{_a(size + o['name']).capitalize()} is {where}."]))
    if n >= 2:
        large = [o for o in objects if o["size"] == "large"]
        if large and len(large) < n:
            sentences.append(f"The {join_words([o['name'] for o in large])} "
                             f"{'is' if len(large) == 1 else 'are'} larger than the others.")
        colours = {o["colour"] for o in objects}
        if len(colours) == 1:
            sentences.append(f"All of the shapes are {objects[0]['colour']}.")
        else:
            sentences.append(f"The shapes come in {NUMBERS[len(colours)]} different colours.")
    else:
        sentences.append("The rest of the image is empty.")
    return " ".join(sentences)


def _row(position: str) -> int:
    return 0 if "top" in position else 2 if "bottom" in position else 1


def _complex(objects, background, rng: random.Random) -> str:
    n = len(objects)
    options = []
    o = rng.choice(objects)
    rest = [p for p in objects if p is not o]
    if rest:
        options.append((f"If the {o['name']} were removed, how many shapes would be left, and what would they be?",
                        f"There are {NUMBERS[n]} shapes in the image. Removing the {o['name']} "
                        f"{_where(o['position'])} leaves {NUMBERS[n - 1]}: {_listing(rest, sizes=False)}."))
    else:
        options.append((f"If the {o['name']} were removed, what would be left in the image?",
                        f"The {o['name']} is the only shape in the image, so removing it would leave just the "
                        f"{background or 'empty background'}."))
    colours = sorted({p["colour"] for p in objects})
    if n >= 2:
        if len(colours) == 1:
            answer = f"Yes. All {NUMBERS[n]} shapes are {colours[0]}."
        else:
            answer = (f"No. The shapes have {NUMBERS[len(colours)]} different colours: "
                      f"{join_words([p['colour'] + ' for the ' + p['shape'] for p in objects])}.")
        options.append(("Do all of the shapes in the image have the same colour?", answer))
        top = min(objects, key=lambda p: (_row(p["position"]), _column(p["position"])))
        options.append(("Which shape would you read first if you scanned the image from top to bottom, left to "
                        "right?", f"The {top['name']}, because it is {_where(top['position'])}, nearer the top "
                        "left than any other shape."))
    sizes = {p["size"] for p in objects}
    if "large" in sizes and "small" in sizes:
        large = [p["name"] for p in objects if p["size"] == "large"]
        options.append(("Which of the shapes are the large ones?",
                        f"The large {'shape is' if len(large) == 1 else 'shapes are'} the {join_words(large)}; "
                        f"the other {'shape is' if n - len(large) == 1 else 'shapes are'} small."))
    question, answer = rng.choice(options)
    return _qa([(question, answer)])
