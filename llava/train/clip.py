"""A small CLIP (ViT image encoder + text encoder) trained from scratch with the contrastive loss on
image-caption pairs: the mini recipe's stand-in for OpenAI's CLIP ViT-L/14. Saved as a transformers
CLIPModel with its tokenizer (</s> appended, where the text encoder pools) and a CLIPImageProcessor
config, so the LLaVA stage-1 code takes its vision half like any CLIP checkpoint."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import TrainConfigError
from ..core.io import atomic_dir
from ..data.image_processor import ImageProcessor
from ..data.images import load_image
from .optim import adamw_with_cosine


@dataclass
class ClipConfig:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4
    projection_dim: int = 128
    max_text_length: int = 64
    batch_size: int = 128
    steps: int = 400
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    hard_negatives: bool = True  # NegCLIP: each caption also competes with a copy that has one word swapped
    curriculum_steps: int = 0    # with curriculum pairs: the first steps draw only from them, later ones half
    position_init_std: float | None = None  # initial std of the vision position embeddings (None: transformers')
    region_weight: float = 0.0   # with regions: weight of the patch-phrase term (RegionCLIP's region-text loss)
                                 # beside the image-caption loss; 0 leaves it out
    place_weight: float = 0.0    # with places: weight of the patch-place term (each patch token is also
                                 # classified against the phrases of the places, "at the top left"); 0 leaves it out
    region_place_weight: float = 0.0  # with regions and places: weight of the same term with phrases that say
                                      # what and where ("a small red circle at the top left"); 0 leaves it out
    seed: int = 0


def image_processor_for(config: ClipConfig) -> ImageProcessor:
    side = config.image_size
    return ImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def swap_one_word(caption: str, groups: tuple[tuple[str, ...], ...], rng: random.Random) -> str | None:
    """The caption with one word of a group (a shape, a colour) replaced by another of its group; None if
    it has none. The hard negative of NegCLIP (Yuksekgonul et al. 2023): an image must tell them apart."""
    words = re.findall(r"\w+|\W+", caption)
    places = [(i, g) for i, w in enumerate(words) for g in groups if w.lower() in g]
    if not places:
        return None
    i, group = rng.choice(places)
    words[i] = rng.choice([w for w in group if w != words[i].lower()])
    return "".join(words)


def _contrastive_loss(image_embeds, text_embeds, scale, positives):
    """CLIP's symmetric loss with UniCL's multi-positive targets (Yang et al. 2022). `text_embeds` holds
    the batch's captions and then any hard negatives; `positives[i, j]` is true where text j says what
    image i's caption says (the same string: another image's identical caption, or a hard negative that
    happens to be one), and image i's target spreads evenly over those. Texts are matched against the
    images for their own captions only."""
    import torch.nn.functional as F

    n = len(image_embeds)
    targets = positives.float() / positives.sum(1, keepdim=True)
    per_image = F.log_softmax(scale * image_embeds @ text_embeds.T, dim=1)
    per_text = F.log_softmax(scale * text_embeds[:n] @ image_embeds.T, dim=1)
    text_targets = positives[:, :n].float() / positives[:, :n].sum(1, keepdim=True)
    return -((targets * per_image).sum(1).mean() + (text_targets * per_text).sum(1).mean()) / 2


def patch_embeddings(model, last_hidden_state):
    """A CLIPModel's patch tokens (`last_hidden_state` of its vision model, class token first) taken
    through the final layer norm and the visual projection as the class token is: (images, patches,
    projection_dim), not normalised. What the region term matches against the phrases."""
    return model.visual_projection(model.vision_model.post_layernorm(last_hidden_state[:, 1:]))


def _region_loss(patch_embeds, phrase_embeds, scale, labels):
    """RegionCLIP's region-text term (Zhong et al. 2022) with patches for regions: each patch token, taken
    through the final layer norm and the visual projection as the class token is, is classified against
    the embeddings of every phrase a region can have ("a small red circle", "background"). `patch_embeds`
    (images, patches, dim) and `phrase_embeds` (phrases, dim) are normalised; `labels` (images, patches)
    index the phrases."""
    import torch.nn.functional as F

    logits = scale * patch_embeds @ phrase_embeds.T
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _region_labels(regions: dict[str, list[str]], paths: list[str], patches: int):
    """(phrases, labels): the sorted phrases of `regions` and, per path, its patches' indices into them."""
    for path in paths:
        if path not in regions:
            raise TrainConfigError(f"CLIP regions: no phrases for image {path}")
        if len(regions[path]) != patches:
            raise TrainConfigError(f"CLIP regions: image {path} has {len(regions[path])} region phrases, "
                                   f"the vision tower {patches} patches (one phrase per patch, row by row)")
    phrases = sorted({phrase for path in paths for phrase in regions[path]})
    index = {phrase: i for i, phrase in enumerate(phrases)}
    return phrases, torch.tensor([[index[phrase] for phrase in regions[path]] for path in paths])


