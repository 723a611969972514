"""Generation against transformers' generate and logits processors; stop strings and streaming."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import llava
from llava.generate.chat import ChatSession
from llava.generate.generate import generate_text
from llava.generate.sampling import SamplingParams, apply_repetition_penalty, filter_top_k_top_p
from llava.generate.stopping import TextStream

PROMPTS = ["USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nHow many shapes? ASSISTANT:",
           "USER: Tell me a story. ASSISTANT:"]


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_batched_greedy_equals_transformers_generate(checkpoints, photos, name):
    folder = checkpoints(name)
    model, processor = llava.load_pretrained(folder, device="cpu")
    cls = LlavaNextForConditionalGeneration if name == "llava_next" else LlavaForConditionalGeneration
    hf = cls.from_pretrained(folder).eval()
    inputs = processor(text=PROMPTS, images=[photos["wide"], photos["tall"]], return_tensors="pt", padding=True,
                       padding_side="left")
    ours = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    theirs = hf.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)


def test_batch_answers_equal_one_at_a_time(checkpoints, photos):
    model, processor = llava.load_pretrained(checkpoints("llava_next"), device="cpu")
    images = [photos["wide"], photos["tall"]]
    params = SamplingParams(max_new_tokens=8)
    batched = generate_text(model, processor, PROMPTS, images, params)
    alone = [generate_text(model, processor, [PROMPTS[0]], [images[0]], params)[0],
             generate_text(model, processor, [PROMPTS[1]], [images[1]], params)[0],
             generate_text(model, processor, [PROMPTS[2]], None, params)[0]]
    assert batched == alone


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(checkpoints, photos):
    model, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    args = (model, processor, PROMPTS[:1], [photos["wide"]])
    a = generate_text(*args, SamplingParams(max_new_tokens=12, temperature=1.5, seed=7))
    b = generate_text(*args, SamplingParams(max_new_tokens=12, temperature=1.5, seed=7))
    assert a == b
    greedy = generate_text(*args, SamplingParams(max_new_tokens=12))
    assert generate_text(*args, SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1, seed=3)) == greedy


def test_logits_transforms_equal_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seen = torch.randint(0, 50, (3, 9))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)
    for top_k, top_p in [(5, 1.0), (0, 0.8), (7, 0.5)]:
        expected = logits.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(seen, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(seen, expected)
        torch.testing.assert_close(filter_top_k_top_p(logits, top_k, top_p), expected)


class _CharTokenizer:
    """One character per token; id 0 is a special token rendered as <eos>."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i == 0 and skip_special_tokens else "<eos>" if i == 0 else chr(i) for i in ids)


def test_stream_holds_back_a_possible_stop_string_and_cuts_it():
    stream = TextStream(_CharTokenizer(), stop=["###"])
    shown = [stream.push(ord(c)) for c in "ab#c##"]
    assert "".join(shown) == "ab#c"  # '##' might still become '###'
    assert stream.push(ord("#")) == "" and stream.stopped and stream.text == "ab#c"
    special = TextStream(_CharTokenizer(), stop=["<eos>"])
    assert special.push(ord("x")) == "x" and special.push(0) == "" and special.stopped


def test_chat_session_streams_what_it_returns_and_keeps_turns(checkpoints, photos):
    model, processor = llava.load_pretrained(checkpoints("llava_next"), device="cpu")
    session = ChatSession(model, processor, conv_mode="llava_v1", params=SamplingParams(max_new_tokens=6))
    pieces = []
    first = session.ask("What is this?", photos["square"], on_text=pieces.append)
    assert "".join(pieces).strip() == first
    session.ask("And the colour?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"] == "<image>\nWhat is this?" and len(session.images) == 1


def test_stop_strings_without_a_tokenizer_are_refused(checkpoints):
    model, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    ids = processor(text="USER: hi ASSISTANT:", return_tensors="pt")["input_ids"]
    with pytest.raises(llava.core.errors.LlavaError, match="stop strings need the tokenizer"):
        model.generate(ids, max_new_tokens=2, stop_strings=["###"])
    with_tokenizer = model.generate(ids, max_new_tokens=3, tokenizer=processor.tokenizer, stop_strings=["###"])
    assert with_tokenizer.shape[1] <= ids.shape[1] + 3
