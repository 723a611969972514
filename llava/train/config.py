"""TrainConfig: every setting of a training run, read from a YAML recipe and overridden from the
command line (each field is also a flag: `lora_r` is `--lora-r`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.errors import TrainConfigError

STAGES = ("pretrain", "finetune")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    # -- the model to start from: a llava-hf checkpoint, or a vision model + a language model -----------
    model: str | None = None                 # llava-hf folder or hub id
    vision_tower: str | None = None          # e.g. openai/clip-vit-large-patch14-336 (with language_model)
    language_model: str | None = None        # e.g. lmsys/vicuna-7b-v1.5
    projector: str | None = None             # stage-1 output (folder) or original mm_projector.bin to start from
    projector_type: str = "mlp2x_gelu"       # for a new model: linear | mlpNx_gelu | identity
    vision_feature_layer: int | list = -2    # or a list of layers, their features concatenated (transformers)
    vision_feature_select_strategy: str = "default"
    image_aspect_ratio: str | None = None    # pad | square | anyres (new model); default: the checkpoint's / square
    image_grid_pinpoints: list | str | None = None  # anyres: [[h, w], ...] or "(1x1),...,(3x3)"
    dtype: str = "float32"                   # dtype of the frozen weights; trainable ones are kept in float32
    # -- what to train ----------------------------------------------------------------------------------
    stage: str = "finetune"                  # pretrain: projector only (plain template); finetune: + LLM
    template: str | None = None              # conversation template; default plain / the model's conv_mode
    train_vision_tower: bool = False
    train_projector: bool = True             # False: the projector (and image_newline) stays as loaded, the
                                             # original's freeze_mm_mlp_adapter
    vision_lr: float | None = None           # learning rate of the vision tower (if trained)
    projector_lr: float | None = None        # learning rate of the projector (default: lr)
    lora: bool = False
    qlora: bool = False                      # LoRA on a 4-bit (NF4, bitsandbytes) language model
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target_modules: list | str = "all-linear"  # or names like [q_proj, v_proj]
    # -- data -------------------------------------------------------------------------------------------
    data: list | str | None = None           # LLaVA JSON / JSONL file(s)
    image_folder: str | None = None
    model_max_length: int = 2048
    group_by_modality_length: bool = True
    group_by_length: bool = False            # transformers' group_by_length: sort by length within megabatches of
                                             # up to 50 optimizer steps' samples, so batches hold like lengths
    skip_bad: bool = False
    num_workers: int = 0
    # -- optimisation -----------------------------------------------------------------------------------
    epochs: float = 1.0
    max_steps: int = -1                      # > 0 overrides epochs
    batch_size: int = 16                     # per process
    grad_accum: int = 1
    token_mean_loss: bool = False            # a step's loss is the mean over all its answer tokens, every micro-batch
                                             # and process, as transformers' Trainer has computed it since 4.46
                                             # (num_items_in_batch); False: the mean of the micro-batches' means, as
                                             # the original LLaVA's (4.31). Alike with grad_accum 1 on one process
    lr: float | None = None                  # default: 1e-3 pretrain, 2e-5 finetune, 2e-4 LoRA
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"              # no | bf16 | fp16
    gradient_checkpointing: bool = False
    seed: int = 42
    # -- output -----------------------------------------------------------------------------------------
    output: str | None = None
    save_steps: int = 0                      # 0: no intermediate checkpoints
    save_total_limit: int = 2                # intermediate checkpoints kept (oldest removed)
    resume: str | None = None                # "latest" or a checkpoint folder
    logging_steps: int = 1
    progress: bool = True

    def __post_init__(self):
        self.validate()

    # -- derived values -----------------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.stage == "pretrain" else (2e-4 if self.lora or self.qlora else 2e-5)

    @property
    def use_lora(self) -> bool:
        return self.lora or self.qlora

    @property
    def data_files(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data or [])

    def validate(self) -> None:
        def need(ok, message):
            if not ok:
                raise TrainConfigError(message)

        need(self.stage in STAGES, f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        need(self.mixed_precision in PRECISIONS, f"mixed_precision {self.mixed_precision!r} is not one of "
                                                 f"{', '.join(PRECISIONS)}")
        need(self.image_aspect_ratio in (None, "pad", "square", "anyres"),
             f"image_aspect_ratio {self.image_aspect_ratio!r} is not pad, square or anyres")
        need(not (self.stage == "pretrain" and self.use_lora), "LoRA/QLoRA is for stage finetune; "
                                                               "stage pretrain trains only the projector")
        for name in ("batch_size", "grad_accum", "model_max_length", "logging_steps"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_steps", "num_workers", "save_total_limit", "weight_decay", "warmup_ratio", "max_grad_norm"):
            need(getattr(self, name) >= 0, f"{name} must not be negative, got {getattr(self, name)}")
        need(self.warmup_ratio <= 1, f"warmup_ratio must be at most 1, got {self.warmup_ratio}")
        need(self.max_steps > 0 or self.epochs > 0, "set epochs > 0 or max_steps > 0")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        for name in ("projector_lr", "vision_lr"):
            need(getattr(self, name) is None or getattr(self, name) >= 0,
                 f"{name} must not be negative, got {getattr(self, name)}")
        need(not (self.stage == "pretrain" and not self.train_projector and not self.train_vision_tower),
             "stage pretrain trains only the projector: with train_projector false nothing would train")

    def check_runnable(self) -> None:
        """What a run needs beyond valid values: a model, data and an output folder."""
        if not self.model and not (self.vision_tower and self.language_model):
            raise TrainConfigError("no model: set model (a llava-hf checkpoint) or vision_tower and language_model")
        if self.model and (self.vision_tower or self.language_model):
            raise TrainConfigError("set either model or vision_tower + language_model, not both")
        if not self.data_files:
            raise TrainConfigError("no data: set data (LLaVA JSON / JSONL files)")
        if not self.output:
            raise TrainConfigError("no output: set output (the folder for checkpoints and the final model)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


@functools.cache
def _kinds() -> dict[str, tuple]:
    """Each field's accepted types: `int | None` -> (int, NoneType)."""
    hints = typing.get_type_hints(TrainConfig)
    return {name: typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            for name, hint in hints.items()}


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from a YAML recipe (optional) with `overrides` (already typed) on top."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"{path}: no such recipe")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise TrainConfigError(f"{path}: a recipe is a mapping of setting: value")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = _fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{path}: " if path is not None else ""
        raise TrainConfigError(f"{where}unknown setting(s) {', '.join(unknown)}")
    for name, value in values.items():
        values[name] = _coerce(name, value)
    return TrainConfig(**values)


