"""Checkpoints in the original LLaVA layout (liuhaotian/llava-v1.5-7b, LLaVA-NeXT and their
fine-tunes), turned into our model in memory the way transformers' llava-hf conversion scripts do.

Three forms, told apart by their files (never by the folder's name):
- full: config.json (LlavaLlamaForCausalLM / LlavaMistralForCausalLM with mm_* fields) and the
  weights (`model.layers…`, `lm_head`, `model.mm_projector.N`, `model.image_newline`);
- projector-only: config.json + mm_projector.bin, the language model from `model_base`;
- LoRA: adapter_config.json + adapter_model.* + non_lora_trainables.bin (+ config.json), merged
  into the language model from `model_base`.
The vision tower is named by config.json's mm_vision_tower (a hub id or folder; `vision_tower`
overrides it for offline use) unless the weights carry it (`model.vision_tower.vision_tower.*`).
The tokenizer gains `<image>` (and `<pad>` where it has none) and the embeddings grow to a
multiple of 64, the new rows set to the mean of the old ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.config import LlavaConfig
from ..core.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from ..core.errors import CheckpointError
from ..data import anyres
from ..data.processor import LlavaProcessor
from .llava import LlavaForCausalLM
from .vision import image_processor_for, vision_model_class

# architectures of the original repository -> transformers model_type of the language model
TEXT_TYPES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
              "LlavaQwenForCausalLM": "qwen2", "LlavaQwen2ForCausalLM": "qwen2"}
LLAVA_FIELDS = ("mm_", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length",
                "tokenizer_padding_side", "use_mm_proj", "freeze_mm", "tune_mm", "unfreeze_mm", "mm_use_im")


def _read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def detect_form(folder: str | Path) -> str | None:
    """"full", "projector" or "lora" for an original-layout folder; None for anything else (llava-hf ...)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists() and (folder / "non_lora_trainables.bin").exists():
        return "lora"
    config = _read_config(folder)
    # the original's config is the language model's own plus mm_* fields; llava-hf nests text_config
    if config is None or "mm_vision_tower" not in config or "text_config" in config:
        return None
    if (folder / "mm_projector.bin").exists() and not _weight_files(folder):
        return "projector"
    return "full"


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / n for n in names]
    return [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.exists()]


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Tensors of safetensors or torch .bin files (loaded with weights_only: no code runs)."""
    tensors = {}
    for path in files:
        if not path.exists():
            raise CheckpointError(f"{path}: weight file missing")
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        else:
            try:
                tensors.update(torch.load(str(path), map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - a pickle that is not plain tensors
                raise CheckpointError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    return tensors


def infer_conv_mode(config: dict, name: str = "") -> str:
    """The template the original's CLI picks (from the model name), else one from the architecture."""
    name = (name or config.get("_name_or_path", "")).lower()
    arch = (config.get("architectures") or [""])[0]
    if "llama-2" in name or "llama_2" in name:
        return "llava_llama_2"
    if "mistral" in name or arch == "LlavaMistralForCausalLM":
        return "mistral_instruct"
    if "v1.6-34b" in name or "34b" in name:
        return "chatml_direct"
    if "qwen" in name or arch.startswith("LlavaQwen"):
        return "qwen_2"
    if "mpt" in name:
        return "mpt"
    if "v0" in name and "v1" not in name:
        return "llava_v0"
    return "llava_v1"  # LLaVA-1.5 / 1.6 Vicuna, and the fine-tunes made from them


