"""Parsing and checking a teacher's reply, and turning it into a LLaVA training record."""

from __future__ import annotations

import random
import re

from .context import Context
from .prompts import DETAIL_INSTRUCTIONS

_COORDINATES = re.compile(r"\[\s*0?\.\d+\s*,\s*0?\.\d+")
_REFUSALS = ("i'm sorry", "i am sorry", "as an ai", "i cannot", "i can't")


class RejectedResponse(ValueError):
    """The teacher's reply cannot be used; the message says why."""


def _check_text(text: str, what: str) -> str:
    text = text.strip()
    if not text:
        raise RejectedResponse(f"empty {what}")
    if _COORDINATES.search(text):
        raise RejectedResponse(f"{what} mentions box coordinates")
    if any(text.lower().startswith(r) for r in _REFUSALS):
        raise RejectedResponse(f"{what} is a refusal")
    return text


def parse_exchanges(text: str) -> list[tuple[str, str]]:
    """`Question:\\n...\\n===\\nAnswer:\\n...` blocks -> [(question, answer), ...]."""
    blocks = [b.strip() for b in re.split(r"^\s*===+\s*$", text.strip(), flags=re.MULTILINE) if b.strip()]
    pairs, question = [], None
    for block in blocks:
        match = re.match(r"^(Question|Answer)\s*:\s*", block, flags=re.IGNORECASE)
        if not match:
            raise RejectedResponse(f"a block starts with neither 'Question:' nor 'Answer:': {block[:40]!r}")
        body = block[match.end():].strip()
        if match.group(1).lower() == "question":
            if question is not None:
                raise RejectedResponse("two questions in a row")
            question = _check_text(body, "question")
        else:
            if question is None:
                raise RejectedResponse("an answer without a question")
            pairs.append((question, _check_text(body, "answer")))
            question = None
    if question is not None:
        raise RejectedResponse("the last question has no answer")
    if not pairs:
        raise RejectedResponse("no Question/Answer exchange found")
    return pairs


def parse_response(kind: str, text: str) -> list[tuple[str, str]]:
    """The (question, answer) turns a reply gives for `kind`; raises RejectedResponse."""
    if not isinstance(text, str):
        raise RejectedResponse("the reply has no text")
    if kind == "conversation":
        return parse_exchanges(text)
    if kind == "complex_reasoning":
        pairs = parse_exchanges(text)
        if len(pairs) != 1:
            raise RejectedResponse(f"expected one question, got {len(pairs)}")
        return pairs
    if kind == "detail":
        if re.search(r"^\s*(Question|Answer)\s*:", text, flags=re.IGNORECASE | re.MULTILINE):
            raise RejectedResponse("a description written as questions and answers")
        body = _check_text(text, "description")
        if len(body.split()) < 8:
            raise RejectedResponse(f"description too short ({len(body.split())} words)")
        return [("", body)]
    raise ValueError(f"unknown kind {kind!r}")


def to_record(kind: str, context: Context, turns: list[tuple[str, str]], rng: random.Random) -> dict:
    """A LLaVA record: the image token goes before or after the first question (LLaVA places it at
    random), and a detail record's question is drawn from the detail instructions."""
    if kind == "detail":
        turns = [(rng.choice(DETAIL_INSTRUCTIONS), turns[0][1])]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": context.id, "image": context.image, "conversations": conversations}