def _coerce(name: str, value):
    """Check (and where harmless, convert) a recipe value against the field's type."""
    args = _kinds()[name]
    if value is None and type(None) in args:
        return None
    for kind in args:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is list and isinstance(value, list):
            return [_coerce_int(name, v) for v in value] if int in args else value
    # numbers written as strings in YAML ("1e-3" parses as a string) are accepted
    if isinstance(value, str):
        for kind in (int, float):
            if kind in args:
                try:
                    return kind(value)
                except ValueError:
                    pass
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise TrainConfigError(f"setting {name}: expected {expected}, got {value!r}")


def _coerce_int(name: str, value) -> int:
    """One item of a list of integers (vision_feature_layer: [-5, -1], or "-5" from the command line)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"setting {name}: expected a list of integers, got {value!r}") from None


def add_arguments(parser) -> None:
    """One command-line flag per field (--lora-r 64, --lora / --no-lora, --data a.json b.jsonl)."""
    import argparse

    for name, f in _fields().items():
        args = _kinds()[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"(default {f.default!r})"
        if name == "resume":
            parser.add_argument(flag, dest=name, nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                                help="resume from the latest checkpoint in output, or from CHECKPOINT")
        elif bool in args:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif list in args:
            parser.add_argument(flag, dest=name, nargs="+", default=None, metavar="VALUE", help=help_text)
        else:
            kind = int if int in args else float if float in args else str
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def overrides_from_args(args) -> dict:
    """The fields given on the command line; a one-item list becomes a plain value."""
    out = {}
    for name in _fields():
        value = getattr(args, name, None)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
            if name == "lora_target_modules" and value != "all-linear":
                value = [value]
        if value is not None:
            out[name] = value
    return out


def save_config(config: TrainConfig, path: str | Path) -> None:
    from ..core.io import atomic_write_text

    atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")

