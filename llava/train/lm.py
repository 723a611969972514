"""A tokenizer trained on a text corpus, and a small Llama-architecture causal LM pretrained on it
(next-token prediction on packed sequences): the mini recipe's stand-in for Vicuna.
Saved as transformers saves them (LlamaForCausalLM + tokenizer), so stage 1 loads them like any LM."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import TrainConfigError
from ..core.io import atomic_dir
from ..data.shapes import plural
from .optim import adamw_with_cosine

# Specials in this order keep </s> off id 2, which CLIP's text model reads as a legacy marker.
SPECIAL_TOKENS = ("<unk>", "<s>", "<pad>", "</s>")
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:;'\"()[]{}#/<>|_-+=*%&\n"


def train_tokenizer(texts: list[str], vocab_size: int = 1024, eos: bool = False, plural_stems: tuple[str, ...] = ()):
    """A Llama-style tokenizer (metaspace BPE, <s> prepended) trained on `texts`; with `eos`, </s> is
    also appended (what CLIP's text encoder pools at). Each noun of `plural_stems` has its plural split
    into stem and suffix ("circles" -> "▁circle" "s", "crosses" -> "▁cross" "es"), after training, so the
    vocabulary is the one trained either way."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # words, with punctuation split off
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(ALPHABET), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if plural_stems:
        plurals = "|".join(f"(?<={re.escape(stem)}){re.escape(plural(stem)[len(stem):])}$" for stem in plural_stems)
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer,
                                                     pre_tokenizers.Split(Regex(plurals), behavior="isolated")])
    return with_eos(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>", pad_token="<pad>"), eos)


def with_eos(tokenizer, eos: bool):
    """The same tokenizer with <s> prepended and, when `eos`, </s> appended to every text."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bos, end = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    single, pair = ("<s> $A </s>", "<s> $A </s> <s> $B </s>") if eos else ("<s> $A", "<s> $A <s> $B")
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=[("<s>", bos), ("</s>", end)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=tokenizer.model_max_length)


@dataclass
class LMConfig:
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    head_dim: int | None = None  # LlamaConfig.head_dim: each head's query/key/value width; None: hidden_size / heads
    intermediate_size: int = 688
    max_positions: int = 512
    block_size: int = 128
    batch_size: int = 32
    steps: int = 600
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    init_std: float = 0.02  # LlamaConfig.initializer_range (benchmarks/lookup_learning.py measures its effect)
    seed: int = 0


def llama_config(config: LMConfig, vocab_size: int, **special_ids):
    """The LlamaConfig of the LM that `config` describes (special_ids: bos_token_id, eos_token_id, ...)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions, initializer_range=config.init_std, tie_word_embeddings=False,
        head_dim=config.head_dim, **special_ids)


def pretrain_lm(texts: list[str], tokenizer, config: LMConfig, output: str | Path, progress: bool = False) -> dict:
    """Pretrain a fresh LlamaForCausalLM on `texts` (each wrapped in <s> ... </s> and packed into
    block_size windows) and save it with the tokenizer to `output`. Returns {"loss": last mean loss}."""
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    if not texts:
        raise TrainConfigError("language model pretraining: the corpus is empty")
    if config.hidden_size % config.heads:  # LlamaConfig asks it even where head_dim is set
        raise TrainConfigError(f"lm.hidden_size {config.hidden_size} is not a multiple of lm.heads {config.heads}")
    if config.head_dim is not None and config.head_dim <= 0:
        raise TrainConfigError(f"lm.head_dim must be > 0, got {config.head_dim}")
    if not config.init_std > 0:
        raise TrainConfigError(f"lm.init_std must be > 0 (the initial weights' standard deviation), "
                               f"got {config.init_std}")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = LlamaForCausalLM(llama_config(config, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    order = list(range(len(texts)))
    rng.shuffle(order)
    for start in range(0, len(order), 2048):
        batch = tokenizer([texts[i] for i in order[start:start + 2048]], add_special_tokens=True)["input_ids"]
        for ids in batch:
            stream.extend(ids + [eos])
    blocks = len(stream) // config.block_size
    if blocks < 1:
        raise TrainConfigError(f"language model pretraining: the corpus has {len(stream)} tokens, fewer than "
                               f"one block of {config.block_size}")
    data = torch.tensor(stream[:blocks * config.block_size]).view(blocks, config.block_size)
    optimizer, schedule = adamw_with_cosine(model, config.lr, config.weight_decay, (0.9, 0.95),
                                            config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="pretrain lm", disable=not progress, unit="step")
    for step in bar:
        rows = torch.randint(0, blocks, (config.batch_size,), generator=generator)
        batch = data[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    with atomic_dir(output) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return {"loss": sum(losses[-20:]) / len(losses[-20:]), "tokens": len(stream), "params": model.num_parameters()}

