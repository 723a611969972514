"""Training checkpoints for exact resume: trained weights, optimizer, scheduler, data position, RNG.

A checkpoint is output/checkpoint-STEP/ (under DeepSpeed / FSDP the weights, optimizer and RNG are in
accelerate's sharded layout in its accelerate/ subfolder). Every process writes into output/.checkpoint-STEP.tmp (its own
RNG state; the main process also the weights and optimizer), and the main process renames the folder
into place once all have finished, so a checkpoint-STEP folder is always complete; a run killed while
writing leaves only a .tmp folder, which resume ignores and the next save replaces.
Only trained parameters are stored: frozen ones are re-read from the model the run starts from.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core.errors import CheckpointError, TrainConfigError

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    micro_batches: int = 0        # micro-batches consumed (per process)
    tokens: int = 0               # non-padding tokens seen (all processes)
    elapsed_s: float = 0.0
    world_size: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    samples: int = 0              # dataset size, to refuse resuming on different data


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(accelerator, output: Path, state: TrainState, model, optimizer, scheduler) -> Path | None:
    """Write checkpoint-STEP atomically (all processes call this); returns its path on the main process."""
    final = output / f"checkpoint-{state.step}"
    tmp = output / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _sharded(accelerator):  # DeepSpeed / FSDP: weights and optimizer are sharded; accelerate writes its own layout
        accelerator.save_state(str(tmp / "accelerate"))
    else:
        torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        if not _sharded(accelerator):
            save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp / WEIGHTS), metadata={"format": "pt"})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def prune_checkpoints(output: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (keep=0 keeps all)."""
    if keep <= 0:
        return
    for path in list_checkpoints(output)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output: Path, resume: str) -> Path | None:
    """The checkpoint `resume` names: "latest" (None if there is none yet) or a folder."""
    if resume == "latest":
        checkpoints = list_checkpoints(output)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise CheckpointError(f"resume: {path} is not a training checkpoint (no {STATE})")
    return path


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler, expected: TrainState) -> TrainState:
    """Restore a checkpoint into the run; refuses one from a run with a different data layout."""
    state = TrainState(**json.loads((path / STATE).read_text()))
    for name in ("world_size", "batch_size", "grad_accum", "samples"):
        if getattr(state, name) != getattr(expected, name):
            raise TrainConfigError(f"resume: {path} was written with {name}={getattr(state, name)}, this run has "
                                   f"{getattr(expected, name)}; the data order would differ")
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if (path / "accelerate").is_dir():
        if not _sharded(accelerator):
            raise CheckpointError(f"resume: {path} was written by a DeepSpeed/FSDP run; resume it the same way")
        accelerator.load_state(str(path / "accelerate"))
        return state
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(str(path / WEIGHTS))
    params = dict(unwrapped.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        extra, missing = sorted(set(tensors) - trainable), sorted(trainable - set(tensors))
        raise CheckpointError(f"resume: {path} trains different parameters than this run "
                              f"(checkpoint only: {extra[:3]}, run only: {missing[:3]})")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
