"""The original LLaVA's `llava.mm_utils`: tokenizer_image_token, process_images, expand2square,
get_model_name_from_path, KeywordsStoppingCriteria, load_image_from_base64, forwarding to our
processor so that the ids and pixels are exactly those `llava chat` uses."""

from __future__ import annotations

import base64
import io
import weakref

import torch
from PIL import Image
from transformers import StoppingCriteria

from .core.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from .data.images import expand_to_square

_WITH_IMAGE_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_with_image_token(tokenizer):
    """The tokenizer itself if it knows <image>; else a copy that does (the original's tokenizers
    don't: it marks images with IMAGE_TOKEN_INDEX instead). The caller's tokenizer is not changed."""
    known = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if known is not None and known != tokenizer.unk_token_id:
        return tokenizer
    if tokenizer not in _WITH_IMAGE_TOKEN:
        import copy

        from tokenizers import AddedToken

        clone = copy.deepcopy(tokenizer)
        clone.add_tokens(AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
        _WITH_IMAGE_TOKEN[tokenizer] = clone
    return _WITH_IMAGE_TOKEN[tokenizer]


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX,
                          return_tensors: str | None = None):
    """Token ids of `prompt` with `image_token_index` where each <image> stands: the prompt is
    tokenized whole, as our processor does, so after model.generate expands each image the ids are
    exactly those of `llava chat`."""
    tok = _tokenizer_with_image_token(tokenizer)
    image_id = tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    input_ids = [image_token_index if t == image_id else t for t in tok(prompt)["input_ids"]]
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


def process_images(images, image_processor, model_cfg=None):
    """Pixel values for the model, with the checkpoint's aspect mode (pad / AnyRes / crop). With the
    image_processor of our vision tower (load_pretrained_model's) this is the checkpoint's own
    processing; with a transformers CLIPImageProcessor, model_cfg.image_aspect_ratio decides."""
    ours = getattr(image_processor, "llava_image_processor", None)
    if ours is not None:
        return torch.as_tensor(ours(list(images))["pixel_values"])
    aspect = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        pixels = [image_processor.preprocess(expand2square(im, background), return_tensors="pt")["pixel_values"][0]
                  for im in images]
        return torch.stack(pixels)
    if aspect is not None and str(aspect).startswith("anyres"):
        raise ValueError("AnyRes needs the image_processor of a model loaded by llava (vision_tower.image_processor)")
    return image_processor(images, return_tensors="pt")["pixel_values"]


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    return expand_to_square(pil_img, tuple(background_color))


def load_image_from_base64(image: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image)))


def get_model_name_from_path(model_path: str) -> str:
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-"):
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop once every row's new text contains one of the keywords (the template's stop string).
    Our models' generate turns it into stop strings; with transformers' generate it works as is."""

    def __init__(self, keywords: list[str], tokenizer, input_ids: torch.Tensor):
        self.keywords = [k for k in keywords if k]
        self.tokenizer = tokenizer
        self.start_len = input_ids.shape[1]
        self.max_keyword_len = max((len(tokenizer(k).input_ids) for k in self.keywords), default=1) + 1

    def __call__(self, output_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        offset = max(1, min(output_ids.shape[1] - self.start_len, self.max_keyword_len))
        texts = self.tokenizer.batch_decode(output_ids[:, -offset:], skip_special_tokens=False)
        done = [any(k in text for k in self.keywords) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=output_ids.device)
