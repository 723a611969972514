"""The training loop, on accelerate: one process or many (torchrun / accelerate launch: DDP, FSDP,
DeepSpeed) with no code change.

Per optimizer step: grad_accum micro-batches (mean loss over a micro-batch's answer tokens, averaged
over micro-batches and processes, as the original LLaVA's Trainer does; with token_mean_loss the mean
over all the step's answer tokens, as transformers' Trainer now does), gradient clipping, AdamW,
then the scheduler (cosine with warmup by default). Data order is a pure function of (seed, epoch),
so a checkpoint only needs the number of micro-batches consumed to resume exactly.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core.constants import IGNORE_INDEX
from ..core.errors import TrainConfigError
from ..data.dataset import PLAIN, DataCollator, LlavaDataset
from ..data.sampler import LengthGroupedSampler, rank_batches
from ..model.checkpoint import save_pretrained
from .build import DEFAULT_TEMPLATE, component, load_start_model, param_groups, set_trainable, upcast_trainable
from .config import TrainConfig, save_config
from .lora import apply_lora, quantize_language_model, save_adapter
from .metrics import MetricsLog, plot_loss
from .state import TrainState, find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint


@dataclass
class TrainResult:
    output: Path
    state: TrainState
    model: nn.Module                  # the final model (LoRA merged) on this process
    metrics: list[dict] = field(default_factory=list)
    skipped: int = 0                  # bad records skipped (skip_bad)


def train(config: TrainConfig, on_step: Callable[[TrainState, dict], None] | None = None) -> TrainResult:
    """Run (or resume) the training run the config describes; `on_step(state, metrics)` is called on
    every process after each optimizer step."""
    from accelerate import Accelerator

    config.check_runnable()
    # several processes and no GPU (torchrun on CPU): accelerate only goes distributed (gloo) when told cpu=True
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=launched and not torch.cuda.is_available())
    try:
        return _train(accelerator, config, on_step)
    finally:
        _shutdown(accelerator)


def _train(accelerator, config: TrainConfig, on_step) -> TrainResult:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    set_seed(config.seed)
    output = Path(config.output)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    model, processor = load_start_model(config)
    load_dtype = model.dtype
    template = config.template or _default_template(config, processor)
    dataset = LlavaDataset(config.data_files, processor, image_folder=config.image_folder, template=template,
                           model_max_length=config.model_max_length, skip_bad=config.skip_bad)
    if dataset.skipped and accelerator.is_main_process:
        print(f"llava train: skipped {sum(dataset.skipped.values())} bad record(s): "
              + ", ".join(f"{n} × {reason}" for reason, n in dataset.skipped.most_common())
              + f"; first: {dataset.problems[0]}", file=sys.stderr)
    collator = DataCollator(processor.tokenizer.pad_token_id, config.model_max_length, processor.image_token_id)

    model = _prepare_model(model, config)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = dataset.modality_lengths if config.group_by_modality_length else dataset.lengths
    # grouped over the samples of one optimizer step: on one GPU with grad_accum 8 the same grouping as
    # the original on 8 GPUs; it changes only how a step's samples are split into micro-batches.
    # group_by_length sorts up to 50 steps' samples together, which changes what each step sees
    sampler = LengthGroupedSampler(config.batch_size, world, lengths, seed=config.seed,
                                   group_by_modality=config.group_by_modality_length,
                                   group_by_length=config.group_by_modality_length or config.group_by_length,
                                   group_size=config.grad_accum * _length_group_steps(config, len(lengths), world))
    per_epoch = len(rank_batches(sampler.order(0), config.batch_size, world, rank))
    if config.max_steps > 0:
        total_steps = config.max_steps
    else:
        total_steps = math.ceil(config.epochs * per_epoch) // config.grad_accum
    if total_steps < 1:
        raise TrainConfigError(f"{per_epoch} batch(es) per epoch is fewer than grad_accum {config.grad_accum}: "
                               "nothing to step on")
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainState(world_size=world, batch_size=config.batch_size, grad_accum=config.grad_accum,
                       seed=config.seed, samples=len(dataset))
    resumed = None
    if config.resume:
        resumed = find_checkpoint(output, config.resume)
        if resumed is not None:
            state = load_checkpoint(resumed, accelerator, model, optimizer, scheduler, state)
    log = MetricsLog(output / "metrics.jsonl", resume_step=state.step if resumed else None) \
        if accelerator.is_main_process else None
    if accelerator.is_main_process:
        save_config(config, output / "train_config.json")

    trainable = [p for p in model.parameters() if p.requires_grad]
    image_side = [p for n, p in accelerator.unwrap_model(model).named_parameters()
                  if p.requires_grad and component(n) in ("projector", "vision")]
    batches = _micro_batches(dataset, collator, sampler, config, world, rank, per_epoch, state.micro_batches)
    progress = _progress(config, accelerator, total_steps, state.step, resumed)
    model.train()
    window_tokens, window_start = 0, time.perf_counter()
    while state.step < total_steps:
        step_start = time.perf_counter()
        losses, tokens = [], 0
        micro = [next(batches) for _ in range(config.grad_accum)]
        weights = _loss_weights(micro, config, accelerator)
        for batch, weight in zip(micro, weights):
            state.micro_batches += 1
            with accelerator.accumulate(model):
                loss, n_tokens = _micro_step(model, batch, accelerator, trainable, image_side)
                accelerator.backward(loss * weight)
            losses.append(loss.detach().float() * weight)
            tokens += n_tokens
        grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        loss_value = accelerator.reduce(torch.stack(losses).mean().to(accelerator.device), "mean").item()
        # with token_mean_loss, the weights make this mean the step's mean over its answer tokens
        step_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item())
        state.tokens += step_tokens
        state.elapsed_s += time.perf_counter() - step_start
        window_tokens += step_tokens
        record = {"step": state.step, "epoch": round(state.micro_batches / per_epoch, 4), "loss": loss_value,
                  "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": state.tokens}
        if state.step % config.logging_steps == 0 or state.step == total_steps:
            now = time.perf_counter()
            record["tokens_per_s"] = round(window_tokens / max(now - window_start, 1e-9), 1)
            record["elapsed_s"] = round(state.elapsed_s, 3)
            window_tokens, window_start = 0, now
            if log is not None:
                log.write(record)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if progress is not None:
            progress.update(1)
        if config.save_steps and state.step % config.save_steps == 0 and state.step < total_steps:
            save_checkpoint(accelerator, output, state, model, optimizer, scheduler)
            if accelerator.is_main_process:
                prune_checkpoints(output, config.save_total_limit)
        if on_step is not None:
            on_step(state, record)
    if progress is not None:
        progress.close()

    final = _finish(accelerator, config, model, trained, processor, template, load_dtype, output)
    metrics = log.read() if log is not None else []
    if accelerator.is_main_process and metrics:
        plot_loss(metrics, output / "loss.png", title=f"llava train: {config.stage}")
    accelerator.wait_for_everyone()
    return TrainResult(output=output, state=state, model=final, metrics=metrics,
                       skipped=sum(dataset.skipped.values()))


def _default_template(config: TrainConfig, processor) -> str:
    """plain for stage 1; else the checkpoint's own template, unless that is plain (a stage-1 output)."""
    if config.stage == "pretrain":
        return PLAIN
    return processor.conv_mode if processor.conv_mode != PLAIN else DEFAULT_TEMPLATE


