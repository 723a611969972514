"""The mini recipe end to end (shrunk to seconds), and the bundled demo model it builds."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llava.core.errors import TrainConfigError
from llava.data.shapes import SHORT_ANSWER_SUFFIX
from llava.demo import BUNDLED, RECIPE, _tokenizer, load_recipe, rebuild, run_demo, summary_table

ROOT = Path(__file__).resolve().parent.parent


def _micro_recipe(path: Path) -> Path:
    recipe = load_recipe(RECIPE)
    recipe["synth"].update(train=48, val=4, test=6, single=12)
    recipe["clip"].update(vision_hidden=32, text_hidden=32, vision_layers=1, text_layers=1, projection_dim=16,
                          batch_size=16, steps=3, curriculum_steps=1, region_weight=1.0,
                          place_weight=1.0, region_place_weight=1.0)  # the three patch terms too
    recipe["lm"].update(hidden_size=32, layers=1, intermediate_size=64, batch_size=4, steps=3, block_size=64)
    recipe["tokenizer"]["vocab_size"] = 300
    recipe["datagen"]["stage2_recaptions"] = 20  # of the 240 re-captions (48 images, five each)
    for stage in ("pretrain", "midstage", "recap", "finetune"):
        recipe[stage].update(batch_size=4, max_steps=2, progress=False, save_steps=0)
    recipe["eval"] = {"split": "test", "limit": 4, "batch_size": 4}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    return run_demo(folder / "work", _micro_recipe(folder / "micro.yaml"), progress=False, log=lambda m: None)


def test_every_step_runs_and_writes_standard_formats(demo):
    from transformers import CLIPModel, LlamaForCausalLM, LlavaForConditionalGeneration

    assert [s.name for s in demo.steps] == ["synth", "clip", "lm", "datagen", "pretrain", "midstage", "recap",
                                            "finetune", "eval"]
    work = demo.work
    CLIPModel.from_pretrained(work / "clip")
    LlamaForCausalLM.from_pretrained(work / "lm")
    model = LlavaForConditionalGeneration.from_pretrained(work / "stage2")
    assert model.config.vision_config.image_size == 96 and model.config.projector_hidden_act == "gelu"
    coco = json.loads((work / "shapes" / "annotations" / "captions_train.json").read_text())["annotations"]
    captions = [r["conversations"][1]["value"] for r in json.loads((work / "data" / "captions.json").read_text())]
    assert sorted(captions) == sorted(a["caption"] for a in coco)  # stages 1 and 1.5: the synth captions
    recaptions = [r["conversations"][1]["value"]
                  for r in json.loads((work / "data" / "recaptions.json").read_text())]
    assert len(recaptions) == len(coco) and all(re.match(r"[A-Z][a-z]+ shapes?(?: on [a-z ]+)?: [a-z]+ [a-z]+ ", c)
                                                for c in recaptions), recaptions[:3]  # recap: shape first
    records = json.loads((work / "data" / "llava_instruct.json").read_text())
    ids = {r["id"] for r in records}
    assert any(i.startswith("vqa-") for i in ids) and any(not i.startswith("vqa-") for i in ids)
    metrics = demo.metrics
    assert 0 <= metrics["short"]["accuracy"] <= 1 and set(metrics["pope"]) == {"random", "popular", "adversarial"}
    table = summary_table(demo)
    for word in ("synth", "finetune", "shapes short answers", "POPE adversarial", "total"):
        assert word in table


def test_recap_place_first_replaces_that_share_of_the_recap_captions(demo):
    """`datagen: recap_place_first`: that share of the recap captions (shape first) is replaced by captions
    naming each object's place first; at 0 they are those of before, at 1 all are place first."""
    from llava.demo import _stage1_captions

    shapes = demo.work / "shapes"
    place_first = re.compile(r"[A-Z][a-z]+ shapes?(?: on [a-z ]+)?: (?:top |middle |bottom )?(?:left|right|center|top|"
                             r"bottom) [a-z]+ [a-z]+")
    before = [t for _, texts in _stage1_captions("shape_first", shapes, 0) for t in texts]
    assert before == [t for _, texts in _stage1_captions("shape_first", shapes, 0, 0.0) for t in texts]
    assert all(place_first.match(t) for _, texts in _stage1_captions("shape_first", shapes, 0, 1.0) for t in texts)
    mixed = [t for _, texts in _stage1_captions("shape_first", shapes, 0, 0.5) for t in texts]
    replaced = [new != old for new, old in zip(mixed, before)]
    assert len(mixed) == len(before) and abs(sum(replaced) / len(mixed) - 0.5) < 0.1
    assert all(place_first.match(new) for new, old in zip(mixed, before) if new != old)


