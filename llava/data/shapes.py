"""The shapes world: seeded synthetic scenes of coloured shapes, written COCO-style with captions,
boxes, short-answer questions (colour / shape / count / position) and POPE-style yes/no questions.

A scene has 1-4 objects, each in its own cell of a 3x3 grid (so "top left", "center", ... name a
position without ambiguity), with a shape, a colour and a size, over a solid, gradient or textured
background. No two objects of a scene share both colour and shape, so "the red circle" names one.
Splits are drawn from independent seeds and numbered apart: they never share an image. The `single`
split holds extra one-object training scenes, which the mini recipe's CLIP learns shape names from first.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.errors import DataError
from ..core.io import atomic_write_text

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225), "yellow": (235, 205, 35),
           "purple": (140, 55, 190), "orange": (245, 130, 25)}
SIZES = {"small": (0.5, 0.6), "large": (0.8, 0.9)}  # object side as a fraction of a grid cell
JITTER = 0.15  # how far (as a fraction of the free space) an object may sit off its cell's centre
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
SPLITS = ("train", "val", "test", "single")  # single: extra one-object training scenes (the CLIP curriculum)
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt
SUPERSAMPLE = 4


def position_name(row: int, column: int) -> str:
    """'top left', 'top', 'center', 'right', ... for a cell of the 3x3 grid."""
    if row == 1 and column == 1:
        return "center"
    if row == 1:
        return COLUMNS[column]
    if column == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[column]}"


CELLS = {position_name(row, column): 3 * row + column for row in range(3) for column in range(3)}  # name -> 0-8


def position_phrase(position: str) -> str:
    """'at the top left', 'in the center', 'on the left', 'at the top'."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


@dataclass
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str
    bbox: list[float]  # normalised [x1, y1, x2, y2]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    id: str
    file_name: str
    width: int
    height: int
    background: str  # "a dark background", "a gradient background", ...
    objects: list[ShapeObject] = field(default_factory=list)


# ---------------------------------------------------------------- drawing

def _background(rng: random.Random) -> tuple[tuple, str]:
    """A muted background (grey-ish, low saturation so every object colour stands out) as the draws that
    `_background_pixels` paints it from, and its words."""
    def muted():
        base = rng.randint(55, 200)
        return np.array([min(255, max(0, base + rng.randint(-20, 20))) for _ in range(3)], dtype=np.float32)

    kind = rng.choice(("solid", "solid", "gradient", "texture"))
    first = muted()
    if kind == "solid":
        brightness = float(first.mean())
        words = "a dark background" if brightness < 100 else "a light background" if brightness > 160 else \
            "a grey background"
        return (kind, first), words
    if kind == "gradient":
        second = muted()
        return (kind, first, second, rng.random() < 0.5), "a gradient background"
    return (kind, first, rng.randrange(2**32)), "a textured background"


