"""LLaVA's training data: JSON / JSONL records checked up front and turned into input_ids, labels and
pixel values lazily (one record at a time), and the collator that truncates and pads a batch.

A record is the original LLaVA format:
    {"id": "...", "image": "coco/1.jpg" | ["a.jpg", "b.jpg"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
Image paths are relative to `image_folder` (by default the data file's folder). A record without
"image" is text-only; text-only and image records mix freely in one file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from ..core.errors import DataError, LlavaError
from .images import load_image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLAIN = "plain"
# The original's estimate of an image's share of a sample, used only to group samples by length.
IMAGE_LENGTH_ESTIMATE = 128


@dataclass
class _Entry:
    file: int            # index into LlavaDataset.files
    index: int           # record number within that file (0-based, as reported in errors)
    offset: int          # byte offset of the line (JSONL) or -1 (JSON: the record is kept in memory)
    words: int           # whitespace-separated words over all turns
    images: int          # number of images


@dataclass
class LlavaDataset(torch.utils.data.Dataset):
    """Records from one or more LLaVA JSON / JSONL files, rendered with `template` for training.

    Every record is checked when the dataset is built (fields, roles, image tokens vs images, image
    files exist); a bad one raises DataError naming file, index and reason, or with skip_bad=True is
    skipped and counted in `skipped`. Images are decoded and text tokenized only in __getitem__.
    """

    data: str | Path | list
    processor: object
    image_folder: str | Path | None = None
    template: str = "llava_v1"
    model_max_length: int = 2048
    skip_bad: bool = False
    check_image_files: bool = True
    skipped: Counter = field(default_factory=Counter, init=False)
    problems: list[str] = field(default_factory=list, init=False)

    def __post_init__(self):
        paths = [self.data] if isinstance(self.data, (str, Path)) else list(self.data)
        if not paths:
            raise DataError("no data files given")
        self.files = [Path(p) for p in paths]
        self._in_memory: dict[int, list] = {}
        self.entries: list[_Entry] = []
        for file_number, path in enumerate(self.files):
            self._index_file(file_number, path)
        if not self.entries:
            raise DataError(f"{', '.join(map(str, self.files))}: no usable records"
                            + (f" ({sum(self.skipped.values())} skipped)" if self.skipped else ""))

    # -- reading and checking -------------------------------------------------------------------------
    def _index_file(self, file_number: int, path: Path) -> None:
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                index, offset = 0, 0
                for line in f:
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            self._bad(path, index, f"not valid JSON ({e.msg} at column {e.colno})")
                        else:
                            self._add(file_number, path, index, offset, record)
                        index += 1
                    offset += len(line)
            return
        try:
            records = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a LLaVA JSON data file holds a list of records, got {type(records).__name__}")
        self._in_memory[file_number] = records
        for index, record in enumerate(records):
            self._add(file_number, path, index, -1, record)

    def _add(self, file_number: int, path: Path, index: int, offset: int, record) -> None:
        try:
            images, turns = self._check(record, path)
        except DataError as e:
            self._bad(path, index, str(e))
            return
        words = sum(len(turn["value"].split()) for turn in turns)
        self.entries.append(_Entry(file_number, index, offset, max(words, 1), len(images)))

    def _bad(self, path: Path, index: int, reason: str) -> None:
        message = f"{path}: record {index}: {reason}"
        if not self.skip_bad:
            raise DataError(message)
        kind = re.sub(r"\d+", "N", re.sub(r"\S*/\S*", "FILE", reason.split(" (")[0]))
        self._skip(kind, message)  # counted by kind of problem, not by file

    def _skip(self, kind: str, message: str) -> None:
        self.skipped[kind] += 1
        if len(self.problems) < 20:
            self.problems.append(message)

    def _check(self, record, path: Path) -> tuple[list[Path], list[dict]]:
        """(image paths, turns) of a well-formed record, else DataError with the reason."""
        if not isinstance(record, dict):
            raise DataError(f"a record is a JSON object, got {type(record).__name__}")
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise DataError("'conversations' is missing or not a non-empty list")
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise DataError(f"conversations[{number}] needs a string 'value'")
            if turn.get("from") not in ROLES:
                raise DataError(f"conversations[{number}]: 'from' is {turn.get('from')!r}, not 'human' or 'gpt'")
        turns = _drop_leading(turns)
        roles = [ROLES[t["from"]] for t in turns]
        if not roles or "assistant" not in roles:
            raise DataError("no 'gpt' turn to train on")
        body = roles[1:] if roles[0] == "system" else roles
        if body != (["user", "assistant"] * len(body))[:len(body)]:
            raise DataError("turns must alternate human/gpt starting with human")
        if self.template == PLAIN and len(roles) != 2:
            raise DataError(f"the plain (pretrain) template takes one human and one gpt turn, got {len(roles)} turns")
        images = _images_of(record)
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise DataError("'image' must be a path or a list of paths")
        tokens = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in turns if ROLES[t["from"]] == "user")
        if any(DEFAULT_IMAGE_TOKEN in t["value"] for t in turns if ROLES[t["from"]] != "user"):
            raise DataError(f"only human turns may hold {DEFAULT_IMAGE_TOKEN}")
        if tokens != len(images):
            raise DataError(f"{len(images)} image(s) but {tokens} {DEFAULT_IMAGE_TOKEN} token(s) in the human turns")
        paths = [self._image_path(p, path) for p in images]
        if self.check_image_files:
            for p in paths:
                if not p.is_file():
                    raise DataError(f"image file {p} does not exist")
        return paths, turns

    def _image_path(self, name: str, data_path: Path) -> Path:
        folder = Path(self.image_folder) if self.image_folder is not None else data_path.parent
        return folder / name

    def record(self, i: int) -> dict:
        """The raw record behind sample i."""
        entry = self.entries[i]
        if entry.offset < 0:
            return self._in_memory[entry.file][entry.index]
        with open(self.files[entry.file], "rb") as f:
            f.seek(entry.offset)
            return json.loads(f.readline())

    def name(self, i: int, record: dict | None = None) -> str:
        """'file: record N (id X)', for error messages (pass the record if it is already read)."""
        entry = self.entries[i]
        record_id = (record if record is not None else self.record(i)).get("id")
        return f"{self.files[entry.file]}: record {entry.index}" + (f" (id {record_id})" if record_id is not None else "")

    # -- lengths for the grouped sampler --------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        """Words per sample plus 128 per image sample (the original's estimate)."""
        return [e.words + (IMAGE_LENGTH_ESTIMATE if e.images else 0) for e in self.entries]

    @property
    def modality_lengths(self) -> list[int]:
        """Words per sample, negative for text-only samples (the original's sign convention)."""
        return [e.words if e.images else -e.words for e in self.entries]

    # -- samples --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict | None:
        try:
            return self.encode(i)
        except LlavaError as e:
            message = str(e) if str(e).startswith(str(self.files[self.entries[i].file])) else f"{self.name(i)}: {e}"
            if not self.skip_bad:
                raise DataError(message) from None
            self._skip(type(e).__name__, message)
            return None

    def encode(self, i: int) -> dict:
        """{"input_ids", "labels", "pixel_values" (images or AnyRes tiles, 3, H, W) or None, "image_sizes"}."""
        entry = self.entries[i]
        record = self.record(i)
        paths = [self._image_path(p, self.files[entry.file])
                 for p in _images_of(record)]
        images = [load_image(p) for p in paths]
        turns = _drop_leading(record["conversations"])
        if self.template == PLAIN:
            prompt, spans = _plain_prompt(turns)
        else:
            if len(images) == 1:  # the original moves a lone image token to the front of its turn
                turns = [_image_first(t) if DEFAULT_IMAGE_TOKEN in t["value"] else t for t in turns]
            messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]
            prompt, spans = self.processor.build_prompt(messages, conv_mode=self.template, add_generation_prompt=False)
        sizes = [(image.height, image.width) for image in images]
        input_ids, labels = self.processor.encode_with_labels(prompt, spans, sizes, sample=self.name(i, record))
        ids = torch.tensor(input_ids, dtype=torch.long)
        image_positions = (ids == self.processor.image_token_id).nonzero()
        if len(image_positions) and int(image_positions[-1]) >= self.model_max_length:
            raise DataError(f"{len(ids)} tokens with image tokens up to position {int(image_positions[-1])}, "
                            f"over model_max_length {self.model_max_length}")
        item = {"input_ids": ids, "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": None, "image_sizes": None}
        if images:
            processed = [self.processor.image_processor.preprocess_one(image) for image in images]
            if self.processor.image_processor.is_anyres:
                item["pixel_values"] = torch.from_numpy(np.concatenate(processed))
                item["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            else:
                item["pixel_values"] = torch.from_numpy(np.stack(processed))
        return item


def _images_of(record: dict):
    """The record's "image" as a list (it may be one path, a list, or absent)."""
    images = record.get("image", [])
    return [images] if isinstance(images, str) else images


def _drop_leading(turns: list[dict]) -> list[dict]:
    """Drop turns before the first human (or system) turn, as the original does."""
    start = 0
    while start < len(turns) and ROLES.get(turns[start].get("from")) == "assistant":
        start += 1
    return turns[start:]


def _image_first(turn: dict) -> dict:
    value = DEFAULT_IMAGE_TOKEN + "\n" + turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return {**turn, "value": value}


def _plain_prompt(turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Stage 1: the image tokens, then the caption and a newline; only the caption and newline train
    (the original's preprocess_plain: the human text is dropped)."""
    human, answer = turns[-2]["value"], turns[-1]["value"]
    images = DEFAULT_IMAGE_TOKEN * human.count(DEFAULT_IMAGE_TOKEN)
    text = images + answer + "\n"
    return text, [(len(images), len(text))]


@dataclass
class DataCollator:
    """Truncates samples to model_max_length, right-pads input_ids with pad_token_id and labels with
    IGNORE_INDEX, and concatenates the batch's images (or AnyRes tiles) in sample order.
    None items (records skipped by skip_bad) are dropped; an all-None batch gives None."""

    pad_token_id: int
    model_max_length: int
    image_token_id: int | None = None

    def __call__(self, items: list[dict | None]) -> dict | None:
        items = [item for item in items if item is not None]
        if not items:
            return None
        ids = [item["input_ids"][: self.model_max_length] for item in items]
        labels = [item["labels"][: self.model_max_length] for item in items]
        if self.image_token_id is not None:
            for item, kept in zip(items, ids):
                if int((item["input_ids"] == self.image_token_id).sum()) != int((kept == self.image_token_id).sum()):
                    raise DataError(f"truncating to model_max_length {self.model_max_length} would cut image tokens")
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
        }
        for row, (x, y) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, : len(x)] = x
            batch["labels"][row, : len(y)] = y
            batch["attention_mask"][row, : len(x)] = 1
        pixels = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        sizes = [item["image_sizes"] for item in items if item.get("image_sizes") is not None]
        batch["image_sizes"] = torch.cat(sizes) if sizes else None
        return batch
