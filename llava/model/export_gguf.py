"""Export for llama.cpp / Ollama: the language model as a GGUF text model and the CLIP vision tower
with the projector as an `mmproj` GGUF, under the tensor and key names llama.cpp's mtmd (clip.cpp)
reads for LLaVA's MLP projector, written with the `gguf` package.

    llava-model.gguf    token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm,
                        output_norm, output; llama.* (or qwen2.*) hyperparameters; the tokenizer
    mmproj-model.gguf   v.patch_embd, v.class_embd, v.position_embd, v.pre_ln, v.blk.N.*, mm.0 / mm.2,
                        model.image_newline (AnyRes); clip.* keys. Layers after the selected feature
                        layer are left out, so llama.cpp's encoder ends where LLaVA reads its features.
Both files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CheckpointError
from .llava import LlavaForCausalLM

TEXT_ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def export_gguf(model: LlavaForCausalLM, processor, folder: str | Path, outtype: str = "f16",
                name: str = "llava") -> tuple[Path, Path]:
    """Write folder/llava-model.gguf and folder/mmproj-model.gguf; returns their paths."""
    if outtype not in ("f16", "f32"):
        raise CheckpointError(f"outtype must be f16 or f32, got {outtype!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = _atomic(folder / "llava-model.gguf", lambda path: _write_text(model, processor, path, outtype, name))
    mmproj = _atomic(folder / "mmproj-model.gguf", lambda path: _write_mmproj(model, processor, path, outtype, name))
    return text, mmproj


def _atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _array(tensor: torch.Tensor, outtype: str) -> np.ndarray:
    """2-D and larger weights in the chosen type; norms, biases and other 1-D tensors in f32."""
    array = tensor.detach().float().cpu().numpy()
    return array.astype(np.float16) if outtype == "f16" and array.ndim >= 2 else array


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotate-half layout to the interleaved pairs llama.cpp's llama uses."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _write_text(model: LlavaForCausalLM, processor, path: Path, outtype: str, name: str) -> None:
    import gguf

    config = model.config.text_config
    arch = TEXT_ARCHES.get(config.model_type)
    if arch is None:
        raise CheckpointError(f"GGUF export supports llama, mistral and qwen2 language models, not "
                              f"{config.model_type}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _write_tokenizer(writer, processor.tokenizer, model.get_input_embeddings().weight.shape[0], arch)
    state = model.language_model.state_dict()
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", _array(state["model.embed_tokens.weight"], outtype))
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{ours}.{kind}"
                if key not in state:
                    continue
                tensor = state[key]
                if arch == "llama" and ours in ("self_attn.q_proj", "self_attn.k_proj"):
                    tensor = permute_rotary(tensor, heads if ours.endswith("q_proj") else kv_heads)
                writer.add_tensor(f"blk.{i}.{theirs}.{kind}", _array(tensor, outtype))
    writer.add_tensor("output_norm.weight", _array(state["model.norm.weight"], outtype))
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output.weight", _array(head, outtype))
    _finish(writer)


def _write_tokenizer(writer, tokenizer, rows: int, arch: str) -> None:
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows:
        raise CheckpointError(f"the tokenizer has {len(vocab)} tokens but the embeddings only {rows} rows")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = {t["id"] for t in data.get("added_tokens", [])}
    tokens, scores, types = [], [], []
    for i in range(rows):
        token = by_id.get(i)
        if token is None:  # embedding rows past the tokenizer (padded to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN if i == tokenizer.unk_token_id else gguf.TokenType.CONTROL
                         if i in special else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.BYTE
                         if len(token) == 6 and token.startswith("<0x") else gguf.TokenType.NORMAL)
        scores.append(-float(i))  # BPE: earlier (merged first) tokens score higher
    pre = (data.get("pre_tokenizer") or {}).get("type")
    spm_like = pre == "Metaspace" or (data.get("decoder") or {}).get("type") in ("Metaspace", "Sequence")
    if spm_like and arch == "llama":
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
        merges = data["model"].get("merges", [])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(int(value))
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bool(adds_bos))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _write_mmproj(model: LlavaForCausalLM, processor, path: Path, outtype: str, name: str) -> None:
    import gguf

    config = model.config
    vision = config.vision_config
    if not vision.model_type.startswith("clip"):
        raise CheckpointError(f"mmproj export supports CLIP vision towers (llama.cpp's LLaVA path), not "
                              f"{vision.model_type}")
    if config.vision_feature_select_strategy != "default":
        raise CheckpointError("mmproj export needs vision_feature_select_strategy 'default' (llama.cpp drops CLS)")
    if not isinstance(config.vision_feature_layer, int):
        raise CheckpointError("mmproj export needs a single vision_feature_layer")
    if model.multi_modal_projector.depth != 2:
        raise CheckpointError(f"mmproj export needs an mlp2x projector (LLaVA-1.5 / 1.6), not "
                              f"{config.projector_type}")
    layers = vision.num_hidden_layers
    keep = layers + 1 + config.vision_feature_layer if config.vision_feature_layer < 0 else config.vision_feature_layer
    image_processor = processor.image_processor
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{name} image encoder")
    writer.add_description("LLaVA CLIP vision tower and MLP projector, exported by llava")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", image_processor.tile_size)
    writer.add_uint32("clip.vision.patch_size", vision.patch_size)
    writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", vision.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", config.text_config.hidden_size)
    writer.add_uint32("clip.vision.block_count", keep)
    writer.add_uint32("clip.vision.attention.head_count", vision.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.layer_norm_eps)
    writer.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
    writer.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])
    writer.add_bool("clip.use_gelu", vision.hidden_act == "gelu")  # false: CLIP's quick_gelu
    if config.is_anyres:
        writer.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
        writer.add_array("clip.vision.image_grid_pinpoints",
                         [int(v) for h, w in config.image_grid_pinpoints for v in (w, h)])  # (width, height)
        writer.add_uint32("clip.vision.image_crop_resolution", image_processor.tile_size)
    else:
        writer.add_string("clip.vision.mm_patch_merge_type", "flat")
    state = model.vision_tower.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""

    def get(key):
        return state[prefix + key]

    writer.add_tensor("v.class_embd", _array(get("embeddings.class_embedding"), "f32"))
    writer.add_tensor("v.patch_embd.weight", _array(get("embeddings.patch_embedding.weight"), outtype))
    writer.add_tensor("v.position_embd.weight", _array(get("embeddings.position_embedding.weight"), outtype))
    for kind in ("weight", "bias"):
        writer.add_tensor(f"v.pre_ln.{kind}", _array(get(f"pre_layrnorm.{kind}"), outtype))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
             "mlp.fc2": "ffn_down"}
    for i in range(keep):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                writer.add_tensor(f"v.blk.{i}.{theirs}.{kind}", _array(get(f"encoder.layers.{i}.{ours}.{kind}"),
                                                                       outtype))
    projector = model.multi_modal_projector
    for k in range(1, projector.depth + 1):
        linear = getattr(projector, f"linear_{k}")
        writer.add_tensor(f"mm.{2 * (k - 1)}.weight", _array(linear.weight, outtype))
        if linear.bias is not None:
            writer.add_tensor(f"mm.{2 * (k - 1)}.bias", _array(linear.bias, "f32"))
    if config.is_anyres:
        writer.add_tensor("model.image_newline", _array(model.image_newline, "f32"))
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
