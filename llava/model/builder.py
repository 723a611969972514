"""The original LLaVA's `llava.model.builder.load_pretrained_model`, forwarding to load_pretrained."""

from __future__ import annotations

import torch

from .checkpoint import load_pretrained
from .legacy import adopt


def load_pretrained_model(model_path, model_base=None, model_name=None, load_8bit: bool = False,
                          load_4bit: bool = False, device_map="auto", device: str = "cuda",
                          use_flash_attn: bool = False, **kwargs):
    """(tokenizer, model, image_processor, context_len) as the original returns them, for original-layout
    (full, projector-only, LoRA with `model_base`) and llava-hf checkpoints. The form comes from the
    files, not from `model_name`. Without a GPU, device "cuda" means the CPU."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None) or (
        torch.float16 if str(device).startswith("cuda") else torch.float32)
    model, processor = load_pretrained(model_path, device=device, dtype=dtype, model_base=model_base,
                                       load_8bit=load_8bit, load_4bit=load_4bit)
    model = adopt(model, processor)
    context_len = getattr(model.config.text_config, "max_sequence_length", 2048)
    return processor.tokenizer, model, model.get_vision_tower().image_processor, context_len


def conv_mode_for(model_name: str) -> str:
    """The template the original's CLI and run_llava pick from the model's name."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"
