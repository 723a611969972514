"""Training: what each stage freezes, that loss falls, exact resume after SIGKILL, 2-process DDP,
LoRA/QLoRA merge, and trained checkpoints that transformers loads with equal logits."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import llava
from llava.cli import main
from llava.core.errors import TrainConfigError
from llava.train.build import load_start_model, param_groups
from llava.train.config import TrainConfig, load_config
from llava.train.loop import _prepare_model, train
from llava.train.lora import merge_adapter
from llava.testing import build_tiny_parts, write_colour_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("colours"), images=24, text_only=6)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_tiny_parts(tmp_path_factory.mktemp("parts"))


def _config(**kwargs) -> TrainConfig:
    defaults = dict(batch_size=4, grad_accum=2, epochs=2, lr=1e-3, progress=False, seed=0)
    return TrainConfig(**{**defaults, **kwargs})


def _trainable(config) -> set[str]:
    model, _ = load_start_model(config)
    model = _prepare_model(model, config)
    return {n for n, p in model.named_parameters() if p.requires_grad}, model


def _assert_equal_to_transformers(folder, image, text="USER: <image>\nWhat colour is it? ASSISTANT: It is"):
    ours, _ = llava.load_pretrained(folder, device="cpu", dtype="float32")
    kind = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    hf_class = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    theirs = hf_class.from_pretrained(folder).eval()
    inputs = AutoProcessor.from_pretrained(folder)(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, rtol=0, atol=1e-4)


# -- what trains -----------------------------------------------------------------------------------------
def test_stage1_trains_exactly_the_projector(parts, colours):
    vision, lm = parts
    names, model = _trainable(_config(vision_tower=str(vision), language_model=str(lm), stage="pretrain"))
    projector = {n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.")}
    assert names == projector and len(projector) == 4  # mlp2x_gelu: two weights, two biases


def test_stage2_trains_projector_and_llm_and_optionally_the_vision_tower(checkpoints):
    folder = str(checkpoints("llava_crop"))
    names, model = _trainable(_config(model=folder))
    all_names = {n for n, _ in model.named_parameters()}
    assert names == {n for n in all_names if not n.startswith("vision_tower.")}
    config = _config(model=folder, train_vision_tower=True, vision_lr=1e-5, projector_lr=5e-4)
    names, model = _trainable(config)
    assert names == all_names
    rates = {g["name"]: g["lr"] for g in param_groups(model, config)}
    assert rates["vision"] == 1e-5 and rates["projector"] == 5e-4 and rates["language"] == 1e-3
    assert rates["language_no_decay"] == 1e-3
    # a rate of 0.0 is a rate (the original's mm_projector_lr is used whenever it is not None), not "unset"
    config = _config(model=folder, projector_lr=0.0)
    rates = {g["name"]: g["lr"] for g in param_groups(_trainable(config)[1], config)}
    assert rates["projector"] == 0.0 and rates["language"] == 1e-3
    # the original's freeze_mm_mlp_adapter: the language model alone
    names, model = _trainable(_config(model=folder, train_projector=False))
    assert names == {n for n in all_names if not n.startswith(("vision_tower.", "multi_modal_projector."))}
    assert {g["name"] for g in param_groups(model, _config(model=folder))} == {"language", "language_no_decay"}


def test_lora_trains_adapters_on_the_llm_and_the_full_projector(checkpoints):
    names, _ = _trainable(_config(model=str(checkpoints("llava_crop")), lora=True, lora_r=4, lora_alpha=8))
    lora = {n for n in names if "lora_" in n}
    assert lora and all(".language_model." in n and "lm_head" not in n for n in lora)
    assert names - lora == {n for n in names if ".multi_modal_projector." in n} and names - lora


# -- the loop --------------------------------------------------------------------------------------------
def test_loss_falls_and_logs_metrics_and_plot(tmp_path, checkpoints, colours):
    result = train(_config(model=str(checkpoints("llava_crop")), data=str(colours), output=str(tmp_path / "run"),
                           epochs=4, logging_steps=2))
    losses = [m["loss"] for m in result.metrics]
    assert len(losses) == 8 and result.state.step == 16  # 8 batches per epoch, 4 epochs, 2 per step; logged every 2
    assert losses[-1] < losses[0] - 1.0
    record = result.metrics[-1]
    assert record["tokens_per_s"] > 0 and record["lr"] == 0.0 and record["step"] == 16
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["data"] == str(colours)


def test_token_mean_loss_makes_micro_batches_train_as_one_batch(tmp_path, checkpoints, colours):
    """With token_mean_loss, two micro-batches of 4 step as one batch of the same 8 samples does (as
    transformers' Trainer since num_items_in_batch); without, each micro-batch's mean counts alike however
    many answer tokens it has (the original LLaVA's arithmetic), and the weights come out different."""
    def trained(name, **kwargs):  # the colour answers are 4 tokens, the text-only ones 10: steps mix both
        config = _config(model=str(checkpoints("llava_crop")), data=str(colours), output=str(tmp_path / name),
                         max_steps=3, group_by_modality_length=False, **kwargs)
        return {n: p.detach().clone() for n, p in train(config).model.named_parameters()}

    one_batch = trained("one", batch_size=8, grad_accum=1)
    token_mean = trained("token_mean", batch_size=4, grad_accum=2, token_mean_loss=True)
    batch_means = trained("batch_means", batch_size=4, grad_accum=2)
    assert all(torch.allclose(one_batch[n], token_mean[n], rtol=0, atol=2e-6) for n in one_batch)
    assert max((one_batch[n] - batch_means[n]).abs().max() for n in one_batch) > 1e-4


def test_pretrain_from_parts_keeps_llm_and_vision_and_loads_in_transformers(tmp_path, parts, colours):
    vision, lm = parts
    out = tmp_path / "stage1"
    result = train(_config(vision_tower=str(vision), language_model=str(lm), data=str(colours), output=str(out),
                           stage="pretrain", epochs=1, skip_bad=True))
    assert result.skipped == 6  # the two-round text-only records do not fit the plain (one round) format
    trained = load_file(str(out / "model.safetensors"))
    lm_weights = load_file(str(lm / "model.safetensors"))
    for key, value in lm_weights.items():
        ours = trained["language_model." + key]
        if key == "model.embed_tokens.weight" or key == "lm_head.weight":  # grew by <image> (to a multiple of 64)
            ours = ours[: value.shape[0]]
        assert torch.equal(ours, value), key
    vision_weights = load_file(str(vision / "model.safetensors"))
    assert all(torch.equal(trained["vision_tower." + k.removeprefix("vision_model.")], v)
               for k, v in vision_weights.items())
    assert json.loads((out / "config.json").read_text())["conv_mode"] == "plain"
    _assert_equal_to_transformers(out, Image.open(colours.parent / "images" / "0.png"))
    # stage 2 from the stage-1 projector, on the parts, equals stage 2 from the stage-1 checkpoint
    a = train(_config(vision_tower=str(vision), language_model=str(lm), projector=str(out), data=str(colours),
                      output=str(tmp_path / "a"), epochs=1, template="vicuna_v1"))
    b = train(_config(model=str(out), data=str(colours), output=str(tmp_path / "b"), epochs=1))
    assert [m["loss"] for m in a.metrics] == pytest.approx([m["loss"] for m in b.metrics], abs=1e-5)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["conv_mode"] == "vicuna_v1"


def test_anyres_finetune_loads_in_transformers(tmp_path, checkpoints, colours):
    out = tmp_path / "next"
    result = train(_config(model=str(checkpoints("llava_next")), data=str(colours), output=str(out), epochs=1,
                           template="vicuna_v1"))
    assert all(m["loss"] == m["loss"] for m in result.metrics)  # finite
    _assert_equal_to_transformers(out, Image.new("RGB", (70, 30), "red"))


_RUN = textwrap.dedent("""
    import os, signal, sys
    from safetensors.torch import save_file
    from llava.train.config import TrainConfig
    from llava.train.loop import train
    model, data, out, kill_at, lora = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    config = TrainConfig(model=model, data=data, output=out, batch_size=2, grad_accum=2, epochs=2, lr=1e-3,
                         save_steps=3, lora=lora, lora_r=4, lora_alpha=8, resume="latest", progress=False)
    def hook(state, record):
        if state.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    result = train(config, on_step=hook)
    rank = os.environ.get("RANK", "0")
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
""")


def _run(args, launcher=(sys.executable,)):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-c", _RUN, *map(str, args)] if launcher == (sys.executable,)
                          else [*launcher, *map(str, args)], capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.parametrize("lora", [False, True])
def test_sigkill_and_resume_gives_bit_identical_weights(tmp_path, checkpoints, colours, lora):
    model = checkpoints("llava_crop")
    flag = "1" if lora else "0"
    whole = _run([model, colours, tmp_path / "whole", 0, flag])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run([model, colours, tmp_path / "killed", 7, flag])
    assert killed.returncode == -9  # SIGKILL at step 7, after the checkpoint of step 6
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = _run([model, colours, tmp_path / "killed", 0, flag])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole_log = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")} for line in whole_log]
    assert strip == [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
                     for line in resumed_log]


def test_resume_ignores_a_half_written_checkpoint(tmp_path, checkpoints, colours):
    out = tmp_path / "run"
    config = dict(model=str(checkpoints("llava_crop")), data=str(colours), output=str(out), save_steps=2, epochs=1)
    train(_config(**config, max_steps=2))
    (out / ".checkpoint-4.tmp").mkdir()
    (out / ".checkpoint-4.tmp" / "trainable.safetensors").write_bytes(b"half")
    result = train(_config(**config, max_steps=4, resume="latest", save_total_limit=1))
    assert result.state.step == 4 and [m["step"] for m in result.metrics] == [1, 2, 3, 4]


def test_two_process_ddp_ends_with_equal_weights(tmp_path, checkpoints, colours):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517")
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    result = _run([script, checkpoints("llava_crop"), colours, tmp_path / "ddp", 0, "0"], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "ddp" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (tmp_path / "ddp" / "checkpoint-6").glob("rng_state_*")} == {"rng_state_0.pt",
                                                                                         "rng_state_1.pt"}
    # 30 samples, 2 per process per batch, 2 processes: 8 batches per epoch, 2 epochs, 2 per step
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 8


def test_lora_output_is_the_merged_adapter(tmp_path, checkpoints, colours):
    base_folder = checkpoints("llava_crop")
    out = tmp_path / "lora"
    train(_config(model=str(base_folder), data=str(colours), output=str(out), lora=True, lora_r=4, lora_alpha=8,
                  lr=3e-3))
    merged, _ = llava.load_pretrained(out, device="cpu", dtype="float32")
    base, _ = llava.load_pretrained(base_folder, device="cpu", dtype="float32")
    again = merge_adapter(base, out / "adapter").eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, again(input_ids=ids).logits, rtol=0, atol=1e-5)
    fresh, _ = llava.load_pretrained(base_folder, device="cpu", dtype="float32")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any(k.startswith("language_model.model.layers") for k in changed)
    assert all(k.startswith(("language_model.model.layers", "multi_modal_projector")) for k in changed)
    _assert_equal_to_transformers(out, Image.new("RGB", (30, 30), "blue"))


def test_qlora_trains_a_4bit_base_and_merges_into_full_precision(tmp_path, checkpoints, colours):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    result = train(_config(model=str(checkpoints("llava_crop")), data=str(colours), output=str(out), qlora=True,
                           lora_r=8, lora_alpha=16, lr=3e-3, epochs=3))
    losses = [m["loss"] for m in result.metrics]
    assert losses[-1] < losses[0] - 0.5
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # no 4-bit leftovers in the output
    _assert_equal_to_transformers(out, Image.new("RGB", (30, 30), "green"))


# -- the command -----------------------------------------------------------------------------------------
def test_llava_train_with_a_recipe_and_overrides(tmp_path, checkpoints, colours, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--config", str(ROOT / "recipes" / "tiny.yaml"), "--model", str(checkpoints("llava_crop")),
                 "--data", str(colours), "--output", str(out), "--max-steps", "3", "--no-progress", "--lr", "2e-3"])
    assert code == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 2e-3 and saved["max_steps"] == 3
    assert "3 steps" in capsys.readouterr().err
    llava.load_pretrained(out, device="cpu")


