"""Templates give the original LLaVA's exact prompt strings; labels train only the assistant answers."""

import pytest
from transformers import AutoProcessor

import llava
from llava.core.constants import IGNORE_INDEX
from llava.core.errors import TemplateError, TokenizationMismatchError
from llava.data.conversation import conv_templates, render

LLAVA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                "that the user provides, and assist the user with a variety of tasks using natural language.")
HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")
USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.")
LLAMA_2 = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
           "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
           "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
           "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
           "something not correct. If you don't know the answer to a question, please don't share false information.")
Q1, A1, Q2 = "<image>\nWhat is this?", "A cat.", "What colour?"

EXPECTED = {
    "vicuna_v1": USER + " USER: " + Q1 + " ASSISTANT: " + A1 + "</s>USER: " + Q2 + " ASSISTANT:",
    "llava_v1": HUMAN + " USER: " + Q1 + " ASSISTANT: " + A1 + "</s>USER: " + Q2 + " ASSISTANT:",
    "llava_v0": HUMAN + "###Human: " + Q1 + "###Assistant: " + A1 + "###Human: " + Q2 + "###Assistant:",
    "plain": Q1 + "\n" + A1 + "\n" + Q2 + "\n",
    "llama_2": "[INST] <<SYS>>\n" + LLAMA_2 + "\n<</SYS>>\n\n" + Q1 + " [/INST] " + A1 + " </s><s>[INST] " + Q2
               + " [/INST]",
    "llava_llama_2": "[INST] <<SYS>>\n" + LLAVA_SYSTEM + "\n<</SYS>>\n\n" + Q1 + " [/INST] " + A1
                     + " </s><s>[INST] " + Q2 + " [/INST]",
    "mistral_instruct": "[INST] " + Q1 + " [/INST] " + A1 + " </s>[INST] " + Q2 + " [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n" + Q1
                     + "<|im_end|><|im_start|>assistant\n" + A1 + "<|im_end|><|im_start|>user\n" + Q2
                     + "<|im_end|><|im_start|>assistant\n",
    "mpt": "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
           "helpful and honest answers.<|im_end|><|im_start|>user\n" + Q1 + "<|im_end|><|im_start|>assistant\n"
           + A1 + "<|im_end|><|im_start|>user\n" + Q2 + "<|im_end|><|im_start|>assistant\n",
    "llama_3": "<|start_header_id|>system<|end_header_id|>\n\n" + LLAVA_SYSTEM + "<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n" + Q1 + "<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n" + A1 + "<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n" + Q2 + "<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen_2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + Q1
              + "<|im_end|>\n<|im_start|>assistant\n" + A1 + "<|im_end|>\n<|im_start|>user\n" + Q2
              + "<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_prompt_strings(name):
    conv = conv_templates[name].copy()  # the original's usage: copy, append, get_prompt
    for role, message in zip(conv.roles * 2, [Q1, A1, Q2, None]):
        conv.append_message(role, message)
    assert conv.get_prompt() == EXPECTED[name]
    messages = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
    assert render(name, messages)[0] == EXPECTED[name]


def test_v0_keeps_its_example_turns():
    conv = conv_templates["v0"].copy()
    conv.append_message(conv.roles[0], Q1)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    assert prompt.startswith(HUMAN + "###Human: What are the key differences between renewable and non-renewable")
    assert prompt.endswith("social instability.\n###Human: " + Q1 + "###Assistant:")
    assert conv_templates["v0"].messages[2:] == []  # copying never changes the template


def test_spans_cover_answers_with_their_end_of_turn():
    messages = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}, {"role": "assistant", "content": "Orange."}]
    for name, ends in [("llava_v1", "</s>"), ("llava_llama_2", "</s>"), ("chatml_direct", "<|im_end|>"),
                       ("llava_v0", "###"), ("qwen_2", "<|im_end|>"), ("plain", "\n")]:
        prompt, spans = render(name, messages, add_generation_prompt=False)
        answers = [prompt[a:b] for a, b in spans]
        assert [a.strip().removesuffix(ends).strip() for a in answers] == [A1, "Orange."], name
        assert all(a.endswith(ends) for a in answers), name


def test_bad_conversations_are_named():
    with pytest.raises(TemplateError, match="unknown conversation template 'nope'"):
        render("nope", [{"role": "user", "content": "hi"}])
    with pytest.raises(TemplateError, match="alternate"):
        render("llava_v1", [{"role": "assistant", "content": "hi"}])


def test_labels_train_only_the_answers(checkpoints, photos):
    _, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    messages = [{"role": "user", "content": Q1}, {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "How many shapes are there?"},
                {"role": "assistant", "content": "There are three shapes."}]
    prompt, spans = processor.build_prompt(messages, conv_mode="llava_v1", add_generation_prompt=False)
    image = photos["wide"]
    ids, labels = processor.encode_with_labels(prompt, spans, [(image.height, image.width)], sample="s1")
    expected = processor(text=prompt, images=[image])["input_ids"][0]
    assert ids == list(expected)  # the same tokens as inference would see
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == trained
    tokenizer = processor.tokenizer
    assert tokenizer.decode(trained) == "A red circle.</s> There are three shapes.</s>"
    assert processor.image_token_id not in trained and ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX


def test_tokenization_mismatch_names_the_sample(checkpoints):
    _, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    prompt, spans = processor.build_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content":
                                            "A red circle."}], conv_mode="llava_v1", add_generation_prompt=False)
    shifted = [(a + 4, b) for a, b in spans]  # the edge now falls inside the token "▁red"
    with pytest.raises(TokenizationMismatchError, match="sample-42: token"):
        processor.encode_with_labels(prompt, shifted, [], sample="sample-42")


def test_checkpoint_chat_template_matches_transformers(checkpoints):
    folder = checkpoints("llava")
    _, processor = llava.load_pretrained(folder, device="cpu")
    assert processor.conv_mode == "chat_template"  # the checkpoint has one and no conv_mode
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": [{"type": "text", "text": "What colour?"}]}]
    theirs = AutoProcessor.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    prompt, spans = processor.build_prompt(messages)
    assert prompt == theirs
    assert [prompt[a:b] for a, b in spans] == [" A cat.</s>"]  # " ASSISTANT:" is the prompt, not trained
