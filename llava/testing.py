"""Tiny random llava-hf checkpoints built with transformers itself, with a tokenizer trained on the
spot: for tests, benchmarks and `make demo` on a machine with no downloads. Their answers are noise."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red circle above a blue square.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes: a green triangle, a circle and a star.",
    "### Human: Describe the picture. ### Assistant: The picture shows a small yellow square on the left.",
    "[INST] What colour is the circle? [/INST] The circle is red.",
    "the quick brown fox jumps over the lazy dog. one two three four five six seven eight nine ten.",
    "What is shown? Where is it? Is there a cat? Yes. No. left right top bottom middle big small.",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ ' ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def train_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 320):
    """A Llama-style (metaspace BPE, BOS prepended) tokenizer with <image> as a special token."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:;'\"()[]#/<>|_-\n")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=[IMAGE_TOKEN], padding_side="left")


def tiny_configs(kind: str = "llava", vision: str = "clip", text: str = "llama", vocab_size: int = 512,
                 image_size: int = 28, patch_size: int = 7, feature_layer=-2, strategy: str = "default",
                 image_token_index: int = 0, hidden_act: str = "gelu", pinpoints=None, max_positions: int = 512,
                 text_hidden: int = 64, text_layers: int = 2):
    """transformers configs for a tiny LLaVA: (LlavaConfig | LlavaNextConfig)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig,
                              Qwen2Config, SiglipVisionConfig)

    vision_kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=image_size, patch_size=patch_size)
    vision_config = (CLIPVisionConfig(projection_dim=16, **vision_kwargs) if vision == "clip"
                     else SiglipVisionConfig(**vision_kwargs))
    text_kwargs = dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    text_config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text](**text_kwargs)
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                  vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                  projector_hidden_act=hidden_act)
    if kind == "llava_next":
        pinpoints = pinpoints or [[image_size, 2 * image_size], [2 * image_size, image_size],
                                  [2 * image_size, 2 * image_size], [image_size, 3 * image_size],
                                  [3 * image_size, image_size]]
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    return LlavaConfig(**common)


def build_tiny_checkpoint(folder: str | Path, kind: str = "llava", seed: int = 0, pad: bool = False,
                          chat_template: bool = False, **config_kwargs) -> Path:
    """Save a random tiny LlavaForConditionalGeneration / LlavaNextForConditionalGeneration with its
    transformers processor (tokenizer trained here) to folder, exactly as transformers writes it."""
    from transformers import (LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor)

    folder = Path(folder)
    tokenizer = train_tokenizer()
    config = tiny_configs(kind=kind, vocab_size=len(tokenizer) + 8,
                          image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **config_kwargs)
    torch.manual_seed(seed)
    model_cls = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    model = model_cls(config).eval()
    with torch.no_grad():  # random init is tiny; widen it so greedy decoding is not all one token
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(3.0)
    model.save_pretrained(folder)
    side = config.vision_config.image_size
    image_kwargs = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    additional = 1 if config.vision_config.model_type.startswith("clip") else 0
    proc_kwargs = dict(patch_size=config.vision_config.patch_size,
                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                       num_additional_image_tokens=additional,
                       chat_template=CHAT_TEMPLATE if chat_template else None)
    if kind == "llava_next":
        processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(
            image_grid_pinpoints=config.image_grid_pinpoints, **image_kwargs), tokenizer=tokenizer, **proc_kwargs)
    else:
        processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(do_pad=pad, **image_kwargs),
                                   tokenizer=tokenizer, **proc_kwargs)
    processor.save_pretrained(folder)
    return folder


def build_tiny_parts(folder: str | Path, seed: int = 0, vision: str = "clip", image_size: int = 28,
                     patch_size: int = 7) -> tuple[Path, Path]:
    """A tiny pretrained-style vision model (with its preprocessor_config.json) and a tiny causal LM
    (with a tokenizer that has no <image> token), saved as transformers saves them: the two parts
    stage 1 puts together. Returns (vision folder, language model folder)."""
    from transformers import AutoModel, AutoModelForCausalLM, CLIPImageProcessorPil

    folder = Path(folder)
    configs = tiny_configs(vision=vision, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    vision_model = AutoModel.from_config(configs.vision_config)
    vision_model.save_pretrained(folder / "vision")
    side = configs.vision_config.image_size
    mean_std = {} if vision == "clip" else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                          **mean_std).save_pretrained(folder / "vision")
    tokenizer = train_tokenizer()
    tokenizer_no_image = _without_image_token(tokenizer)
    text_config = configs.text_config
    text_config.vocab_size = len(tokenizer_no_image)
    language_model = AutoModelForCausalLM.from_config(text_config)
    language_model.save_pretrained(folder / "lm")
    tokenizer_no_image.save_pretrained(folder / "lm")
    return folder / "vision", folder / "lm"


def _without_image_token(tokenizer):
    """The same trained tokenizer with <image> left out of its special tokens and vocabulary."""
    import json

    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE_TOKEN]
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k != IMAGE_TOKEN}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="left")


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_colour_dataset(folder: str | Path, images: int = 24, text_only: int = 6, jsonl: bool = False,
                         seed: int = 0) -> Path:
    """A small learnable LLaVA dataset: solid-colour images (sizes vary) asked "What colour is it?",
    answered with the colour, plus text-only records. Returns the data file; images sit beside it."""
    import json
    import random

    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(images):
        name = list(COLOURS)[i % len(COLOURS)]
        size = (rng.randint(20, 60), rng.randint(20, 60))
        Image.new("RGB", size, COLOURS[name]).save(folder / "images" / f"{i}.png")
        question = rng.choice(["What colour is it?", "Which colour is the image?", "Name the colour."])
        first = f"<image>\n{question}" if i % 2 else f"{question}\n<image>"
        records.append({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": first}, {"from": "gpt", "value": f"It is {name}."}]})
    for i in range(text_only):
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "one two three"},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "four five six"}]})
    rng.shuffle(records)
    path = folder / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


@contextlib.contextmanager
def serve_in_thread(app):
    """Run an ASGI app on a free localhost port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build_original_checkpoint(folder: str | Path, form: str = "full", kind: str = "llava", seed: int = 0,
                              aspect: str = "pad", use_bin: bool = True) -> dict:
    """A tiny random checkpoint in the original LLaVA layout (form "full", "projector" or "lora"), as
    the original repository saves it: a Llama with mm_* config fields, `model.mm_projector.0/2`,
    `model.image_newline` (AnyRes), the vision tower by path, a tokenizer without <image>.
    Returns {"checkpoint", "vision", "base" (the LLM folder for projector/lora), "parts"} where
    parts holds the raw tensors (llm, projector, newline, and lora: the merged LLM state)."""
    import json

    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    vision, lm = build_tiny_parts(folder / "parts", seed=seed)
    torch.manual_seed(seed + 1)
    llm = AutoModelForCausalLM.from_pretrained(lm)
    with torch.no_grad():  # widen the random init so greedy answers are not all one token
        for name, param in llm.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(3.0)
    vision_hidden, hidden = 32, llm.config.hidden_size
    projector = {"model.mm_projector.0.weight": torch.randn(hidden, vision_hidden) * 0.2,
                 "model.mm_projector.0.bias": torch.randn(hidden) * 0.1,
                 "model.mm_projector.2.weight": torch.randn(hidden, hidden) * 0.2,
                 "model.mm_projector.2.bias": torch.randn(hidden) * 0.1}
    if kind == "llava_next":
        projector["model.image_newline"] = torch.randn(hidden)
    config = {**llm.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_vision_tower": str(vision), "mm_hidden_size": vision_hidden, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "image_aspect_ratio": "anyres" if kind == "llava_next" else aspect,
              "mm_patch_merge_type": "spatial_unpad" if kind == "llava_next" else "flat",
              "tokenizer_model_max_length": 512, "tokenizer_padding_side": "right", "use_mm_proj": True}
    if kind == "llava_next":
        config["image_grid_pinpoints"] = [[56, 28], [28, 56], [56, 56], [84, 28], [28, 84]]  # (width, height)
    checkpoint = folder / form
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    result = {"checkpoint": checkpoint, "vision": vision, "base": None, "parts": {"projector": projector}}
    if form == "full":
        from transformers import AutoTokenizer

        weights = {**state, **projector}
        if use_bin:
            torch.save(weights, checkpoint / "pytorch_model.bin")
        else:
            from safetensors.torch import save_file
            save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(lm).save_pretrained(checkpoint)
        result["parts"]["llm"] = state
        return result
    llm.save_pretrained(folder / "base")
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(lm).save_pretrained(folder / "base")
    result["base"] = folder / "base"
    if form == "projector":
        torch.save(projector, checkpoint / "mm_projector.bin")
        result["parts"]["llm"] = state
        return result
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
    peft_model.save_pretrained(str(checkpoint))
    torch.save({f"base_model.model.{k}": v for k, v in projector.items()}, checkpoint / "non_lora_trainables.bin")
    result["parts"]["llm"] = {k: v.contiguous() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return result


def free_port() -> int:
    """A localhost TCP port nobody listens on right now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
