"""Training data: records checked with file/index/reason, labels only on answers, the plain stage-1
format, the collator, and the original's modality/length-grouped sampler."""

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from llava import load_pretrained
from llava.core.constants import IGNORE_INDEX
from llava.core.errors import DataError
from llava.data.dataset import DataCollator, LlavaDataset
from llava.data.sampler import (LengthGroupedSampler, get_length_grouped_indices,
                                get_modality_length_grouped_indices, rank_batches, split_to_even_chunks)
from llava.testing import write_colour_dataset


@pytest.fixture(scope="module")
def processor(checkpoints):
    return load_pretrained(checkpoints("llava_crop"), device="cpu", dtype="float32")[1]


@pytest.fixture(scope="module")
def next_processor(checkpoints):
    return load_pretrained(checkpoints("llava_next"), device="cpu", dtype="float32")[1]


def _labelled_spans(processor, item) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [processor.tokenizer.decode(run) for run in runs]


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_labels_are_exactly_the_answers(tmp_path, processor):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.png")
    data = _write(tmp_path / "d.json", [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}])
    dataset = LlavaDataset(data, processor, template="vicuna_v1")
    item = dataset[0]
    assert _labelled_spans(processor, item) == ["A red square.</s>", "Yes.</s>"]
    # the prompt the model sees: vicuna_v1 with the image moved to the front of its turn (the original's rule)
    text = processor.tokenizer.decode(item["input_ids"])
    n = processor.num_image_tokens((20, 30))
    assert text.startswith("<s> A chat between a curious user")
    assert "USER: " + "<image>" * n + "\nWhat is it? ASSISTANT: A red square.</s>USER: Sure? ASSISTANT: Yes.</s>" in text
    assert item["pixel_values"].shape == (1, 3, 28, 28)


def test_plain_template_trains_the_caption_only(tmp_path, processor):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.png")
    data = _write(tmp_path / "d.json", [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "a red square"}]}])
    item = LlavaDataset(data, processor, template="plain")[0]
    n = processor.num_image_tokens((20, 30))
    # the original's preprocess_plain: <image> + caption + "\n", the human text dropped, BOS and image masked
    expected = processor.tokenizer("<image>" * n + "a red square\n")["input_ids"]
    assert item["input_ids"].tolist() == expected
    assert (item["labels"][: n + 1] == IGNORE_INDEX).all()
    assert (item["labels"][n + 1:] == item["input_ids"][n + 1:]).all()


def test_json_and_jsonl_read_the_same_samples(tmp_path, processor):
    a = write_colour_dataset(tmp_path / "a", images=6, text_only=3)
    b = write_colour_dataset(tmp_path / "b", images=6, text_only=3, jsonl=True)
    ja, jb = LlavaDataset(a, processor), LlavaDataset(b, processor)
    assert len(ja) == len(jb) == 9
    for i in range(9):
        x, y = ja[i], jb[i]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert sum(1 for length in ja.modality_lengths if length < 0) == 3  # text-only samples are negative
    assert ja[[i for i, v in enumerate(ja.modality_lengths) if v < 0][0]]["pixel_values"] is None


BAD = [
    ({"conversations": []}, "'conversations' is missing"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no 'gpt' turn"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "'from' is 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}, "needs a string 'value'"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "1 image(s) but 0 <image> token(s)"),
    ({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "missing.png does not exist"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                        {"from": "gpt", "value": "x"}]}, "must alternate"),
    ([1, 2], "a record is a JSON object"),
]


@pytest.mark.parametrize("record,reason", BAD)
def test_a_bad_record_names_file_index_and_reason(tmp_path, processor, record, reason):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"id": "g", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    data = _write(tmp_path / "d.json", [good, record, good])
    with pytest.raises(DataError) as e:
        LlavaDataset(data, processor)
    assert str(e.value).startswith(f"{data}: record 1: ") and reason in str(e.value)
    assert "\n" not in str(e.value)
    skipping = LlavaDataset(data, processor, skip_bad=True)
    assert len(skipping) == 2 and sum(skipping.skipped.values()) == 1


