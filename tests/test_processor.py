"""Our processor against transformers' LlavaProcessor / LlavaNextProcessor and their PIL image processors."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, CLIPImageProcessorPil, LlavaNextImageProcessorPil

import llava
from llava.data import anyres
from llava.data.image_processor import ImageProcessor

SIZES = ["square", "wide", "tall", "tiny", "huge", "panorama", "grey", "rgba"]


@pytest.mark.parametrize("name", ["llava", "llava_crop", "llava_next", "siglip_qwen2", "next_siglip"])
def test_same_input_ids_and_pixel_values_as_transformers(checkpoints, photos, name):
    folder = checkpoints(name)
    ours = llava.LlavaProcessor.from_pretrained(folder, llava.LlavaConfig.from_json_file(folder / "config.json"))
    theirs = AutoProcessor.from_pretrained(folder)
    texts = ["USER: <image>\nWhat is in the image? ASSISTANT:",
             "USER: <image>\nCompare it with <image>\nplease. ASSISTANT:", "USER: just text ASSISTANT:"]
    images = [photos["wide"], photos["tall"], photos["tiny"]]
    a = ours(text=texts, images=images, return_tensors="pt", padding=True)
    b = theirs(text=texts, images=images, return_tensors="pt", padding=True)
    assert set(a) == set(b)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["pixel_values"].shape == b["pixel_values"].shape
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=1e-6)
    if "image_sizes" in b:
        assert torch.equal(a["image_sizes"], b["image_sizes"])


@pytest.mark.parametrize("name", SIZES)
def test_clip_pixel_values_match_clip_image_processor(photos, name):
    settings = dict(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40})
    ours = ImageProcessor(**settings)([photos[name]])["pixel_values"]
    theirs = CLIPImageProcessorPil(**settings)(photos[name], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_pad_mode_expands_to_square_with_the_mean_colour(photos):
    processor = ImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, pad_to_square=True)
    pixels = processor([photos["panorama"]])["pixel_values"][0]  # 300 x 40: wide bands of padding
    mean = np.array(processor.image_mean, dtype=np.float32)
    expected = ((np.array([122, 116, 104]) / 255).astype(np.float32) - mean) / np.array(processor.image_std,
                                                                                        dtype=np.float32)
    np.testing.assert_allclose(pixels[:, 0, 0], expected, atol=1e-6)  # the top rows are padding
    assert not np.allclose(pixels[:, 15, 15], expected, atol=1e-3)  # the middle is the photo


@pytest.mark.parametrize("name", SIZES)
def test_anyres_tiles_match_transformers(photos, name):
    pinpoints = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
    settings = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)
    ours = ImageProcessor(**settings)([photos[name]])
    theirs = LlavaNextImageProcessorPil(**settings)(photos[name], return_tensors="np")
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours["image_sizes"], theirs["image_sizes"])


@pytest.mark.parametrize("size", [(336, 336), (300, 451), (1000, 200), (200, 1000), (9, 5), (4000, 3000),
                                  (672, 672), (337, 1009), (1, 1)])
def test_anyres_token_counts_equal_transformers(checkpoints, size):
    """Token counts for the LLaVA-1.6 pinpoints at 336 px, against transformers' own arithmetic."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    folder = checkpoints("llava_next")
    theirs = LlavaNextProcessor.from_pretrained(folder)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    theirs.image_processor.image_grid_pinpoints = pinpoints
    theirs.patch_size = 14
    expected = theirs._get_number_of_features(size[0], size[1], 336, 336) - 1
    tokens_per_tile = 24 * 24
    assert anyres.num_image_tokens(size, pinpoints, 336, 14, tokens_per_tile) == expected
    assert anyres.num_tiles(size, pinpoints, 336) == image_size_to_num_patches(size, pinpoints, 336)


@pytest.mark.parametrize("name", SIZES)
def test_anyres_token_count_equals_features_the_model_packs(checkpoints, photos, name):
    model, processor = llava.load_pretrained(checkpoints("llava_next"), device="cpu")
    inputs = processor(text="<image>", images=[photos[name]], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert features[0].shape[0] == int((inputs["input_ids"] == model.config.image_token_index).sum())


def test_image_count_must_match_image_tokens(checkpoints, photos):
    _, processor = llava.load_pretrained(checkpoints("llava"), device="cpu")
    with pytest.raises(llava.core.errors.LlavaError, match="1 <image> tokens but 2 images"):
        processor(text="<image> hi", images=[photos["square"], photos["wide"]])


def test_grid_pinpoint_range_form():
    assert anyres.parse_grid_pinpoints("(1x1),...,(2x2)", 336) == [[336, 336], [672, 336], [336, 672], [672, 672]]
    assert anyres.parse_grid_pinpoints("[[336, 672], [672, 336]]") == [[336, 672], [672, 336]]
