"""The model a training run starts from, and what of it trains.

A run starts from a llava-hf checkpoint (`model`), or puts a new LLaVA together from a pretrained
vision model and a pretrained causal LM (`vision_tower` + `language_model`, as the original's stage 1
does) with a freshly initialised projector. A stage-1 projector can be loaded on top (`projector`),
from our stage-1 output folder or from the original's mm_projector.bin.
Stage pretrain trains the projector (and AnyRes' image_newline); finetune adds the language model
(or LoRA adapters on it); the vision tower trains only when asked, each part with its own learning rate.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..core.config import LlavaConfig
from ..core.constants import DEFAULT_IMAGE_TOKEN
from ..core.device import resolve_dtype
from ..core.errors import CheckpointError, TrainConfigError
from ..data import anyres
from ..data.image_processor import ImageProcessor
from ..data.processor import LlavaProcessor
from ..model.checkpoint import load_pretrained, read_state_dict
from ..model.llava import LlavaForCausalLM
from ..model.original import projector_key
from ..model.vision import image_processor_for, vision_model_class
from .config import TrainConfig

IMAGE_SIDE = ("multi_modal_projector", "image_newline")
DEFAULT_TEMPLATE = "vicuna_v1"  # the original's stage-2 template (--version v1)


def load_start_model(config: TrainConfig) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """(model in train mode on CPU, processor) as described by the config, before any freezing."""
    dtype = resolve_dtype(config.dtype, torch.device("cpu"))
    if config.model:
        model, processor = load_pretrained(config.model, device="cpu", dtype=dtype)
        if config.image_aspect_ratio == "anyres" and not model.config.is_anyres:
            raise TrainConfigError(f"{config.model} is not an AnyRes (llava_next) model; to train AnyRes from a "
                                   "stage-1 projector, give vision_tower + language_model + projector")
        if config.image_aspect_ratio in ("pad", "square") and model.config.is_anyres:
            raise TrainConfigError(f"{config.model} is an AnyRes (llava_next) model; image_aspect_ratio must be "
                                   "anyres or unset")
        if config.image_aspect_ratio in ("pad", "square"):
            processor.image_processor.pad_to_square = config.image_aspect_ratio == "pad"
    else:
        model, processor = assemble(config, dtype)
    if config.projector:
        load_projector(model, config.projector)
    return model.train(), processor


def assemble(config: TrainConfig, dtype: torch.dtype) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """A new LLaVA from a pretrained vision model and causal LM (folders or hub ids); random projector."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        vision_config = AutoConfig.from_pretrained(config.vision_tower)
        vision_config = getattr(vision_config, "vision_config", None) or vision_config  # CLIP/SigLIP with text
        tower = vision_model_class(vision_config).from_pretrained(config.vision_tower, config=vision_config,
                                                                   dtype=dtype)
    except OSError as e:
        raise CheckpointError(f"vision_tower {config.vision_tower}: cannot load ({str(e).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.language_model)
        language_model = AutoModelForCausalLM.from_pretrained(config.language_model, dtype=dtype)
    except OSError as e:
        raise CheckpointError(f"language_model {config.language_model}: cannot load "
                              f"({str(e).splitlines()[0]})") from None
    if tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:  # the original pads with unk (Vicuna); models without unk get <pad>
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    image_processor = _image_processor_for(config, vision_config)
    tile = image_processor.tile_size
    pinpoints = None
    if config.image_aspect_ratio == "anyres":
        pinpoints = anyres.parse_grid_pinpoints(config.image_grid_pinpoints) if config.image_grid_pinpoints else \
            [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
        image_processor.image_grid_pinpoints = pinpoints
    additional = 1 if "clip" in vision_config.model_type else 0
    side = tile // vision_config.patch_size
    llava_config = LlavaConfig(
        vision_config=vision_config, text_config=language_model.config,
        model_type="llava_next" if pinpoints else "llava",
        image_token_index=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        projector_type=config.projector_type,
        projector_hidden_act=_projector_act(config.projector_type),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_grid_pinpoints=pinpoints,
        image_seq_length=side * side + additional - (1 if config.vision_feature_select_strategy == "default" else 0),
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
    )
    llava_config.text_config.vocab_size = language_model.get_input_embeddings().num_embeddings
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaForCausalLM(llava_config, vision_tower=tower, language_model=language_model)
    finally:
        torch.set_default_dtype(previous)
    processor = LlavaProcessor(tokenizer, image_processor, patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=additional, conv_mode=DEFAULT_TEMPLATE)
    return model, processor


def _projector_act(projector_type: str) -> str:
    match = re.fullmatch(r"mlp\d+x_(\w+)", projector_type)
    return match.group(1) if match else "gelu"


def _image_processor_for(config: TrainConfig, vision_config) -> ImageProcessor:
    """The vision model's own image processor with LLaVA's aspect mode."""
    processor = image_processor_for(config.vision_tower, vision_config)
    processor.pad_to_square = config.image_aspect_ratio == "pad"
    return processor


def load_projector(model: LlavaForCausalLM, source: str | Path) -> None:
    """Projector (and image_newline) weights from a stage-1 output folder, a safetensors file, or the
    original's mm_projector.bin (keys model.mm_projector.0/2.weight...)."""
    source = Path(source)
    if source.is_dir():
        tensors = read_state_dict(source)
    elif source.is_file() and source.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(source))
    elif source.is_file():
        tensors = torch.load(str(source), map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"projector {source}: no such folder or file")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(IMAGE_SIDE)}
    found = {}
    for key, value in tensors.items():
        name = projector_key(key)
        if name in own:
            found[name] = value
    missing = sorted(set(k for k in own if k.startswith("multi_modal_projector")) - set(found))
    if missing:
        raise CheckpointError(f"projector {source}: missing {', '.join(missing)}")
    for name, value in found.items():
        if value.shape != own[name].shape:
            raise CheckpointError(f"projector {source}: {name} has shape {tuple(value.shape)}, the model needs "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(found, strict=False)


# -- what trains ------------------------------------------------------------------------------------------
def set_trainable(model: nn.Module, config: TrainConfig) -> None:
    """Freeze everything, then unfreeze by stage: the projector (+ image_newline) unless asked not to; the
    language model in finetune (all of it, or only the LoRA adapters when LoRA is on); the vision tower if asked."""
    for name, param in model.named_parameters():
        part = component(name)
        if part == "projector":
            train = config.train_projector
        elif part == "vision":
            train = config.train_vision_tower
        elif part == "lora":
            train = True
        else:
            train = config.stage == "finetune" and not config.use_lora
        param.requires_grad_(train)


def component(name: str) -> str:
    """'projector', 'vision', 'lora' or 'language' for a parameter name (plain or peft-wrapped)."""
    if "lora_" in name:
        return "lora"
    name = name.removeprefix("base_model.model.")
    if name.startswith(IMAGE_SIDE):
        return "projector"
    if name.startswith("vision_tower."):
        return "vision"
    return "language"


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups: per component learning rate; no weight decay for biases and norm weights (1-D)."""
    rates = {"projector": config.projector_lr, "vision": config.vision_lr, "language": None, "lora": None}
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = component(name)
        groups.setdefault((part, param.dim() >= 2), []).append(param)
    if not groups:
        raise TrainConfigError("nothing to train: every parameter is frozen")
    out = []
    for (part, decay), params in sorted(groups.items()):
        rate = config.learning_rate if rates[part] is None else rates[part]  # 0.0 holds it still, as the original
        out.append({"params": params, "lr": rate,
                    "weight_decay": config.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}"})
    return out


def upcast_trainable(model: nn.Module) -> None:
    """Keep trained parameters in float32 (frozen ones stay in the load dtype), as mixed precision expects."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()