def test_bad_jsonl_line_and_corrupt_image(tmp_path, processor):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({**good, "image": "ok.png"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl: record 1: not valid JSON"):
        LlavaDataset(data, processor)
    assert len(LlavaDataset(data, processor, skip_bad=True)) == 1
    # a corrupt image shows only when the record is loaded: an error naming it, or skipped and counted
    data.write_text(json.dumps({**good, "image": "ok.png"}) + "\n" + json.dumps({**good, "image": "broken.png", "id": 7}))
    with pytest.raises(DataError, match=r"d.jsonl: record 1 \(id 7\): .*broken.png"):
        LlavaDataset(data, processor)[1]
    skipping = LlavaDataset(data, processor, skip_bad=True)
    assert skipping[1] is None and skipping.skipped["ImageError"] == 1


def test_too_long_sample_with_images_cut_is_refused(tmp_path, processor):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = _write(tmp_path / "d.json", [{"image": "a.png", "conversations": [
        {"from": "human", "value": "word " * 40 + "<image>"}, {"from": "gpt", "value": "x"}]}])
    with pytest.raises(DataError, match="over model_max_length 30"):
        LlavaDataset(data, processor, model_max_length=30)[0]


def test_collator_pads_right_truncates_and_concatenates_images(tmp_path, processor):
    data = write_colour_dataset(tmp_path, images=4, text_only=2)
    dataset = LlavaDataset(data, processor)
    items = [dataset[i] for i in range(len(dataset))]
    longest = max(len(x["input_ids"]) for x in items)
    batch = DataCollator(processor.tokenizer.pad_token_id, 1000, processor.image_token_id)(items + [None])
    assert batch["input_ids"].shape == (6, longest)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and batch["attention_mask"][row].sum() == n
    assert batch["pixel_values"].shape == (4, 3, 28, 28)
    short = DataCollator(processor.tokenizer.pad_token_id, longest - 3)(items)
    assert short["input_ids"].shape[1] == longest - 3
    assert DataCollator(0, 10)([None, None]) is None


def test_anyres_items_carry_tiles_and_sizes(tmp_path, next_processor):
    Image.new("RGB", (70, 30), "red").save(tmp_path / "a.png")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "b.png")
    data = _write(tmp_path / "d.json", [
        {"image": f, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "x"}]}
        for f in ("a.png", "b.png")])
    dataset = LlavaDataset(data, next_processor)
    a, b = dataset[0], dataset[1]
    assert a["image_sizes"].tolist() == [[30, 70]] and b["image_sizes"].tolist() == [[20, 20]]
    assert int((a["input_ids"] == next_processor.image_token_id).sum()) == next_processor.num_image_tokens((30, 70))
    batch = DataCollator(0, 4096)([a, b])
    assert batch["pixel_values"].shape[0] == a["pixel_values"].shape[0] + b["pixel_values"].shape[0]
    assert batch["image_sizes"].tolist() == [[30, 70], [20, 20]]


# -- the sampler -----------------------------------------------------------------------------------------
def test_modality_grouping_keeps_megabatches_single_modality():
    lengths = [((i * 37) % 50) + 1 for i in range(90)] + [-(((i * 11) % 30) + 1) for i in range(45)]
    batch, world = 4, 2
    order = LengthGroupedSampler(batch, world, lengths, seed=3, group_by_modality=True).order(0)
    assert sorted(order) == list(range(len(lengths)))
    mega = batch * world
    for start in range(0, len(order) - mega, mega):  # all but the last (the leftovers of both)
        signs = {lengths[i] > 0 for i in order[start: start + mega]}
        assert len(signs) == 1
    # within a megabatch, each process's chunk is sorted longest first
    chunk = order[:batch]
    assert [abs(lengths[i]) for i in chunk] == sorted((abs(lengths[i]) for i in chunk), reverse=True)


def test_sampler_order_depends_only_on_seed_and_epoch():
    lengths = [i % 7 + 1 for i in range(40)] + [-(i % 5 + 1) for i in range(20)]
    a = LengthGroupedSampler(4, 1, lengths, seed=1, group_by_modality=True)
    torch.manual_seed(123)
    first = a.order(0)
    torch.manual_seed(999)  # the global generator's state does not matter, and is left as it was
    state = torch.get_rng_state()
    assert a.order(0) == first and torch.equal(torch.get_rng_state(), state)
    assert a.order(1) != first
    assert LengthGroupedSampler(4, 1, lengths, seed=2, group_by_modality=True).order(0) != first


