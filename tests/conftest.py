"""Fixtures: tiny random llava-hf checkpoints written by transformers itself, and real photos."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava.testing import build_tiny_checkpoint

torch.set_num_threads(2)

# name -> build_tiny_checkpoint arguments
CHECKPOINTS = {
    "llava": dict(kind="llava", pad=True, chat_template=True),
    "llava_crop": dict(kind="llava", pad=False),
    "llava_next": dict(kind="llava_next"),
    "siglip_qwen2": dict(kind="llava", vision="siglip", text="qwen2", strategy="full"),
    "mistral_layers": dict(kind="llava", text="mistral", feature_layer=[-3, -1]),
    "next_siglip": dict(kind="llava_next", vision="siglip", strategy="full", text="qwen2"),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_tiny_checkpoint(root / name, seed=len(built), **CHECKPOINTS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def photos():
    """Real photos in several shapes: square, wide, tall, tiny, huge, grey, with alpha."""
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    chelsea = Image.fromarray(data.chelsea())
    coffee = Image.fromarray(data.coffee())
    rgba = astronaut.resize((90, 60)).convert("RGBA")
    alpha = np.array(rgba)
    alpha[:, :30, 3] = 0
    return {
        "square": astronaut.resize((64, 64)),
        "wide": chelsea,  # 451 x 300
        "tall": coffee.rotate(90, expand=True).resize((70, 130)),
        "tiny": astronaut.resize((5, 9)),
        "huge": coffee.resize((1400, 900)),
        "panorama": chelsea.resize((300, 40)),
        "grey": Image.fromarray(data.camera()).resize((50, 40)),
        "rgba": Image.fromarray(alpha, "RGBA"),
    }
