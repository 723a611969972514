"""Training speed: our loop against transformers' Trainer on transformers' LlavaForConditionalGeneration.

Both train the same small random LLaVA (vision tower frozen, projector + LLM trained) on the same
LLaVA-format data, tokenized by the same dataset and collator, with the same batch size, learning
rate schedule and epochs, fp32 on CPU. Printed: useful (non-padding) tokens per second for each, their
ratio, and the mean step loss of each (close, not equal: the same samples per step, split differently
into micro-batches, and Trainer weights micro-batches by their answer tokens).
Our loop groups samples by modality and by length over the samples of each optimizer step (LLaVA-1.5's
group_by_modality_length, megabatch = processes x batch x grad_accum), so its micro-batches pad less;
Trainer uses its default random sampler. Both see 32 samples per optimizer step by default.

    .venv/bin/python benchmarks/train_speed.py [--samples 256] [--epochs 1] [--batch-size 8] [--grad-accum 4]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def write_data(folder: Path, samples: int, seed: int = 0) -> Path:
    """Colour questions with answers of very different lengths, a quarter text-only."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over the lazy dog one two three four five six seven eight nine ten".split()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        filler = " ".join(rng.choice(words) for _ in range(rng.choice([2, 5, 10, 40, 120])))
        if i % 4 == 3:
            records.append({"id": str(i), "conversations": [{"from": "human", "value": "Say something."},
                                                            {"from": "gpt", "value": filler}]})
            continue
        colour = rng.choice(["red", "green", "blue"])
        Image.new("RGB", (rng.randint(20, 80), rng.randint(20, 80)), colour).save(folder / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"{colour}. {filler}"}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def run_ours(model_dir: Path, data: Path, out: Path, args) -> tuple[float, int, float]:
    from llava.train.config import TrainConfig
    from llava.train.loop import train

    config = TrainConfig(model=str(model_dir), data=str(data), output=str(out), batch_size=args.batch_size,
                         grad_accum=args.grad_accum, epochs=args.epochs, lr=1e-3, warmup_ratio=0.03, template="vicuna_v1", progress=False,
                         seed=0, model_max_length=1024)
    result = train(config)
    losses = [m["loss"] for m in result.metrics]
    return result.state.elapsed_s, result.state.tokens, sum(losses) / len(losses)


def run_trainer(model_dir: Path, data: Path, out: Path, args) -> tuple[float, int, float]:
    from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

    import llava
    from llava.data.dataset import DataCollator, LlavaDataset

    _, processor = llava.load_pretrained(model_dir, device="cpu")
    dataset = LlavaDataset(data, processor, template="vicuna_v1", model_max_length=1024)
    collator = DataCollator(processor.tokenizer.pad_token_id, 1024, processor.image_token_id)
    counted = {"tokens": 0}

    def collate(items):
        batch = collator(items)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return {k: v for k, v in batch.items() if v is not None}

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model.model.vision_tower.requires_grad_(False)
    arguments = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                                  gradient_accumulation_steps=args.grad_accum,
                                  num_train_epochs=args.epochs, learning_rate=1e-3, warmup_steps=0.03,
                                  lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                  remove_unused_columns=False, dataloader_num_workers=0, seed=0,
                                  disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return elapsed, counted["tokens"], sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from llava.testing import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_checkpoint(tmp / "model", text_hidden=args.hidden, text_layers=args.layers,
                                          max_positions=2048)
        data = write_data(tmp / "data", args.samples)
        trainer_s, trainer_tokens, trainer_loss = run_trainer(model_dir, data, tmp / "trainer", args)
        ours_s, ours_tokens, ours_loss = run_ours(model_dir, data, tmp / "ours", args)
    ours_rate, trainer_rate = ours_tokens / ours_s, trainer_tokens / trainer_s
    print(f"samples {args.samples}, epochs {args.epochs}, batch {args.batch_size} x {args.grad_accum} accumulated, "
          f"text hidden {args.hidden} "
          f"x {args.layers} layers, torch threads {torch.get_num_threads()}")
    print(f"llava loop          : {ours_tokens} useful tokens in {ours_s:.2f} s = {ours_rate:,.0f} tokens/s, "
          f"mean step loss {ours_loss:.3f}")
    print(f"transformers Trainer: {trainer_tokens} useful tokens in {trainer_s:.2f} s = {trainer_rate:,.0f} tokens/s, "
          f"mean step loss {trainer_loss:.3f}")
    print(f"ratio (llava / Trainer): {ours_rate / trainer_rate:.2f}x")


if __name__ == "__main__":
    main()
