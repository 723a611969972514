"""Zero-shot classification: an image against candidate labels, each put in a prompt ("a photo of a
{label}"), softmax over the scaled cosine similarities, as in CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.errors import LlavaError
from ..data.images import load_image
from .encoder import ClipEncoder

DEFAULT_PROMPT = "a photo of a {label}"


def classify(encoder: ClipEncoder, images: list, labels: list[str], prompt: str = DEFAULT_PROMPT) -> np.ndarray:
    """(images, labels) probabilities."""
    if not labels:
        raise LlavaError("give at least one candidate label")
    if "{label}" not in prompt:
        raise LlavaError(f"the prompt {prompt!r} has no {{label}} to fill in")
    texts = encoder.embed_texts([prompt.format(label=label) for label in labels])
    logits = encoder.logit_scale * encoder.embed_images(images) @ texts.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def shape_accuracy(model: str | Path | ClipEncoder, shapes_root: str | Path, split: str = "test") -> dict:
    """Zero-shot shape classification on the split's one-object images of the shapes world."""
    from ..data.shapes import SHAPES

    encoder = model if isinstance(model, ClipEncoder) else ClipEncoder.load(model)
    root = Path(shapes_root)
    data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        objects.setdefault(ann["image_id"], []).append(names[ann["category_id"]])
    single = [(image["file_name"], objects[image["id"]][0]) for image in data["images"]
              if len(objects.get(image["id"], [])) == 1]
    if not single:
        raise LlavaError(f"{root}: no one-object images in the {split} split")
    probs = classify(encoder, [load_image(root / f) for f, _ in single], list(SHAPES))
    predicted = [SHAPES[i] for i in probs.argmax(axis=1)]
    correct = [p == truth for p, (_, truth) in zip(predicted, single)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "labels": list(SHAPES)}
