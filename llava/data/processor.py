"""LlavaProcessor: text + images -> input_ids (each image token expanded to its feature count),
pixel_values, image_sizes (AnyRes), and labels that train only the assistant's answers.

It reads and writes the same files as transformers' LlavaProcessor / LlavaNextProcessor
(tokenizer files, preprocessor_config.json, processor_config.json, chat_template.jinja) and gives the
same input_ids and pixel_values for the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, BatchFeature

from ..core.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from ..core.errors import CheckpointError, LlavaError, TokenizationMismatchError
from ..core.io import atomic_write_text
from . import anyres
from .conversation import CHAT_TEMPLATE, render, render_chat_template
from .image_processor import ImageProcessor


class LlavaProcessor:
    def __init__(self, tokenizer, image_processor: ImageProcessor, *, patch_size: int,
                 vision_feature_select_strategy: str = "default", num_additional_image_tokens: int = 1,
                 image_token: str = DEFAULT_IMAGE_TOKEN, chat_template: str | None = None,
                 conv_mode: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.patch_size = int(patch_size)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens)
        self.image_token = image_token
        self.chat_template = chat_template
        self.conv_mode = conv_mode or (CHAT_TEMPLATE if chat_template else "llava_v1")
        self.image_wrap: tuple[str, str] | None = None  # (<im_start>, <im_end>) for mm_use_im_start_end models
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise CheckpointError(f"the tokenizer has no {image_token!r} token")

    # -- image tokens ---------------------------------------------------------------------------------
    @property
    def tokens_per_tile(self) -> int:
        side = self.image_processor.tile_size // self.patch_size
        drop_cls = 1 if self.vision_feature_select_strategy == "default" else 0
        return side * side + self.num_additional_image_tokens - drop_cls

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Image tokens for an image of (height, width) as given to the processor."""
        if not self.image_processor.is_anyres:
            return self.tokens_per_tile
        return anyres.num_image_tokens(image_size, self.image_processor.image_grid_pinpoints,
                                       self.image_processor.tile_size, self.patch_size, self.tokens_per_tile)

    def expand_image_tokens(self, text: str, counts: list[int]) -> str:
        """Replace the i-th image token in text with counts[i] copies of it."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(counts):
            raise LlavaError(f"the text has {len(pieces) - 1} {self.image_token} tokens but "
                             f"{len(counts)} images were given")
        start, end = self.image_wrap or ("", "")
        out = [pieces[0]]
        for count, piece in zip(counts, pieces[1:]):
            out.append(start + self.image_token * count + end + piece)
        return "".join(out)

    # -- the transformers-style call ------------------------------------------------------------------
    def __call__(self, text=None, images=None, return_tensors=None, **tokenizer_kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        flat_images = _flatten_images(images)
        data = {}
        counts = []
        if flat_images:
            data.update(self.image_processor(flat_images))
            counts = [self.num_image_tokens((im.height, im.width)) for im in flat_images]
        if texts:
            per_text = [t.count(self.image_token) for t in texts]
            if sum(per_text) != len(counts):
                raise LlavaError(f"the text has {sum(per_text)} {self.image_token} tokens but "
                                 f"{len(counts)} images were given")
            expanded, start = [], 0
            for t, n in zip(texts, per_text):
                expanded.append(self.expand_image_tokens(t, counts[start:start + n]))
                start += n
            encoded = self.tokenizer(expanded, **tokenizer_kwargs)
            data = {**dict(encoded), **data}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    # -- prompts --------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            conv_mode: str | None = None) -> str:
        """The prompt text for a conversation, in the checkpoint's template (or `conv_mode`)."""
        return self.build_prompt(messages, conv_mode=conv_mode, add_generation_prompt=add_generation_prompt)[0]

    def build_prompt(self, messages: list[dict], conv_mode: str | None = None,
                     add_generation_prompt: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """(prompt, assistant spans) for messages whose content is a string (with image tokens
        inline) or a transformers-style list of {"type": "image"} / {"type": "text"} parts."""
        mode = conv_mode or self.conv_mode
        if mode == CHAT_TEMPLATE:
            if not self.chat_template:
                raise LlavaError("this checkpoint has no chat_template; pass a named --conv-mode")
            return render_chat_template(self._render_jinja, messages, add_generation_prompt)
        flat = [{"role": m["role"], "content": _content_text(m["content"], self.image_token)} for m in messages]
        return render(mode, flat, add_generation_prompt)

    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool) -> str:
        messages = [{"role": m["role"], "content": _content_parts(m["content"], self.image_token)}
                    for m in messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode_with_labels(self, prompt: str, spans: list[tuple[int, int]], image_sizes: list[tuple[int, int]],
                           sample: str = "sample") -> tuple[list[int], list[int]]:
        """input_ids and labels for a rendered conversation: labels are IGNORE_INDEX except the
        tokens inside the assistant spans. A token that straddles a span edge is an error naming
        `sample`, never a silently masked sample."""
        counts = [self.num_image_tokens(size) for size in image_sizes]
        text, spans = _expand_with_spans(prompt, spans, self.image_token, counts, self)
        encoded = self.tokenizer(text, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        labels = [IGNORE_INDEX] * len(input_ids)
        for index, (start, end) in enumerate(encoded["offset_mapping"]):
            if start == end:
                continue  # special tokens the tokenizer adds (BOS): never trained
            for span_start, span_end in spans:
                if span_start <= start and end <= span_end:
                    labels[index] = input_ids[index]
                    break
                if start < span_start < end or start < span_end < end:
                    token = self.tokenizer.convert_ids_to_tokens(input_ids[index])
                    raise TokenizationMismatchError(
                        f"{sample}: token {token!r} at characters {start}-{end} straddles the edge of an "
                        f"assistant answer ({span_start}-{span_end}); the template and tokenizer disagree")
        if spans and all(label == IGNORE_INDEX for label in labels):
            raise TokenizationMismatchError(f"{sample}: no token of the assistant answers survived tokenization")
        return input_ids, labels

    # -- files ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, config=None, conv_mode: str | None = None) -> "LlavaProcessor":
        """Load from a llava-hf folder; `config` (a LlavaConfig) fills in what the files leave out."""
        folder = Path(folder)
        proc = _read_json(folder / "processor_config.json")
        image_cfg = proc.pop("image_processor", None) or _read_json(folder / "preprocessor_config.json")
        if not image_cfg:
            raise CheckpointError(f"{folder}: no preprocessor_config.json (image processor settings)")
        if config is not None and config.is_anyres and "image_grid_pinpoints" not in image_cfg:
            image_cfg["image_grid_pinpoints"] = config.image_grid_pinpoints
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder}: cannot load the tokenizer ({e})") from None
        chat_template = _read_chat_template(folder, proc) or getattr(tokenizer, "chat_template", None)
        vision = config.vision_config if config is not None else None
        patch_size = proc.get("patch_size") or (vision.patch_size if vision is not None else None)
        if patch_size is None:
            raise CheckpointError(f"{folder}: processor_config.json has no patch_size and no model config was given")
        strategy = proc.get("vision_feature_select_strategy") or (
            config.vision_feature_select_strategy if config is not None else "default")
        additional = proc.get("num_additional_image_tokens")
        if additional is None:  # the CLS token: CLIP has one, SigLIP has none
            additional = 1 if vision is None or "clip" in vision.model_type else 0
        return cls(tokenizer, ImageProcessor.from_dict(image_cfg), patch_size=patch_size,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=additional,
                   image_token=proc.get("image_token", DEFAULT_IMAGE_TOKEN), chat_template=chat_template,
                   conv_mode=conv_mode or (config.conv_mode if config is not None else None))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        processor_class = "LlavaNextProcessor" if self.image_processor.is_anyres else "LlavaProcessor"
        image_cfg = {**self.image_processor.to_dict(), "processor_class": processor_class}
        atomic_write_text(folder / "preprocessor_config.json", json.dumps(image_cfg, indent=2) + "\n")
        proc = {"processor_class": processor_class, "patch_size": self.patch_size,
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                "num_additional_image_tokens": self.num_additional_image_tokens, "image_token": self.image_token}
        atomic_write_text(folder / "processor_config.json", json.dumps(proc, indent=2) + "\n")
        if self.chat_template:
            atomic_write_text(folder / "chat_template.jinja", self.chat_template)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_chat_template(folder: Path, proc: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return _read_json(folder / "chat_template.json").get("chat_template")
    return proc.get("chat_template")


def _flatten_images(images) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat = []
    for item in images:
        flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    for i, image in enumerate(flat):
        if isinstance(image, np.ndarray):
            flat[i] = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise LlavaError(f"image {i}: expected a PIL image or a numpy array, got {type(image).__name__}")
    return flat


def _content_text(content, image_token: str) -> str:
    """transformers-style content parts -> LLaVA text: each image as '<image>\\n', then the text."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.get("type") in ("image", "image_url"):
            out.append(image_token + "\n")
        elif part.get("type") == "text":
            out.append(part["text"])
    return "".join(out)


def _content_parts(content, image_token: str):
    """String content with inline image tokens -> transformers-style parts (for jinja templates)."""
    if not isinstance(content, str):
        return content
    parts = []
    for i, piece in enumerate(content.split(image_token)):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.removeprefix("\n") if i > 0 else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _expand_with_spans(prompt, spans, image_token, counts, processor):
    """Expand image tokens and move the spans with the text."""
    expanded = processor.expand_image_tokens(prompt, counts)
    if not counts:
        return expanded, spans
    positions, start = [], 0
    for _ in counts:
        start = prompt.index(image_token, start)
        positions.append(start)
        start += len(image_token)
    shifted = []
    for span_start, span_end in spans:
        grow_start = sum((n - 1) * len(image_token) for p, n in zip(positions, counts) if p < span_start)
        grow_end = sum((n - 1) * len(image_token) for p, n in zip(positions, counts) if p < span_end)
        shifted.append((span_start + grow_start, span_end + grow_end))
    return expanded, shifted
