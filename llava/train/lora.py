"""LoRA and QLoRA on the language model (peft, bitsandbytes), saving the adapter, and merging it back.

LoRA goes on the language model's linear layers only (never the vision tower, the projector or
lm_head, as the original's find_all_linear_names); the projector trains in full beside it. QLoRA first
swaps those linear layers for 4-bit NF4 ones (bitsandbytes, works on CPU and CUDA).
The adapter folder holds peft's adapter_config.json + adapter_model.safetensors, and
non_lora_trainables.safetensors with the other trained weights (projector ...), as the original does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import CheckpointError, TrainConfigError
from .build import component

NON_LORA_FILE = "non_lora_trainables.safetensors"


def lora_targets(model: nn.Module, targets: list | str = "all-linear") -> list[str]:
    """Full names of the language model's linear layers (lm_head excluded), optionally only those whose
    last name part is in `targets` (e.g. ["q_proj", "v_proj"])."""
    names = []
    for name, module in model.named_modules():
        if not name.startswith("language_model.") or name.endswith("lm_head"):
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Linear4bit":
            if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
                names.append(name)
    if not names:
        raise TrainConfigError(f"lora_target_modules {targets!r} matches no linear layer of the language model")
    return names


def quantize_language_model(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace the language model's linear layers (not lm_head) with bitsandbytes NF4 Linear4bit, in place.
    Returns how many layers were quantized."""
    from ..model.quantize import quantize_linears

    try:
        return quantize_linears(model, lora_targets(model), 4, compute_dtype).layers
    except CheckpointError as e:
        raise TrainConfigError(f"qlora: {e}") from None


def lora_config(config, model: nn.Module):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model, config.lora_target_modules), bias="none")


def apply_lora(model: nn.Module, config):
    """The model wrapped by peft with LoRA adapters on the language model (adapters trainable)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(config, model))


def save_adapter(peft_model, folder: str | Path) -> Path:
    """peft's adapter files plus non_lora_trainables.safetensors (trained weights outside LoRA)."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    extra = {name.removeprefix("base_model.model."): param.detach().float().cpu().contiguous()
             for name, param in peft_model.named_parameters()
             if param.requires_grad and component(name) != "lora"}
    save_file(extra, str(folder / NON_LORA_FILE), metadata={"format": "pt"})
    return folder


def merge_adapter(base: nn.Module, folder: str | Path) -> nn.Module:
    """A full-precision model with the adapter in `folder` merged into its weights (and the
    non-LoRA trained weights loaded); `base` must be the un-quantized model training started from."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise CheckpointError(f"{folder}: no adapter_config.json (not a LoRA adapter folder)")
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    if (folder / NON_LORA_FILE).exists():
        extra = load_file(str(folder / NON_LORA_FILE))
        own = merged.state_dict()
        unknown = sorted(set(extra) - set(own))
        if unknown:
            raise CheckpointError(f"{folder / NON_LORA_FILE}: weights the model does not have: {', '.join(unknown[:3])}")
        merged.load_state_dict({k: v.to(own[k].dtype) for k, v in extra.items()}, strict=False)
    return merged
