"""LlavaForCausalLM against transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import llava
from llava.core.constants import IGNORE_INDEX
from llava.core.errors import CheckpointError, LlavaError
from llava.model.checkpoint import build_model

NAMES = ["llava", "llava_crop", "llava_next", "siglip_qwen2", "mistral_layers", "next_siglip"]


def _hf(folder):
    config = json.loads((folder / "config.json").read_text())
    cls = LlavaNextForConditionalGeneration if config["model_type"] == "llava_next" else LlavaForConditionalGeneration
    return cls.from_pretrained(folder).eval()


def _batch(folder, photos, texts, images, **kwargs):
    return AutoProcessor.from_pretrained(folder)(text=texts, images=images, return_tensors="pt", padding=True,
                                                 **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(checkpoints, photos, name):
    folder = checkpoints(name)
    model, _ = llava.load_pretrained(folder, device="cpu")
    hf = _hf(folder)
    texts = ["USER: <image>\nWhat is in the image? ASSISTANT: A cat.",
             "USER: <image>\nand <image>\nside by side? ASSISTANT:",
             "USER: no image here at all ASSISTANT:"]
    for side in ("left", "right"):
        inputs = _batch(folder, photos, texts, [photos["wide"], photos["tall"], photos["huge"]], padding_side=side)
        with torch.no_grad():
            ours = model(**inputs).logits
            theirs = hf(**inputs).logits
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=1e-4)  # every real token


def test_left_padding_does_not_change_a_rows_logits(checkpoints, photos):
    model, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    short = "USER: <image>\nHi ASSISTANT:"
    alone = processor(text=[short], images=[photos["square"]], return_tensors="pt")
    batch = processor(text=[short, "USER: a much longer question about nothing in particular ASSISTANT:"],
                      images=[photos["square"]], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        a = model(**alone).logits[0, -1]
        b = model(**batch).logits[0, -1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_loss_equals_transformers(checkpoints, photos, name):
    folder = checkpoints(name)
    model, _ = llava.load_pretrained(folder, device="cpu")
    hf = _hf(folder)
    inputs = _batch(folder, photos, ["USER: <image>\nWhat? ASSISTANT: A cat.</s>", "USER: hi ASSISTANT: hello</s>"],
                    [photos["wide"]], padding_side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    labels = labels.masked_fill(labels == model.config.image_token_index, IGNORE_INDEX)
    ours = model(**inputs, labels=labels).loss
    theirs = hf(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    ours.backward()  # the loss reaches the projector through the spliced image features
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_saved_checkpoint_loads_in_transformers_with_equal_logits(checkpoints, photos, tmp_path, name):
    folder = checkpoints(name)
    model, processor = llava.load_pretrained(folder, device="cpu")
    with torch.no_grad():
        model.multi_modal_projector.linear_1.weight.add_(0.5)  # make it ours, not a copy of the input
    llava.save_pretrained(model, processor, tmp_path / "saved")
    hf = _hf(tmp_path / "saved")
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    inputs = hf_processor(text=["USER: <image>\nWhat? ASSISTANT:"], images=[photos["tall"]], return_tensors="pt")
    ours_inputs = processor(text=["USER: <image>\nWhat? ASSISTANT:"], images=[photos["tall"]], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ours_inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**ours_inputs).logits, hf(**inputs).logits, rtol=0, atol=1e-4)
    keys = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert "multi_modal_projector.linear_1.weight" in keys
    assert any(k.startswith("language_model.model.layers.") for k in keys) and "language_model.lm_head.weight" in keys
    assert (name == "llava_next") == ("image_newline" in keys)


def test_loads_hub_layout_with_vision_model_prefix(checkpoints, photos, tmp_path):
    """llava-hf repos on the hub store vision_tower.vision_model.*; both spellings load."""
    import shutil

    folder = tmp_path / "hub"
    shutil.copytree(checkpoints("llava"), folder)
    tensors = load_file(folder / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    renamed["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    a, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    b, _ = llava.load_pretrained(folder, device="cpu")
    inputs = processor(text="USER: <image>\nWhat? ASSISTANT:", images=[photos["wide"]], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)


def test_sharded_save_round_trips(checkpoints, tmp_path):
    model, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    llava.save_pretrained(model, processor, tmp_path / "sharded", max_shard_size=100_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again, _ = llava.load_pretrained(tmp_path / "sharded", device="cpu")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("projector_type", ["linear", "mlp3x_gelu", "identity"])
def test_other_projectors_train_save_and_load(checkpoints, photos, tmp_path, projector_type):
    config = llava.LlavaConfig.from_json_file(checkpoints("llava") / "config.json")
    config.projector_type = projector_type
    if projector_type == "identity":
        config.vision_config.hidden_size = config.text_config.hidden_size
        config.vision_config.num_attention_heads = 4
    _, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    model = build_model(config)
    expected = {"linear": ["linear_1"], "mlp3x_gelu": ["linear_1", "linear_2", "linear_3"], "identity": []}
    names = sorted({n.split(".")[0] for n, _ in model.multi_modal_projector.named_parameters()})
    assert names == expected[projector_type]
    llava.save_pretrained(model, processor, tmp_path / projector_type)
    saved = json.loads((tmp_path / projector_type / "config.json").read_text())
    assert saved["projector_type"] == projector_type and saved["model_type"] == "llava"
    again, _ = llava.load_pretrained(tmp_path / projector_type, device="cpu")
    inputs = processor(text="USER: <image>\nWhat? ASSISTANT:", images=[photos["wide"]], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, again(**inputs).logits)


def test_image_token_feature_mismatch_is_a_clear_error(checkpoints, photos):
    model, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    inputs = processor(text="USER: <image>\nWhat? ASSISTANT:", images=[photos["wide"]], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"][:, :4], inputs["input_ids"][:, 8:]], dim=1)  # drop 4 image tokens
    with pytest.raises(LlavaError, match="image tokens but the images give"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_weights_that_do_not_fit_the_config_are_named(checkpoints, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(checkpoints("llava"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("multi_modal_projector.linear_2.bias")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear_2.bias"):
        llava.load_pretrained(folder, device="cpu")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        llava.load_pretrained(tmp_path / "nowhere", device="cpu")
