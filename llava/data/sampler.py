"""LLaVA-1.5's modality- and length-grouped sampling (`group_by_modality_length`) and the split of
one epoch's order into per-process batches.

The index functions are the original's (llava/train/llava_trainer.py), same names, same arguments,
same output for the same random state: megabatches of world_size * batch_size samples, sorted by
length inside, dealt to processes in chunks of even total length; image and text-only samples never
share a megabatch (except the one leftover megabatch). As in the original, the inner shuffles of
the modality split draw from torch's global generator; LengthGroupedSampler seeds that generator
(and restores it afterwards) so an epoch's order depends only on (seed, epoch).
"""

from __future__ import annotations

import torch


def split_to_even_chunks(indices, lengths, num_chunks):
    """Split indices into num_chunks chunks of (nearly) equal total length."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def get_length_grouped_indices(lengths, batch_size, world_size, generator=None, merge=True):
    """A random order in which each megabatch is sorted longest first and split evenly over processes."""
    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = world_size * batch_size
    megabatches = [indices[i: i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    megabatches = [split_to_even_chunks(megabatch, lengths, world_size) for megabatch in megabatches]
    return [i for megabatch in megabatches for batch in megabatch for i in batch]


def get_modality_length_grouped_indices(lengths, batch_size, world_size, generator=None):
    """Like get_length_grouped_indices, but image samples (length > 0) and text-only samples (length < 0)
    go into separate megabatches; the two leftover megabatches are merged into one final megabatch."""
    if not all(length != 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image samples, negative: text-only)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        # all one modality
        return get_length_grouped_indices(lengths, batch_size, world_size, generator=generator)
    mm_indices, mm_lengths = zip(*[(i, length) for i, length in enumerate(lengths) if length > 0])
    lang_indices, lang_lengths = zip(*[(i, -length) for i, length in enumerate(lengths) if length < 0])

    mm_shuffle = [mm_indices[i] for i in get_length_grouped_indices(mm_lengths, batch_size, world_size, generator=None)]
    lang_shuffle = [lang_indices[i] for i in get_length_grouped_indices(lang_lengths, batch_size, world_size,
                                                                        generator=None)]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i: i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i: i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]

    last_mm = mm_megabatches[-1]
    last_lang = lang_megabatches[-1]
    additional_batch = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatch_indices = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in megabatch_indices]

    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))

    return [i for megabatch in megabatches for i in megabatch]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """The epoch's full order of sample indices (all processes).

    Constructed as the original (batch_size, world_size, lengths, generator, group_by_modality) it
    yields exactly the original's order. With `seed` instead, the order is a pure function of
    (seed, epoch) (exact resume) and the global generator is left untouched.

    group_size > 1 groups by length over group_size batches per process instead of one: the samples
    of one optimizer step with gradient accumulation (world_size * batch_size * grad_accum, the original's
    megabatch on as many GPUs), dealt out as group_size megabatches of similar length, longest first.
    group_size=1 is the original. Without grouping (group_by_length=False) the order is a plain permutation.
    """

    def __init__(self, batch_size: int, world_size: int = 1, lengths=None, generator=None,
                 group_by_modality: bool = False, *, seed: int | None = None, group_size: int = 1,
                 group_by_length: bool = True):
        if lengths is None:
            raise ValueError("lengths must be provided")
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.generator = generator
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.group_size = group_size
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _indices(self, generator) -> list[int]:
        batch = self.batch_size * self.group_size
        if not self.group_by_length:
            return torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_by_modality:
            order = get_modality_length_grouped_indices(self.lengths, batch, self.world_size, generator=generator)
        else:
            order = get_length_grouped_indices([abs(x) for x in self.lengths], batch, self.world_size,
                                               generator=generator)
        return _deal(order, self.batch_size, self.world_size, self.group_size)

    def order(self, epoch: int | None = None) -> list[int]:
        if self.seed is None:
            return self._indices(self.generator)
        seed = self.seed * 1_000_003 + (self.epoch if epoch is None else epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # the original's inner shuffles use the global generator
            return self._indices(torch.Generator().manual_seed(seed))

    def __iter__(self):
        return iter(self.order())


def _deal(order: list[int], batch_size: int, world_size: int, group_size: int) -> list[int]:
    """Re-lay megabatches of world_size chunks of (batch_size * group_size) samples, each chunk sorted
    longest first, as group_size megabatches of world_size chunks of batch_size: megabatch k gives
    process r the k-th slice of chunk r."""
    if group_size == 1:
        return order
    big, chunk = world_size * batch_size * group_size, batch_size * group_size
    out = []
    for start in range(0, len(order), big):
        window = order[start: start + big]
        if len(window) < big:  # the leftover megabatch: kept as it is
            out.extend(window)
            continue
        chunks = [window[r * chunk: (r + 1) * chunk] for r in range(world_size)]
        for k in range(group_size):
            for r in range(world_size):
                out.extend(chunks[r][k * batch_size: (k + 1) * batch_size])
    return out


def rank_batches(order: list[int], batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's batches of one epoch: batch j of megabatch k is order[k*W*B + r*B : ... + B].

    With several processes a short last megabatch is filled from the start of the order, so every
    process runs the same number of batches (as accelerate's even_batches does); with one process
    the last batch is just shorter.
    """
    megabatch = batch_size * world_size
    if world_size > 1 and len(order) % megabatch:
        fill = megabatch - len(order) % megabatch
        order = list(order) + [order[i % len(order)] for i in range(fill)]
    batches = []
    for start in range(0, len(order), megabatch):
        chunk = order[start + rank * batch_size: start + (rank + 1) * batch_size]
        if chunk:
            batches.append(chunk)
    return batches
