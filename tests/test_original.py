"""Original-layout LLaVA checkpoints (full, projector-only, LoRA), built here from tiny random parts:
they load with the logits transformers' LLaVA gives for the same weights, `llava convert` writes
llava-hf that transformers opens, LoRA merges exactly, and 8-bit / 4-bit loads answer with less memory."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration)

import llava
from llava.core.errors import CheckpointError
from llava.model.original import detect_form, infer_conv_mode
from llava.testing import build_original_checkpoint

FORMS = ["full", "projector", "lora"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    cache = {}

    def get(kind, form):
        if (kind, form) not in cache:
            cache[kind, form] = build_original_checkpoint(root / kind, form=form, kind=kind,
                                                          use_bin=form != "projector")
        return cache[kind, form]

    return get


def _transformers_reference(built_parts, model, processor):
    """transformers' Llava(Next)ForConditionalGeneration holding the same weights, composed by hand."""
    vision = CLIPVisionModel.from_pretrained(built_parts["vision"])
    text_config = model.config.text_config
    common = dict(vision_config=vision.config.to_dict(), text_config=text_config.to_dict(),
                  image_token_index=processor.image_token_id, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
    if model.config.is_anyres:
        hf = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=[[28, 56], [56, 28], [56, 56],
                                                                                    [28, 84], [84, 28]], **common))
    else:
        hf = LlavaForConditionalGeneration(LlavaConfig(**common))
    llm = built_parts["parts"]["llm"]
    projector = built_parts["parts"]["projector"]
    rows = text_config.vocab_size
    state = {}
    for key, value in llm.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):  # new rows: the mean of the old ones
            value = torch.cat([value, value.mean(0, keepdim=True).expand(rows - value.shape[0], -1)])
        state[("model.language_model." + key[len("model."):]) if key.startswith("model.") else key] = value
    state.update({f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()})
    state["model.multi_modal_projector.linear_1.weight"] = projector["model.mm_projector.0.weight"]
    state["model.multi_modal_projector.linear_1.bias"] = projector["model.mm_projector.0.bias"]
    state["model.multi_modal_projector.linear_2.weight"] = projector["model.mm_projector.2.weight"]
    state["model.multi_modal_projector.linear_2.bias"] = projector["model.mm_projector.2.bias"]
    if "model.image_newline" in projector:
        state["model.image_newline"] = projector["model.image_newline"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf.eval()


def _inputs(processor, photos):
    prompt = processor.build_prompt([{"role": "user", "content": "<image>\nWhat is in the image?"}])[0]
    return processor(text=[prompt], images=[photos["wide"]], return_tensors="pt")


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("form", FORMS)
def test_each_form_loads_with_transformers_logits_for_the_same_weights(built, photos, kind, form):
    parts = built(kind, form)
    assert detect_form(parts["checkpoint"]) == form
    model, processor = llava.load_pretrained(parts["checkpoint"], device="cpu", model_base=parts["base"])
    assert model.config.model_type == kind and processor.conv_mode == "llava_v1"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert model.config.text_config.vocab_size % 64 == 0
    assert processor.image_processor.pad_to_square == (kind == "llava")  # image_aspect_ratio pad
    inputs = _inputs(processor, photos)
    reference = _transformers_reference(parts, model, processor)
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = reference(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_merged_lora_equals_the_unmerged_adapter(built):
    from peft import PeftModel

    parts = built("llava", "lora")
    model, processor = llava.load_pretrained(parts["checkpoint"], device="cpu", model_base=parts["base"])
    base = AutoModelForCausalLM.from_pretrained(parts["base"])
    unmerged = PeftModel.from_pretrained(base, str(parts["checkpoint"])).eval()
    ids = processor.tokenizer(["USER: Count to three. ASSISTANT:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged_logits = model.language_model(input_ids=ids).logits
        adapter_logits = unmerged(input_ids=ids).logits
    vocab = adapter_logits.shape[-1]
    torch.testing.assert_close(merged_logits[..., :vocab], adapter_logits, atol=1e-4, rtol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(parts["base"]).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, adapter_logits, atol=1e-3)  # the adapter matters


def test_convert_writes_llava_hf_that_transformers_opens(built, photos, tmp_path):
    parts = built("llava_next", "lora")
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "llava", "convert", str(parts["checkpoint"]), str(out),
                             "--model-base", str(parts["base"]), "--merge-lora", "--max-shard-size", "200KB"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors.index.json").exists()  # sharded
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["conv_mode"] == "llava_v1"
    assert config["image_grid_pinpoints"][0] == [28, 56]  # (height, width), from the original's (56, 28)
    ours, processor = llava.load_pretrained(parts["checkpoint"], device="cpu", model_base=parts["base"])
    hf = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    inputs = _inputs(processor, photos)
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, ours(**inputs).logits, atol=1e-4, rtol=1e-4)
    refused = subprocess.run([sys.executable, "-m", "llava", "convert", str(parts["checkpoint"]),
                              str(tmp_path / "x"), "--model-base", str(parts["base"])],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--merge-lora" in refused.stderr and not (tmp_path / "x").exists()
    half = subprocess.run([sys.executable, "-m", "llava", "convert", str(built("llava", "full")["checkpoint"]),
                           str(tmp_path / "half"), "--dtype", "float16"], capture_output=True, text=True, timeout=300)
    assert half.returncode == 0, half.stderr
    assert json.loads((tmp_path / "half" / "config.json").read_text())["text_config"]["dtype"] == "float16"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "half" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_the_form_comes_from_the_files_not_the_folder_name(built, tmp_path):
    full = built("llava", "full")
    misleading = tmp_path / "llava-v1.5-7b-lora-projector"
    shutil.copytree(full["checkpoint"], misleading)
    assert detect_form(misleading) == "full"
    projector = built("llava", "projector")
    with pytest.raises(CheckpointError, match="needs the language model it was trained on: pass --model-base"):
        llava.load_pretrained(projector["checkpoint"], device="cpu")
    config = json.loads((misleading / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # not reachable here
    (misleading / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="--vision-tower"):
        llava.load_pretrained(misleading, device="cpu")
    model, _ = llava.load_pretrained(misleading, device="cpu", vision_tower=full["vision"])
    assert model.config.vision_config.hidden_size == 32
    assert detect_form(tmp_path) is None  # a folder with no checkpoint at all


def test_conv_mode_is_inferred_as_the_original_cli_does():
    llama = {"architectures": ["LlavaLlamaForCausalLM"]}
    assert infer_conv_mode(llama, "liuhaotian/llava-v1.5-7b") == "llava_v1"
    assert infer_conv_mode(llama, "liuhaotian/llava-llama-2-13b-chat-lightning-preview") == "llava_llama_2"
    assert infer_conv_mode({"architectures": ["LlavaMistralForCausalLM"]}, "x/y") == "mistral_instruct"
    assert infer_conv_mode(llama, "liuhaotian/llava-v1.6-34b") == "chatml_direct"
    assert infer_conv_mode(llama, "my-finetune") == "llava_v1"


@pytest.mark.parametrize("bits", [8, 4])
def test_k_bit_loading_answers_with_less_memory(built, photos, bits):
    parts = built("llava", "full")
    full, processor = llava.load_pretrained(parts["checkpoint"], device="cpu")
    small, _ = llava.load_pretrained(parts["checkpoint"], device="cpu", **{f"load_{bits}bit": True})
    report = small.quantization
    assert report.bits == bits and report.layers == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert report.bytes_after < report.bytes_before
    assert type(small.language_model.lm_head).__name__ == "Linear"  # lm_head, projector, tower untouched
    assert type(small.multi_modal_projector.linear_1).__name__ == "Linear"
    inputs = _inputs(processor, photos)
    with torch.no_grad():
        exact, approx = full(**inputs).logits[0, -1], small(**inputs).logits[0, -1]
    similarity = torch.nn.functional.cosine_similarity(exact, approx, dim=0)
    assert similarity > (0.99 if bits == 8 else 0.9), similarity
    answer = small.generate(**inputs, max_new_tokens=5, tokenizer=processor.tokenizer)
    assert answer.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_gguf_export_has_llama_cpp_names_and_shapes(built, tmp_path, kind):
    from gguf import GGUFReader

    from llava.model.export_gguf import permute_rotary

    parts = built(kind, "full")
    result = subprocess.run([sys.executable, "-m", "llava", "convert", str(parts["checkpoint"]), str(tmp_path),
                             "--format", "gguf", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model, processor = llava.load_pretrained(parts["checkpoint"], device="cpu")
    text = GGUFReader(str(tmp_path / "llava-model.gguf"))
    tensors = {t.name: t for t in text.tensors}
    config = model.config.text_config
    assert len(tensors) == 2 + 9 * config.num_hidden_layers + 1
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight",
            "blk.1.ffn_down.weight"} <= set(tensors)
    assert tuple(tensors["token_embd.weight"].shape) == (config.hidden_size, config.vocab_size)  # GGUF: ne order
    q = model.language_model.model.layers[0].self_attn.q_proj.weight.detach()
    stored = tensors["blk.0.attn_q.weight"].data.reshape(q.shape)
    assert np.allclose(stored, permute_rotary(q, config.num_attention_heads).numpy())

    def field(reader, key):
        part = reader.fields[key]
        if part.types == [part.types[0]] and part.types[0].name == "STRING":
            return bytes(part.parts[part.data[0]]).decode()
        return [part.parts[i].tolist()[0] for i in part.data]

    assert field(text, "general.architecture") == "llama"
    assert len(text.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    mmproj = GGUFReader(str(tmp_path / "mmproj-model.gguf"))
    names = {t.name: t for t in mmproj.tensors}
    vision = model.config.vision_config
    kept = vision.num_hidden_layers - 1  # the features come from the second-to-last layer
    assert field(mmproj, "general.architecture") == "clip" and field(mmproj, "clip.projector_type") == "mlp"
    assert field(mmproj, "clip.vision.block_count") == [kept]
    assert {f"v.blk.{kept - 1}.attn_q.weight", "v.patch_embd.weight", "v.class_embd", "v.position_embd.weight",
            "v.pre_ln.weight", "mm.0.weight", "mm.2.bias"} <= set(names)
    assert f"v.blk.{kept}.attn_q.weight" not in names and "v.post_ln.weight" not in names
    assert tuple(names["mm.0.weight"].shape) == (vision.hidden_size, config.hidden_size)
    assert ("model.image_newline" in names) == (kind == "llava_next")
    if kind == "llava_next":
        assert field(mmproj, "clip.vision.mm_patch_merge_type") == "spatial_unpad"
        assert field(mmproj, "clip.vision.image_grid_pinpoints")[:4] == [56, 28, 28, 56]  # (width, height) pairs


def test_llama_cpp_answers_like_our_model_when_it_is_installed(built, tmp_path):
    """Runs where llama-cpp-python is installed (it builds llama.cpp from source: not part of make install)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    parts = built("llava", "full")
    result = subprocess.run([sys.executable, "-m", "llava", "convert", str(parts["checkpoint"]), str(tmp_path),
                             "--format", "gguf", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model, processor = llava.load_pretrained(parts["checkpoint"], device="cpu")
    prompt = "USER: What is in the image? ASSISTANT:"
    ids = processor.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=12, tokenizer=processor.tokenizer, ignore_eos=True)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "llava-model.gguf"), n_ctx=256, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 12:
            break
    assert theirs == ours[0, len(ids):].tolist()