def test_stage_1_5_trains_projector_and_lm_from_stage_1_then_recap_and_stage_2_start_from_it(demo):
    from safetensors.torch import load_file

    work = demo.work
    lm, clip = load_file(work / "lm" / "model.safetensors"), load_file(work / "clip" / "model.safetensors")
    stage1, mid = load_file(work / "stage1" / "model.safetensors"), load_file(work / "stage1_5" / "model.safetensors")
    recap = load_file(work / "stage1_5_recap" / "model.safetensors")
    final = load_file(work / "stage2" / "model.safetensors")
    attention = "model.layers.0.self_attn.q_proj.weight"
    tower = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(stage1["language_model." + attention], lm[attention])  # LM frozen
    assert not torch.equal(mid["language_model." + attention], lm[attention])
    assert not torch.equal(recap["language_model." + attention], mid["language_model." + attention])
    # the region-trained CLIP's tokens stay as they are, through stage 1.5 and stage 2
    assert torch.equal(mid[tower.replace("vision_model", "vision_tower")], clip[tower])
    assert torch.equal(final[tower.replace("vision_model", "vision_tower")], clip[tower])
    config = json.loads((work / "stage1_5" / "train_config.json").read_text())
    assert (config["template"], config["projector"], config["train_vision_tower"]) == \
        ("plain", str(work / "stage1"), False)
    assert config["data"] == str(work / "data" / "captions.json")
    config = json.loads((work / "stage1_5_recap" / "train_config.json").read_text())
    assert (config["model"], config["template"], config["data"]) == \
        (str(work / "stage1_5"), "plain", str(work / "data" / "recaptions.json"))
    config = json.loads((work / "stage2" / "train_config.json").read_text())
    assert (config["model"], config["vision_tower"], config["projector"]) == \
        (str(work / "stage1_5_recap"), None, None)
    # stage 2's records end with the recipe's share of the re-captions, each one of recaptions.json
    records = json.loads((work / "data" / "llava_instruct.json").read_text())
    recaptions = {r["id"]: r for r in json.loads((work / "data" / "recaptions.json").read_text())}
    mixed = [r for r in records if r["id"].startswith("recap-")]
    assert len(mixed) == 20 and records[-20:] == mixed and len({r["id"] for r in mixed}) == 20
    assert all(dict(r, id=r["id"][2:]) == recaptions[r["id"][2:]] for r in mixed)


def test_asking_for_more_re_captions_than_there_are_fails_before_the_step_counts_as_done(demo, tmp_path):
    from llava.demo import _datagen

    recipe = load_recipe(demo.work.parent / "micro.yaml")
    recipe["datagen"]["stage2_recaptions"] = 241
    with pytest.raises(TrainConfigError, match="stage2_recaptions 241 is more than the 240 re-captions"):
        _datagen(recipe, demo.work / "shapes", tmp_path, 0, progress=False)
    assert not (tmp_path / "captions.json").exists()  # the file that marks the step complete


