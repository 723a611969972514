"""`llava demo`: the whole LLaVA recipe in miniature, end to end on a CPU, from recipes/mini.yaml:
shapes world -> tiny CLIP -> tokenizer + tiny LM -> instruction data (rule-based teacher) ->
stage 1 (projector) -> stage 1.5 (the whole model on captions, if the recipe has a midstage section; then
on re-captions, if it has a recap section) -> stage 2 (instruction tuning) -> evaluation, with a summary table.

Every step writes its own folder under the work folder and is skipped when that folder is already
complete, so a killed demo continues where it stopped. `rebuild` copies the result into models/demo."""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .core.errors import TrainConfigError
from .core.io import atomic_dir, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "mini.yaml"
BUNDLED = ROOT / "models" / "demo"
STAGES = {"pretrain": "stage1", "midstage": "stage1_5", "recap": "stage1_5_recap",  # recipe section -> output folder
          "finetune": "stage2"}
CAPTION_KINDS = ("coco", "shape_first")  # datagen: captions: what stages 1 and 1.5 train on (recap: shape_first)
# lm: shares of the reading exercises (scene_documents)
LM_CORPUS_FIELDS = ("place_first", "short_answer_suffix", "shape_first")


@dataclass
class StepResult:
    name: str
    seconds: float
    summary: str
    skipped: bool = False


@dataclass
class DemoResult:
    work: Path
    steps: list[StepResult] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def load_recipe(path: str | Path = RECIPE) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: recipe not found") from None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    missing = [s for s in ("synth", "clip", "lm", "datagen", "pretrain", "finetune") if s not in (recipe or {})]
    if missing:
        raise TrainConfigError(f"{path}: no {missing[0]!r} section")
    return recipe


def _dataclass_from(cls, values: dict, section: str):
    _check_fields(cls, values, section)
    return cls(**values)


def _check_fields(cls, values: dict, section: str) -> None:
    _check_names({f.name for f in fields(cls)}, values, section)


