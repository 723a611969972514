"""The original LLaVA's names and commands: the widely copied Colab recipe, run on a tiny original-layout
checkpoint (CPU, greedy), answers with the tokens of our own `llava chat`; `python -m llava.serve.cli`
and `python -m llava.eval.run_llava` answer the same; the names forward to ours."""

import subprocess
import sys

import pytest
import torch

from llava.testing import build_original_checkpoint

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return build_original_checkpoint(tmp_path_factory.mktemp("compat") / "llava-v1.5-tiny", form="full")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    photos["square"].save(path)  # square: the recipe's plain preprocess and `pad` agree
    return path


def _llava_chat(model, image, conv_mode, tokens):
    result = subprocess.run([sys.executable, "-m", "llava", "chat", "--model", str(model), "--image", str(image),
                             "--prompt", QUESTION, "--conv-mode", conv_mode, "--max-new-tokens", str(tokens)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("conv_mode", ["llava_v0", "llava_v1"])
def test_the_colab_recipe_answers_as_llava_chat(original, image_file, conv_mode):
    from PIL import Image
    from transformers import AutoTokenizer

    from llava.model import LlavaLlamaForCausalLM

    model_path = str(original["checkpoint"])
    model = LlavaLlamaForCausalLM.from_pretrained(model_path, low_cpu_mem_usage=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
    image_processor = vision_tower.image_processor
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import SeparatorStyle, conv_templates
    from llava.mm_utils import KeywordsStoppingCriteria, tokenizer_image_token
    from llava.utils import disable_torch_init

    disable_torch_init()
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    image = Image.open(image_file).convert("RGB")
    image_tensor = image_processor.preprocess(image, return_tensors="pt")["pixel_values"]
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    stop_str = conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2
    stopping_criteria = KeywordsStoppingCriteria([stop_str], tokenizer, input_ids)
    with torch.inference_mode():
        output_ids = model.generate(input_ids, images=image_tensor, do_sample=False, temperature=0.2,
                                    max_new_tokens=16, use_cache=True, stopping_criteria=[stopping_criteria])
    outputs = tokenizer.decode(output_ids[0], skip_special_tokens=True).strip()
    if outputs.endswith(stop_str):
        outputs = outputs[:-len(stop_str)].strip()
    assert outputs and outputs == _llava_chat(model_path, image_file, conv_mode, 16)
    assert "<image>" not in tokenizer.get_vocab()  # the user's tokenizer is left as it was


def test_the_original_module_commands_answer(original, image_file):
    model_path = str(original["checkpoint"])
    expected = _llava_chat(model_path, image_file, "llava_v1", 8)
    run = subprocess.run([sys.executable, "-m", "llava.eval.run_llava", "--model-path", model_path, "--image-file",
                          str(image_file), "--query", QUESTION, "--temperature", "0", "--max_new_tokens", "8",
                          "--conv-mode", "llava_v1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert expected and run.stdout.strip() == expected
    cli = subprocess.run([sys.executable, "-m", "llava.serve.cli", "--model-path", model_path, "--image-file",
                          str(image_file), "--temperature", "0", "--max-new-tokens", "8", "--conv-mode", "llava_v1",
                          "--device", "cuda"], input=QUESTION + "\n", capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert f"ASSISTANT: {expected}\n" in cli.stdout and "exit..." in cli.stdout
    bad = subprocess.run([sys.executable, "-m", "llava.eval.run_llava", "--model-path", model_path + "-missing",
                          "--image-file", str(image_file), "--query", QUESTION], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_load_pretrained_model_and_run_llava_on_a_llava_hf_checkpoint(checkpoints, image_file, capsys):
    from llava.eval.run_llava import eval_model
    from llava.model.builder import load_pretrained_model
    from llava.model.legacy import LlavaLlamaForCausalLM

    folder = str(checkpoints("llava_next"))
    tokenizer, model, image_processor, context_len = load_pretrained_model(folder, None, "tiny", device="cuda")
    assert isinstance(model, LlavaLlamaForCausalLM) and context_len == 2048 and model.device.type == "cpu"
    assert image_processor.preprocess(__import__("PIL").Image.open(image_file), return_tensors="pt")[
        "pixel_values"].shape == (1, 3, 28, 28)
    args = type("Args", (), {"model_path": folder, "model_base": None, "model_name": "tiny", "query": QUESTION,
                             "conv_mode": "llava_v1", "image_file": str(image_file), "sep": ",", "temperature": 0,
                             "top_p": None, "num_beams": 1, "max_new_tokens": 6})()
    answer = eval_model(args)
    assert capsys.readouterr().out.strip() == answer
    assert answer == _llava_chat(folder, image_file, "llava_v1", 6)


def test_the_names_forward_to_ours():
    import llava.constants as constants
    import llava.conversation as conversation
    import llava.data.conversation as ours
    from llava.mm_utils import get_model_name_from_path

    assert constants.IMAGE_TOKEN_INDEX == -200 and constants.IGNORE_INDEX == -100
    assert constants.DEFAULT_IMAGE_TOKEN == "<image>" and constants.IMAGE_PLACEHOLDER == "<image-placeholder>"
    assert conversation.conv_templates is ours.conv_templates
    assert conversation.default_conversation is ours.conv_vicuna_v1
    assert get_model_name_from_path("/x/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("/x/run/checkpoint-500") == "run_checkpoint-500"