def test_the_language_model_knows_the_answer_words(demo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.work / "lm")
    for answer in ("Yes", "No"):  # POPE's answers are in the corpus, so each is one word of the vocabulary
        assert tokenizer.tokenize(answer) == ["▁" + answer]
    # and, at the mini recipe's vocabulary size, LLaVA-1.5's short-answer prompt (8 times a record) is a
    # token a word, not 20 pieces
    tokenizer = _tokenizer(load_recipe(RECIPE), demo.work / "shapes")
    assert tokenizer.tokenize(SHORT_ANSWER_SUFFIX) == ["▁" + w for w in SHORT_ANSWER_SUFFIX[:-1].split()] + ["."]
    # with plural_stems, a count question's shape is the word objects are looked up by, the plural a suffix
    recipe = load_recipe(RECIPE)
    recipe["tokenizer"]["plural_stems"] = ["circle", "cross"]
    assert _tokenizer(recipe, demo.work / "shapes").tokenize("How many circles and crosses?") == [
        "▁How", "▁many", "▁circle", "s", "▁and", "▁cross", "es", "?"]


def test_plural_stems_split_plurals_and_leave_the_vocabulary_as_trained():
    from llava.train.lm import train_tokenizer

    corpus = ["a red circle and a blue cross", "How many circles are there? 2.", "two crosses and two squares"] * 30
    plain = train_tokenizer(corpus, 400)
    split = train_tokenizer(corpus, 400, plural_stems=("circle", "cross"))
    assert split.get_vocab() == plain.get_vocab()  # what a text without those plurals reads is unchanged
    assert plain.tokenize("circles crosses") == ["▁circles", "▁crosses"]
    assert split.tokenize("circles crosses squares circle") == ["▁circle", "s", "▁cross", "es", "▁squares",
                                                                "▁circle"]
    text = "How many circles are there? two crosses."
    assert split.decode(split(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("init_std", [0.02, 0.2])
def test_the_language_model_starts_at_the_recipes_weight_scale(tmp_path, init_std):
    from transformers import LlamaForCausalLM

    from llava.train.lm import LMConfig, pretrain_lm, train_tokenizer

    tokenizer = train_tokenizer(["a red circle on the left", "a blue square at the top"] * 20, 200)
    config = LMConfig(hidden_size=64, layers=1, heads=2, kv_heads=2, intermediate_size=128, block_size=16,
                      batch_size=2, steps=1, lr=1e-9, init_std=init_std)  # one step that moves nothing
    pretrain_lm(["a red circle on the left"] * 20, tokenizer, config, tmp_path / "lm")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "lm")
    assert model.config.initializer_range == init_std
    for weight in (model.get_input_embeddings().weight, model.model.layers[0].self_attn.q_proj.weight):
        assert weight.std().item() == pytest.approx(init_std, rel=0.1)
    with pytest.raises(TrainConfigError, match="lm.init_std must be > 0"):
        pretrain_lm(["a red circle"] * 20, tokenizer, LMConfig(init_std=0.0), tmp_path / "zero")


def test_the_language_models_heads_can_be_wider_than_hidden_size_over_heads(tmp_path):
    """`lm: head_dim` is LlamaConfig's own: each head's queries, keys and values that wide, whatever
    hidden_size / heads is; the saved model says so and runs as LlamaForCausalLM."""
    from transformers import LlamaForCausalLM

    from llava.train.lm import LMConfig, pretrain_lm, train_tokenizer

    tokenizer = train_tokenizer(["a red circle on the left", "a blue square at the top"] * 20, 200)
    config = LMConfig(hidden_size=32, layers=1, heads=4, kv_heads=4, head_dim=12, intermediate_size=64,
                      block_size=16, batch_size=2, steps=2)
    pretrain_lm(["a red circle on the left"] * 20, tokenizer, config, tmp_path / "lm")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "lm")
    attention = model.model.layers[0].self_attn
    assert model.config.head_dim == 12
    assert attention.q_proj.weight.shape == (48, 32) and attention.o_proj.weight.shape == (32, 48)
    logits = model(torch.tensor([[1, 5, 6]])).logits
    assert logits.shape == (1, 3, len(tokenizer)) and torch.isfinite(logits).all()
    with pytest.raises(TrainConfigError, match="lm.hidden_size 30 is not a multiple of lm.heads 4"):
        pretrain_lm(["a red circle"] * 20, tokenizer, LMConfig(hidden_size=30, heads=4), tmp_path / "x")
    with pytest.raises(TrainConfigError, match="lm.head_dim must be > 0"):
        pretrain_lm(["a red circle"] * 20, tokenizer, LMConfig(head_dim=-1), tmp_path / "y")


