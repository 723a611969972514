"""The shapes world: determinism, disjoint splits, COCO files that agree with the questions."""

import hashlib
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from llava.core.errors import DataError
from llava.data.dataset import LlavaDataset
from llava.data.shapes import (CELLS, COLOURS, NUMBERS, SHAPES, SHORT_ANSWER_SUFFIX, load_scenes, lookup_questions,
                               place_first_captions, position_phrase, scene_documents, shape_first_captions,
                               short_answer_records, synth)

# one object as the recap captions name it: "circle red at the top left" -> (shape, colour, place)
SHAPE_FIRST_ITEM = re.compile(rf"({'|'.join(SHAPES)}) ({'|'.join(COLOURS)}) (?:at|in|on) the ([a-z]+(?: left| right)?)")


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synth(root, {"train": 40, "val": 5, "test": 20}, seed=3)
    return root


def test_same_seed_same_bytes_other_seed_other_images(world, tmp_path):
    synth(tmp_path / "again", {"train": 40, "val": 5, "test": 20}, seed=3)
    assert _digest(tmp_path / "again") == _digest(world)
    synth(tmp_path / "other", {"train": 40, "val": 5, "test": 20}, seed=4)
    first = np.asarray(Image.open(world / "train" / "1000000.png"))
    other = np.asarray(Image.open(tmp_path / "other" / "train" / "1000000.png"))
    assert not np.array_equal(first, other)