def _check_names(known: set[str], values: dict, section: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainConfigError(f"recipe section {section!r}: unknown field {unknown[0]!r}")


def _check_share(values: dict, name: str, section: str) -> float:
    """values[name] (0 if absent), checked to be a number from 0 to 1."""
    share = values.get(name, 0.0)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        raise TrainConfigError(f"recipe section {section!r}: {name} must be a share between 0 and 1, not {share!r}")
    return share


def _check_recipe(recipe: dict) -> None:
    """Every section's field names, checked before the first step runs rather than when its step comes."""
    from .train.clip import ClipConfig
    from .train.config import TrainConfig
    from .train.lm import LMConfig

    _dataclass_from(ClipConfig, recipe["clip"], "clip")
    _dataclass_from(LMConfig, _lm_config_values(recipe["lm"]), "lm")
    for name in LM_CORPUS_FIELDS:
        _check_share(recipe["lm"], name, "lm")
    if recipe["lm"].get("place_first", 0.0) + recipe["lm"].get("shape_first", 0.0) > 1:
        raise TrainConfigError("recipe section 'lm': place_first + shape_first must be at most 1 (each is a share "
                               "of the descriptions)")
    tokenizer = recipe.get("tokenizer") or {}
    _check_names({"vocab_size", "plural_stems"}, tokenizer, "tokenizer")
    stems = tokenizer.get("plural_stems", [])
    if not isinstance(stems, list) or not all(isinstance(w, str) and w.isalpha() and w.islower() for w in stems):
        raise TrainConfigError(f"recipe section 'tokenizer': plural_stems must be a list of lower-case words, "
                               f"not {stems!r}")
    for stage in _stages(recipe):
        _check_fields(TrainConfig, recipe[stage], stage)
    if "recap" in recipe and "midstage" not in recipe:
        raise TrainConfigError("recipe section 'recap' continues stage 1.5 from its model: add a 'midstage' section")
    datagen = recipe["datagen"] or {}
    _check_names({"kinds", "questions_per_record", "captions", "stage2_recaptions", "lookup_questions",
                  "recap_place_first"}, datagen, "datagen")
    count = datagen.get("stage2_recaptions", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise TrainConfigError(f"recipe section 'datagen': stage2_recaptions must be a whole number >= 0, "
                               f"not {count!r}")
    if count and "recap" not in recipe:
        raise TrainConfigError("recipe section 'datagen': stage2_recaptions draws from the recap section's "
                               "re-captions: add a 'recap' section")
    if _check_share(datagen, "recap_place_first", "datagen") and "recap" not in recipe:
        raise TrainConfigError("recipe section 'datagen': recap_place_first is a share of the recap section's "
                               "captions: add a 'recap' section")
    if not isinstance(datagen.get("lookup_questions", False), bool):
        raise TrainConfigError(f"recipe section 'datagen': lookup_questions must be true or false, "
                               f"not {datagen['lookup_questions']!r}")
    if datagen.get("captions", "coco") not in CAPTION_KINDS:
        raise TrainConfigError(f"recipe section 'datagen': captions must be one of {', '.join(CAPTION_KINDS)}, "
                               f"not {datagen['captions']!r}")


def _stages(recipe: dict) -> list[str]:
    """The training sections the recipe runs, in order (midstage and recap are optional)."""
    return [stage for stage in STAGES if stage in recipe]


def _complete(folder: Path, marker: str = "config.json") -> bool:
    return (folder / marker).exists()


def run_demo(work: str | Path = "runs/demo", recipe_path: str | Path = RECIPE, fresh: bool = False,
             progress: bool = True, log=print) -> DemoResult:
    """Run every step of the mini recipe into `work`; see the module docstring."""
    recipe = load_recipe(recipe_path)
    _check_recipe(recipe)
    work = Path(work)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    seed = int(recipe.get("seed", 0))
    result = DemoResult(work)
    shapes = work / "shapes"

    def step(name: str, done: bool, fn):
        if done:
            result.steps.append(StepResult(name, 0.0, "already done", skipped=True))
            log(f"[{name}] already done in {work}")
            return
        log(f"[{name}] ...")
        start = time.perf_counter()
        summary = fn()
        result.steps.append(StepResult(name, time.perf_counter() - start, summary))
        log(f"[{name}] {summary} ({time.perf_counter() - start:.0f} s)")

    step("synth", all(_complete(shapes, f"annotations/instances_{split}.json") for split in _split_counts(recipe)),
         lambda: _synth(recipe, shapes, seed, progress))
    step("clip", _complete(work / "clip"), lambda: _clip(recipe, shapes, work / "clip", progress))
    step("lm", _complete(work / "lm"), lambda: _lm(recipe, shapes, work / "lm", progress))
    step("datagen", all(_complete(work / "data", name) for name in _data_files(recipe)),
         lambda: _datagen(recipe, shapes, work / "data", seed, progress))
    for stage in _stages(recipe):
        step(stage, _complete(work / STAGES[stage]), lambda stage=stage: _train_stage(recipe, stage, work, progress))
    step("eval", _complete(work / "eval", "metrics.json"), lambda: _evaluate(recipe, work, progress))
    result.metrics = json.loads((work / "eval" / "metrics.json").read_text())
    return result


# ---------------------------------------------------------------- steps

def _split_counts(recipe: dict) -> dict[str, int]:
    """The synth section's images per split (every key but image_size)."""
    return {k: int(v) for k, v in recipe["synth"].items() if k != "image_size"}


def _synth(recipe: dict, shapes: Path, seed: int, progress: bool) -> str:
    from .data.shapes import synth

    side = int(recipe["synth"].get("image_size", 64))
    counts = synth(shapes, _split_counts(recipe), seed=seed, side=side, progress=progress)
    return ", ".join(f"{n} {split}" for split, n in counts.items()) + " images"


def _captions(shapes: Path, split: str) -> list[tuple[str, list[str]]]:
    data = json.loads((shapes / "annotations" / f"captions_{split}.json").read_text())
    by_image: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    return [(str(shapes / image["file_name"]), by_image.get(image["id"], [])) for image in data["images"]]


def _caption_texts(shapes: Path, split: str) -> list[str]:
    return [caption for _, captions in _captions(shapes, split) for caption in captions]


def _corpus(shapes: Path) -> list[str]:
    """The tokenizer's corpus: the train captions and the train questions with their answers, the POPE
    ones included (without them "Yes" and "No" are not words of the tokenizer: "No" became ▁ N o)."""
    from .data.shapes import questions_with_answers

    questions = [f"{question} {answer}." for _, question, answer in questions_with_answers(shapes, "train")]
    return _caption_texts(shapes, "train") + questions


def _tokenizer(recipe: dict, shapes: Path):
    from .data.conversation import conv_templates
    from .data.shapes import SHORT_ANSWER_SUFFIX
    from .datagen.prompts import DETAIL_INSTRUCTIONS
    from .train.lm import train_tokenizer

    extra = [t.system for t in conv_templates.values() if t.system] + list(DETAIL_INSTRUCTIONS)
    extra += ["USER: ASSISTANT: Human: Assistant: ### <image>", SHORT_ANSWER_SUFFIX]
    section = recipe.get("tokenizer") or {}  # an empty section reads as None, as _check_recipe allows
    return train_tokenizer(_corpus(shapes) + extra, int(section.get("vocab_size", 1024)),
                           plural_stems=tuple(section.get("plural_stems", ())))


def _shape_names(shapes: Path, split: str) -> list[tuple[str, list[str]]]:
    """One-object scenes captioned by their shape alone ("a photo of a circle"): the CLIP curriculum."""
    from .clip.classify import DEFAULT_PROMPT
    from .data.shapes import load_scenes

    return [(str(shapes / scene.file_name), [DEFAULT_PROMPT.format(label=scene.objects[0].shape)])
            for scene in load_scenes(shapes, split) if len(scene.objects) == 1]


def _cell_phrases(shapes: Path, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """Per image, per cell of the 3x3 grid (row by row): the phrase of its object ("a small red circle") or
    "background". The region-text pairs of the CLIP's region term, one per image token of a 32 px patch."""
    from .data.shapes import CELLS, load_scenes

    out = {}
    for split in splits:
        for scene in load_scenes(shapes, split):
            cells = ["background"] * 9
            for obj in scene.objects:
                cells[CELLS[obj.position]] = f"a {obj.size} {obj.name}"
            out[str(shapes / scene.file_name)] = cells
    return out


def _clip(recipe: dict, shapes: Path, output: Path, progress: bool) -> str:
    from .clip.classify import shape_accuracy
    from .data.shapes import CELLS, COLOURS, SHAPES, position_phrase
    from .train.clip import ClipConfig, train_clip
    from .train.lm import with_eos

    config = _dataclass_from(ClipConfig, recipe["clip"], "clip")
    curriculum = _shape_names(shapes, "single") if config.curriculum_steps else []
    regions = _cell_phrases(shapes, ("train", "single")) if config.region_weight or config.region_place_weight else None
    # one place phrase per patch, row by row as CELLS runs
    places = [position_phrase(name) for name in CELLS] if config.place_weight or config.region_place_weight else None
    stats = train_clip(_captions(shapes, "train"), with_eos(_tokenizer(recipe, shapes), True), config, output,
                       progress=progress, swap_groups=(SHAPES, tuple(COLOURS)), curriculum=curriculum,
                       regions=regions, places=places)
    accuracy = shape_accuracy(output, shapes, "test")
    atomic_write_text(output / "zero_shot.json", json.dumps(accuracy, indent=2))
    return (f"{stats['params'] / 1e6:.1f}M params, loss {stats['loss']:.3f}, zero-shot shape accuracy "
            f"{accuracy['accuracy']:.1%} on {accuracy['n']} test images")


def _lm_config_values(section: dict) -> dict:
    """The lm section less the fields that shape its corpus rather than its training."""
    return {k: v for k, v in section.items() if k not in LM_CORPUS_FIELDS}


def _lm(recipe: dict, shapes: Path, output: Path, progress: bool) -> str:
    from .data.shapes import scene_documents
    from .train.lm import LMConfig, pretrain_lm

    section = recipe["lm"]
    config = _dataclass_from(LMConfig, _lm_config_values(section), "lm")
    documents = scene_documents(shapes, "train", seed=int(recipe.get("seed", 0)),
                                **{name: float(section.get(name, 0.0)) for name in LM_CORPUS_FIELDS})
    texts = _caption_texts(shapes, "train") + documents
    stats = pretrain_lm(texts, _tokenizer(recipe, shapes), config, output, progress=progress)
    return f"{stats['params'] / 1e6:.1f}M params, {stats['tokens']} corpus tokens, loss {stats['loss']:.3f}"


def _datagen(recipe: dict, shapes: Path, output: Path, seed: int, progress: bool) -> str:
    from .data.shapes import short_answer_records
    from .datagen.context import load_coco
    from .datagen.runner import merged_records, run
    from .datagen.teachers import RuleTeacher

    section = recipe["datagen"]
    kinds = tuple(section.get("kinds", ("conversation", "detail", "complex_reasoning")))
    contexts = load_coco(shapes / "annotations" / "captions_train.json",
                         shapes / "annotations" / "instances_train.json")
    summary = run(contexts, RuleTeacher(seed), output, kinds=kinds, concurrency=1, seed=seed, progress=progress)
    short = short_answer_records(shapes, "train", int(section.get("questions_per_record", 8)), seed=seed,
                                 lookups=bool(section.get("lookup_questions", False)))
    records = merged_records(output, kinds, seed=seed, extra=short)
    mixed = ""
    if "recap" in recipe:  # written before captions.json, the file that marks the step complete
        recaps = _caption_records(_stage1_captions("shape_first", shapes, seed,
                                                   float(section.get("recap_place_first", 0.0))), shapes)
        atomic_write_text(output / "recaptions.json", json.dumps(recaps))
        count = int(section.get("stage2_recaptions", 0))
        if count > len(recaps):
            raise TrainConfigError(f"recipe section 'datagen': stage2_recaptions {count} is more than the "
                                   f"{len(recaps)} re-captions")
        if count:  # LLaVA-NeXT's stage 2 mixes re-captioned data into the instruction data, after the shuffle
            records += [dict(r, id=f"re{r['id']}") for r in random.Random(seed).sample(recaps, count)]
            mixed = f" ({count} of them re-captions)"
    atomic_write_text(output / "llava_instruct.json", json.dumps(records))
    captions = _caption_records(_stage1_captions(section.get("captions", "coco"), shapes, seed), shapes)
    atomic_write_text(output / "captions.json", json.dumps(captions))
    written = sum(summary.written.values()) + sum(summary.skipped.values())
    recaptions = " and as many shape-first re-captions" if "recap" in recipe else ""
    return (f"{written} teacher records ({', '.join(kinds)}), {len(short)} short-answer records, "
            f"{len(records)} stage-2 records{mixed}, {len(captions)} stage-1 captions{recaptions}")


def _data_files(recipe: dict) -> list[str]:
    """What the datagen step writes, captions.json last."""
    return ["llava_instruct.json", *(["recaptions.json"] if "recap" in recipe else []), "captions.json"]


def _caption_records(captions: list[tuple[str, list[str]]], shapes: Path) -> list[dict]:
    """Captions as LLaVA records ("Describe the image briefly." -> caption), one per caption."""
    return [{"id": f"cap-{Path(image).stem}-{i}", "image": str(Path(image).relative_to(shapes)),
             "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                               {"from": "gpt", "value": caption}]}
            for image, caps in captions for i, caption in enumerate(caps)]


def _stage1_captions(kind: str, shapes: Path, seed: int, place_first: float = 0.0) -> list[tuple[str, list[str]]]:
    """Captions to train stage 1 or 1.5 on: the synth captions ("coco"), or as many per image that name each
    object's shape first ("shape_first", see shapes.shape_first_captions), `place_first` of those, drawn from
    a random stream of their own, naming each object's place first instead (shapes.place_first_captions)."""
    from .data.shapes import load_scenes, place_first_captions, shape_first_captions

    if kind == "coco":
        return _captions(shapes, "train")
    rng = random.Random(f"{seed}-shape-first")
    place_rng = random.Random(f"{seed}-place-first")
    counts = {path: len(captions) for path, captions in _captions(shapes, "train")}  # as many as synth wrote
    out = []
    for scene in load_scenes(shapes, "train"):
        path = str(shapes / scene.file_name)
        texts = shape_first_captions(scene, rng, counts[path])
        if place_first:
            texts = [place_first_captions(scene, place_rng, 1)[0] if place_rng.random() < place_first else text
                     for text in texts]
        out.append((path, texts))
    return out


def _train_config(recipe: dict, stage: str, work: Path):
    """The TrainConfig of one training section. Stage 1 starts from the CLIP and the LM with a new projector;
    stage 1.5 (midstage, LLaVA-NeXT's) from them with stage 1's projector, training the whole model on the
    captions; recap from stage 1.5's model, on the shape-first re-captions; stage 2 from the last stage-1.5
    model where there is one, else as stage 1.5 does."""
    from .train.config import TrainConfig

    values = dict(recipe[stage])
    values.update(image_folder=str(work / "shapes"), output=str(work / STAGES[stage]),
                  stage="pretrain" if stage == "pretrain" else "finetune", progress=values.get("progress", True))
    start = dict(vision_tower=str(work / "clip"), language_model=str(work / "lm"))
    if stage == "pretrain":
        values.update(start, data=str(work / "data" / "captions.json"))
    elif stage == "midstage":
        values.update(start, data=str(work / "data" / "captions.json"), projector=str(work / "stage1"))
    elif stage == "recap":
        values.update(model=str(work / "stage1_5"), data=str(work / "data" / "recaptions.json"))
    elif "midstage" in recipe:
        last = "recap" if "recap" in recipe else "midstage"
        values.update(model=str(work / STAGES[last]), data=str(work / "data" / "llava_instruct.json"))
    else:
        values.update(start, data=str(work / "data" / "llava_instruct.json"), projector=str(work / "stage1"))
    return _dataclass_from(TrainConfig, values, stage)


def _train_stage(recipe: dict, stage: str, work: Path, progress: bool) -> str:
    from .train.loop import train

    config = _train_config(recipe, stage, work)
    config.progress = progress
    result = train(config)
    last = result.metrics[-1] if result.metrics else {}
    return f"{result.state.step} steps, final loss {last.get('loss', float('nan')):.3f}"


def _evaluate(recipe: dict, work: Path, progress: bool) -> str:
    from .eval.shapes import evaluate_shapes
    from .model.checkpoint import load_pretrained

    section = recipe.get("eval", {})
    model, processor = load_pretrained(work / "stage2", device="cpu")
    metrics = evaluate_shapes(model, processor, work / "shapes", split=section.get("split", "test"),
                              limit=section.get("limit"), batch_size=int(section.get("batch_size", 32)),
                              output=work / "eval", progress=progress)
    return f"short-answer accuracy {metrics['short']['accuracy']:.1%}, POPE F1 {metrics['pope_f1']:.3f}"


# ---------------------------------------------------------------- output

def summary_table(result: DemoResult) -> str:
    """The steps and the headline numbers as a rich table (plain text)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"llava demo ({result.work})")
    table.add_column("step")
    table.add_column("time", justify="right")
    table.add_column("result")
    for s in result.steps:
        table.add_row(s.name, "-" if s.skipped else f"{s.seconds:.0f} s", s.summary)
    total = sum(s.seconds for s in result.steps)
    table.add_row("total", f"{total / 60:.1f} min", "")
    metrics = result.metrics
    if metrics:
        short = metrics["short"]
        per = ", ".join(f"{k} {v:.1%}" for k, v in short.items() if k not in ("accuracy", "n"))
        table.add_row("shapes short answers", "", f"{short['accuracy']:.1%} ({per}; n={short['n']})")
        for name, m in metrics["pope"].items():
            table.add_row(f"POPE {name}", "", f"F1 {m['f1']:.3f}, accuracy {m['accuracy']:.1%}, "
                          f"precision {m['precision']:.3f}, recall {m['recall']:.3f}, yes {m['yes_ratio']:.1%}")
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(table)
    return console.export_text()


def rebuild(result: DemoResult, target: Path = BUNDLED, limit_mb: float = 30.0) -> Path:
    """Copy the stage-2 model (and the CLIP model under clip/) into `target`, replacing what is there."""
    work = result.work
    with atomic_dir(target) as folder:
        for item in (work / "stage2").iterdir():
            if item.is_file() and item.suffix in (".json", ".safetensors", ".jinja", ".txt", ".model") \
                    and item.name != "train_config.json":  # the run's own record, with local paths
                shutil.copy2(item, folder / item.name)
        (folder / "clip").mkdir()
        for item in (work / "clip").iterdir():
            if item.is_file():
                shutil.copy2(item, folder / "clip" / item.name)
        metrics = dict(result.metrics)
        metrics["clip_zero_shot"] = json.loads((work / "clip" / "zero_shot.json").read_text())
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        if size > limit_mb:
            raise TrainConfigError(f"the demo model is {size:.1f} MB, over the {limit_mb:.0f} MB limit for "
                                   "models/demo; shrink the recipe's models")
    return target