def _prepare_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Gradient checkpointing, 4-bit base (QLoRA), LoRA adapters, then what trains."""
    if config.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if config.train_vision_tower and hasattr(model.vision_tower, "gradient_checkpointing_enable"):
            model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.qlora:
        quantize_language_model(model, compute_dtype=torch.bfloat16 if config.mixed_precision == "bf16"
                                else torch.float32)
    if config.use_lora:
        model = apply_lora(model, config)
    set_trainable(model, config)
    upcast_trainable(model)
    return model


def _answer_tokens(batch) -> int:
    """The positions a micro-batch's loss averages over (labels shifted by one, as causal_lm_loss does)."""
    return 0 if batch is None else int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_weights(micro: list, config: TrainConfig, accelerator) -> list[float]:
    """What each micro-batch's mean loss is multiplied by before backward. 1 (the mean of the micro-batches'
    means); with token_mean_loss, its share of the step's answer tokens over all processes times grad_accum
    and processes (which backward and the gradient all-reduce divide by again), so the gradient is that of
    the mean over every answer token of the step, as one batch of them all would give."""
    if not config.token_mean_loss:
        return [1.0] * len(micro)
    counts = [_answer_tokens(batch) for batch in micro]
    total = int(accelerator.reduce(torch.tensor(sum(counts), device=accelerator.device), "sum").item())
    scale = len(micro) * accelerator.num_processes / max(total, 1)
    return [count * scale for count in counts]


