"""How fast the mini recipe's language model learns to look something up in an image, at two weight
initialisations, measured in one run: the number of training steps until it answers 90% right.

The task is the core of every shapes-world question, with the vision side made perfect. A scene is
9 "image tokens", one per cell of the 3x3 grid: the sum of a colour and a shape embedding, or an
"empty" embedding. Then comes a question naming one of the shapes, --filler tokens standing for the rest
of the prompt, and the model must answer that shape's colour. So it must carry the shape word to the
answer position, find the image token with that shape and read its colour off it.

The model is a fresh Llama-architecture LM of the mini recipe's size (recipes/mini.yaml, section lm).
Every batch is new data, so the accuracy on it is held-out accuracy.

    .venv/bin/python benchmarks/lookup_learning.py [--filler 10] [--steps 400] [--inits 0.02 0.07]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch

from llava.demo import load_recipe
from llava.train.lm import LMConfig, llama_config

COLOURS, SHAPES, CELLS = 6, 5, 9
# token ids: 0 <s>, 1 empty cell, 2 "what colour", 3 answer marker, then colours, shapes, fillers
FIRST_COLOUR, FIRST_SHAPE = 4, 4 + COLOURS
FIRST_FILLER = FIRST_SHAPE + SHAPES


def make_batch(rng: random.Random, batch_size: int, filler: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cell ids (batch, 9, 2), question ids (batch, filler + 3), colour answers (batch,))."""
    cells, questions, answers = [], [], []
    for _ in range(batch_size):
        count = rng.randint(1, 4)
        shapes = rng.sample(range(SHAPES), count)
        colours = [rng.randrange(COLOURS) for _ in shapes]
        grid = [[1, 1] for _ in range(CELLS)]  # empty: the "empty" embedding twice
        for cell, shape, colour in zip(rng.sample(range(CELLS), count), shapes, colours):
            grid[cell] = [FIRST_COLOUR + colour, FIRST_SHAPE + shape]
        asked = rng.randrange(count)
        cells.append(grid)
        questions.append([2, FIRST_SHAPE + shapes[asked]] + [FIRST_FILLER + i % 10 for i in range(filler)] + [3])
        answers.append(FIRST_COLOUR + colours[asked])
    return torch.tensor(cells), torch.tensor(questions), torch.tensor(answers)


def steps_to_learn(lm: LMConfig, init: float, filler: int, steps: int, batch_size: int, lr: float, seed: int,
                   target: float = 0.9, window: int = 20) -> int | None:
    """Train a fresh LM; the first step at which the mean accuracy of the last `window` batches
    reaches `target`, or None."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(dataclasses.replace(lm, init_std=init), FIRST_FILLER + 10))
    embed = model.get_input_embeddings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)  # the same batches for every init
    hits: list[float] = []
    for step in range(1, steps + 1):
        cells, questions, answers = make_batch(rng, batch_size, filler)
        bos = embed(torch.zeros(batch_size, 1, dtype=torch.long))
        inputs = torch.cat([bos, embed(cells).sum(2), embed(questions)], dim=1)
        logits = model(inputs_embeds=inputs).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hits.append((logits.argmax(-1) == answers).float().mean().item())
        if step >= window and sum(hits[-window:]) / window >= target:
            return step
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=int, default=10, help="tokens between the shape word and the answer")
    parser.add_argument("--steps", type=int, default=400, help="the most training steps per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=5, help="models per init (the plateau's length varies)")
    parser.add_argument("--inits", type=float, nargs=2, default=(0.02, 0.07),
                        help="two initializer_range values: transformers' default, and about 1/sqrt(hidden)")
    args = parser.parse_args()
    lm = LMConfig(**load_recipe()["lm"])  # the mini recipe's LM, as `llava demo` builds it
    print(f"LM: hidden {lm.hidden_size}, {lm.layers} layers, {lm.heads} heads; {args.filler} filler tokens; "
          f"batch {args.batch_size}, lr {args.lr}")
    medians = []
    for init in args.inits:
        start = time.perf_counter()
        runs = [steps_to_learn(lm, init, args.filler, args.steps, args.batch_size, args.lr, seed)
                for seed in range(args.seeds)]
        # a run that never reached 90% counts as --steps: the median is then a lower bound
        median = statistics.median(step or args.steps for step in runs)
        medians.append(median)
        shown = ", ".join(str(step) if step else f">{args.steps}" for step in runs)
        print(f"initializer_range {init}: steps to 90% per seed [{shown}], median {median:g} "
              f"({time.perf_counter() - start:.0f} s)")
    print(f"ratio of medians: initializer_range {args.inits[1]} learns {medians[0] / medians[1]:.1f}x faster"
          f"{' (at least: a median run hit --steps)' if medians[0] >= args.steps else ''}")


if __name__ == "__main__":
    main()