def _length_buckets(lengths: list[int], stretch: float = 1.25) -> list[torch.Tensor]:
    """Indices of texts of `lengths` in buckets of like length, shortest first: a bucket takes texts while
    they are at most `stretch` times its shortest. CLIP's text encoder is causal and pools at </s>, so
    what follows a text's </s> changes nothing of its embedding: each bucket is padded to its own longest
    text rather than all to the batch's longest (a step's captions and their hard negatives run from 5
    to 36 tokens, most of them under 10): the same embeddings for less compute."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets: list[list[int]] = []
    for i in order:
        if not buckets or lengths[i] > stretch * lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return [torch.tensor(bucket) for bucket in buckets]


def _bucketed_text_features(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """CLIP text features (the projected pooled </s>) of `texts`, computed in `_length_buckets`."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    buckets = _length_buckets([len(row) for row in ids])
    features = [model.get_text_features(**tokenizer.pad({"input_ids": [ids[i] for i in bucket]}, return_tensors="pt"))
                for bucket in buckets]
    features = torch.cat([getattr(f, "pooler_output", f) for f in features])  # transformers 5 returns an output
    return features[torch.argsort(torch.cat(buckets))]


def _prefixed_pieces(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """What `_prefixed_text_features` takes, built once: the distinct first halves of `pairs` ("a small red
    circle"; "" for none) as <s> and their tokens (`prefixes`, padded, with `prefix_mask`), per pair the
    second half's tokens and </s> (`tails`, `tail_mask`) and the one-hot `pick` of its prefix. A pair whose
    joined text does not tokenize as the two halves do (or would be truncated) is kept whole behind the
    bare <s>."""
    joined = [" ".join(part for part in pair if part) for pair in pairs]
    whole = tokenizer(joined, truncation=True, max_length=max_length)["input_ids"]
    starts = sorted({first for first, _ in pairs} | {""})
    position = {first: i for i, first in enumerate(starts)}
    prefix_ids = [tokenizer(first)["input_ids"][:-1] for first in starts]  # less the </s> appended
    tail_ids, owner = [], []
    for (first, second), ids in zip(pairs, whole):
        tail = tokenizer(second, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] if second \
            else [tokenizer.eos_token_id]
        if prefix_ids[position[first]] + tail == ids:
            tail_ids.append(tail)
            owner.append(position[first])
        else:
            tail_ids.append(ids[1:])
            owner.append(position[""])
    prefixes, prefix_mask = _padded(prefix_ids)
    tails, tail_mask = _padded(tail_ids)
    # each tail's prefix picked by a one-hot product rather than by indexing: indexing's backward adds the
    # nine tails' gradients into their prefix in whatever order its threads finish (another CLIP each run)
    pick = torch.nn.functional.one_hot(torch.tensor(owner), len(starts)).float()
    return {"prefixes": prefixes, "prefix_mask": prefix_mask, "tails": tails, "tail_mask": tail_mask, "pick": pick}


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): `rows` right-padded with 0 to the longest, and which places are real tokens."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    return ids, torch.arange(width) < torch.tensor([len(row) for row in rows])[:, None]


def _causal(n: int) -> torch.Tensor:
    """(n, n) bool: token i may attend to tokens 0..i."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def _heads(attention, projection, states: torch.Tensor) -> torch.Tensor:
    """`projection(states)` split into CLIP attention's heads: (batch, heads, tokens, head_dim)."""
    return projection(states).unflatten(-1, (attention.num_heads, attention.head_dim)).transpose(1, 2)