def test_a_second_run_skips_what_is_done(demo, tmp_path):
    again = run_demo(demo.work, demo.work.parent / "micro.yaml", progress=False, log=lambda m: None)
    assert all(s.skipped for s in again.steps) and again.metrics == demo.metrics


def test_rebuild_copies_the_model_and_enforces_the_size_limit(demo, tmp_path):
    target = rebuild(demo, tmp_path / "bundled")
    assert (target / "config.json").exists() and (target / "clip" / "config.json").exists()
    assert "clip_zero_shot" in json.loads((target / "metrics.json").read_text())
    with pytest.raises(TrainConfigError, match="over the 0 MB limit"):
        rebuild(demo, tmp_path / "too-big", limit_mb=0.0001)
    assert not (tmp_path / "too-big").exists()


def test_recipe_errors_name_the_field(tmp_path):
    recipe = load_recipe(RECIPE)
    recipe["lm"]["hidden"] = 3
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="section 'lm': unknown field 'hidden'"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["lm"].pop("hidden")
    recipe["lm"]["place_first"] = 1.5
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="section 'lm': place_first must be a share between 0 and 1, not 1.5"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["lm"]["place_first"] = 0.5
    recipe["lm"]["shape_first"] = 0.75
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="section 'lm': place_first \\+ shape_first must be at most 1"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["lm"].pop("shape_first")
    recipe["datagen"]["captions"] = "shapes_first"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="'datagen': captions must be one of coco, shape_first, not 'shapes_first'"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["datagen"]["captions"] = "coco"
    recipe["tokenizer"]["plural_stems"] = "circle"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="'tokenizer': plural_stems must be a list of lower-case words, not"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["tokenizer"]["plural_stems"] = ["circle"]
    recipe.pop("midstage")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="section 'recap' continues stage 1.5 from its model: add a 'midstage'"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe = load_recipe(RECIPE)
    recipe.pop("recap")
    recipe["datagen"]["stage2_recaptions"] = 10
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="stage2_recaptions draws from the recap section's re-captions: add"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["datagen"]["stage2_recaptions"] = -1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="stage2_recaptions must be a whole number >= 0, not -1"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["datagen"]["stage2_recaptions"] = 0
    recipe["datagen"]["recap_place_first"] = 0.5
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="recap_place_first is a share of the recap section's captions: add"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe = load_recipe(RECIPE)
    recipe["datagen"]["recap_place_first"] = 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="'datagen': recap_place_first must be a share between 0 and 1, not 2"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)
    recipe["datagen"]["recap_place_first"] = 0
    recipe["datagen"]["lookup_questions"] = "yes"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainConfigError, match="'datagen': lookup_questions must be true or false, not 'yes'"):
        run_demo(tmp_path / "w", tmp_path / "r.yaml", progress=False, log=lambda m: None)


needs_bundled = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="no bundled demo model")


