"""How fast a fresh language model learns to look things up in a vision tower's real patch features,
against perfect image tokens, measured in one run: held-out accuracy after the same number of steps.

The task is benchmarks/lookup_learning.py's: 9 image tokens, one per cell of the shapes world's 3x3 grid,
then a question naming a shape (one that is alone of its shape in the scene), --filler tokens standing for
the rest of the prompt, and the model must answer that shape's colour (or, with --ask shape, the other way
round: the shape of the one object of a named colour). The scenes are real ones from a
`llava synth` folder, and the image tokens are either
  perfect:  each cell's token the sum of a colour and a shape embedding (an "empty" one without object), or
  features: the vision tower's patch features at --layer (LLaVA's vision_feature_layer), through a fresh
            mlp2x_gelu projector that trains with the LM, as in stage 2.
Both runs start from the same fresh LM of the mini recipe's size and see the same questions. The gap says
how much of the mini LLaVA's slow learning is down to the image tokens rather than the language model.

    .venv/bin/python benchmarks/feature_lookup.py --shapes runs/demo/shapes --model runs/demo/clip
    .venv/bin/python benchmarks/feature_lookup.py --shapes runs/demo/shapes --model runs/demo/stage2

--model is a CLIPModel folder (the tiny CLIP) or a llava-hf checkpoint (its vision tower, as trained).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from llava.core.errors import DataError
from llava.data.images import load_image
from llava.data.shapes import CELLS, COLOURS, SHAPES, load_scenes
COLOUR_NAMES = list(COLOURS)
# token ids: 0 <s>, 1 empty cell, 2 "what colour" / "what shape", 3 answer marker, then colours, shapes, fillers
FIRST_COLOUR, FIRST_SHAPE = 4, 4 + len(COLOURS)
FIRST_FILLER = FIRST_SHAPE + len(SHAPES)


def grids(scenes) -> list[list[tuple[int, int] | None]]:
    """Per scene, per cell: (colour index, shape index) of its object, or None."""
    out = []
    for scene in scenes:
        grid: list[tuple[int, int] | None] = [None] * 9
        for obj in scene.objects:
            grid[CELLS[obj.position]] = (COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape))
        out.append(grid)
    return out


def questions(grid_list, count: int, rng: random.Random, ask: str) -> list[tuple[int, int, int]]:
    """(scene index, token named, token answered): the colour of a shape alone of its shape in the scene,
    or (ask="shape") the shape of an object alone of its colour."""
    out = []
    while len(out) < count:
        i = rng.randrange(len(grid_list))
        objects = [(FIRST_COLOUR + c, FIRST_SHAPE + s) for c, s in (cell for cell in grid_list[i] if cell)]
        colour, shape = rng.choice(objects)
        named, answer = (colour, shape) if ask == "shape" else (shape, colour)
        if sum(named in pair for pair in objects) == 1:  # colour and shape ids never overlap
            out.append((i, named, answer))
    return out


def tower_features(model: str, shapes: Path, scenes, layer: int) -> torch.Tensor:
    """(scenes, 9, channels): the vision tower's patch features at `layer`, without the CLS position."""
    from llava.model.vision import encode_images

    if (Path(model) / "processor_config.json").exists():
        from llava.model.checkpoint import load_pretrained

        llava, processor = load_pretrained(model, device="cpu", dtype="float32")
        tower, image_processor = llava.vision_tower, processor.image_processor
    else:
        from llava.clip.encoder import ClipEncoder
        from llava.core.errors import CheckpointError

        try:
            encoder = ClipEncoder.load(model)
        except CheckpointError as e:
            raise SystemExit(str(e)) from None
        tower, image_processor = encoder.model.vision_model, encoder.image_processor
    tower.eval()
    pixels = torch.stack([torch.from_numpy(image_processor.preprocess_one(load_image(shapes / s.file_name)))
                          for s in scenes])
    with torch.no_grad():
        features = torch.cat([encode_images(tower, pixels[i:i + 256], layer, "default")
                              for i in range(0, len(pixels), 256)])
    if features.shape[1] != 9:
        raise SystemExit(f"{model}: {features.shape[1]} patches per image; this benchmark needs one per grid cell (9)")
    return features


