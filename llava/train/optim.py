"""The optimiser of the small from-scratch runs (tiny CLIP, tiny LM): AdamW without weight decay on
biases and norms, and a cosine schedule with linear warmup (transformers')."""

from __future__ import annotations

import torch


def adamw_with_cosine(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                      warmup_steps: int, steps: int):
    from transformers import get_cosine_schedule_with_warmup

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