def test_images_painted_over_several_processes_are_the_bytes_painted_in_one(tmp_path, monkeypatch):
    import llava.data.shapes as shapes

    monkeypatch.setattr(shapes.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    synth(tmp_path / "pool", {"train": 70}, seed=5)  # 64 or more images: a pool of two workers
    monkeypatch.setattr(shapes.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    synth(tmp_path / "one", {"train": 70}, seed=5)
    assert len(list((tmp_path / "one" / "train").glob("*.png"))) == 70
    assert _digest(tmp_path / "pool") == _digest(tmp_path / "one")


def test_splits_never_share_an_image(world):
    ids, files = {}, {}
    for split in ("train", "val", "test"):
        data = json.loads((world / "annotations" / f"captions_{split}.json").read_text())
        ids[split] = {image["id"] for image in data["images"]}
        files[split] = {image["file_name"] for image in data["images"]}
        assert all(f.startswith(f"{split}/") and (world / f).exists() for f in files[split])
    assert len(ids["train"]) == 40 and len(ids["val"]) == 5 and len(ids["test"]) == 20
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    pixels = {split: {np.asarray(Image.open(world / f)).tobytes() for f in files[split]} for split in files}
    assert not pixels["train"] & pixels["test"]


def test_coco_files_and_boxes(world):
    captions = json.loads((world / "annotations" / "captions_train.json").read_text())
    instances = json.loads((world / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in instances["categories"]] == list(SHAPES)
    per_image = {}
    for ann in captions["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    assert all(len(v) == 5 and len(set(v)) == 5 for v in per_image.values())  # five different phrasings
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        x1, y1, x2, y2 = ann["bbox_norm"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert x / 96 == pytest.approx(x1, abs=0.01) and (x + w) / 96 == pytest.approx(x2, abs=0.01)
        assert ann["colour"] in COLOURS and ann["size"] in ("small", "large")
    scenes = load_scenes(world, "train")
    counts = [len(s.objects) for s in scenes]
    assert min(counts) >= 1 and max(counts) <= 4
    for scene in scenes:  # colour+shape names one object
        names = [o.name for o in scene.objects]
        assert len(names) == len(set(names))


def test_the_object_is_drawn_inside_its_box(world):
    """The box's pixels differ from the background far more than a strip of background does."""
    for scene in load_scenes(world, "test")[:10]:
        pixels = np.asarray(Image.open(world / scene.file_name)).astype(float)
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(round(v * scene.width)) for v in obj.bbox)
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            target = np.array(COLOURS[obj.colour], dtype=float)
            assert np.abs(pixels[cy, cx] - target).max() < 40, (scene.id, obj)


def test_questions_agree_with_the_annotations(world):
    scenes = {s.file_name: s for s in load_scenes(world, "test")}
    rows = [json.loads(line) for line in (world / "questions" / "short_test.jsonl").read_text().splitlines()]
    assert {r["category"] for r in rows} == {"colour", "shape", "count", "position"}
    for row in rows:
        scene = scenes[row["image"]]
        if row["text"] in ("How many shapes are there?", "How many objects are in the image?"):
            assert row["answer"] == str(len(scene.objects))
        if row["category"] == "position":
            name = row["text"].removeprefix("Where is the ").removesuffix("?")
            assert [o.position for o in scene.objects if o.name == name] == [row["answer"]]
    for strategy in ("random", "popular", "adversarial"):
        pope = [json.loads(l) for l in (world / "questions" / f"pope_test_{strategy}.jsonl").read_text().splitlines()]
        assert {"question_id", "image", "text", "label"} <= set(pope[0])
        assert sum(r["label"] == "yes" for r in pope) == sum(r["label"] == "no" for r in pope)
        for r in pope:
            present = r["object"] in [o.name for o in scenes[r["image"]].objects]
            assert present == (r["label"] == "yes")


def test_short_answer_records_are_valid_llava_data(world, tmp_path):
    records = short_answer_records(world, "train", questions_per_record=4)
    first = records[0]["conversations"]
    assert first[0]["value"].startswith("<image>\n") and first[0]["value"].endswith(SHORT_ANSWER_SUFFIX)
    assert all("<image>" not in t["value"] for t in first[1:])
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(records))

    class _Tok:  # LlavaDataset checks records before it needs a processor
        pass
    dataset = LlavaDataset(path, processor=None, image_folder=str(world))
    assert len(dataset) == len(records)


def test_short_answer_records_ask_yes_no_questions_half_yes_half_no(world):
    records = short_answer_records(world, "train")
    answers = [t["value"] for r in records for t in r["conversations"][1::2]]
    assert answers.count("Yes") == answers.count("No") > 20  # the deduplicated POPE splits: about 2 No for 1 Yes
    questions = [(r["image"], t["value"].removeprefix("<image>\n").split("\n")[0])
                 for r in records for t in r["conversations"][0::2]]
    assert len(questions) == len(set(questions))  # no question asked twice about one image


def test_lookup_questions_find_an_object_by_one_key_and_answer_from_the_scene(world):
    """Each object is looked up by its place ("What is at the top left?", its colour or shape at that
    place), by its shape or its colour where no other object shares it, and one empty cell is asked
    about ("Nothing"); every answer is the scene's."""
    rng = random.Random(0)
    places = {position_phrase(name): name for name in CELLS}
    for scene in load_scenes(world, "train"):
        at = {o.position: o for o in scene.objects}
        asked = lookup_questions(scene, rng)
        assert len(asked) == len({q for q, _ in asked})
        keys = []
        for question, answer in asked:
            where = re.fullmatch(r"Where is the (\w+)(?: object)?\?", question)
            if where:
                word = where.group(1)
                matches = [o for o in scene.objects if word in (o.shape, o.colour)]
                assert len(matches) == 1 and answer == matches[0].position.capitalize()
                keys.append(word)
                continue
            kind, place = re.fullmatch(r"What (is|colour is the shape|shape is) (.+)\?", question).groups()
            obj = at.get(places[place])
            expected = {"is": obj.name if obj else "nothing", "colour is the shape": obj and obj.colour,
                        "shape is": obj and obj.shape}[kind]
            assert answer == expected.capitalize()
            keys.append(places[place])
        assert set(keys) >= {o.position for o in scene.objects}  # every object by its place
        assert sum(key not in at for key in keys if key in CELLS) == 1  # one empty cell
        assert {k for k in keys if k in SHAPES} == {o.shape for o in scene.objects
                                                    if sum(p.shape == o.shape for p in scene.objects) == 1}
        assert {k for k in keys if k in COLOURS} == {o.colour for o in scene.objects
                                                     if sum(p.colour == o.colour for p in scene.objects) == 1}


def test_short_answer_records_with_lookups_add_them_to_the_short_questions(world):
    def pairs(records):  # the POPE questions answered No are a random half, drawn anew
        return {(r["image"], q["value"].removeprefix("<image>\n").removesuffix("\n<image>").split("\n")[0],
                 a["value"]) for r in records for q, a in zip(r["conversations"][0::2], r["conversations"][1::2])
                if a["value"] != "No" or not q["value"].startswith(("Is there", "<image>\nIs there"))}

    plain, more = pairs(short_answer_records(world, "train")), pairs(short_answer_records(world, "train", lookups=True))
    added = more - plain
    assert plain < more and {q for _, q, _ in added} >= {"What is at the top left?", "What is in the center?"}
    assert all(q.startswith(("What is ", "What colour is the shape ", "What shape is ", "Where is the "))
               for _, q, _ in added)
    assert short_answer_records(world, "train") == short_answer_records(world, "train", lookups=False)


def test_scene_documents_describe_the_scene_then_ask_about_it(world):
    """The LM's reading exercises: each document names every object of one scene (colour, shape,
    position) before it asks; together they ask every short-answer question of the split once, and as
    many existence questions answered No as Yes."""
    documents = scene_documents(world, "train", questions_per_document=5)
    objects = re.compile(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:at|in|on) the ([a-z]+(?: left| right)?)")
    scenes = {frozenset((o.colour, o.shape, o.position) for o in s.objects) for s in load_scenes(world, "train")}
    described = set()
    for document in documents:
        description, *questions = document.split(". ")
        described.add(frozenset(objects.findall(description)))
        assert "?" not in description and 1 <= len(questions) <= 5 and all("? " in q for q in questions)
    assert described == scenes
    asked = [part.split("? ")[0] + "?" for d in documents for part in d.split(". ")[1:]]
    short = [json.loads(line)["text"] for line in (world / "questions" / "short_train.jsonl").read_text().splitlines()]
    assert sorted(q for q in asked if not q.startswith("Is there")) == sorted(short)
    text = " ".join(documents)
    assert text.count("? Yes.") == text.count("? No.") > 10


def test_scene_documents_place_first_and_suffix_shares(world):
    """`lm: place_first` / `short_answer_suffix`: at 1 every description puts each place before its object
    and every question has LLaVA-1.5's suffix before its answer; at 0.5 about half of each; at 0 the
    documents are the default ones (the same draws from the same seed)."""
    default = scene_documents(world, "train", seed=3)
    assert scene_documents(world, "train", seed=3, place_first=0.0, short_answer_suffix=0.0) == default
    place = "(?:at|in|on) the ([a-z]+(?: left| right)?)"
    after = re.compile(rf"({'|'.join(SHAPES)}) {place}")
    before = re.compile(rf"{place} an? (?:small |large )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")
    everything = scene_documents(world, "train", seed=3, place_first=1.0, short_answer_suffix=1.0)
    scenes = {frozenset((o.position, o.colour, o.shape) for o in s.objects) for s in load_scenes(world, "train")}
    assert len(everything) == len(default)
    described = set()
    for document in everything:
        description = document.split(". ")[0]
        assert not after.search(description) and description[:3] in ("At ", "In ", "On ")
        described.add(frozenset(before.findall(description.lower())))
        questions = document.count("?")
        assert document.count(f"?\n{SHORT_ANSWER_SUFFIX} ") == questions > 0
    assert described == scenes  # every object of every scene, each with its own place
    half = scene_documents(world, "train", seed=3, place_first=0.5, short_answer_suffix=0.5)
    first = sum(d[:3] in ("At ", "In ", "On ") for d in half) / len(half)
    suffixed = sum(d.count(SHORT_ANSWER_SUFFIX) for d in half) / sum(d.count("?") for d in half)
    assert 0.35 < first < 0.65 and 0.4 < suffixed < 0.6, (first, suffixed)


def test_scene_documents_shape_first_share_writes_descriptions_as_the_recap_captions(world):
    """`lm: shape_first`: that share of the descriptions names each object shape first ("circle red at the
    top left"), from what place_first leaves; at 0 the documents are unchanged."""
    base = scene_documents(world, "train", seed=3, place_first=0.5)
    assert scene_documents(world, "train", seed=3, place_first=0.5, shape_first=0.0) == base
    scenes = {frozenset((o.shape, o.colour, o.position) for o in s.objects) for s in load_scenes(world, "train")}
    every = scene_documents(world, "train", seed=3, shape_first=1.0)
    assert {frozenset(SHAPE_FIRST_ITEM.findall(d.split(". ")[0])) for d in every} == scenes
    assert not any(re.search(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})", d.split(". ")[0]) for d in every)
    mixed = scene_documents(world, "train", seed=3, place_first=0.5, shape_first=0.25)
    kinds = [("shape" if SHAPE_FIRST_ITEM.search(d.split(". ")[0])
              else "place" if d[:3] in ("At ", "In ", "On ") else "object") for d in mixed]
    shares = {k: kinds.count(k) / len(kinds) for k in ("place", "shape", "object")}
    assert 0.35 < shares["place"] < 0.65 and 0.1 < shares["shape"] < 0.4 and 0.1 < shares["object"] < 0.4, shares


PLACE_FIRST_ITEM = re.compile(rf"((?:top |middle |bottom )?(?:left|right|center|top|bottom)) ({'|'.join(COLOURS)}) "
                              rf"({'|'.join(SHAPES)})")


@pytest.mark.parametrize("write, item, order", [
    (shape_first_captions, SHAPE_FIRST_ITEM, ("shape", "colour", "position")),
    (place_first_captions, PLACE_FIRST_ITEM, ("position", "colour", "shape"))])
def test_recap_captions_name_every_object_by_the_key_they_lead_with(world, write, item, order):
    """The recap captions: the number of objects, then each object as "circle red at the top left"
    (`shape_first_captions`; also `datagen: captions: shape_first`) or as "top left red circle"
    (`place_first_captions`, `datagen: recap_place_first`), in a fresh order each time (which object
    comes first varies)."""
    rng = random.Random(0)
    firsts = set()
    for scene in load_scenes(world, "train"):
        objects = sorted(tuple(getattr(o, key) for key in order) for o in scene.objects)
        texts = write(scene, rng, 5)
        assert len(texts) == 5
        for text in texts:
            head, listing = text.split(": ")
            assert head.split()[0] == NUMBERS[len(objects)].capitalize() and listing.endswith(".")
            assert sorted(item.findall(listing)) == objects, text
            firsts.add((scene.id, item.findall(listing)[0]))
    assert len(firsts) > len(load_scenes(world, "train"))  # some scene was listed from different objects


def test_single_split_has_one_object_per_scene_and_its_own_ids(world, tmp_path):
    synth(tmp_path, {"test": 20, "single": 30}, seed=3)
    single = load_scenes(tmp_path, "single")
    assert len(single) == 30 and all(len(s.objects) == 1 for s in single)
    assert {s.file_name.split("/")[0] for s in single} == {"single"}
    assert not {s.id for s in single} & {s.id for s in load_scenes(tmp_path, "test")}
    assert len({o.shape for s in single for o in s.objects}) == len(SHAPES)


def test_count_questions_use_english_plurals(world):
    questions = [json.loads(line)["text"] for line in (world / "questions" / "short_train.jsonl").open()]
    counted = {q for q in questions if q.startswith("How many ") and q.split()[2] != "shapes"}
    assert counted and not any("crosss" in q for q in counted)
    assert any(q == "How many crosses are there?" for q in counted)


def test_bad_split_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        synth(tmp_path, {"dev": 3})


def test_synth_and_eval_commands(tmp_path, checkpoints, capsys):
    from llava.cli import main

    assert main(["synth", "--output", str(tmp_path), "--train", "0", "--val", "0", "--test", "3", "--seed", "2"]) == 0
    assert len(list((tmp_path / "test").glob("*.png"))) == 3
    assert main(["eval", "--benchmark", "shapes", "--model", str(checkpoints("llava")), "--data", str(tmp_path),
                 "--limit", "4", "--batch-size", "3", "--output", str(tmp_path / "eval"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["short"]["n"] == 4 and set(metrics["pope"]) == {"random", "popular", "adversarial"}
    assert metrics["pope"]["random"]["n"] == 4
    predictions = [json.loads(l) for l in (tmp_path / "eval" / "short.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all("prediction" in p for p in predictions)
    assert main(["eval", "--benchmark", "vqav9", "--model", str(checkpoints("llava")), "--data", str(tmp_path)]) == 1
    assert "unknown benchmark 'vqav9'" in capsys.readouterr().err


def test_pope_and_answer_scoring():
    from llava.eval.pope import answer_to_label, pope_metrics
    from llava.eval.shapes import normalize

    assert answer_to_label("Yes, there is a red circle.") == "yes"
    assert answer_to_label("No") == "no" and answer_to_label("There is not a circle.") == "no"
    assert answer_to_label("Yes. No idea why.") == "yes"  # only the first sentence counts
    m = pope_metrics(["Yes", "No", "yes", "no"], ["yes", "yes", "no", "no"])
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "n": 4}
    assert normalize("Three.") == "3" and normalize("The top left") == "top left"
