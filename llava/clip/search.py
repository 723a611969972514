"""Retrieval over a folder of images: `index` embeds every image once and stores the embeddings on
disk (embeddings.npy + index.json, written atomically); `search` ranks the indexed images against a
text or an image by cosine similarity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import LlavaError
from ..core.io import atomic_path, atomic_write_text
from ..data.images import load_image
from .encoder import ClipEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Hit:
    path: str
    score: float


def index_folder(encoder: ClipEncoder, folder: str | Path, index: str | Path, batch_size: int = 64,
                 progress: bool = False) -> int:
    """Embed every image under `folder` (recursively) into the index folder; returns the count."""
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        raise LlavaError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise LlavaError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="clip index", disable=not progress, unit="batch"):
        chunks.append(encoder.embed_images([load_image(p) for p in paths[start:start + batch_size]]))
    embeddings = np.concatenate(chunks).astype(np.float32)
    index = Path(index)
    with atomic_path(index / "embeddings.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, embeddings)
    atomic_write_text(index / "index.json", json.dumps({
        "model": encoder.name, "root": str(folder.resolve()),
        "paths": [str(p.relative_to(folder)) for p in paths]}, indent=1))
    return len(paths)


def load_index(index: str | Path) -> tuple[dict, np.ndarray]:
    index = Path(index)
    try:
        meta = json.loads((index / "index.json").read_text())
        embeddings = np.load(index / "embeddings.npy")
    except FileNotFoundError as e:
        raise LlavaError(f"{index}: not a CLIP index ({Path(e.filename).name} missing; run `llava clip index`)") \
            from None
    if len(meta["paths"]) != len(embeddings):
        raise LlavaError(f"{index}: index.json and embeddings.npy disagree; rebuild the index")
    return meta, embeddings


def search(encoder: ClipEncoder, index: str | Path, text: str | None = None, image: str | Path | None = None,
           top_k: int = 5) -> list[Hit]:
    """The top_k indexed images for a text query or a query image."""
    if (text is None) == (image is None):
        raise LlavaError("give exactly one of a text query or a query image")
    meta, embeddings = load_index(index)
    if embeddings.shape[1] != encoder.model.config.projection_dim:
        raise LlavaError(f"{index}: built with a model of embedding size {embeddings.shape[1]}, this model's is "
                         f"{encoder.model.config.projection_dim}")
    query = encoder.embed_texts([text])[0] if text is not None else encoder.embed_images([load_image(image)])[0]
    scores = embeddings @ query
    order = np.argsort(-scores, kind="stable")[:top_k]
    root = Path(meta["root"])
    return [Hit(str(root / meta["paths"][i]), float(scores[i])) for i in order]