def test_original_functions_behave_as_the_original():
    # split_to_even_chunks balances total length and keeps chunk sizes equal
    chunks = split_to_even_chunks([0, 1, 2, 3], [10, 9, 2, 1], 2)
    assert chunks == [[0, 3], [1, 2]]
    generator = torch.Generator().manual_seed(0)
    order = get_length_grouped_indices([5, 1, 4, 2, 3, 6], 3, 1, generator=generator)
    assert sorted(order) == list(range(6))
    assert [5, 1, 4, 2, 3, 6][order[0]] >= [5, 1, 4, 2, 3, 6][order[2]]  # a megabatch is sorted longest first
    with pytest.raises(ValueError):
        get_modality_length_grouped_indices([1, 0, -1], 2, 1)


def test_rank_batches_split_every_megabatch_and_fill_the_last():
    order = list(range(10))
    r0, r1 = rank_batches(order, 2, 2, 0), rank_batches(order, 2, 2, 1)
    assert r0 == [[0, 1], [4, 5], [8, 9]] and r1 == [[2, 3], [6, 7], [0, 1]]
    assert rank_batches(order, 4, 1, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert Counter(i for b in r0 + r1 for i in b) == Counter(order + [0, 1])


def test_constructed_as_the_original_it_yields_the_original_order():
    lengths = [i % 9 + 1 for i in range(50)] + [-(i % 4 + 1) for i in range(30)]
    torch.manual_seed(5)
    expected = get_modality_length_grouped_indices(lengths, 4, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    sampler = LengthGroupedSampler(4, 2, lengths=lengths, generator=torch.Generator().manual_seed(1),
                                   group_by_modality=True)
    assert list(sampler) == expected and len(sampler) == 80


def test_group_size_deals_one_steps_samples_into_similar_length_batches():
    lengths = [(i * 7919) % 200 + 1 for i in range(64)]
    plain = LengthGroupedSampler(4, 1, lengths, seed=0).order(0)
    grouped = LengthGroupedSampler(4, 1, lengths, seed=0, group_size=4).order(0)
    assert sorted(grouped) == list(range(64))

    def padding(order):
        batches = rank_batches(order, 4, 1, 0)
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 2
    # every window of 4 batches (one optimizer step with grad_accum 4) holds 16 samples, longest first
    first_step = grouped[:16]
    assert [lengths[i] for i in first_step] == sorted((lengths[i] for i in first_step), reverse=True)


def test_group_by_length_sorts_fifty_steps_together_as_transformers():
    from llava.train.config import TrainConfig
    from llava.train.loop import _length_group_steps

    grouped = TrainConfig(batch_size=8, group_by_length=True)
    assert _length_group_steps(grouped, 20_000, 1) == 50            # transformers' cap
    assert _length_group_steps(grouped, 200, 1) == 6                # 200 // (4 * 8)
    assert _length_group_steps(grouped, 20, 1) == 1
    assert _length_group_steps(TrainConfig(batch_size=8, grad_accum=2, group_by_length=True), 20_000, 2) == 50
    assert _length_group_steps(TrainConfig(batch_size=8), 20_000, 1) == 1  # LLaVA's grouping: one step

    lengths = [(i * 7919) % 300 + 20 for i in range(2_000)]  # image samples of mixed lengths
    llava = LengthGroupedSampler(8, 1, lengths, seed=0, group_by_modality=True).order(0)
    steps = _length_group_steps(grouped, len(lengths), 1)
    sorted_ = LengthGroupedSampler(8, 1, lengths, seed=0, group_by_modality=True, group_size=steps).order(0)
    assert sorted(sorted_) == list(range(len(lengths)))

    def padded(order):
        return sum(max(lengths[i] for i in b) * len(b) for b in rank_batches(order, 8, 1, 0))

    assert padded(llava) > 1.4 * sum(lengths)          # one step's samples sorted: a third is padding
    assert padded(sorted_) < 1.05 * sum(lengths)       # fifty steps' samples sorted: almost none