@needs_bundled
def test_bundled_model_answers_the_readme_question():
    result = subprocess.run([sys.executable, "-m", "llava", "chat", "--image", "examples/images/shapes.png",
                             "--prompt", "What shapes can you see in the image?"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    assert answer.startswith("I can see") and "shapes" in answer, answer  # the conversation data's phrasing


@needs_bundled
def test_bundled_model_reproduces_its_published_scores(tmp_path):
    """The test split is a pure function of the recipe's seed: regenerated here, the bundled model
    scores exactly what models/demo/metrics.json (and the README) say."""
    from llava.data.shapes import synth
    from llava.eval.shapes import evaluate_shapes
    from llava.model.checkpoint import load_pretrained

    recipe = load_recipe(RECIPE)
    synth(tmp_path, {"test": recipe["synth"]["test"]}, seed=recipe["seed"], side=recipe["synth"]["image_size"])
    published = json.loads((BUNDLED / "metrics.json").read_text())
    model, processor = load_pretrained(BUNDLED)
    metrics = evaluate_shapes(model, processor, tmp_path, batch_size=64)
    assert metrics["short"] == pytest.approx(published["short"], abs=0.005)
    for name, values in metrics["pope"].items():
        assert values == pytest.approx(published["pope"][name], abs=0.005)


@needs_bundled
def test_bundled_model_finds_an_object_by_its_colour_its_shape_and_its_place(tmp_path):
    """How the bundled model picks out the object a question names (README, "demo"): at the colour word
    of "What shape is the red object?" one attention head of the LM's first layer puts nearly all of its
    attention on the image tokens onto the red object's token (99% in the bundled model, in two heads), and
    at the shape word of "What colour is the circle?" another head does much the same for the circle (95%,
    with 85% in a third head); at the place's last word of "What colour is the shape at the top left?" the
    shape's head puts most of it on the object there (61%). Stage 1.5 on the synth captions ("a red circle")
    keys a head by the colour, the word they lead with; the recap stage adds the head keyed by the shape, on
    its shape-first captions ("circle red"), and keys it by the place too, on its place-first ones ("top left
    red circle")."""
    from llava.data.images import load_image
    from llava.data.shapes import CELLS, load_scenes, position_phrase, synth
    from llava.model.checkpoint import load_pretrained

    recipe = load_recipe(RECIPE)
    synth(tmp_path, {"test": 40}, seed=recipe["seed"], side=recipe["synth"]["image_size"])
    model, processor = load_pretrained(BUNDLED)
    model.language_model.set_attn_implementation("eager")
    share = {"colour": [], "shape": [], "place": []}
    for scene in load_scenes(tmp_path, "test"):
        for obj in scene.objects:
            for key, word, question in (("colour", obj.colour, f"What shape is the {obj.colour} object?"),
                                        ("shape", obj.shape, f"What colour is the {obj.shape}?"),
                                        ("place", obj.position.split()[-1],
                                         f"What colour is the shape {position_phrase(obj.position)}?")):
                if len(scene.objects) < 2 or (key != "place" and sum(getattr(o, key) == word
                                                                     for o in scene.objects) > 1):
                    continue
                content = [{"type": "image"}, {"type": "text", "text": f"{question}\n{SHORT_ANSWER_SUFFIX}"}]
                prompt = processor.apply_chat_template([{"role": "user", "content": content}])
                inputs = processor(text=[prompt], images=[load_image(tmp_path / scene.file_name)],
                                   return_tensors="pt")
                ids = inputs["input_ids"][0]
                with torch.no_grad():
                    embeds = model.embed(inputs["input_ids"], inputs["pixel_values"])
                    first = model.language_model.model(inputs_embeds=embeds, output_attentions=True).attentions[0]
                image = (ids == processor.image_token_id).nonzero()[:, 0]
                at = (ids == processor.tokenizer.convert_tokens_to_ids("▁" + word)).nonzero()[-1, 0]
                row = first[0, :, at]  # heads x keys: the first layer's attention from the key word
                share[key].append(row[:, image[CELLS[obj.position]]] / row[:, image].sum(-1))
    colour, shape, place = (torch.stack(share[key]).mean(0) for key in ("colour", "shape", "place"))
    assert len(share["colour"]) >= 20 and len(share["shape"]) >= 20 and len(share["place"]) >= 20
    assert colour.max() > 0.9 and shape.max() > 0.9, (colour, shape)  # chance: 1/9 on each of the 9 tokens
    assert colour.argmax() != shape.argmax()  # two heads, one key each
    assert place.max() > 0.6, place  # the shape's head, keyed by the place too (61%; 27% at most before)