def _micro_step(model, batch, accelerator, trainable, image_side) -> tuple[torch.Tensor, int]:
    """(loss, non-padding tokens) for one micro-batch. Parameters a batch does not reach (the projector
    on a text-only batch) get a zero gradient, so every process reduces the same set (DDP)."""
    if batch is None:  # every record of the batch was skipped
        return sum(p.reshape(-1)[0] for p in trainable) * 0.0, 0
    batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], labels=batch["labels"],
                    use_cache=False)
    if _answer_tokens(batch) == 0:  # nothing to learn (all truncated)
        loss = outputs.logits.sum() * 0.0
    else:
        loss = outputs.loss
    if batch["pixel_values"] is None and image_side:
        loss = loss + sum(p.reshape(-1)[0] for p in image_side) * 0.0
    return loss, int(batch["attention_mask"].sum())


def _length_group_steps(config: TrainConfig, samples: int, world: int) -> int:
    """How many optimizer steps' samples are sorted by length together: 1 (LLaVA's grouping), or with
    group_by_length as transformers' LengthGroupedSampler does, min(samples // (4 * step), 50) of them."""
    if not config.group_by_length:
        return 1
    step = config.batch_size * config.grad_accum * world
    return max(1, min(samples // (4 * step), 50))


def _micro_batches(dataset, collator, sampler, config, world, rank, per_epoch: int, start: int):
    """Micro-batches from global micro-batch number `start` on, epoch after epoch."""
    epoch, position = divmod(start, per_epoch)
    while True:
        batches = rank_batches(sampler.order(epoch), config.batch_size, world, rank)
        # the loader's own generator: building it must not draw from the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[position:], collate_fn=collator,
                                             num_workers=config.num_workers,
                                             generator=torch.Generator().manual_seed(config.seed + epoch))
        yield from loader
        epoch, position = epoch + 1, 0


def _progress(config, accelerator, total: int, initial: int, resumed):
    if not (config.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    desc = f"train {config.stage}" + (f" (resumed at {initial})" if resumed else "")
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)


def _finish(accelerator, config: TrainConfig, model, trained: set[str], processor, template: str, dtype,
            output: Path) -> nn.Module:
    """The final llava-hf checkpoint in output/: the model training started from with the trained
    weights put in (gathered from every process under ZeRO-3 / FSDP) and LoRA merged into the
    full-precision base (for QLoRA too); the adapter is kept in output/adapter."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # every process takes part: it gathers sharded weights
    final = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        weights = {name: tensor for name, tensor in state.items() if name in trained}
        final, _ = load_start_model(config)
        if config.use_lora:
            final = apply_lora(final, config)
            set_trainable(final, config)
            _load_trained(final, weights)
            save_adapter(final, output / "adapter")
            final = final.merge_and_unload()
        else:
            _load_trained(final, weights)
        final.config.conv_mode = template
        final = final.to(dtype).eval()
        save_pretrained(final, processor, output)
    del state
    accelerator.wait_for_everyone()
    return final


def _load_trained(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(weights) - set(own))
    if missing:
        raise TrainConfigError(f"trained weights the final model does not have: {', '.join(missing[:3])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=False)


def _shutdown(accelerator) -> None:
    """Drop the wrapped model before the process group goes, or rank 0 can abort at exit (gloo)."""
    accelerator.free_memory()
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