def load_original(folder: str | Path, model_base: str | Path | None = None, vision_tower: str | Path | None = None,
                  dtype: torch.dtype = torch.float32, conv_mode: str | None = None
                  ) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """(model on CPU in dtype, processor) for an original-layout checkpoint of any form."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    form = detect_form(folder)
    if form is None:
        raise CheckpointError(f"{folder}: not an original LLaVA checkpoint (no config.json with mm_vision_tower, "
                              "mm_projector.bin or LoRA adapter files)")
    config = _read_config(folder) or _read_config(Path(model_base or "")) or {}
    if "mm_vision_tower" not in config and vision_tower is None:
        raise CheckpointError(f"{folder}/config.json: no mm_vision_tower; pass the vision tower explicitly")
    if form in ("projector", "lora") and model_base is None:
        raise CheckpointError(f"{folder}: a {'LoRA adapter' if form == 'lora' else 'projector-only checkpoint'} "
                              "needs the language model it was trained on: pass --model-base")
    source = Path(model_base) if form != "full" else folder
    text_config = _text_config(config, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), config=text_config)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if form == "full":
        tensors = read_tensors(_weight_files(folder))
        extra = {k: tensors.pop(k) for k in list(tensors) if _is_multimodal(k)}
    elif form == "projector":
        tensors = read_tensors(_weight_files(source))
        extra = read_tensors([folder / "mm_projector.bin"])
    else:
        tensors = read_tensors(_weight_files(source))
        extra = _strip_peft(read_tensors([folder / "non_lora_trainables.bin"]))
        tensors.update({k: extra.pop(k) for k in list(extra) if not _is_multimodal(k)})  # embed/lm_head
    vocab = max(text_config.vocab_size, tensors["model.embed_tokens.weight"].shape[0])
    text_config.vocab_size = vocab
    language_model = AutoModelForCausalLM.from_config(text_config, dtype=torch.float32)
    _load_exact(language_model, tensors, str(source))
    if form == "lora":
        language_model = _merge_lora(language_model, folder)
    image_token_index = _add_image_token(tokenizer, language_model, config)
    tower, vision_config = _vision_tower(config, vision_tower, extra, folder)
    return _compose(config, tokenizer, language_model, tower, vision_config, extra, image_token_index, dtype,
                    conv_mode or infer_conv_mode(config, str(folder)), vision_tower)


def _text_config(config: dict, source: Path):
    from transformers import AutoConfig

    arch = (config.get("architectures") or [""])[0]
    text_type = TEXT_TYPES.get(arch)
    if text_type is None and arch.startswith("Llava"):
        raise CheckpointError(f"config.json: architecture {arch} is not supported (supported: "
                              f"{', '.join(TEXT_TYPES)})")
    if text_type is None:  # a projector or adapter folder without architectures: the base model's own config
        return AutoConfig.from_pretrained(str(source))
    fields = {k: v for k, v in config.items() if not k.startswith(LLAVA_FIELDS) and k not in (
        "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    text_config = AutoConfig.for_model(text_type, **fields)
    text_config.architectures = [arch.replace("Llava", "", 1)]
    return text_config


def _is_multimodal(key: str) -> bool:
    return any(part in key for part in ("mm_projector", "image_newline", "vision_tower"))


def _strip_peft(tensors: dict) -> dict:
    """non_lora_trainables keys as the original's builder reads them: no base_model. / model.model. prefix."""
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix("base_model.")
        if key.startswith("model.model."):
            key = key.removeprefix("model.")
        out[key] = value
    return out