def test_a_list_of_feature_layers_from_the_command_line(tmp_path, parts, colours):
    vision, lm = parts
    out = tmp_path / "layers"
    code = main(["train", "--vision-tower", str(vision), "--language-model", str(lm), "--data", str(colours),
                 "--output", str(out), "--stage", "pretrain", "--skip-bad", "--max-steps", "2", "--no-progress",
                 "--vision-feature-layer", "-3", "-1"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["vision_feature_layer"] == [-3, -1]
    hidden = json.loads((vision / "config.json").read_text())["hidden_size"]
    assert load_file(str(out / "model.safetensors"))["multi_modal_projector.linear_1.weight"].shape[1] == 2 * hidden
    _assert_equal_to_transformers(out, Image.open(colours.parent / "images" / "0.png"))
    assert load_config(None, {"vision_feature_layer": ["-2"]}).vision_feature_layer == [-2]
    with pytest.raises(TrainConfigError, match=r"vision_feature_layer: expected a list of integers, got 'last'"):
        load_config(None, {"vision_feature_layer": [-2, "last"]})


@pytest.mark.parametrize("recipe,args,message", [
    ("stage: middle\n", [], "stage 'middle' is not one of pretrain, finetune"),
    ("learning_rate: 1\n", [], "unknown setting(s) learning_rate"),
    ("batch_size: many\n", [], "setting batch_size: expected int, got 'many'"),
    ("", ["--stage", "pretrain", "--lora"], "LoRA/QLoRA is for stage finetune"),
    ("", ["--stage", "pretrain", "--no-train-projector"], "with train_projector false nothing would train"),
    ("projector_lr: -1.0e-3\n", [], "projector_lr must not be negative, got -0.001"),
    ("", [], "no model"),
    ("[1, 2]\n", [], "a recipe is a mapping"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, capsys, recipe, args, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    assert main(["train", "--config", str(path), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("llava train: error:") and err.count("\n") == 1


def test_recipes_parse(tmp_path):
    from llava.demo import _train_config, load_recipe

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        if recipe.name == "mini.yaml":  # the demo's multi-step recipe: its stage sections are TrainConfigs
            mini = load_recipe(recipe)
            assert [_train_config(mini, stage, tmp_path).stage for stage in ("pretrain", "midstage", "finetune")] \
                == ["pretrain", "finetune", "finetune"]
            continue
        config = load_config(recipe, {"output": str(tmp_path)})
        assert config.stage in ("pretrain", "finetune"), recipe