def accuracy_after(steps: int, train, test, grid_list, features, batch_size: int, filler: int, lr: float,
                   seed: int) -> float:
    """Train a fresh LM (and a fresh projector when `features` is given); its accuracy on `test`."""
    from transformers import LlamaForCausalLM

    from llava.demo import load_recipe
    from llava.model.projector import Projector
    from llava.train.lm import LMConfig, llama_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(LMConfig(**load_recipe()["lm"]), FIRST_FILLER + filler))
    embed = model.get_input_embeddings()
    projector = Projector("mlp2x_gelu", features.shape[-1], model.config.hidden_size) if features is not None else None
    params = list(model.parameters()) + (list(projector.parameters()) if projector else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def logits(batch):
        scenes = [i for i, _, _ in batch]
        if projector is None:
            cells = [[[FIRST_COLOUR + c[0], FIRST_SHAPE + c[1]] if c else [1, 1] for c in grid_list[i]] for i in scenes]
            image = embed(torch.tensor(cells)).sum(2)
        else:
            image = projector(features[scenes])
        question = torch.tensor([[2, named] + list(range(FIRST_FILLER, FIRST_FILLER + filler)) + [3]
                                 for _, named, _ in batch])
        inputs = torch.cat([embed(torch.zeros(len(batch), 1, dtype=torch.long)), image, embed(question)], dim=1)
        return model(inputs_embeds=inputs).logits[:, -1]

    for step in range(steps):
        batch = train[step * batch_size:(step + 1) * batch_size]
        answers = torch.tensor([answer for _, _, answer in batch])
        loss = torch.nn.functional.cross_entropy(logits(batch), answers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        predicted = logits(test).argmax(-1)
    return (predicted == torch.tensor([answer for _, _, answer in test])).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", required=True, help="a `llava synth` folder (its train split)")
    parser.add_argument("--model", required=True, help="a CLIPModel folder or a llava-hf checkpoint")
    parser.add_argument("--layer", type=int, default=-2, help="vision_feature_layer")
    parser.add_argument("--ask", choices=("colour", "shape"), default="colour",
                        help="colour: 'what colour is the <shape>?'; shape: 'what shape is the <colour> one?'")
    parser.add_argument("--scenes", type=int, default=3000, help="train scenes to use; 10%% are held out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--filler", type=int, default=10, help="tokens between the shape word and the answer")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = Path(args.shapes)
    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model}: not a folder (a CLIPModel folder or a llava-hf checkpoint)")
    try:
        scenes = load_scenes(shapes, "train")[:args.scenes]
    except DataError as e:
        raise SystemExit(str(e)) from None
    grid_list = grids(scenes)
    held_out = len(scenes) // 10
    rng = random.Random(args.seed)
    train = [(i + held_out, named, answer) for i, named, answer
             in questions(grid_list[held_out:], args.steps * args.batch_size, rng, args.ask)]
    test = questions(grid_list[:held_out], 500, rng, args.ask)
    start = time.perf_counter()
    features = tower_features(args.model, shapes, scenes, args.layer)
    print(f"{len(scenes)} scenes ({held_out} held out), features {tuple(features.shape)} at layer {args.layer} "
          f"of {args.model} ({time.perf_counter() - start:.0f} s); {args.steps} steps of {args.batch_size}, lr {args.lr}")
    results = {}
    for name, tokens in (("perfect tokens", None), ("tower features", features)):
        start = time.perf_counter()
        results[name] = accuracy_after(args.steps, train, test, grid_list, tokens, args.batch_size, args.filler,
                                       args.lr, args.seed)
        print(f"{name}: held-out {args.ask} accuracy {results[name]:.1%} after {args.steps} steps "
              f"({time.perf_counter() - start:.0f} s)")
    perfect, real = results.values()
    print(f"ratio: the tower's features reach {real / perfect:.2f} of the perfect tokens' accuracy "
          f"(chance {1 / (len(COLOURS) if args.ask == 'colour' else len(SHAPES)):.1%})")


if __name__ == "__main__":
    main()