def _load_exact(model, tensors: dict, source: str) -> None:
    own = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(set(own) - set(tensors) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(k for k in set(tensors) - set(own) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise CheckpointError(f"{source}: language model weights do not fit its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for key in own:
        if key in tensors and tensors[key].shape != own[key].shape:
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                rows = tensors[key].shape[0]
                model.resize_token_embeddings(rows)
                own = model.state_dict()
            else:
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, the config implies "
                                      f"{tuple(own[key].shape)}")
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    if tied:
        model.tie_weights()


def _merge_lora(language_model, folder: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(language_model, str(folder)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - peft's errors name internals; say which folder
        raise CheckpointError(f"{folder}: cannot apply the LoRA adapter to --model-base "
                              f"({e.__class__.__name__}: {str(e).splitlines()[0]})") from None


def _add_image_token(tokenizer, language_model, config: dict) -> int:
    """<image> (and <pad>) into the tokenizer, the embeddings grown to a multiple of 64 with mean rows."""
    from tokenizers import AddedToken

    if tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens(AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = config.get("tokenizer_padding_side", "right")
    if config.get("tokenizer_model_max_length"):
        tokenizer.model_max_length = int(config["tokenizer_model_max_length"])
    old = language_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        embeddings = language_model.get_input_embeddings().weight.data
        mean_in = embeddings.mean(0)
        head = language_model.get_output_embeddings()
        mean_out = head.weight.data.mean(0) if head is not None else None
        language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
        with torch.no_grad():
            language_model.get_input_embeddings().weight[old:] = mean_in
            if head is not None and not language_model.config.tie_word_embeddings:
                language_model.get_output_embeddings().weight[old:] = mean_out
    return tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)


def _vision_tower(config: dict, override, extra: dict, folder: Path):
    from transformers import AutoConfig

    name = str(override or config["mm_vision_tower"])
    try:
        vision_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"vision tower {name}: cannot load ({str(e).splitlines()[0]}); for offline use "
                              "pass --vision-tower PATH") from None
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    carried = {k.split("vision_tower.vision_tower.", 1)[1]: v for k, v in extra.items()
               if "vision_tower.vision_tower." in k}
    model_class = vision_model_class(vision_config)
    if carried:  # the fine-tune trained the tower: its weights are in the checkpoint
        tower = model_class(vision_config)
        missing, unexpected = tower.load_state_dict(carried, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise CheckpointError(f"{folder}: vision tower weights do not fit {name}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        return tower, vision_config
    return model_class.from_pretrained(name, config=vision_config, dtype=torch.float32), vision_config


def _compose(config: dict, tokenizer, language_model, tower, vision_config, extra: dict, image_token_index: int,
             dtype: torch.dtype, conv_mode: str, vision_override) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    strategy = {"patch": "default", "cls_patch": "full"}.get(config.get("mm_vision_select_feature", "patch"))
    if strategy is None:
        raise CheckpointError(f"config.json: mm_vision_select_feature {config['mm_vision_select_feature']!r} "
                              "is not 'patch' or 'cls_patch'")
    aspect = config.get("image_aspect_ratio", "square") or "square"
    merge = config.get("mm_patch_merge_type", "flat")
    anyres_mode = aspect.startswith("anyres")
    if anyres_mode and merge != "spatial_unpad":
        raise CheckpointError(f"config.json: image_aspect_ratio {aspect} with mm_patch_merge_type {merge!r} is not "
                              "supported (only spatial_unpad, LLaVA-1.6's and llava-hf's)")
    if aspect not in ("pad", "square", "anyres") and not anyres_mode:
        raise CheckpointError(f"config.json: image_aspect_ratio {aspect!r} is not pad, square or anyres")
    image_processor = image_processor_for(str(vision_override or config["mm_vision_tower"]), vision_config)
    image_processor.pad_to_square = aspect == "pad"
    pinpoints = None
    if anyres_mode:
        grid = config.get("image_grid_pinpoints")
        if isinstance(grid, str):
            pinpoints = anyres.parse_grid_pinpoints(grid, image_processor.tile_size)
        elif grid:
            pinpoints = [[int(h), int(w)] for w, h in grid]  # the original lists (width, height)
        else:
            raise CheckpointError("config.json: image_aspect_ratio anyres needs image_grid_pinpoints")
        image_processor.image_grid_pinpoints = pinpoints
    projector_type = config.get("mm_projector_type", "linear")
    layer = config.get("mm_vision_select_layer", -2)
    additional = 1 if "clip" in vision_config.model_type else 0
    side = image_processor.tile_size // vision_config.patch_size
    act = re.fullmatch(r"mlp\d+x_(\w+)", projector_type)
    llava_config = LlavaConfig(
        vision_config=vision_config, text_config=language_model.config,
        model_type="llava_next" if pinpoints else "llava", image_token_index=image_token_index,
        projector_type=projector_type, projector_hidden_act=act.group(1) if act else "gelu",
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, image_grid_pinpoints=pinpoints,
        image_seq_length=side * side + additional - (1 if strategy == "default" else 0),
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
        conv_mode=conv_mode)
    llava_config.text_config.vocab_size = language_model.get_input_embeddings().weight.shape[0]
    model = LlavaForCausalLM(llava_config, vision_tower=tower, language_model=language_model)
    _load_multimodal(model, extra)
    processor = LlavaProcessor(tokenizer, image_processor, patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=additional,
                               conv_mode=conv_mode)
    if config.get("mm_use_im_start_end"):
        processor.image_wrap = (DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN)
    return model.to(dtype).eval(), processor


def projector_key(key: str) -> str:
    """The original's projector keys (model.mm_projector.N, Sequential indices 0, 2, 4 ...) as ours
    (multi_modal_projector.linear_1, linear_2 ...); model.image_newline as image_newline."""
    key = key.removeprefix("model.")
    match = re.fullmatch(r"mm_projector\.(\d+)\.(weight|bias)", key)
    if match:
        return f"multi_modal_projector.linear_{int(match.group(1)) // 2 + 1}.{match.group(2)}"
    match = re.fullmatch(r"mm_projector\.(weight|bias)", key)
    if match:
        return f"multi_modal_projector.linear_1.{match.group(1)}"
    return key


def _load_multimodal(model: LlavaForCausalLM, extra: dict) -> None:
    """mm_projector.N and image_newline from the original's key names."""
    found = {}
    for key, value in extra.items():
        name = projector_key(key)
        if name.startswith("multi_modal_projector.") or name == "image_newline":
            found[name] = value
    own = model.state_dict()
    needed = {k for k in own if k.startswith("multi_modal_projector") or k == "image_newline"}
    missing = sorted(needed - set(found))
    if missing:
        raise CheckpointError(f"the checkpoint has no {', '.join(missing[:3])} (mm_projector / image_newline)")
    for key, value in found.items():
        if key not in own or own[key].shape != value.shape:
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} does not fit the config "
                                  f"({tuple(own[key].shape) if key in own else 'no such weight'})")
    model.load_state_dict(found, strict=False)