def _background_pixels(spec: tuple, side: int) -> np.ndarray:
    """The (side, side, 3) uint8 pixels of `_background`'s draws."""
    kind, first = spec[:2]
    if kind == "solid":
        pixels = np.broadcast_to(first, (side, side, 3)).copy()
    elif kind == "gradient":
        second, transposed = spec[2:]
        ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
        pixels = np.broadcast_to(first * (1 - ramp) + second * ramp, (side, side, 3))
        if transposed:
            pixels = pixels.transpose(1, 0, 2)
    else:
        np_rng = np.random.default_rng(spec[2])
        block = 4 * SUPERSAMPLE  # blotches of 4 output pixels
        coarse = np_rng.normal(0.0, 14.0, (side // block, side // block, 3)).astype(np.float32)
        pixels = first + np.kron(coarse, np.ones((block, block, 1), dtype=np.float32))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x1, y1, x2, y2 = box
    cx, cy, w = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "cross":
        arm = w / 6
        draw.rectangle((cx - arm, y1, cx + arm, y2), fill=fill)
        draw.rectangle((x1, cy - arm, x2, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@dataclass
class Drawing:
    """A scene's image with every random draw made: `render` paints it, the same pixels in any process.
    `shapes` holds (shape, box, fill) with the box in supersampled pixels."""
    side: int
    background: tuple  # _background's draws
    shapes: list[tuple[str, tuple[float, float, float, float], tuple[int, int, int]]]


def render(drawing: Drawing) -> Image.Image:
    """The image of a `Drawing`: drawn at SUPERSAMPLE times its side, then scaled down (smooth edges)."""
    image = Image.fromarray(_background_pixels(drawing.background, drawing.side * SUPERSAMPLE))
    draw = ImageDraw.Draw(image)
    for shape, box, fill in drawing.shapes:
        _draw(draw, shape, box, fill)
    return image.resize((drawing.side, drawing.side), Image.LANCZOS)


def make_scene(rng: random.Random, scene_id: str, file_name: str, side: int = 96,
               min_objects: int = 1, max_objects: int = 4,
               objects: list[tuple[str, str, str, int]] | None = None) -> tuple[Scene, Drawing]:
    """One random scene and the drawing of its image (`render` paints it); `objects` [(shape, colour, size,
    cell 0-8), ...] fixes what is drawn where (sizes and positions within the cells are still jittered)."""
    background, words = _background(rng)
    drawing = Drawing(side, background, [])
    cell = side / 3
    if objects is None:
        count = rng.randint(min_objects, max_objects)
        picks: list[tuple[str, str]] = []
        while len(picks) < count:
            pick = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
            if pick not in picks:
                picks.append(pick)
        objects = [(shape, colour, rng.choice(list(SIZES)), cell)
                   for (shape, colour), cell in zip(picks, rng.sample(range(9), count))]
    scene = Scene(scene_id, file_name, side, side, words)
    for shape, colour, size, index in objects:
        row, column = divmod(index, 3)
        low, high = SIZES[size]
        width = cell * rng.uniform(low, high)
        slack = JITTER * (cell - width) / 2
        cx = (column + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        box = (cx - width / 2, cy - width / 2, cx + width / 2, cy + width / 2)
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
        drawing.shapes.append((shape, tuple(v * SUPERSAMPLE for v in box), fill))
        bbox = [round(min(max(v / side, 0.0), 1.0), 3) for v in box]
        scene.objects.append(ShapeObject(shape, colour, size, position_name(row, column), bbox))
    return scene, drawing


def _save(job: tuple[Drawing, Path]) -> None:
    drawing, path = job
    render(drawing).save(path)


def _save_all(jobs: list[tuple[Drawing, Path]], desc: str, progress: bool) -> None:
    """Paint and write the images, over the machine's cores (the scenes were drawn in order: the same files)."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="img")
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)
    if workers < 2 or len(jobs) < 64:
        for job in jobs:
            _save(job)
            bar.update()
    else:
        with multiprocessing.Pool(workers) as pool:
            for _ in pool.imap_unordered(_save, jobs, chunksize=16):
                bar.update()
    bar.close()


# ---------------------------------------------------------------- words

def _object_words(obj: ShapeObject, rng: random.Random, with_size: bool | None = None) -> str:
    with_size = rng.random() < 0.5 if with_size is None else with_size
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else obj.name


def _article(words: str) -> str:
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def join_words(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _listing(objects: list[ShapeObject], rng: random.Random, with_positions: bool, colours: bool = True,
             place_first: bool = False) -> str:
    """The objects in a random order, e.g. "a small red circle at the top left and a blue square"; with
    `place_first` (and `with_positions`), "at the top left a small red circle and ..."."""
    parts = []
    for obj in rng.sample(objects, len(objects)):
        words = _article(_object_words(obj, rng) if colours else obj.shape)
        if not with_positions:
            parts.append(words)
        else:
            place = position_phrase(obj.position)
            parts.append(f"{place} {words}" if place_first else f"{words} {place}")
    return join_words(parts)


def captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` different phrasings of what the scene shows (as COCO has five captions per image)."""
    objects = scene.objects
    n = len(objects)
    noun = "shape" if n == 1 else "shapes"
    options = [
        lambda: f"{_listing(objects, rng, True).capitalize()}.",
        lambda: f"{_listing(objects, rng, False).capitalize()} on {scene.background}.",
        lambda: f"{NUMBERS[n].capitalize()} {noun} on {scene.background}: {_listing(objects, rng, False)}.",
        lambda: f"A picture of {_listing(objects, rng, True)}.",
        lambda: f"a photo of {_listing(objects, rng, False)}",
        lambda: (f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {noun} in this image: "
                 f"{_listing(objects, rng, True)}."),
        lambda: f"{_listing(objects, rng, False, colours=False).capitalize()}.",
        lambda: f"a photo of {_listing(objects, rng, False, colours=False)}",
        lambda: f"{_listing(objects, rng, True, colours=False).capitalize()}.",
    ]
    out: list[str] = []
    for _ in range(50):
        text = rng.choice(options)()
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


def _listed_captions(scene: Scene, rng: random.Random, count: int, item) -> list[str]:
    """`count` captions "Two shapes[ on <background>]: <item> and <item>.", `item(obj)` for each object,
    the objects in a new order each time."""
    objects = scene.objects
    n = len(objects)
    out = []
    for _ in range(count):
        head = f"{NUMBERS[n].capitalize()} {'shape' if n == 1 else 'shapes'}"
        if rng.random() < 0.5:
            head += f" on {scene.background}"
        out.append(f"{head}: {join_words([item(obj) for obj in rng.sample(objects, n)])}.")
    return out


def shape_first_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` captions that name each object by its shape, then its colour and place ("Two shapes on a dark
    background: circle red at the top left and square blue in the center."), the objects in a new order
    each time. Every phrasing of `captions` says "[size] colour shape [place]". Trained on those in stage
    1.5, the mini LM grows a first-layer attention head that finds an object's image token by the word
    a caption names it with first, the colour, and never learns to find it by its shape ("What colour
    is the circle?" picks among the objects at about chance). The mini recipe's `recap` section goes on
    from there on these captions, and the LM adds a head keyed by the shape (README, "demo")."""
    return _listed_captions(scene, rng, count, lambda obj: f"{obj.shape} {obj.colour} {position_phrase(obj.position)}")


def place_first_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` captions that name each object by its place first, as the answers name places, then its
    colour and shape ("Two shapes on a dark background: top left red circle and center blue square."), the
    objects in a new order each time: what shape_first_captions does for the shape, for the place. Half
    the recap captions so written (`datagen: recap_place_first`), the recap stage keys its shape head
    by the place as well (README, "Captions that name the place first")."""
    return _listed_captions(scene, rng, count, lambda obj: f"{obj.position} {obj.colour} {obj.shape}")


def plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith(("s", "x", "sh", "ch")) else f"{shape}s"


def short_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Questions with one-word/phrase answers about colour, shape, count and position. Each is asked
    only where the answer is unambiguous."""
    objects = scene.objects
    by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objects if o.colour == c] for c in COLOURS}
    out = []
    for obj in objects:
        if len(by_shape[obj.shape]) == 1:
            out.append(("colour", f"What colour is the {obj.shape}?", obj.colour))
        else:
            out.append(("colour", f"What colour is the {obj.shape} {position_phrase(obj.position)}?", obj.colour))
        if len(by_colour[obj.colour]) == 1:
            out.append(("shape", f"What shape is the {obj.colour} object?", obj.shape))
        else:
            out.append(("shape", f"What shape is the {obj.colour} object {position_phrase(obj.position)}?",
                        obj.shape))
        out.append(("position", f"Where is the {obj.name}?", obj.position))
    out.append(("count", rng.choice(["How many shapes are there?", "How many objects are in the image?"]),
                str(len(objects))))
    shape = rng.choice(SHAPES)
    out.append(("count", f"How many {plural(shape)} are there?", str(len(by_shape[shape]))))
    colour = rng.choice(list(COLOURS))
    out.append(("count", f"How many {colour} shapes are there?", str(len(by_colour[colour]))))
    return [{"category": kind, "text": text, "answer": answer} for kind, text, answer in out]


def lookup_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Training-only short questions that find an object by one key, its place, its shape or its colour
    (the benchmark's questions mostly name two): "What is at the top left?" ("Red circle", or "Nothing"
    for an empty cell), "What colour is the shape in the center?", "What shape is on the left?", "Where is
    the circle?" where it is the only circle, "Where is the red object?" where it is the only red one."""
    objects = scene.objects
    out = []
    for obj in objects:
        place = position_phrase(obj.position)
        out.append(rng.choice([(f"What is {place}?", obj.name), (f"What colour is the shape {place}?", obj.colour),
                               (f"What shape is {place}?", obj.shape)]))
        if sum(o.shape == obj.shape for o in objects) == 1:
            out.append((f"Where is the {obj.shape}?", obj.position))
        if sum(o.colour == obj.colour for o in objects) == 1:
            out.append((f"Where is the {obj.colour} object?", obj.position))
    taken = {o.position for o in objects}
    empty = [name for name in CELLS if name not in taken]
    if empty:
        out.append((f"What is {position_phrase(rng.choice(empty))}?", "nothing"))
    return [(question, answer.capitalize()) for question, answer in out]


ALL_OBJECTS = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def pope_questions(scene: Scene, rng: random.Random, strategy: str, frequency: dict[str, int],
                   per_image: int = 2) -> list[dict]:
    """POPE-style "Is there a X in the image?" questions: present objects (yes) and as many absent
    ones (no), the absent ones drawn at random, by frequency in the split (popular), or as near
    misses that share a colour or a shape with an object present (adversarial)."""
    present = [o.name for o in scene.objects]
    absent = [name for name in ALL_OBJECTS if name not in present]
    positives = rng.sample(present, min(per_image, len(present)))
    if strategy == "random":
        negatives = rng.sample(absent, len(positives))
    elif strategy == "popular":
        negatives = sorted(absent, key=lambda name: (-frequency.get(name, 0), name))[:len(positives)]
    elif strategy == "adversarial":
        near = [name for name in absent if any(name.split()[0] == o.colour or name.split()[1] == o.shape
                                              for o in scene.objects)]
        rng.shuffle(near)
        negatives = (near + [n for n in absent if n not in near])[:len(positives)]
    else:
        raise ValueError(f"unknown POPE strategy {strategy!r}")
    out = [{"text": f"Is there {_article(name)} in the image?", "label": "yes", "object": name}
           for name in positives]
    out += [{"text": f"Is there {_article(name)} in the image?", "label": "no", "object": name}
            for name in negatives]
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- splits on disk

def synth(output: str | Path, counts: dict[str, int], seed: int = 0, side: int = 96,
          progress: bool = False) -> dict[str, int]:
    """Write the shapes world to `output`:

    - `{split}/{id}.png`: the images;
    - `annotations/captions_{split}.json`, `annotations/instances_{split}.json`: COCO's caption and
      instance files (COCO's bbox is [x, y, w, h] in pixels; each instance also carries colour, size,
      position and `bbox_norm`, the normalised [x1, y1, x2, y2]);
    - `questions/short_{split}.jsonl`: short-answer questions (question_id, image, text, answer, category);
    - `questions/pope_{split}_{random|popular|adversarial}.jsonl`: POPE's format (question_id, image, text, label).
    Returns the number of images per split.
    """
    output = Path(output)
    for split, n in counts.items():
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
        if n < 0:
            raise DataError(f"{split}: the number of images must be >= 0, not {n}")
    base = {split: 1_000_000 * (i + 1) for i, split in enumerate(SPLITS)}  # ids never collide across splits
    written = {}
    for split, n in counts.items():
        rng = random.Random(f"{seed}-{split}")
        folder = output / split
        folder.mkdir(parents=True, exist_ok=True)
        scenes: list[Scene] = []
        caption_rows, instance_rows, short_rows = [], [], []
        drawings = []
        for i in range(n):
            image_id = base[split] + i
            file_name = f"{split}/{image_id}.png"
            scene, drawing = make_scene(rng, str(image_id), file_name, side=side,
                                        max_objects=1 if split == "single" else 4)
            drawings.append((drawing, output / file_name))
            scenes.append(scene)
            for text in captions(scene, rng):
                caption_rows.append({"id": len(caption_rows) + 1, "image_id": image_id, "caption": text})
            for obj in scene.objects:
                x1, y1, x2, y2 = (v * side for v in obj.bbox)
                instance_rows.append({
                    "id": len(instance_rows) + 1, "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0, "colour": obj.colour,
                    "size": obj.size, "position": obj.position, "bbox_norm": obj.bbox})
            for q in short_questions(scene, rng):
                short_rows.append({"question_id": f"{image_id}-{len(short_rows)}", "image": file_name, **q})
        _save_all(drawings, f"synth {split}", progress)
        images = [{"id": int(s.id), "file_name": s.file_name, "width": s.width, "height": s.height,
                   "background": s.background} for s in scenes]
        info = {"description": "llava shapes world", "split": split, "seed": seed}
        categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
        atomic_write_text(output / "annotations" / f"captions_{split}.json",
                          json.dumps({"info": info, "images": images, "annotations": caption_rows}))
        atomic_write_text(output / "annotations" / f"instances_{split}.json",
                          json.dumps({"info": info, "images": images, "annotations": instance_rows,
                                      "categories": categories}))
        _write_jsonl(output / "questions" / f"short_{split}.jsonl", short_rows)
        frequency: dict[str, int] = {}
        for scene in scenes:
            for obj in scene.objects:
                frequency[obj.name] = frequency.get(obj.name, 0) + 1
        for strategy in ("random", "popular", "adversarial"):
            pope_rng = random.Random(f"{seed}-{split}-pope-{strategy}")
            rows = []
            for scene in scenes:
                for q in pope_questions(scene, pope_rng, strategy, frequency):
                    rows.append({"question_id": len(rows) + 1, "image": scene.file_name, "text": q["text"],
                                 "label": q["label"], "object": q["object"]})
            _write_jsonl(output / "questions" / f"pope_{split}_{strategy}.jsonl", rows)
        written[split] = n
    return written


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def load_scenes(root: str | Path, split: str) -> list[Scene]:
    """The scenes of a split, read back from the COCO instance and caption files."""
    root = Path(root)
    path = root / "annotations" / f"instances_{split}.json"
    if not path.exists():
        raise DataError(f"{path}: not found (run `llava synth` first)")
    data = json.loads(path.read_text())
    scenes = {img["id"]: Scene(str(img["id"]), img["file_name"], img["width"], img["height"],
                               img.get("background", "a background")) for img in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    for ann in data["annotations"]:
        scenes[ann["image_id"]].objects.append(ShapeObject(names[ann["category_id"]], ann["colour"], ann["size"],
                                                           ann["position"], ann["bbox_norm"]))
    return list(scenes.values())


def questions_with_answers(root: str | Path, split: str) -> list[tuple[str, str, str]]:
    """(image, question, Answer) for every short-answer question of a split, then every POPE one
    (random, popular, adversarial), answers capitalised as LLaVA's VQA data writes them."""
    questions = Path(root) / "questions"
    out = []
    for path in [questions / f"short_{split}.jsonl", *sorted(questions.glob(f"pope_{split}_*.jsonl"))]:
        if not path.exists():
            raise DataError(f"{path}: not found (run `llava synth` first)")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.append((row["image"], row["text"], row.get("answer", row.get("label")).capitalize()))
    return out


def _questions_by_image(root: str | Path, split: str) -> dict[str, list[tuple[str, str]]]:
    """Each image's (question, Answer) pairs, short-answer then POPE, each pair once (the POPE splits repeat
    their present objects)."""
    by_image: dict[str, list[tuple[str, str]]] = {}
    for image, question, answer in questions_with_answers(root, split):
        by_image.setdefault(image, []).append((question, answer))
    return {image: list(dict.fromkeys(pairs)) for image, pairs in by_image.items()}


def scene_documents(root: str | Path, split: str, questions_per_document: int = 6, seed: int = 0,
                    place_first: float = 0.0, short_answer_suffix: float = 0.0, shape_first: float = 0.0) -> list[str]:
    """Text-only reading exercises for the language model's pretraining: a description naming every object
    of a scene with its colour, shape and position, then some of the scene's short-answer and POPE
    questions with their answers ("A red circle at the top left and a blue square in the center. What
    colour is the square? Blue. ..."), as many "No" as "Yes". LLaVA's LLM can already answer questions
    about a scene described in words; this is where the mini LM learns to, before it ever sees an image.

    `place_first`: the share of descriptions that put each place before its object ("At the top left a red
    circle and in the center a blue square."). There the object's last word has already read its place,
    as an image token carries its cell along with its colour and shape, so "Where is the red circle?" is
    answered by looking the object up and reading the place off what the lookup finds, the way it must be
    with an image; after the object, the place is copied from the words that follow it instead.
    `short_answer_suffix`: the share of questions followed by LLaVA-1.5's "Answer the question using a
    single word or phrase." before their answer, so that the answer is carried across it as in stage 2.
    `shape_first`: the share of descriptions written as the recap stage's captions, each object's shape
    before its colour ("Two shapes: circle red at the top left and square blue in the center."), where
    "red circle" is not a pair of neighbouring words: "Where is the red circle?" is then answered by
    finding the word that is both, as an image token is, not by matching the question's words in order.
    Drawn from what place_first leaves (place_first + shape_first <= 1).
    At 0 (the default) none draws from the random stream, and the documents are those of before."""
    rng = random.Random(seed)
    by_image = _questions_by_image(root, split)
    out = []
    for scene in load_scenes(root, split):
        pairs = _as_many_no_as_yes(by_image.get(scene.file_name, []), rng)
        rng.shuffle(pairs)
        for start in range(0, len(pairs), questions_per_document):
            draw = rng.random() if place_first or shape_first else 1.0
            if place_first <= draw < place_first + shape_first:
                description = shape_first_captions(scene, rng, 1)[0]
            else:
                listing = _listing(scene.objects, rng, with_positions=True, place_first=draw < place_first)
                description = f"{listing.capitalize()}."
            asked = [f"{question}\n{SHORT_ANSWER_SUFFIX} {answer}."
                     if short_answer_suffix and rng.random() < short_answer_suffix else f"{question} {answer}."
                     for question, answer in pairs[start:start + questions_per_document]]
            out.append(" ".join([description, *asked]))
    return out


def _as_many_no_as_yes(pairs: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """Drop surplus "No" questions at random. The three POPE splits ask about the same present objects
    but about different absent ones, so once duplicates are gone an image has up to three "No" for each
    "Yes"; trained on that, the mini model answered "No" to every existence question."""
    no = [pair for pair in pairs if pair[1] == "No"]
    keep = set(rng.sample(no, min(len(no), sum(answer == "Yes" for _, answer in pairs))))
    return [pair for pair in pairs if pair[1] != "No" or pair in keep]


def short_answer_records(root: str | Path, split: str, questions_per_record: int = 8, seed: int = 0,
                         lookups: bool = False) -> list[dict]:
    """LLaVA-format training records from the short-answer and POPE questions of a split, as
    LLaVA-1.5 turns its academic VQA data into conversations: each question with the
    short-answer suffix, several questions about one image in one multi-turn record. Yes/no questions
    are half yes, half no, as in POPE itself. `lookups` adds each scene's `lookup_questions` (training data
    only: the benchmark does not ask them), drawn from a random stream of their own."""
    rng = random.Random(seed)
    extra_rng = random.Random(f"lookups-{seed}")
    scenes = {scene.file_name: scene for scene in load_scenes(root, split)} if lookups else {}
    records = []
    for image, pairs in _questions_by_image(root, split).items():
        pairs = _as_many_no_as_yes(pairs, rng)
        if lookups:
            pairs += lookup_questions(scenes[image], extra_rng)
        rng.shuffle(pairs)
        for start in range(0, len(pairs), questions_per_record):
            turns = []
            for j, (question, answer) in enumerate(pairs[start:start + questions_per_record]):
                text = f"{question}\n{SHORT_ANSWER_SUFFIX}"
                if j == 0:  # the image before or after the first question, as LLaVA's instruction data
                    text = f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"
                turns.append({"from": "human", "value": text})
                turns.append({"from": "gpt", "value": answer})
            records.append({"id": f"vqa-{Path(image).stem}-{start // questions_per_record}", "image": image,
                            "conversations": turns})
    return records