def _prefixed_text_features(model, prefixes: torch.Tensor, prefix_mask: torch.Tensor, tails: torch.Tensor,
                            tail_mask: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """CLIP text features (the projected pooled </s>) of each tail after the prefix `pick` names (the
    tensors of `_prefixed_pieces`), each prefix through the encoder once. The text encoder is causal, so a
    prefix's states are the same in every text that starts with it: the tails attend to the keys and
    values of their prefix's pass. The region phrases of `train_clip` share their first words nine times
    over ("a small red circle" before each place), which halves the tokens the phrase terms take through
    the encoder each step."""
    import torch.nn.functional as F

    text = model.text_model
    owner = pick.argmax(1)
    prefix_attend = (_causal(prefixes.shape[1]) & prefix_mask[:, None, :])[:, None]
    tail_attend = torch.cat([prefix_mask[owner][:, None, :].expand(-1, tails.shape[1], -1),
                             _causal(tails.shape[1]) & tail_mask[:, None, :]], dim=-1)[:, None]
    start = prefix_mask.sum(1)[owner, None]
    hidden_p = text.embeddings(input_ids=prefixes)
    hidden_t = text.embeddings(input_ids=tails, position_ids=start + torch.arange(tails.shape[1]))
    for layer in text.encoder.layers:
        attention = layer.self_attn
        normed_p, normed_t = layer.layer_norm1(hidden_p), layer.layer_norm1(hidden_t)
        keys_p, values_p = _heads(attention, attention.k_proj, normed_p), _heads(attention, attention.v_proj, normed_p)
        out_p = F.scaled_dot_product_attention(_heads(attention, attention.q_proj, normed_p), keys_p, values_p,
                                               attn_mask=prefix_attend, scale=attention.scale)
        queries_t = _heads(attention, attention.q_proj, normed_t)
        keys_t = torch.cat([torch.einsum("tp,phkd->thkd", pick, keys_p), _heads(attention, attention.k_proj, normed_t)],
                           dim=2)
        values_t = torch.cat([torch.einsum("tp,phkd->thkd", pick, values_p),
                              _heads(attention, attention.v_proj, normed_t)], dim=2)
        out_t = F.scaled_dot_product_attention(queries_t, keys_t, values_t, attn_mask=tail_attend,
                                               scale=attention.scale)
        hidden_p = hidden_p + attention.out_proj(out_p.transpose(1, 2).flatten(2))
        hidden_t = hidden_t + attention.out_proj(out_t.transpose(1, 2).flatten(2))
        hidden_p = hidden_p + layer.mlp(layer.layer_norm2(hidden_p))
        hidden_t = hidden_t + layer.mlp(layer.layer_norm2(hidden_t))
    ends = tail_mask.sum(1) - 1  # each tail's </s>
    pooled = text.final_layer_norm(hidden_t[torch.arange(len(tails)), ends])
    return model.text_projection(pooled)


def train_clip(pairs: list[tuple[str, list[str]]], tokenizer, config: ClipConfig, output: str | Path,
               progress: bool = False, swap_groups: tuple[tuple[str, ...], ...] = (),
               curriculum: list[tuple[str, list[str]]] = (),
               regions: dict[str, list[str]] | None = None, places: list[str] | None = None) -> dict:
    """Train a fresh CLIPModel on (image path, captions) pairs; each step draws one caption per image.
    With `hard_negatives` and `swap_groups` (e.g. the shape names, the colour names) each caption gets a
    one-word-swapped twin as an extra negative.

    `curriculum` pairs (e.g. one-object scenes captioned "a photo of a circle") come first: the first
    `config.curriculum_steps` steps draw only from them, later steps half from them and half from `pairs`.
    Without them the two encoders settle on a shared blind spot: when colours, positions and counts
    already tell a batch's captions apart, neither learns the shape words or the shapes.

    `regions` maps each image path (of `pairs` and `curriculum`) to one phrase per patch, row by row: what
    that patch shows ("a small red circle", "background"). With `config.region_weight` > 0 each step adds
    `_region_loss`: the patch tokens then say what lies in their own cell, not only the class token what
    the image shows, and LLaVA reads those tokens. A web-scale CLIP's patch tokens carry what is in their
    patch (RegionCLIP sharpens that with this term); a CLIP trained on 7,000 shapes images got little of it.

    `places` names where each patch lies, one phrase per patch row by row ("at the top left", ...). With
    `config.place_weight` > 0 each step adds the same term with the patch's own place for its label, so
    every patch token also says where it is: which cell a token comes from was 0.4% of the tokens' variance
    without it, too faint for the mini LM to answer "Where is the red circle?".

    `config.region_place_weight` > 0 adds the term once more with the two joined, each patch's region phrase
    followed by its place ("a small red circle at the top left", "background in the center"): one target
    that says what and where, where the place term alone pulls each token towards two texts.

    Saves model, tokenizer and preprocessor_config.json to `output`. Returns {"loss": ..., "params": ...}."""
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import CLIPConfig, CLIPModel

    if len(pairs) < 2:
        raise TrainConfigError(f"CLIP training needs at least two images, got {len(pairs)}")
    if tokenizer.eos_token_id == 2:
        raise TrainConfigError("the CLIP tokenizer's </s> must not be id 2 (CLIP reads that as a legacy marker)")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=config.text_hidden,
                       intermediate_size=4 * config.text_hidden, num_hidden_layers=config.text_layers,
                       num_attention_heads=config.heads, max_position_embeddings=config.max_text_length,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(hidden_size=config.vision_hidden, intermediate_size=4 * config.vision_hidden,
                         num_hidden_layers=config.vision_layers, num_attention_heads=config.heads,
                         image_size=config.image_size, patch_size=config.patch_size)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config,
                                 projection_dim=config.projection_dim))
    if config.position_init_std is not None:
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=config.position_init_std)
    processor = image_processor_for(config)
    everything = list(pairs) + list(curriculum)
    patches = (config.image_size // config.patch_size) ** 2
    paths = [path for path, _ in everything]
    if places is not None and len(places) != patches:
        raise TrainConfigError(f"CLIP places: {len(places)} place phrases, the vision tower has {patches} "
                               "patches (one phrase per patch, row by row)")
    if config.region_place_weight > 0 and (regions is None or places is None):
        raise TrainConfigError("CLIP region_place_weight: the term needs both region phrases and place phrases")
    # (weight, phrases as (what, where) pairs, labels: per row of `everything`, per patch, an index into them)
    terms = []
    if regions is not None and (config.region_weight > 0 or config.region_place_weight > 0):
        phrases, labels = _region_labels(regions, paths, patches)  # checks one phrase per patch for every image
        if config.region_weight > 0:
            terms.append((config.region_weight, [(phrase, "") for phrase in phrases], labels))
    if places is not None and config.place_weight > 0:
        terms.append((config.place_weight, [("", place) for place in places],
                      torch.arange(patches).expand(len(paths), -1)))
    if config.region_place_weight > 0:
        joint = {path: [f"{phrase} {place}" for phrase, place in zip(regions[path], places)] for path in paths}
        split = {f"{phrase} {place}": (phrase, place) for phrase in phrases for place in places}
        phrases, labels = _region_labels(joint, paths, patches)
        terms.append((config.region_place_weight, [split[phrase] for phrase in phrases], labels))
    phrase_pieces = _prefixed_pieces(tokenizer, [pair for _, term_pairs, _ in terms for pair in term_pairs],
                                     config.max_text_length) if terms else None
    pixels = torch.from_numpy(np.stack([processor.preprocess_one(load_image(path)) for path, _ in
                                        tqdm(everything, desc="clip images", disable=not progress, unit="img")]))
    main_rows, first_rows = list(range(len(pairs))), list(range(len(pairs), len(everything)))
    optimizer, schedule = adamw_with_cosine(model, config.lr, config.weight_decay, (0.9, 0.98),
                                            config.warmup_steps, config.steps)
    model.train()
    losses: list[float] = []
    orders: dict[int, list[int]] = {0: [], 1: []}

    def draw(which: int, count: int) -> list[int]:  # epochs of shuffled rows, per source
        source = first_rows if which else main_rows
        while len(orders[which]) < count:
            fresh = list(source)
            rng.shuffle(fresh)
            orders[which] += fresh
        rows, orders[which] = orders[which][:count], orders[which][count:]
        return rows

    bar = tqdm(range(config.steps), desc="train clip", disable=not progress, unit="step")
    for step in bar:
        if not first_rows:
            rows = draw(0, config.batch_size)
        elif step < config.curriculum_steps:
            rows = draw(1, config.batch_size)
        else:
            rows = draw(1, config.batch_size // 2) + draw(0, config.batch_size - config.batch_size // 2)
        texts = [rng.choice(everything[i][1]) for i in rows]
        negatives = [swap_one_word(t, swap_groups, rng) for t in texts] if config.hard_negatives else []
        negatives = [n for n in negatives if n is not None]
        vision = model.get_image_features(pixel_values=pixels[rows])  # pooler_output: the projected class token
        text_embeds = F.normalize(_bucketed_text_features(model, tokenizer, texts + negatives,
                                                          config.max_text_length), dim=-1)
        image_embeds = F.normalize(vision.pooler_output, dim=-1)
        positives = torch.tensor([[a == b for b in texts + negatives] for a in texts])
        loss = _contrastive_loss(image_embeds, text_embeds, model.logit_scale.exp(), positives)
        if terms:
            patch_embeds = F.normalize(patch_embeddings(model, vision.last_hidden_state), dim=-1)
            phrase_embeds = F.normalize(_prefixed_text_features(model, **phrase_pieces), dim=-1)
        for weight, phrases, labels in terms:
            term_embeds, phrase_embeds = phrase_embeds[:len(phrases)], phrase_embeds[len(phrases):]
            loss = loss + weight * _region_loss(patch_embeds, term_embeds, model.logit_scale.exp(), labels[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # as in CLIP: the temperature stays below 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    tokenizer.model_max_length = config.max_text_length
    with atomic_dir(output) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        data = processor.to_dict()
        data.update(image_processor_type="CLIPImageProcessor", do_pad=False)
        (folder / "preprocessor_config.json").write_text(json.dumps(data, indent=2))
    return {"loss": sum(losses[-20:]) / len(losses[-20:]), "params": model.num_parameters()}
