"""Checkpoints in the llava-hf layout: load (local folder or hub id) and save model + processor.

The folder holds config.json (model_type llava / llava_next), model.safetensors (or shards with an
index), tokenizer files, preprocessor_config.json, processor_config.json and chat_template.jinja,
so transformers, vLLM and SGLang open what we write, and we open every llava-hf checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

from ..core.config import LlavaConfig
from ..core.device import resolve_device, resolve_dtype
from ..core.errors import CheckpointError
from ..data.processor import LlavaProcessor
from .llava import LlavaForCausalLM

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]


def resolve_checkpoint(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; anything else is taken as a hub repo id and downloaded (cached)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a checkpoint is a folder, not a file")
    text = str(path_or_repo_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all the same to the user
        raise CheckpointError(f"{text}: not a local folder, and downloading it from the hub failed "
                              f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of every shard listed in model.safetensors.index.json."""
    if (folder / WEIGHTS_INDEX_NAME).exists():
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (folder / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    tensors = {}
    for name in files:
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: shard {name} listed in the index is missing")
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _rename(key: str, ours: set[str]) -> str:
    """Map the key spellings in circulation onto ours: transformers' in-memory names
    (model.language_model.*, lm_head.*) and the hub's vision_tower.vision_model.* prefix."""
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if key.startswith(old) and key not in ours:
            key = new + key[len(old):]
            break
    if key not in ours and key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key[len("vision_tower.vision_model."):]
    elif key not in ours and key.startswith("vision_tower."):
        alt = "vision_tower.vision_model." + key[len("vision_tower."):]
        key = alt if alt in ours else key
    return key


def load_state_dict_into(model: LlavaForCausalLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors whatever their key spelling; missing, unexpected or mis-shaped weights are an error."""
    own = model.state_dict()
    ours = set(own)
    renamed = {}
    for key, value in tensors.items():
        new = _rename(key, ours)
        if new.endswith("position_ids") and new not in ours:
            continue  # a buffer old CLIP checkpoints stored; rebuilt by the model
        renamed[new] = value
    unexpected = sorted(set(renamed) - ours)
    missing = sorted(ours - set(renamed))
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "language_model.lm_head.weight"]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: weights do not fit config.json: {'; '.join(parts)}")
    for key, value in renamed.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, config.json implies "
                                  f"{tuple(own[key].shape)}")
    model.load_state_dict(renamed, strict=False)
    if model.config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.get_input_embeddings().weight


def build_model(config: LlavaConfig, dtype: torch.dtype = torch.float32, init: bool = True) -> LlavaForCausalLM:
    """A model for config in dtype; init=False skips random initialisation (weights are loaded next)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if init:
            return LlavaForCausalLM(config)
        with no_init_weights():
            return LlavaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def load_pretrained(path_or_repo_id: str | Path, device: str | torch.device | None = "auto",
                    dtype: str | torch.dtype | None = "auto", revision: str | None = None,
                    conv_mode: str | None = None, model_base: str | Path | None = None,
                    vision_tower: str | Path | None = None, load_8bit: bool = False, load_4bit: bool = False,
                    ) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """(model in eval mode on device, processor) from a llava-hf folder or hub repo id, or from an
    original-layout LLaVA checkpoint (full, projector-only or LoRA; `model_base` for the last two,
    `vision_tower` to replace its mm_vision_tower id). `load_8bit` / `load_4bit` put the language
    model's linear layers in k-bit (bitsandbytes); model.quantization says what that saved."""
    from .original import detect_form, load_original

    if load_8bit and load_4bit:
        raise CheckpointError("choose one of load_8bit and load_4bit")
    folder = resolve_checkpoint(path_or_repo_id, revision)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if detect_form(folder) is not None:
        base = resolve_checkpoint(model_base, revision) if model_base is not None else None
        model, processor = load_original(folder, base, vision_tower, dtype=dtype, conv_mode=conv_mode)
    else:
        config = LlavaConfig.from_json_file(folder / "config.json")
        processor = LlavaProcessor.from_pretrained(folder, config, conv_mode=conv_mode)
        model = build_model(config, dtype, init=False)
        load_state_dict_into(model, read_state_dict(folder), str(folder))
    model = model.to(device=device, dtype=dtype).eval()
    model.quantization = None
    if load_8bit or load_4bit:
        from .quantize import quantize_language_model

        model.quantization = quantize_language_model(model, 8 if load_8bit else 4, compute_dtype=dtype)
    return model, processor


def save_pretrained(model: LlavaForCausalLM, processor: LlavaProcessor | None, folder: str | Path,
                    max_shard_size: str | int = "5GB") -> Path:
    """Write a llava-hf checkpoint atomically: everything goes to a temporary folder that is
    renamed into place at the end, so a crash never leaves a half-written checkpoint."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.save(tmp)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("language_model.lm_head.weight", None)
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if processor is not None:
            processor.save_pretrained(tmp)
        if folder.exists():
            _move_into(tmp, folder)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _move_into(tmp: Path, folder: Path) -> None:
    """Replace the checkpoint files of an existing folder (a training output with checkpoints, logs)
    file by file, each an atomic rename, config.json last; weight files of an older save that the new
    one does not have are removed; anything else in the folder is left alone."""
    new = {p.name for p in tmp.iterdir()}
    for old in folder.glob("model*.safetensors*"):
        if old.name not in new:
            old.unlink()
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        if path.is_dir():
            shutil.rmtree(folder / path.name, ignore_errors=True)
        os.replace(path, folder / path.name)
    tmp.rmdir()
