"""Batched generation with a KV cache: left-padded prompts, per-row EOS and stop strings, streaming.

`generate_ids` is token-level and mirrors transformers' generate (returns prompt + new tokens);
`generate_text` goes from prompts and images to answers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.errors import ContextLengthError, LlavaError
from .sampling import SamplingParams, next_tokens
from .stopping import TextStream


def _eos_ids(model, tokenizer, eos_token_id) -> set[int]:
    if eos_token_id is not None:
        return set(eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id])
    ids = set()
    config_eos = getattr(model.config.text_config, "eos_token_id", None)
    if config_eos is not None:
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_sizes=None, *, params: SamplingParams | None = None,
                 tokenizer=None, eos_token_id=None, pad_token_id: int | None = None,
                 on_text: Callable[[int, str], None] | None = None, streams: list[TextStream] | None = None,
                 image_features: list[torch.Tensor] | None = None, **overrides) -> torch.Tensor:
    """Prompt ids (batch, length), left-padded -> (batch, length + new) ids, rows padded after they end.

    Sampling settings come from `params` or keyword overrides in transformers' spelling
    (max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed, stop_strings).
    `on_text(row, delta)` receives each row's answer text as it is produced (needs `tokenizer`).
    `image_features` (one tensor per image, in order) may replace pixel_values.
    """
    params = _params_from(params, overrides)
    if params.stop and tokenizer is None and streams is None:
        raise LlavaError("stop strings need the tokenizer: pass tokenizer=processor.tokenizer")
    device = model.device
    input_ids = input_ids.to(device)
    batch, length = input_ids.shape
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    context = model.context_length
    if length >= context:
        raise ContextLengthError(f"the prompt is {length} tokens; the model's context length is {context}")
    max_new = min(params.max_new_tokens, context - length)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    if streams is None and tokenizer is not None:
        streams = [TextStream(tokenizer, params.stop) for _ in range(batch)]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                image_sizes=image_sizes, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                image_features=image_features)
    cache = out.past_key_values
    sequences = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_position = position_ids[:, -1:] + 1
    for step in range(max_new):
        token = next_tokens(out.logits[:, -1], sequences, params, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        for row in range(batch):
            if finished[row]:
                continue
            token_id = int(token[row])
            if token_id in eos and not params.ignore_eos:
                finished[row] = True
                continue
            if streams is not None:
                delta = streams[row].push(token_id)
                if delta and on_text is not None:
                    on_text(row, delta)
                if streams[row].stopped:
                    finished[row] = True
        if bool(finished.all()) or step == max_new - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(token[:, None])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_position = next_position + 1
    if streams is not None and on_text is not None:
        for row, stream in enumerate(streams):
            delta = stream.finish()
            if delta:
                on_text(row, delta)
    return sequences


def _params_from(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    """Settings from params plus transformers-style keywords; do_sample=False means greedy."""
    if not overrides:
        return params or SamplingParams()
    values = dict(vars(params)) if params is not None else {}
    do_sample = overrides.pop("do_sample", None)
    if "stop_strings" in overrides:
        stop = overrides.pop("stop_strings")
        overrides["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    for ignored in ("use_cache", "num_beams", "return_dict_in_generate", "output_scores"):
        overrides.pop(ignored, None)
    unknown = set(overrides) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown generation arguments: {', '.join(sorted(unknown))}")
    values.update(overrides)
    if do_sample is False:
        values["temperature"] = 0.0
    elif do_sample and not values.get("temperature"):
        values["temperature"] = 1.0
    return SamplingParams(**values)


def generate_text(model, processor, prompts: list[str], images: list | None = None,
                  params: SamplingParams | None = None,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Answers for a batch of prompt strings (with image tokens inline) and their images in order."""
    params = params or SamplingParams()
    tokenizer = processor.tokenizer
    inputs = processor(text=prompts, images=images or None, return_tensors="pt", padding=True,
                       padding_side="left")
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.device)
    generate_ids(model, inputs["input_ids"], inputs["attention_mask"], pixel_values, inputs.get("image_sizes"),
                 params=params, tokenizer=tokenizer, on_text=on_text, streams=streams)
    return [stream.text for stream in streams]
